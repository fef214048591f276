"""Starts graftd on a temporary Unix socket and a loopback port for the daemon tests.

$GRAFTD names the daemon binary (default: the checkout's .build/release/graftd); PYTHONPATH must reach
bindings/python (make test-daemon sets both).
"""
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GRAFTD = os.environ.get("GRAFTD") or str(ROOT / ".build" / "release" / "graftd")
TOKEN = "test-token-0123456789"


# The hostile-peer tests' graftd answers a peer that has not said hello, or not finished a frame, after this many
# seconds (--hello-timeout, --frame-timeout); SLACK is what the tests allow on top for scheduling on a busy machine.
SHORT_TIMEOUT = 2.0
SLACK = 1.5


class Daemon:
    """A running graftd: its socket path, TCP port, token, log file and process. Its working directory is
    `directory` (relative paths in requests resolve there)."""

    def __init__(self, directory, extra_args=()):
        self.directory = Path(directory)
        self.socket_path = str(self.directory / "graftd.sock")
        token_file = self.directory / "token"
        token_file.write_text(TOKEN + "\n")
        self.token = TOKEN
        self.log_path = self.directory / "graftd.log"
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [GRAFTD, "--socket", self.socket_path, "--port", "0", "--token-file", str(token_file), "--threads", "2",
             *extra_args],
            stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=self.directory)
        line = self.process.stdout.readline()
        if "listening" not in line:
            self.process.kill()
            raise RuntimeError(f"graftd did not start: {line!r}; log: {self.log_path.read_text()}")
        self.port = int(line.rsplit(":", 1)[1])

    def alive(self):
        return self.process.poll() is None

    def stop(self):
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture(scope="session")
def daemon():
    if not Path(GRAFTD).exists():
        pytest.fail(f"no graftd binary at {GRAFTD}: build it with `swift build -c release --product graftd`")
    directory = tempfile.mkdtemp(prefix="graftd-test-")
    d = Daemon(directory)
    yield d
    d.stop()
    assert d.process.returncode == 0, f"graftd exited with {d.process.returncode}; log in {d.log_path}"
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def strict_daemon():
    """A graftd with short hello and frame timeouts (SHORT_TIMEOUT seconds) for the hostile-peer tests."""
    directory = tempfile.mkdtemp(prefix="graftd-strict-")
    timeout = str(SHORT_TIMEOUT)
    d = Daemon(directory, ["--frame-timeout", timeout, "--hello-timeout", timeout])
    yield d
    d.stop()
    assert d.process.returncode == 0, f"graftd exited with {d.process.returncode}; log in {d.log_path}"
    shutil.rmtree(directory, ignore_errors=True)


def connect(path, timeout=30):
    """A raw Unix-socket connection to `path` (no hello). A full listen backlog (EAGAIN: the daemon has not yet
    accepted the connections made just before) is retried for up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(path)
            return s
        except BlockingIOError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@pytest.fixture
def raw(daemon):
    """A raw Unix-socket connection (no hello) for hostile-input tests."""
    s = connect(daemon.socket_path)
    yield s
    s.close()


def frame(body):
    return struct.pack("<I", len(body)) + body


def read_frame(sock):
    """One response frame's body, or None when the daemon closed the connection."""
    header = b""
    while len(header) < 4:
        chunk = sock.recv(4 - len(header))
        if not chunk:
            return None
        header += chunk
    (n,) = struct.unpack("<I", header)
    body = b""
    while len(body) < n:
        chunk = sock.recv(n - len(body))
        if not chunk:
            return None
        body += chunk
    return body


def closed(sock, timeout=10):
    """True when the peer closes the connection within `timeout` seconds (remaining bytes are drained)."""
    sock.settimeout(timeout)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    return False


ASSETS = Path(os.environ.get("GRAFT_HOME") or Path.home() / ".cache" / "graft")
MINILM = ASSETS / "all-MiniLM-L6-v2"
PYTHON = sys.executable
