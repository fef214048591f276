import GraftTestSupport
import Testing
@testable import GraftTensor

@Suite struct AutogradTests {
    @Test func frozenTensorsRecordNothing() {
        let w = Tensor(shape: [2, 2], values: [1, 2, 3, 4])
        let x = Tensor(shape: [1, 2], values: [1, 1])
        let y = linear(x, w)
        #expect(!y.requiresGrad)
        #expect(y.node == nil)
        y.backward()
        #expect(w.grad == nil && x.grad == nil)
    }

    @Test func noBackwardBelowTheLowestTrainableParameter() {
        // A frozen layer below a trainable one: the frozen layer's op never joins the graph.
        let frozen = Tensor(shape: [3, 3], values: [1, 0, 0, 0, 1, 0, 0, 0, 1])
        let trainable = Tensor(shape: [3, 3], values: [0.5, 0, 0, 0, 0.5, 0, 0, 0, 0.5]).requiringGrad()
        let x = Tensor(shape: [2, 3], values: [1, 2, 3, 4, 5, 6])
        let h = gelu(linear(x, frozen))
        #expect(h.node == nil, "frozen sub-graph must not be recorded")
        let y = sum(linear(h, trainable))
        #expect(y.requiresGrad)
        y.backward()
        #expect(trainable.grad != nil)
        #expect(frozen.grad == nil)
    }

    @Test func withNoGradDisablesRecording() {
        let w = Tensor(shape: [2], values: [1, 2]).requiringGrad()
        let y = withNoGrad { mul(w, w) }
        #expect(!y.requiresGrad)
        #expect(GradMode.isEnabled)
    }

    @Test func gradientsAccumulateAcrossUsesAndCalls() {
        let w = Tensor(shape: [2], values: [1, 2]).requiringGrad()
        sum(add(w, w)).backward()
        #expect(w.grad?.scalars == [2, 2])
        sum(w).backward()
        #expect(w.grad?.scalars == [3, 3])
    }

    /// The graph names the nodes that produced its inputs, not the tensors: an intermediate that no backward
    /// closure needs is freed as soon as forward drops it, while the gradients stay what they were.
    @Test func intermediatesBackwardDoesNotNeedAreFreedDuringForward() throws {
        let w = Tensor(shape: [2, 3], values: [0.5, -1, 2, 1, 0.25, -0.5]).requiringGrad()
        let x = Tensor(shape: [4, 3], values: (0..<12).map { Float($0) / 6 })
        weak var weakSum: Tensor?
        weak var weakProjection: Tensor?
        let loss: Tensor = {
            let projection = linear(x, w)  // linear keeps x (for dW), not its result
            let shifted = projection + Tensor(repeating: 1, shape: [2])  // a sum keeps neither operand
            weakProjection = projection
            weakSum = shifted
            return sum(shifted * 3)
        }()
        #expect(weakProjection == nil && weakSum == nil, "activations no backward reads must not outlive forward")
        loss.backward()
        // d/dW Σ 3(xWᵀ + 1) = 3 · Σ_rows x.
        let columnSums = (0..<3).map { c in (0..<4).map { Double($0 * 3 + c) / 6 }.reduce(0, +) }
        let grad = try #require(w.grad).scalars.map(Double.init)
        #expect(maxRelativeError(grad, (columnSums + columnSums).map { 3 * $0 }) <= 1e-6)
    }

    @Test func savedActivationsAreReleasedAfterBackward() {
        let w = Tensor(shape: [4], values: [1, 2, 3, 4]).requiringGrad()
        let mid = gelu(w)
        weak var weakMid: Tensor? = mid
        let loss = sum(mid)
        #expect(mid.node != nil)
        loss.backward()
        #expect(loss.node == nil)
        _ = weakMid
    }
}
