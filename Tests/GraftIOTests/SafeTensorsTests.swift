import Foundation
import Testing
import GraftTensor
import GraftIO

@Suite struct SafeTensorsTests {
    /// Values that exercise rounding, subnormals and specials in every float dtype.
    static let probe: [Float] = [0, -0.0, 1, -2.5, 3.140625, 65504, 1e-8, 6.1035156e-05, 5.9604645e-08,
                                 .infinity, -.infinity, 1234.5678, -0.33333334, 1e30]

    @Test func roundTripEveryDType() throws {
        let dir = try TestSupport.tempDir()
        let path = dir + "/all.safetensors"
        let t = Tensor(shape: [2, 7], values: Self.probe)
        var w = SafeTensorsWriter()
        try w.add("w.f32", t)
        try w.add("w.f16", t, as: .f16)
        try w.add("w.bf16", t, as: .bf16)
        try w.add("w.f64", t, as: .f64)
        try w.add("ids", int64s: [1, -2, Int64.max, Int64.min, 0, 7], shape: [2, 3])
        try w.add("mask", int32s: [1, 0, -5, Int32.max], shape: [4])
        try w.add("scalar", Tensor(scalar: 42))
        try w.add("empty", Tensor(zeros: [0, 3]))
        w.metadata = ["format": "pt", "note": "quote \" backslash \\ newline \n tab \t ünïcode"]
        try w.write(to: path)

        let f = try SafeTensorsFile(contentsOf: path)
        #expect(f.metadata == w.metadata)
        #expect(Set(f.names) == ["w.f32", "w.f16", "w.bf16", "w.f64", "ids", "mask", "scalar", "empty"])
        #expect(f.info("w.bf16")?.dtype == .bf16)
        #expect(f.info("w.bf16")?.shape == [2, 7])
        #expect(f.info("nope") == nil)
        #expect(f.contains("ids") && !f.contains("nope"))

        #expect(try f.tensor("w.f32").scalars.map(\.bitPattern) == Self.probe.map(\.bitPattern))
        #expect(try f.tensor("w.f64").scalars.map(\.bitPattern) == Self.probe.map(\.bitPattern))
        let f16 = try f.tensor("w.f16")
        #expect(f16.shape == [2, 7])
        #expect(f16.scalars.map(\.bitPattern) == Self.probe.map { Float(Float16($0)).bitPattern })
        #expect(try f.tensor("w.bf16").scalars == Self.probe.map { HalfFloat.float(fromBF16: HalfFloat.bf16(from: $0)) })
        #expect(try f.int64s("ids") == [1, -2, Int64.max, Int64.min, 0, 7])
        #expect(try f.int64s("mask") == [1, 0, -5, Int64(Int32.max)])
        #expect(f.info("mask")?.dtype == .i32)
        #expect(try f.tensor("scalar").shape == [])
        #expect(try f.tensor("scalar").item == 42)
        #expect(try f.tensor("empty").shape == [0, 3])
    }

    @Test func knownBF16AndF16BitPatternsOnDisk() throws {
        let path = try TestSupport.tempDir() + "/bits.safetensors"
        var w = SafeTensorsWriter()
        // 1.0, -2.0, 65504 (max half), 1+2^-8 (bf16 tie -> even 1.0), 1+3*2^-8 (bf16 tie -> up to even),
        // 1e-7 (half subnormal), inf, nan, 1+2^-11 (half tie -> even 1.0), 1+3*2^-11 (half tie -> up to even)
        let values: [Float] = [1.0, -2.0, 65504, 1.00390625, 1.01171875, 1e-7, .infinity, .nan, 1.00048828125, 1.00146484375]
        try w.add("h", Tensor(shape: [10], values: values), as: .f16)
        try w.add("b", Tensor(shape: [10], values: values), as: .bf16)
        try w.write(to: path)
        let f = try SafeTensorsFile(contentsOf: path)
        let h = try f.withRawBytes("h") { raw in (0..<10).map { raw.loadUnaligned(fromByteOffset: 2 * $0, as: UInt16.self) } }
        let b = try f.withRawBytes("b") { raw in (0..<10).map { raw.loadUnaligned(fromByteOffset: 2 * $0, as: UInt16.self) } }
        #expect(h == [0x3c00, 0xc000, 0x7bff, 0x3c04, 0x3c0c, 0x0002, 0x7c00, 0x7e00, 0x3c00, 0x3c02])
        #expect(b == [0x3f80, 0xc000, 0x4780, 0x3f80, 0x3f82, 0x33d7, 0x7f80, 0x7fc0, 0x3f80, 0x3f80])
    }

    @Test func matchesReferenceWriterByteForByte() throws {
        // Written by Python safetensors 0.8.0 save_file({'beta': b, 'alpha': a}, metadata={'format': 'pt'}).
        let refPath = TestSupport.fixtures + "/io/reference_f32.safetensors"
        let ref = try SafeTensorsFile(contentsOf: refPath)
        #expect(ref.names == ["alpha", "beta"])
        #expect(try ref.tensor("alpha").scalars == [1.5, -2.25, 3.0, 0.1, 1e-8, -7.0])
        var w = SafeTensorsWriter()
        try w.add("beta", ref.tensor("beta"))
        try w.add("alpha", ref.tensor("alpha"))
        w.metadata = ref.metadata
        #expect(w.serialized() == (try readFile(refPath)))

        let refI64 = TestSupport.fixtures + "/io/reference_i64.safetensors"
        var wi = SafeTensorsWriter()
        try wi.add("x", int64s: try SafeTensorsFile(contentsOf: refI64).int64s("x"), shape: [2, 2])
        #expect(wi.serialized() == (try readFile(refI64)))
    }

    @Test func readsVendoredMiniLMFixture() throws {
        let f = try SafeTensorsFile(contentsOf: TestSupport.fixtures + "/peft-minilm/base_expected.safetensors")
        #expect(f.names == ["attention_mask", "input_ids", "last_hidden_state"])
        guard let ids = f.info("input_ids"), let hidden = f.info("last_hidden_state") else {
            Issue.record("fixture keys missing"); return
        }
        #expect(ids.dtype == .i64 && ids.shape.count == 2 && ids.shape[0] == 2)
        let t = ids.shape[1]
        #expect(f.info("attention_mask")?.dtype == .i64)
        #expect(f.info("attention_mask")?.shape == [2, t])
        #expect(hidden.dtype == .f32 && hidden.shape == [2, t, 384])
        let idValues = try f.int64s("input_ids")
        #expect(idValues.count == 2 * t)
        #expect(idValues.first == 101)  // [CLS]
        let x = try f.tensor("last_hidden_state")
        #expect(x.shape == [2, t, 384])
        #expect(abs(x.pointer[0] - -0.5026579) < 1e-6)
        #expect(x.buffer.allSatisfy { $0.isFinite })
    }

    @Test func missingKeyIsNotFound() throws {
        let path = TestSupport.fixtures + "/io/reference_i64.safetensors"
        let f = try SafeTensorsFile(contentsOf: path)
        TestSupport.expectError(.notFound, mentions: ["reference_i64.safetensors", "'missing'"]) { _ = try f.tensor("missing") }
        TestSupport.expectError(.notFound, mentions: ["reference_i64.safetensors", "'missing'"]) { _ = try f.int64s("missing") }
        TestSupport.expectError(.invalidArgument, mentions: ["'x'", "I64"]) { _ = try f.tensor("x") }
        TestSupport.expectError(.notFound, mentions: ["nonexistent.safetensors"]) {
            _ = try SafeTensorsFile(contentsOf: "/nonexistent/nonexistent.safetensors")
        }
    }

    @Test func writerRejectsBadInput() throws {
        var w = SafeTensorsWriter()
        try w.add("a", Tensor(zeros: [2]))
        TestSupport.expectError(.invalidArgument, mentions: ["'a'", "twice"]) { try w.add("a", Tensor(zeros: [2])) }
        TestSupport.expectError(.invalidArgument, mentions: ["'ids'", "3 values", "[2, 2]"]) {
            try w.add("ids", int64s: [1, 2, 3], shape: [2, 2])
        }
        TestSupport.expectError(.invalidArgument, mentions: ["__metadata__"]) { try w.add("__metadata__", Tensor(zeros: [1])) }
        TestSupport.expectError(.invalidArgument, mentions: ["I64"]) { try w.add("b", Tensor(zeros: [1]), as: .i64) }
    }
}

/// Malformed safetensors files, built byte by byte: each must fail with `.format`, naming the file and fault.
@Suite struct MalformedSafeTensorsTests {
    static func file(header: String, data: [UInt8] = [], declaredLength: UInt64? = nil) -> [UInt8] {
        var b = ByteBuilder()
        b.le(declaredLength ?? UInt64(header.utf8.count))
        b.raw(Array(header.utf8))
        b.raw(data)
        return b.bytes
    }

    @Test func truncatedFile() throws {
        let path = try TestSupport.writeTemp("truncated.safetensors", [0x10, 0, 0])
        TestSupport.expectError(.format, mentions: ["truncated.safetensors", "truncated file", "3 bytes"]) {
            _ = try SafeTensorsFile(contentsOf: path)
        }
    }

    @Test func headerLengthPastEnd() throws {
        let bytes = Self.file(header: "{}", declaredLength: 1000)
        let path = try TestSupport.writeTemp("longheader.safetensors", bytes)
        TestSupport.expectError(.format, mentions: ["longheader.safetensors", "header length 1000 runs past end of file (size 10)"]) {
            _ = try SafeTensorsFile(contentsOf: path)
        }
    }

    @Test func headerNotAnObject() throws {
        let path = try TestSupport.writeTemp("array.safetensors", Self.file(header: "[1, 2]  "))
        TestSupport.expectError(.format, mentions: ["array.safetensors", "not an object"]) {
            _ = try SafeTensorsFile(contentsOf: path)
        }
    }

    @Test func offsetsOutOfRange() throws {
        let header = #"{"w":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#
        let path = try TestSupport.writeTemp("range.safetensors", Self.file(header: header, data: [UInt8](repeating: 0, count: 16)))
        TestSupport.expectError(.format, mentions: ["range.safetensors", "'w'", "out of range", "16 bytes"]) {
            _ = try SafeTensorsFile(contentsOf: path)
        }
    }

    @Test func overlappingOffsets() throws {
        let header = #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#
        let path = try TestSupport.writeTemp("overlap.safetensors", Self.file(header: header, data: [UInt8](repeating: 0, count: 12)))
        TestSupport.expectError(.format, mentions: ["overlap.safetensors", "'b'", "overlap tensor 'a'"]) {
            _ = try SafeTensorsFile(contentsOf: path)
        }
    }

    @Test func unknownDType() throws {
        let header = #"{"w":{"dtype":"F12","shape":[1],"data_offsets":[0,4]}}"#
        let path = try TestSupport.writeTemp("dtype.safetensors", Self.file(header: header, data: [0, 0, 0, 0]))
        TestSupport.expectError(.format, mentions: ["dtype.safetensors", "'w'", "unknown dtype 'F12'"]) {
            _ = try SafeTensorsFile(contentsOf: path)
        }
    }

    @Test func shapeSizeMismatch() throws {
        let header = #"{"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,8]}}"#
        let path = try TestSupport.writeTemp("mismatch.safetensors", Self.file(header: header, data: [UInt8](repeating: 0, count: 8)))
        TestSupport.expectError(.format, mentions: ["mismatch.safetensors", "'w'", "needs 12 bytes", "span 8"]) {
            _ = try SafeTensorsFile(contentsOf: path)
        }
    }
}
