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
