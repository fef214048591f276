import Foundation
import GraftAdapters
import GraftIO
import GraftTensor

extension AdapterCombination {
    /// The keyword arguments of PEFT's `add_weighted_adapter` a JSON options object may carry (plus Graft's
    /// `seed` for DARE's masks). `svd_full_matrices` and `svd_driver` change how PyTorch computes the SVD, not its
    /// truncated result, so they are accepted and have no effect.
    public static let optionKeys: [String] = [
        "combination_type", "svd_rank", "svd_clamp", "svd_full_matrices", "svd_driver", "density",
        "majority_sign_method", "seed",
    ]

    /// A combination of `adapters` with `weights` and the options of a JSON object in PEFT's keyword names
    /// (nil or `{}` = PEFT's defaults; null values = the default). Every door (C ABI, Python, CLI) translates
    /// into this one parser. Errors name `source` and the key at fault; the result is validated.
    public init(adapters: [String], weights: [Double], optionsJSON text: String?, source: String) throws {
        self.init(adapters: adapters, weights: weights)
        if let text, !text.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty {
            try apply(try parseJSONObject(text, source: source), source: source)
        }
        try validate()
    }

    private mutating func apply(_ object: [String: Any], source: String) throws {
        for key in object.keys.sorted() where !Self.optionKeys.contains(key) {
            throw GraftError.invalid("\(source): unknown key '\(key)' (known: \(Self.optionKeys.joined(separator: ", ")))")
        }
        func present(_ key: String) -> Any? {
            guard let v = object[key], !(v is NSNull) else { return nil }
            return v
        }
        func string(_ key: String) throws -> String? {
            guard let v = present(key) else { return nil }
            guard let s = v as? String else { throw GraftError.invalid("\(source): '\(key)' must be a string, got \(JSONScalar.describe(v))") }
            return s
        }
        func number(_ key: String) throws -> Double? {
            guard let v = present(key) else { return nil }
            guard !JSONScalar.isBool(v), let d = JSONScalar.number(v) else {
                throw GraftError.invalid("\(source): '\(key)' must be a number, got \(JSONScalar.describe(v))")
            }
            return d
        }
        func integer(_ key: String) throws -> Int? {
            guard let v = present(key) else { return nil }
            guard !JSONScalar.isBool(v), let i = JSONScalar.integer(v) else {
                throw GraftError.invalid("\(source): '\(key)' must be an integer, got \(JSONScalar.describe(v))")
            }
            return i
        }
        if let t = try string("combination_type") { type = try CombinationType(peftName: t) }
        svdRank = try integer("svd_rank")
        svdClamp = try number("svd_clamp")
        density = try number("density")
        if let m = try string("majority_sign_method") { majoritySignMethod = try MajoritySignMethod(peftName: m) }
        if let s = try integer("seed") {
            guard s >= 0 else { throw GraftError.invalid("\(source): 'seed' must be ≥ 0, got \(s)") }
            seed = UInt64(s)
        }
        if let v = present("svd_full_matrices"), !JSONScalar.isBool(v) {
            throw GraftError.invalid("\(source): 'svd_full_matrices' must be true or false, got \(JSONScalar.describe(v))")
        }
        _ = try string("svd_driver")
    }
}

extension CombinationReport {
    /// The report as a JSON object: `name`, `combination_type` (as applied), `r`, `kept_fraction` (DARE, else null).
    public var jsonObject: [String: Any] {
        ["name": adapter.name, "combination_type": type.rawValue, "r": rank,
         "kept_fraction": keptFraction.map { $0 as Any } ?? NSNull()]
    }
}
