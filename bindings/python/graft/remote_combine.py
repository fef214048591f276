"""RemoteModel.add_weighted_adapter: PEFT's LoRA combination on a model graftd holds (the combine_adapters request)
and RemoteModel.compress_adapter (compress_adapter)."""
import json
import os

from . import graft_pb2 as pb


class RemoteCombinationMixin:
    """RemoteModel's adapter combination (mixed into graft.remote.RemoteModel)."""

    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="svd", svd_rank=None,
                             svd_clamp=None, svd_full_matrices=True, svd_driver=None, density=None,
                             majority_sign_method="total", seed=0):
        """As graft.Model.add_weighted_adapter (PEFT's signature), run by the daemon: combines LoRA adapters into
        `adapter_name` (attached, not activated) and returns the report {"name", "combination_type", "r",
        "kept_fraction"}. The daemon checks every argument and answers errors as RemoteError."""
        options = {"combination_type": combination_type, "svd_rank": svd_rank, "svd_clamp": svd_clamp,
                   "svd_full_matrices": svd_full_matrices, "svd_driver": svd_driver, "density": density,
                   "majority_sign_method": majority_sign_method, "seed": seed}
        request = pb.CombineAdapters(model_id=self.model_id, name=adapter_name, adapters=list(adapters),
                                     weights=[float(w) for w in weights], options_json=json.dumps(options))
        r = self.client._call("combine_adapters", request)
        return json.loads(r.combined.report_json)

    def compress_adapter(self, adapter_name, directory, method="compeft", density=None, alpha=None):
        """As graft.Model.compress_adapter, run by the daemon (the compress_adapter request): writes the adapter
        compressed to `directory` on the daemon's machine ("compeft" or "onebit"); load_adapter(directory, name)
        reads it back. Returns {"method", "file_bytes", "float32_bytes", "packed_bytes", "kept_fraction"}."""
        options = {k: v for k, v in (("density", density), ("alpha", alpha)) if v is not None}
        request = pb.CompressAdapter(model_id=self.model_id, name=adapter_name, method=method,
                                     directory=os.fspath(directory), options_json=json.dumps(options) if options else "")
        r = self.client._call("compress_adapter", request)
        return json.loads(r.compressed.report_json)
