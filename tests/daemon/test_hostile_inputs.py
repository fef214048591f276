"""graftd under hostile input: garbage, truncated and oversized frames, unknown messages, many clients, a client
killed mid-training, and a signal during a job. After each, the daemon is alive and answers other clients."""
import os
import random
import signal
import struct
import subprocess
import tempfile
import textwrap
import threading
import time

import numpy as np
import pytest

import graft
from graft import graft_pb2 as pb
from graft.remote import Client

from conftest import MINILM, PYTHON, SHORT_TIMEOUT, SLACK, Daemon, closed, connect, frame, read_frame

TEXTS = ["the cat sat on the mat", "flights to boston are delayed", "I love this phone", "terrible weather"]


def hello_frame(request_id=1):
    r = pb.Request(id=request_id)
    r.hello.protocol_version = 1
    return frame(r.SerializeToString())


def response(sock):
    body = read_frame(sock)
    assert body is not None, "the daemon closed the connection without a response"
    r = pb.Response()
    r.ParseFromString(body)
    return r


def assert_daemon_serves(daemon):
    assert daemon.alive()
    with Client(daemon.socket_path, timeout=60) as c:
        assert c.server_stats()["uptime_seconds"] > 0


def garbage(kind, seed=11):
    """4096 deterministic random bytes shaped as `kind`: "raw" (the first four announce a frame far above the
    maximum), "half" (a 8192-byte frame cut short) or "whole" (a complete 4092-byte frame of garbage)."""
    body = random.Random(f"{kind}-{seed}").randbytes(4092)
    if kind == "raw":
        data = struct.pack("<I", 0xFFFF0000 | random.Random(seed).getrandbits(16)) + body
    else:
        data = struct.pack("<I", 8192 if kind == "half" else 4092) + body
    assert len(data) == 4096
    return data


@pytest.mark.parametrize("kind", ["raw", "half", "whole"])
def test_random_bytes_close_only_that_connection(strict_daemon, kind):
    """Seeded random bytes: however they frame, the sender gets a PROTOCOL error and is closed within the
    timeout (a half frame by --hello-timeout / --frame-timeout, not never); a bystander is served throughout."""
    with Client(strict_daemon.socket_path, timeout=30) as bystander:
        raw = connect(strict_daemon.socket_path)
        start = time.monotonic()
        raw.sendall(garbage(kind))
        r = response(raw)
        assert r.WhichOneof("kind") == "error" and r.error.code == pb.Error.PROTOCOL, r
        assert closed(raw, timeout=SHORT_TIMEOUT + SLACK)
        elapsed = time.monotonic() - start
        assert elapsed <= SHORT_TIMEOUT + SLACK, f"{kind}: closed after {elapsed:.2f} s"
        print(f"{kind} garbage: {r.error.message!r}; closed after {elapsed:.2f} s")
        raw.close()
        assert bystander.server_stats()["connections"] >= 1
    assert_daemon_serves(strict_daemon)


def test_random_bytes_after_hello_get_a_protocol_error(daemon, raw):
    raw.sendall(hello_frame())
    assert response(raw).WhichOneof("kind") == "hello"
    raw.sendall(frame(b"\xff" * 64))  # a valid length, an undecodable body
    r = response(raw)
    assert r.WhichOneof("kind") == "error" and r.error.code == pb.Error.PROTOCOL
    assert closed(raw)
    assert_daemon_serves(daemon)


def test_a_truncated_frame_does_not_block_others(strict_daemon):
    raw = connect(strict_daemon.socket_path)
    raw.sendall(hello_frame())
    response(raw)
    body = pb.Request(id=2, server_stats=pb.ServerStatsRequest()).SerializeToString()
    start = time.monotonic()
    raw.sendall(struct.pack("<I", len(body) + 100) + body)  # 100 bytes never come
    assert_daemon_serves(strict_daemon)
    # The frame timeout ends it: an error naming the limit, then the close.
    r = response(raw)
    assert r.error.code == pb.Error.PROTOCOL and "--frame-timeout" in r.error.message, r
    assert f"{len(body) + 4} bytes received" in r.error.message
    assert closed(raw, timeout=SLACK)
    assert SHORT_TIMEOUT - 0.2 <= time.monotonic() - start <= SHORT_TIMEOUT + SLACK
    raw.close()
    assert_daemon_serves(strict_daemon)


def test_a_length_above_the_maximum_is_refused_before_allocating(daemon, raw):
    raw.sendall(struct.pack("<I", 0xFFFFFFF0))
    r = response(raw)
    assert r.error.code == pb.Error.PROTOCOL
    assert "exceeds the maximum" in r.error.message and str(0xFFFFFFF0) in r.error.message
    assert closed(raw)
    assert_daemon_serves(daemon)


def test_an_unknown_message_is_answered_and_the_connection_stays(daemon, raw):
    raw.sendall(hello_frame())
    response(raw)
    # Request{id: 7, field 99: bytes "future"} — a kind from a newer protocol.
    unknown = bytes([0x08, 7]) + bytes([0x9A, 0x06, 6]) + b"future"
    raw.sendall(frame(unknown))
    r = response(raw)
    assert r.id == 7 and r.error.code == pb.Error.UNKNOWN_REQUEST
    raw.sendall(frame(pb.Request(id=8, server_stats=pb.ServerStatsRequest()).SerializeToString()))
    r = response(raw)
    assert r.id == 8 and r.WhichOneof("kind") == "server_stats"


def test_a_request_before_hello_is_refused(daemon, raw):
    raw.sendall(frame(pb.Request(id=3, server_stats=pb.ServerStatsRequest()).SerializeToString()))
    r = response(raw)
    assert r.id == 3 and r.error.code == pb.Error.PROTOCOL and "hello" in r.error.message
    assert closed(raw)


def test_a_wrong_protocol_version_is_refused(daemon, raw):
    r = pb.Request(id=1)
    r.hello.protocol_version = 99
    raw.sendall(frame(r.SerializeToString()))
    reply = response(raw)
    assert reply.error.code == pb.Error.PROTOCOL and "99" in reply.error.message


def test_64_concurrent_clients_get_correct_forward_passes(daemon):
    with Client(daemon.socket_path) as c:
        model = c.load_model(MINILM, model_id="shared-64")
        expected = {t: model([t], output="hidden") for t in TEXTS}
        results, errors = {}, []

        def worker(i):
            try:
                with Client(daemon.socket_path, timeout=300) as ci:
                    text = TEXTS[i % len(TEXTS)]
                    results[i] = (text, ci._call("forward", pb.Forward(model_id="shared-64", texts=[text],
                                                                           output=pb.OUTPUT_HIDDEN)).forward)
            except Exception as e:  # reported below
                errors.append(f"client {i}: {e!r}")

        before = c.server_stats()
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        after = c.server_stats()
        requests = after["forward_requests"] - before["forward_requests"]
        passes = after["forward_passes"] - before["forward_passes"]
        assert requests == 64 and passes < 64, f"concurrent forwards were not batched: {requests} in {passes} passes"
        print(f"64 concurrent forward requests answered in {passes} passes")
        assert len(results) == 64
        for text, r in results.values():
            got = np.asarray(r.values, dtype=np.float32).reshape(tuple(r.shape))
            assert np.abs(got - expected[text]).max() <= 1e-5
        model.unload()


CHILD = textwrap.dedent("""
    import sys
    import graft
    from graft.remote import Client
    c = Client(sys.argv[1])
    m = c.load_model(sys.argv[2], task="seq_cls", num_labels=3, model_id="killed-client")
    m.add_adapter("default", graft.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    job = c.train(m, "tweets", total_steps=12, batch_size=8, wait=False)
    print(job.job_id, flush=True)
    for event in job.events():
        print(event.step, flush=True)
""")


def test_a_client_killed_mid_training_leaves_the_job_running(daemon):
    child = subprocess.Popen([PYTHON, "-c", CHILD, daemon.socket_path, str(MINILM)], stdout=subprocess.PIPE,
                             text=True, env=os.environ.copy())
    job_id = child.stdout.readline().strip()
    assert job_id.startswith("j"), job_id
    assert child.stdout.readline().strip() == "1"  # the first progress event arrived: training is under way
    child.send_signal(signal.SIGKILL)
    child.wait()
    with Client(daemon.socket_path) as c:
        # Other clients keep getting correct answers while the orphaned job trains.
        base = c.load_model(MINILM, model_id="bystander")
        a = base([TEXTS[0]], output="hidden")
        b = base([TEXTS[0]], output="hidden")
        assert np.array_equal(a, b)
        job = c.attach(job_id)
        final = job.wait()
        assert final.finished == "completed" and final.step == 12
        m = c.load_model(MINILM, model_id="reference")
        assert np.abs(base([TEXTS[0]], output="hidden") - m([TEXTS[0]], output="hidden")).max() == 0
        m.unload()
        base.unload()
        c._call("unload_model", pb.UnloadModel(model_id="killed-client"))
    assert daemon.alive()


def test_sigterm_during_a_job_cancels_it_and_exits_zero():
    with tempfile.TemporaryDirectory(prefix="graftd-sigterm-") as directory:
        d = Daemon(directory)
        try:
            c = Client(d.socket_path)
            m = c.load_model(MINILM, task="seq_cls", num_labels=3)
            m.add_adapter("default", graft.LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
            job = c.train(m, "tweets", total_steps=1000, batch_size=8, wait=False)
            events = job.events()
            next(events)
            d.process.send_signal(signal.SIGTERM)
            rest = list(events)
            assert rest[-1].finished == "cancelled"
            assert d.process.wait(timeout=60) == 0
            assert not os.path.exists(d.socket_path)
            c.close()
        finally:
            d.stop()



def test_a_client_that_stops_reading_is_paused_not_buffered_forever(daemon, raw):
    with Client(daemon.socket_path) as c:
        c.load_model(MINILM, model_id="backpressure")
        raw.sendall(hello_frame())
        response(raw)
        # 200 forward passes whose hidden states (~100 KB each) far exceed the 8 MiB write-queue limit; never read.
        text = " ".join(["word"] * 60)
        request = pb.Request(id=2, forward=pb.Forward(model_id="backpressure", texts=[text], output=pb.OUTPUT_HIDDEN))
        payload = frame(request.SerializeToString()) * 200
        raw.setblocking(False)
        try:
            raw.sendall(payload)
        except BlockingIOError:
            pass  # the daemon stopped reading: exactly the point
        deadline = time.time() + 120
        while "action=pause_reading" not in daemon.log_path.read_text() and time.time() < deadline:
            time.sleep(0.2)
        assert "action=pause_reading" in daemon.log_path.read_text()
        # Everyone else is still served promptly.
        start = time.time()
        assert c.server_stats()["connections"] >= 2
        assert time.time() - start < 5
        c._call("unload_model", pb.UnloadModel(model_id="backpressure"))
