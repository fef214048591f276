import Foundation
import Testing
import Graft
import GraftTestSupport

/// μP for MoE blocks (seed #72): under μP one Adam step moves the router logits and the block's output by the same
/// amount at every width, and the router starts closer to uniform as the block widens; under the standard
/// parametrization (one learning rate, fan-in initialisation) the same step grows with the width.
@Suite struct MoEMuPTests {
    /// A random top-2-of-4 block of width `d`, expert width `2d`, its router trained through the probabilities.
    static func block(width d: Int, mup: MoEMuP?, seed: UInt64) throws -> MoEFeedForward {
        let e = 4, m = 2 * d
        var rng = GraftRNG(seed: seed)
        let block = try MoEFeedForward(path: "mlp", partition: (0..<Int32(e * m)).map { $0 },
                                       gate: Tensor(zeros: [e, m, d]), up: Tensor(zeros: [e, m, d]), down: Tensor(zeros: [e, d, m]),
                                       routerWeight: Tensor(zeros: [e, d]), routerBias: Tensor(zeros: [e]), topK: 2)
        block.combine = .probability
        if let mup {
            mup.initialize(block, rng: &rng)
        } else {
            // Standard parametrization: every matrix at 1/√fan_in.
            for (role, t) in MoEMuP.roles(of: block) where role != .bias {
                let std = 1 / Float(role == .expertOutput ? m : d).squareRoot()
                for j in 0..<t.count { t.pointer[j] = std * rng.nextNormal() }
            }
        }
        return block
    }

    /// The RMS of the change of the router logits and of the block output after one Adam step at `lr` on
    /// `Σ y · probe / T` over `tokens` random tokens, and the RMS of the initial router logits.
    static func oneStep(width d: Int, mup: MoEMuP?, lr: Float, tokens: Int = 8) throws -> (logits: Double, output: Double, initialLogits: Double) {
        let block = try Self.block(width: d, mup: mup, seed: UInt64(d))
        var rng = GraftRNG(seed: 100 + UInt64(d))
        let x = Tensor.randomNormal([tokens, d], std: 1, rng: &rng)
        let probe = Tensor.randomNormal([tokens, d], std: 1, rng: &rng)
        let logits0 = withNoGrad { block.routerLogits(x) }.scalars
        let y0 = withNoGrad { block.forward(x) }.scalars
        let optimizer = mup?.optimizer(for: [block], learningRate: lr)
            ?? AdamW(parameters: MoEMuP.roles(of: block).map { $0.tensor.requiringGrad() }, learningRate: lr, weightDecay: 0)
        (sum(mul(block.forward(x), probe)) * (1 / Float(tokens))).backward()
        optimizer.step()
        let logits1 = withNoGrad { block.routerLogits(x) }.scalars
        let y1 = withNoGrad { block.forward(x) }.scalars
        func rms(_ a: [Float], _ b: [Float]) -> Double {
            (zip(a, b).reduce(0.0) { $0 + Double($1.0 - $1.1) * Double($1.0 - $1.1) } / Double(max(a.count, 1))).squareRoot()
        }
        return (rms(logits1, logits0), rms(y1, y0), rms(logits0, [Float](repeating: 0, count: logits0.count)))
    }

    @Test func updatesStayTheSameSizeAcrossWidthsUnderMuPAndGrowUnderStandard() throws {
        let mup = try MoEMuP(baseWidth: 32, baseExpertWidth: 64)
        let widths = [32, 128, 512]
        let lr: Float = 1e-3
        let mu = try widths.map { try Self.oneStep(width: $0, mup: mup, lr: lr) }
        let sp = try widths.map { try Self.oneStep(width: $0, mup: nil, lr: lr) }
        for (d, (a, b)) in zip(widths, zip(mu, sp)) {
            print(String(format: "μP MoE width %4d: Δlogits %.5f Δy %.5f init logits %.4f | standard Δlogits %.5f Δy %.5f init logits %.4f",
                         d, a.logits, a.output, a.initialLogits, b.logits, b.output, b.initialLogits))
            for v in [a.logits, a.output, a.initialLogits, b.logits, b.output, b.initialLogits] { #expect(v.isFinite && v > 0) }
        }
        #expect(mu[0] == sp[0], "at the proxy's width μP is the standard parametrization")
        let muLogits = mu[2].logits / mu[0].logits, muOutput = mu[2].output / mu[0].output
        let spLogits = sp[2].logits / sp[0].logits, spOutput = sp[2].output / sp[0].output
        print(String(format: "width 512 / width 32: μP Δlogits ×%.2f Δy ×%.2f; standard Δlogits ×%.2f Δy ×%.2f", muLogits, muOutput, spLogits, spOutput))
        #expect((0.4...2.5).contains(muLogits) && (0.4...2.5).contains(muOutput), "μP keeps updates Θ(1) across widths")
        #expect(spLogits > 4 && spOutput > 4, "the standard parametrization's updates grow with the width")
        // μP's router starts near uniform as the width grows (logits ∝ 1/√ρ); the standard one's do not shrink.
        #expect(mu[2].initialLogits < 0.5 * mu[0].initialLogits && sp[2].initialLogits > 0.5 * sp[0].initialLogits)
    }

    /// μP changes initialisation and step sizes, not the block's function: a block initialised under μP has its
    /// definition's gradients through the routing (finite differences; NaN fails), its router statistics count the
    /// tokens, and steps of μP's per-group AdamW lower a loss through the routed experts.
    @Test func aBlockUnderMuPTrainsThroughItsRouting() throws {
        let mup = try MoEMuP(baseWidth: 8, baseExpertWidth: 16)
        let block = try Self.block(width: 16, mup: mup, seed: 3)
        for (_, t) in MoEMuP.roles(of: block) { t.requiringGrad() }
        let optimizer = mup.optimizer(for: [block], learningRate: 1e-2)
        var rng = GraftRNG(seed: 4)
        let x = Tensor.randomNormal([7, 16], std: 1, rng: &rng).requiringGrad()
        let probe = Tensor.randomNormal([7, 16], std: 1, rng: &rng)
        sum(mul(block.forward(x), probe)).backward()
        let named = [("x", x)] + MoEMuP.roles(of: block).enumerated().map { ("\($0.element.0) \($0.offset)", $0.element.1) }
        let result = finiteDifferenceCheck(named, step: 1e-2, samples: 120, skipKinks: true) {
            let y = withNoGrad { block.forward(x) }
            return zip(y.scalars, probe.scalars).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        print("μP MoE block gradients: worst relative error \(result.worst), \(result.kinks) kinks skipped")
        #expect(result.missing.isEmpty)
        #expect(result.worst <= 2e-2, "worst relative gradient error \(result.worst) (\(result.kinks) kinks skipped)")
        #expect(block.routerWeight.grad?.scalars.contains { $0 != 0 } == true, "the router learns through the probabilities")
        optimizer.zeroGrad()

        let inputs = Tensor(shape: [7, 16], values: x.scalars)
        block.statistics = RouterLayerStatistics(path: block.path, experts: block.experts)
        _ = withNoGrad { block.forward(inputs) }
        #expect(block.statistics.tokens == 7 && block.statistics.dispatchedTokens.reduce(0, +) == 7 * 2)
        #expect(block.statistics.meanEntropy > 0 && block.statistics.meanEntropy <= log(4.0) + 1e-9)
        var losses: [Float] = []
        for _ in 0..<20 {
            let y = block.forward(inputs)
            let loss = sum(mul(y, y)) * (1 / Float(7))
            losses.append(loss.item)
            loss.backward()
            optimizer.step()
            optimizer.zeroGrad()
        }
        print("μP MoE block training: loss \(losses[0]) → \(losses[losses.count - 1])")
        #expect(losses.allSatisfy { $0.isFinite })
        #expect(losses[losses.count - 1] < 0.9 * losses[0], "losses \(losses)")
    }

    @Test func perGroupRatesScaleAdamsStepAndInvalidBasesAreRefused() throws {
        // A learning-rate factor of 0.5 halves the first Adam step of that parameter only; 1 leaves it bit-identical.
        let a = Tensor(shape: [3], values: [1, 2, 3]).requiringGrad(), b = Tensor(shape: [3], values: [1, 2, 3]).requiringGrad()
        let c = Tensor(shape: [3], values: [1, 2, 3]).requiringGrad()
        let scaled = AdamW(parameters: [a, b], learningRate: 0.1, weightDecay: 0)
        scaled.learningRateScales = [1, 0.5]
        let plain = AdamW(parameters: [c], learningRate: 0.1, weightDecay: 0)
        for t in [a, b, c] { t.grad = Tensor(shape: [3], values: [0.3, -0.2, 0.1]) }
        scaled.step()
        plain.step()
        #expect(a.scalars == c.scalars)
        for j in 0..<3 { #expect(abs((b.scalars[j] - [1, 2, 3][j]) * 2 - (c.scalars[j] - [1, 2, 3][j])) < 1e-6) }
        let mup = try MoEMuP(baseWidth: 64, baseExpertWidth: 128)
        #expect(mup.learningRateScale(.router, width: 256, expertWidth: 512) == 0.25)
        #expect(mup.learningRateScale(.expertOutput, width: 256, expertWidth: 256) == 0.5)
        #expect(mup.learningRateScale(.bias, width: 256, expertWidth: 256) == 1)
        #expect(mup.initialStd(.router, width: 256, expertWidth: 512) == Float(8) / 256)
        #expect(throws: GraftError.self) { try MoEMuP(baseWidth: 0, baseExpertWidth: 8) }
    }
}
