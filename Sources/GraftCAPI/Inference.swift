// The C ABI: forward passes and generation.
import CGraftABI
import Graft

/// The C entry point `graft_model_forward`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_model_forward")
public func graft_model_forward(_ model: OpaquePointer?, _ ids: UnsafePointer<Int32>?, _ lengths: UnsafePointer<Int32>?,
                                _ batch: Int32, _ stride: Int32, _ adapterIds: UnsafePointer<Int32>?, _ output: Int32,
                                _ out: UnsafeMutablePointer<Float>?, _ capacity: Int,
                                _ outCount: UnsafeMutablePointer<Int>?) -> graft_status {
    guarded {
        let s = try session(model)
        guard let outCount else { throw invalid("out_count is NULL") }
        guard let kind = SessionOutput(rawValue: output) else {
            throw invalid("output is \(output); expected GRAFT_OUTPUT_HIDDEN (\(GRAFT_OUTPUT_HIDDEN)) or GRAFT_OUTPUT_LOGITS (\(GRAFT_OUTPUT_LOGITS))")
        }
        let tokens = try tokenBatch(s, ids, lengths, batch, stride)
        var options = ForwardOptions()
        options.output = kind
        options.adapterIds = try adapterIds.map { try int32s($0, count: Int(batch), "adapter_ids") }
        _ = try options.validate(for: s, rows: Int(batch))
        let needed = try s.outputCount(batch: Int(batch), stride: Int(stride), output: kind)
        outCount.pointee = needed
        guard capacity >= needed else {
            throw invalid("out_capacity is \(capacity) but the output has \(needed) floats (stored in *out_count)")
        }
        guard out != nil else { throw invalid("out is NULL but the output has \(needed) floats") }
        let values = try s.forward(batch: tokens, options: options)
        try deliver(values, to: out, capacity: capacity, count: outCount, what: "out")
    }
}

/// The C entry point `graft_generate`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_generate")
public func graft_generate(_ model: OpaquePointer?, _ prompt: UnsafePointer<Int32>?, _ n: Int,
                           _ params: UnsafePointer<graft_sampling_params>?, _ callback: graft_token_callback?,
                           _ userData: UnsafeMutableRawPointer?, _ out: UnsafeMutablePointer<Int32>?, _ capacity: Int,
                           _ nOut: UnsafeMutablePointer<Int>?) -> graft_status {
    guarded {
        let s = try session(model)
        guard prompt != nil else { throw invalid("prompt is NULL") }
        guard n >= 1, n <= Int(Int32.max) else { throw invalid("prompt length n must be ≥ 1 (the prompt is empty), got \(n)") }
        let ids = try int32s(prompt, count: n, "prompt")
        let options = try readParams(params, defaults: graft_sampling_params(SamplingOptions()), name: "graft_sampling_params").options()
        guard capacity >= 0 else { throw invalid("capacity \(capacity) is negative") }
        if out != nil, capacity < options.maxNewTokens {
            throw invalid("capacity is \(capacity) but max_new_tokens is \(options.maxNewTokens); give room for max_new_tokens ids or pass out = NULL")
        }
        if out == nil, capacity != 0 { throw invalid("out is NULL but capacity is \(capacity)") }
        let generated = try s.generate(prompt: ids, parameters: options.generationParameters(stopTokens: []),
                                       stopAtEOS: options.stopAtEOS) { token, piece in
            guard let callback else { return true }
            return piece.withCString { callback(token, $0, userData) } == 0
        }
        if let out { for (i, v) in generated.enumerated() { out[i] = v } }
        nOut?.pointee = generated.count
    }
}
