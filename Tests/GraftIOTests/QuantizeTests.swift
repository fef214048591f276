import Testing
import GraftIO
import GraftTensor
import GraftTestSupport

/// ggml-style encoding (GGMLType.quantize) checked through Graft's own decoder.
@Suite struct QuantizeTests {
    /// Encodes then decodes `values` in `type`.
    func roundTrip(_ values: [Float], _ type: GGMLType) throws -> [Float] {
        var bytes = [UInt8](repeating: 0, count: values.count / type.blockSize * type.typeSize)
        try values.withUnsafeBufferPointer { src in
            try bytes.withUnsafeMutableBytes { dst in
                guard let s = src.baseAddress, let d = dst.baseAddress else { return }
                try type.quantize(s, into: d, count: values.count)
            }
        }
        var out = [Float](repeating: .nan, count: values.count)
        try bytes.withUnsafeBytes { src in
            try out.withUnsafeMutableBufferPointer { dst in
                guard let s = src.baseAddress, let d = dst.baseAddress else { return }
                try type.dequantize(s, into: d, count: values.count)
            }
        }
        return out
    }

    @Test(arguments: [GGMLType.q4_1, .q8_0, .f16, .bf16, .f32])
    func decodedValuesStayWithinHalfAStep(type: GGMLType) throws {
        var rng = GraftRNG(seed: 5)
        let values = (0..<(32 * 64)).map { i in i < 32 ? 0 : rng.nextNormal() * 0.05 + (i % 97 == 0 ? 1 : 0) }
        let decoded = try roundTrip(values, type)
        var worstExcess: Float = 0
        for b in 0..<(values.count / 32) {
            let x = values[(b * 32)..<(b * 32 + 32)]
            guard let lo = x.min(), let hi = x.max() else { continue }
            let amax = max(abs(lo), abs(hi))
            let step: Float
            switch type {
            case .q4_1: step = (hi - lo) / 15
            case .q8_0: step = amax / 127
            default: step = 0
            }
            let relative: Float = type == .bf16 ? 0x1p-8 : (type == .f32 ? 0 : 0x1p-11)
            for j in (b * 32)..<(b * 32 + 32) {
                let bound = step / 2 + 16 * step * 0x1p-11 + abs(lo) * 0x1p-11 + abs(values[j]) * relative + 1e-9
                worstExcess = worse(worstExcess, abs(decoded[j] - values[j]) - bound)
            }
        }
        print("\(type.name) encode/decode: worst excess over half a step \(worstExcess)")
        #expect(worstExcess <= 0)
        #expect(decoded[0..<32].allSatisfy { $0 == 0 }, "an all-zero block decodes to zeros")
    }

    @Test func badInputsAreErrorsNotTraps() throws {
        #expect(throws: GraftError.self) { _ = try roundTrip([Float](repeating: 1, count: 31), .q4_1) }
        #expect(throws: GraftError.self) { _ = try roundTrip([Float](repeating: .nan, count: 32), .q8_0) }
        #expect(throws: GraftError.self) { _ = try roundTrip([Float](repeating: 1, count: 256), .q4_K) }
        // Scales that underflow (1/d = inf) must not trap.
        let tiny = (0..<32).map { Float($0) * 1e-44 }
        #expect(try roundTrip(tiny, .q4_1).allSatisfy { $0.isFinite })
        #expect(try roundTrip(tiny, .q8_0).allSatisfy { $0.isFinite })
        let huge = (0..<32).map { $0 % 2 == 0 ? Float.greatestFiniteMagnitude : -Float.greatestFiniteMagnitude }
        _ = try roundTrip(huge, .q4_1)
        _ = try roundTrip(huge, .q8_0)
    }
}
