import Foundation
import GraftModels
import GraftTensor

/// PEFT's rules for which module paths an adapter config selects.
public struct TargetMatcher {
    let config: AdapterConfig

    /// A matcher for `config`.
    public init(config: AdapterConfig) {
        self.config = config
    }

    /// Whether the module at `path` (a dotted Hugging Face path) is selected; `isLinear` and `isOutputHead`
    /// serve `"all-linear"`.
    public func matches(path: String, isLinear: Bool, isOutputHead: Bool) -> Bool {
        if let exclude = config.excludeModules, TargetMatcher.nameMatches(exclude, path) { return false }
        // Modules trained in full are never adapted as well.
        for m in config.modulesToSave where TargetMatcher.regexMatches("(^|.*\\.)\(NSRegularExpression.escapedPattern(for: m))($|\\..*)", path) {
            return false
        }
        let found: Bool
        switch config.targetModules {
        case .regex(let pattern):
            return TargetMatcher.regexMatches(pattern, path)
        case .allLinear:
            found = isLinear && !isOutputHead
        case .names(let names):
            found = names.contains(path) || names.contains { path.hasSuffix("." + $0) }
        }
        guard found, let layers = config.layersToTransform else { return found }
        guard let index = TargetMatcher.layerIndex(of: path, patterns: config.layersPattern) else { return false }
        return layers.contains(index)
    }

    static func nameMatches(_ targets: TargetModules, _ path: String) -> Bool {
        switch targets {
        case .regex(let pattern): return regexMatches(pattern, path)
        case .names(let names): return names.contains(path) || names.contains { path.hasSuffix("." + $0) }
        case .allLinear: return false
        }
    }

    /// Whether a config value naming a subset of the targets (IA³'s `feedforward_modules`: a list of names, each
    /// matching the path or its last dotted segments, or a regex over the whole path) selects `path`; nil when the
    /// value is neither (absent).
    public static func subsetSelects(_ value: Any?, path: String) -> Bool? {
        switch value {
        case let names as [String]: return nameMatches(.names(names), path)
        case let regex as String: return regexMatches(regex, path)
        default: return nil
        }
    }

    /// Whether `pattern` matches the whole of `string`.
    public static func regexMatches(_ pattern: String, _ string: String) -> Bool {
        guard let re = CompiledPatterns.shared.regex("^(?:\(pattern))$") else { return false }
        return re.firstMatch(in: string, range: NSRange(string.startIndex..., in: string)) != nil
    }

    /// The layer index in a path: the number after the first `<pattern>.` (or after the first dotted segment
    /// followed by a number when no pattern is given), as PEFT finds it.
    static func layerIndex(of path: String, patterns: [String]?) -> Int? {
        let candidates = patterns ?? [nil as String?].compactMap { $0 }
        let regexes = candidates.isEmpty ? [#"^.*?\.[^.]*\.(\d+)\."#] : candidates.map { #"^.*?\."# + NSRegularExpression.escapedPattern(for: $0) + #"\.(\d+)\."# }
        for pattern in regexes {
            guard let re = CompiledPatterns.shared.regex(pattern),
                  let m = re.firstMatch(in: path, range: NSRange(path.startIndex..., in: path)),
                  let r = Range(m.range(at: 1), in: path) else { continue }
            return Int(path[r])
        }
        return nil
    }

    /// The value of the first `pattern → value` entry whose pattern matches the end of `path` after a dot
    /// (PEFT's `rank_pattern` / `alpha_pattern` rule), or nil.
    public static func patternValue(_ entries: [(pattern: String, value: Double)], path: String) -> Double? {
        for (pattern, value) in entries where regexMatches("(.*\\.)?(\(pattern))", path) {
            return value
        }
        return nil
    }
}

/// Regexes compiled once per process and pattern: a config's patterns are matched against every module path of a
/// model, for every adapter a long-running graftd adds. (swift-corelibs-foundation also leaks a buffer on each
/// compile of a pattern longer than ~256 characters.) Bounded: emptied when it passes 512 patterns.
private final class CompiledPatterns: @unchecked Sendable {
    static let shared = CompiledPatterns()
    private var compiled: [String: NSRegularExpression?] = [:]
    private let lock = NSLock()

    /// The compiled `pattern`, or nil when it is not a valid regex.
    func regex(_ pattern: String) -> NSRegularExpression? {
        lock.lock()
        defer { lock.unlock() }
        if let known = compiled[pattern] { return known }
        if compiled.count >= 512 { compiled.removeAll(keepingCapacity: true) }
        let re = try? NSRegularExpression(pattern: pattern)
        compiled[pattern] = re
        return re
    }
}
