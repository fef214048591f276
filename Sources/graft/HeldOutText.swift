import Foundation
import Graft
import GraftAssets

/// What `graft moefy` and `graft depth` share: the texts they build and measure on, held-out perplexity and their
/// table rows, so the two commands' figures are comparable.
enum HeldOutText {
    /// The texts of `data`: the tweet corpus's training split (plain text) for "tweets", or a file's non-empty lines.
    static func load(_ data: String) throws -> [String] {
        if data == AssetCache.tweetsDataName {
            return try TweetCorpus.load(path: AssetCache.path(AssetCache.tweetsCSV)).train.map(\.text)
        }
        guard let text = try? String(contentsOfFile: data, encoding: .utf8) else {
            throw GraftError.io("--data: cannot read '\(data)' as UTF-8 text")
        }
        return text.split(separator: "\n").map(String.init).filter { !$0.isEmpty }
    }

    /// `texts` split as both commands split them: every 10th text held out (the first `evalTexts` of those scored,
    /// as next-token examples of at most `maxLength` tokens with 2 or more), the others calibration text.
    static func split(_ texts: [String], evalTexts: Int, maxLength: Int, tokenizer: BPETokenizer)
        -> (calibration: [String], heldOut: [TokenizedExample]) {
        let calibration = texts.enumerated().filter { $0.offset % 10 != 9 }.map(\.element)
        let heldOut = texts.enumerated().filter { $0.offset % 10 == 9 }.map(\.element).prefix(evalTexts)
        let examples = heldOut.map { Array(tokenizer.encode($0).prefix(maxLength)) }.filter { $0.count >= 2 }.map { ids in
            TokenizedExample(ids: ids, targets: Array(ids.dropFirst()) + [-100])
        }
        return (calibration, examples)
    }

    /// Perplexity of next-token prediction over `examples` in batches of 32 texts: packed rows, or one padded row
    /// per text under a depth policy (which routes whole sequences).
    static func perplexity(_ llama: LlamaModel, _ examples: [TokenizedExample]) throws -> Double {
        let objective = CausalLMObjective(model: llama)
        let padded = llama.depthPolicy != nil
        var loss = 0.0, count = 0
        for start in stride(from: 0, to: examples.count, by: 32) {
            let batch = try PackedBatch(examples[start..<min(examples.count, start + 32)], padded: padded)
            let r = try objective.evaluate(batch)
            loss += r.lossSum
            count += r.count
        }
        return count > 0 ? exp(loss / Double(count)) : .nan
    }

    /// Training batch `step` of `size` texts from `sequences` (cycled in order) with its next-token targets
    /// (-100 past each text's end).
    static func trainingBatch(_ sequences: [[Int32]], step: Int, size: Int) throws -> (batch: TokenBatch, targets: [Int32]) {
        let rows = (0..<size).map { sequences[(step * size + $0) % sequences.count] }
        let length = rows.map(\.count).max() ?? 0
        let targets = rows.flatMap { s in Array(s.dropFirst()) + [Int32](repeating: -100, count: length - s.count + 1) }
        return (try TokenBatch(sequences: rows), targets)
    }

    /// One table row: the first column left-aligned in 10 characters, the others right-aligned in 14.
    static func row(_ cells: [String]) -> String {
        cells.enumerated().map { i, c in
            let width = i == 0 ? 10 : 14
            let pad = String(repeating: " ", count: max(0, width - c.count))
            return i == 0 ? c + pad : pad + c
        }.joined(separator: " ")
    }
}
