"""Malformed client credentials on both listeners: refused in the registry's JSON format, nothing relayed.

Attacker review, finding 1 (open relay): `Proxy-Authorization: Basic <non-ASCII>` on the forward
listener made the credential check raise; mitmproxy logged the exception and carried on, relaying the
request (plain HTTP, CONNECT, raw TCP through the tunnel) to any host and port without a token, even
with `--refuse-unknown-hosts`. Finding 2: the same garbage (and invalid UTF-8, control characters,
`Bearer \\xff`, 1 MB values, empty or colon-less Basic, many headers) on either listener.

Correct: `401` (reverse, with a challenge) or `407` (forward, with `Proxy-Authenticate`) as
`{"errors":[{"code","message"}]}`; nothing reaches the registry or the "any host" target (a loopback
listener that counts connections); the proxy keeps serving, so a valid request right after succeeds.
Every header value is sent as raw bytes over a socket: no client library re-encodes it.
"""

from __future__ import annotations

import base64
import secrets
import select
import time
from collections.abc import Callable

import pytest

from localregistry import free_port
from proxyproc import connector, secret, write_manifests

from .hostile import (
    RawConn,
    RealRegistry,
    TcpSink,
    describe,
    is_registry_error,
    leaks,
    raw_exchange,
    request_bytes,
    start_proxy,
    write_tokens,
)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# (id, values(user, valid token) -> the header's values, raw bytes). `user` is "x" on the reverse
# listener and "default/harbor" (the connector list) on the forward one, so a variant that wraps the
# valid token is otherwise well-formed for the listener it is sent to.
MALFORMED: list[tuple[str, Callable[[str, str], list[bytes]]]] = [
    ("basic-non-ascii", lambda u, t: ["Basic é".encode()]),
    ("basic-valid-base64-then-non-ascii", lambda u, t: [b"Basic " + b64(f"{u}:{t}".encode()) + "é".encode()]),
    ("basic-invalid-utf8-bytes", lambda u, t: [b"Basic \xff\xfe\xfd"]),
    ("basic-base64-of-invalid-utf8", lambda u, t: [b"Basic " + b64(f"{u}:{t}".encode() + b"\xff")]),
    ("bearer-invalid-utf8-byte", lambda u, t: [b"Bearer \xff"]),
    ("bearer-non-ascii", lambda u, t: ["Bearer tökén".encode()]),
    ("bearer-valid-token-then-non-ascii", lambda u, t: [b"Bearer " + t.encode() + "é".encode()]),
    ("bearer-control-characters", lambda u, t: [b"Bearer ab\x01\x02\x1bcd"]),
    ("bearer-valid-token-then-nul", lambda u, t: [b"Bearer " + t.encode() + b"\x00"]),
    ("basic-control-characters-in-token", lambda u, t: [b"Basic " + b64(f"{u}:{t}\x01\x7f".encode())]),
    ("bearer-1mb", lambda u, t: [b"Bearer " + b"A" * (1024 * 1024)]),
    ("basic-1mb", lambda u, t: [b"Basic " + b64(u.encode() + b":" + b"A" * (768 * 1024))]),
    ("basic-empty", lambda u, t: [b"Basic "]),
    ("basic-scheme-only", lambda u, t: [b"Basic"]),
    ("basic-without-colon", lambda u, t: [b"Basic " + b64(t.encode())]),
    ("basic-empty-token", lambda u, t: [b"Basic " + b64(f"{u}:".encode())]),
    ("bearer-empty", lambda u, t: [b"Bearer "]),
    ("many-headers", lambda u, t: [b"Bearer junk-%d" % i for i in range(200)]),
    ("garbage-header-then-valid-header", lambda u, t: [b"Basic \xff", b"Basic " + b64(f"{u}:{t}".encode())]),
]
MALFORMED_IDS = [m[0] for m in MALFORMED]

REVERSE_FORMS = ["path", "host", "ping"]  # path form, host form, the shared-host /v2/ ping
FORWARD_MODES = ["http", "connect-http", "connect-raw"]  # absolute-form request; CONNECT then HTTP or raw bytes
FORWARD_LISTENERS = ["refuse-unknown", "tunnel-unknown"]


class World:
    def __init__(self, tmp):
        self.password = "mal-pw-" + secrets.token_hex(10)
        self.token = "mal-client-" + secrets.token_hex(12)
        self.registry = RealRegistry(tmp / "registry", {"pusher": self.password})
        self.sink = TcpSink().start()
        write_manifests(tmp / "connectors", "c.yaml", [
            connector("default", "harbor", self.registry.url, "harbor-secret"),
            secret("default", "harbor-secret", "pusher", self.password),
        ])
        write_tokens(tmp / "tokens.yaml", [{"token": self.token, "subject": "ci:builder", "connectors": ["default/harbor"]}])
        self.proxies = {}
        self.forward_ports = {}
        for name, refuse in (("refuse-unknown", True), ("tunnel-unknown", False)):
            self.forward_ports[name] = free_port()
            self.proxies[name] = start_proxy(tmp / name, tmp / "connectors", tmp / "tokens.yaml",
                                             forward_port=self.forward_ports[name], refuse_unknown=refuse)
        self.reverse = self.proxies["refuse-unknown"]

    @property
    def secrets(self) -> list[str]:
        return [self.password, self.token, base64.b64encode(f"pusher:{self.password}".encode()).decode(),
                *self.registry.token_server.issued_tokens]

    def stop(self) -> None:
        for p in self.proxies.values():
            p.stop()
        self.sink.stop()
        self.registry.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("malformed"))
    yield w
    w.stop()


def marker() -> str:
    return "m" + secrets.token_hex(6)


def alive(proxy) -> None:
    assert proxy.proc.poll() is None, f"the proxy died:\n{proxy.output()[-3000:]}"


def reverse_still_serves(world) -> None:
    m = marker()
    path = f"/v2/namespaces/default/connectors/harbor/sec/{m}/tags/list"
    valid = "Basic " + b64(f"x:{world.token}".encode()).decode()
    resp = raw_exchange(world.reverse.port, request_bytes("GET", path, [("Host", world.reverse.host), ("Authorization", valid)]))
    # the repository does not exist: the registry's own 404 proves the request went all the way
    assert resp is not None and resp.status == 404 and world.registry.saw(m), \
        f"a valid request right after was not served: {describe(resp)}"


def forward_still_serves(world, listener: str) -> None:
    m = marker()
    target = f"{world.registry.url}/v2/sec/{m}/tags/list"
    valid = "Basic " + b64(f"default/harbor:{world.token}".encode()).decode()
    resp = raw_exchange(world.forward_ports[listener], request_bytes(
        "GET", target, [("Host", world.registry.url.removeprefix("http://")), ("Proxy-Authorization", valid)]))
    assert resp is not None and resp.status == 404 and world.registry.saw(m), \
        f"a valid forward request right after was not served: {describe(resp)}"


# --------------------------------------------------------------------------- reverse listener


@pytest.mark.parametrize("form", REVERSE_FORMS)
@pytest.mark.parametrize("variant", MALFORMED, ids=MALFORMED_IDS)
def test_reverse_malformed_authorization_is_401(world, variant, form):
    _, values = variant
    m = marker()
    proxy = world.reverse
    if form == "path":
        path, host = f"/v2/namespaces/default/connectors/harbor/sec/{m}/manifests/v1", proxy.host
    elif form == "host":
        path, host = f"/v2/sec/{m}/manifests/v1", "c-harbor.default.svc.cluster.local"
    else:
        path, host = "/v2/", proxy.host
    headers = [("Host", host)] + [("Authorization", v) for v in values("x", world.token)]
    resp = raw_exchange(proxy.port, request_bytes("GET", path, headers), timeout=20)
    assert is_registry_error(resp, 401), f"expected a 401 registry error, got {describe(resp)}"
    assert resp.header("WWW-Authenticate"), "a 401 without a challenge: clients never retry with credentials"
    assert resp.json()["errors"][0]["code"] == "UNAUTHORIZED"
    assert not leaks(resp.everything, world.secrets), "the answer repeats a secret"
    assert not world.registry.saw(m), "the request reached the registry (or its token server)"
    alive(proxy)
    reverse_still_serves(world)


@pytest.mark.parametrize("variant", MALFORMED, ids=MALFORMED_IDS)
def test_reverse_malformed_proxy_authorization_is_401(world, variant):
    """Proxy-Authorization means nothing on the reverse listener: no Authorization, so 401."""
    _, values = variant
    m = marker()
    proxy = world.reverse
    path = f"/v2/namespaces/default/connectors/harbor/sec/{m}/manifests/v1"
    headers = [("Host", proxy.host)] + [("Proxy-Authorization", v) for v in values("default/harbor", world.token)]
    resp = raw_exchange(proxy.port, request_bytes("GET", path, headers), timeout=20)
    assert is_registry_error(resp, 401), f"expected a 401 registry error, got {describe(resp)}"
    assert not world.registry.saw(m), "the request reached the registry (or its token server)"
    alive(proxy)
    reverse_still_serves(world)


# --------------------------------------------------------------------------- forward listener


def answer_or_relay(c: RawConn, sink: TcpSink, limit: float = 3.0) -> None:
    """Wait (bounded) until the proxy answers or closes the tunnel, or the sink gets a connection."""
    with sink.lock:
        accepted = sink.accepted
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if select.select([c.sock], [], [], 0.02)[0]:
            return
        with sink.lock:
            if sink.accepted > accepted:
                return


def assert_407(resp) -> None:
    assert is_registry_error(resp, 407), f"expected a 407 JSON error, got {describe(resp)}"
    assert resp.header("Proxy-Authenticate"), "a 407 without Proxy-Authenticate"


@pytest.mark.parametrize("listener", FORWARD_LISTENERS)
@pytest.mark.parametrize("mode", FORWARD_MODES)
@pytest.mark.parametrize("variant", MALFORMED, ids=MALFORMED_IDS)
def test_forward_malformed_proxy_authorization_is_407_and_relays_nothing(world, variant, mode, listener):
    """Finding 1: the open relay. The sink stands for any host and port on the internet."""
    _, values = variant
    port = world.forward_ports[listener]
    sink = world.sink
    target = f"127.0.0.1:{sink.port}"
    before = sink.barrier()
    auth = [("Proxy-Authorization", v) for v in values("default/harbor", world.token)]
    with RawConn(port, timeout=20) as c:
        if mode == "http":
            c.send(request_bytes("GET", f"http://{target}/relay", [("Host", target), *auth]))
            resp = c.read_response()
        else:
            c.send(request_bytes("CONNECT", target, [("Host", target), *auth]))
            resp = c.read_response("CONNECT")
            # whatever the answer, use the connection as a tunnel: a relaying proxy connects now
            payload = (b"GET /tunnelled HTTP/1.1\r\nHost: " + target.encode() + b"\r\n\r\n" if mode == "connect-http"
                       else b"\x00\x01\x02 raw bytes for any service\r\n\r\n")
            try:
                c.send(payload)
            except OSError:
                pass
            answer_or_relay(c, sink)
    reached = sink.barrier() - before
    assert reached == 0, f"the forward listener relayed to {target} without a valid token ({reached} connections)"
    assert_407(resp)
    assert not leaks(resp.everything, world.secrets)
    alive(world.proxies[listener])
    forward_still_serves(world, listener)


@pytest.mark.parametrize("variant", MALFORMED, ids=MALFORMED_IDS)
def test_forward_malformed_proxy_authorization_to_a_connector_is_407(world, variant):
    """A plain-HTTP forward request to the connector's own address: no credentials injected, 407."""
    _, values = variant
    m = marker()
    netloc = world.registry.url.removeprefix("http://")
    headers = [("Host", netloc)] + [("Proxy-Authorization", v) for v in values("default/harbor", world.token)]
    resp = raw_exchange(world.forward_ports["refuse-unknown"],
                        request_bytes("GET", f"http://{netloc}/v2/sec/{m}/manifests/v1", headers), timeout=20)
    assert_407(resp)
    assert not world.registry.saw(m), "the request reached the registry (or its token server)"
    forward_still_serves(world, "refuse-unknown")


# --------------------------------------------------------------------------- what the proxy wrote


@pytest.mark.parametrize("listener", FORWARD_LISTENERS)
def test_zz_nothing_written_holds_a_secret(world, listener):
    """After all of the above: the log and the -w flow file of each proxy hold no secret."""
    proxy = world.proxies[listener]
    proxy.stop()  # flushes the flow file
    written = proxy.everything_written()
    assert len(written) > 1000
    found = leaks(written, world.secrets)
    assert not found, f"{found} written to {proxy.log_path} or {proxy.flows_path}"
