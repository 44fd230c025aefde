"""Servers and raw clients for the security suite: everything on loopback, every wait bounded.

- `TcpSink`: "any host and port" a relay could be abused to reach; records every connection and byte.
- `CountingProxy`: a TCP forwarder in front of a real registry; records every byte the proxy sent it,
  so a test can prove that nothing (or only the authorized request) reached the registry.
- `HostileServer`: a small threaded HTTP server standing for a hostile registry, token server or
  storage host. Behaviour is plugged in per path prefix (`/<case>/...`), so one server serves every
  case of a module and each case is a connector `http://HOST:PORT/<case>` of its own.
- `RawConn` / `raw_exchange` / `request_bytes`: HTTP over a plain socket, byte for byte (no client
  library normalises the request line, the headers or their encoding); `h2_prior_knowledge` for
  cleartext HTTP/2 with the preface.
- `RealRegistry`: the real distribution registry and token server behind a `CountingProxy`;
  `start_proxy`: the real proxy subprocess (tests/proxyproc.py) with its own log and flow file.
- `leaks`, `basic_form`, `memory_kib`: what the assertions search for and measure.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LOOPBACK = "127.0.0.1"
IO_TIMEOUT = 10.0  # any single socket read or write in these helpers
HANG_LIMIT = 60.0  # the longest a "hanging" server thread waits before giving up on its own
MAX_RAW_BODY = 8 * 1024 * 1024  # what RawConn keeps of one response body


# ----------------------------------------------------------------------------- raw HTTP client


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes = b""
    complete: bool = True  # False: the connection closed or stalled before the announced end of the body
    stalled: bool = False  # the body stopped arriving and our read timed out (the server neither sent nor closed)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def everything(self) -> bytes:
        """Status line, headers and body: what a leak search covers."""
        return self.raw_head + self.body

    def json(self):
        return json.loads(self.body)


class RawConn:
    """One client connection to speak raw HTTP/1.x (or anything else) over."""

    def __init__(self, port: int, host: str = LOOPBACK, timeout: float = IO_TIMEOUT,
                 tls_context: ssl.SSLContext | None = None, server_hostname: str | None = None):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        if tls_context is not None:
            self.sock = tls_context.wrap_socket(self.sock, server_hostname=server_hostname or host)
        self.reader = self.sock.makefile("rb")
        self._short = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_response(self, method: str = "GET", max_body: int = MAX_RAW_BODY) -> RawResponse | None:
        """One final response (interim 1xx answers other than 101 are skipped), or None when the
        server closed the connection without answering.

        Bodies longer than `max_body` are read to the end (bounded by the socket timeout) but only
        their first `max_body` bytes are kept.
        """
        for _ in range(10):
            resp = self._read_one(method, max_body)
            if resp is None or not (100 <= resp.status < 200) or resp.status == 101:
                return resp
        return resp

    def _read_one(self, method: str, max_body: int) -> RawResponse | None:
        try:
            line = self.reader.readline(65536)
        except (ConnectionError, socket.timeout, ssl.SSLError, OSError):
            return None
        if not line:
            return None
        head = bytearray(line)
        parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            rest = self._read_until_close(max_body)
            return RawResponse(0, line.decode("latin-1"), [], rest, bytes(head))
        status = int(parts[1])
        headers: list[tuple[str, str]] = []
        for _ in range(1000):
            h = self.reader.readline(1024 * 1024)
            head += h
            if h in (b"\r\n", b"\n", b""):
                break
            name, _, value = h.decode("latin-1").partition(":")
            headers.append((name.strip(), value.strip()))
        resp = RawResponse(status, parts[2] if len(parts) > 2 else "", headers, b"", bytes(head))
        if (method.upper() == "HEAD" or status in (204, 304) or 100 <= status < 200
                or (method.upper() == "CONNECT" and 200 <= status < 300)):  # a tunnel: no body
            return resp
        te = (resp.header("transfer-encoding") or "").lower()
        self._short = False
        try:
            if "chunked" in te:
                resp.body = self._read_chunked(max_body)
            elif resp.header("content-length") is not None:
                resp.body = self._read_exact(int(resp.header("content-length")), max_body)
            else:
                resp.body = self._read_until_close(max_body)
        except (socket.timeout, TimeoutError):
            resp.complete, resp.stalled = False, True
        except (ConnectionError, OSError):
            resp.complete = False
        if self._short:
            resp.complete = False
        return resp

    def _read_exact(self, n: int, keep: int) -> bytes:
        out = bytearray()
        remaining = n
        while remaining > 0:
            chunk = self.reader.read1(min(remaining, 1024 * 1024))
            if not chunk:
                self._short = True
                break
            remaining -= len(chunk)
            if len(out) < keep:
                out += chunk[: keep - len(out)]
        return bytes(out)

    def _read_chunked(self, keep: int) -> bytes:
        out = bytearray()
        for _ in range(1_000_000):
            size_line = self.reader.readline(1024)
            if not size_line:
                self._short = True
                break
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                for _ in range(100):  # trailers
                    if self.reader.readline(65536) in (b"\r\n", b"\n", b""):
                        break
                break
            data = self._read_exact(size, keep - len(out) if len(out) < keep else 0)
            out += data
            self.reader.readline(16)
        return bytes(out)

    def _read_until_close(self, keep: int) -> bytes:
        out = bytearray()
        try:
            for _ in range(1_000_000):
                chunk = self.reader.read1(1024 * 1024)
                if not chunk:
                    break
                if len(out) < keep:
                    out += chunk[: keep - len(out)]
        except (ConnectionError, socket.timeout, OSError):
            pass
        return bytes(out)

    def close(self) -> None:
        for c in (self.reader, self.sock):
            try:
                c.close()
            except OSError:
                pass

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def raw_exchange(port: int, data: bytes, method: str = "GET", timeout: float = IO_TIMEOUT,
                 max_body: int = MAX_RAW_BODY) -> RawResponse | None:
    with RawConn(port, timeout=timeout) as c:
        try:
            c.send(data)
        except OSError:
            pass  # the server may answer (and close) before it has read everything
        return c.read_response(method, max_body)


def request_bytes(method: str, target: str | bytes, headers: Iterable[tuple[str, str | bytes]] = (),
                  version: str = "HTTP/1.1", body: bytes = b"") -> bytes:
    """A request exactly as given: header values may be raw bytes (invalid UTF-8, controls)."""
    out = bytearray(f"{method} {target} {version}\r\n".encode("latin-1") if isinstance(target, str)
                    else method.encode() + b" " + target + b" " + version.encode() + b"\r\n")
    for name, value in headers:
        out += name.encode("latin-1") + b": " + (value if isinstance(value, bytes) else value.encode("latin-1")) + b"\r\n"
    if body:
        out += f"Content-Length: {len(body)}\r\n".encode()
    out += b"\r\n" + body
    return bytes(out)


def is_registry_error(resp: RawResponse | None, status: int | None = None) -> bool:
    """`{"errors":[{"code":..,"message":..}]}` with a JSON content type (and the given status)."""
    if resp is None or (status is not None and resp.status != status):
        return False
    if not (resp.header("content-type") or "").startswith("application/json"):
        return False
    try:
        errors = resp.json()["errors"]
        return bool(errors) and all(isinstance(e.get("code"), str) and isinstance(e.get("message"), str)
                                    for e in errors)
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def describe(resp: RawResponse | None) -> str:
    if resp is None:
        return "no response (connection closed)"
    state = "" if resp.complete else (" [body stalled]" if resp.stalled else " [body cut short]")
    return f"{resp.status} {resp.reason}{state} {resp.headers} {resp.body[:400]!r}"


# ----------------------------------------------------------------------------- listeners


class _Listener:
    """A loopback TCP listener with an accept thread; subclasses handle connections."""

    name = "listener"

    def __init__(self, host: str = LOOPBACK, tls: ssl.SSLContext | None = None):
        self.host = host
        self.tls = tls
        self._sock: socket.socket | None = None
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        assert self._sock is not None
        return self._sock.getsockname()[1]

    def start(self):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((self.host, 0))
        self._sock.listen(128)
        t = threading.Thread(target=self._accept_loop, name=f"{self.name}-{self.port}", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed by stop()
            with self.lock:
                self._conns.append(conn)
            t = threading.Thread(target=self._guarded, args=(conn,), daemon=True)
            t.start()

    def _guarded(self, conn: socket.socket) -> None:
        try:
            self.handle(conn)
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stopped.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        with self.lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class TcpSink(_Listener):
    """Stands for any host and port: counts connections, keeps the bytes, answers like a web server."""

    name = "sink"
    REPLY = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\nConnection: close\r\n\r\nsink reached"

    def __init__(self, host: str = LOOPBACK, tls: ssl.SSLContext | None = None):
        super().__init__(host, tls)
        self.accepted = 0
        self.barriers = 0
        self.data = bytearray()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1  # counted in accept order: see barrier()
                self._conns.append(conn)
            threading.Thread(target=self._guarded, args=(conn,), daemon=True).start()

    @property
    def connections(self) -> int:
        """Connections from anybody but barrier()."""
        with self.lock:
            return self.accepted - self.barriers

    def barrier(self) -> int:
        """Connect and get an answer ourselves: every connection made before is counted by then
        (the kernel hands out pending connections in order). Returns `connections`."""
        with RawConn(self.port, host=self.host) as c:
            c.send(b"BARRIER / HTTP/1.1\r\nHost: barrier\r\n\r\n")
            c.read_response()
        with self.lock:
            self.barriers += 1
        return self.connections

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(IO_TIMEOUT)
        if self.tls is not None:
            conn = self.tls.wrap_socket(conn, server_side=True)
        buf = bytearray()
        for _ in range(10_000):
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
            if not buf.startswith(b"BARRIER "):
                with self.lock:
                    self.data += chunk
            if b"\r\n\r\n" in buf or b"\n\n" in buf:
                conn.sendall(self.REPLY)
                return

class CountingProxy(_Listener):
    """A TCP forwarder to `target`; keeps every byte sent towards the target."""

    name = "counting-proxy"

    def __init__(self, target_port: int, target_host: str = LOOPBACK):
        super().__init__()
        self.target = (target_host, target_port)
        self.connections = 0
        self.data = bytearray()

    def handle(self, conn: socket.socket) -> None:
        with self.lock:
            self.connections += 1
        upstream = socket.create_connection(self.target, timeout=IO_TIMEOUT)
        with self.lock:
            self._conns.append(upstream)
        conn.settimeout(None)
        upstream.settimeout(None)

        def pump(src: socket.socket, dst: socket.socket, record: bool) -> None:
            try:
                while True:
                    chunk = src.recv(256 * 1024)
                    if not chunk:
                        break
                    if record:
                        with self.lock:
                            self.data += chunk
                    dst.sendall(chunk)
            except OSError:
                pass
            finally:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        back = threading.Thread(target=pump, args=(upstream, conn, False), daemon=True)
        back.start()
        pump(conn, upstream, True)
        back.join(timeout=HANG_LIMIT)
        upstream.close()

    def block(self) -> None:
        """From now on new connections hang in the kernel's connect (the listen queue is kept full,
        so their SYNs are dropped and retried) until `release()`; established ones carry on."""
        assert self._sock is not None
        host, port = self._sock.getsockname()
        self._stopped.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(0)
        self._fillers = []
        for _ in range(8):  # fill the accept queue (nobody accepts until release()), until a connect stalls
            f = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            f.settimeout(0.2)
            self._fillers.append(f)
            try:
                f.connect((host, port))
            except (socket.timeout, TimeoutError):
                break  # full: the next connect (the proxy's) stalls too
        else:
            raise RuntimeError("could not fill the listen queue: connects do not stall on this system")
        self._sock = sock

    def release(self) -> None:
        """Accept again: the stalled connects complete at their next SYN retry (about a second)."""
        if not self._stopped.is_set():
            return  # not blocked
        for f in getattr(self, "_fillers", []):
            f.close()
        self._fillers = []
        self._stopped.clear()
        t = threading.Thread(target=self._accept_loop, name=f"{self.name}-{self.port}", daemon=True)
        t.start()
        self._threads.append(t)

    def saw(self, marker: str | bytes) -> bool:
        m = marker.encode() if isinstance(marker, str) else marker
        with self.lock:
            return m in self.data

    def snapshot(self) -> tuple[int, int]:
        with self.lock:
            return self.connections, len(self.data)


# ----------------------------------------------------------------------------- hostile HTTP server


@dataclass
class Request:
    """What a hostile server received."""

    method: str
    path: str  # as sent, with the query
    headers: list[tuple[str, str]]
    body: bytes
    host: str  # the Host header

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


@dataclass
class Reply:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | Iterator[bytes] = b""
    length: int | None = None  # Content-Length for a streamed body (None: close-delimited)
    hang_after: bytes | None = None  # send the headers and these bytes, then stall (bounded)


Handler = Callable[[Request, str], Reply]  # (request, path below the case prefix) -> reply


def json_reply(status: int, doc, headers: list[tuple[str, str]] | None = None) -> Reply:
    return Reply(status, [("Content-Type", "application/json"), *(headers or [])], json.dumps(doc).encode())


def filler(total: int, chunk: int = 1024 * 1024) -> Iterator[bytes]:
    """`total` bytes of filler, generated a chunk at a time (never held whole)."""
    block = (b"hostile-filler-" * (chunk // 15 + 1))[:chunk]
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        yield block[:n]
        sent += n


class HostileServer:
    """A threaded HTTP/1.1 server; `route(prefix, handler)` plugs a behaviour in under `/<prefix>/`.

    Requests to unknown prefixes get 404. Everything received is kept in `requests`.
    """

    def __init__(self, tls: tuple[Path, Path] | None = None, public_host: str = LOOPBACK,
                 default: Handler | None = None):
        """`default` answers requests to unknown prefixes (else a 404)."""
        self.tls = tls
        self.public_host = public_host
        self.default = default
        self.routes: dict[str, Handler] = {}
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.release = threading.Event()  # set on stop: every hanging handler returns
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return self._httpd.server_address[1]

    @property
    def origin(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.public_host}:{self.port}"

    def url(self, prefix: str) -> str:
        return f"{self.origin}/{prefix}"

    def route(self, prefix: str, handler: Handler) -> str:
        self.routes[prefix] = handler
        return self.url(prefix)

    def received(self, prefix: str | None = None) -> list[Request]:
        with self.lock:
            reqs = list(self.requests)
        if prefix is None:
            return reqs
        return [r for r in reqs if r.path == f"/{prefix}" or r.path.startswith(f"/{prefix}/")
                or r.path.startswith(f"/{prefix}?")]

    def everything_received(self) -> bytes:
        with self.lock:
            reqs = list(self.requests)
        return b"\n".join(
            f"{r.method} {r.path}\n".encode("utf-8", "surrogateescape")
            + "".join(f"{k}: {v}\n" for k, v in r.headers).encode("utf-8", "surrogateescape") + r.body
            for r in reqs)

    def start(self) -> HostileServer:
        server = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = IO_TIMEOUT

            def log_message(self, *args) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(min(length, 64 * 1024 * 1024)) if length else b""
                req = Request(self.command, self.path, list(self.headers.items()), body,
                              self.headers.get("Host", ""))
                with server.lock:
                    server.requests.append(req)
                prefix, _, rest = self.path.lstrip("/").partition("/")
                prefix = prefix.split("?", 1)[0]
                handler = server.routes.get(prefix)
                if handler is not None:
                    reply = handler(req, "/" + rest)
                elif server.default is not None:
                    reply = server.default(req, self.path)
                else:
                    reply = json_reply(404, {"errors": [{"code": "NOT_FOUND", "message": "no such case"}]})
                self._send(reply)

            def _send(self, reply: Reply) -> None:
                self.send_response(reply.status)
                names = {k.lower() for k, _ in reply.headers}
                for k, v in reply.headers:
                    self.send_header(k, v)
                body = reply.body
                if reply.hang_after is not None:
                    if "content-length" not in names:
                        self.send_header("Content-Length", str(len(reply.hang_after) + 10_000_000))
                    self.end_headers()
                    self.wfile.write(reply.hang_after)
                    self.wfile.flush()
                    server.release.wait(HANG_LIMIT)  # the body never comes (until the test ends)
                    self.close_connection = True
                    return
                if isinstance(body, bytes):
                    if "content-length" not in names:
                        self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(body)
                    return
                if reply.length is not None:
                    self.send_header("Content-Length", str(reply.length))
                else:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                for chunk in body:
                    if server.release.is_set():
                        break
                    self.wfile.write(chunk)
                self.wfile.flush()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _any

        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(self.tls[0]), str(self.tls[1]))

            class TLSServer(ThreadingHTTPServer):
                def get_request(self):
                    sock, addr = super().get_request()
                    return ctx.wrap_socket(sock, server_side=True), addr

                def handle_error(self, request, client_address):
                    pass

            self._httpd = TLSServer((LOOPBACK, 0), H)
        else:
            class Quiet(ThreadingHTTPServer):
                def handle_error(self, request, client_address):
                    pass

            self._httpd = Quiet((LOOPBACK, 0), H)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True, name=f"hostile-{self.port}")
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)


# ----------------------------------------------------------------------------- leaks and memory


def basic_form(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def leaks(data: bytes, secrets: Iterable[str]) -> list[str]:
    """Which of `secrets` occur in `data` (shortened, so a failure message does not repeat them)."""
    return [f"{s[:6]}...({len(s)} chars)" for s in secrets if s and s.encode() in data]


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        m = re.match(r"^(VmRSS|VmHWM):\s+(\d+) kB", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


# ----------------------------------------------------------------------------- the proxy and a real registry


def write_tokens(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps({"tokens": entries}))
    return path


def start_proxy(workdir: Path, connectors_dir: Path, tokens_file: Path, *, forward_port: int | None = None,
                refuse_unknown: bool = False, web: bool = False, extra: tuple[str, ...] = ()):
    """The real proxy (a mitmdump subprocess) with its own log and flow file in `workdir`."""
    from proxyproc import ProxyProcess

    workdir.mkdir(parents=True, exist_ok=True)
    source: tuple[str, ...] = ("--connectors", str(connectors_dir), "--client-tokens", str(tokens_file))
    if forward_port:
        source += ("--forward-listen", f"{LOOPBACK}:{forward_port}", "--ca-dir", str(workdir / "ca"))
    if refuse_unknown:
        source += ("--refuse-unknown-hosts",)
    return ProxyProcess(workdir, None, None, source=source, extra=tuple(extra), web=web).start()


class RealRegistry:
    """The real distribution registry with token auth, behind a CountingProxy (what connectors use)."""

    def __init__(self, workdir: Path, users: dict[str, str]):
        from localregistry import Registry, TokenServer

        self.token_server = TokenServer("localregistry", users).start()
        self.registry = Registry(workdir, "token", token_server=self.token_server).start()
        self.counter = CountingProxy(self.registry.port).start()

    @property
    def url(self) -> str:
        """What a connector's spec.address names: the counting proxy."""
        return f"http://{LOOPBACK}:{self.counter.port}"

    def saw(self, marker: str) -> bool:
        """Whether anything naming `marker` reached the registry or its token server."""
        return self.counter.saw(marker) or any(
            marker in s for f in self.token_server.fetches for s in f.scopes)

    def stop(self) -> None:
        self.counter.stop()
        self.registry.stop()
        self.token_server.stop()


# ----------------------------------------------------------------------------- HTTP/2 prior knowledge


def h2_prior_knowledge(port: int, headers: list[tuple[bytes, bytes]], timeout: float = 5.0) -> tuple[list[int], bytes]:
    """Open a cleartext HTTP/2 connection with the preface (no Upgrade) and send one request.

    Returns the `:status` of every response the server sent (as HTTP/2 or, if it answered in
    HTTP/1.x, the status line) and the raw bytes it sent; ([], b"") when it just closed.
    """
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=True)
    raw = bytearray()
    statuses: list[int] = []
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        try:
            s.sendall(conn.data_to_send())
            for _ in range(1000):
                chunk = s.recv(65536)
                if not chunk:
                    break
                raw += chunk
                if raw.startswith(b"HTTP/1."):
                    continue  # an HTTP/1 answer: read it to the end (bounded by close or timeout)
                try:
                    events = conn.receive_data(chunk)
                except Exception:
                    break  # not HTTP/2 after all
                for ev in events:
                    if isinstance(ev, h2.events.ResponseReceived):
                        statuses += [int(v) for k, v in ev.headers if k == b":status"]
                    if isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)):
                        return statuses, bytes(raw)
                s.sendall(conn.data_to_send())
        except (OSError, socket.timeout):
            pass
    if raw.startswith(b"HTTP/1."):
        first = raw.split(b"\r\n", 1)[0].split(b" ")
        if len(first) > 1 and first[1].isdigit():
            statuses.append(int(first[1]))
    return statuses, bytes(raw)
