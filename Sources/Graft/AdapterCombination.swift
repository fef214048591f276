import Foundation
import GraftAdapters

extension GraftSession {
    /// PEFT's `add_weighted_adapter` on this session's model: combines the LoRA adapters `adapters` with `weights`
    /// into a new adapter `name`, the options given in PEFT's keyword names as a JSON object (see
    /// ``AdapterCombination/optionKeys``; nil = PEFT's defaults, `combination_type` "svd"). The active adapter stays
    /// as it was, as in PEFT. Returns the report as JSON (``CombinationReport/jsonObject``). The C ABI's
    /// `graft_adapter_combine` and the Python binding call this.
    public func combineAdapters(name: String, adapters: [String], weights: [Double], optionsJSON: String?) throws -> String {
        let request = try AdapterCombination(adapters: adapters, weights: weights, optionsJSON: optionsJSON,
                                             source: "add_weighted_adapter options")
        let report = try adapted.addWeightedAdapter(name, combining: request)
        return try Self.jsonString(report.jsonObject)
    }
}
