"""Upstream credentials, per request: retarget, the scopes, the upstream Authorization, one retry on 401.

A streamed upload cannot be replayed after a 401, so the scope is computed (and narrowed to the
connector's policy) and the token fetched *before* the request is forwarded (pre-authorization).
The challenge (realm, service) is learnt once per connector by probing `GET /v2/`. Tokens are
cached per (connector, credential version, realm, service, scopes) until shortly before they
expire, and concurrent requests for one key share one fetch (single flight): skopeo opens a
connection per request and buildkit pushes layers in parallel, and token traffic must not grow
with either. The talking itself (probe, token fetch, realm policy, caches, per-connector worker
threads) is the registry client's, `addons/registry_client.py`.

Secrecy: the header is handed to the scrub addon's `LateSecrets`, which sets it at the last moment
before the request goes out, after everything that records flows has seen it (see scrub.py).
Neither upstream credentials nor upstream tokens are ever returned to the client; the registry's
own 401 challenge never reaches it either.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from mitmproxy import ctx, http

from addons import oci
from addons.client_auth import CHALLENGE, ClientAuth
from addons.gate import fail_closed
from addons.policy import allowed_scopes
from addons.record import OutOfBandRecorder
from addons.registry_client import (
    RegistryClient,
    SingleFlightCache,
    UpstreamChallenge,
    UpstreamError,
    UpstreamWork,
    basic_header,
)
from addons.rewrite import SMALL_BODY, is_small_document, rewrite_response_headers
from addons.routing import Route, retarget
from addons.scrub import LateSecrets
from addons.store import ConnectorStore
from connector_store.model import Connector, Credentials

logger = logging.getLogger(__name__)

UPSTREAM_KEY = "connector_proxy_upstream"  # flow.metadata: scopes and auth kind (no secrets)
CHALLENGE_TTL = 300.0
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}


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
        # Read by the upstream pool (addons/upstream_pool.py), which joins mitmproxy's chain only at
        # `running`, too late to declare options a command line sets.
        loader.add_option(
            "upstream_pool", bool, True,
            "Send requests without a body to stream (HEAD, manifest and tag GETs, upload POSTs and final "
            "PUTs, small manifest PUTs) over upstream connections kept alive across client connections. "
            "Off: every client connection opens its own upstream connection.",
        )
        loader.add_option(
            "upstream_pool_size", int, 16,
            "Pooled exchanges one connector may have in flight; further requests take the unpooled path.",
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
        if updated & {"upstream_timeout", "ssl_insecure", "ssl_verify_upstream_trusted_ca",
                      "ssl_verify_upstream_trusted_confdir"}:
            self.client = RegistryClient(
                ctx.options.upstream_timeout, ctx.options.ssl_insecure, ctx.options.ssl_verify_upstream_trusted_ca,
                observer=self.recorder.observe if self.recorder else None,
                ca_path=ctx.options.ssl_verify_upstream_trusted_confdir,
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
        # Narrowed to the connector's policy: even the upstream token cannot exceed it.
        scopes = allowed_scopes(connector.policy, route.subject,
                                oci.required_scopes(flow.request.method, oci.parse_api_path(route.path), query))
        flow.metadata[UPSTREAM_KEY] = {"scopes": list(scopes), "retry": False, "has_body": oci.has_body(flow.request)}
        try:
            header = await self.authorization(connector, scopes)
            flow.metadata[UPSTREAM_KEY]["auth"] = self._auth_shape(connector)
        except UpstreamError as e:
            logger.warning("%s", e)
            flow.response = oci.refusal(flow.request, e.status, e.code, str(e))
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
        if is_small_document(flow.response.headers, MAX_CHALLENGE_BODY):
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
                flow.response = oci.refusal(flow.request, e.status, e.code, str(e))
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
        body = b"-" * (SMALL_BODY + 1)
        if method.upper() == "HEAD" or resp.status in oci.NO_BODY_STATUSES or is_small_document(resp.headers):
            body = resp.read(SMALL_BODY + 1)  # read even when empty: only then is the connection free again
        if len(body) > SMALL_BODY:
            resp.close()  # unread rest: the connection cannot be reused
            return None
        resp.release_conn()
        return response_from_upstream(method.upper(), resp.status, resp.reason or "", resp.headers.items(), body)

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


def response_from_upstream(method: str, status: int, reason: str, header_items, body: bytes) -> http.Response:
    """A mitmproxy response holding what the registry sent, as it sent it (Content-Encoding kept).

    Not `Response.make`, which sets Content-Length from the body it is given: a HEAD answer keeps
    the length GET would send; a body read whole (de-chunked) gets its own length.
    """
    headers = http.Headers([(k.encode("latin-1"), v.encode("latin-1")) for k, v in header_items
                            if k.lower() not in HOP_BY_HOP])
    if method != "HEAD" and status not in oci.NO_BODY_STATUSES and status >= 200:
        headers["content-length"] = str(len(body))
    now = time.time()
    return http.Response(b"HTTP/1.1", status, reason.encode("latin-1", "replace"), headers, body, None, now, now)


def _printable(value: str, limit: int = 200) -> str:
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in value[:limit])


class ReplaceBody:
    """A `response.stream` that drops the upstream's body and sends `body` instead, at the end."""

    def __init__(self, body: bytes):
        self.body = body

    def __call__(self, chunk: bytes) -> list[bytes]:
        return [] if chunk else ([self.body] if self.body else [])
