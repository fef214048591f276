import Foundation
import Testing
import GraftTensor
import GraftIO
import GraftTestSupport

/// Packs a Float into IEEE half bits with Swift's own Float16 (independent of GraftIO's converter).
private func h(_ x: Float) -> [UInt8] {
    let bits = Float16(x).bitPattern
    return [UInt8(bits & 0xff), UInt8(bits >> 8)]
}

@Suite struct GGUFTests {
    @Test func metadataOfEveryType() throws {
        var w = GGUFTestWriter()
        w.add("general.architecture", .string("llama"))
        w.add("u8", .uint8(250))
        w.add("i8", .int8(-100))
        w.add("u16", .uint16(65000))
        w.add("i16", .int16(-32000))
        w.add("u32", .uint32(4_000_000_000))
        w.add("i32", .int32(-2_000_000_000))
        w.add("u64", .uint64(UInt64.max))
        w.add("i64", .int64(Int64.min))
        w.add("f32", .float32(1e-5))
        w.add("f64", .float64(-2.5e300))
        w.add("yes", .bool(true))
        w.add("no", .bool(false))
        w.add("unicode", .string("héllo ✓ 世界"))
        w.add("tokens", .array([.string("<s>"), .string(""), .string("Ġthe")]))
        w.add("ids", .array([.int32(3), .int32(-1), .int32(7)]))
        w.add("scores", .array([.float32(0.5), .float32(-1.25)]))
        w.add("nested", .array([.array([.uint8(1), .uint8(2)]), .array([.uint8(3)])]))
        w.add("empty", .array([]))
        let path = try TestSupport.writeTemp("meta.gguf", w.bytes())
        let f = try GGUFFile(contentsOf: path)
        #expect(f.version == 3)
        #expect(f.tensors.isEmpty)
        #expect(f.metadataKeys.first == "general.architecture" && f.metadataKeys.count == 19)
        #expect(f.string("general.architecture") == "llama")
        #expect(f.metadata["u8"] == .uint8(250) && f.int("u8") == 250)
        #expect(f.metadata["i8"] == .int8(-100) && f.int("i8") == -100)
        #expect(f.metadata["u16"] == .uint16(65000))
        #expect(f.metadata["i16"] == .int16(-32000))
        #expect(f.metadata["u32"] == .uint32(4_000_000_000) && f.int("u32") == 4_000_000_000)
        #expect(f.metadata["i32"] == .int32(-2_000_000_000))
        #expect(f.metadata["u64"] == .uint64(UInt64.max) && f.int("u64") == nil)
        #expect(f.metadata["i64"] == .int64(Int64.min))
        #expect(f.metadata["f32"] == .float32(1e-5) && f.float("f32") == 1e-5)
        #expect(f.metadata["f64"]?.double == -2.5e300)
        #expect(f.bool("yes") == true && f.bool("no") == false)
        #expect(f.string("unicode") == "héllo ✓ 世界")
        #expect(f.metadata["tokens"]?.stringArray == ["<s>", "", "Ġthe"])
        #expect(f.metadata["ids"]?.intArray == [3, -1, 7])
        #expect(f.metadata["scores"]?.floatArray == [0.5, -1.25])
        #expect(f.metadata["nested"]?.array?.map { $0.intArray ?? [] } == [[1, 2], [3]])
        #expect(f.metadata["empty"]?.array?.isEmpty == true)
        #expect(f.metadata["tokens"]?.intArray == nil)
        #expect(f.string("missing") == nil && f.int("general.architecture") == nil)
    }

    @Test func dequantizesSyntheticTensors() throws {
        var w = GGUFTestWriter()
        w.add("general.alignment", .uint32(64))
        w.alignment = 64

        // F32 [2, 3]
        let f32: [Float] = [1, -2, 3.5, 0, 1e-30, -7]
        w.addTensor("f32", shape: [2, 3], type: .f32, data: f32.flatMap { v in withUnsafeBytes(of: v.bitPattern.littleEndian, Array.init) })
        // F16 [5] from known bit patterns
        let f16Bits: [UInt16] = [0x3c00, 0xc000, 0x3555, 0x0001, 0x7bff]
        w.addTensor("f16", shape: [5], type: .f16, data: f16Bits.flatMap { [UInt8($0 & 0xff), UInt8($0 >> 8)] })
        // Q8_0 [2, 32]: two blocks with d = 0.5 and d = -0.25
        var q8: [UInt8] = []
        var q8Expected: [Float] = []
        for (b, d) in [Float(0.5), -0.25].enumerated() {
            q8 += h(d)
            for j in 0..<32 {
                let q = Int8(j * 7 - 100 + b * 3)
                q8.append(UInt8(bitPattern: q))
                q8Expected.append(Float(q) * d)
            }
        }
        w.addTensor("q8", shape: [2, 32], type: .q8_0, data: q8)
        // Q4_0 [64]: quants q_e = (e * 5 + b) % 16
        var q40: [UInt8] = []
        var q40Expected = [Float](repeating: 0, count: 64)
        for (b, d) in [Float(0.25), 3.0].enumerated() {
            q40 += h(d)
            let qs = (0..<32).map { ($0 * 5 + b) % 16 }
            for j in 0..<16 { q40.append(UInt8(qs[j] | qs[j + 16] << 4)) }
            for e in 0..<32 { q40Expected[b * 32 + e] = Float(qs[e] - 8) * d }
        }
        w.addTensor("q40", shape: [64], type: .q4_0, data: q40)
        // Q4_1 [1, 32, 64] (three dims): value q * d + m
        var q41: [UInt8] = []
        var q41Expected: [Float] = []
        for b in 0..<64 {
            let d = Float(b + 1) / 64, m = Float(b) * -0.5
            q41 += h(d) + h(m)
            let qs = (0..<32).map { ($0 * 3 + b * 7) % 16 }
            for j in 0..<16 { q41.append(UInt8(qs[j] | qs[j + 16] << 4)) }
            for e in 0..<32 { q41Expected.append(Float(qs[e]) * Float(Float16(d)) + Float(Float16(m))) }
        }
        w.addTensor("q41", shape: [1, 32, 64], type: .q4_1, data: q41)

        let path = try TestSupport.writeTemp("synthetic.gguf", w.bytes())
        let f = try GGUFFile(contentsOf: path)
        #expect(f.alignment == 64)
        #expect(f.tensors.map(\.name) == ["f32", "f16", "q8", "q40", "q41"])
        #expect(f.tensors.allSatisfy { $0.offset % 64 == 0 })
        #expect(f.tensorInfo("q41")?.shape == [1, 32, 64])
        #expect(f.tensorInfo("q41")?.byteCount == 64 * 20)
        #expect(f.tensorInfo("q8")?.type == .q8_0)

        let t32 = try f.tensor("f32")
        #expect(t32.shape == [2, 3] && t32.scalars == f32)
        #expect(try f.tensor("f16").scalars == [1, -2, 0.333251953125, 0x1p-24, 65504])
        let t8 = try f.tensor("q8")
        #expect(t8.shape == [2, 32] && t8.scalars == q8Expected)
        #expect(try f.tensor("q40").scalars == q40Expected)
        let t41 = try f.tensor("q41")
        #expect(t41.shape == [1, 32, 64] && t41.scalars == q41Expected)
        TestSupport.expectError(.notFound, mentions: ["synthetic.gguf", "'nope'"]) { _ = try f.tensor("nope") }
    }

    @Test func blockFormatsMatchGGUFPy() throws {
        // quants.gguf holds random blocks of each format; quants_expected.safetensors holds gguf-py 0.19.0's
        // dequantization of the same bytes (see Tests/Fixtures/io/make_quants.py).
        let f = try GGUFFile(contentsOf: TestSupport.fixtures + "/io/quants.gguf")
        let expected = try SafeTensorsFile(contentsOf: TestSupport.fixtures + "/io/quants_expected.safetensors")
        #expect(Set(f.tensors.map(\.type)) == [.q4_0, .q4_1, .q5_0, .q5_1, .q8_0, .q4_K, .q5_K, .q6_K])
        for name in expected.names {
            let ours = try f.tensor(name)
            let ref = try expected.tensor(name)
            #expect(ours.shape == ref.shape, "\(name)")
            var worst: Float = 0
            for i in 0..<ref.count {
                worst = worse(worst, abs(ours.pointer[i] - ref.pointer[i]) / max(1, abs(ref.pointer[i])))
            }
            #expect(worst <= 1e-6, "\(name): max relative difference \(worst)")
        }
    }

    @Test func acceptsVersion2() throws {
        var w = GGUFTestWriter()
        w.version = 2
        w.add("general.architecture", .string("llama"))
        w.addTensor("x", shape: [2], type: .f32, data: [0, 0, 0x80, 0x3f, 0, 0, 0, 0x40])
        let f = try GGUFFile(contentsOf: try TestSupport.writeTemp("v2.gguf", w.bytes()))
        #expect(f.version == 2)
        #expect(try f.tensor("x").scalars == [1, 2])
    }

    @Test func unsupportedTypeThrows() throws {
        var w = GGUFTestWriter()
        w.addTensor("iq", shape: [256], type: .iq2_xxs, data: [UInt8](repeating: 0, count: 66))
        let f = try GGUFFile(contentsOf: try TestSupport.writeTemp("iq.gguf", w.bytes()))
        #expect(f.tensorInfo("iq")?.byteCount == 66)
        TestSupport.expectError(.unsupported, mentions: ["iq.gguf", "'iq'", "IQ2_XXS"]) { _ = try f.tensor("iq") }
    }
}

/// Malformed GGUF files, one fault each: every one must throw a GraftError naming the file and the fault.
@Suite struct MalformedGGUFTests {
    static func tiny() -> GGUFTestWriter {
        var w = GGUFTestWriter()
        w.add("general.architecture", .string("llama"))
        w.addTensor("w", shape: [2, 32], type: .q8_0, data: [UInt8](repeating: 1, count: 68))
        return w
    }

    @Test func badMagic() throws {
        var w = Self.tiny()
        w.magic = Array("GGML".utf8)
        let path = try TestSupport.writeTemp("magic.gguf", w.bytes())
        TestSupport.expectError(.format, mentions: ["magic.gguf", "bad magic", "47 47 4D 4C"]) { _ = try GGUFFile(contentsOf: path) }
    }

    @Test func unsupportedVersion() throws {
        var w = Self.tiny()
        w.version = 1
        let path = try TestSupport.writeTemp("version.gguf", w.bytes())
        TestSupport.expectError(.unsupported, mentions: ["version.gguf", "unsupported GGUF version 1"]) { _ = try GGUFFile(contentsOf: path) }
    }

    @Test func truncatedHeader() throws {
        let path = try TestSupport.writeTemp("short.gguf", Array(Self.tiny().bytes().prefix(10)))
        TestSupport.expectError(.format, mentions: ["short.gguf", "truncated header", "tensor count"]) { _ = try GGUFFile(contentsOf: path) }
    }

    @Test func truncatedMetadata() throws {
        // The file ends in the middle of the architecture string.
        let bytes = Self.tiny().bytes()
        let path = try TestSupport.writeTemp("cut.gguf", Array(bytes.prefix(24 + 8 + 20 + 4 + 8 + 2)))
        TestSupport.expectError(.format, mentions: ["cut.gguf", "metadata 'general.architecture'", "string value length 5", "runs past end of file"]) {
            _ = try GGUFFile(contentsOf: path)
        }
    }

    @Test func absurdCounts() throws {
        var b = ByteBuilder()
        b.raw(Array("GGUF".utf8)); b.le(UInt32(3)); b.le(UInt64(0)); b.le(UInt64(1) << 60)
        let path = try TestSupport.writeTemp("counts.gguf", b.bytes)
        TestSupport.expectError(.format, mentions: ["counts.gguf", "metadata count 1152921504606846976 is impossible"]) {
            _ = try GGUFFile(contentsOf: path)
        }
    }

    @Test func unknownValueType() throws {
        var w = Self.tiny()
        var kv = ByteBuilder()
        kv.raw(GGUFTestWriter.string("weird")); kv.le(UInt32(13)); kv.le(UInt32(0))
        w.addRaw(kv.bytes)
        let path = try TestSupport.writeTemp("valuetype.gguf", w.bytes())
        TestSupport.expectError(.format, mentions: ["valuetype.gguf", "'weird'", "unknown value type 13"]) { _ = try GGUFFile(contentsOf: path) }
    }

    @Test func tensorDataPastEnd() throws {
        var w = Self.tiny()
        w.offsetOverride[0] = 4096
        let bytes = w.bytes()
        let path = try TestSupport.writeTemp("past.gguf", bytes)
        TestSupport.expectError(.format, mentions: ["past.gguf", "tensor 'w' data", "68 bytes]", "runs past end of file (size \(bytes.count))"]) {
            _ = try GGUFFile(contentsOf: path)
        }
    }

    @Test func unknownGGMLType() throws {
        var w = Self.tiny()
        w.tensors[0].type = 99
        let path = try TestSupport.writeTemp("ggmltype.gguf", w.bytes())
        TestSupport.expectError(.format, mentions: ["ggmltype.gguf", "tensor 'w'", "unknown ggml type 99"]) { _ = try GGUFFile(contentsOf: path) }
    }

    @Test func rowNotMultipleOfBlock() throws {
        var w = Self.tiny()
        w.tensors[0].dims = [30, 2]
        let path = try TestSupport.writeTemp("block.gguf", w.bytes())
        TestSupport.expectError(.format, mentions: ["block.gguf", "tensor 'w'", "30 is not a multiple of the Q8_0 block size 32"]) {
            _ = try GGUFFile(contentsOf: path)
        }
    }

    @Test func dimensionsOverflow() throws {
        var w = Self.tiny()
        w.tensors[0].dims = [1 << 40, 1 << 40]
        let path = try TestSupport.writeTemp("dims.gguf", w.bytes())
        TestSupport.expectError(.format, mentions: ["dims.gguf", "tensor 'w' dimensions overflow"]) { _ = try GGUFFile(contentsOf: path) }
    }
}
