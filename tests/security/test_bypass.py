"""Bypass attempts on the reverse listener: every one ends in a proper error or in the one route the
caller may use, and nothing unauthorized reaches a registry.

Two connectors: `default/alpha` (the real registry, behind a counting TCP proxy) and `default/beta`
(a recording server that answers everything). The attacker's token may use alpha only. Each attempt
carries a unique marker in its repository name (or query); afterwards:

- beta received nothing at all (it is only ever reached by the sanity test with beta's own token);
- if alpha saw the marker, the attempt is one where alpha is an acceptable route;
- otherwise the answer is the proxy's own refusal: 4xx in the registry's JSON error format;
- never `101 Switching Protocols` (no h2c), never a 5xx.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from proxyproc import basic, connector, secret, write_manifests

from .hostile import (
    HostileServer,
    RawConn,
    RealRegistry,
    describe,
    h2_prior_knowledge,
    is_registry_error,
    json_reply,
    leaks,
    start_proxy,
    write_tokens,
)
from .hostile import request_bytes as req

DEBUG = bool(os.environ.get("SECURITY_DEBUG"))
P = "/v2/namespaces/default/connectors"
ALPHA_HOST = "c-alpha.default.svc.cluster.local"
BETA_HOST = "c-beta.default.svc.cluster.local"
DIGEST = "sha256:" + "0" * 64


@dataclass
class Ctx:
    m: str  # the marker
    auth: tuple[str, str]  # Authorization for alpha only
    none_auth: tuple[str, str]  # a valid identity that may use neither connector
    host: str  # the proxy's own host:port
    beta_port: int


@dataclass
class Attempt:
    id: str
    build: Callable[[Ctx], bytes]
    alpha_ok: bool = False  # routing to alpha (the connector the caller may use) is a correct outcome
    responses: int = 1  # pipelined requests: read this many answers, judge the last
    may_close: bool = False  # closing the connection without an answer is a correct outcome
    framing: bool = False  # not HTTP a reverse proxy routes: mitmproxy's own protocol-level 4xx is correct too


def get(path: str, c: Ctx, host: str | None = None, auth: bool = True, method: str = "GET",
        extra: list[tuple[str, str]] | None = None, version: str = "HTTP/1.1", body: bytes = b"") -> bytes:
    headers = [("Host", host or c.host)] if host != "" else []
    if auth:
        headers.append(c.auth)
    return req(method, path, headers + (extra or []), version=version, body=body)


def raw_path(path: bytes, c: Ctx, host: str | None = None) -> bytes:
    return (b"GET " + path + b" HTTP/1.1\r\nHost: " + (host or c.host).encode() + b"\r\n"
            + f"{c.auth[0]}: {c.auth[1]}\r\n\r\n".encode())


H2C = [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAAQAAP__")]

ATTEMPTS: list[Attempt] = [
    # --- the Host form names one connector, the path form the other
    Attempt("host-alpha-path-beta", lambda c: get(f"{P}/beta/sec/{c.m}/manifests/v1", c, host=ALPHA_HOST), alpha_ok=True),
    Attempt("host-beta-path-alpha", lambda c: get(f"{P}/alpha/sec/{c.m}/manifests/v1", c, host=BETA_HOST), alpha_ok=True),
    Attempt("short-host-beta-path-alpha", lambda c: get(f"{P}/alpha/sec/{c.m}/manifests/v1", c, host="c-beta.default"), alpha_ok=True),
    Attempt("host-beta", lambda c: get(f"/v2/sec/{c.m}/manifests/v1", c, host=BETA_HOST)),
    Attempt("host-beta-upper-case", lambda c: get(f"/v2/sec/{c.m}/manifests/v1", c, host=BETA_HOST.upper())),
    Attempt("host-beta-trailing-dot-and-port", lambda c: get(f"/v2/sec/{c.m}/manifests/v1", c, host=BETA_HOST + ".:80")),
    Attempt("host-beta-userinfo-alpha", lambda c: get(f"/v2/sec/{c.m}/manifests/v1", c, host=f"{ALPHA_HOST}@{BETA_HOST}"), alpha_ok=True),
    Attempt("path-beta", lambda c: get(f"{P}/beta/sec/{c.m}/manifests/v1", c)),
    Attempt("host-beta-ping", lambda c: get(f"/v2/?m={c.m}", c, host=BETA_HOST)),
    Attempt("path-alpha-repository-names-beta", lambda c: get(f"{P}/alpha/namespaces/default/connectors/beta/sec/{c.m}/manifests/v1", c),
            alpha_ok=True),
    Attempt("double-slash-host-alpha", lambda c: get(f"/v2//namespaces/default/connectors/beta/sec/{c.m}/manifests/v1", c,
                                                     host=ALPHA_HOST), alpha_ok=True),
    Attempt("upper-case-v2", lambda c: get(f"/V2/namespaces/default/connectors/beta/sec/{c.m}/manifests/v1", c)),
    Attempt("x-original-url-beta", lambda c: get(f"{P}/alpha/sec/{c.m}/manifests/v1", c,
                                                 extra=[("X-Original-URL", f"{P}/beta/sec/{c.m}/manifests/v1"),
                                                        ("X-Rewrite-URL", f"{P}/beta/sec/{c.m}/manifests/v1")]), alpha_ok=True),
    Attempt("path-beta-x-forwarded-host-alpha", lambda c: get(f"{P}/beta/sec/{c.m}/manifests/v1", c,
                                                              extra=[("X-Forwarded-Host", ALPHA_HOST)])),
    Attempt("host-alpha-x-forwarded-host-beta", lambda c: get(f"/v2/sec/{c.m}/manifests/v1", c, host=ALPHA_HOST,
                                                              extra=[("X-Forwarded-Host", BETA_HOST)]), alpha_ok=True),
    # --- encodings
    Attempt("encoded-slash", lambda c: get(f"{P}/alpha%2f..%2fbeta/sec/{c.m}/manifests/v1", c)),
    Attempt("encoded-slash-upper-case", lambda c: get(f"{P}/alpha%2F..%2Fbeta/sec/{c.m}/manifests/v1", c)),
    Attempt("dot-dot", lambda c: get(f"{P}/alpha/../beta/sec/{c.m}/manifests/v1", c)),
    Attempt("dot-dot-to-the-root", lambda c: get(f"{P}/alpha/../../../../v2/namespaces/default/connectors/beta/sec/{c.m}/manifests/v1", c)),
    Attempt("dot-segment", lambda c: get(f"{P}/./beta/sec/{c.m}/manifests/v1", c)),
    Attempt("encoded-dot-dot", lambda c: get(f"{P}/alpha/%2e%2e/beta/sec/{c.m}/manifests/v1", c), alpha_ok=True),
    Attempt("encoded-dot-dot-upper-case", lambda c: get(f"{P}/alpha/%2E%2E/%2E%2E/connectors/beta/sec/{c.m}/manifests/v1", c), alpha_ok=True),
    Attempt("encoded-connector-name", lambda c: get(f"{P}/%62eta/sec/{c.m}/manifests/v1", c)),
    Attempt("encoded-namespaces-segment", lambda c: get(f"/v2/namespaces/default/connectors%2fbeta/sec/{c.m}/manifests/v1", c)),
    Attempt("backslash-dot-dot", lambda c: get(f"{P}/alpha/..\\beta/sec/{c.m}/manifests/v1", c)),
    Attempt("backslash-separators", lambda c: get(f"{P}/alpha\\..\\beta/sec/{c.m}/manifests/v1", c)),
    Attempt("encoded-backslash", lambda c: get(f"{P}/alpha/..%5cbeta/sec/{c.m}/manifests/v1", c), alpha_ok=True),
    Attempt("double-encoded-dot-dot", lambda c: get(f"{P}/alpha/%252e%252e/beta/sec/{c.m}/manifests/v1", c), alpha_ok=True),
    Attempt("double-encoded-slash", lambda c: get(f"{P}/alpha%252f..%252fbeta/sec/{c.m}/manifests/v1", c)),
    Attempt("overlong-utf8-dot-encoded", lambda c: get(f"{P}/alpha/%c0%ae%c0%ae/beta/sec/{c.m}/manifests/v1", c), alpha_ok=True),
    Attempt("overlong-utf8-slash-encoded", lambda c: get(f"{P}/alpha%c0%af..%c0%afbeta/sec/{c.m}/manifests/v1", c)),
    Attempt("overlong-utf8-raw-bytes", lambda c: raw_path(f"{P}/alpha/".encode() + b"\xc0\xae\xc0\xae/beta/sec/" + c.m.encode() + b"/manifests/v1", c), alpha_ok=True),
    Attempt("invalid-utf8-in-name", lambda c: raw_path(f"{P}/".encode() + b"b\xffeta/sec/" + c.m.encode() + b"/manifests/v1", c)),
    Attempt("fullwidth-dots", lambda c: raw_path(f"{P}/alpha/".encode() + "．．".encode() + b"/beta/sec/" + c.m.encode() + b"/manifests/v1", c), alpha_ok=True),
    Attempt("encoded-nul", lambda c: get(f"{P}/alpha%00/../beta/sec/{c.m}/manifests/v1", c)),
    Attempt("semicolon-parameter-on-name", lambda c: get(f"{P}/beta;x=alpha/sec/{c.m}/manifests/v1", c)),
    Attempt("semicolon-then-dot-dot", lambda c: get(f"{P}/alpha;/../beta/sec/{c.m}/manifests/v1", c)),
    Attempt("semicolon-on-namespace", lambda c: get(f"/v2/namespaces/default;x/connectors/beta/sec/{c.m}/manifests/v1", c)),
    Attempt("query-names-beta", lambda c: get(f"/v2/sec/{c.m}/manifests/v1?/v2/namespaces/default/connectors/beta/", c)),
    Attempt("fragment-dot-dot", lambda c: get(f"{P}/alpha/sec/{c.m}/manifests/v1#/../../../beta", c), alpha_ok=True),
    # --- absolute-form request targets
    Attempt("absolute-form-beta-host-header-alpha", lambda c: get(f"http://{BETA_HOST}/v2/sec/{c.m}/manifests/v1", c, host=ALPHA_HOST), alpha_ok=True),
    Attempt("absolute-form-beta-no-host-header", lambda c: get(f"http://{BETA_HOST}/v2/sec/{c.m}/manifests/v1", c, host="")),
    Attempt("absolute-form-alpha-path-beta", lambda c: get(f"http://{ALPHA_HOST}{P}/beta/sec/{c.m}/manifests/v1", c, host=ALPHA_HOST), alpha_ok=True),
    Attempt("absolute-form-beta-address", lambda c: get(f"http://127.0.0.1:{c.beta_port}/beta/v2/sec/{c.m}/manifests/v1", c, host=ALPHA_HOST), alpha_ok=True),
    Attempt("absolute-form-beta-address-path-alpha", lambda c: get(f"http://127.0.0.1:{c.beta_port}{P}/alpha/sec/{c.m}/manifests/v1", c), alpha_ok=True),
    Attempt("absolute-form-https-beta", lambda c: get(f"https://{BETA_HOST}/v2/sec/{c.m}/manifests/v1", c, host=ALPHA_HOST), alpha_ok=True),
    Attempt("authority-form-beta", lambda c: get(f"127.0.0.1:{c.beta_port}", c, method="CONNECT"), framing=True),
    Attempt("asterisk-form", lambda c: get(f"*?m={c.m}", c, method="OPTIONS"), framing=True),
    # --- duplicate and missing Host headers
    Attempt("duplicate-host-alpha-beta", lambda c: req("GET", f"/v2/sec/{c.m}/manifests/v1", [("Host", ALPHA_HOST), ("Host", BETA_HOST), c.auth]), alpha_ok=True),
    Attempt("duplicate-host-beta-alpha", lambda c: req("GET", f"/v2/sec/{c.m}/manifests/v1", [("Host", BETA_HOST), ("Host", ALPHA_HOST), c.auth]), alpha_ok=True),
    Attempt("http10-without-host", lambda c: get(f"/v2/sec/{c.m}/manifests/v1", c, host="", version="HTTP/1.0")),
    Attempt("http10-without-host-path-beta", lambda c: get(f"{P}/beta/sec/{c.m}/manifests/v1", c, host="", version="HTTP/1.0")),
    Attempt("http10-without-host-path-alpha", lambda c: get(f"{P}/alpha/sec/{c.m}/manifests/v1", c, host="", version="HTTP/1.0"), alpha_ok=True),
    # --- HTTP/2 cleartext
    Attempt("h2c-upgrade-path-beta", lambda c: get(f"{P}/beta/sec/{c.m}/manifests/v1", c, extra=H2C)),
    Attempt("h2c-upgrade-host-beta", lambda c: get(f"/v2/sec/{c.m}/manifests/v1", c, host=BETA_HOST, extra=H2C)),
    Attempt("h2c-upgrade-path-alpha", lambda c: get(f"{P}/alpha/sec/{c.m}/manifests/v1", c, extra=H2C), alpha_ok=True),
    Attempt("h2c-upgrade-no-credentials", lambda c: get(f"{P}/alpha/sec/{c.m}/manifests/v1", c, auth=False, extra=H2C)),
    # (prior knowledge: see H2_PRIOR_KNOWLEDGE below)
    # --- a connector's /v2/ paths without (usable) credentials
    Attempt("no-credentials-path-form", lambda c: get(f"{P}/alpha/sec/{c.m}/manifests/v1", c, auth=False)),
    Attempt("no-credentials-host-form", lambda c: get(f"/v2/sec/{c.m}/manifests/v1", c, host=ALPHA_HOST, auth=False)),
    Attempt("no-credentials-head", lambda c: get(f"{P}/alpha/sec/{c.m}/manifests/v1", c, auth=False, method="HEAD")),
    Attempt("no-credentials-connector-ping", lambda c: get(f"{P}/alpha/?m={c.m}", c, auth=False)),
    Attempt("no-credentials-catalog", lambda c: get(f"/v2/_catalog?m={c.m}", c, host=ALPHA_HOST, auth=False)),
    Attempt("no-credentials-tags", lambda c: get(f"{P}/alpha/sec/{c.m}/tags/list", c, auth=False)),
    Attempt("no-credentials-delete", lambda c: get(f"{P}/alpha/sec/{c.m}/manifests/{DIGEST}", c, auth=False, method="DELETE")),
    Attempt("no-credentials-upload-expect-100", lambda c: get(f"{P}/alpha/sec/{c.m}/blobs/uploads/", c, auth=False, method="POST",
                                                              extra=[("Expect", "100-continue")], body=b"hello")),
    Attempt("no-credentials-streamed-patch", lambda c: get(f"{P}/alpha/sec/{c.m}/blobs/uploads/{'a' * 36}?_state=x", c, auth=False,
                                                           method="PATCH", body=b"x" * 70_000)),
    Attempt("identity-without-the-connector", lambda c: req("GET", f"{P}/alpha/sec/{c.m}/manifests/v1", [("Host", c.host), c.none_auth])),
    Attempt("identity-without-the-connector-host-form", lambda c: req("GET", f"/v2/sec/{c.m}/manifests/v1", [("Host", ALPHA_HOST), c.none_auth])),
    # --- one connection, several requests
    Attempt("keep-alive-alpha-then-beta", lambda c: get(f"{P}/alpha/sec/first/tags/list", c)
            + get(f"{P}/beta/sec/{c.m}/manifests/v1", c), responses=2),
    Attempt("keep-alive-alpha-then-no-credentials", lambda c: get(f"{P}/alpha/sec/first/tags/list", c)
            + get(f"{P}/alpha/sec/{c.m}/manifests/v1", c, auth=False), responses=2),
    Attempt("keep-alive-host-alpha-then-host-beta", lambda c: get("/v2/sec/first/tags/list", c, host=ALPHA_HOST)
            + get(f"/v2/sec/{c.m}/manifests/v1", c, host=BETA_HOST), responses=2),
    Attempt("smuggled-request-cl-te", lambda c: req("POST", f"{P}/alpha/sec/first/blobs/uploads/", [
        ("Host", c.host), c.auth, ("Transfer-Encoding", "chunked"), ("Content-Length", "4")])[:-2]
        + b"\r\n0\r\n\r\n" + get(f"{P}/beta/sec/{c.m}/manifests/v1", c, auth=False), alpha_ok=True, responses=2, may_close=True),
    Attempt("mount-from-beta", lambda c: get(f"{P}/alpha/sec/{c.m}/blobs/uploads/?mount={DIGEST}&from=namespaces/default/connectors/beta/sec/x",
                                             c, method="POST"), alpha_ok=True),
]

# (id, HTTP/2 request headers) sent with the cleartext preface: refused or closed, never routed to beta
H2_PRIOR_KNOWLEDGE: list[tuple[str, Callable[[Ctx], list[tuple[bytes, bytes]]]]] = [
    ("path-beta", lambda c: [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", c.host.encode()),
                             (b":path", f"{P}/beta/sec/{c.m}/manifests/v1".encode()), (b"authorization", c.auth[1].encode())]),
    ("authority-beta", lambda c: [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", BETA_HOST.encode()),
                                  (b":path", f"/v2/sec/{c.m}/manifests/v1".encode()), (b"authorization", c.auth[1].encode())]),
    ("no-credentials-alpha", lambda c: [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", c.host.encode()),
                                        (b":path", f"{P}/alpha/sec/{c.m}/manifests/v1".encode())]),
]


class World:
    def __init__(self, tmp):
        self.password = "byp-pw-" + secrets.token_hex(10)
        self.beta_password = "byp-beta-pw-" + secrets.token_hex(10)
        self.token = "byp-alpha-" + secrets.token_hex(12)
        self.beta_token = "byp-beta-" + secrets.token_hex(12)
        self.none_token = "byp-none-" + secrets.token_hex(12)
        self.alpha = RealRegistry(tmp / "registry", {"pusher": self.password})
        self.beta = HostileServer().start()
        beta_url = self.beta.route("beta", lambda r, sub: json_reply(200, {"beta": "reached"}))
        write_manifests(tmp / "connectors", "c.yaml", [
            connector("default", "alpha", self.alpha.url, "alpha-secret"),
            secret("default", "alpha-secret", "pusher", self.password),
            connector("default", "beta", beta_url, "beta-secret"),
            secret("default", "beta-secret", "beta-user", self.beta_password, type="kubernetes.io/basic-auth"),
        ])
        write_tokens(tmp / "tokens.yaml", [
            {"token": self.token, "subject": "attacker", "connectors": ["default/alpha"]},
            {"token": self.beta_token, "subject": "beta-user", "connectors": ["default/beta"]},
            {"token": self.none_token, "subject": "nobody", "connectors": ["team/*"]},
        ])
        self.proxy = start_proxy(tmp / "proxy", tmp / "connectors", tmp / "tokens.yaml")

    @property
    def secrets(self) -> list[str]:
        return [self.password, self.beta_password, self.token, self.beta_token, self.none_token,
                base64.b64encode(f"pusher:{self.password}".encode()).decode(),
                base64.b64encode(f"beta-user:{self.beta_password}".encode()).decode(),
                *self.alpha.token_server.issued_tokens]

    def ctx(self) -> Ctx:
        return Ctx("m" + secrets.token_hex(6), ("Authorization", basic("x", self.token)),
                   ("Authorization", basic("x", self.none_token)), self.proxy.host, self.beta.port)

    def stop(self) -> None:
        self.proxy.stop()
        self.beta.stop()
        self.alpha.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("bypass"))
    yield w
    w.stop()


def is_refusal(resp, method: str = "GET", framing: bool = False) -> bool:
    """The proxy's own 4xx in the registry's JSON format (HEAD: the headers of one)."""
    if resp is None or not 400 <= resp.status < 500:
        return False
    if framing and (resp.header("server") or "").startswith("mitmproxy") and resp.header("connection") == "close":
        return True  # rejected by mitmproxy's HTTP/1 parser before any addon could route it
    if method == "HEAD":
        return (resp.header("content-type") or "").startswith("application/json") and not resp.body
    return is_registry_error(resp)


def judge(world, c: Ctx, attempt_id: str, answers: list, alpha_ok: bool, may_close: bool, beta_before: int,
          method: str = "GET", framing: bool = False) -> None:
    beta_got = world.beta.received()[beta_before:]
    assert not beta_got, f"{attempt_id}: reached connector beta: {[(r.method, r.path) for r in beta_got]}"
    alpha_saw = world.alpha.saw(c.m)
    assert alpha_ok or not alpha_saw, f"{attempt_id}: an unauthorized request reached alpha's registry"
    for resp in answers:
        assert resp is None or resp.status != 101, f"{attempt_id}: switched protocols: {describe(resp)}"
        assert resp is None or resp.status < 500, f"{attempt_id}: not a proper error: {describe(resp)}"
        assert resp is None or not leaks(resp.everything, world.secrets), f"{attempt_id}: the answer holds a secret"
    last = answers[-1]
    if last is None:
        assert may_close, f"{attempt_id}: the connection was closed without an answer"
    elif not alpha_saw:
        assert is_refusal(last, method if len(answers) == 1 else "GET", framing), f"{attempt_id}: expected the proxy's 4xx registry error, got {describe(last)}"
    assert world.proxy.proc.poll() is None, "the proxy died"


@pytest.mark.parametrize("attempt", ATTEMPTS, ids=[a.id for a in ATTEMPTS])
def test_bypass_attempt(world, attempt):
    c = world.ctx()
    beta_before = len(world.beta.received())
    answers = []
    data = attempt.build(c)
    method = data.split(b" ", 1)[0].decode()
    with RawConn(world.proxy.port, timeout=10) as conn:
        conn.send(data)
        for i in range(attempt.responses):
            resp = conn.read_response(method if i == 0 else "GET")
            answers.append(resp)
            if resp is None:
                break
    if DEBUG:
        print(f"\nOUTCOME {attempt.id}: alpha={world.alpha.saw(c.m)} " + " | ".join(describe(a)[:160] for a in answers))
    if None in answers[:-1]:
        assert attempt.may_close, f"{attempt.id}: the connection was closed early: {answers}"
    judge(world, c, attempt.id, answers, attempt.alpha_ok, attempt.may_close, beta_before, method, attempt.framing)


@pytest.mark.parametrize("case", H2_PRIOR_KNOWLEDGE, ids=[h[0] for h in H2_PRIOR_KNOWLEDGE])
def test_h2_prior_knowledge(world, case):
    """`PRI * HTTP/2.0` and a request: either not spoken at all (closed) or refused like HTTP/1."""
    name, headers = case
    c = world.ctx()
    beta_before = len(world.beta.received())
    statuses, raw = h2_prior_knowledge(world.proxy.port, headers(c))
    assert not world.beta.received()[beta_before:], f"h2 {name}: reached connector beta"
    assert not world.alpha.saw(c.m), f"h2 {name}: an unauthorized request reached alpha's registry"
    assert all(400 <= s < 500 for s in statuses), f"h2 {name}: answered {statuses}: {raw[:300]!r}"
    assert not leaks(raw, world.secrets)
    assert world.proxy.proc.poll() is None


def test_sanity_beta_is_reachable_with_its_own_identity(world):
    """The detector works: beta's own identity does reach beta (so 'beta received nothing' means something)."""
    c = world.ctx()
    before = len(world.beta.received())
    with RawConn(world.proxy.port) as conn:
        conn.send(req("GET", f"{P}/beta/sec/{c.m}/manifests/v1", [("Host", c.host), ("Authorization", basic("x", world.beta_token))]))
        resp = conn.read_response()
    assert resp is not None and resp.status == 200, describe(resp)
    assert any(c.m in r.path for r in world.beta.received()[before:])


def test_sanity_alpha_is_reachable_in_both_forms(world):
    for host, path in ((None, f"{P}/alpha/sec/{{m}}/tags/list"), (ALPHA_HOST, "/v2/sec/{m}/tags/list")):
        c = world.ctx()
        with RawConn(world.proxy.port) as conn:
            conn.send(get(path.format(m=c.m), c, host=host))
            resp = conn.read_response()
        assert resp is not None and resp.status == 404 and world.alpha.saw(c.m), describe(resp)


def test_zz_nothing_written_holds_a_secret(world):
    world.proxy.stop()
    written = world.proxy.everything_written()
    assert len(written) > 1000
    found = leaks(written, world.secrets)
    assert not found, f"{found} written to {world.proxy.log_path} or {world.proxy.flows_path}"
