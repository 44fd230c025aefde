"""Hostile upstreams: a registry (or its token server) that tries to harvest the Secret's credentials,
leak tokens back to the client, or exhaust the proxy.

Every case is a connector `default/h-<case>` with its own Secret (a unique password), served by one
hostile HTTP server on `registry-a.connector-test` under the path prefix `/<case>` (a TLS twin for the
https case). `other.connector-test` is a second listener standing for someone else's host: it must
never receive anything. For every case:

- the client never sees the Secret's password, the base64 Basic form of the credentials, or a token
  the hostile token server issued, in any header or body;
- the proxy's log (checked right after the case) and its `-w` flow file (checked once the proxy
  has stopped, in the `test_zz_*` tests at the end) never contain them either;
- the other host saw nothing; refused realms are never contacted at all;
- huge bodies (200 MiB, streamed by the hostile server) cost the proxy less than 50 MiB of peak RSS
  (a fresh proxy per case, VmHWM from /proc); a hanging token server gets a 502/504 after
  `upstream_timeout`, a hanging body is cut off after `upstream_idle_timeout` (plus slack), and other
  clients keep being served meanwhile.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from urllib.parse import quote

import pytest

from localregistry import TestCA, check_test_hosts
from proxyproc import basic, connector, secret, write_manifests

from .hostile import (
    HostileServer,
    RawConn,
    Reply,
    basic_form,
    describe,
    filler,
    is_registry_error,
    json_reply,
    leaks,
    memory_kib,
    request_bytes,
    start_proxy,
    write_tokens,
)

DEBUG = bool(os.environ.get("SECURITY_DEBUG"))
HOST = "registry-a.connector-test"
OTHER = "other.connector-test"
USER = "huser"
DIGEST = "sha256:" + "ab" * 32
HUGE = 128 * 1024 * 1024  # 2.5 times the RSS limit: buffering it anywhere shows
RSS_LIMIT_KIB = 50 * 1024
UPSTREAM_TIMEOUT = 2  # seconds: --set upstream_timeout (probes, token fetches)
IDLE_TIMEOUT = 4  # seconds: --set upstream_idle_timeout (a stall mid-exchange); longer than the above, so a
# hanging token server gets its 504 before the client connection counts as idle
HANG_SLACK = 4.0  # how much longer than that a hanging upstream may hold a client
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


@dataclass
class Hostile:
    id: str
    realm: str = "{base}/token"  # format keys: base (this case on the plain server), other, HP, OP, case
    challenge: str = "bearer"  # bearer | basic | bare-realm (the realm as an unquoted token)
    tls: bool = False  # the registry is https (the realm stays what `realm` says)
    token: str = "normal"  # normal | copies | redirect-other | echo-401 | huge | hang
    api: str = "ok"  # ok | echo-error | echo-200 | echo-location | echo-stream | redirect-other | huge-500 | huge-401 | hang-500 | hang-401
    probe: str = "challenge"  # challenge | redirect-other | huge-401
    method: str = "GET"
    path: str = "sec/app/manifests/v1"  # below /v2/namespaces/default/connectors/h-<case>/
    expect: tuple[int, ...] = ()  # the client gets one of these statuses as a registry error naming the connector
    realm_refused: bool = False  # the Secret's credentials may not be sent anywhere
    memory: bool = False  # a fresh proxy; its peak RSS may grow by RSS_LIMIT_KIB at most
    hang: bool = False  # the answer must end within upstream_timeout + HANG_SLACK

    @property
    def name(self) -> str:
        return "h-" + self.id


def refused_realm(id: str, realm: str, **kw) -> Hostile:
    return Hostile(id, realm=realm, expect=(502,), realm_refused=True, **kw)


CASES: list[Hostile] = [
    Hostile("control"),  # a well-behaved registry: the sanity baseline for all the others
    # --- realms that would send the Secret's Basic credentials somewhere else
    refused_realm("realm-backslash-before-userinfo", "http://{other_netloc}\\\\@{HOST}:{HP}/{case}/token"),
    refused_realm("realm-backslash-before-userinfo-unquoted", "http://{other_netloc}\\@{HOST}:{HP}/{case}/token",
                  challenge="bare-realm"),
    refused_realm("realm-quoted-pair-userinfo", "http://{other_netloc}\\@{HOST}:{HP}/{case}/token"),
    refused_realm("realm-userinfo", "http://huser@{HOST}:{HP}/{case}/token"),
    refused_realm("realm-userinfo-with-password", "http://huser:x@{HOST}:{HP}/{case}/token"),
    refused_realm("realm-userinfo-encoded-backslash", "http://{other_netloc}%5c@{HOST}:{HP}/{case}/token"),
    refused_realm("realm-space-before-userinfo", "http://{other_netloc} @{HOST}:{HP}/{case}/token"),
    refused_realm("realm-tab-before-userinfo", "http://{other_netloc}\t@{HOST}:{HP}/{case}/token"),
    refused_realm("realm-whitespace-in-path", "http://{HOST}:{HP}/{case}/to ken"),
    refused_realm("realm-leading-whitespace", " http://{HOST}:{HP}/{case}/token"),
    refused_realm("realm-nul-before-userinfo", "http://{other_netloc}\x00@{HOST}:{HP}/{case}/token"),
    refused_realm("realm-control-character-in-path", "http://{HOST}:{HP}/{case}/token\x01"),
    refused_realm("realm-control-character-in-host", "http://{HOST}\x7f:{HP}/{case}/token"),
    refused_realm("realm-unparseable-ipv6", "http://[::1"),
    refused_realm("realm-other-registrable-domain", "{other}/token"),
    refused_realm("realm-other-ip", "http://127.0.0.1:{OP}/token"),
    refused_realm("realm-not-http", "file:///etc/passwd"),
    refused_realm("https-registry-plain-http-realm", "{base}/token", tls=True),
    # --- token servers
    Hostile("token-copied-into-other-fields-and-headers", token="copies"),
    Hostile("token-redirects-to-other-host", token="redirect-other", expect=(502,)),
    Hostile("token-error-echoes-credentials", token="echo-401", expect=(502,)),
    Hostile("token-hangs", token="hang", expect=(502, 504), hang=True),
    # --- registries that echo the injected Authorization back
    Hostile("echo-authorization-in-error", api="echo-error"),
    Hostile("echo-authorization-in-manifest", api="echo-200"),
    Hostile("echo-authorization-in-location", api="echo-location", method="POST", path="sec/app/blobs/uploads/"),
    Hostile("echo-authorization-in-streamed-blob", api="echo-stream", path=f"sec/app/blobs/{DIGEST}"),
    Hostile("echo-basic-credentials-in-error", challenge="basic", api="echo-error"),
    # --- redirects
    Hostile("blob-redirect-to-other-host", api="redirect-other", path=f"sec/app/blobs/{DIGEST}"),
    Hostile("probe-redirect-to-other-host", probe="redirect-other"),
    # --- exhaustion
    Hostile("huge-500-body", api="huge-500", memory=True),
    Hostile("huge-401-body", api="huge-401", memory=True),
    Hostile("huge-probe-401-body", probe="huge-401", memory=True),
    Hostile("huge-token-response", token="huge", memory=True),
    Hostile("hanging-500-body", api="hang-500", hang=True),
    Hostile("hanging-401-body", api="hang-401", hang=True),
]
CASE_IDS = [c.id for c in CASES]


class World:
    def __init__(self, tmp):
        check_test_hosts()
        self.tmp = tmp
        ca = TestCA(tmp / "ca")
        self.ca_path = ca.cert_path
        self.client_token = "hostile-client-" + secrets.token_hex(12)
        self.lock = threading.Lock()
        self.issued: dict[str, list[str]] = {c.id: [] for c in CASES}
        self.other_tokens: list[str] = []
        self.other = HostileServer(public_host=OTHER, default=self._other).start()
        self.plain = HostileServer(public_host=HOST).start()
        self.tls = HostileServer(tls=ca.issue([HOST], tmp / "tls"), public_host=HOST).start()
        self.passwords = {c.id: f"hpw-{c.id[:12]}-{secrets.token_hex(8)}" for c in CASES}
        docs = []
        for c in CASES:
            handler = self._handler(c)
            self.plain.route(c.id, handler)
            self.tls.route(c.id, handler)
            address = (self.tls if c.tls else self.plain).url(c.id)
            docs += [connector("default", c.name, address, f"{c.name}-secret"),
                     secret("default", f"{c.name}-secret", USER, self.passwords[c.id])]
        write_manifests(tmp / "connectors", "c.yaml", docs)
        write_tokens(tmp / "tokens.yaml", [{"token": self.client_token, "subject": "ci", "connectors": ["*"]}])
        self.extra = ("--set", f"upstream_timeout={UPSTREAM_TIMEOUT}", "--set", f"upstream_idle_timeout={IDLE_TIMEOUT}",
                      "--set", f"ssl_verify_upstream_trusted_ca={self.ca_path}")
        self.proxy = self.start_proxy("proxy")

    def start_proxy(self, name: str):
        return start_proxy(self.tmp / name, self.tmp / "connectors", self.tmp / "tokens.yaml", extra=self.extra)

    # ---- what must never leak

    def secrets(self, case: Hostile) -> list[str]:
        pw = self.passwords[case.id]
        with self.lock:
            issued = list(self.issued[case.id]) + list(self.other_tokens)
        return [pw, f"{USER}:{pw}", basic_form(USER, pw), self.client_token, *issued]

    def all_secrets(self) -> list[str]:
        out = [self.client_token]
        for c in CASES:
            out += self.secrets(c)
        return out

    # ---- the hostile servers' behaviour

    def _other(self, req, path) -> Reply:
        """Someone else's host: answers like a token server, so a leak would 'work'."""
        tok = "otok-" + secrets.token_hex(10)
        with self.lock:
            self.other_tokens.append(tok)
        return json_reply(200, {"token": tok, "expires_in": 300})

    def _fmt(self, case: Hostile, text: str) -> str:
        return text.format(base=self.plain.url(case.id), other=self.other.origin, other_netloc=f"{OTHER}:{self.other.port}",
                           HOST=HOST, HP=self.plain.port, OP=self.other.port, case=case.id)

    def _issue(self, case: Hostile) -> str:
        tok = f"htok-{case.id[:10]}-{secrets.token_hex(10)}"
        with self.lock:
            self.issued[case.id].append(tok)
        return tok

    def _challenge(self, case: Hostile) -> str:
        realm = self._fmt(case, case.realm)
        if case.challenge == "basic":
            return 'Basic realm="hostile"'
        if case.challenge == "bare-realm":
            return f"Bearer realm={realm},service=hostile"
        return 'Bearer realm="' + realm.replace('"', '\\"') + '",service="hostile"'

    def _unauthorized(self, case: Hostile, body: bytes | None = None, huge: bool = False, hang: bool = False) -> Reply:
        headers = [("WWW-Authenticate", self._challenge(case)), ("Content-Type", "application/json")]
        if huge:
            return Reply(401, headers, filler(HUGE), length=HUGE)
        if hang:
            return Reply(401, headers, hang_after=b'{"errors": [')
        return Reply(401, headers, body or json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}).encode())

    def _authorized(self, case: Hostile, auth: str) -> bool:
        if case.challenge == "basic":
            return auth == "Basic " + basic_form(USER, self.passwords[case.id])
        with self.lock:
            return auth.startswith("Bearer ") and auth[7:] in self.issued[case.id]

    def _handler(self, case: Hostile):
        def handle(req, sub: str) -> Reply:
            path, _, query = sub.partition("?")
            auth = req.header("Authorization") or ""
            if path == "/token":
                return self._token(case, req, auth)
            if path in ("/v2", "/v2/"):
                if case.probe == "redirect-other":
                    return Reply(307, [("Location", f"{self.other.origin}/v2/")])
                if case.probe == "huge-401" and not auth:
                    return self._unauthorized(case, huge=True)
                return self._unauthorized(case) if not self._authorized(case, auth) else json_reply(200, {})
            if case.api == "huge-401":
                return self._unauthorized(case, huge=True)
            if case.api == "hang-401":
                return self._unauthorized(case, hang=True)
            if not self._authorized(case, auth) and case.probe != "redirect-other":
                return self._unauthorized(case)
            return self._api(case, req, auth)
        return handle

    def _token(self, case: Hostile, req, auth: str) -> Reply:
        pw = self.passwords[case.id]
        good = auth == "Basic " + basic_form(USER, pw)
        if case.token == "redirect-other":
            return Reply(307, [("Location", f"{self.other.origin}/token?{req.path.partition('?')[2]}")])
        if case.token == "echo-401":
            decoded = base64.b64decode(auth[6:]).decode(errors="replace") if auth.startswith("Basic ") else ""
            return json_reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": f"bad credentials: {auth}",
                                                "detail": {"decoded": decoded}}]},
                              [("X-Echo-Authorization", auth), ("WWW-Authenticate", f'Basic realm="{auth}"')])
        if not good:
            return json_reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
        if case.token == "huge":
            return Reply(200, [("Content-Type", "application/json")], filler(HUGE), length=HUGE)
        if case.token == "hang":
            return Reply(200, [("Content-Type", "application/json")], hang_after=b'{"token": "')
        tok = self._issue(case)
        if case.token == "copies":
            return json_reply(200, {"token": tok, "access_token": tok, "copy": tok, "nested": {"t": [tok]},
                                    "expires_in": 300}, [("X-Issued-Token", tok), ("Link", f"<http://x/{tok}>")])
        return json_reply(200, {"token": tok, "expires_in": 300})

    def _api(self, case: Hostile, req, auth: str) -> Reply:
        decoded = base64.b64decode(auth[6:]).decode(errors="replace") if auth.startswith("Basic ") else ""
        if case.api == "echo-error":
            return json_reply(404, {"errors": [{"code": "MANIFEST_UNKNOWN", "message": f"you sent {auth}",
                                                "detail": {"authorization": auth, "decoded": decoded}}]},
                              [("X-Echo-Authorization", auth)])
        if case.api == "echo-200":
            doc = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "annotations": {"you.sent": auth, "decoded": decoded},
                   "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": DIGEST, "size": 2},
                   "layers": []}
            return Reply(200, [("Content-Type", MANIFEST_TYPE), ("X-Echo-Authorization", auth),
                               ("Docker-Content-Digest", DIGEST)], json.dumps(doc).encode())
        if case.api == "echo-location":
            state = quote(auth, safe="")
            return Reply(202, [("Location", f"/{case.id}/v2/sec/app/blobs/uploads/u1?_state={state}"),
                               ("Docker-Upload-UUID", auth.split(" ")[-1]), ("Range", "0-0"), ("Content-Length", "0")], b"")
        if case.api == "echo-stream":
            half = 1536 * 1024
            body = b"".join(filler(half)) + auth.encode() + b"".join(filler(half))
            return Reply(200, [("Content-Type", "application/octet-stream"), ("Docker-Content-Digest", DIGEST)], body)
        if case.api == "redirect-other":
            return Reply(307, [("Location", f"{self.other.origin}/blob?sig=1")], b"")
        if case.api == "huge-500":
            return Reply(500, [("Content-Type", "application/json")], filler(HUGE), length=HUGE)
        if case.api == "hang-500":
            return Reply(500, [("Content-Type", "application/json")], hang_after=b'{"errors": [')
        doc = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
               "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": DIGEST, "size": 2}, "layers": []}
        return Reply(200, [("Content-Type", MANIFEST_TYPE), ("Docker-Content-Digest", DIGEST)], json.dumps(doc).encode())

    def stop(self) -> None:
        self.proxy.stop()
        for s in (self.plain, self.tls, self.other):
            s.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("hostile"))
    yield w
    w.stop()


def client_request(proxy, world, case: Hostile, timeout: float = 30.0):
    """The client's request for the case, raw; returns (response or None, seconds it took)."""
    path = f"/v2/namespaces/default/connectors/{case.name}/{case.path}"
    headers = [("Host", proxy.host), ("Authorization", basic("ci", world.client_token)), ("Accept", MANIFEST_TYPE)]
    started = time.monotonic()
    with RawConn(proxy.port, timeout=timeout) as c:
        c.send(request_bytes(case.method, path, headers))
        resp = c.read_response(case.method)
    return resp, time.monotonic() - started


def control_still_served(proxy, world) -> None:
    control = CASES[0]
    resp, took = client_request(proxy, world, control, timeout=10)
    assert resp is not None and resp.status == 200, f"the proxy stopped serving others: {describe(resp)}"


def credential_requests(world, case: Hostile) -> list:
    """Every request, to any of the hostile servers, that carried the case's Secret (Basic)."""
    basic_auth = "Basic " + basic_form(USER, world.passwords[case.id])
    return [r for s in (world.plain, world.tls, world.other) for r in s.received() if r.header("Authorization") == basic_auth]


def check_common(world, proxy, case: Hostile, resp, other_before: int) -> None:
    if DEBUG:
        print(f"\nOUTCOME {case.id}: {describe(resp)[:300]}")
    other_got = world.other.received()[other_before:]
    assert not other_got, f"{case.id}: the other host received {[(r.method, r.path, r.header('Authorization')) for r in other_got]}"
    if resp is not None:
        found = leaks(resp.everything, world.secrets(case))
        assert not found, f"{case.id}: the client was sent {found}"
    if case.realm_refused:
        sent = credential_requests(world, case)
        assert not sent, f"{case.id}: the Secret's credentials were sent to {[(r.host, r.path) for r in sent]}"
    if case.expect:
        assert resp is not None and resp.status in case.expect and is_registry_error(resp), \
            f"{case.id}: expected a {'/'.join(map(str, case.expect))} registry error, got {describe(resp)}"
        assert f"default/{case.name}" in resp.json()["errors"][0]["message"], "the error does not name the connector"
    found = leaks(proxy.output().encode(), world.secrets(case))
    assert not found, f"{case.id}: the proxy's log holds {found}"
    assert proxy.proc.poll() is None, "the proxy died"


NORMAL = [c for c in CASES if not c.memory and not c.hang]
MEMORY = [c for c in CASES if c.memory]
HANGING = [c for c in CASES if c.hang]


@pytest.mark.parametrize("case", NORMAL, ids=[c.id for c in NORMAL])
def test_hostile_upstream(world, case):
    other_before = len(world.other.received())
    resp, _ = client_request(world.proxy, world, case)
    check_common(world, world.proxy, case, resp, other_before)
    assert resp is not None, "no answer"
    if case.id == "control":
        assert resp.status == 200, describe(resp)
        assert world.issued["control"], "the control case fetched no token: the harness is broken"
        assert credential_requests(world, case), "the control realm got no credentials: the harness is broken"
    if case.api == "redirect-other":
        assert resp.status == 307 and resp.header("Location").startswith(world.other.origin), describe(resp)
    control_still_served(world.proxy, world)


@pytest.mark.parametrize("case", MEMORY, ids=[c.id for c in MEMORY])
def test_huge_upstream_body(world, case):
    proxy = world.start_proxy(f"proxy-{case.id}")
    try:
        control_still_served(proxy, world)  # warm: the steady state RSS is the baseline
        pid = proxy.proc.pid
        before = memory_kib(pid)
        other_before = len(world.other.received())
        resp, _ = client_request(proxy, world, case, timeout=60)
        after = memory_kib(pid)
        grew = after["VmHWM"] - before["VmHWM"]
        check_common(world, proxy, case, resp, other_before)
        control_still_served(proxy, world)
        assert grew <= RSS_LIMIT_KIB, (
            f"{case.id}: the proxy's peak RSS grew by {grew // 1024} MiB "
            f"({before['VmHWM'] // 1024} -> {after['VmHWM'] // 1024} MiB) for a {HUGE // 2**20} MiB upstream body")
    finally:
        proxy.stop()
    found = leaks(proxy.everything_written(), world.secrets(case))
    assert not found, f"{case.id}: {found} written to {proxy.log_path} or {proxy.flows_path}"


@pytest.mark.parametrize("case", HANGING, ids=[c.id for c in HANGING])
def test_hanging_upstream(world, case):
    other_before = len(world.other.received())
    result: dict = {}

    def hang():
        result["resp"], result["took"] = client_request(world.proxy, world, case, timeout=IDLE_TIMEOUT + HANG_SLACK)

    t = threading.Thread(target=hang, daemon=True)
    t.start()
    started = time.monotonic()
    control_still_served(world.proxy, world)  # while the hanging request is pending
    assert time.monotonic() - started < IDLE_TIMEOUT + HANG_SLACK
    t.join(IDLE_TIMEOUT + HANG_SLACK + 5)
    assert not t.is_alive()
    resp, took = result["resp"], result["took"]
    # the answer ends: complete, or cut off by the proxy (a closed connection), never left hanging
    assert took < IDLE_TIMEOUT + HANG_SLACK - 0.5 and not (resp is not None and resp.stalled), (
        f"{case.id}: the client was held {took:.1f} s by a hanging upstream "
        f"(upstream_timeout={UPSTREAM_TIMEOUT} s, upstream_idle_timeout={IDLE_TIMEOUT} s): {describe(resp)}")
    check_common(world, world.proxy, case, resp, other_before)


@pytest.mark.parametrize("case", NORMAL + HANGING, ids=[c.id for c in NORMAL + HANGING])
def test_zz_flow_file_and_log_hold_no_secret(world, case):
    """Once the shared proxy has stopped (the -w file is flushed): nothing of the case was written."""
    for server in (world.plain, world.tls):
        server.release.set()  # hanging upstreams let go, so the proxy can shut down cleanly
    world.proxy.stop()
    written = world.proxy.everything_written()
    assert len(written) > 1000
    found = leaks(written, world.secrets(case))
    assert not found, f"{case.id}: {found} written to {world.proxy.log_path} or {world.proxy.flows_path}"
