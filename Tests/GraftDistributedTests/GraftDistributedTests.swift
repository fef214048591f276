import Foundation
import GraftTensor
import Testing
@testable import GraftDistributed

/// A two-member group simulated in one process: the "other" member contributes fixed values.
final class FakePeerGroup: ProcessGroup, @unchecked Sendable {
    let rank = 0
    let size = 2
    let statistics = CommunicationStatistics()
    var peerFloats: [Float] = []
    var peerDoubles: [Double] = []
    var peerGather: [UInt64] = []
    var floatCalls: [Int] = []

    func allreduceSum(_ buffer: UnsafeMutableBufferPointer<Float>) throws {
        floatCalls.append(buffer.count)
        for i in 0..<buffer.count { buffer[i] += i < peerFloats.count ? peerFloats[i] : 0 }
    }
    func allreduceSum(_ values: inout [Double]) throws {
        for i in values.indices { values[i] += peerDoubles[i] }
    }
    func allgather(_ values: [UInt64]) throws -> [[UInt64]] { [values, peerGather] }
    func abort(code: Int32) {}
}

@Suite struct GraftDistributedTests {
    @Test func gradientsAreSummedInBucketsWithPresenceFlags() throws {
        let a = Tensor(zeros: [2, 2]).requiringGrad()
        let b = Tensor(zeros: [3]).requiringGrad()
        let c = Tensor(zeros: [2]).requiringGrad()
        a.grad = Tensor(shape: [2, 2], values: [1, 2, 3, 4])
        b.grad = nil                                   // absent here, present on the peer
        c.grad = nil                                   // absent everywhere: stays nil
        let group = FakePeerGroup()
        // One bucket of 4 + 3 + 2 elements and 3 flags; the peer has b's gradient only.
        group.peerFloats = [0, 0, 0, 0, 10, 20, 30, 0, 0, 0, 1, 0]
        try GradientAllreduce.sum([a, b, c], group: group, bucketElements: 100)
        #expect(group.floatCalls == [12])
        #expect(a.grad?.scalars == [1, 2, 3, 4])
        #expect(b.grad?.scalars == [10, 20, 30])
        #expect(c.grad == nil)
        for t in [a.grad, b.grad].compactMap({ $0 }) { #expect(t.scalars.allSatisfy { $0.isFinite }) }
    }

    @Test func bucketsSplitAtTheLimitAndAnOversizedTensorGoesAlone() throws {
        let params = [Tensor(zeros: [5]), Tensor(zeros: [2]), Tensor(zeros: [2]), Tensor(zeros: [1])].map { $0.requiringGrad() }
        for p in params { p.grad = Tensor(shape: p.shape, values: [Float](repeating: 1, count: p.count)) }
        let group = FakePeerGroup()
        try GradientAllreduce.sum(params, group: group, bucketElements: 4)
        // [5] alone (over the limit), [2, 2] together, [1] alone; each with its flags.
        #expect(group.floatCalls == [6, 6, 2])
        #expect(params[0].grad?.scalars == [1, 1, 1, 1, 1])
    }

    @Test func singleProcessLeavesGradientsAlone() throws {
        let p = Tensor(zeros: [2]).requiringGrad()
        p.grad = Tensor(shape: [2], values: [.nan, 1])
        try GradientAllreduce.sum([p], group: SingleProcessGroup())
        #expect(p.grad?.scalars[1] == 1)
    }

    @Test func mismatchedFingerprintsNameThePartAndRank() throws {
        var same = RunFingerprint()
        same.combine("options")
        var data = RunFingerprint()
        data.combine([Int32(1), 2, 3])
        let group = FakePeerGroup()
        group.peerGather = [same.value, data.value &+ 1]
        let error = #expect(throws: GraftError.self) { try group.verifyIdentical([("options", same), ("training data", data)]) }
        let message = error?.message ?? ""
        #expect(message.contains("training data: rank 1"), "\(message)")
        #expect(!message.contains("options:"), "\(message)")
        group.peerGather = [same.value, data.value]
        #expect(throws: Never.self) { try group.verifyIdentical([("options", same), ("training data", data)]) }
    }

    @Test func fingerprintSeparatesConcatenations() {
        var x = RunFingerprint(), y = RunFingerprint()
        x.combine("ab"); x.combine("c")
        y.combine("a"); y.combine("bc")
        #expect(x != y)
    }

    @Test func missingLibraryIsAClearError() {
        let error = #expect(throws: GraftError.self) { try MPIProcessGroup(library: "/nonexistent/libmpi.so.40", timeoutSeconds: 1) }
        let message = error?.message ?? ""
        #expect(message.contains("libmpi.so.40") && message.contains("openmpi-bin"), "\(message)")
        #expect(error?.code == .unsupported)
    }

    @Test func notUnderMPIRunIsOneProcess() throws {
        guard ProcessInfo.processInfo.environment["OMPI_COMM_WORLD_SIZE"] == nil,
              ProcessInfo.processInfo.environment["GRAFT_MPI"] == nil else { return }
        let world = try ProcessGroups.world()
        #expect(world.size == 1 && world.rank == 0)
    }
}
