"""Every response the proxy makes itself, on the wire: framed exactly as HTTP requires.

One kept-alive connection walks every refusal path with GET and then HEAD, and the bytes are read
by a strict parser: a HEAD answer has headers only (its Content-Length is what the GET's body
was), every other answer has exactly Content-Length bytes, and nothing else ever arrives. A body
on a HEAD answer is what broke containerd's resolver on kept-alive connections.
"""

from __future__ import annotations

import json
import socket
import threading

import pytest
import yaml

from localregistry import free_port
from proxyproc import ProxyProcess, basic, connector, write_manifests

IO_TIMEOUT = 20.0
QUIET = 0.3  # how long a connection must stay silent between answers (no stray bytes)


class Hanging:
    """A "registry" that accepts connections and never answers: the 504 case."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.conns = []
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        self.sock.settimeout(0.5)
        while not self.stop.is_set():
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                continue

    @property
    def url(self):
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self):
        self.stop.set()
        for c in self.conns:
            c.close()
        self.sock.close()


def read_head(conn: socket.socket, buf: bytearray) -> tuple[str, list[tuple[str, str]]]:
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a complete head: {bytes(buf)!r}")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    buf[:] = rest
    lines = head.decode("latin-1").split("\r\n")
    return lines[0], [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:]]


def exchange(conn: socket.socket, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict, bytes]:
    request = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    conn.sendall(request.encode())
    buf = bytearray()
    status_line, header_list = read_head(conn, buf)
    status = int(status_line.split()[1])
    hdrs = {k.lower(): v for k, v in header_list}
    if method == "HEAD" or status in (204, 304):
        body = b""
    else:
        assert "content-length" in hdrs, f"{method} {path}: {status} without Content-Length"
        want = int(hdrs["content-length"])
        while len(buf) < want:
            chunk = conn.recv(65536)
            assert chunk, f"{method} {path}: body cut short"
            buf += chunk
        body, buf = bytes(buf[:want]), buf[want:]
    assert not buf, f"{method} {path}: {len(buf)} stray bytes after the answer: {bytes(buf)[:80]!r}"
    conn.settimeout(QUIET)
    try:
        stray = conn.recv(65536)
        assert not stray, f"{method} {path}: stray bytes after the answer: {stray[:80]!r}"
        raise AssertionError(f"{method} {path}: the proxy closed a kept-alive connection")
    except TimeoutError:
        pass
    finally:
        conn.settimeout(IO_TIMEOUT)
    return status, hdrs, body


@pytest.fixture(scope="module")
def framing_proxy(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("framing")
    hanging = Hanging()
    connectors = tmp / "connectors"
    # The world's connectors, plus one whose registry never answers.
    for f in world.connectors_dir.glob("*.yaml"):
        (connectors).mkdir(exist_ok=True)
        (connectors / f.name).write_text(f.read_text())
    write_manifests(connectors, "hanging.yaml", [connector("default", "hanging", hanging.url)])
    forward_port = free_port()
    proxy = ProxyProcess(tmp, connectors, world.tokens_file, extra=(
        "--set", "upstream_timeout=2",
    ))
    proxy.source = (*proxy.source, "--forward-listen", f"127.0.0.1:{forward_port}", "--ca-dir", str(tmp / "ca"))
    proxy.start()
    proxy.forward_port = forward_port
    yield proxy
    proxy.stop()
    hanging.close()


M = "/v2/namespaces/{ns}/connectors/{name}/test/abc/manifests/v1"


def refusal_cases(world):
    builder, team = basic("x", world.builder_token), basic("x", world.team_token)
    return [
        # (expected status, registry code, path, Authorization)
        (401, "UNAUTHORIZED", M.format(ns="default", name="harbor"), None),
        (401, "UNAUTHORIZED", M.format(ns="default", name="harbor"), basic("x", "wrong-token")),
        (403, "DENIED", M.format(ns="default", name="harbor"), team),
        (404, "NAME_UNKNOWN", M.format(ns="default", name="nope"), builder),
        (404, "NAME_UNKNOWN", "/v2/no-connector-named/manifests/v1", builder),
        (400, "NAME_INVALID", "/v2/namespaces/default/connectors/harbor/UPPER/manifests/v1", builder),
        (400, "NAME_INVALID", "/v2/namespaces/default/connectors/harbor/a/../b/manifests/v1", builder),
        (502, "UNAVAILABLE", M.format(ns="default", name="down"), builder),
        (503, "UNAVAILABLE", M.format(ns="default", name="broken"), builder),
        (504, "UNAVAILABLE", M.format(ns="default", name="hanging"), builder),
        (405, "UNSUPPORTED", "/.connectors/config?use=default/harbor", builder),  # HEAD is allowed there
        (401, "UNAUTHORIZED", "/v2/", None),
    ]


def test_every_refusal_is_framed_on_one_kept_alive_connection(world, framing_proxy):
    cases = refusal_cases(world)
    with socket.create_connection(("127.0.0.1", framing_proxy.port), timeout=IO_TIMEOUT) as conn:
        seen = []
        for status, code, path, auth in cases:
            headers = {"Host": framing_proxy.host, **({"Authorization": auth} if auth else {})}
            get_method = "POST" if status == 405 else "GET"
            got, hdrs, body = exchange(conn, get_method, path, {**headers, "Content-Length": "0"})
            assert got == status, (path, got, body)
            assert hdrs["content-type"].startswith("application/json"), (path, hdrs)
            assert hdrs.get("docker-distribution-api-version") == "registry/2.0", (path, hdrs)
            assert json.loads(body)["errors"][0]["code"] == code, (path, body)
            if status == 401:
                assert hdrs["www-authenticate"].startswith("Bearer realm="), hdrs
            if status == 405:
                seen.append(status)
                continue
            got, head_hdrs, head_body = exchange(conn, "HEAD", path, headers)
            assert got == status and head_body == b""
            assert int(head_hdrs["content-length"]) == len(body), (path, head_hdrs)
            seen.append(status)
        # The connection is still good for a real answer.
        got, _, body = exchange(conn, "GET", "/healthz", {"Host": framing_proxy.host})
        assert got == 200 and body == b"ok\n"
    assert sorted(set(seen)) == [400, 401, 403, 404, 405, 502, 503, 504]


def test_every_answer_the_proxy_makes_itself_is_framed(world, framing_proxy):
    """Not only refusals: the ping, the token endpoint, the config endpoint, health and metrics,
    GET then HEAD on one kept-alive connection (a HEAD answer has the GET's length and no body)."""
    builder = basic("x", world.builder_token)
    token_path = "/.connectors/token?service=default/harbor&scope=repository:namespaces/default/connectors/harbor/a:pull"
    cases = [
        ("/v2/", builder, ("GET", "HEAD")),
        ("/v2/namespaces/default/connectors/harbor/", builder, ("GET", "HEAD")),
        ("/.connectors/config?use=default/harbor&names=registry-config&format=json", builder, ("GET", "HEAD")),
        ("/healthz", None, ("GET", "HEAD")),
        ("/readyz", None, ("GET", "HEAD")),
        ("/metrics", None, ("GET", "HEAD")),
        (token_path, builder, ("GET",)),  # the token endpoint answers GET and POST
    ]
    with socket.create_connection(("127.0.0.1", framing_proxy.port), timeout=IO_TIMEOUT) as conn:
        for path, auth, methods in cases:
            headers = {"Host": framing_proxy.host, **({"Authorization": auth} if auth else {})}
            length = None
            for method in methods:
                got, hdrs, body = exchange(conn, method, path, headers)
                assert got == 200, (method, path, got, body)
                if method == "GET":
                    length = len(body)
                    assert int(hdrs["content-length"]) == length
                elif path == "/metrics":  # its counters moved with the GET: a length, no body
                    assert body == b"" and int(hdrs["content-length"]) > 0, (path, hdrs)
                else:
                    assert body == b"" and int(hdrs["content-length"]) == length, (path, hdrs)
        # The token endpoint's POST form, kept alive too.
        form = f"grant_type=password&username=x&password={world.builder_token}&service=default/harbor".encode()
        conn.sendall(b"POST /.connectors/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: " + str(len(form)).encode() + b"\r\n\r\n" + form)
        buf = bytearray()
        status_line, hdr_list = read_head(conn, buf)
        hdrs = {k.lower(): v for k, v in hdr_list}
        assert status_line.split()[1] == "200"
        while len(buf) < int(hdrs["content-length"]):
            buf += conn.recv(65536)
        assert "token" in json.loads(bytes(buf))
        got, _, body = exchange(conn, "GET", "/healthz", {"Host": framing_proxy.host})
        assert got == 200 and body == b"ok\n"


def test_forward_listener_refusals_are_framed(world, framing_proxy):
    """407 (no or malformed Proxy-Authorization) and 403 on the forward listener, kept alive."""
    with socket.create_connection(("127.0.0.1", framing_proxy.forward_port), timeout=IO_TIMEOUT) as conn:
        target = f"http://{world.registry.host}/v2/"
        for method in ("GET", "HEAD"):
            got, hdrs, body = exchange(conn, method, target, {"Host": world.registry.host})
            assert got == 407 and "proxy-authenticate" in hdrs
            if method == "GET":
                assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
                length = len(body)
            else:
                assert int(hdrs["content-length"]) == length


def test_http10_keep_alive_is_kept(world, framing_proxy):
    """ApacheBench -k: HTTP/1.0 with `Connection: Keep-Alive` (any case) keeps the connection."""
    auth = basic("x", world.builder_token)
    with socket.create_connection(("127.0.0.1", framing_proxy.port), timeout=IO_TIMEOUT) as conn:
        for _ in range(3):
            for path in ("/healthz", M.format(ns="default", name="nope")):
                req = (f"GET {path} HTTP/1.0\r\nConnection: Keep-Alive\r\nHost: x\r\n"
                       f"Authorization: {auth}\r\n\r\n").encode()
                conn.sendall(req)
                buf = bytearray()
                status_line, hdrs = read_head(conn, buf)
                h = {k.lower(): v for k, v in hdrs}
                assert h.get("connection", "").lower() == "keep-alive", (path, h)
                want = int(h["content-length"])
                while len(buf) < want:
                    buf += conn.recv(65536)
                assert len(buf) == want


def test_http2_prior_knowledge_is_asked_to_use_http11(framing_proxy):
    """mitmproxy cannot serve h2c with prior knowledge (it would read the preface as an HTTP/1
    request and answer 404): the listener answers with SETTINGS and GOAWAY(HTTP_1_1_REQUIRED)."""
    with socket.create_connection(("127.0.0.1", framing_proxy.port), timeout=IO_TIMEOUT) as conn:
        conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        answer = b""
        while chunk := conn.recv(4096):
            answer += chunk
    assert answer[:9] == b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # SETTINGS
    goaway = answer[9:]
    assert goaway[3] == 0x07 and goaway[-4:] == b"\x00\x00\x00\x0d"  # GOAWAY, HTTP_1_1_REQUIRED
    assert not answer.startswith(b"HTTP/1.1")
