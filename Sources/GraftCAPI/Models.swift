// The C ABI: parameter initializers, models and tokenization.
import CGraftABI
import Foundation
import Graft
import GraftAssets

/// The C entry point `graft_model_params_init_sized`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_model_params_init_sized")
public func graft_model_params_init_sized(_ p: UnsafeMutablePointer<graft_model_params>?, _ size: Int) {
    initParams(p, size: size, defaults: graft_model_params(ModelOptions()))
}

/// The C entry point `graft_sampling_params_init_sized`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_sampling_params_init_sized")
public func graft_sampling_params_init_sized(_ p: UnsafeMutablePointer<graft_sampling_params>?, _ size: Int) {
    initParams(p, size: size, defaults: graft_sampling_params(SamplingOptions()))
}

/// The C entry point `graft_trainer_params_init_sized`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_trainer_params_init_sized")
public func graft_trainer_params_init_sized(_ p: UnsafeMutablePointer<graft_trainer_params>?, _ size: Int) {
    initParams(p, size: size, defaults: graft_trainer_params(TrainingOptions()))
}

/// The C entry point `graft_model_load`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_model_load")
public func graft_model_load(_ path: UnsafePointer<CChar>?, _ params: UnsafePointer<graft_model_params>?,
                             _ out: UnsafeMutablePointer<OpaquePointer?>?) -> graft_status {
    guarded {
        guard let out else { throw invalid("out is NULL") }
        let path = try string(path, "path")
        let options = try readParams(params, defaults: graft_model_params(ModelOptions()), name: "graft_model_params").options()
        if options.numThreads > 0 { Threading.setThreads(options.numThreads) }
        let s = try AssetCache.openSession(path, options: options)
        out.pointee = OpaquePointer(Unmanaged.passRetained(s).toOpaque())
    }
}

/// The C entry point `graft_model_free`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_model_free")
public func graft_model_free(_ model: OpaquePointer?) {
    guard let model else { return }
    Unmanaged<GraftSession>.fromOpaque(UnsafeRawPointer(model)).release()
}

/// The C entry point `graft_model_info`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_model_info")
public func graft_model_info(_ model: OpaquePointer?, _ json: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> graft_status {
    guarded {
        let s = try session(model)
        guard let json else { throw invalid("json is NULL") }
        json.pointee = try mallocString(try s.infoJSON())
    }
}

/// The C entry point `graft_tokenize`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_tokenize")
public func graft_tokenize(_ model: OpaquePointer?, _ text: UnsafePointer<CChar>?, _ addSpecial: Int32,
                           _ ids: UnsafeMutablePointer<Int32>?, _ capacity: Int,
                           _ needed: UnsafeMutablePointer<Int>?) -> graft_status {
    guarded {
        let s = try session(model)
        let text = try string(text, "text")
        guard let needed else { throw invalid("n_needed is NULL") }
        let tokens = s.model.tokenizer.encode(text, addSpecialTokens: addSpecial != 0)
        try deliver(tokens, to: ids, capacity: capacity, count: needed, what: "ids")
    }
}

/// The C entry point `graft_detokenize`; its contract (arguments, errors, ownership, threads) is in include/graft.h.
@_cdecl("graft_detokenize")
public func graft_detokenize(_ model: OpaquePointer?, _ ids: UnsafePointer<Int32>?, _ n: Int, _ skipSpecial: Int32,
                             _ text: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> graft_status {
    guarded {
        let s = try session(model)
        guard let text else { throw invalid("text is NULL") }
        guard n >= 0, n <= Int(Int32.max) else { throw invalid("n = \(n) is not a valid token count") }
        let values = try int32s(ids, count: n, "ids")
        text.pointee = try mallocString(s.model.tokenizer.decode(values, skipSpecialTokens: skipSpecial != 0))
    }
}
