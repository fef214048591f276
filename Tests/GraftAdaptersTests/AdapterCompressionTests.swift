import Foundation
import Testing
@testable import GraftAdapters
import GraftIO
import GraftModels
import GraftTensor
import GraftTestSupport

/// ComPEFT (top-k sparsification, values α·σ·sign) and 1-bit adapters (sign bits with the error-minimizing scale
/// mean|w| per row, or per tensor when rows are short): their defining math, their packed files and the working adapters loaded back from them.
@Suite(.serialized) struct AdapterCompressionTests {
    static func temporary() -> String {
        FileManager.default.temporaryDirectory.appendingPathComponent("graft-compress-\(UUID().uuidString)").path
    }

    static func values(_ t: Tensor) -> [Float] { Array(UnsafeBufferPointer(start: t.pointer, count: t.count)) }

    @Test func comPEFTKeepsTheTopKAsAlphaSigmaSign() throws {
        let (bert, model) = try AdapterCombinationTests.modelWithSources()
        let source = try model.adapter("a")
        let compressed = try ComPEFTAdapter(compressing: source, density: 0.1, alpha: 2)
        #expect(compressed.entries.map(\.key) == source.peftStateDict.map(\.key))
        for ((key, t), e) in zip(source.peftStateDict, compressed.entries) {
            let x = Self.values(t), n = x.count
            let mean = x.reduce(0.0) { $0 + Double($1) } / Double(n)
            let sigma = (x.reduce(0.0) { $0 + (Double($1) - mean) * (Double($1) - mean) } / Double(n)).squareRoot()
            #expect(abs(Double(e.scale) - 2 * sigma) <= 1e-6 * sigma, "\(key): scale α·σ")
            var out = [Float](repeating: .nan, count: n)
            out.withUnsafeMutableBufferPointer { p in if let b = p.baseAddress { e.decode(into: b) } }
            let kept = (0..<n).filter { out[$0] != 0 }
            #expect(kept.count == Int(0.1 * Double(n)) && e.kept == kept.count, "\(key): ⌊density·n⌋ kept")
            let smallestKept = kept.map { abs(x[$0]) }.min() ?? 0
            let largestDropped = (0..<n).filter { out[$0] == 0 }.map { abs(x[$0]) }.max() ?? 0
            #expect(smallestKept >= largestDropped, "\(key): the kept entries are the largest")
            #expect(kept.allSatisfy { out[$0] == (x[$0] > 0 ? e.scale : -e.scale) }, "\(key): α·σ·sign")
        }
        // The packed file: n mask bits + k sign bits + a float per tensor, read back the same, loading a working adapter.
        let dir = Self.temporary()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let fileBytes = try compressed.write(directory: dir)
        let expectedPacked = compressed.entries.reduce(0) { $0 + ($1.count + 7) / 8 + ($1.kept + 7) / 8 + 4 }
        #expect(compressed.packedBytes == expectedPacked && fileBytes >= expectedPacked && fileBytes < expectedPacked + 32_768)
        let reread = try ComPEFTAdapter(directory: dir)
        #expect(Set(reread.entries.map(\.key)) == Set(compressed.entries.map(\.key)))
        for e in reread.entries {
            guard let o = compressed.entries.first(where: { $0.key == e.key }) else { continue }
            #expect(e.shape == o.shape, "\(e.key) shape")
            #expect(e.mask == o.mask, "\(e.key) mask")
            #expect(e.signs == o.signs, "\(e.key) signs")
            #expect(e.scale == o.scale, "\(e.key) scale \(e.scale) vs \(o.scale)")
        }
        try model.addAdapter("compeft", decompressing: reread)
        let fromFile = try AdapterCombinationTests.output(bert)
        try model.setActiveAdapter("a")
        let original = try AdapterCombinationTests.output(bert)
        print("ComPEFT density 0.1 α 2: \(compressed.float32Bytes) float32 bytes → \(fileBytes) file bytes (\(String(format: "%.1f", Double(compressed.float32Bytes) / Double(fileBytes)))x), kept \(compressed.keptFraction), output max-abs vs the original adapter \(maxAbsDifference(fromFile, original))")
        #expect(maxAbsDifference(fromFile, original).isFinite)
        #expect(model.adapters.map(\.name).contains("compeft"))
    }

    @Test func oneBitScaleMinimizesTheQuantizationError() throws {
        let (bert, model) = try AdapterCombinationTests.modelWithSources()
        let source = try model.adapter("b4")
        let q = try OneBitAdapter(quantizing: source)
        for ((key, t), e) in zip(source.peftStateDict, q.entries) {
            let row = e.groupLength, x = Self.values(t)
            #expect(row == (t.shape[1] >= 64 ? t.shape[1] : t.count), "\(key): a row, or the tensor when rows are short")
            #expect(e.scales.count == x.count / row)
            var out = [Float](repeating: .nan, count: x.count)
            out.withUnsafeMutableBufferPointer { p in if let b = p.baseAddress { e.decode(into: b) } }
            for r in 0..<(x.count / row) {
                let w = x[(r * row)..<((r + 1) * row)].map(Double.init)
                let s = Double(e.scales.pointer[r])
                let meanAbs = w.reduce(0) { $0 + abs($1) } / Double(row)
                #expect(abs(s - meanAbs) <= 1e-6 * meanAbs, "\(key) group \(r): s = mean|w|")
                func error(_ scale: Double) -> Double { w.reduce(0) { $0 + ($1 - (($1 >= 0) ? scale : -scale)) * ($1 - (($1 >= 0) ? scale : -scale)) } }
                let squares = w.reduce(0) { $0 + $1 * $1 }
                let best = error(meanAbs)
                #expect(abs(best - (squares - Double(row) * meanAbs * meanAbs)) <= 1e-9 * squares, "\(key) row \(r): ‖w‖² − n·s²")
                #expect(best <= error(meanAbs * 1.01) && best <= error(meanAbs * 0.99), "\(key) row \(r): s minimizes the error")
                for j in 0..<row { #expect(out[r * row + j] == (x[r * row + j] >= 0 ? Float(s) : -Float(s))) }
            }
        }
        let dir = Self.temporary()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let fileBytes = try q.write(directory: dir)
        #expect(q.packedBytes == q.entries.reduce(0) { $0 + ($1.count + 7) / 8 + 4 * $1.scales.count })
        try model.addAdapter("onebit", dequantizing: try OneBitAdapter(directory: dir))
        let quantized = try AdapterCombinationTests.output(bert)
        try model.setActiveAdapter("b4")
        let original = try AdapterCombinationTests.output(bert)
        model.setAdaptersDisabled(true)
        let base = try AdapterCombinationTests.output(bert)
        print("1-bit adapter: \(q.float32Bytes) float32 bytes → \(fileBytes) file bytes (\(String(format: "%.1f", Double(q.float32Bytes) / Double(fileBytes)))x); output max-abs vs the float adapter \(maxAbsDifference(quantized, original)) (adapter effect \(maxAbsDifference(original, base)))")
        #expect(maxAbsDifference(quantized, original).isFinite)
        let loaded = try model.adapter("onebit")
        for ((_, t), e) in zip(loaded.peftStateDict, q.entries) {
            var out = [Float](repeating: .nan, count: t.count)
            out.withUnsafeMutableBufferPointer { p in if let b = p.baseAddress { e.decode(into: b) } }
            #expect(Self.values(t) == out, "the loaded adapter holds ±s")
        }
    }

    @Test func badOptionsAndDamagedFilesNameTheFault() throws {
        let (_, model) = try AdapterCombinationTests.modelWithSources()
        let a = try model.adapter("a")
        for d in [0, -0.5, 1.5, .nan] { #expect(throws: GraftError.self) { try ComPEFTAdapter(compressing: a, density: d) } }
        #expect(throws: GraftError.self) { try ComPEFTAdapter(compressing: a, density: 0.5, alpha: 0) }
        let dir = Self.temporary()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try OneBitAdapter(quantizing: a).write(directory: dir)
        do {
            _ = try ComPEFTAdapter(directory: dir)
            Issue.record("read a 1-bit directory as ComPEFT")
        } catch let e as GraftError {
            #expect(e.message.contains("adapter_compeft.safetensors"), "\(e.message)")
        }
        // A file whose scales were damaged: a NaN scale is refused by name.
        let q = try OneBitAdapter(quantizing: a)
        guard let first = q.entries.first else { Issue.record("no entries"); return }
        first.scales.pointer[0] = .nan
        try q.write(directory: dir)
        do {
            _ = try OneBitAdapter(directory: dir)
            Issue.record("read a NaN scale")
        } catch let e as GraftError {
            #expect(e.message.contains(first.key + ".scales") && e.message.contains("nan"), "\(e.message)")
        }
        #expect(!model.adapters.map(\.name).contains("onebit"))
    }
}
