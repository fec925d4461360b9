"""Fixtures shared by the plugin test suites: free ports and a fault-injecting HTTP proxy.

The proxy sits on loopback between a client (s3fs, gcsfs) and a real server (moto, the GCS
emulator) and forwards every request, except those a rule says to answer with an error or to
cut off, so retries are exercised through the clients' real network stacks.
"""

from __future__ import annotations

import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import attrs
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, proc=None) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@attrs.define
class Fault:
    """Answer matching requests with ``status`` (or drop the connection when ``drop``).

    ``times`` is how many matching requests to spoil (None: all of them). With ``hold`` (an
    Event), a matching request waits until it is set, then goes to the server unchanged: a
    server that hangs for as long as the test wants. With ``unread``, a matching request gets
    no "100 Continue", its body is never read and it is never answered (until ``hold`` is set,
    when the connection is closed): a store that takes a request and then stops. With ``drip``
    (seconds), a matching request's answer comes from the server but is sent ``drip_bytes`` at a
    time, once every ``drip`` seconds (until ``hold`` is set, when the connection is closed): a store
    that never stops answering and never finishes. With ``flip``, a matching request's answer
    comes from the server with one bit of its body flipped: bytes damaged on their way.
    """

    match: Callable[[str, str], bool]
    status: int = 503
    body: bytes = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
    drop: bool = False
    times: int | None = 1
    hits: int = 0
    hold: threading.Event | None = None
    unread: bool = False
    drip: float | None = None
    drip_bytes: int = 1
    flip: bool = False


class FaultProxy:
    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        # (method, path, body bytes sent back) of each request answered by the server
        self.responses: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def handle_expect_100(self):
                # Decided here, once, when the client waits for leave to send its body.
                self.decided = [proxy._fault(self.command, self.path)]
                if self.decided[0] is not None and self.decided[0].unread:
                    return True
                return super().handle_expect_100()

            def _handle(self):
                decided, self.decided = getattr(self, "decided", None), None
                fault = decided[0] if decided is not None else proxy._fault(self.command, self.path)
                if fault is not None and fault.unread:
                    (fault.hold or threading.Event()).wait(120)
                    self.close_connection = True
                    return
                body = self._body()
                dripping = fault if fault is not None and fault.drip is not None else None
                flipping = fault if fault is not None and fault.flip else None
                if dripping is not None or flipping is not None:
                    fault = None
                if fault is not None and fault.hold is not None:
                    fault.hold.wait()
                    fault = None
                if fault is not None and fault.drop:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault is not None:
                    self.send_response(fault.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(fault.body)))
                    self.end_headers()
                    self.wfile.write(fault.body)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=120)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "content-length", "connection")}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if flipping is not None and data:
                    middle = len(data) // 2
                    data = data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1:]
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection", "server", "date"):
                        self.send_header(k, v)
                # A HEAD answer has no body but tells the size of the object it describes.
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if dripping is not None:
                    self.close_connection = True
                    for i in range(0, len(data), dripping.drip_bytes):
                        if (dripping.hold or threading.Event()).wait(dripping.drip):
                            return
                        self.wfile.write(data[i:i + dripping.drip_bytes])
                        self.wfile.flush()
                elif self.command != "HEAD":
                    self.wfile.write(data)
                with proxy.lock:
                    proxy.responses.append((self.command, self.path, 0 if self.command == "HEAD" else len(data)))

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            self.requests.append((method, path))
            for f in self.faults:
                if (f.times is None or f.hits < f.times) and f.match(method, path):
                    f.hits += 1
                    return f
        return None

    def add(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()
            self.requests.clear()
            self.responses.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def spawn_server():
    """Start a server process on a free port; return its port. Stopped at the end of the session."""
    import subprocess

    procs = []

    def spawn(argv_for_port: Callable[[int], list[str]], timeout: float = 60.0) -> int:
        port = free_port()
        proc = subprocess.Popen(argv_for_port(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        wait_for_port(port, timeout, proc)
        return port

    yield spawn
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except Exception:
            proc.kill()


@pytest.fixture
def make_fault_proxy():
    """Build a ``FaultProxy`` in front of a server port; closed after the test."""
    proxies = []

    def make(upstream_port: int) -> FaultProxy:
        p = FaultProxy(upstream_port)
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        p.close()


class _SilentPort(int):
    def __new__(cls, port: int, held: list):
        self = super().__new__(cls, port)
        self.held = held
        return self

    @property
    def accepted(self) -> int:
        return len(self.held)


@pytest.fixture
def silent_server():
    """A TCP server on loopback that accepts connections and never answers: a hung server. Its
    port, which also says how many connections it has accepted (``accepted``)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.settimeout(0.2)
    held, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield _SilentPort(sock.getsockname()[1], held)
    stop.set()
    thread.join(5)
    sock.close()
    for conn in held:
        conn.close()


@pytest.fixture
def in_thread():
    """``in_thread(call)``: ``call()`` on a thread, joined for at most 120 s (a hang fails the
    test, not the test run); returns ``(still running, outcome)``, the outcome being the return
    value or the exception."""

    def run(call: Callable[[], object]) -> tuple[bool, object]:
        outcome: list[object] = []

        def target() -> None:
            try:
                outcome.append(call())
            except Exception as exc:
                outcome.append(exc)

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(120)
        return thread.is_alive(), (outcome or [None])[0]

    return run
