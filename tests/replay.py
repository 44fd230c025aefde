"""Replay recorded registry conversations through the real proxy, offline.

A recording is a mitmproxy flow file written by the proxy (`-- -w FILE`, mitmweb's save, or
`scripts/record`) or built by hand (`scripts/build_flows.py`). Each flow holds the request as the
proxy sent it upstream (credentials redacted), the response as the client saw it (Location and Link
already rewritten), and plain-data metadata: the route (`connector_proxy`), the upstream auth shape
and scopes (`connector_proxy_upstream`), the registry's original Location/Link
(`connector_proxy_upstream_headers`) and the size and digest of streamed bodies
(`connector_proxy_blob`). Hand-built files add `connector_proxy_replay`: what the conversation
shows and where its shape comes from, and flows that the proxy never records itself because they
happen out of band (the `GET /v2/` challenge probe, token fetches, the answer a registry gives to a
request it refuses) or directly between the client and another host (a blob redirect followed to
object storage).

How a replay works (`ReplayWorld`):

- Every host of the recording (the registry, its token realm, object storage) becomes a local
  HTTP server on 127.0.0.1 with its own port. The registry server answers the recorded upstream
  responses in order, matched by method, path and normalised query; the original Locations point
  at the local servers. Its `GET /v2/` challenge and the token endpoint are synthesised from the
  recorded auth metadata (or served from the hand-built probe and token flows); the token endpoint
  issues recognisable placeholder tokens, `replayed-token-<n>`, never a real one.
- A real proxy subprocess (`ProxyProcess`) runs the whole addon chain with one connector per
  recording pointing at its local registry, with freshly generated credentials.
- The harness drives the recorded client requests through the proxy in their recorded form (path
  form, host form via the Host header, the shared ping), with a client token, bodies regenerated at
  their recorded size, and follows Locations like a client does: a follow-up request goes to the
  URL the proxy actually returned.
- It checks what the client sees (status, headers, the Location and Link expected for the replay
  proxy's origin, small bodies, blob sizes) and what the local upstream received (method, path,
  query, the client's headers passed on, the shape of the injected Authorization: the replay's
  token for exactly the recorded scopes, or the connector's Basic credentials; never the client's
  own). Requests that reach storage must come straight from the client, without Authorization.

`scan_flow_file` looks for credentials in a flow file (used by the tests for every file in the
repository, and by `scripts/record` before it keeps a recording). From the command line:

    .venv/bin/python tests/replay.py scan FILE...     # any credential in these files?
    .venv/bin/python tests/replay.py replay FILE...   # replay each through a fresh proxy

See tests/flows/README.md for recording, sharing and turning a recording into a test.
"""

from __future__ import annotations

import base64
import http.client as httpclient
import json
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import yaml
from mitmproxy import http
from mitmproxy import io as mitmio

from addons.rewrite import BLOB_KEY, UPSTREAM_HEADERS_KEY
from connector_store.addresses import parse_host_form
from addons.routing import METADATA_KEY as ROUTE_KEY
from addons.upstream_auth import UPSTREAM_KEY
from addons.upstream_pool import POOLED_KEY

REPO = Path(__file__).resolve().parent.parent
FLOWS_DIR = REPO / "tests" / "flows"
REPLAY_KEY = "connector_proxy_replay"  # hand-built flows: conversation notes and out-of-band flows
REDACTED = "<redacted>"
DIRECT_MARKER = "X-Replay-Direct"  # on requests the harness sends straight to a host, not via the proxy
REPLAY_NAMESPACE = "replay"
OUT_OF_BAND = ("probe", "token", "reject")

# Headers that say how one hop was carried, not what the registry said.
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "trailer"}
NOT_COMPARED = HOP_HEADERS | {"date", "content-length", "server", "location", "link"}
NOT_SENT = HOP_HEADERS | {"host", "authorization", "proxy-authorization", "content-length"}


def flow_files(root: Path = FLOWS_DIR) -> list[Path]:
    return sorted(root.rglob("*.mitm"))


def read_flows(path: Path) -> list[http.HTTPFlow]:
    with path.open("rb") as f:
        return [fl for fl in mitmio.FlowReader(f).stream() if isinstance(fl, http.HTTPFlow)]


def origin_of(url: str) -> str:
    """`https://Reg.example:443/x` -> `https://reg.example`."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    port = parts.port
    default = {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{host}" + (f":{port}" if port and port != default else "")


def with_origin(url: str, origin: str) -> str:
    parts = urlsplit(url)
    o = urlsplit(origin)
    return urlunsplit((o.scheme, o.netloc, parts.path, parts.query, parts.fragment))


def normalised_query(query: str) -> tuple:
    return tuple(sorted(parse_qsl(query, keep_blank_values=True)))


def basic_value(username: str, password: str) -> str:
    return base64.b64encode(f"{username}:{password}".encode()).decode()


_LINK_RE = re.compile(r"<([^>]*)>")
_REALM_RE = re.compile(r'realm="([^"]*)"', re.IGNORECASE)


def map_link(value: str, fn) -> str:
    return _LINK_RE.sub(lambda m: f"<{fn(m.group(1))}>", value)


def link_targets(values: Iterable[str]) -> list[str]:
    return [t for v in values for t in _LINK_RE.findall(v)]


def short(url: str | None, keep: int = 24) -> str | None:
    """A URL for a message: long queries (upload `_state`) shortened."""
    if url is None or "?" not in url:
        return url
    base, _, query = url.partition("?")
    return f"{base}?{query[:keep]}..." if len(query) > keep else url


def error_codes(body: bytes | None) -> list[str] | None:
    try:
        return [e.get("code") for e in json.loads(body or b"")["errors"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


# ---------------------------------------------------------------- the recording


@dataclass
class Exchange:
    """One flow of a recording, classified."""

    index: int
    flow: http.HTTPFlow
    kind: str  # "client" (through the proxy), "direct" (client to another host), or one of OUT_OF_BAND

    @property
    def route(self) -> dict | None:
        r = self.flow.metadata.get(ROUTE_KEY)
        return r if isinstance(r, dict) else None

    @property
    def upstream(self) -> dict:
        return self.flow.metadata.get(UPSTREAM_KEY) or {}

    @property
    def served_by_upstream(self) -> bool:
        """Whether the registry answered (over a connection of the flow's own or of the upstream
        pool), rather than the proxy itself."""
        route = self.route
        carried = self.flow.server_conn.timestamp_start is not None or bool(self.flow.metadata.get(POOLED_KEY))
        return self.kind == "client" and bool(route and route.get("upstream")) and carried

    @property
    def query(self) -> str:
        return self.flow.request.path.partition("?")[2]

    def describe(self) -> str:
        route = self.route
        path = route["path"] if route and route.get("path") and self.kind == "client" else self.flow.request.path
        return f"#{self.index} {self.flow.request.method} {path.partition('?')[0]}"


@dataclass
class Conversation:
    path: Path
    exchanges: list[Exchange]
    info: dict  # conversation notes of a hand-built recording (title, sources, quirks)
    registry: str  # the connector's address as recorded, e.g. https://registry-1.docker.io
    connector: tuple[str, str]  # recorded (namespace, name)
    auth: dict  # {credentials, challenge, realm, service}

    @classmethod
    def load(cls, path: Path) -> Conversation:
        exchanges = []
        info: dict = {}
        for i, fl in enumerate(read_flows(path)):
            if fl.response is None:
                continue
            replay = fl.metadata.get(REPLAY_KEY) or {}
            info = info or replay.get("conversation") or {}
            kind = replay.get("kind") or "client"
            exchanges.append(Exchange(i, fl, kind))
        upstreams = {e.route["upstream"] for e in exchanges if e.route and e.route.get("upstream")}
        connectors = {(e.route["namespace"], e.route["name"]) for e in exchanges if e.route and e.route.get("name")}
        if len(upstreams) > 1 or len(connectors) > 1:
            raise ValueError(f"{path}: a replay covers one connector, found {sorted(connectors)} at {sorted(upstreams)}")
        auth = next((e.upstream["auth"] for e in exchanges if e.upstream.get("auth")), {})
        return cls(path, exchanges, info, next(iter(upstreams), ""), next(iter(connectors), ("", "")), dict(auth))

    def of_kind(self, kind: str) -> list[Exchange]:
        return [e for e in self.exchanges if e.kind == kind]

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def realm(self) -> str:
        """The token realm, from the recorded auth shape or the hand-built probe's challenge."""
        if self.auth.get("realm"):
            return self.auth["realm"]
        for probe in self.of_kind("probe"):
            m = _REALM_RE.search(probe.flow.response.headers.get("www-authenticate", ""))
            if m and self.auth.get("challenge") == "bearer":
                return m.group(1)
        return ""

    def origins(self) -> list[str]:
        """Every host the conversation talks to: the registry first, then realm and storage hosts."""
        found: list[str] = []

        def add(url: str) -> None:
            if urlsplit(url).netloc and url.split(":", 1)[0] in ("http", "https"):
                o = origin_of(url)
                if o not in found:
                    found.append(o)

        if self.registry:
            add(self.registry)
        if self.realm:
            add(self.realm)
        for e in self.exchanges:
            if e.kind != "client":
                add(e.flow.request.url)
            original = e.flow.metadata.get(UPSTREAM_HEADERS_KEY) or {}
            base = e.flow.request.url
            if original.get("location"):
                add(urljoin(base, original["location"]))
            for target in link_targets(original.get("link") or []):
                add(urljoin(base, target))
        return found


# ---------------------------------------------------------------- the local upstream


@dataclass
class Received:
    """A request one of the local servers got."""

    origin: str  # the recorded origin this server stands for
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names
    body_length: int
    kind: str = ""  # "api", "direct", "probe", "token", "reject", "unexpected"
    exchange: int | None = None

    @property
    def authorization(self) -> str:
        return self.headers.get("authorization", "")

    @property
    def params(self) -> list[tuple[str, str]]:
        return parse_qsl(self.query, keep_blank_values=True)


@dataclass
class Expectation:
    exchange: Exchange
    origin: str
    method: str
    path: str
    query: tuple
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    received: Received | None = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: ReplayUpstream, origin: str):
        self.upstream = upstream
        self.origin = origin
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        server: _Server = self.server  # type: ignore[assignment]
        body = self._body()
        path, _, query = self.path.partition("?")
        headers: dict[str, str] = {}
        for k, v in self.headers.items():  # repeated headers (skopeo's Accept) joined, as mitmproxy shows them
            headers[k.lower()] = f"{headers[k.lower()]}, {v}" if k.lower() in headers else v
        received = Received(server.origin, self.command, path, query, headers, len(body))
        status, out_headers, content = server.upstream.answer(received)
        self.send_response_only(status)
        sent_length = False
        for k, v in out_headers:
            if k.lower() in HOP_HEADERS:
                continue
            if k.lower() == "content-length":
                if self.command != "HEAD":
                    continue
                sent_length = True
            self.send_header(k, v)
        if not sent_length:
            self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if self.command != "HEAD" and content:
            self.wfile.write(content)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle


class ReplayUpstream:
    """The recorded hosts of one conversation, served from 127.0.0.1."""

    def __init__(self, conv: Conversation, credentials: dict, forbidden: list[str]):
        self.conv = conv
        self.credentials = credentials  # {"kind": basic|anonymous|bearer, "username", "password", "token"}
        self.forbidden = forbidden  # strings that must never reach a registry (the client's credentials)
        self.lock = threading.Lock()
        self.servers: dict[str, _Server] = {}
        for origin in conv.origins():
            self.servers[origin] = _Server(self, origin)
        self.map = {o: f"http://127.0.0.1:{s.server_address[1]}" for o, s in self.servers.items()}
        self.registry_origin = origin_of(conv.registry) if conv.registry else ""
        self.realm_origin = origin_of(conv.realm) if conv.realm else ""
        self.realm_path = urlsplit(conv.realm).path if conv.realm else ""
        self.received: list[Received] = []
        self.problems: list[str] = []
        self.tokens: dict[str, tuple[tuple[str, ...], str]] = {}
        self.expectations = self._expectations()
        self._threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
                         for s in self.servers.values()]
        for t in self._threads:
            t.start()

    # ---- addresses

    @property
    def address(self) -> str:
        """The connector address for the replay: the local registry, with the recorded path prefix."""
        prefix = urlsplit(self.conv.registry).path.rstrip("/")
        return self.map[self.registry_origin] + prefix

    def upstream_url(self, url: str, base: str = "") -> str:
        """A URL the registry sent, pointed at the local servers (relative ones stay relative)."""
        if url.startswith("//"):
            url = urlsplit(base or self.conv.registry).scheme + ":" + url
        if not urlsplit(url).netloc:
            return url
        o = origin_of(url)
        return with_origin(url, self.map[o]) if o in self.map else url

    def _challenge(self, value: str) -> str:
        return _REALM_RE.sub(lambda m: f'realm="{self.upstream_url(m.group(1))}"', value)

    # ---- what to answer

    def _expectations(self) -> list[Expectation]:
        out = []
        for e in self.conv.exchanges:
            if not (e.served_by_upstream or e.kind == "direct"):
                continue
            fl = e.flow
            resp = fl.response
            original = fl.metadata.get(UPSTREAM_HEADERS_KEY) or {}
            headers = [(k, v) for k, v in resp.headers.items(multi=True) if k.lower() not in ("location", "link")]
            if "location" in resp.headers:
                headers.append(("Location", self.upstream_url(original.get("location") or resp.headers["location"], fl.request.url)))
            for value in original.get("link") or resp.headers.get_all("link"):
                headers.append(("Link", map_link(value, lambda t, u=fl.request.url: self.upstream_url(t, u))))
            if resp.raw_content is not None:
                body = resp.raw_content
            else:  # a streamed blob: only its size was recorded
                blob = fl.metadata.get(BLOB_KEY) or {}
                size = blob.get("size")
                if size is None:
                    size = int(resp.headers.get("content-length", "0") or 0)
                body = b"\0" * (0 if fl.request.method == "HEAD" else size)
            path, _, query = fl.request.path.partition("?")
            out.append(Expectation(e, origin_of(fl.request.url), fl.request.method, path, normalised_query(query),
                                   resp.status_code, headers, body))
        return out

    def expectation_for(self, exchange: Exchange) -> Expectation | None:
        return next((x for x in self.expectations if x.exchange is exchange), None)

    def answer(self, r: Received) -> tuple[int, list[tuple[str, str]], bytes]:
        with self.lock:
            self.received.append(r)
            self._check_not_forbidden(r)
            if r.origin == self.realm_origin and r.path == self.realm_path:
                r.kind = "token"
                return self._token(r)
            if r.origin == self.registry_origin and r.path in ("/v2", "/v2/") and r.method == "GET":
                r.kind = "probe"
                return self._probe()
            reject = self.conv.of_kind("reject")
            if (reject and r.origin == self.registry_origin and r.path.startswith("/v2/")
                    and r.authorization.lower().startswith("basic ")):
                r.kind = "reject"
                self.problems.append(f"the registry got Basic credentials on {r.method} {r.path}, "
                                     f"which it refuses with {reject[0].flow.response.status_code}")
                resp = reject[0].flow.response
                return resp.status_code, list(resp.headers.items(multi=True)), resp.raw_content or b""
            key = (r.origin, r.method, r.path, normalised_query(r.query))
            for x in self.expectations:
                if x.received is None and (x.origin, x.method, x.path, x.query) == key:
                    x.received = r
                    r.kind = "direct" if x.exchange.kind == "direct" else "api"
                    r.exchange = x.exchange.index
                    if r.origin != self.registry_origin and r.origin != self.realm_origin and x.exchange.kind != "direct":
                        self.problems.append(f"{r.origin} got {r.method} {r.path}: not the registry")
                    return x.status, x.headers, x.body
            r.kind = "unexpected"
            self.problems.append(f"{r.origin} got an unexpected {r.method} {r.path}{'?' + r.query if r.query else ''}")
            body = json.dumps({"errors": [{"code": "UNSUPPORTED", "message": "replay: no recorded answer for this request"}]})
            return 418, [("Content-Type", "application/json")], body.encode()

    def _check_not_forbidden(self, r: Received) -> None:
        seen = " ".join([r.query, *r.headers.values()])
        for secret in self.forbidden:
            if secret and secret in seen:
                self.problems.append(f"{r.origin} got the client's own credential with {r.method} {r.path}")

    def _probe(self) -> tuple[int, list[tuple[str, str]], bytes]:
        probes = self.conv.of_kind("probe")
        if probes:
            resp = probes[0].flow.response
            headers = [(k, self._challenge(v) if k.lower() == "www-authenticate" else v)
                       for k, v in resp.headers.items(multi=True)]
            return resp.status_code, headers, resp.raw_content or b""
        kind = self.conv.auth.get("challenge", "bearer" if self.conv.realm else "none")
        api = ("Docker-Distribution-API-Version", "registry/2.0")
        if kind == "none":
            return 200, [("Content-Type", "application/json"), api], b"{}"
        if kind == "basic":
            challenge = 'Basic realm="replay"'
        else:
            service = self.conv.auth.get("service")
            challenge = f'Bearer realm="{self.upstream_url(self.conv.realm)}"' + (f',service="{service}"' if service else "")
        body = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}).encode()
        return 401, [("Content-Type", "application/json"), api, ("WWW-Authenticate", challenge)], body

    def _token(self, r: Received) -> tuple[int, list[tuple[str, str]], bytes]:
        params = r.params
        service = [v for k, v in params if k == "service"]
        scopes = tuple(sorted(v for k, v in params if k == "scope"))
        expected_service = self.conv.auth.get("service") or ""
        if r.method != "GET":
            self.problems.append(f"token endpoint: {r.method} instead of GET")
        if service != ([expected_service] if expected_service else []):
            self.problems.append(f"token endpoint: service {service} instead of {expected_service!r}")
        kind = self.credentials["kind"]
        if kind == "basic":
            want = "Basic " + basic_value(self.credentials["username"], self.credentials["password"])
            if r.authorization != want:
                self.problems.append("token endpoint: the connector's Basic credentials were not sent")
        elif r.authorization:
            self.problems.append(f"token endpoint: an {kind} connector sent {r.authorization.split(' ')[0]} credentials")
        token = f"replayed-token-{len(self.tokens) + 1}"
        self.tokens[token] = (scopes, service[0] if service else "")
        return 200, [("Content-Type", "application/json")], json.dumps(self._token_body(scopes, token)).encode()

    def _token_body(self, scopes: tuple[str, ...], token: str) -> dict:
        templates = self.conv.of_kind("token")
        for t in sorted(templates, key=lambda t: tuple(sorted(v for k, v in t.flow.request.query.items(multi=True) if k == "scope")) != scopes):
            try:
                body = json.loads(t.flow.response.raw_content or b"")
            except ValueError:
                break
            return {k: (token if v == REDACTED else v) for k, v in body.items()}
        return {"token": token, "access_token": token, "expires_in": 300,
                "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    # ---- checks

    def check_authorization(self, x: Expectation) -> str | None:
        """The injected Authorization has the recorded shape, with the replay's own credentials."""
        recorded = x.exchange.flow.request.headers.get("authorization", "")
        got = x.received.authorization if x.received else ""
        if not recorded:
            return f"Authorization {got.split(' ')[0]} sent where the recording has none" if got else None
        scheme = recorded.split(" ", 1)[0].lower()
        got_scheme, _, value = got.partition(" ")
        if got_scheme.lower() != scheme:
            return f"Authorization {got_scheme or 'missing'} where the recording has {scheme.capitalize()}"
        if scheme == "basic":
            want = basic_value(self.credentials.get("username", ""), self.credentials.get("password", ""))
            return None if value == want else "Basic credentials are not the connector's"
        if scheme == "bearer":
            if self.credentials["kind"] == "bearer":
                return None if value == self.credentials["token"] else "Bearer is not the connector's static token"
            if value not in self.tokens:
                return "Bearer token was not issued by the replay's token endpoint"
            scopes, _ = self.tokens[value]
            want = tuple(sorted(x.exchange.upstream.get("scopes") or ()))
            if want and scopes != want:
                return f"Bearer token for scopes {list(scopes)}, the recording needs {list(want)}"
        return None

    def close(self) -> None:
        for s in self.servers.values():
            s.shutdown()
            s.server_close()


# ---------------------------------------------------------------- driving the proxy


@dataclass
class ReplayResult:
    name: str
    problems: list[str]
    exchanges: int
    received: list[Received]
    seconds: float
    client_statuses: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self) -> str:
        lines = [f"replay of {self.name}: {self.exchanges} exchanges, {len(self.problems)} problems, {self.seconds:.2f} s"]
        return "\n".join(lines + [f"  - {p}" for p in self.problems])

    def at(self, origin: str, kind: str | None = None) -> list[Received]:
        """What the local server standing for `origin` received (optionally of one kind)."""
        return [r for r in self.received if r.origin == origin and (kind is None or r.kind == kind)]


@dataclass
class Replay:
    """One recording set up for replay: its local upstream and the connector that points at it."""

    conv: Conversation
    upstream: ReplayUpstream
    namespace: str
    name: str
    used: bool = False

    @property
    def prefix(self) -> str:
        return f"namespaces/{self.namespace}/connectors/{self.name}"


def connector_name(stem: str, n: int) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")[:40].strip("-") or "flow"
    return f"{base}-{n}"


class ReplayWorld:
    """A proxy subprocess and, for each recording added, a local upstream and a connector."""

    def __init__(self, workdir: Path, extra: tuple[str, ...] = ()):
        from proxyproc import ProxyProcess  # tests/ is on sys.path under pytest and in scripts/record

        self.workdir = workdir
        self.connectors_dir = workdir / "connectors"
        self.connectors_dir.mkdir(parents=True, exist_ok=True)
        self.client_token = "replay-client-" + secrets.token_hex(16)
        self.tokens_file = workdir / "client-tokens.yaml"
        self.tokens_file.write_text(yaml.safe_dump({"tokens": [
            {"token": self.client_token, "subject": "replay:client", "connectors": ["*"]},
        ]}))
        # The recordings were made with the Basic challenge (clients there send Basic credentials
        # right away); the Bearer token flow is covered by the live client tests.
        self.proxy = ProxyProcess(workdir, self.connectors_dir, self.tokens_file,
                                  extra=("--set", "client_challenge=basic", *extra))
        self.replays: list[Replay] = []
        self.secrets: list[str] = [self.client_token]

    @property
    def client_authorization(self) -> str:
        return "Basic " + basic_value("replay", self.client_token)

    def add(self, path: Path) -> Replay:
        from proxyproc import connector, secret, write_manifests

        conv = Conversation.load(path)
        kind = conv.auth.get("credentials") or "basic"
        creds: dict = {"kind": kind}
        name = connector_name(conv.name, len(self.replays) + 1)
        docs: list[dict] = []
        if kind == "basic":
            creds.update(username="replay-user", password="replay-pw-" + secrets.token_hex(12))
            docs.append(secret(REPLAY_NAMESPACE, f"{name}-secret", creds["username"], creds["password"]))
            self.secrets.append(creds["password"])
        elif kind == "bearer":
            creds["token"] = "replay-static-" + secrets.token_hex(12)
            docs.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                         "metadata": {"name": f"{name}-secret", "namespace": REPLAY_NAMESPACE},
                         "stringData": {"token": creds["token"]}})
            self.secrets.append(creds["token"])
        upstream = ReplayUpstream(conv, creds, [self.client_token, basic_value("replay", self.client_token)])
        docs.insert(0, connector(REPLAY_NAMESPACE, name, upstream.address, f"{name}-secret" if docs else None))
        write_manifests(self.connectors_dir, f"{name}.yaml", docs)
        replay = Replay(conv, upstream, REPLAY_NAMESPACE, name)
        self.replays.append(replay)
        if self.proxy.proc is not None:  # added while running: wait until the proxy knows the connector
            self.proxy.wait_for(lambda: self._knows(replay), timeout=10)
        return replay

    def _knows(self, replay: Replay) -> bool:
        r = self.proxy.request("GET", f"/v2/{replay.prefix}/", auth=self.client_authorization)
        return r.status == 200

    def start(self) -> ReplayWorld:
        self.proxy.start()
        return self

    def close(self) -> None:
        self.proxy.stop()
        for r in self.replays:
            r.upstream.close()

    def issued_tokens(self) -> list[str]:
        return [t for r in self.replays for t in r.upstream.tokens]

    def __enter__(self) -> ReplayWorld:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the replay itself

    def replay(self, replay: Replay | Path) -> ReplayResult:
        if isinstance(replay, Path):
            replay = self.add(replay)
        if replay.used:  # expectations are consumed and tokens cached: a second run needs a fresh connector
            replay = self.add(replay.conv.path)
        replay.used = True
        return _Driver(self, replay).run()


class _Driver:
    def __init__(self, world: ReplayWorld, replay: Replay):
        self.world = world
        self.replay = replay
        self.conv = replay.conv
        self.up = replay.upstream
        self.problems: list[str] = []
        self.followed: dict[str, str] = {}  # expected URL -> the URL the proxy actually gave the client
        self.statuses: list[int] = []
        self.upload_offsets: dict[str, int] = {}  # upload path -> bytes sent so far (chunked PATCHes)
        self.sent: dict[int, int] = {}  # exchange index -> request body bytes the client sent
        self.proxy_netloc = world.proxy.host

    # ---- addresses in the replay world

    def origin_for(self, route: dict | None) -> str:
        if route and route.get("form") == "host":
            return f"http://c-{self.replay.name}.{self.replay.namespace}.svc.cluster.local:{self.world.proxy.port}"
        return f"http://{self.proxy_netloc}"

    def client_url(self, e: Exchange) -> str:
        """Where the recorded client request goes in the replay (before following Locations)."""
        route = e.route
        if e.kind == "direct":
            return self.up.upstream_url(e.flow.request.url)
        if route is None:
            return f"http://{self.proxy_netloc}{e.flow.request.path}"
        query = e.query
        if route["form"] == "ping":
            path = "/v2/"
        elif route["form"] == "path":
            path = f"/v2/{self.replay.prefix}{route['path'][len('/v2'):]}"
            params = parse_qsl(query, keep_blank_values=True)
            if any(k == "mount" for k, _ in params) and any(k == "from" for k, _ in params):
                query = urlencode([(k, f"{self.replay.prefix}/{v}" if k == "from" else v) for k, v in params])
        else:
            path = route["path"]
        return self.origin_for(route) + path + (f"?{query}" if query else "")

    def expected_client_url(self, url: str, e: Exchange) -> str:
        """A URL as the client saw it in the recording, as it must look in the replay."""
        if not urlsplit(url).netloc:
            return url
        route = e.route or {}
        if route.get("origin") and origin_of(url) == origin_of(route["origin"]):
            parts = urlsplit(url)
            path = parts.path
            recorded = f"/v2/{route['prefix']}/" if route.get("prefix") else None
            if recorded and path.startswith(recorded):
                path = f"/v2/{self.replay.prefix}/" + path[len(recorded):]
            origin = urlsplit(self.origin_for(route))
            return urlunsplit((origin.scheme, origin.netloc, path, parts.query, parts.fragment))
        return self.up.upstream_url(url)

    def target(self, url: str) -> tuple[int, bool] | None:
        """(port, through the proxy) for a URL, or None when it points nowhere the replay serves."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.netloc == self.proxy_netloc or (parse_host_form(parts.netloc) is not None and parts.port == self.world.proxy.port):
            return self.world.proxy.port, True
        if host == "127.0.0.1" and any(origin_of(url) == o for o in self.up.map.values()):
            return parts.port or 80, False
        return None

    # ---- running

    def run(self) -> ReplayResult:
        started = time.monotonic()
        count = 0
        for e in self.conv.exchanges:
            if e.kind in OUT_OF_BAND:
                continue
            count += 1
            try:
                self.exchange(e)
            except (OSError, httpclient.HTTPException) as exc:
                self.problems.append(f"{e.describe()}: {type(exc).__name__}: {exc}")
        for x in self.up.expectations:
            if x.received is None:
                self.problems.append(f"{x.exchange.describe()}: never reached {x.origin}")
        with self.up.lock:
            problems = self.problems + self.up.problems
            received = list(self.up.received)
        return ReplayResult(self.conv.name, problems, count, received, time.monotonic() - started, self.statuses)

    def exchange(self, e: Exchange) -> None:
        fl = e.flow
        expected_url = self.client_url(e)
        url = self.followed.get(expected_url, expected_url)
        where = self.target(url)
        if where is None:
            self.problems.append(f"{e.describe()}: the client was sent to {url}, which is nowhere the replay serves")
            return
        port, via_proxy = where
        headers = [(k, v) for k, v in fl.request.headers.items(multi=True) if k.lower() not in NOT_SENT]
        parts = urlsplit(url)
        headers.append(("Host", parts.netloc))
        proxy_answered_401 = fl.response.status_code == 401 and not e.served_by_upstream
        if via_proxy and e.kind == "client" and e.route is not None and not proxy_answered_401:
            headers.append(("Authorization", self.world.client_authorization))
        if not via_proxy:
            headers.append((DIRECT_MARKER, "1"))
        if e.kind == "direct" and via_proxy:
            self.problems.append(f"{e.describe()}: a redirect the client follows to another host leads back to the proxy")
        body = fl.request.raw_content
        chunked = "chunked" in fl.request.headers.get("transfer-encoding", "").lower()
        if body is None:  # a streamed upload: regenerate it at its recorded size
            body = b"\0" * self.upload_size(e)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        status, resp_headers, resp_body = self.send(port, fl.request.method, target, headers, body, chunked)
        self.sent[e.index] = len(body)
        self.note_upload_offset(e)
        self.check_no_upstream_secret(e, resp_headers, resp_body)
        self.statuses.append(status)
        self.check_client_view(e, url, status, resp_headers, resp_body)
        if e.served_by_upstream or e.kind == "direct":
            self.check_upstream_view(e)

    def upload_size(self, e: Exchange) -> int:
        """The size of a streamed upload: its Content-Length, or for a chunked one, what the registry
        acknowledged (`Range: 0-<last>`) beyond what earlier chunks of the same upload sent."""
        length = e.flow.request.headers.get("content-length", "")
        if length.isdigit():
            return int(length)
        m = re.match(r"^\s*(\d+)-(\d+)\s*$", e.flow.response.headers.get("range", ""))
        if not m:
            return 0
        return max(0, int(m.group(2)) + 1 - self.upload_offsets.get(self.upload_key(e), 0))

    def upload_key(self, e: Exchange) -> str:
        return (e.route or {}).get("path") or e.flow.request.path.partition("?")[0]

    def note_upload_offset(self, e: Exchange) -> None:
        m = re.match(r"^\s*(\d+)-(\d+)\s*$", e.flow.response.headers.get("range", ""))
        if m and e.flow.request.method == "PATCH":
            self.upload_offsets[self.upload_key(e)] = int(m.group(2)) + 1

    def send(self, port: int, method: str, target: str, headers: list[tuple[str, str]], body: bytes,
             chunked: bool = False):
        conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=20)
        try:
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                conn.putheader(k, v)
            if chunked:  # as the client sent it (buildah and podman stream layers this way)
                conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
                conn.send((f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n")
            else:
                if body or method in ("POST", "PUT", "PATCH"):
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, http.Headers([(k.encode(), v.encode()) for k, v in resp.getheaders()]), data
        finally:
            conn.close()

    def check_client_view(self, e: Exchange, url: str, status: int, headers: http.Headers, body: bytes) -> None:
        fl = e.flow
        recorded = fl.response
        what = e.describe()
        if status != recorded.status_code:
            detail = body[:300].decode(errors="replace") if status >= 400 else ""
            self.problems.append(f"{what}: client got {status}, recorded {recorded.status_code} {detail}".rstrip())
            return
        # Location and Link, as the proxy must rewrite them for the replay proxy's origin.
        if "location" in recorded.headers:
            expected = self.expected_client_url(recorded.headers["location"], e)
            got = headers.get("location")
            if got != expected:
                self.problems.append(f"{what}: Location {short(got)!r}, expected {short(expected)!r}")
            if got is not None:
                self.followed[expected] = urljoin(url, got)
        elif "location" in headers:
            self.problems.append(f"{what}: unexpected Location {headers['location']!r}")
        want_links = [map_link(v, lambda t: self.expected_client_url(t, e)) for v in recorded.headers.get_all("link")]
        got_links = headers.get_all("link")
        if want_links != got_links:
            self.problems.append(f"{what}: Link {got_links}, expected {want_links}")
        for expected_target, got_target in zip(link_targets(want_links), link_targets(got_links)):
            self.followed[expected_target] = urljoin(url, got_target)
        if e.served_by_upstream or e.kind == "direct":
            for name in {k.lower() for k in recorded.headers}:
                if name in NOT_COMPARED:
                    continue
                if recorded.headers.get_all(name) != headers.get_all(name):
                    self.problems.append(f"{what}: header {name} {headers.get_all(name)}, recorded {recorded.headers.get_all(name)}")
            if fl.request.method != "HEAD":
                if recorded.raw_content is not None:
                    if body != recorded.raw_content:
                        self.problems.append(f"{what}: body differs from the recorded one ({len(body)} vs {len(recorded.raw_content)} bytes)")
                else:
                    size = (fl.metadata.get(BLOB_KEY) or {}).get("size")
                    if size is None and recorded.headers.get("content-length", "").isdigit():
                        size = int(recorded.headers["content-length"])
                    if size is not None and len(body) != size:
                        self.problems.append(f"{what}: blob of {len(body)} bytes, recorded {size}")
        else:  # answered by the proxy itself: same kind of answer (the wording names other connectors)
            for name in ("content-type", "www-authenticate"):
                if recorded.headers.get(name) != headers.get(name):
                    self.problems.append(f"{what}: {name} {headers.get(name)!r}, recorded {recorded.headers.get(name)!r}")
            if error_codes(recorded.raw_content) != error_codes(body):
                self.problems.append(f"{what}: errors {error_codes(body)}, recorded {error_codes(recorded.raw_content)}")

    def check_upstream_view(self, e: Exchange) -> None:
        x = self.up.expectation_for(e)
        if x is None or x.received is None:
            return  # reported once at the end
        what = e.describe()
        r = x.received
        if e.kind == "direct":
            if r.authorization:
                self.problems.append(f"{what}: {x.origin} got an Authorization header")
            if DIRECT_MARKER.lower() not in r.headers:
                self.problems.append(f"{what}: {x.origin} was reached through the proxy, not by the client")
            return
        if DIRECT_MARKER.lower() in r.headers:
            self.problems.append(f"{what}: the client reached the registry directly, bypassing the proxy")
        problem = self.up.check_authorization(x)
        if problem:
            self.problems.append(f"{what}: {problem}")
        for name in {k.lower() for k in e.flow.request.headers}:
            if name in NOT_SENT:
                continue
            value = ", ".join(e.flow.request.headers.get_all(name))
            if r.headers.get(name) != value:
                self.problems.append(f"{what}: upstream got {name}: {r.headers.get(name.lower())!r}, recorded {value!r}")
        if r.body_length != self.sent.get(e.index, 0):
            self.problems.append(f"{what}: upstream got a body of {r.body_length} bytes, the client sent {self.sent.get(e.index, 0)}")

    def check_no_upstream_secret(self, e: Exchange, headers: http.Headers, body: bytes) -> None:
        """Upstream credentials and tokens never reach the client."""
        creds = self.up.credentials
        secrets_ = [*self.up.tokens, creds.get("password", ""), creds.get("token", "")]
        if creds.get("password"):
            secrets_.append(basic_value(creds["username"], creds["password"]))
        seen = " ".join(f"{k}: {v}" for k, v in headers.items(multi=True)).encode() + b" " + body
        if any(s and s.encode() in seen for s in secrets_):
            self.problems.append(f"{e.describe()}: an upstream credential reached the client")


# ---------------------------------------------------------------- credentials in flow files


# Placeholders that are fine to find: redacted values and made-up example values.
PLACEHOLDER_RE = re.compile(r"^(<redacted[^>]*>|[A-Za-z]+ <redacted>|.*EXAMPLE.*)$")
SECRET_HEADERS = {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-registry-auth",
                  "x-amz-security-token", "x-api-key", "private-token", "x-auth-token"}
SECRET_FIELDS = {"token", "access_token", "refresh_token", "id_token", "password", "secret", "identitytoken",
                 "registrytoken", "auth", "client_secret"}
SECRET_PARAMS = {"token", "access_token", "password", "secret", "sig", "signature", "x-amz-signature",
                 "x-amz-credential", "x-amz-security-token", "verify", "x-goog-signature", "x-goog-credential",
                 "refresh_token", "code"}
SECRET_PATTERNS = [
    ("a JWT", re.compile(rb"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")),
    # Basic: base64 that decodes to user:password (not prose such as "Basic credentials").
    ("Basic credentials", re.compile(rb"(?i)\bbasic\s+([A-Za-z0-9+/]{6,}={0,2})(?![A-Za-z0-9+/=])")),
    # Bearer: a long token with digits in it (prose like "Bearer accepted" is neither).
    ("a Bearer token", re.compile(rb"(?i)\bbearer\s+(?=[A-Za-z._~+/-]*[0-9])([A-Za-z0-9._~+/-]{16,}=*)")),
    ("an AWS access key id", re.compile(rb"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("a GitHub token", re.compile(rb"\bgh[pousr]_[A-Za-z0-9]{20,}")),
    ("a GitLab token", re.compile(rb"\bglpat-[A-Za-z0-9_-]{16,}")),
    ("a private key", re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
    ("a test-world secret", re.compile(rb"\b(?:regpw|readpw|htpw|web)-[0-9a-f]{16,}|\b(?:cli|team)-[0-9a-f]{32}")),
    ("a replay secret", re.compile(rb"replay-(?:pw|client|static)-[0-9a-f]{16,}|replayed-token-\d+")),
]


def _json_secrets(data: object, where: str) -> list[str]:
    found = []
    if isinstance(data, dict):
        for k, v in data.items():
            if isinstance(k, str) and k.lower() in SECRET_FIELDS and isinstance(v, str) and v and not PLACEHOLDER_RE.match(v):
                found.append(f"{where}: JSON field {k!r} holds a value")
            found += _json_secrets(v, where)
    elif isinstance(data, list):
        for v in data:
            found += _json_secrets(v, where)
    return found


def _url_secrets(url: str, where: str) -> list[str]:
    return [f"{where}: query parameter {k!r} holds a value"
            for k, v in parse_qsl(urlsplit(url).query, keep_blank_values=True)
            if k.lower() in SECRET_PARAMS and v and not PLACEHOLDER_RE.match(v)]


def _is_basic_pair(value: bytes) -> bool:
    try:
        decoded = base64.b64decode(value + b"=" * (-len(value) % 4), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return False
    return ":" in decoded and decoded.isprintable()


def scan_flows(flows: list[http.HTTPFlow], raw: bytes = b"", known: Iterable[str] = ()) -> list[str]:
    """Every credential-looking thing in these flows (and the raw file bytes), as readable findings."""
    findings: list[str] = []
    for i, fl in enumerate(flows):
        for side, msg in (("request", fl.request), ("response", fl.response)):
            if msg is None:
                continue
            where = f"flow #{i} {side}"
            for name, value in msg.headers.items(multi=True):
                if name.lower() in SECRET_HEADERS and not PLACEHOLDER_RE.match(value):
                    findings.append(f"{where}: header {name} is not redacted")
                if name.lower() in ("location", "link", "content-location"):
                    for url in link_targets([value]) if name.lower() == "link" else [value]:
                        findings += _url_secrets(url, f"{where} {name}")
            if side == "request":
                findings += _url_secrets(fl.request.url, f"{where} URL")
            content = msg.raw_content
            if content and content.lstrip()[:1] in (b"{", b"["):
                try:
                    findings += _json_secrets(json.loads(content), f"{where} body")
                except ValueError:
                    pass
        original = fl.metadata.get(UPSTREAM_HEADERS_KEY) or {}
        for url in [original.get("location") or "", *link_targets(original.get("link") or [])]:
            findings += _url_secrets(url, f"flow #{i} original Location/Link")
    for label, pattern in SECRET_PATTERNS:
        for m in pattern.finditer(raw):
            if label == "Basic credentials" and not _is_basic_pair(m.group(1)):
                continue
            findings.append(f"{label} in the file: {m.group(0)[:12]!r}...")
    for secret in known:
        if secret and (secret.encode() in raw or base64.b64encode(secret.encode()) in raw):
            findings.append("a known secret of the recording session is in the file")
    return findings


def scan_flow_file(path: Path, known: Iterable[str] = (), known_basic: Iterable[tuple[str, str]] = ()) -> list[str]:
    """Findings for one flow file; `known`: secrets of the session, `known_basic`: (user, password) pairs."""
    raw = path.read_bytes()
    return scan_flows(read_flows(path), raw, known) + [
        "the Basic form of a known credential is in the file"
        for user, password in known_basic if basic_value(user, password).encode() in raw
    ]


def write_flows(path: Path, flows: list[http.HTTPFlow]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        writer = mitmio.FlowWriter(f)
        for fl in flows:
            writer.add(fl)
    tmp.rename(path)


def main(argv: list[str] | None = None) -> int:
    """`python tests/replay.py scan FILE...` / `python tests/replay.py replay FILE...`."""
    import argparse
    import sys
    import tempfile

    p = argparse.ArgumentParser(prog="tests/replay.py", description="Scan or replay recorded registry conversations.")
    p.add_argument("action", choices=["scan", "replay"])
    p.add_argument("files", nargs="+", type=Path)
    ns = p.parse_args(argv)
    failed = 0
    if ns.action == "scan":
        for path in ns.files:
            findings = scan_flow_file(path)
            failed += bool(findings)
            print(f"{path}: {'no credential found' if not findings else 'CREDENTIALS FOUND'}")
            for f in findings:
                print(f"  - {f}")
        return 1 if failed else 0
    with tempfile.TemporaryDirectory(prefix="replay-") as tmp, ReplayWorld(Path(tmp)) as world:
        for path in ns.files:
            result = world.replay(path)
            failed += not result.ok
            print(result.report())
    sys.stdout.flush()
    return 1 if failed else 0


__all__ = [
    "DIRECT_MARKER",
    "FLOWS_DIR",
    "REDACTED",
    "REPLAY_KEY",
    "Conversation",
    "Exchange",
    "Received",
    "Replay",
    "ReplayResult",
    "ReplayUpstream",
    "ReplayWorld",
    "flow_files",
    "origin_of",
    "read_flows",
    "scan_flow_file",
    "scan_flows",
    "write_flows",
]


if __name__ == "__main__":
    raise SystemExit(main())
