"""graftd against peers that hold connections: slowloris (a frame trickled one byte per second), a connection
that never says hello, and more connections than --max-connections. Each is bounded in time and uses the Unix
socket only; the figures are printed (run pytest with -s to see them)."""
import selectors
import socket
import tempfile
import threading
import time

import numpy as np
import pytest

from graft import graft_pb2 as pb
from graft.remote import Client, RemoteError

from conftest import MINILM, SHORT_TIMEOUT, SLACK, Daemon, closed, connect, frame, read_frame

SLOWLORIS = 200


def hello_frame(request_id=1):
    r = pb.Request(id=request_id)
    r.hello.protocol_version = 1
    return frame(r.SerializeToString())


def error_in(data):
    """The error response at the start of `data` (the bytes a closed connection received), or None."""
    if len(data) < 4:
        return None
    n = int.from_bytes(data[:4], "little")
    r = pb.Response()
    r.ParseFromString(data[4:4 + n])
    return r.error if r.WhichOneof("kind") == "error" else None


def test_200_slowloris_connections_neither_block_others_nor_outlive_the_frame_timeout(strict_daemon):
    path = strict_daemon.socket_path
    with Client(path, timeout=60) as c:
        model = c.load_model(MINILM, model_id="slowloris-bystander")
        expected = model(["the cat sat on the mat"], output="hidden")
        peers = []
        for _ in range(SLOWLORIS):
            s = connect(path, timeout=10)
            s.sendall(hello_frame())
            peers.append(s)
        for s in peers:
            body = read_frame(s)
            assert body is not None
            assert pb.Response.FromString(body).WhichOneof("kind") == "hello"
        # Each peer now trickles a server_stats request (9 bytes) one byte per second: it would take 8 s.
        payload = frame(pb.Request(id=2, server_stats=pb.ServerStatsRequest()).SerializeToString())
        assert len(payload) > SHORT_TIMEOUT + SLACK + 1

        bystander = {}

        def serve_a_normal_client():
            """While the peers are connected: a new client connects and asks for stats; the old one runs a forward."""
            start = time.monotonic()
            with Client(path, timeout=30) as other:
                stats = other.server_stats()
            bystander["stats_ms"] = (time.monotonic() - start) * 1e3
            bystander["connections"] = stats["connections"]
            start = time.monotonic()
            bystander["hidden"] = model(["the cat sat on the mat"], output="hidden")
            bystander["forward_ms"] = (time.monotonic() - start) * 1e3

        selector = selectors.DefaultSelector()
        for i, s in enumerate(peers):
            s.setblocking(False)
            selector.register(s, selectors.EVENT_READ, i)
        first_byte, closed_at, received = {}, {}, {i: b"" for i in range(SLOWLORIS)}
        start = time.monotonic()
        next_tick, sent = start, 0
        helper = None
        while len(closed_at) < SLOWLORIS and time.monotonic() - start < SHORT_TIMEOUT + SLACK + 5:
            now = time.monotonic()
            if now >= next_tick and sent < len(payload):
                for i, s in enumerate(peers):
                    if i in closed_at:
                        continue
                    first_byte.setdefault(i, time.monotonic())
                    try:
                        s.send(payload[sent:sent + 1])
                    except OSError:
                        pass  # closed under us: the read side records it
                sent += 1
                next_tick += 1.0
            if helper is None and now - start >= 0.5:
                helper = threading.Thread(target=serve_a_normal_client)
                helper.start()
            for key, _ in selector.select(timeout=0.02):
                i, s = key.data, key.fileobj
                try:
                    data = s.recv(65536)
                except (ConnectionResetError, BrokenPipeError):
                    data = b""
                except BlockingIOError:
                    continue
                if data:
                    received[i] += data
                else:
                    closed_at[i] = time.monotonic()
                    selector.unregister(s)
        helper.join(timeout=60)
        for s in peers:
            s.close()

        held = [closed_at[i] - first_byte[i] for i in closed_at]
        print(f"{SLOWLORIS} slowloris peers: {len(closed_at)} closed by the daemon, {min(held):.2f}-{max(held):.2f} s "
              f"after their first byte (--frame-timeout {SHORT_TIMEOUT:g}); meanwhile a new client's server_stats "
              f"took {bystander.get('stats_ms', float('nan')):.1f} ms (connections: {bystander.get('connections')}) and "
              f"a forward pass {bystander.get('forward_ms', float('nan')):.1f} ms")
        assert len(closed_at) == SLOWLORIS, f"only {len(closed_at)} of {SLOWLORIS} slowloris peers were closed"
        assert max(held) <= SHORT_TIMEOUT + SLACK, f"a slowloris peer was held {max(held):.2f} s"
        assert min(held) >= SHORT_TIMEOUT - 0.2, f"a slowloris peer was closed early, after {min(held):.2f} s"
        assert sent < len(payload), "the peers finished their frames: they were not slow enough to test anything"
        for i in range(SLOWLORIS):
            e = error_in(received[i])
            assert e is not None and e.code == pb.Error.PROTOCOL and "--frame-timeout" in e.message, received[i]
        # The normal clients were served while all the peers were connected, and promptly.
        assert bystander["connections"] >= SLOWLORIS + 2
        assert bystander["stats_ms"] < 1000 and bystander["forward_ms"] < 3000, bystander
        assert np.array_equal(bystander["hidden"], expected)
        deadline = time.monotonic() + 10
        while c.server_stats()["connections"] > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.server_stats()["connections"] == 1
        model.unload()
    assert strict_daemon.alive()


def test_a_connection_that_never_says_hello_is_closed_after_the_hello_timeout(strict_daemon):
    raw = connect(strict_daemon.socket_path, timeout=SHORT_TIMEOUT + SLACK + 5)
    start = time.monotonic()
    body = read_frame(raw)
    assert body is not None, "closed without an error"
    r = pb.Response.FromString(body)
    assert r.error.code == pb.Error.PROTOCOL and "no hello within 2 s" in r.error.message, r
    assert "--hello-timeout" in r.error.message
    assert closed(raw, timeout=SLACK)
    elapsed = time.monotonic() - start
    print(f"silent connection: {r.error.message!r}; closed after {elapsed:.2f} s")
    assert SHORT_TIMEOUT - 0.2 <= elapsed <= SHORT_TIMEOUT + SLACK
    raw.close()
    # A client that said hello in time is not bound by it: it may stay idle past the timeout.
    with Client(strict_daemon.socket_path, timeout=30) as c:
        time.sleep(SHORT_TIMEOUT + 0.5)
        assert c.server_stats()["uptime_seconds"] > 0


def test_a_hello_trickled_byte_by_byte_is_closed_after_the_hello_timeout(strict_daemon):
    raw = connect(strict_daemon.socket_path, timeout=SHORT_TIMEOUT + SLACK + 5)
    start = time.monotonic()
    hello = hello_frame()
    for i in range(int(SHORT_TIMEOUT * 2) + 1):
        try:
            raw.send(hello[i:i + 1])
        except OSError:
            break
        time.sleep(0.5)
    r = pb.Response.FromString(read_frame(raw))
    assert r.error.code == pb.Error.PROTOCOL and "--hello-timeout" in r.error.message, r
    assert closed(raw, timeout=SLACK)
    assert time.monotonic() - start <= SHORT_TIMEOUT + SLACK + 0.5
    raw.close()


def test_connections_beyond_the_limit_get_an_error_and_are_closed():
    with tempfile.TemporaryDirectory(prefix="graftd-limit-") as directory:
        d = Daemon(directory, ["--max-connections", "4"])
        try:
            clients = [Client(d.socket_path, timeout=30) for _ in range(4)]
            # A fifth client is told why, with the wire code STATE, whether it reads first or says hello first.
            with pytest.raises(RemoteError) as e:
                Client(d.socket_path, timeout=30)
            assert e.value.code == "STATE" and "--max-connections 4" in e.value.message, e.value
            raw = connect(d.socket_path, timeout=10)
            r = pb.Response.FromString(read_frame(raw))
            assert r.error.code == pb.Error.STATE and "limit" in r.error.message
            assert closed(raw, timeout=5)
            raw.close()
            print(f"fifth connection: {r.error.message!r}")
            # The four admitted ones are served as before.
            assert all(c.server_stats()["connections"] == 4 for c in clients)
            # One leaves: a new client gets its place (once the daemon has seen the close).
            clients.pop().close()
            deadline = time.monotonic() + 10
            while True:
                try:
                    clients.append(Client(d.socket_path, timeout=30))
                    break
                except RemoteError as e:
                    if e.code != "STATE" or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            assert clients[-1].server_stats()["connections"] == 4
            for c in clients:
                c.close()
            assert "reason=max_connections" in d.log_path.read_text()
            assert d.alive()
        finally:
            d.stop()
        assert d.process.returncode == 0
