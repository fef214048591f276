import GraftModels
import GraftTensor

/// PEFT's `modules_to_save` for a Linear layer: a trainable copy of the whole layer (e.g. a classification
/// head) that replaces the original's output while its adapter is active. The original stays untouched.
public final class ModulesToSaveLinear: LinearAdapterMethod {
    public let state: AdapterState
    /// The trainable copy of the weight.
    public let weight: Tensor
    /// The trainable copy of the bias.
    public let bias: Tensor?

    /// Copies `base`'s parameters into trainable tensors.
    public init(base: Linear, state: AdapterState) {
        self.state = state
        weight = base.weight.copy().requiringGrad()
        bias = base.bias?.copy().requiringGrad()
    }

    public var namedParameters: [(name: String, tensor: Tensor)] {
        var p: [(String, Tensor)] = [("weight", weight)]
        if let bias { p.append(("bias", bias)) }
        return p
    }

    public func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        linear(x, weight, bias)
    }

    /// Not a weight delta: merging replaces the layer's parameters outright (see `AdaptedModel.mergeAndUnload`).
    public func deltaWeight(base: Linear) -> Tensor? {
        withNoGrad { weight - base.weight }
    }

    public func load(_ name: String, from tensor: Tensor) throws {
        switch name {
        case "weight": try copyParameter(name, into: weight, from: tensor)
        case "bias":
            guard let bias else { throw GraftError.format("'bias' given for a layer without a bias") }
            try copyParameter(name, into: bias, from: tensor)
        default: throw GraftError.format("unknown modules_to_save tensor '\(name)'")
        }
    }
}
