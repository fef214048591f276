import Testing
import Foundation
import CGraftKernels
import GraftIO
import GraftTensor
import GraftTestSupport

/// ``linearGroup(_:_:)``: products sharing an input run as one job and give, value for value, what each gives alone
/// through ``linear(_:frozen:_:update:)``; where it cannot, it computes nothing and says so.
@Suite struct FrozenProductGroupTests {
    /// A `[rows, cols]` matrix of N(0, 0.05²) values encoded in `type` (QuantizedMatrixTests' encoder).
    func matrix(_ type: GGMLType, rows: Int, cols: Int, seed: UInt64) throws -> QuantizedMatrix {
        try QuantizedMatrixTests().matrix(type, rows: rows, cols: cols, seed: seed).0
    }

    /// Adds `0.25 · (output row + 1)` to each value of rows `range` (a stand-in for an adapter's update).
    let epilogue: OutputRowsUpdate = { range, y, ldy in
        for o in range { y[o] += 0.25 * Float(o + 1) }
    }

    @Test(arguments: [GGMLType.q4_1, .q8_0])
    func aGroupGivesEachProductsOwnValues(type: GGMLType) throws {
        var rng = GraftRNG(seed: 31)
        let cols = 576
        // A wide product and two narrow ones (q, k, v of a small model), one with a bias, one with an epilogue.
        let weights = try [(320, 1), (64, 2), (64, 3)].map { try matrix(type, rows: $0.0, cols: cols, seed: UInt64($0.1)) }
        let bias = Tensor.randomNormal([64], rng: &rng)
        let products = [FrozenProduct(weight: weights[0], epilogue: epilogue), FrozenProduct(weight: weights[1], bias: bias),
                        FrozenProduct(weight: weights[2])]
        for rowsN in [1, 2, 7] {
            let x = Tensor.randomNormal([rowsN, cols], rng: &rng)
            for int8 in [false, true] {
                let grouped = withNoGrad { withInt8Activations(int8) { linearGroup(x, products) } }
                guard let grouped else {
                    Issue.record("\(type.name) rows \(rowsN) int8 \(int8): the group did not run")
                    continue
                }
                for (index, product) in products.enumerated() {
                    let alone = withNoGrad {
                        withInt8Activations(int8) {
                            linear(x, frozen: product.weight, product.bias, update: product.update)
                        }
                    }
                    #expect(grouped[index].shape == alone.shape)
                    let count = alone.count
                    let same = (0..<count).allSatisfy { grouped[index].pointer[$0].bitPattern == alone.pointer[$0].bitPattern }
                    #expect(same, "\(type.name) rows \(rowsN) int8 \(int8): product \(index) differs from its product alone")
                    #expect((0..<count).allSatisfy { grouped[index].pointer[$0].isFinite })
                }
            }
        }
    }

    /// Updates with parts to prepare (an adapter's down projection, shared out over the threads): every part runs
    /// exactly once, and all of an update's parts before it adds into any output row, whichever thread runs what.
    @Test func everyPartIsPreparedOnceBeforeItsUpdateApplies() throws {
        Threading.setThreads(2)
        var rng = GraftRNG(seed: 43)
        let cols = 256, parts = [5, 0, 3]
        let weights = try [(320, 11), (64, 12), (96, 13)].map {
            try matrix(.q8_0, rows: $0.0, cols: cols, seed: UInt64($0.1))
        }
        let x = Tensor.randomNormal([1, cols], rng: &rng)
        let expected = withNoGrad { withInt8Activations { weights.map { linear(x, frozen: $0) } } }
        for round in 0..<200 {
            // runs[p][k]: how many times part k of product p ran; values[p][k] what it wrote (k + 1).
            let runs = parts.map { UnsafeMutableBufferPointer<Int32>.allocate(capacity: max($0, 1)) }
            let values = parts.map { UnsafeMutableBufferPointer<Float>.allocate(capacity: max($0, 1)) }
            defer {
                for buffer in runs { buffer.deallocate() }
                for buffer in values { buffer.deallocate() }
            }
            for p in parts.indices {
                runs[p].initialize(repeating: 0)
                values[p].initialize(repeating: 0)
            }
            let products = weights.indices.map { p in
                FrozenProduct(weight: weights[p], update: DecodingUpdate(parts: parts[p], prepare: { k in
                    runs[p][k] += 1
                    values[p][k] = Float(k + 1)
                }, apply: { rows, y, _ in
                    // Adds the sum its parts wrote: (1 + … + parts) once they all have.
                    let sum = (0..<parts[p]).reduce(Float(0)) { $0 + values[p][$1] }
                    for o in rows { y[o] += sum }
                }))
            }
            guard let outputs = withNoGrad({ withInt8Activations { linearGroup(x, products) } }) else {
                Issue.record("the group did not run")
                return
            }
            for p in parts.indices {
                let count = parts[p]
                let counts = Array(runs[p].prefix(count))
                #expect(counts.allSatisfy { $0 == 1 }, "round \(round), product \(p): parts ran \(counts) times")
                let added = Float(count * (count + 1) / 2)
                let right = (0..<outputs[p].count).allSatisfy {
                    outputs[p].pointer[$0] == expected[p].pointer[$0] + added
                }
                #expect(right, "round \(round), product \(p): an update applied before all its parts were prepared")
                if !right { return }
            }
        }
    }

    @Test func aGroupThatCannotRunComputesNothing() throws {
        var rng = GraftRNG(seed: 5)
        let a = try matrix(.q4_1, rows: 32, cols: 64, seed: 1), b = try matrix(.q4_1, rows: 32, cols: 128, seed: 2)
        let x = Tensor.randomNormal([1, 64], rng: &rng)
        // Gradients recorded: the layers' own products keep the graph.
        #expect(linearGroup(x, [FrozenProduct(weight: a)]) == nil)
        withNoGrad {
            // A weight as wide as something else than the input, a bias of the wrong length.
            #expect(linearGroup(x, [FrozenProduct(weight: a), FrozenProduct(weight: b)]) == nil)
            #expect(linearGroup(x, [FrozenProduct(weight: a, bias: Tensor(zeros: [31]))]) == nil)
            // More rows than a decoding step outside the fast mode: the tiled GEMM path, not a group.
            let prompt = Tensor.randomNormal([17, 64], rng: &rng)
            #expect(withInt8Activations(false) { linearGroup(prompt, [FrozenProduct(weight: a)]) } == nil)
            #expect(withInt8Activations(true) { linearGroup(prompt, [FrozenProduct(weight: a)]) } != nil)
        }
    }
}
