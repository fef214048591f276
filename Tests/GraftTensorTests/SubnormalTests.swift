import CGraftSystem
import Foundation
import Testing
@testable import GraftTensor

/// Subnormal floats cost a microcode assist per multiply on Intel cores: one in a softmax row made attention's
/// `P·V` of a 512-token causal prompt fifteen times slower. Masked and negligible probabilities must be exact zeros.
@Suite struct SubnormalTests {
    @Test func vexpIsZeroWhereTheTrueValueIsSubnormal() {
        var v = Float16x(repeating: -.infinity)
        v[1] = -88; v[2] = -100; v[3] = -87.3; v[4] = 0
        let r = vexp(v)
        #expect(r[0] == 0 && r[1] == 0 && r[2] == 0, "\(r)")
        #expect(r[3] >= Float.leastNormalMagnitude && r[4] == 1, "\(r)")
    }

    @Test func softmaxGivesMaskedAndNegligibleEntriesExactZeros() {
        // 40 entries: the vector loop and the scalar tail both see masked (-inf) and far-below-max scores.
        var row = [Float](repeating: -.infinity, count: 40)
        for j in stride(from: 0, to: 40, by: 3) { row[j] = Float(j % 7) }
        row[5] = -86; row[38] = -86.5
        let out = softmax(Tensor(shape: [1, 40], values: row)).scalars
        #expect(out.allSatisfy { $0 == 0 || $0 >= Float.leastNormalMagnitude }, "\(out)")
        for j in 0..<40 where row[j] == -.infinity { #expect(out[j] == 0, "entry \(j): \(out[j])") }
        #expect(abs(out.reduce(0, +) - 1) < 1e-6 && out.allSatisfy(\.isFinite))
    }

    @Test func causalAttentionGivesMaskedKeysNoWeight() {
        let t = 48, d = 16
        let q = Tensor(shape: [1, t, d], values: (0..<(t * d)).map { Float(($0 * 37) % 101) / 3 })
        let k = Tensor(shape: [1, t, d], values: (0..<(t * d)).map { Float(($0 * 53) % 97) / 3 })
        let v = Tensor(shape: [1, t, d], values: (0..<(t * d)).map { Float(($0 * 29) % 89) / 89 })
        let out = scaledDotProductAttention(query: q, key: k, value: v, heads: 1, kvHeads: 1,
                                            mask: AttentionMask(causal: true)).scalars
        let finite = out.allSatisfy { $0.isFinite }
        #expect(finite)
        // The first query sees only the first key: its output is that key's value row, exactly.
        #expect(Array(out[0..<d]) == Array(v.scalars[0..<d]))
    }

    /// OpenBLAS picks kernels by CPU model and falls back to SSE3 ones on a model newer than its build; Graft then
    /// picks by features (CGraftKernels' openblas_core.c). On a CPU with AVX, the kernels in use are never a fallback.
    @Test func openBLASRunsKernelsForThisCPUsVectorUnits() throws {
        guard getenv("OPENBLAS_CORETYPE") == nil, let name = openblas_get_corename() else { return }
        let core = String(cString: name)
        let fallbacks = ["Unknown", "Katmai", "Coppermine", "Northwood", "Prescott", "Banias", "Atom", "Core2", "Penryn",
                         "Dunnington", "Nehalem"]
        let cpuinfo = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
        let flags = cpuinfo.split(separator: "\n").first { $0.hasPrefix("flags") }.map { Set($0.split(separator: " ")) } ?? []
        if flags.contains("avx2") && flags.contains("fma") {
            #expect(!fallbacks.contains(core), "OpenBLAS runs its \(core) kernels on a CPU with AVX2 (override: \(Threading.blasCoreOverride ?? "none"))")
        }
    }
}
