import Foundation
import GraftModels
import GraftTensor

/// `graft inspect`: the module tree with class names, shapes and parameter counts, and the names users pass
/// as PEFT `target_modules`.
public enum ModelInspector {
    /// A printable report of `model`'s module tree. Repeated layers after the first are folded unless `full`.
    public static func report(_ model: GraftModel, full: Bool = false) -> String {
        var lines: [String] = []
        let root = model.root
        let total = root.parameterCount
        let trainable = root.namedModules().flatMap { $0.module.localParameters }.filter { $0.tensor.requiresGrad }.reduce(0) { $0 + $1.tensor.count }
        lines.append("\(root.typeName) from \(model.path)")
        lines.append("parameters: \(formatCount(total)) (\(grouped(total))), trainable: \(grouped(trainable))")
        lines.append("")
        walk(root, name: "", prefix: "", isLast: true, isRoot: true, full: full, into: &lines)
        lines.append("")
        lines.append("Linear layers (PEFT target_modules names a module or a dotted suffix of its path, e.g. \"query\"):")
        // Group paths that differ only in their layer index: encoder.layer.{0-5}.attention.self.query.
        var groups: [(pattern: String, indices: [Int], shape: String)] = []
        for (path, module) in root.namedModules() {
            guard let lin = module as? Linear else { continue }
            var parts = path.split(separator: ".").map(String.init)
            var index: Int? = nil
            if let i = parts.firstIndex(where: { Int($0) != nil }) {
                index = Int(parts[i])
                parts[i] = "{N}"
            }
            let pattern = parts.joined(separator: ".")
            let shape = "[\(lin.outFeatures), \(lin.inFeatures)]"
            if let g = groups.firstIndex(where: { $0.pattern == pattern }) {
                if let index { groups[g].indices.append(index) }
            } else {
                groups.append((pattern, index.map { [$0] } ?? [], shape))
            }
        }
        let rendered = groups.map { g -> (String, Int, String) in
            let range = g.indices.isEmpty ? "" : "{\(g.indices.min() ?? 0)-\(g.indices.max() ?? 0)}"
            return (g.pattern.replacingOccurrences(of: "{N}", with: range), max(1, g.indices.count), g.shape)
        }
        let width = rendered.map(\.0.count).max() ?? 0
        for (name, n, shape) in rendered {
            lines.append("  " + name.padding(width) + "  ×\(n)  weight \(shape)")
        }
        return lines.joined(separator: "\n")
    }

    private static func walk(_ module: Module, name: String, prefix: String, isLast: Bool, isRoot: Bool, full: Bool,
                             into lines: inout [String]) {
        var label = isRoot ? module.typeName : "\(name): \(module.typeName)"
        if !module.summary.isEmpty { label += "(\(module.summary))" }
        let params = module.localParameters.map { "\($0.name) \($0.tensor.shape)" }.joined(separator: ", ")
        let count = module.parameterCount
        var line = (isRoot ? "" : prefix + (isLast ? "└─ " : "├─ ")) + label
        if !params.isEmpty { line += "  " + params }
        if let note = module.note { line += "  (\(note))" }
        if !module.children.isEmpty || params.isEmpty { line += "  [\(formatCount(count))]" }
        lines.append(line)
        let childPrefix = isRoot ? "" : prefix + (isLast ? "   " : "│  ")
        let children = module.children
        // Fold identical repeated layers ("1-5: same as 0") unless asked for everything.
        let numeric = children.allSatisfy { Int($0.name) != nil } && children.count > 2
        if numeric && !full {
            let first = children[0]
            walk(first.module, name: first.name, prefix: childPrefix, isLast: false, isRoot: false, full: full, into: &lines)
            let rest = children.dropFirst()
            let each = first.module.parameterCount
            lines.append(childPrefix + "└─ \(rest.first?.name ?? "")-\(rest.last?.name ?? ""): \(rest.count) × \(first.module.typeName), same as 0  [\(formatCount(each * rest.count))]")
            return
        }
        for (i, child) in children.enumerated() {
            walk(child.module, name: child.name, prefix: childPrefix, isLast: i == children.count - 1, isRoot: false,
                 full: full, into: &lines)
        }
    }

    /// `22.7M`, `1.2K`, `512`.
    public static func formatCount(_ n: Int) -> String {
        if n >= 1_000_000_000 { return String(format1(Double(n) / 1e9)) + "B" }
        if n >= 1_000_000 { return String(format1(Double(n) / 1e6)) + "M" }
        if n >= 1_000 { return String(format1(Double(n) / 1e3)) + "K" }
        return String(n)
    }

    private static func format1(_ x: Double) -> String {
        let r = (x * 10).rounded() / 10
        return r == r.rounded() ? String(Int(r)) + ".0" : String(r)
    }

    /// `22,713,216`.
    static func grouped(_ n: Int) -> String {
        let s = String(n)
        var out = ""
        for (i, c) in s.enumerated() {
            if i > 0 && (s.count - i) % 3 == 0 { out += "," }
            out.append(c)
        }
        return out
    }
}

extension String {
    func padding(_ width: Int) -> String { self + String(repeating: " ", count: max(0, width - count)) }
}
