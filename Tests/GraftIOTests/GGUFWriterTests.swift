import Foundation
import Testing
import GraftTensor
import GraftIO
import GraftTestSupport

/// GraftIO's GGUF writer, read back by the reader and checked byte for byte against the independent test writer.
@Suite struct GGUFWriterTests {
    static let metadata: [(String, GGUFValue)] = [
        ("general.architecture", .string("llama")), ("u8", .uint8(250)), ("i8", .int8(-100)), ("u16", .uint16(65000)),
        ("i16", .int16(-32000)), ("u32", .uint32(4_000_000_000)), ("i32", .int32(-2_000_000_000)), ("u64", .uint64(.max)),
        ("i64", .int64(.min)), ("f32", .float32(1e-5)), ("f64", .float64(-2.5e300)), ("yes", .bool(true)),
        ("unicode", .string("héllo ✓ 世界")), ("tokens", .array([.string("<s>"), .string("Ġthe")])),
        ("nested", .array([.array([.uint8(1), .uint8(2)]), .array([.uint8(3)])])),
    ]

    @Test func writesWhatTheReaderAndTheTestWriterAgreeOn() throws {
        var w = GGUFWriter(), reference = GGUFTestWriter()
        for (k, v) in Self.metadata {
            try w.add(k, v)
            reference.add(k, v)
        }
        let a = Tensor(shape: [2, 3], values: [1, -2, 3.5, 0, 1e-3, -7])
        let q = Tensor(shape: [1, 64], values: (0..<64).map { Float($0) / 10 - 3 })
        try w.addTensor("a", a, type: .f32)
        try w.addTensor("q", q, type: .q8_0)
        try w.addTensor("h", a, type: .f16)
        for (name, t, type) in [("a", a, GGMLType.f32), ("q", q, .q8_0), ("h", a, .f16)] {
            var bytes = [UInt8](repeating: 0, count: t.count / type.blockSize * type.typeSize)
            try bytes.withUnsafeMutableBytes { raw in if let p = raw.baseAddress { try type.quantize(t.pointer, into: p, count: t.count) } }
            reference.addTensor(name, shape: t.shape, type: type, data: bytes)
        }
        let bytes = w.serialized()
        #expect(bytes == reference.bytes(), "the same file as the independent writer")
        let f = try GGUFFile(contentsOf: try TestSupport.writeTemp("writer.gguf", bytes))
        #expect(f.metadataKeys == Self.metadata.map(\.0))
        for (k, v) in Self.metadata { #expect(f.metadata[k] == v, "\(k)") }
        #expect(f.tensors.map(\.name) == ["a", "q", "h"] && f.tensors.map(\.shape) == [[2, 3], [1, 64], [2, 3]])
        #expect(f.tensors.allSatisfy { $0.offset % 32 == 0 })
        #expect(maxAbsDifference(try f.tensor("a"), a) == 0)
        #expect(maxAbsDifference(try f.tensor("h"), a) <= 7 * 0x1p-11)
        #expect(maxAbsDifference(try f.tensor("q"), q) <= 3.4 / 127)
    }

    @Test func rejectsWhatCannotBeWritten() throws {
        var w = GGUFWriter()
        try w.add("k", .uint8(1))
        for (what, body) in [
            ("twice", { (w: inout GGUFWriter) in try w.add("k", .uint8(2)) }),
            ("empty array", { (w: inout GGUFWriter) in try w.add("e", .array([])) }),
            ("different types", { (w: inout GGUFWriter) in try w.add("m", .array([.uint8(1), .int8(1)])) }),
            ("power of two", { (w: inout GGUFWriter) in try w.add("general.alignment", .uint32(24)) }),
            ("whole Q8_0 blocks", { (w: inout GGUFWriter) in try w.addTensor("t", Tensor(zeros: [4, 8]), type: .q8_0) }),
            ("bytes for", { (w: inout GGUFWriter) in try w.addTensor("t", shape: [2, 2], type: .f32, bytes: [0, 0]) }),
            ("element 1 is nan", { (w: inout GGUFWriter) in try w.addTensor("t", Tensor(shape: [2], values: [0, .nan]), type: .f16) }),
        ] as [(String, (inout GGUFWriter) throws -> Void)] {
            do {
                try body(&w)
                Issue.record("accepted: \(what)")
            } catch let e as GraftError {
                #expect(e.message.contains(what), "\(e.message)")
            }
        }
    }
}
