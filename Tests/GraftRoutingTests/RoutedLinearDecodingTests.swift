import Testing
import CGraftKernels
import GraftAdapters
import GraftIO
import GraftModels
@testable import GraftRouting
import GraftTensor
import GraftTestSupport

/// A mixed-adapter decoding step adds each row's LoRA update inside the base product's job
/// (``RoutedLinear/decodeUpdate(input:layer:)``). Every row must get, bit for bit, what the base product plus that
/// row's update alone give: ``LoRALayer/addUpdate(input:into:rows:inFeatures:outFeatures:parallel:int8:)`` in the
/// exact mode, the int8 kernels a layer's own decoding step runs in the fast mode; for rows under different
/// adapters, two adapters, or none.
@Suite(.serialized) struct RoutedLinearDecodingTests {
    let inF = 256, outF = 200

    /// Row `row`'s fast-mode update alone, as a layer's own decoding step computes it: the row quantized per block
    /// of 32 as the base product quantizes it, A's int8 copy against those blocks, then B's int8 copy.
    func addFastUpdate(_ lora: LoRALayer, row: Int, x: Tensor, into y: Tensor) {
        guard let int8 = lora.decodeInt8Factors, let q = try? Int8Rows(x.pointer + row * inF, rows: 1, cols: inF) else {
            Issue.record("no int8 copies or quantized row")
            return
        }
        var h = [Float](repeating: 0, count: lora.rank)
        cgraft_lora_down_q8(q.values, q.scales, Int64(inF), int8.a.values, int8.a.scales, Int64(lora.rank), &h)
        int8.up(h, rank: lora.rank, rows: 0..<outF, scale: lora.scaling, into: y.pointer + row * outF)
    }

    @Test(arguments: [false, true], [1, 2])
    func eachRowGetsItsUpdateAlone(fast: Bool, perSequence: Int) throws {
        Threading.setThreads(2)
        let matrix = try randomQuantizedMatrix(.q4_1, rows: outF, cols: inF, seed: 5)
        let layer = Linear(compact: matrix, bias: nil)
        func lora(_ rank: Int, _ seed: UInt64) -> LoRALayer {
            LoRALayer(base: layer, rank: rank, alpha: 16, useRSLoRA: false, dropout: 0, useDoRA: false,
                      initLoraWeights: false, bias: false, state: AdapterState(seed: seed))
        }
        let first = lora(8, 1), second = lora(6, 2), third = lora(4, 3)
        // Sequence 0 under one adapter, 1 under none, 2 under two, 3 under the first again.
        let segments: [(rows: Range<Int>, adapters: [any LinearAdapter])] = [
            (0..<1, [first]), (1..<2, []), (2..<3, [second, third]), (3..<4, [first]),
        ]
        let sequences = 4, rows = sequences * perSequence
        layer.adapters = [RoutedLinear(batchRows: sequences, segments: segments, path: "q", failure: RoutingFailure())]
        let x = Tensor(shape: [sequences, perSequence, inF], values: randomValues(rows * inF, seed: 9).map(Float.init))
        let (fused, expected) = withNoGrad {
            withInt8Activations(fast) {
                withInt8FactorCopies(fast ? Int8FactorCopies() : nil) { () -> (Tensor, Tensor) in
                    let routed = layer.adapters[0]
                    #expect(routed.decodeUpdate(input: x, layer: layer) != nil, "the step did not fuse")
                    let fused = layer.forward(x)
                    // Each row alone: the base product of the whole step, then its adapters' updates in order.
                    let expected = linear(x, frozen: matrix)
                    for segment in segments {
                        for row in (segment.rows.lowerBound * perSequence)..<(segment.rows.upperBound * perSequence) {
                            for case let adapter as LoRALayer in segment.adapters {
                                if fast { addFastUpdate(adapter, row: row, x: x, into: expected) } else {
                                    adapter.addUpdate(input: x.pointer + row * inF, into: expected.pointer + row * outF,
                                                      rows: 1, inFeatures: inF, outFeatures: outF)
                                }
                            }
                        }
                    }
                    return (fused, expected)
                }
            }
        }
        #expect(fused.count == expected.count)
        let same = (0..<expected.count).allSatisfy { fused.pointer[$0].bitPattern == expected.pointer[$0].bitPattern }
        #expect(same, "fast \(fast), \(perSequence) row(s) per sequence: a row differs from its update alone")
        #expect((0..<fused.count).allSatisfy { fused.pointer[$0].isFinite })
        // The updates are there: the adapted rows differ from the base product, the unadapted row does not.
        let base = withNoGrad { withInt8Activations(fast) { linear(x, frozen: matrix) } }
        for row in 0..<rows {
            let differs = (0..<outF).contains { fused.pointer[row * outF + $0] != base.pointer[row * outF + $0] }
            #expect(differs == (row / perSequence != 1), "row \(row)")
        }
    }
}
