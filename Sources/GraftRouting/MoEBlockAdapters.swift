import Foundation
import GraftAdapters
import GraftModels
import GraftTensor

/// Weights that replace some experts of an MoE block: expert `indices[s]` runs on slice `s` of `gate`, `up`
/// (`[S, m, hidden]`) and `down` (`[S, hidden, m]`).
public struct ReplacedExperts {
    /// The replaced experts, ascending.
    public let indices: [Int]
    /// `[S, m, hidden]`.
    public let gate: Tensor
    /// `[S, m, hidden]`.
    public let up: Tensor
    /// `[S, hidden, m]`.
    public let down: Tensor

    /// Experts `indices` with weights `gate`, `up`, `down` (shapes above).
    public init(indices: [Int], gate: Tensor, up: Tensor, down: Tensor) {
        self.indices = indices
        self.gate = gate
        self.up = up
        self.down = down
    }
}

/// An adapter on an MoE feed-forward block (``MoEFeedForward/adapters``): it may replace some experts' weights
/// (ESFT) and add a term to the block's output (PERFT).
public protocol MoEBlockAdapter: AnyObject {
    /// Whether the adapter takes part in forward passes now (active, not merged).
    var isEnabled: Bool { get }
    /// The experts whose weights this adapter replaces; nil for none.
    var replacedExperts: ReplacedExperts? { get }
    /// A term added to the block's output for its flat input `x` (`[T, hidden]`), `[T, hidden]`; nil for none.
    func addedOutput(_ x: Tensor) -> Tensor?
    /// Weights every expert runs on instead of its own for some of the pass's `rows` tokens only (partial LoRA
    /// on new-domain tokens, ``MoEPartialLoRALayer``); nil for none (the default).
    func tokenExperts(rows: Int) -> TokenExperts?
}

extension MoEBlockAdapter {
    public func tokenExperts(rows: Int) -> TokenExperts? { nil }
}

/// Weights every expert of an MoE block runs on, instead of its own, for the tokens `selected` marks
/// (``MoEBlockAdapter/tokenExperts(rows:)``): `gate`, `up` `[E, m, hidden]`, `down` `[E, hidden, m]`.
public struct TokenExperts {
    /// One flag per token row of the pass: true where the replacement weights apply.
    public let selected: [Bool]
    /// `[E, m, hidden]`.
    public let gate: Tensor
    /// `[E, m, hidden]`.
    public let up: Tensor
    /// `[E, hidden, m]`.
    public let down: Tensor
    /// Told, per expert, how many selected and other tokens the pass dispatched to it.
    let record: (_ expert: Int, _ selected: Int, _ other: Int) -> Void
}

/// A module adapter that lives on one MoE block (PERFT, MOE_PLORA): it attaches to the block's adapters, has no
/// weight form to merge, and loads its tensors by name, refusing non-finite entries.
public protocol MoEBlockModuleAdapter: ModuleAdapterMethod, MoEBlockAdapter {
    /// The MoE block the adapter sits in.
    var block: MoEFeedForward { get }
}

extension MoEBlockModuleAdapter {
    public func attach() { block.adapters.append(self) }
    public func detach() { block.adapters.removeAll { $0 === self } }
    public func merge() -> [Tensor] { [] }
    public func unmerge(_ saved: [Tensor]) {}

    public func load(_ name: String, from tensor: Tensor) throws {
        try loadNamedParameter(name, from: tensor, hint: "num_experts, r")
        for j in 0..<tensor.count where !tensor.pointer[j].isFinite {
            throw GraftError.format("'\(name)' entry \(j) is not finite")
        }
    }
}
