import Foundation
import Graft

/// The router designs `graft moefy --router` puts on the MoE base it built or loaded (the settings of
/// `RouterDesignsSmolLM2Tests` by default).
enum MoefyRouter: String, CaseIterable {
    /// RMoE: a GRU carries routing state across the layers (``RMoE``).
    case rmoe
    /// ReXMoE: each layer's router also picks the experts of the layers within `--window` (``ExpertReuse``).
    case rexmoe
    /// Cross-layer shared experts: one pool of every layer's experts, a router per layer (``ExpertReuse``, no window).
    case shared
    /// Test-time router rewiring: per-layer router-logit offsets adapted on each context (``RouterRewiring``).
    case rewire

    /// Training steps when `--design-steps` is not given (30 for RMoE, 24 for the reuse designs, as the tests).
    var defaultSteps: Int { self == .rmoe ? 30 : 24 }
}

extension Moefy {
    /// Checks `--mup-base-width` and the `--router` options before any model is read (ArgumentParser calls it after parsing), so a bad
    /// value is refused at once as `graft: error: …` naming the option and the value.
    func validate() throws {
        try graft.run {
            if let mupBaseWidth {
                guard mupBaseWidth >= 1 else { throw GraftError.invalid("--mup-base-width \(mupBaseWidth) must be ≥ 1") }
                guard load != nil || method == "upcycling" else {
                    throw GraftError.invalid("--mup-base-width applies to --method upcycling (the experts it trains), not --method \(method)")
                }
            }
            try checkRouterOptions()
        }
    }

    /// The design `--router` names, nil without it; throws naming the value and the valid ones otherwise.
    func routerDesign() throws -> MoefyRouter? {
        guard let router else { return nil }
        guard let design = MoefyRouter(rawValue: router) else {
            throw GraftError.invalid("--router '\(router)' is not one of \(MoefyRouter.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        return design
    }

    /// The design's training steps: `--design-steps`, else its default.
    func designStepCount(_ design: MoefyRouter) -> Int { designSteps ?? design.defaultSteps }

    /// The step at which the reuse pool opens: `--open-at`, else a third of the design's steps.
    func poolOpenStep(_ design: MoefyRouter) -> Int { openAt ?? designStepCount(design) / 3 }

    /// Throws `GraftError.invalid` naming the first `--router` option (and its value) that cannot be used.
    func checkRouterOptions() throws {
        guard let design = try routerDesign() else {
            if let routerOutput { throw GraftError.invalid("--router-output '\(routerOutput)' needs --router") }
            return
        }
        let name = design.rawValue
        if MoefyDesign(rawValue: method) != nil {
            throw GraftError.invalid("--router \(name) needs an MoE base in every layer; --method \(method) makes none (use moefication, hmoe or upcycling)")
        }
        if let load, [WideNetFormat.configName, StratifiedMoEFormat.configName].contains(where: { FileManager.default.fileExists(atPath: load + "/" + $0) }) {
            throw GraftError.invalid("--router \(name) needs an MoE base; --load '\(load)' holds a WideNet or stratified model")
        }
        let steps = designStepCount(design), open = poolOpenStep(design)
        guard steps >= 0 else { throw GraftError.invalid("--design-steps \(steps) must be ≥ 0") }
        guard designBatchSize >= 1 else { throw GraftError.invalid("--design-batch-size \(designBatchSize) must be ≥ 1") }
        guard routerLr > 0, routerLr.isFinite else { throw GraftError.invalid("--router-lr \(routerLr) must be a positive number") }
        guard (1...65536).contains(gruSize) else { throw GraftError.invalid("--gru-size \(gruSize) must be in 1...65536") }
        guard window >= 0 else { throw GraftError.invalid("--window \(window) must be ≥ 0") }
        guard (0...max(steps, 0)).contains(open) else { throw GraftError.invalid("--open-at \(open) must be in 0...\(steps) (--design-steps)") }
        guard rewireSteps >= 0 else { throw GraftError.invalid("--rewire-steps \(rewireSteps) must be ≥ 0") }
        guard rewireLr > 0, rewireLr.isFinite else { throw GraftError.invalid("--rewire-lr \(rewireLr) must be a positive number") }
        guard rewireTexts >= 1 else { throw GraftError.invalid("--rewire-texts \(rewireTexts) must be ≥ 1") }
        if let routerOutput, let output,
           URL(fileURLWithPath: routerOutput).standardizedFileURL == URL(fileURLWithPath: output).standardizedFileURL {
            throw GraftError.invalid("--router-output '\(routerOutput)' must differ from --output (the MoE base is saved there)")
        }
    }

    /// Puts `--router`'s design on the MoE base `llama` at top-`k`, every block weighing its experts by the router's
    /// probabilities; trains it on `calibration` (or, for rewire, adapts it per held-out text), prints the rows of
    /// held-out perplexity before and after with the design's statistic, saves it to `--router-output`, then the
    /// JSON line.
    func reportRouter(_ llama: LlamaModel, k: Int, dense: Double, calibration: [String], encode: (String) -> [Int32],
                      evalExamples: [TokenizedExample]) throws {
        guard let design = try routerDesign() else { return }
        let blocks = llama.moeBlocks
        guard let first = blocks.first, blocks.count == llama.layers.count else {
            throw GraftError(.state, "--router \(design.rawValue) needs an MoE block in every layer; the model has \(blocks.count) of \(llama.layers.count) (--upcycle-layers)")
        }
        try llama.setMoETopK(k)
        for b in blocks { b.combine = .probability }
        var fields: [String: Any] = ["workload": "moefy-router", "router": design.rawValue, "method": load == nil ? method : "loaded",
                                     "experts": first.experts, "top_k": k, "moe_layers": blocks.count, "dense_perplexity": dense]
        let started = Date()
        let result = design == .rewire
            ? try rewire(llama, dense: dense, evalExamples: evalExamples)
            : try trainRouter(design, llama, dense: dense, sequences: designSequences(design, calibration: calibration, encode: encode), evalExamples: evalExamples)
        fields.merge(result) { $1 }
        fields["seconds"] = Date().timeIntervalSince(started)
        print(String(format: "router     %@ done in %.1f s", design.rawValue, Date().timeIntervalSince(started)))
        printBenchJSON(fields)
    }

    /// The first `steps × --design-batch-size` calibration texts of 2 tokens or more (cycled if fewer).
    func designSequences(_ design: MoefyRouter, calibration: [String], encode: (String) -> [Int32]) throws -> [[Int32]] {
        let wanted = designStepCount(design) * designBatchSize
        var sequences: [[Int32]] = []
        for text in calibration where sequences.count < wanted {
            let ids = encode(text)
            if ids.count >= 2 { sequences.append(ids) }
        }
        guard wanted == 0 || !sequences.isEmpty else { throw GraftError.invalid("--data '\(data)': no calibration text has 2 tokens or more") }
        return sequences
    }

    /// `value` as the Double its decimal text reads as (0.003, not 0.003000000026…), for the JSON line.
    func jsonNumber(_ value: Float) -> Double { Double("\(value)") ?? Double(value) }

    /// A perplexity for a table cell: 3 decimals, or 4 significant digits when large.
    func pplCell(_ value: Double) -> String { String(format: value < 1e5 ? "%.3f" : "%.4g", value) }

    /// Installs RMoE or the expert reuse, trains its routers `--design-steps` AdamW steps (the reuse pool opened at
    /// `--open-at`), measures held-out perplexity before and after and the design's statistic (rows under `dense`,
    /// the dense model's), saves it to `--router-output`; returns the JSON fields.
    func trainRouter(_ design: MoefyRouter, _ llama: LlamaModel, dense: Double, sequences: [[Int32]], evalExamples: [TokenizedExample]) throws -> [String: Any] {
        let steps = designStepCount(design), open = poolOpenStep(design)
        let base = try perplexity(llama, evalExamples)
        print(String(format: "base       held-out perplexity %@ with probability combining (the design's start)", pplCell(base)))
        var rmoe: RMoE?
        var options = ExpertReuseOptions()
        let parameters: [Tensor]
        if design == .rmoe {
            let r = try RMoE(model: llama, gruSize: gruSize, tuneExperts: false, addsBaseLogits: true, seed: seed)
            r.install()
            rmoe = r
            parameters = r.trainableParameters
            print("rmoe       GRU \(gruSize) across \(llama.layers.count) layers, \(parameters.reduce(0) { $0 + $1.count }) trainable parameters, experts frozen")
        } else {
            options.window = design == .shared ? nil : window
            let sources = try ExpertReuse.apply(to: llama, options: options)
            parameters = ExpertReuse.trainableParameters(of: llama)
            let sizes = sources.map(\.count)
            let span = sizes.min() == sizes.max() ? "\(sizes.max() ?? 0)" : "\(sizes.min() ?? 0)-\(sizes.max() ?? 0)"
            let pool = design == .shared ? "every layer's experts in one pool" : "window \(window)"
            print("\(design.rawValue.padding(toLength: 10, withPad: " ", startingAt: 0)) \(pool): \(span) source layers per layer, routers train (experts frozen), pool opened at step \(open)")
        }
        let reach: Int? = design == .shared ? nil : window
        let optimizer = AdamW(parameters: parameters, learningRate: routerLr, weightDecay: 0)
        let started = Date()
        for step in 0..<(sequences.isEmpty ? 0 : steps) {
            if rmoe == nil { ExpertReuse.setReach(step < open ? 0 : reach, of: llama) }
            let (batch, targets) = try HeldOutText.trainingBatch(sequences, step: step, size: designBatchSize)
            let loss = try llama.moeTrainingLoss(batch: batch, targets: targets)
            guard loss.item.isFinite else {
                throw GraftError(.state, "--router \(design.rawValue): the loss is \(loss.item) at step \(step + 1); lower --router-lr")
            }
            loss.backward()
            optimizer.step()
            optimizer.zeroGrad()
            if step % 10 == 0 || step == steps - 1 {
                print(String(format: "train      step %d/%d loss %.4f (%.1f s)", step + 1, steps, loss.item, Date().timeIntervalSince(started)))
            }
        }
        for p in parameters { p.requiringGrad(false) }
        if rmoe == nil { ExpertReuse.setReach(reach, of: llama) }
        llama.resetMoERouterStatistics()
        let after = try perplexity(llama, evalExamples)
        var fields: [String: Any] = ["base_perplexity": base, "perplexity": after, "train_steps": steps, "batch_size": designBatchSize,
                                     "lr": jsonNumber(routerLr), "trainable_parameters": parameters.reduce(0) { $0 + $1.count }]
        let statistic: String
        if let rmoe {
            let stats = rmoe.statistics
            let entropy = stats.map(\.meanEntropy).reduce(0, +) / Double(max(stats.count, 1))
            statistic = String(format: "entropy %.3f", entropy)
            fields["mean_entropy"] = entropy
            fields["gru_size"] = gruSize
        } else {
            let borrowed = ExpertReuse.borrowedShare(of: llama)
            statistic = String(format: "borrowed %.1f%%", 100 * borrowed)
            fields["borrowed_share"] = borrowed
            fields["window"] = design == .shared ? -1 : window
            fields["open_at"] = open
        }
        print(row(["routing", "perplexity", "statistic"]))
        print(row(["dense", pplCell(dense), "-"]))
        print(row(["base", pplCell(base), "-"]))
        print(row([design.rawValue, pplCell(after), statistic]))
        if let routerOutput {
            let extra: [String: Any] = ["base_model": model, "train_steps": steps, "lr": routerLr, "seed": seed, "open_at": open]
            if let rmoe {
                try RMoEFormat.save(rmoe, model: llama, to: routerOutput, extra: extra)
            } else {
                try ExpertReuseFormat.save(model: llama, options: options, to: routerOutput, extra: extra)
            }
            print("saved      \(routerOutput) (\(design == .rmoe ? RMoEFormat.configName : ExpertReuseFormat.configName))")
        }
        return fields
    }

    /// Test-time rewiring on the first `--rewire-texts` held-out texts of 8 tokens or more: per text, the offsets
    /// (reset) adapt `--rewire-steps` steps on its first half, and its second half is scored given the first, with
    /// and without them (`dense`: the dense model's perplexity, for its row); `--router-output` saves the last text's
    /// offsets. Returns the JSON fields.
    func rewire(_ llama: LlamaModel, dense: Double, evalExamples: [TokenizedExample]) throws -> [String: Any] {
        let texts = evalExamples.map(\.ids).filter { $0.count >= 8 }.prefix(rewireTexts)
        guard !texts.isEmpty else {
            throw GraftError.invalid("--router rewire: no held-out text has 8 tokens or more (--eval-texts \(evalTexts), --max-length \(maxLength))")
        }
        let rewiring = try RouterRewiring(model: llama)
        var base = 0.0, rewired = 0.0, drop = 0.0, tokens = 0
        let started = Date()
        print("rewire     \(rewiring.layers.count) layers × \(llama.moeBlocks.first?.experts ?? 0) offsets, \(rewireSteps) Adam steps at lr \(rewireLr) on each text's first half, \(texts.count) held-out texts")
        for (i, ids) in texts.enumerated() {
            let half = ids.count / 2
            rewiring.remove()
            base += try suffixLoss(llama, ids, from: half)
            rewiring.reset()
            let losses = try rewiring.adapt(model: llama, context: Array(ids[..<half]), steps: rewireSteps, learningRate: rewireLr)
            rewired += try suffixLoss(llama, ids, from: half)
            drop += Double((losses.first ?? 0) - (losses.last ?? 0))
            tokens += ids.count - half
            if i % 10 == 0 || i == texts.count - 1 {
                print(String(format: "rewire     text %d/%d context loss %.3f → %.3f (%.1f s)", i + 1, texts.count,
                             losses.first ?? .nan, losses.last ?? .nan, Date().timeIntervalSince(started)))
            }
        }
        let before = exp(base / Double(tokens)), after = exp(rewired / Double(tokens)), meanDrop = drop / Double(texts.count)
        print(row(["routing", "perplexity", "statistic"]))
        print(row(["dense", pplCell(dense), "all texts"]))
        print(row(["suffixes", pplCell(before), "no rewiring"]))
        print(row(["rewire", pplCell(after), String(format: "ctx loss -%.3f", meanDrop)]))
        if let routerOutput {
            try RouterRewiringFormat.save(rewiring, model: llama, to: routerOutput,
                                          extra: ["base_model": model, "steps": rewireSteps, "lr": rewireLr, "context": "the first half of the last rewired held-out text"])
            print("saved      \(routerOutput) (\(RouterRewiringFormat.configName); the last text's offsets)")
        }
        rewiring.remove()
        return ["base_perplexity": before, "perplexity": after, "heldout_suffix_perplexity_base": before,
                "heldout_suffix_perplexity_rewired": after, "rewire_texts": texts.count, "suffix_tokens": tokens,
                "train_steps": rewireSteps, "lr": jsonNumber(rewireLr), "mean_context_loss_drop": meanDrop]
    }

    /// The summed next-token loss of `ids[start...]` given the tokens before it (one sequence, no autograd).
    func suffixLoss(_ llama: LlamaModel, _ ids: [Int32], from start: Int) throws -> Double {
        let logits = try withNoGrad { try llama.logits(TokenBatch(ids: ids, batchSize: 1, length: ids.count)) }
        let targets = ids.indices.map { $0 >= start - 1 && $0 + 1 < ids.count ? ids[$0 + 1] : -100 }
        let mean = crossEntropy(logits.reshaped([ids.count, llama.config.vocabSize]), targets: targets).item
        return Double(mean) * Double(ids.count - start)
    }
}
