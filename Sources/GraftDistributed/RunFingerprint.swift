import GraftTensor

/// A 64-bit FNV-1a digest of what a run is made of (configuration, data, initial weights), compared across
/// ranks at start-up so ranks that would silently train different things fail at once instead.
public struct RunFingerprint: Sendable, Equatable {
    /// The digest so far.
    public private(set) var value: UInt64 = 0xcbf2_9ce4_8422_2325

    /// An empty digest.
    public init() {}

    /// Mixes in raw bytes.
    public mutating func combine(bytes: UnsafeRawBufferPointer) {
        for byte in bytes {
            value ^= UInt64(byte)
            value = value &* 0x0000_0100_0000_01b3
        }
    }

    /// Mixes in a string's UTF-8 bytes and a terminator (so "ab"+"c" differs from "a"+"bc").
    public mutating func combine(_ text: String) {
        var text = text
        text.withUTF8 { combine(bytes: UnsafeRawBufferPointer($0)) }
        combine(0xFF as UInt8)
    }

    /// Mixes in an integer's bytes.
    public mutating func combine<T: FixedWidthInteger>(_ number: T) {
        withUnsafeBytes(of: number.littleEndian) { combine(bytes: $0) }
    }

    /// Mixes in an array of fixed-width values and its length.
    public mutating func combine<T: FixedWidthInteger>(_ numbers: [T]) {
        combine(numbers.count)
        numbers.withUnsafeBytes { combine(bytes: $0) }
    }

    /// Mixes in a tensor's shape and values.
    public mutating func combine(_ tensor: Tensor) {
        combine(tensor.shape)
        combine(bytes: UnsafeRawBufferPointer(start: tensor.pointer, count: tensor.count * 4))
    }
}

extension ProcessGroup {
    /// Throws `.invalidArgument` unless every member passes the same fingerprints: for each named part that
    /// differs the message names the part and the ranks that differ from rank 0 (all members throw alike).
    public func verifyIdentical(_ parts: [(name: String, fingerprint: RunFingerprint)]) throws {
        guard size > 1, !parts.isEmpty else { return }
        let all = try allgather(parts.map(\.fingerprint.value))
        var problems: [String] = []
        for (i, part) in parts.enumerated() {
            let reference = all[0][i]
            let differing = all.indices.filter { all[$0][i] != reference }
            if !differing.isEmpty {
                let hex = { (v: UInt64) in String(v, radix: 16) }
                problems.append("\(part.name): rank\(differing.count == 1 ? "" : "s") "
                                + differing.map { "\($0) (\(hex(all[$0][i])))" }.joined(separator: ", ")
                                + " differ\(differing.count == 1 ? "s" : "") from rank 0 (\(hex(reference)))")
            }
        }
        guard problems.isEmpty else {
            throw GraftError.invalid("the \(size) MPI ranks do not start the same run; " + problems.joined(separator: "; ")
                                     + ". Every rank must get the same options, data and model (rank \(rank) speaking)")
        }
    }
}
