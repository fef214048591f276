import Foundation
import Graft

extension ContinualLab {
    /// The LoRA tensors of adapter `name` (its head copy left out), live: writing them changes the adapter.
    func loraTensors(_ name: String) throws -> [Tensor] {
        try session.adapted.adapter(name).peftStateDict.filter { !$0.key.contains("classifier") }.map(\.tensor)
    }

    /// MOS: task `t` trains adapter `mos<t>` (started from the previous task's), pulled after every optimizer step
    /// toward the mean of the frozen earlier adapters; base and adapted prototypes per class; each test input's
    /// adapter found by self-refined retrieval. Returns the accuracy on all classes seen so far after each task and
    /// the share of inputs whose own task's adapter was retrieved.
    func mos(_ trains: [[TokenizedExample]], _ tests: [[TokenizedExample]], classes: [[Int]], momentum: Float) throws -> ([Double], [Double]) {
        let h = session.taskModel.hiddenSize
        var names: [String] = []
        defer { for n in names { try? session.deleteAdapter(name: n) } }
        var sums: [Tensor] = []
        var base = PrototypeClassifier(dimension: h), adapted = PrototypeClassifier(dimension: h)
        var classIDs: [Int] = [], classTask: [Int] = []
        var accuracies: [Double] = [], retrievals: [Double] = []
        for t in trains.indices {
            let name = "mos\(t)"
            try session.addAdapter(name: name, config: try config(), seed: seed &+ UInt64(t))
            names.append(name)
            let params = try loraTensors(name)
            if let previous = names.dropLast().last {
                for (dst, src) in zip(params, try loraTensors(previous)) { dst.pointer.update(from: src.pointer, count: src.count) }
            }
            let earlier = t
            try train(name, trains[t]) {
                try MOS.mergeTowardPrevious(params, previousSum: sums, previousCount: earlier, momentum: momentum)
            }
            if sums.isEmpty {
                sums = params.map { $0.copy() }
            } else {
                for (s, p) in zip(sums, params) { for i in 0..<s.count { s.pointer[i] += p.pointer[i] } }
            }
            let baseTrain = try features(trains[t], adapter: nil), adaptedTrain = try features(trains[t], adapter: name)
            for c in classes[t] {
                try base.setPrototype(class: classIDs.count, PrototypeClassifier.mean(rows(baseTrain, trains[t], class: c)))
                try adapted.setPrototype(class: classIDs.count, PrototypeClassifier.mean(rows(adaptedTrain, trains[t], class: c)))
                classIDs.append(c)
                classTask.append(t)
            }
            let test = Array(tests[0...t].joined())
            let baseTest = try features(test, adapter: nil)
            let perAdapter = try names.map { try features(test, adapter: $0) }
            var right = 0, retrieved = 0
            for (i, e) in test.enumerated() {
                let r = try MOS.retrieve(
                    baseFeature: UnsafeBufferPointer(start: baseTest.pointer + i * h, count: h),
                    adaptedFeature: { k in Array(UnsafeBufferPointer(start: perAdapter[k].pointer + i * h, count: h)) },
                    base: base, adapted: adapted, classTask: classTask)
                if classIDs[r.prediction] == Int(e.label) { right += 1 }
                if let own = classIDs.firstIndex(of: Int(e.label)), classTask[own] == r.task { retrieved += 1 }
            }
            accuracies.append(Double(right) / Double(max(test.count, 1)))
            retrievals.append(Double(retrieved) / Double(max(test.count, 1)))
        }
        return (accuracies, retrievals)
    }
}
