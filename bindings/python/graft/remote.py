"""graft.remote: drive a graftd daemon over its socket (proto/graft.proto), with the in-process API's names.

    from graft.remote import Client
    with Client("/run/user/1000/graftd.sock") as c:            # or Client(host="127.0.0.1", port=7000, token=...)
        model = c.load_model("minilm", task="seq_cls", num_labels=2)
        model.add_adapter("default", graft.LoraConfig(r=8, target_modules=["query", "value"],
                                                      modules_to_save=["classifier"]))
        job = c.train(model, "tweets", total_steps=20, callback=lambda e: print(e.step, e.loss))
        model.save_adapter("out/lora")
        logits = model(["what a great day"])                     # numpy array [1, num_labels]

Needs only numpy and protobuf (not libgraft.so). A Client is one connection: use it from one thread at a time
(open one Client per thread). Errors from the daemon raise RemoteError with the wire code and message.
"""
import json
import os
import socket
import struct
import threading

import numpy as np

from . import _tasks
from . import graft_pb2 as pb
from .config import PeftConfig
from .remote_combine import RemoteCombinationMixin

PROTOCOL_VERSION = 1

# graft.proto's Task numbers equal graft.h's graft_task (and _tasks' numbers); the names are _tasks.ALIASES.
_TASKS = {_tasks.BASE: pb.TASK_BASE, _tasks.SEQUENCE_CLASSIFICATION: pb.TASK_SEQUENCE_CLASSIFICATION,
          _tasks.CAUSAL_LM: pb.TASK_CAUSAL_LM}
_OUTPUTS = {None: pb.OUTPUT_DEFAULT, "default": pb.OUTPUT_DEFAULT, "hidden": pb.OUTPUT_HIDDEN,
            "logits": pb.OUTPUT_LOGITS}
_SCHEDULES = {"linear": pb.SCHEDULE_LINEAR, "constant": pb.SCHEDULE_CONSTANT, "cosine": pb.SCHEDULE_COSINE}
_OPTIMIZERS = {"adamw": pb.OPTIMIZER_ADAMW, "sgd": pb.OPTIMIZER_SGD}
_JOB_STATES = {pb.JOB_QUEUED: "queued", pb.JOB_RUNNING: "running", pb.JOB_COMPLETED: "completed",
               pb.JOB_CANCELLED: "cancelled", pb.JOB_FAILED: "failed"}


class RemoteError(Exception):
    """The daemon answered with an error, or the connection failed.

    Attributes:
        code: the wire error code's name ("INVALID_ARGUMENT", "NOT_FOUND", "PROTOCOL", ..., or "CONNECTION").
        message: what was wrong, as the daemon said it.
    """

    def __init__(self, code, message, where=None):
        self.code = code
        self.message = message
        self.where = where
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}{code}: {message}")


def default_socket_path():
    """Where graftd listens by default: $XDG_RUNTIME_DIR/graftd.sock, else graftd.sock in the Graft cache."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "graftd.sock")
    home = os.environ.get("GRAFT_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "graft")
    return os.path.join(home, "graftd.sock")


class Client:
    """One connection to graftd. `path` (a Unix socket; default `default_socket_path()`) or `host`/`port`
    (TCP; `token` required). Use as a context manager or call close()."""

    def __init__(self, path=None, *, host=None, port=None, token=None, timeout=None, client_name="graft-python"):
        if host is not None or port is not None:
            if port is None:
                raise ValueError("port is required with host")
            self._sock = socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.settimeout(timeout)
            try:
                self._sock.connect(path or default_socket_path())
            except OSError as e:
                self._sock.close()
                raise RemoteError("CONNECTION", f"cannot connect to {path or default_socket_path()}: {e}") from None
        self._next_id = 0
        self._lock = threading.Lock()
        self._buffer = b""
        reply = self._call("hello", pb.Hello(protocol_version=PROTOCOL_VERSION, token=token or "",
                                             client_name=client_name))
        #: The daemon's Graft version.
        self.server_version = reply.hello.server_version
        #: This connection's number in the daemon's log.
        self.connection_id = reply.hello.connection_id

    # -- framing ---------------------------------------------------------------------------------------------

    def _send(self, kind, message):
        self._next_id += 1
        request = pb.Request(id=self._next_id)
        getattr(request, kind).CopyFrom(message)
        body = request.SerializeToString()
        self._sock.sendall(struct.pack("<I", len(body)) + body)
        return self._next_id

    def _recv_exact(self, n):
        while len(self._buffer) < n:
            chunk = self._sock.recv(max(65536, n - len(self._buffer)))
            if not chunk:
                raise RemoteError("CONNECTION", "the daemon closed the connection")
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def _receive(self):
        (n,) = struct.unpack("<I", self._recv_exact(4))
        response = pb.Response()
        response.ParseFromString(self._recv_exact(n))
        return response

    def _responses(self, request_id, where):
        """Yields the responses to request_id until the caller stops; raises RemoteError on an error reply."""
        while True:
            r = self._receive()
            if r.id != request_id and r.id != 0:
                continue  # a late event of an earlier, abandoned stream
            if r.WhichOneof("kind") == "error":
                raise RemoteError(pb.Error.Code.Name(r.error.code), r.error.message, where)
            yield r

    def _call(self, kind, message):
        with self._lock:
            request_id = self._send(kind, message)
            return next(self._responses(request_id, kind))

    # -- models ----------------------------------------------------------------------------------------------

    def load_model(self, path, task=None, num_labels=None, seed=0, model_id="", compute_dtype="float32", moe_base=None):
        """Loads a model on the daemon (a path on its machine, or "minilm" / "smollm2" from its cache); `task` is
        "base" (default), "seq-cls" or "causal-lm" (or any spelling graft.load_model takes: seq_cls,
        sequence_classification, causal_lm); `compute_dtype` as for graft.load_model ("float32", "bfloat16",
        "auto"); `moe_base` as for graft.load_model (a `graft moefy --output` directory on the daemon's machine).
        Returns a RemoteModel."""
        dtypes = {"float32": pb.COMPUTE_FLOAT32, "bfloat16": pb.COMPUTE_BFLOAT16, "auto": pb.COMPUTE_AUTO}
        if compute_dtype not in dtypes:
            raise ValueError(f"compute_dtype must be one of {sorted(dtypes)}, got {compute_dtype!r}")
        number = _tasks.task_number(task)
        if number is None:
            raise ValueError(f"task must be one of {_tasks.known()}, got {task!r}")
        r = self._call("load_model", pb.LoadModel(path=os.fspath(path), task=_TASKS[number],
                                                  seed=seed, model_id=model_id, compute_dtype=dtypes[compute_dtype],
                                                  moe_base="" if moe_base is None else os.fspath(moe_base),
                                                  **({} if num_labels is None else {"num_labels": num_labels})))
        return RemoteModel(self, r.model_loaded.model_id, json.loads(r.model_loaded.info_json))

    def model(self, model_id):
        """A RemoteModel for a model already loaded on the daemon (by this or any other client)."""
        r = self._call("model_info", pb.ModelInfoRequest(model_id=model_id))
        return RemoteModel(self, model_id, json.loads(r.model_info.info_json))

    # -- training --------------------------------------------------------------------------------------------

    def train(self, model, data, adapter="", callback=None, eval_data="", eval_every=0, progress_every=1,
              learning_rate=None, weight_decay=None, warmup_steps=0, total_steps=0, schedule="linear",
              optimizer="adamw", max_grad_norm=None, gradient_accumulation_steps=1, batch_size=32, seed=42,
              epochs=1, max_length=64, extras=None, wait=True):
        """Starts a training job on the daemon: `data` is a JSONL file on its machine (a relative path resolves
        against the daemon's working directory) or "tweets". Fields as for graft.Trainer. With wait=True
        (default) passes each progress event to `callback(event)` (once per reported step, as graft.Trainer's
        callback) and returns the finished Job (`job.result` is the final event); with wait=False returns the Job
        at once (iterate job.events() or call job.wait())."""
        # None leaves a field unset: the daemon then uses the option's default, as the in-process Trainer does.
        given = {"learning_rate": learning_rate, "weight_decay": weight_decay, "max_grad_norm": max_grad_norm,
                 "gradient_accumulation_steps": gradient_accumulation_steps, "batch_size": batch_size,
                 "seed": seed, "epochs": epochs, "max_length": max_length}
        config = pb.TrainingConfig(
            warmup_steps=warmup_steps, total_steps=total_steps, schedule=_SCHEDULES[schedule],
            optimizer=_OPTIMIZERS[optimizer], extras_json=json.dumps(extras) if extras else "",
            **{k: v for k, v in given.items() if v is not None})
        start = pb.StartTraining(model_id=_model_id(model), adapter=adapter, data=os.fspath(data), config=config,
                                 eval_data=os.fspath(eval_data) if eval_data else "", eval_every=eval_every,
                                 progress_every=progress_every)
        with self._lock:
            request_id = self._send("start_training", start)
            r = next(self._responses(request_id, "start_training"))
        job = Job(self, r.job_started.job_id, request_id, r.job_started.options_json)
        if wait:
            job.wait(callback)
        return job

    def attach(self, job_id):
        """Re-attaches this connection to a job (started by any client) and returns it; its events come here."""
        with self._lock:
            request_id = self._send("attach_job", pb.AttachJob(job_id=job_id))
            r = next(self._responses(request_id, "attach_job"))
        job = Job(self, r.job_started.job_id, request_id, r.job_started.options_json)
        job.running = r.job_started.running
        return job

    def job_status(self, job_id):
        """The job's state ("running", "completed", ...) and its last progress event, as a dict."""
        s = self._call("job_status", pb.JobStatusRequest(job_id=job_id)).job_status
        return {"job_id": s.job_id, "state": _JOB_STATES.get(s.state, "unknown"), "model_id": s.model_id,
                "adapter": s.adapter, "last": _event(s.last) if s.HasField("last") else None}

    def cancel(self, job_id):
        """Asks a job to stop after its current step."""
        self._call("cancel_job", pb.CancelJob(job_id=job_id))

    def save_checkpoint(self, job_id, path):
        """Saves a job's trainer state (adapter, optimizer, schedule position) to `path` on the daemon."""
        self._call("save_checkpoint", pb.SaveCheckpoint(job_id=job_id, path=os.fspath(path)))

    # -- daemon ----------------------------------------------------------------------------------------------

    def server_stats(self):
        """Uptime, connections, request and byte counters, models, jobs, queue depth, forward batching, and
        generation (requests, decode steps, tokens, sequences generating, KV cache bytes, prompt cache bytes, hits
        and reused tokens, the context limit), as a dict."""
        s = self._call("server_stats", pb.ServerStatsRequest()).server_stats
        return {f.name: (list(getattr(s, f.name)) if f.name == "models" else getattr(s, f.name))
                for f in s.DESCRIPTOR.fields}

    def shutdown(self):
        """Asks the daemon to shut down gracefully (running jobs are cancelled)."""
        self._call("shutdown", pb.Shutdown())

    def close(self):
        """Closes the connection (running jobs keep running on the daemon)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _model_id(model):
    return model.model_id if isinstance(model, RemoteModel) else str(model)


class Event:
    """One progress event of a training job (attributes as graft.Progress, plus eval metrics and `finished`)."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def __repr__(self):
        return "Event(" + ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items()) + ")"


def _event(e):
    fields = dict(job_id=e.job_id, step=e.step, total_steps=e.total_steps, epoch=e.epoch, loss=e.loss,
                  mean_loss=e.mean_loss, learning_rate=e.learning_rate, grad_norm=e.grad_norm,
                  tokens_per_second=e.tokens_per_second, elapsed=e.elapsed_seconds, eta=e.eta_seconds,
                  eval=None, finished=_JOB_STATES.get(e.finished), error=None)
    if e.HasField("eval"):
        fields["eval"] = {"loss": e.eval.loss, "accuracy": e.eval.accuracy, "perplexity": e.eval.perplexity,
                          "count": e.eval.count}
    if e.HasField("error"):
        fields["error"] = f"{pb.Error.Code.Name(e.error.code)}: {e.error.message}"
    return Event(**fields)


class Job:
    """A training job on the daemon, attached to one Client."""

    def __init__(self, client, job_id, request_id, options_json=""):
        self.client = client
        self.job_id = job_id
        self._request_id = request_id
        #: The options the job trains with, after the daemon's defaults (as graft.Trainer.options).
        self.options = json.loads(options_json) if options_json else {}
        self.running = True
        #: The final event once the job has finished.
        self.result = None

    def events(self):
        """Yields progress events until the job finishes (the last one has `finished` set)."""
        with self.client._lock:
            for r in self.client._responses(self._request_id, "train"):
                if r.WhichOneof("kind") != "event":
                    continue
                event = _event(r.event)
                if event.finished:
                    self.running = False
                    self.result = event
                    yield event
                    return
                yield event

    def wait(self, callback=None):
        """Consumes events until the job ends, passing each progress event to `callback`; returns the final
        event. Raises RemoteError if the job failed.

        The daemon ends a job with a final event (`finished` set) that repeats the last step's figures; it is the
        return value, not passed to `callback`, so the callback sees each step once."""
        for event in self.events():
            if callback is not None and not event.finished:
                callback(event)
        if self.result.finished == "failed":
            raise RemoteError("JOB_FAILED", self.result.error or "the job failed", self.job_id)
        return self.result

    def status(self):
        return self.client.job_status(self.job_id)

    def cancel(self):
        self.client.cancel(self.job_id)

    def __repr__(self):
        return f"Job({self.job_id!r}, running={self.running})"


class RemoteModel(RemoteCombinationMixin):
    """A model loaded on the daemon; methods mirror graft.Model."""

    def __init__(self, client, model_id, info):
        self.client = client
        self.model_id = model_id
        self._info = info

    def info(self):
        """Architecture, sizes, parameter count and module tree (as graft.Model.info())."""
        return json.loads(self.client._call("model_info", pb.ModelInfoRequest(model_id=self.model_id)).model_info.info_json)

    def add_adapter(self, name, config, seed=0):
        """Attaches a new adapter and makes it active; `config` is a graft config object, dict or JSON string;
        `seed` draws its initial weights."""
        if isinstance(config, PeftConfig):
            text = json.dumps(config.to_dict())
        elif isinstance(config, dict):
            text = json.dumps(config)
        else:
            text = str(config)
        self.client._call("add_adapter", pb.AddAdapter(model_id=self.model_id, name=name, config_json=text, seed=seed))

    def load_adapter(self, peft_dir, name="default"):
        """Loads a PEFT adapter directory on the daemon's machine as `name`, active."""
        self.client._call("load_adapter", pb.LoadAdapter(model_id=self.model_id, name=name, path=os.fspath(peft_dir)))

    def save_adapter(self, directory, name="default"):
        """Writes adapter `name` in PEFT's format to `directory` on the daemon's machine."""
        self.client._call("save_adapter", pb.SaveAdapter(model_id=self.model_id, name=name, path=os.fspath(directory)))

    def list_adapters(self):
        """The adapters as a list of dicts (name, type, active, merged, trainable parameters)."""
        r = self.client._call("list_adapters", pb.ListAdapters(model_id=self.model_id))
        return json.loads(r.adapters.adapters_json)

    def set_adapter(self, name):
        """Makes `name` the active adapter (None = base model, adapters disabled)."""
        self.client._call("set_active_adapter", pb.SetActiveAdapter(model_id=self.model_id, name=name or ""))

    def delete_adapter(self, name):
        self.client._call("delete_adapter", pb.DeleteAdapter(model_id=self.model_id, name=name))

    def __call__(self, inputs, adapter_ids=None, output=None):
        """A forward pass: `inputs` is a list of texts or of token-id lists. Returns a float32 numpy array:
        [batch, num_labels] classification logits, [batch, stride, vocab] Llama logits, or [batch, stride,
        hidden] hidden states (`output="hidden"`); positions past a sequence's end are zero."""
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of 'hidden', 'logits' or None, got {output!r}")
        request = pb.Forward(model_id=self.model_id, output=_OUTPUTS[output])
        for item in inputs:
            if isinstance(item, str):
                request.texts.append(item)
            else:
                request.sequences.add().ids.extend(int(t) for t in item)
        if adapter_ids is not None:
            request.adapter_ids.extend(int(a) for a in adapter_ids)
        r = self.client._call("forward", request).forward
        return np.asarray(r.values, dtype=np.float32).reshape(tuple(r.shape))

    def generate(self, prompt, max_new_tokens=128, temperature=0.0, top_p=1.0, top_k=0, seed=0, stop_at_eos=True,
                 chat=False, on_token=None, adapter=None, fast_decode=False):
        """Generates after `prompt` (text, or a list of token ids) and returns the new token ids; `on_token(id,
        text)` sees each token as it streams in. `adapter`: a loaded adapter's name, "" for the base model, None
        for the model's active adapter. Concurrent requests (from any clients) run as one batch on the daemon,
        each under its own adapter. `fast_decode` selects the int8 fast mode (see Model.generate)."""
        request = pb.Generate(model_id=self.model_id, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, top_k=top_k, seed=seed, ignore_eos=not stop_at_eos, chat=chat,
                              fast_decode=bool(fast_decode))
        if adapter is not None:
            request.adapter = adapter
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            request.prompt_ids.extend(int(t) for t in prompt)
        with self.client._lock:
            request_id = self.client._send("generate", request)
            for r in self.client._responses(request_id, "generate"):
                kind = r.WhichOneof("kind")
                if kind == "token" and on_token is not None:
                    on_token(r.token.token_id, r.token.text)
                elif kind == "generated":
                    self.last_text = r.generated.text
                    return list(r.generated.ids)

    def generate_text(self, prompt, **kwargs):
        """generate(), returning the decoded text."""
        self.generate(prompt, **kwargs)
        return self.last_text

    def unload(self):
        """Frees the model on the daemon."""
        self.client._call("unload_model", pb.UnloadModel(model_id=self.model_id))

    def __repr__(self):
        return f"RemoteModel({self.model_id!r})"
