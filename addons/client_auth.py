"""Who is calling, and may they use the connector they named.

Order of checks (DESIGN section 3): authenticate (401), authorize the named connector (403), then
look it up (404 or 503 for an unusable one), so nobody learns which connectors exist without
permission. Clients only send credentials after a challenge, so a request without any gets
`401` + `WWW-Authenticate: Basic`.

Backends: a static token file (local runs, tests) or the cluster (TokenReview and
SubjectAccessReview). The client's credential is read here; the header itself is removed by the
scrub addon before anything records the flow.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import logging

import yaml
from mitmproxy import ctx, exceptions, http

from addons import oci
from addons.routing import Route
from addons.store import ConnectorStore
from connector_store.identity import IdentityBackend, StaticTokens

logger = logging.getLogger(__name__)

CHALLENGE = 'Basic realm="oci-connector-proxy"'
MAX_CREDENTIAL_LENGTH = 16 * 1024  # ServiceAccount tokens are ~1 KiB; anything huge is garbage


def parse_client_credential(authorization: str | None) -> str | None:
    """The token from `Basic base64(<any user>:<token>)` or `Bearer <token>`; None if absent or garbage."""
    if not authorization or len(authorization) > MAX_CREDENTIAL_LENGTH:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        _, sep, token = decoded.partition(":")
        return token if sep and token else None
    return None


def unauthorized(message: str) -> http.Response:
    return oci.error_response(401, "UNAUTHORIZED", message, headers={"WWW-Authenticate": CHALLENGE})


class ClientAuth:
    """requestheaders: 401 / 403 / 404 / 503 for the caller, or let the request on to the upstream addon."""

    def __init__(self, store: ConnectorStore):
        self.store = store
        self.backend: IdentityBackend | None = None

    def load(self, loader):
        loader.add_option(
            "client_tokens", str, "",
            "YAML file of client tokens: tokens: [{token, subject, connectors: [ns/name|ns/*|*]}]",
        )
        loader.add_option(
            "client_auth", str, "",
            "'kubernetes': authenticate ServiceAccount tokens with TokenReview and authorize with "
            "SubjectAccessReview (uses the store's kubeconfig or the in-cluster configuration).",
        )
        loader.add_option("token_audiences", str, "", "Comma-separated TokenReview audiences (default: the API server's).")
        loader.add_option("proxy_permissions", bool, False, "Also require the connectors/proxy subresource.")

    def configure(self, updated):
        if "client_tokens" in updated and ctx.options.client_tokens:
            try:
                self.backend = StaticTokens(ctx.options.client_tokens)
            except (OSError, ValueError, yaml.YAMLError) as e:
                raise exceptions.OptionsError(f"client_tokens: {e}") from e
        if updated & {"client_auth", "token_audiences", "proxy_permissions", "kubeconfig"} and ctx.options.client_auth:
            if ctx.options.client_auth != "kubernetes":
                raise exceptions.OptionsError(f"client_auth: unknown backend {ctx.options.client_auth!r}")
            from connector_store.kube import KubeIdentities, api_client

            audiences = [a.strip() for a in ctx.options.token_audiences.split(",") if a.strip()]
            self.backend = KubeIdentities(
                api_client(ctx.options.kubeconfig or None), audiences, ctx.options.proxy_permissions
            )

    async def ask(self, fn, *args):
        """Call a backend method, off the event loop when it may wait on the network."""
        if getattr(self.backend, "blocking", False):
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        route = Route.of(flow)
        if flow.response or route is None:
            return
        if route.form == "forward":  # identity checked and bound on CONNECT by the forward addon
            self._serve(flow, route, route.subject)
            return
        token = parse_client_credential(flow.request.headers.get("authorization"))
        target = f"connector {route.connector}" if route.name else "this proxy"
        if token is None:
            flow.response = unauthorized(f"authentication required to use {target}")
            return
        if self.backend is None:
            flow.response = oci.error_response(
                503, "UNAVAILABLE", "no client authentication backend is configured (client_tokens or client_auth)"
            )
            return
        try:
            identity = await self.ask(self.backend.authenticate, token)
            if identity is None:
                flow.response = unauthorized(f"invalid or expired token for {target}")
                return
            if route.form == "ping":
                # The shared-host ping names no connector: a valid identity is all it takes.
                flow.response = oci.ping_response()
                return
            allowed = await self.ask(self.backend.authorize, identity, route.namespace, route.name)
        except Exception as e:  # the API server is down or refuses us: say so, don't crash the flow
            logger.warning("client authentication for %s failed: %s", target, type(e).__name__)
            flow.response = oci.error_response(503, "UNAVAILABLE", f"cannot verify the caller's identity for {target} right now")
            return
        if not allowed:
            flow.response = oci.error_response(
                403, "DENIED", f"{identity.subject} may not use connector {route.connector}"
            )
            return
        self._serve(flow, route, identity.subject)

    def _serve(self, flow: http.HTTPFlow, route: Route, subject: str) -> None:
        """The caller may use the connector: 404/503 if it can't be served, the ping answered here."""
        connector = self.store.get(route.namespace, route.name)
        if connector is None:
            flow.response = oci.error_response(404, "NAME_UNKNOWN", f"connector {route.connector} not found")
            return
        if not connector.usable:
            flow.response = oci.error_response(
                503, "UNAVAILABLE", f"connector {route.connector} is not usable: {connector.problem}"
            )
            return
        if route.path in ("/v2", "/v2/"):
            # The connector's own ping: answered here, the upstream is authenticated per request.
            flow.response = oci.ping_response()
        dataclasses.replace(route, subject=subject).store(flow)
