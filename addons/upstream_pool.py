"""Small exchanges over upstream connections kept alive across client connections.

mitmproxy gives every client connection its own upstream connection. skopeo, and many CI scripts,
open a new connection for almost every request, so a small push paid a TCP (and TLS, in forward
mode) connect to the registry per request, plus mitmproxy's connection events. Here a request with
no body to stream (HEAD, a manifest or tags GET, an upload's POST and final PUT, a small manifest
PUT, DELETE) is sent by the registry client (`RegistryClient.send`: urllib3, kept-alive connections
per registry, the connector's TLS trust) and its answer becomes the flow's response; every
response hook then runs as for any answer (token retry on 401, Location rewrite, echo redaction,
framing, metrics). Blob GETs and uploads with a body stream through mitmproxy as before.

Only a client connection's first request goes over the pool. On a kept-alive client connection
mitmproxy's own upstream connection is the cheaper path (measured: 1.7-2.5 ms of CPU per manifest GET
against 3.3 ms over the pool, whose thread hop and second HTTP parser cost more than they save), so
the second request opens it and the rest reuse it. A client that opens a connection per request
(skopeo) has every request pooled: 4.6 -> 4.2 ms per request, and no upstream connect each time.

The pool is an accelerator, never a queue: when a connector already has `upstream_pool_size`
exchanges in flight, or the worker threads are all busy, the request takes mitmproxy's own path.
A slow registry therefore holds at most its own share of threads and stops nobody else.

Fail closed: this addon sits after the gate and LateSecrets, at the very end of mitmproxy's chain,
and sends only what the gate permits, to the destination the verdict names. The upstream header is
taken from LateSecrets and goes on the flow only redacted.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import urllib3
from mitmproxy import connection, ctx, http
from mitmproxy.connection import ConnectionState

from addons import oci
from addons.gate import Gate, Verdict, fail_closed
from addons.registry_client import ConnectionDropped, UpstreamError
from addons.rewrite import SMALL_BODY, is_small_document
from addons.routing import Route
from addons.scrub import LateSecrets
from addons.store import ConnectorStore
from addons.upstream_auth import HOP_BY_HOP, UpstreamCredentials, response_from_upstream

logger = logging.getLogger(__name__)

POOLED_KEY = "connector_proxy_pooled"  # flow.metadata: True when the pool carried the exchange
REQUEST_HEADERS_DROPPED = HOP_BY_HOP | {"content-length", "authorization", "proxy-authorization"}
IDEMPOTENT = ("GET", "HEAD")
CLIENT_CHECK_SECONDS = 0.25  # how often a slow exchange looks whether its client is still there


def poolable(method: str, api_path: str, has_body: bool, body_buffered: bool) -> bool:
    """Whether an exchange can go over the pool: nothing to stream either way (pure).

    `has_body`: the client sent a body; `body_buffered`: mitmproxy holds it whole (a small
    manifest) rather than streaming it. A blob GET may be gigabytes: it streams.
    """
    if has_body and not body_buffered:
        return False
    if api_path == "/v2/_catalog":
        return False  # the policy addon collects and filters it, up to its own larger cap
    return not (method == "GET" and "/blobs/" in api_path)


@dataclass(frozen=True)
class Exchange:
    """One request for the pool, built from the parts the gate checked."""

    method: str
    scheme: str
    host: str
    port: int
    target: str  # path and query, as the flow holds it
    headers: dict[str, str]
    body: bytes | None


class Unpooled(Exception):
    """A GET or HEAD the pool gives back to mitmproxy's path: its answer is too large to hold, or
    the connection broke (a kept one the registry had closed): mitmproxy sends it on its own."""


def request_headers(request: http.Request, injected: tuple[str, str] | None) -> dict[str, str]:
    """The headers to send: the client's (hop-by-hop and credentials removed) plus the injected one."""
    headers: dict[str, str] = {}
    for name, value in request.headers.items(multi=True):
        if name.lower() in REQUEST_HEADERS_DROPPED:
            continue
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if injected:
        headers[injected[0]] = injected[1]
    return headers


class PooledUpstream:
    def __init__(self, store: ConnectorStore, gate: Gate, late: LateSecrets, upstream: UpstreamCredentials):
        self.store = store
        self.gate = gate
        self.late = late
        self.upstream = upstream  # its registry client: the same pools and trust as probes and token fetches
        self.executor: ThreadPoolExecutor | None = None
        self.workers = 0
        self.per_connector = 0
        self.read_timeout = 120.0
        self.in_flight: dict[str, int] = {}
        # Client connections that already sent a request upstream: only the first goes over the pool.
        self.clients_seen: weakref.WeakSet[connection.Client] = weakref.WeakSet()
        self.pooled = 0  # exchanges the pool carried
        self.bypassed = 0  # eligible exchanges that took mitmproxy's path (pool busy, answer too large)

    def configure(self, updated):
        # The options are declared by the upstream addon (this one joins the chain only at `running`).
        if "upstream_pool_size" in updated:
            self.per_connector = max(1, ctx.options.upstream_pool_size)
        if "upstream_idle_timeout" in updated:
            # As on mitmproxy's path (tcp_timeout): how long the registry may stay silent.
            self.read_timeout = float(ctx.options.upstream_idle_timeout)
            # Enough threads for four connectors at their cap; past that, requests go unpooled.
            workers = 4 * self.per_connector
            if workers != self.workers:
                old, self.executor, self.workers = self.executor, ThreadPoolExecutor(workers, "upstream-pool"), workers
                if old:
                    old.shutdown(wait=False)

    def running(self) -> None:
        pass  # placed after LateSecrets by the Scrub addon (see scrub.py)

    def done(self) -> None:
        if self.executor:
            self.executor.shutdown(wait=False, cancel_futures=True)

    # ---- the hook

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if not ctx.options.upstream_pool or flow.response is not None or flow.error is not None or not flow.live:
            return
        route = Route.of(flow)
        if route is None or not route.name or not route.upstream:
            return
        if flow.client_conn in self.clients_seen:
            return  # mitmproxy's own connection for this client, opened or reused: cheaper than a pool exchange
        self.clients_seen.add(flow.client_conn)
        request = flow.request
        if not poolable(request.method.upper(), route.path, oci.has_body(request), not request.stream):
            return
        verdict = self.gate.permitted(flow)
        if verdict is None:
            return  # not ours to send: the gate has answered, or mitmproxy's path meets the gate's refusal
        connector = self.store.get(route.namespace, route.name)
        if connector is None or self.executor is None:
            return
        key = connector.key
        if self.in_flight.get(key, 0) >= self.per_connector or sum(self.in_flight.values()) >= self.workers:
            self.bypassed += 1
            return
        exchange = self._exchange(flow, verdict)
        self.in_flight[key] = self.in_flight.get(key, 0) + 1
        sending = asyncio.get_running_loop().run_in_executor(self.executor, self._send, connector, exchange)
        sending.add_done_callback(functools.partial(self._finished, key))
        try:
            if not await self._client_waits(flow, sending):
                self.late.sent_elsewhere(flow)
                flow.kill()  # the client hung up: no answer to give, and nothing more is sent for it
                return
            response = sending.result()
        except Unpooled:
            self.bypassed += 1
            return  # a GET or HEAD, sent again by mitmproxy (which streams the answer)
        except UpstreamError as e:
            logger.warning("%s", e)
            self.upstream.challenges.drop(lambda k: k[0] == key)  # a connection failure: learn anew
            response = oci.refusal(request, e.status, e.code, str(e))
        self.late.sent_elsewhere(flow)
        self.pooled += 1
        flow.metadata[POOLED_KEY] = True
        flow.response = response

    def _finished(self, key: str, sending: asyncio.Future) -> None:
        """The thread is done (whether or not anyone still waits): its slot is free again."""
        self.in_flight[key] -= 1
        if not self.in_flight[key]:
            del self.in_flight[key]
        if not sending.cancelled():
            sending.exception()  # retrieved: an abandoned exchange's failure is no "never retrieved" warning

    @staticmethod
    async def _client_waits(flow: http.HTTPFlow, sending: asyncio.Future) -> bool:
        """Wait for the exchange while the client is still there (True), or until it hangs up (False).

        mitmproxy holds a connection's events while a hook runs, so a hang-up would otherwise be
        seen only after the registry answered or timed out; the connection's state shows it at once.
        """
        while True:
            done, _ = await asyncio.wait({sending}, timeout=CLIENT_CHECK_SECONDS)
            if done:
                return True
            if not flow.client_conn.state & ConnectionState.CAN_READ:
                return False

    def _exchange(self, flow: http.HTTPFlow, verdict: Verdict) -> Exchange:
        # The destination is the verdict's: what the gate checked is what is used.
        scheme, host, port = verdict.destination
        request = flow.request
        body = request.raw_content if oci.has_body(request) else None
        return Exchange(request.method.upper(), scheme, host, port, request.path,
                        request_headers(request, self.late.pending_request_header(flow)), body)

    def _send(self, connector, exchange: Exchange) -> http.Response:
        """On a pool thread: the exchange, its answer read whole if small (else Unpooled, for GET and HEAD)."""
        idempotent = exchange.method in IDEMPOTENT
        try:
            resp = self.upstream.client.send(connector, exchange.method, exchange.scheme, exchange.host, exchange.port,
                                             exchange.target, exchange.headers, preload=False, body=exchange.body,
                                             read_timeout=self.read_timeout)
        except ConnectionDropped:
            if idempotent:
                raise Unpooled from None  # mitmproxy tries on a connection of its own
            raise
        body_expected = exchange.method != "HEAD" and resp.status not in oci.NO_BODY_STATUSES
        if body_expected and idempotent and "content-length" in resp.headers and not is_small_document(resp.headers):
            resp.close()  # large: not read, the connection is dropped
            raise Unpooled
        try:
            # Read even when no body can follow (HEAD, 204, 304): only a response read to its end
            # frees its connection for the next request.
            body = resp.read(SMALL_BODY + 1)
        except (urllib3.exceptions.HTTPError, OSError) as e:  # the registry broke off mid-answer
            resp.close()
            if idempotent:
                raise Unpooled from None
            raise UpstreamError(502, "UNAVAILABLE", f"connector {connector.key}: the registry's answer broke off "
                                f"({type(e).__name__})") from None
        if len(body) > SMALL_BODY:
            resp.close()
            if idempotent:
                raise Unpooled
            raise UpstreamError(502, "UNAVAILABLE", f"connector {connector.key}: the registry answered "
                                f"{exchange.method} with more than {SMALL_BODY} bytes")
        resp.release_conn()
        return response_from_upstream(exchange.method, resp.status, resp.reason or "", resp.headers.items(), body)
