import ArgumentParser
import Foundation
import Graft

struct Methods: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List the adapter methods with family, PEFT parity, mergeability and trainable parameters.")

    @Option(help: "Model to count parameters on (path or asset name).") var model: String = "minilm"
    @Option(help: "Comma-separated target modules.") var targets: String?

    func run() throws {
        try graft.run {
            let m = try GraftModel(path: resolveModelPath(model))
            let list = targets.map { $0.split(separator: ",").map(String.init) }
                ?? (m.architecture == .bert ? ["query", "value"] : ["q_proj", "v_proj"])
            print("methods on \(m.path), target_modules \(list.joined(separator: ","))  (example configs: graft methods --help)")
            let rows = AdapterMethodTable.all.summaries(root: m.root, targets: list)
            let header = ["peft_type", "family", "PEFT parity", "mergeable", "trainable"]
            let table = rows.map { r in
                [r.peftType, r.family, r.peftParity.summary, r.mergeable ? "yes" : "no",
                 r.trainableParameters.map { String($0) } ?? "n/a (\(r.note ?? ""))"]
            }
            let widths = (0..<header.count).map { c in ([header[c]] + table.map { $0[c] }).map(\.count).max() ?? 0 }
            func line(_ cells: [String]) -> String {
                cells.enumerated().map { $0.element.padding(toLength: widths[$0.offset], withPad: " ", startingAt: 0) }.joined(separator: "  ")
            }
            print(line(header))
            for row in table { print(line(row)) }
            print("\nPEFT parity, as the parity tests measure it (yes: PEFT's output reproduced to 1e-4 max-abs on its fixtures):")
            for r in rows where !r.peftParity.isExact && r.peftParity != .noPEFTCounterpart {
                print("  \(r.peftType): \(r.peftParity.summary): \(r.peftParity.detail)")
            }
            print("  n/a: \(PEFTParity.noPEFTCounterpart.detail)")
            print("\nLORA options honoured: \(LoRAFactory.honouredOptions.joined(separator: ", ")); PEFT's others are refused by name")
        }
    }
}
