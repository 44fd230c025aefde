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
import functools
import logging

import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import yaml
from mitmproxy import ctx, exceptions, http

from addons import oci
from addons.gate import Gate, Verdict, describe_exception, fail_closed
from addons.policy import POLICY_KEY, policy_decision
from addons.proxy_token import DEFAULT_LIFETIME, SHARED_SERVICE, ProxyTokens, parse_scope, read_key
from addons.routing import Route
from addons.store import ConnectorStore
from connector_store.identity import Identity, IdentityBackend, StaticTokens
from connector_store.model import Connector

logger = logging.getLogger(__name__)

CHALLENGE = 'Basic realm="oci-connector-proxy"'
MAX_CREDENTIAL_LENGTH = 16 * 1024  # ServiceAccount tokens are ~1 KiB; anything huge is garbage
# RFC 6750 b64token, widened to every visible ASCII character: JWTs, static tokens and opaque
# tokens fit; whitespace, control characters and non-ASCII never reach a backend or a hash.
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")


def valid_token(token: str) -> bool:
    return bool(_TOKEN_RE.fullmatch(token))


def parse_client_credential(authorization: str | None) -> str | None:
    """The token from `Basic base64(<any user>:<token>)` or `Bearer <token>`; None if absent or garbage.

    Never raises: the value comes from anybody (non-ASCII, surrogate-escaped bytes, control characters).
    """
    if not authorization or len(authorization) > MAX_CREDENTIAL_LENGTH:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value if valid_token(value) else None
    if scheme.lower() == "basic":
        decoded = decode_basic(value)
        if decoded is None:
            return None
        _, sep, token = decoded.partition(":")
        return token if sep and valid_token(token) else None
    return None


def decode_basic(value: str) -> str | None:
    """base64 -> text, or None for anything that is not strictly base64 of UTF-8."""
    if not value.isascii():
        return None  # b64decode raises ValueError (not binascii.Error) on non-ASCII str
    try:
        return base64.b64decode(value, validate=True).decode()
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        return None


@dataclass(frozen=True)
class Refusal:
    """Why a caller may not pass: the status, the registry error code, a message with no secret."""

    status: int
    code: str
    message: str


@dataclass(frozen=True)
class Admission:
    """A caller who may pass, with the connectors they named (all authorized and known)."""

    identity: Identity
    connectors: tuple[Connector, ...]


TOKEN_PATH = "/.connectors/token"  # the proxy's own token endpoint (addons/token_endpoint.py)


def unauthorized(request: http.Request, message: str, challenge: str = CHALLENGE) -> http.Response:
    return oci.refusal(request, 401, "UNAUTHORIZED", message, headers={"WWW-Authenticate": challenge})


def bearer_challenge(origin: str, service: str, scopes: Sequence[str] = (), error: str | None = None) -> str:
    """`Bearer realm="<origin>/.connectors/token",service="...",scope="..."`, like a registry's."""
    parts = [f'realm="{origin}{TOKEN_PATH}"', f'service="{service}"']
    if scopes:
        parts.append(f'scope="{" ".join(scopes)}"')
    if error:
        parts.append(f'error="{error}"')
    return "Bearer " + ",".join(parts)


def client_path(route: Route) -> str:
    """The API path as the client sent it (path form: with its prefix), from the route parsed once."""
    if route.prefix and route.path.startswith("/v2/"):
        return f"/v2/{route.prefix}/{route.path[len('/v2/'):]}"
    return route.path


def client_scopes(method: str, client_path: str, query: str) -> tuple[str, ...]:
    """The scopes a request needs, with repositories named as the client names them (path form
    keeps its `namespaces/<ns>/connectors/<name>/` prefix): what the challenge asks the client to get."""
    try:
        api = oci.parse_api_path(client_path)
    except oci.ProtocolError:
        return ()
    return tuple(s for s in oci.required_scopes(method, api, "") if s.startswith(("repository:", "registry:")))


class ClientAuth:
    """requestheaders: 401 / 403 / 404 / 503 for the caller, or a verdict that lets the request on.

    `admit` is the one decision whether a caller may pass; the reverse listener (here), the forward
    listener and the config endpoint all ask it.
    """

    def __init__(self, store: ConnectorStore, gate: Gate):
        self.store = store
        self.gate = gate
        self.backend: IdentityBackend | None = None
        self.tokens = ProxyTokens(os.urandom(32))  # replaced by token_key_file's key when set
        # TokenReviews and SubjectAccessReviews wait on the API server: threads of their own, so
        # a slow registry's upstream calls never delay who-is-calling checks (and the reverse).
        self.executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="identity")

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
        loader.add_option(
            "client_challenge", str, "bearer",
            "How unauthenticated registry requests are challenged: 'bearer' (a realm on the proxy's own "
            "token endpoint, like a registry) or 'basic'.", choices=("bearer", "basic"),
        )
        loader.add_option(
            "token_key_file", str, "",
            "File holding the key (>= 32 bytes) that signs proxy tokens; every replica must read the same "
            "one (a Secret). Default: a random key per process (its tokens work on that replica only).",
        )
        loader.add_option("token_lifetime", int, DEFAULT_LIFETIME, "Seconds a proxy token is valid.")

    def configure(self, updated):
        if updated & {"token_key_file", "token_lifetime"}:
            try:
                key = read_key(ctx.options.token_key_file) if ctx.options.token_key_file else self.tokens.key
                self.tokens = ProxyTokens(key, ctx.options.token_lifetime)
            except (OSError, ValueError) as e:
                raise exceptions.OptionsError(f"token_key_file: {e}") from e
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
            return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))
        return fn(*args)

    def done(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def admit(
        self, token: str | None, refs: Sequence[tuple[str, str]], require_usable: bool = True,
    ) -> Admission | Refusal:
        """May the holder of `token` use every connector in `refs`? The one place this is decided.

        Order (DESIGN section 3): authenticate (401), authorize each connector (403), look it up
        (404, or 503 when it cannot be used), so nobody learns which connectors exist without
        permission. Any failure of the identity backend is a refusal (503), never a pass.
        """
        target = ", ".join(f"connector {ns}/{name}" for ns, name in refs) or "this proxy"
        if token is None:
            return Refusal(401, "UNAUTHORIZED", f"authentication required to use {target}")
        backend = self.backend
        if backend is None:
            return Refusal(503, "UNAVAILABLE", "no client authentication backend is configured (client_tokens or client_auth)")
        try:
            identity = await self.ask(backend.authenticate, token)
            if identity is None:
                return Refusal(401, "UNAUTHORIZED", f"invalid or expired token for {target}")
            connectors = []
            for ns, name in refs:
                if not await self.ask(backend.authorize, identity, ns, name):
                    return Refusal(403, "DENIED", f"{identity.subject} may not use connector {ns}/{name}")
                if not self.store.synced:
                    return Refusal(503, "UNAVAILABLE", "connectors not loaded yet; retry shortly")
                connector = self.store.get(ns, name)
                if connector is None:
                    return Refusal(404, "NAME_UNKNOWN", f"connector {ns}/{name} not found")
                if require_usable and not connector.usable:
                    return Refusal(503, "UNAVAILABLE", f"connector {ns}/{name} is not usable: {connector.problem}")
                connectors.append(connector)
        except Exception as e:  # the API server is down or refuses us: say so, never pass
            logger.warning("client authentication for %s failed: %s", target, describe_exception(e))
            return Refusal(503, "UNAVAILABLE", f"cannot verify the caller's identity for {target} right now")
        return Admission(identity, tuple(connectors))

    def grant(self, flow: http.HTTPFlow, route: Route, connector: Connector, subject: str) -> None:
        """Record the verdict: this flow may go to this connector's address, and nowhere else."""
        address = connector.address
        assert address is not None
        self.gate.grant(flow, Verdict(subject, connector.key, (address.scheme, address.host, address.port)))
        dataclasses.replace(route, subject=subject).store(flow)

    @fail_closed(credentials=True)
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        route = Route.of(flow)
        if flow.response or route is None:
            return
        if route.form == "forward":  # identity checked and bound on CONNECT by the forward addon
            connector = self.store.get(route.namespace, route.name)
            if connector is None or not connector.usable:
                problem = "not found" if connector is None else f"is not usable: {connector.problem}"
                flow.response = oci.refusal(flow.request, 503, "UNAVAILABLE", f"connector {route.connector} {problem}")
                return
            self.grant(flow, route, connector, route.subject)
            return
        token = parse_client_credential(flow.request.headers.get("authorization"))
        if token is not None and ProxyTokens.looks_like_ours(token):
            self._admit_proxy_token(flow, route, token)
            return
        refs = [(route.namespace, route.name)] if route.name else []
        result = await self.admit(token, refs)
        if isinstance(result, Refusal):
            flow.response = self.refuse(flow.request, result, route)
            return
        if route.form == "ping" or route.path in ("/v2", "/v2/"):
            # The ping: answered here (the upstream is authenticated per request).
            flow.response = oci.frame(flow.request, oci.ping_response())
            return
        self.grant(flow, route, result.connectors[0], result.identity.subject)

    def _admit_proxy_token(self, flow: http.HTTPFlow, route: Route, token: str) -> None:
        """A token our endpoint issued: its signature stands for authentication and authorization
        (decided when it was issued); its scopes must cover the request, as a registry checks."""
        claims = self.tokens.verify(token)
        if claims is None:
            flow.response = self.refuse(flow.request, Refusal(401, "UNAUTHORIZED", "invalid or expired token"), route)
            return
        if route.form == "ping" or route.path in ("/v2", "/v2/"):
            if route.name and claims.connector != route.connector:
                flow.response = self.refuse(flow.request, Refusal(401, "UNAUTHORIZED", f"the token is not for connector {route.connector}"), route)
                return
            flow.response = oci.frame(flow.request, oci.ping_response())
            return
        needed = client_scopes(flow.request.method, client_path(route), "")
        granted = claims.connector == route.connector and all(
            (a := parse_scope(s)) is not None and claims.allows(a.name if a.type == "repository" else None, a.actions)
            for s in needed
        )
        if not granted:
            connector = self.store.get(route.namespace, route.name) if claims.connector == route.connector else None
            decision = policy_decision(connector, claims.subject, flow.request.method, route.path)
            if decision is not None and not decision.allowed:
                # The token lacks it because the connector's policy does: asking again won't help.
                flow.metadata[POLICY_KEY] = {"decision": "denied", "rule": decision.reason}
                dataclasses.replace(route, subject=claims.subject).store(flow)  # who was refused, for the audit
                flow.response = oci.refusal(flow.request, 403, "DENIED", f"connector {route.connector} policy: {decision.reason}")
                return
            flow.response = self.refuse(flow.request, Refusal(401, "UNAUTHORIZED", f"the token does not grant {' '.join(needed) or 'this request'}"),
                                        route, error="insufficient_scope")
            return
        if not self.store.synced:
            flow.response = oci.refusal(flow.request, 503, "UNAVAILABLE", "connectors not loaded yet; retry shortly")
            return
        connector = self.store.get(route.namespace, route.name)
        if connector is None:
            flow.response = oci.refusal(flow.request, 404, "NAME_UNKNOWN", f"connector {route.connector} not found")
        elif not connector.usable:
            flow.response = oci.refusal(flow.request, 503, "UNAVAILABLE", f"connector {route.connector} is not usable: {connector.problem}")
        else:
            self.grant(flow, route, connector, claims.subject)

    def challenge(self, request: http.Request, route: Route | None, error: str | None = None) -> str:
        """What a 401 asks for: the proxy's token realm (default) or Basic."""
        if ctx.options.client_challenge == "basic" or route is None or not route.origin:
            return CHALLENGE
        scopes = client_scopes(request.method, client_path(route), "") if route.name else ()
        return bearer_challenge(route.origin, route.connector or SHARED_SERVICE, scopes, error)

    def refuse(self, request: http.Request, refusal: Refusal, route: Route | None = None, error: str | None = None) -> http.Response:
        if refusal.status == 401:
            return unauthorized(request, refusal.message, self.challenge(request, route, error))
        return oci.refusal(request, refusal.status, refusal.code, refusal.message)
