import GraftAdapters
import GraftModels
import GraftTensor

/// X-LoRA's classifier (PEFT's `XLoraClassifier`): `xlora_depth` Linear layers with ReLU (and dropout while
/// training) between them, from the hidden size to one logit per expert (per adapted layer when
/// `layerwise_scalings`), softmaxed over the experts at the configured temperature.
final class XLoRAClassifier {
    /// The Linear layers with their index in PEFT's `nn.Sequential` (ReLU and Dropout take indices too).
    let linears: [(index: Int, weight: Tensor, bias: Tensor)]
    let options: XLoRAOptions
    let experts: Int
    /// Sets of scalings it produces per token: the adapted layers when layer-wise, else 1.
    let sets: Int

    init(options: XLoRAOptions, hiddenSize: Int, experts: Int, layers: Int, rng: inout GraftRNG) {
        self.options = options
        self.experts = experts
        sets = options.layerwiseScalings ? layers : 1
        let out = experts * sets
        var widths: [(Int, Int)] = []
        if options.depth == 1 {
            widths = [(hiddenSize, out)]
        } else {
            widths.append((hiddenSize, options.size))
            for _ in 0..<(options.depth - 2) { widths.append((options.size, options.size)) }
            widths.append((options.size, out))
        }
        // nn.Linear's default initialization: weight and bias uniform in ±1/√in.
        let step = options.dropout > 0 ? 3 : 2
        linears = widths.enumerated().map { i, w in
            let bound = 1 / Float(max(w.0, 1)).squareRoot()
            return (i * step, Tensor.randomUniform([w.1, w.0], low: -bound, high: bound, rng: &rng).requiringGrad(),
                    Tensor.randomUniform([w.1], low: -bound, high: bound, rng: &rng).requiringGrad())
        }
    }

    var inputWidth: Int { linears.first?.weight.shape[1] ?? 0 }

    /// The tensors under PEFT's keys.
    var namedTensors: [(key: String, tensor: Tensor)] {
        linears.flatMap { l in
            [(XLoRAFactory.classifierPrefix + "\(l.index).weight", l.weight), (XLoRAFactory.classifierPrefix + "\(l.index).bias", l.bias)]
        }
    }

    /// Scalings `[tokens, sets, experts]` from hidden states `[tokens, hidden]`, recorded for autograd.
    func forward(_ hidden: Tensor, state: AdapterState) -> Tensor {
        var h = hidden
        for (i, l) in linears.enumerated() {
            h = linear(h, l.weight, l.bias)
            if i < linears.count - 1 {
                h = relu(h)
                if options.dropout > 0, state.isTraining { h = xloraDropout(h, p: options.dropout, state: state) }
            }
        }
        let logits = h.reshaped([hidden.rows, sets, experts])
        guard options.enableSoftmax else { return logits }
        return softmax(options.temperature == 1 ? logits : logits * (1 / options.temperature))
    }
}

/// Inverted dropout with probability `p`, recorded.
func xloraDropout(_ x: Tensor, p: Float, state: AdapterState) -> Tensor {
    let keep = 1 - p
    let mask = Tensor(zeros: x.shape)
    for i in 0..<mask.count { mask.pointer[i] = state.rng.nextUniform() < keep ? 1 / keep : 0 }
    return x * mask
}

/// What an X-LoRA adapter's layers share: its experts, its classifier, and the scalings of the pass under way.
/// It is also the model-level hook that runs the scaling pass before each forward pass.
final class XLoRARuntime: ForwardPassHook {
    let options: XLoRAOptions
    let experts: [XLoRAExpert]
    let classifier: XLoRAClassifier
    let state: AdapterState
    /// Each adapted Linear's number among the adapter's layers (module order, as PEFT numbers them).
    let layerNumbers: [String: Int]
    /// The model whose passes this adapter hooks.
    weak var host: (any ForwardHookHost)?
    /// True while the scaling pass runs (layers then use `scaling_pass_value`).
    var inScalingPass = false
    /// True while a mixed-adapter batch routes some rows to this adapter (its switch is then off).
    var routedInMixedBatch = false
    /// The first token row of the segment a mixed-adapter batch is applying (0 otherwise).
    var segmentRowOffset = 0
    /// The current pass's scalings `[tokens, sets, experts]`, recorded for autograd.
    var scalings: Tensor?
    /// The last pass's scalings as PEFT reports them, `[batch, length, layers, experts]`.
    var latestScalings: Tensor?
    /// The scaling pass's own KV cache while the model decodes with one (the real pass's cache holds adapted keys).
    private var shadowCache: (owner: ObjectIdentifier, cache: KVCache)?

    init(options: XLoRAOptions, experts: [XLoRAExpert], classifier: XLoRAClassifier, state: AdapterState,
         layerNumbers: [String: Int]) {
        self.options = options
        self.experts = experts
        self.classifier = classifier
        self.state = state
        self.layerNumbers = layerNumbers
    }

    var isEnabled: Bool { !inScalingPass && !state.isMerged && (state.isActive || routedInMixedBatch) }

    func willRunForward(_ batch: TokenBatch, cache: KVCache?) throws {
        guard let host else { return }
        inScalingPass = true
        scalings = nil
        let hidden: Tensor
        do {
            defer { inScalingPass = false }
            hidden = try withNoGrad { try host.lastHiddenStates(batch, cache: try passCache(for: cache, host: host)) }
        }
        let tokens = hidden.rows
        let s = classifier.forward(hidden.detached().reshaped([tokens, hidden.lastDim]), state: state)
        scalings = s
        let layers = layerNumbers.count, n = classifier.experts
        let report = Tensor(zeros: [batch.batchSize, tokens / max(batch.batchSize, 1), layers, n])
        for t in 0..<tokens {
            for l in 0..<layers {
                let src = s.pointer + (t * classifier.sets + (classifier.sets == 1 ? 0 : l)) * n
                (report.pointer + (t * layers + l) * n).update(from: src, count: n)
            }
        }
        latestScalings = report
    }

    /// The cache the scaling pass continues: nil without one; else its own, started with the real pass's.
    private func passCache(for cache: KVCache?, host: any ForwardHookHost) throws -> KVCache? {
        guard let cache else { return nil }
        if cache.length == 0 || shadowCache?.owner != ObjectIdentifier(cache) {
            guard cache.length == 0, let llama = host as? LlamaModel else {
                throw GraftError(.unsupported, "X-LoRA's scaling pass cannot continue a KV cache it did not see from the first token")
            }
            shadowCache = (ObjectIdentifier(cache), KVCache(layerCount: llama.config.layers))
        }
        return shadowCache?.cache
    }
}

/// X-LoRA on one Linear: the experts that adapt it, each scaled per token by the classifier's scalings.
final class XLoRALayer: LinearAdapterMethod {
    let runtime: XLoRARuntime
    let layerNumber: Int
    let path: String
    /// The experts adapting this layer, with their index among all experts.
    let members: [(index: Int, lora: LoRALayer)]

    init(runtime: XLoRARuntime, layerNumber: Int, path: String, members: [(index: Int, lora: LoRALayer)]) {
        self.runtime = runtime
        self.layerNumber = layerNumber
        self.path = path
        self.members = members
    }

    var state: AdapterState { runtime.state }
    /// The experts' factors when they train (`use_trainable_adapters`), by expert number; none when frozen (they
    /// stay in their own directories). The classifier is the adapter's shared tensor.
    var namedParameters: [(name: String, tensor: Tensor)] {
        guard runtime.options.trainableAdapters else { return [] }
        return members.flatMap { [("lora_A.\($0.index).weight", $0.lora.loraA), ("lora_B.\($0.index).weight", $0.lora.loraB)] }
    }
    func deltaWeight(base: Linear) -> Tensor? { nil }

    /// This layer's scalings `[rows, experts]` for `rows` token rows, after top-k and its softmax; nil when no
    /// scalings apply (a pass without the hook: PEFT then adds every expert unscaled).
    private func layerScalings(rows: Int) -> Tensor? {
        let options = runtime.options, n = runtime.experts.count
        var s: Tensor
        if runtime.inScalingPass {
            s = Tensor(shape: [rows, n], values: [Float](repeating: options.scalingPassValue, count: rows * n))
        } else {
            guard let all = runtime.scalings else { return nil }
            let sets = runtime.classifier.sets, offset = runtime.segmentRowOffset
            guard offset + rows <= all.shape[0] else { return nil }
            s = sets == 1 ? all.reshaped([all.shape[0], n]) : all.slice(dim: 1, layerNumber..<(layerNumber + 1)).reshaped([all.shape[0], n])
            if offset != 0 || rows != all.shape[0] { s = s.slice(dim: 0, offset..<(offset + rows)) }
        }
        if let k = options.topK, k < n {
            // Keep each row's k largest (the first of equal values), as torch.topk's mask.
            let mask = Tensor(zeros: [rows, n])
            for r in 0..<rows {
                let row = s.pointer + r * n
                for j in (0..<n).sorted(by: { row[$0] > row[$1] || (row[$0] == row[$1] && $0 < $1) }).prefix(k) { mask.pointer[r * n + j] = 1 }
            }
            s = s * mask
        }
        if options.enableSoftmaxTopK {
            // Softmax over the non-zero entries; zero entries stay zero (a row of zeros stays zero).
            let keep = Tensor(zeros: [rows, n]), shift = Tensor(zeros: [rows, n])
            for i in 0..<(rows * n) {
                let nonzero = s.pointer[i] != 0
                keep.pointer[i] = nonzero ? 1 : 0
                shift.pointer[i] = nonzero ? 0 : -1e30
            }
            s = softmax(s + shift) * keep
        }
        return s
    }

    func forward(input x: Tensor, baseOutput y: Tensor, layer: Linear) -> Tensor {
        let rows = x.rows, inF = x.lastDim
        if runtime.inScalingPass, runtime.options.scalingPassValue == 0 { return y }
        let s = layerScalings(rows: rows)
        let weight = s == nil ? 1 : runtime.options.globalScalingWeight
        let x2 = x.reshaped([rows, inF])
        var update: Tensor?
        for (index, lora) in members {
            var input = x2
            if lora.dropoutProbability > 0, state.isTraining { input = xloraDropout(input, p: lora.dropoutProbability, state: state) }
            var h = linear(input, lora.loraA)
            if let s { h = h * s.slice(dim: 1, index..<(index + 1)) }
            let out = linear(h, lora.loraB) * (lora.scaling * weight)
            update = update.map { $0 + out } ?? out
        }
        guard let update else { return y }
        return y + update.reshaped(y.shape)
    }
}
