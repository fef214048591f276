import ArgumentParser
import Foundation
import Graft

struct Methods: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List the adapter methods with family, PEFT parity, mergeability and trainable parameters.")

    @Option(help: "Model to count parameters on (path or asset name).") var model: String = "minilm"
    @Option(help: "Comma-separated target modules.") var targets: String?
    @Option(name: .customLong("moe-base"), help: "Make the decoder this MoE base first (a graft moefy --output directory), so the methods that tune an MoE base's experts (ESFT, PERFT, MOE_PLORA) are counted too.")
    var moeBase: String?
    @Flag(help: "Print one JSON array (peft_type, family, peft_parity, mergeable, trainable_parameters, note, needs_moe_base, example_config) instead of the table.")
    var json = false

    func run() throws {
        try graft.run {
            let m = try GraftModel(path: resolveModelPath(model))
            if let moeBase { try m.loadMoEBase(moeBase, option: "--moe-base") }
            let list = targets.map { $0.split(separator: ",").map(String.init) }
                ?? (m.architecture == .bert ? ["query", "value"] : ["q_proj", "v_proj"])
            let rows = AdapterMethodTable.all.summaries(root: m.root, targets: list)
            if json { return try printJSON(rows) }
            print("methods on \(m.path), target_modules \(list.joined(separator: ","))  (example configs: graft methods --json)")
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

    /// The rows as one JSON array, for scripts (bench/methods reads it to enumerate the catalog).
    private func printJSON(_ rows: [MethodSummary]) throws {
        let objects: [[String: Any]] = rows.map { r in
            let example = (try? JSONSerialization.jsonObject(with: Data(r.exampleConfigJSON.utf8))) ?? [String: Any]()
            return ["peft_type": r.peftType, "family": r.family, "peft_parity": r.peftParity.summary,
                    "mergeable": r.mergeable, "trainable_parameters": r.trainableParameters.map { $0 as Any } ?? NSNull(),
                    "note": r.note.map { $0 as Any } ?? NSNull(), "example_config": example,
                    "needs_moe_base": AdapterConfig.typesOnMoEBlocks.contains(r.peftType)]
        }
        let data = try JSONSerialization.data(withJSONObject: objects, options: [.sortedKeys, .prettyPrinted])
        print(String(decoding: data, as: UTF8.self))
    }
}
