import GraftModels

/// KV caches of finished generations, kept so that a later prompt under the same adapter that starts with the
/// same tokens copies those positions' keys and values instead of recomputing them (prompt caching). Least
/// recently used entries are evicted past ``budgetBytes``.
///
/// The cached keys and values are only valid while the adapter's weights and the model stay as they were: the
/// owner calls ``removeAll()`` whenever they may have changed (adapters loaded, deleted, combined, trained).
public final class PromptPrefixCache {
    struct Entry {
        var adapter: String
        var tokens: [Int32]
        var cache: KVCache
        var lastUse: UInt64
    }

    /// The most bytes the kept caches may hold.
    public let budgetBytes: Int
    /// The shortest shared prefix worth copying, in tokens.
    public let minimumPrefix: Int
    private var entries: [Entry] = []
    private var clock: UInt64 = 0
    /// Prompts that found a shared prefix, and those that did not.
    public private(set) var hits: UInt64 = 0, misses: UInt64 = 0
    /// Prompt tokens whose keys and values were copied instead of computed.
    public private(set) var reusedTokens: UInt64 = 0

    /// An empty cache holding at most `budgetBytes` of keys and values (0 = keeps nothing).
    public init(budgetBytes: Int, minimumPrefix: Int = 4) {
        self.budgetBytes = max(budgetBytes, 0)
        self.minimumPrefix = max(minimumPrefix, 1)
    }

    /// Bytes the kept caches hold.
    public var bytes: Int { entries.reduce(0) { $0 + $1.cache.allocatedBytes } }
    /// Caches kept.
    public var count: Int { entries.count }

    /// The kept cache sharing the longest prefix with `prompt` under `adapter` ("" = base), and that prefix's length
    /// (less than `prompt.count`, so the prompt's last token still runs and yields logits); nil below
    /// ``minimumPrefix``.
    func lookup(adapter: String, prompt: [Int32]) -> (cache: KVCache, length: Int)? {
        var best: (index: Int, length: Int)?
        for (i, e) in entries.enumerated() where e.adapter == adapter {
            let limit = min(e.tokens.count, e.cache.length, prompt.count - 1)
            var n = 0
            while n < limit && e.tokens[n] == prompt[n] { n += 1 }
            if n >= minimumPrefix && n > (best?.length ?? 0) { best = (i, n) }
        }
        guard let best else {
            misses += 1
            return nil
        }
        hits += 1
        reusedTokens += UInt64(best.length)
        clock += 1
        entries[best.index].lastUse = clock
        return (entries[best.index].cache, best.length)
    }

    /// Keeps the cache of a finished generation under `adapter` ("" = base) whose positions hold `tokens`' keys
    /// and values; evicts the least recently used caches past the budget (this one too, if it alone is larger).
    /// A fast-mode generation's cache is not kept: its keys and values came from int8 products, which an exact
    /// request must not reuse.
    public func store(_ generation: BatchedGeneration) {
        guard !generation.sequence.parameters.fastDecode else { return }
        let cache = generation.sequence.cache
        let tokens = Array((generation.prompt + generation.sequence.generated).prefix(cache.length))
        guard tokens.count >= minimumPrefix, cache.allocatedBytes <= budgetBytes else { return }
        let adapter = generation.adapter ?? ""
        // A prompt already covered by a kept cache adds nothing.
        if entries.contains(where: { $0.adapter == adapter && $0.tokens.starts(with: tokens) }) { return }
        entries.removeAll { $0.adapter == adapter && tokens.starts(with: $0.tokens) }
        clock += 1
        entries.append(Entry(adapter: adapter, tokens: tokens, cache: cache, lastUse: clock))
        var total = bytes
        while total > budgetBytes, let oldest = entries.indices.min(by: { entries[$0].lastUse < entries[$1].lastUse }) {
            total -= entries[oldest].cache.allocatedBytes
            entries.remove(at: oldest)
        }
    }

    /// Forgets every kept cache (the weights may have changed).
    public func removeAll() { entries.removeAll() }
}
