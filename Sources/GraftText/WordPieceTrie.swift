import Foundation

/// The vocabulary as two byte tries — word-initial entries, and continuation entries with the prefix
/// removed — so the longest match at a position costs one walk over the word's UTF-8 bytes instead of
/// building and hashing a string per candidate length. Matches always end on a scalar boundary because
/// vocabulary entries are whole UTF-8 strings.
struct WordPieceTrie: Sendable {
    /// (node << 8 | byte) → child node. Node 0 is the initial root, node 1 the continuation root.
    private var children: [UInt64: Int32] = [:]
    /// Token id ending at each node, or -1.
    private var terminal: [Int32] = [-1, -1]

    init(_ vocabulary: [String: Int32], continuingSubwordPrefix prefix: String) {
        let prefixBytes = Array(prefix.utf8)
        for (token, id) in vocabulary {
            let bytes = Array(token.utf8)
            insert(bytes[...], id: id, root: 0)
            if !prefixBytes.isEmpty, bytes.count > prefixBytes.count, bytes.starts(with: prefixBytes) {
                insert(bytes[prefixBytes.count...], id: id, root: 1)
            }
        }
        if prefixBytes.isEmpty {
            for (token, id) in vocabulary { insert(Array(token.utf8)[...], id: id, root: 1) }
        }
    }

    private mutating func insert(_ bytes: ArraySlice<UInt8>, id: Int32, root: Int32) {
        guard !bytes.isEmpty else { return }
        var node = root
        for b in bytes {
            let key = UInt64(UInt32(node)) << 8 | UInt64(b)
            if let child = children[key] {
                node = child
            } else {
                let child = Int32(terminal.count)
                terminal.append(-1)
                children[key] = child
                node = child
            }
        }
        // A duplicated token keeps its last id, as the String dictionary does.
        terminal[Int(node)] = id
    }

    /// The id and end offset of the longest entry matching `bytes` from `start`, or nil if none does.
    func longestMatch(_ bytes: [UInt8], from start: Int, continuation: Bool) -> (Int32, Int)? {
        var node: Int32 = continuation ? 1 : 0
        var best: (Int32, Int)?
        var i = start
        while i < bytes.count {
            guard let child = children[UInt64(UInt32(node)) << 8 | UInt64(bytes[i])] else { break }
            node = child
            i += 1
            let id = terminal[Int(node)]
            if id >= 0 { best = (id, i) }
        }
        return best
    }
}
