import Foundation
import Graft

/// Draws a one-line progress bar (a TTY) or prints periodic lines (a pipe or CI log).
final class ProgressPrinter {
    let isTTY = isatty(STDERR_FILENO) != 0
    var lastLine = Date.distantPast

    func update(_ p: TrainingProgress) {
        let width = 28
        let frac = Double(p.step) / Double(max(p.totalSteps, 1))
        let filled = Int(frac * Double(width))
        let bar = String(repeating: "█", count: filled) + String(repeating: "·", count: width - filled)
        let text = String(format: "%@ %d/%d  loss %.4f  lr %.2e  %.0f tok/s  elapsed %@  ETA %@",
                          bar, p.step, p.totalSteps, p.loss, p.learningRate, p.tokensPerSecond,
                          clock(p.elapsed), clock(p.eta))
        if isTTY {
            FileHandle.standardError.write(Data(("\r" + text + "  ").utf8))
            if p.step == p.totalSteps { FileHandle.standardError.write(Data("\n".utf8)) }
        } else if Date().timeIntervalSince(lastLine) > 5 || p.step == p.totalSteps || p.step == 1 {
            lastLine = Date()
            FileHandle.standardError.write(Data((text + "\n").utf8))
        }
    }

    func clock(_ s: Double) -> String {
        let t = Int(s.rounded())
        return String(format: "%d:%02d", t / 60, t % 60)
    }
}
