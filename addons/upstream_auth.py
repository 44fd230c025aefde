"""Upstream credentials: the registry's challenge, the token flow, a token cache, one retry on 401.

A streamed upload cannot be replayed after a 401, so the scope is computed and the token fetched
*before* the request is forwarded (pre-authorization). The challenge (realm, service) is learnt once
per connector by probing `GET /v2/`. Tokens are cached per (connector, credential version, realm,
service, scopes) until shortly before they expire, and concurrent requests for one key share one
fetch (single flight): skopeo opens a connection per request and buildkit pushes layers in
parallel, and token traffic must not grow with either.

Secrecy: the header is handed to the scrub addon's `LateSecrets`, which sets it at the last moment
before the request goes out, after everything that records flows has seen it (see scrub.py).
Neither upstream credentials nor upstream tokens are ever returned to the client; the registry's
own 401 challenge never reaches it either.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import hashlib
import ipaddress
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlencode

import publicsuffix2
import urllib3
from mitmproxy import ctx, http

from addons import oci
from addons.client_auth import CHALLENGE, ClientAuth
from addons.record import Exchange, OutOfBandRecorder, make_exchange
from addons.gate import fail_closed
from addons.rewrite import SMALL_BODY, rewrite_response_headers
from addons.routing import Route, retarget
from addons.scrub import LateSecrets
from addons.store import ConnectorStore
from connector_store.model import Address, Connector, Credentials

logger = logging.getLogger(__name__)

UPSTREAM_KEY = "connector_proxy_upstream"  # flow.metadata: scopes and auth kind (no secrets)
DEFAULT_TOKEN_LIFETIME = 60  # the token spec's default for a missing expires_in
CHALLENGE_TTL = 300.0
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}


class UpstreamError(Exception):
    """A failure talking to the registry or its token server, phrased for the client."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code

    def response(self, request: http.Request) -> http.Response:
        return oci.refusal(request, self.status, self.code, str(self))


@dataclass(frozen=True)
class UpstreamChallenge:
    kind: Literal["bearer", "basic", "none"]
    realm: oci.Realm | None = None  # parsed once, when the challenge is learnt
    service: str = ""


@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)
    lifetime: float  # seconds to reuse it for, counted from when it was asked for


class TokenResponseError(ValueError):
    """A token server's answer that holds no usable token."""


MAX_TOKEN_LIFETIME = 24 * 3600.0
MAX_TOKEN_LENGTH = 64 * 1024


def parse_token_response(body: bytes) -> tuple[str, float]:
    """(token, expires_in seconds) from a token server's JSON; raises only TokenResponseError.

    `expires_in` missing, not a number, not finite or not positive means the spec's default (60 s);
    absurd values are capped at a day (the cache keeps tokens for half their life at most anyway).
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise TokenResponseError("not JSON") from None
    if not isinstance(doc, dict):
        raise TokenResponseError("not a JSON object")
    value = doc.get("token") or doc.get("access_token")
    if not isinstance(value, str) or not value or len(value) > MAX_TOKEN_LENGTH or not _PRINTABLE_RE.fullmatch(value):
        raise TokenResponseError("no token in it")
    expires_in = doc.get("expires_in")
    lifetime = float(DEFAULT_TOKEN_LIFETIME)
    if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool):
        try:
            candidate = float(expires_in)
        except OverflowError:  # a 400-digit integer
            candidate = MAX_TOKEN_LIFETIME
        if math.isfinite(candidate) and candidate > 0:
            lifetime = min(candidate, MAX_TOKEN_LIFETIME)
    return value, lifetime


_PRINTABLE_RE = re.compile(r"[\x21-\x7e]+")


def cache_lifetime(expires_in: float) -> float:
    """How long to reuse a token: well before it expires, so a request never carries a dead one."""
    return max(expires_in / 2, expires_in - 30)


def realm_refusal(address: Address, realm: oci.Realm) -> str | None:
    """Why the Secret's credentials must not go to this realm, or None when they may.

    Allowed: the registry's host, or a host in its registrable domain (auth.docker.io for
    registry-1.docker.io); https, or http only if the registry itself is plain http.
    IP addresses and single-label hosts must match exactly. Any port (token servers often
    listen on their own). The realm was parsed strictly (`oci.parse_realm`), and the request
    is built from the same parts, so the host checked here is the host called.
    """
    host = realm.host
    if realm.scheme == "http" and address.scheme != "http":
        return f"token realm http://{realm.netloc} is plain http while the registry uses https"
    if host == address.host:
        return None
    try:
        ipaddress.ip_address(address.host)
        return f"token realm host {host} differs from the registry's address {address.host}"
    except ValueError:
        pass
    # The registrable domain (public suffix list): auth.docker.io serves registry-1.docker.io,
    # but attacker.co.uk does not serve myreg.co.uk.
    domain = publicsuffix2.get_sld(address.host) or address.host
    if "." in domain and (host == domain or host.endswith("." + domain)):
        return None
    return f"token realm host {host} is outside the registry's domain {domain}"


class SingleFlightCache:
    """An expiring cache where concurrent misses for one key wait on a single computation.

    Bounded: past `max_entries` the oldest entries go (they are re-fetched when needed)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_entries: int = 4096):
        self.clock = clock
        self.max_entries = max_entries
        self._values: dict[Hashable, tuple[Any, float]] = {}
        self._inflight: dict[Hashable, asyncio.Future] = {}
        self.hits = 0
        self.misses = 0

    async def get(self, key: Hashable, compute: Callable[[], Awaitable[tuple[Any, float]]]) -> Any:
        """`compute` returns (value, seconds to keep it), counted from when the computation started."""
        cached = self._values.get(key)
        now = self.clock()
        if cached and cached[1] > now:
            self.hits += 1
            return cached[0]
        task = self._inflight.get(key)
        if task is None:
            self.misses += 1
            # Its own task: a caller that gives up (client hung up) must not cancel the others' fetch.
            task = self._inflight[key] = asyncio.ensure_future(self._compute(key, compute, now))
        else:
            self.hits += 1
        return await asyncio.shield(task)

    async def _compute(self, key: Hashable, compute, started: float) -> Any:
        try:
            value, ttl = await compute()
            self._purge_expired()
            while len(self._values) >= self.max_entries:
                del self._values[next(iter(self._values))]  # dicts keep insertion order: the oldest
            self._values[key] = (value, started + ttl)
            return value
        finally:
            del self._inflight[key]

    def _purge_expired(self) -> None:
        now = self.clock()
        for k in [k for k, (_, expires) in self._values.items() if expires <= now]:
            del self._values[k]

    def peek(self, key: Hashable) -> Any:
        """The cached value for `key` (expired or not), or None; never computes."""
        cached = self._values.get(key)
        return cached[0] if cached else None

    def drop(self, predicate: Callable[[Hashable], bool]) -> int:
        doomed = [k for k in self._values if predicate(k)]
        for k in doomed:
            del self._values[k]
        return len(doomed)

    def __len__(self) -> int:
        return len(self._values)


def basic_header(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


class UpstreamWork:
    """Blocking registry calls (probes, token fetches, retries) off the event loop, isolated per tenant.

    One bounded pool of threads; each connector may hold at most `per_connector` of them at once,
    and its further calls queue on its own semaphore, not in the pool. A registry whose token
    server takes 25 s therefore delays its own requests, never another connector's (asyncio's
    default executor, shared with everything, has 6 threads on 2 cores).
    """

    def __init__(self, workers: int = 64, per_connector: int = 4):
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="upstream")
        self.per_connector = per_connector
        self._slots: dict[str, asyncio.Semaphore] = {}

    async def run(self, connector_key: str, fn: Callable[..., Any], *args: Any) -> Any:
        slots = self._slots.get(connector_key)
        if slots is None:
            slots = self._slots[connector_key] = asyncio.Semaphore(self.per_connector)
        async with slots:
            return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))

    def forget(self, keep: set[str]) -> None:
        """Drop the slots of connectors that are gone (and not in use)."""
        for key in [k for k, sem in self._slots.items() if k not in keep and not sem.locked()]:
            del self._slots[key]

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


MAX_ANSWER = 1024 * 1024  # what a probe or token answer may be: JSON of a few KiB in practice


@dataclass(frozen=True)
class Answer:
    """A registry's or token server's answer, read whole but bounded."""

    status: int
    headers: Any  # urllib3's HTTPHeaderDict: case-insensitive
    data: bytes
    truncated: bool = False


class RegistryClient:
    """Blocking HTTP to registries and token servers (run in threads), with verified TLS."""

    def __init__(self, timeout: float = 30.0, insecure: bool = False, ca_file: str | None = None,
                 observer: Callable[[Exchange], None] | None = None):
        self.observer = observer  # told about probes and token fetches, redacted (recordings)
        self.timeout = urllib3.Timeout(connect=min(timeout, 10.0), read=timeout)
        self.insecure = insecure
        self.ca_file = ca_file
        self._pools: dict[str, urllib3.PoolManager] = {}

    def _pool(self, connector: Connector) -> urllib3.PoolManager:
        # The trust decision of mitmproxy's own upstream connections (upstream_trust): OpenSSL, the
        # base (ssl_verify_upstream_trusted_ca, else certifi) plus this connector's CA, curl's flags.
        from addons.upstream_trust import current_trusted_confdir, registry_ssl_context

        capath = current_trusted_confdir()
        key = hashlib.sha256((connector.ca_pem or "").encode()).hexdigest() + "\0" + (capath or "")
        pool = self._pools.get(key)
        if pool is None:
            context = registry_ssl_context(connector.ca_pem, self.ca_file, self.insecure, base_capath=capath)
            # maxsize: as many kept connections per host as a connector may have calls in flight
            pool = self._pools[key] = urllib3.PoolManager(ssl_context=context, retries=False, timeout=self.timeout,
                                                          maxsize=8)
        return pool

    def send(
        self, connector: Connector, method: str, scheme: str, host: str, port: int, target: str,
        headers: dict[str, str] | None = None, kind: str = "", preload: bool = True,
    ) -> Answer | urllib3.BaseHTTPResponse:
        """One request, built from parts parsed once (never from a URL string parsed again).

        With `preload` (probes, token fetches) the answer is read here, at most `MAX_ANSWER` bytes
        of it: a registry or token server that sends hundreds of MiB costs nothing. `kind`
        ("probe", "token") names an out-of-band exchange worth recording. `preload=False` returns
        the response unread (the caller reads what it can afford and releases the connection).
        """
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            pool = self._pool(connector).connection_from_host(host, port, scheme)
            resp = pool.urlopen(
                method, target, headers=headers or {}, redirect=False, retries=False,
                decode_content=False, preload_content=False, assert_same_host=False,
            )
            if not preload:
                return resp
            body = resp.read(MAX_ANSWER + 1)
            truncated = len(body) > MAX_ANSWER
            if truncated:
                resp.close()  # the rest is never read: the connection cannot be reused
                body = body[:MAX_ANSWER]
            else:
                resp.release_conn()
            answer = Answer(resp.status, resp.headers, body, truncated)
            if kind and self.observer:
                self.observer(make_exchange(kind, method, f"{scheme}://{netloc}{target}", headers or {}, answer.status,
                                            list(answer.headers.items()), answer.data))
            return answer
        except urllib3.exceptions.SSLError as e:
            raise UpstreamError(502, "UNAVAILABLE", f"connector {connector.key}: TLS verification of {netloc} failed: {_reason(e)}") from None
        except urllib3.exceptions.NewConnectionError as e:  # a subclass of ConnectTimeoutError
            raise UpstreamError(502, "UNAVAILABLE", f"connector {connector.key}: {netloc} unreachable: {_reason(e)}") from None
        except (urllib3.exceptions.ConnectTimeoutError, urllib3.exceptions.ReadTimeoutError):
            raise UpstreamError(504, "UNAVAILABLE", f"connector {connector.key}: {netloc} timed out") from None
        except urllib3.exceptions.HTTPError as e:
            raise UpstreamError(502, "UNAVAILABLE", f"connector {connector.key}: {netloc} unreachable: {_reason(e)}") from None

    def probe(self, connector: Connector) -> UpstreamChallenge:
        address = connector.address
        assert address
        resp = self.send(connector, "GET", address.scheme, address.host, address.port, address.path_prefix + "/v2/",
                         kind="probe")
        if resp.status == 401:
            challenge = oci.pick_challenge(oci.parse_www_authenticate(resp.headers.get("WWW-Authenticate", "")))
            if challenge and challenge.scheme == "bearer" and challenge.realm:
                try:
                    realm = oci.parse_realm(challenge.realm)
                except oci.RealmError as e:
                    raise UpstreamError(502, "UNAVAILABLE", f"connector {connector.key}: {address.netloc} sent an unusable token realm: {e}") from None
                return UpstreamChallenge("bearer", realm, challenge.service or "")
            if challenge and challenge.scheme == "basic":
                return UpstreamChallenge("basic")
            raise UpstreamError(502, "UNAVAILABLE", f"connector {connector.key}: {address.netloc} sent an unusable challenge")
        if resp.status < 400:
            return UpstreamChallenge("none")
        raise UpstreamError(502, "UNAVAILABLE", f"connector {connector.key}: {address.netloc} answered GET /v2/ with HTTP {resp.status}")

    def fetch_token(self, connector: Connector, challenge: UpstreamChallenge, scopes: tuple[str, ...]) -> Token:
        assert connector.address and connector.credentials and challenge.realm
        creds = connector.credentials
        realm = challenge.realm
        query = [("service", challenge.service)] if challenge.service else []
        query += [("scope", s) for s in scopes]
        headers = {}
        if creds.kind == "basic":
            refusal = realm_refusal(connector.address, realm)
            if refusal:
                raise UpstreamError(502, "DENIED", f"connector {connector.key}: credentials withheld: {refusal}")
            headers["Authorization"] = basic_header(creds.username, creds.password)
        resp = self.send(connector, "GET", realm.scheme, realm.host, realm.port, realm.with_query(urlencode(query)),
                         headers, kind="token")
        if resp.status in (401, 403):
            raise UpstreamError(502, "UNAUTHORIZED", f"connector {connector.key}: the token server {realm.netloc} rejected the connector's credentials (HTTP {resp.status})")
        if resp.status != 200:
            raise UpstreamError(502, "UNAVAILABLE", f"connector {connector.key}: the token server {realm.netloc} answered HTTP {resp.status}")
        if resp.truncated:
            raise UpstreamError(502, "UNAVAILABLE", f"connector {connector.key}: the token server {realm.netloc} sent more than {MAX_ANSWER} bytes")
        try:
            value, expires_in = parse_token_response(resp.data)
        except TokenResponseError as e:
            raise UpstreamError(502, "UNAVAILABLE", f"connector {connector.key}: the token server {realm.netloc} sent no usable token ({e})") from None
        return Token(value, cache_lifetime(expires_in))


def _reason(e: Exception) -> str:
    reason = getattr(e, "reason", None) or e
    return str(reason).split(": ", 1)[-1][:200]


class UpstreamCredentials:
    def __init__(self, store: ConnectorStore, secrets: LateSecrets, recorder: OutOfBandRecorder | None = None,
                 client_auth: ClientAuth | None = None):
        self.store = store
        self.client_auth = client_auth  # for the proxy's own challenge when the client must retry
        self.secrets = secrets
        self.recorder = recorder
        self.tokens = SingleFlightCache()
        self.challenges = SingleFlightCache()
        self.client = RegistryClient()
        self.work = UpstreamWork()
        self.token_fetches = 0

    def load(self, loader):
        loader.add_option("upstream_timeout", int, 30,
                          "Seconds to wait for a registry or token server (probes, token fetches, retries).")
        loader.add_option("upstream_concurrency", int, 4,
                          "Probes, token fetches and retries one connector may run at once (the rest of its calls queue).")
        loader.add_option(
            "upstream_idle_timeout", int, 120,
            "Seconds a proxied exchange may go without a byte in either direction (connecting, waiting for "
            "the registry's first byte, or a stall mid-body) before its connection is closed. Sets "
            "mitmproxy's tcp_timeout.",
        )

    def running(self) -> None:
        pass

    def done(self) -> None:
        self.work.shutdown()

    def configure(self, updated):
        if "upstream_concurrency" in updated:
            self.work.per_connector = max(1, ctx.options.upstream_concurrency)
        if "upstream_idle_timeout" in updated and ctx.options.tcp_timeout != ctx.options.upstream_idle_timeout:
            # mitmproxy's connection watchdog counts a byte in either direction as activity and
            # covers connect, the wait for a response and gaps mid-stream: one knob, named here.
            ctx.options.update(tcp_timeout=ctx.options.upstream_idle_timeout)
        if updated & {"upstream_timeout", "ssl_insecure", "ssl_verify_upstream_trusted_ca"}:
            self.client = RegistryClient(
                ctx.options.upstream_timeout, ctx.options.ssl_insecure, ctx.options.ssl_verify_upstream_trusted_ca,
                observer=self.recorder.observe if self.recorder else None,
            )

    # ------------------------------------------------------------ credentials

    async def challenge_for(self, connector: Connector) -> UpstreamChallenge:
        creds = connector.credentials
        assert creds is not None

        async def probe():
            return await self.work.run(connector.key, self.client.probe, connector), CHALLENGE_TTL

        return await self.challenges.get((connector.key, creds.version, str(connector.address)), probe)

    async def authorization(self, connector: Connector, scopes: tuple[str, ...]) -> str | None:
        """The Authorization header for a request needing `scopes`, or None for an open registry."""
        creds: Credentials = connector.credentials  # type: ignore[assignment]
        # A rotated Secret: whatever was learnt or fetched with the old credentials goes now.
        stale = lambda k: k[0] == connector.key and k[1] != creds.version  # noqa: E731
        self.tokens.drop(stale)
        self.challenges.drop(stale)
        if creds.kind == "bearer":
            return f"Bearer {creds.token}"
        challenge = await self.challenge_for(connector)
        if challenge.kind == "none":
            return None
        if challenge.kind == "basic":
            return basic_header(creds.username, creds.password) if creds.kind == "basic" else None

        async def fetch():
            self.token_fetches += 1
            token = await self.work.run(connector.key, self.client.fetch_token, connector, challenge, scopes)
            return token.value, token.lifetime

        key = (connector.key, creds.version, challenge.realm, challenge.service, scopes)
        return "Bearer " + await self.tokens.get(key, fetch)

    def _auth_shape(self, connector: Connector) -> dict:
        """What upstream auth looked like, for recordings and debugging (never a secret)."""
        key = (connector.key, connector.credentials.version, str(connector.address))  # type: ignore[union-attr]
        challenge = self.challenges.peek(key)
        shape: dict = {"credentials": connector.credentials.kind}  # type: ignore[union-attr]
        if isinstance(challenge, UpstreamChallenge):
            shape.update({"challenge": challenge.kind, "realm": challenge.realm.url if challenge.realm else "",
                          "service": challenge.service})
        return shape

    def forget(self, connector: Connector) -> None:
        """After an unexpected 401: drop the connector's tokens and challenge so both are fetched anew."""
        self.tokens.drop(lambda k: k[0] == connector.key)
        self.challenges.drop(lambda k: k[0] == connector.key)

    # ------------------------------------------------------------ hooks

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        route = Route.of(flow)
        if flow.response or route is None or route.form == "ping":
            return
        connector = self.store.get(route.namespace, route.name)
        if connector is None or connector.address is None:  # removed since client auth looked
            flow.response = oci.refusal(flow.request, 404, "NAME_UNKNOWN", f"connector {route.connector} not found")
            return
        retarget(flow.request, route, connector.address)
        dataclasses.replace(route, upstream=str(connector.address)).store(flow)
        query = flow.request.path.partition("?")[2]
        scopes = oci.required_scopes(flow.request.method, oci.parse_api_path(route.path), query)
        flow.metadata[UPSTREAM_KEY] = {"scopes": list(scopes), "retry": False, "has_body": oci.has_body(flow.request)}
        try:
            header = await self.authorization(connector, scopes)
            flow.metadata[UPSTREAM_KEY]["auth"] = self._auth_shape(connector)
        except UpstreamError as e:
            logger.warning("%s", e)
            flow.response = e.response(flow.request)
            return
        if header:
            self.secrets.request_header(flow, "Authorization", header)

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = flow.metadata.get(UPSTREAM_KEY)
        if not state or not flow.response or flow.response.status_code != 401:
            return
        route = Route.of(flow)
        connector = self.store.get(route.namespace, route.name) if route else None
        if connector:
            self.forget(connector)
        if small_body(flow.response.headers, MAX_CHALLENGE_BODY):
            # Kept whole (it is small) and answered in `response`: a request without a body is
            # sent again there with a fresh token.
            state["retry"] = not state["has_body"]
            return
        # A 401 with a large or unknown body: never buffered, never passed on. Our own answer
        # goes out now and the registry's body is drained.
        flow.response = self._final_401(flow.request, flow.response, route, fresh=False)
        flow.response.stream = ReplaceBody(flow.response.content or b"")
        state["replaced"] = True

    @fail_closed
    async def response(self, flow: http.HTTPFlow) -> None:
        state = flow.metadata.get(UPSTREAM_KEY)
        if state and state.get("replaced") and flow.response is not None and isinstance(flow.response.stream, ReplaceBody):
            # Our answer replaced a large 401 in responseheaders. If the registry's (empty) body was
            # read rather than streamed, it overwrote ours: put ours back.
            flow.response.content = flow.response.stream.body
            return
        if not state or not flow.response or flow.response.status_code != 401:
            return
        route = Route.of(flow)
        connector = self.store.get(route.namespace, route.name) if route else None
        if connector and state.get("retry"):
            state["retry"] = False
            try:
                retried = await self._resend(flow, connector, tuple(state["scopes"]))
            except UpstreamError as e:
                flow.response = e.response(flow.request)
                return
            if retried is None:  # too large to hold: the client retries, and that request streams
                flow.response = self._final_401(flow.request, flow.response, route, fresh=False)
                return
            flow.response = retried
            if flow.response.status_code != 401:
                rewrite_response_headers(flow)  # the retried answer's Location, like any other
                return
            flow.response = self._final_401(flow.request, flow.response, route, fresh=True)
        else:
            flow.response = self._final_401(flow.request, flow.response, route, fresh=False)

    @fail_closed
    def error(self, flow: http.HTTPFlow) -> None:
        route = Route.of(flow)
        connector = self.store.get(route.namespace, route.name) if route and route.name else None
        if connector and flow.error and not flow.response:
            # Connection failures invalidate what we learnt about the registry.
            self.challenges.drop(lambda k: k[0] == connector.key)

    async def _resend(self, flow: http.HTTPFlow, connector: Connector, scopes: tuple[str, ...]) -> http.Response | None:
        """The bodiless request again, with a fresh token; None when the answer is too large to hold."""
        header = await self.authorization(connector, scopes)
        headers = {
            k: v for k, v in flow.request.headers.items()
            if k.lower() not in HOP_BY_HOP and k.lower() not in ("authorization", "content-length")
        }
        if header:
            headers["Authorization"] = header
            self.secrets.remember(flow, header)
        request = flow.request
        return await self.work.run(connector.key, self._send_bounded, connector, request.method, request.scheme, request.host,
                                       request.port, request.path, headers)

    def _send_bounded(self, connector: Connector, method: str, scheme: str, host: str, port: int, target: str,
                      headers: dict[str, str]) -> http.Response | None:
        resp = self.client.send(connector, method, scheme, host, port, target, headers, preload=False)
        body = b""
        if method.upper() != "HEAD" and resp.status not in (204, 304):
            body = resp.read(SMALL_BODY + 1) if small_body(resp.headers, SMALL_BODY) else b"-" * (SMALL_BODY + 1)
        if len(body) > SMALL_BODY:
            resp.close()  # unread rest: the connection cannot be reused
            return None
        resp.release_conn()
        out_headers = http.Headers(
            [(k.encode(), v.encode()) for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP]
        )
        response = http.Response.make(resp.status, b"", out_headers)
        response.raw_content = body  # as the registry sent it (Content-Encoding and Content-Length kept)
        return response

    def _final_401(self, request: http.Request, upstream: http.Response, route: Route | None, fresh: bool) -> http.Response:
        """The registry still says 401: never pass its challenge on (it names its own realm)."""
        name = route.connector if route else "?"
        challenge = oci.pick_challenge(oci.parse_www_authenticate(upstream.headers.get("WWW-Authenticate", "")))
        if challenge and challenge.error == "insufficient_scope":
            return oci.refusal(
                request, 403, "DENIED",
                f"connector {name}: the registry refused the connector's credentials for "
                f"{_printable(challenge.params.get('scope') or 'this operation')} (insufficient_scope); "
                "the credential may lack the permission (push, delete) this needs",
            )
        if fresh:
            return oci.refusal(request, 502, "UNAUTHORIZED", f"connector {name}: the registry rejected a fresh token")
        # A streamed request can't be replayed: let the client authenticate and send it again.
        challenge = self.client_auth.challenge(request, route) if self.client_auth else CHALLENGE
        return oci.refusal(request, 401, "UNAUTHORIZED", f"connector {name}: upstream token expired, retry",
                           headers={"WWW-Authenticate": challenge})


MAX_CHALLENGE_BODY = 64 * 1024


def small_body(headers, limit: int) -> bool:
    length = headers.get("content-length", "")
    return length.isascii() and length.isdigit() and int(length) <= limit


def _printable(value: str, limit: int = 200) -> str:
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in value[:limit])


class ReplaceBody:
    """A `response.stream` that drops the upstream's body and sends `body` instead, at the end."""

    def __init__(self, body: bytes):
        self.body = body

    def __call__(self, chunk: bytes) -> list[bytes]:
        return [] if chunk else ([self.body] if self.body else [])
