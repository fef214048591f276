import Foundation
import GraftTensor
import XCTest
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

final class GraftDistributedTests: XCTestCase {
    func testGradientsAreSummedInBucketsWithPresenceFlags() throws {
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
        XCTAssertEqual(group.floatCalls, [12])
        XCTAssertEqual(a.grad?.scalars, [1, 2, 3, 4])
        XCTAssertEqual(b.grad?.scalars, [10, 20, 30])
        XCTAssertNil(c.grad)
        for t in [a.grad, b.grad].compactMap({ $0 }) { XCTAssertTrue(t.scalars.allSatisfy(\.isFinite)) }
    }

    func testBucketsSplitAtTheLimitAndAnOversizedTensorGoesAlone() throws {
        let params = [Tensor(zeros: [5]), Tensor(zeros: [2]), Tensor(zeros: [2]), Tensor(zeros: [1])].map { $0.requiringGrad() }
        for p in params { p.grad = Tensor(shape: p.shape, values: [Float](repeating: 1, count: p.count)) }
        let group = FakePeerGroup()
        try GradientAllreduce.sum(params, group: group, bucketElements: 4)
        // [5] alone (over the limit), [2, 2] together, [1] alone; each with its flags.
        XCTAssertEqual(group.floatCalls, [6, 6, 2])
        XCTAssertEqual(params[0].grad?.scalars, [1, 1, 1, 1, 1])
    }

    func testSingleProcessLeavesGradientsAlone() throws {
        let p = Tensor(zeros: [2]).requiringGrad()
        p.grad = Tensor(shape: [2], values: [.nan, 1])
        try GradientAllreduce.sum([p], group: SingleProcessGroup())
        XCTAssertEqual(p.grad?.scalars[1], 1)
    }

    func testMismatchedFingerprintsNameThePartAndRank() throws {
        var same = RunFingerprint()
        same.combine("options")
        var data = RunFingerprint()
        data.combine([Int32(1), 2, 3])
        let group = FakePeerGroup()
        group.peerGather = [same.value, data.value &+ 1]
        XCTAssertThrowsError(try group.verifyIdentical([("options", same), ("training data", data)])) { error in
            let message = String(describing: error)
            XCTAssertTrue(message.contains("training data: rank 1"), message)
            XCTAssertFalse(message.contains("options:"), message)
        }
        group.peerGather = [same.value, data.value]
        XCTAssertNoThrow(try group.verifyIdentical([("options", same), ("training data", data)]))
    }

    func testFingerprintSeparatesConcatenations() {
        var x = RunFingerprint(), y = RunFingerprint()
        x.combine("ab"); x.combine("c")
        y.combine("a"); y.combine("bc")
        XCTAssertNotEqual(x, y)
    }

    func testMissingLibraryIsAClearError() {
        XCTAssertThrowsError(try MPIProcessGroup(library: "/nonexistent/libmpi.so.40", timeoutSeconds: 1)) { error in
            let message = String(describing: error)
            XCTAssertTrue(message.contains("libmpi.so.40") && message.contains("openmpi-bin"), message)
            XCTAssertEqual((error as? GraftError)?.code, .unsupported)
        }
    }

    func testNotUnderMPIRunIsOneProcess() throws {
        guard ProcessInfo.processInfo.environment["OMPI_COMM_WORLD_SIZE"] == nil,
              ProcessInfo.processInfo.environment["GRAFT_MPI"] == nil else { return }
        let world = try ProcessGroups.world()
        XCTAssertEqual(world.size, 1)
        XCTAssertEqual(world.rank, 0)
    }
}
