"""The registry client: everything the proxy says to registries and token servers itself.

Pure Python and urllib3, no mitmproxy: the upstream addon (per request), the status writer (its
checks) and the trust addon (its TLS preflight) all use it. Here live the challenge probe, token
fetches with the realm policy (`realm_refusal`), bounded answers, the token cache with single
flight, the per-connector pool of worker threads, and the TLS trust every path shares (OpenSSL,
the base CAs plus the connector's, decided as curl decides).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import ipaddress
import json
import math
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlencode

import certifi
import publicsuffix2
import urllib3

from addons import oci
from connector_store.model import Address, Connector

DEFAULT_TOKEN_LIFETIME = 60  # the token spec's default for a missing expires_in

# curl's verification flags (lib/vtls/openssl.c): trusted-first and partial chains; never X509_STRICT,
# which is what makes strict verifiers refuse certificates that curl, Go clients and browsers accept.
VERIFY_FLAGS = ssl.VERIFY_X509_TRUSTED_FIRST | ssl.VERIFY_X509_PARTIAL_CHAIN
PREFLIGHT_TTL = 300.0  # seconds a successful preflight is trusted (mitmproxy still verifies every connection)


# ---------------------------------------------------------------- pure: the trust and its checks


def trust_key(ca_pem: str | None) -> str:
    """Identifies a trust besides the base: flows with equal keys decide every certificate alike."""
    return hashlib.sha256((ca_pem or "").encode()).hexdigest()


def base_cafile(option_cafile: str | None, option_capath: str | None) -> str | None:
    """The base CA file, as mitmproxy picks it: the option, else certifi unless only a directory is set."""
    if option_cafile:
        return option_cafile
    return None if option_capath else certifi.where()


def registry_ssl_context(ca_pem: str | None, base_cafile_option: str | None, insecure: bool,
                         base_capath: str | None = None) -> ssl.SSLContext:
    """The Python `ssl` context for the challenge probe, token fetches and the TLS preflight.

    `base_cafile_option`: `ssl_verify_upstream_trusted_ca` (None: certifi, like mitmproxy);
    `base_capath`: `ssl_verify_upstream_trusted_confdir`; `ca_pem`: the connector's CA or None.
    Decides like mitmproxy's data path here and like curl: see the module docstring.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    cafile = base_cafile(base_cafile_option, base_capath)
    context.load_verify_locations(cafile=cafile, capath=base_capath)
    if ca_pem:
        context.load_verify_locations(cadata=ca_pem)
    context.verify_flags = VERIFY_FLAGS  # set, not or-ed: no X509_STRICT whatever Python's default
    context.hostname_checks_common_name = False
    return context



def tls_preflight(host: str, port: int, context: ssl.SSLContext, timeout: float) -> None:
    """One TLS handshake with `host:port`, verified by `context`; raises what the handshake raises."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        with context.wrap_socket(sock, server_hostname=host):
            pass


class UpstreamError(Exception):
    """A failure talking to the registry or its token server, phrased for the client."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code


class ConnectionDropped(UpstreamError):
    """The connection failed after it was made (reset, closed mid-answer): a kept-alive connection
    the registry had closed, for instance. Not a refusal of our TLS trust, not an unreachable host."""


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
                 observer: Callable[..., None] | None = None, ca_path: str | None = None):
        # Told about probes and token fetches: observer(kind, method, url, request_headers, status,
        # response_headers, body), on this thread; it must redact before keeping anything.
        self.observer = observer
        self.timeout = urllib3.Timeout(connect=min(timeout, 10.0), read=timeout)
        self.insecure = insecure
        self.ca_file = ca_file  # ssl_verify_upstream_trusted_ca: the base (else certifi)
        self.ca_path = ca_path  # ssl_verify_upstream_trusted_confdir
        self._pools: dict[str, urllib3.PoolManager] = {}

    def _pool(self, connector: Connector) -> urllib3.PoolManager:
        # The trust decision of mitmproxy's own upstream connections (upstream_trust): OpenSSL, the
        # base (ssl_verify_upstream_trusted_ca, else certifi) plus this connector's CA, curl's flags.
        capath = self.ca_path
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
        headers: dict[str, str] | None = None, kind: str = "", preload: bool = True, body: bytes | None = None,
        read_timeout: float | None = None,
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
                method, target, body=body, headers=headers or {}, redirect=False, retries=False,
                decode_content=False, preload_content=False, assert_same_host=False,
                timeout=self.timeout if read_timeout is None else urllib3.Timeout(connect=self.timeout.connect_timeout,
                                                                                read=read_timeout),
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
                self.observer(kind, method, f"{scheme}://{netloc}{target}", headers or {}, answer.status,
                              list(answer.headers.items()), answer.data)
            return answer
        except urllib3.exceptions.SSLError as e:
            raise UpstreamError(502, "UNAVAILABLE", f"connector {connector.key}: TLS verification of {netloc} failed: {_reason(e)}") from None
        except urllib3.exceptions.NewConnectionError as e:  # a subclass of ConnectTimeoutError
            raise UpstreamError(502, "UNAVAILABLE", f"connector {connector.key}: {netloc} unreachable: {_reason(e)}") from None
        except (urllib3.exceptions.ConnectTimeoutError, urllib3.exceptions.ReadTimeoutError):
            raise UpstreamError(504, "UNAVAILABLE", f"connector {connector.key}: {netloc} timed out") from None
        except urllib3.exceptions.ProtocolError as e:
            raise ConnectionDropped(502, "UNAVAILABLE", f"connector {connector.key}: {netloc} broke the connection: {_reason(e)}") from None
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
