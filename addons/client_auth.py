"""Who is calling, and may they use the connector they named.

Order of checks (DESIGN section 3): authenticate (401), authorize the named connector (403), then
look it up (404 or 503 for an unusable one), so nobody learns which connectors exist without
permission. Clients only send credentials after a challenge, so a request without any gets
`401` + `WWW-Authenticate: Basic`.

Backends: a static token file (local runs, tests). The client's credential is read here; the
header itself is removed by the scrub addon before anything records the flow.
"""

from __future__ import annotations

import base64
import dataclasses
import binascii
import hashlib
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import yaml
from mitmproxy import ctx, exceptions, http

from addons import oci
from addons.routing import Route
from addons.store import ConnectorStore

logger = logging.getLogger(__name__)

CHALLENGE = 'Basic realm="oci-connector-proxy"'
MAX_CREDENTIAL_LENGTH = 16 * 1024  # ServiceAccount tokens are ~1 KiB; anything huge is garbage


@dataclass(frozen=True)
class Identity:
    subject: str
    connectors: tuple[str, ...] = ()  # "ns/name", "ns/*" or "*"; used by the static backend


class IdentityBackend(Protocol):
    def authenticate(self, token: str) -> Identity | None: ...
    def authorize(self, identity: Identity, namespace: str, name: str) -> bool: ...


def token_digest(token: str) -> str:
    """What we key identities by: never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


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


def may_use(patterns: tuple[str, ...], namespace: str, name: str) -> bool:
    return any(p in ("*", f"{namespace}/*", f"{namespace}/{name}") for p in patterns)


class StaticTokens:
    """Tokens from a YAML file: `tokens: [{token, subject, connectors: ["ns/name" | "ns/*" | "*"]}]`.

    Re-read when the file changes, so tokens can be added without a restart.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._by_digest: Mapping[str, Identity] = {}
        self._mtime: int | None = None
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        st = self.path.stat()
        if st.st_mtime_ns == self._mtime:
            return
        with self._lock:
            doc = yaml.safe_load(self.path.read_text()) or {}
            entries = doc.get("tokens") if isinstance(doc, dict) else None
            if not isinstance(entries, list):
                raise ValueError(f"{self.path}: expected a mapping with a 'tokens' list")
            table: dict[str, Identity] = {}
            for i, e in enumerate(entries):
                if not isinstance(e, dict) or not e.get("token") or not e.get("subject"):
                    raise ValueError(f"{self.path}: tokens[{i}] needs 'token' and 'subject'")
                connectors = e.get("connectors") or []
                if not isinstance(connectors, list):
                    raise ValueError(f"{self.path}: tokens[{i}].connectors must be a list")
                table[token_digest(str(e["token"]))] = Identity(str(e["subject"]), tuple(map(str, connectors)))
            self._by_digest = table
            self._mtime = st.st_mtime_ns
        logger.info("client tokens loaded from %s: %d identities", self.path, len(table))

    def authenticate(self, token: str) -> Identity | None:
        try:
            self._load()
        except (OSError, ValueError, yaml.YAMLError) as e:
            logger.error("client token file: %s; keeping the previous tokens", e)
        return self._by_digest.get(token_digest(token))

    def authorize(self, identity: Identity, namespace: str, name: str) -> bool:
        return may_use(identity.connectors, namespace, name)


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

    def configure(self, updated):
        if "client_tokens" in updated and ctx.options.client_tokens:
            try:
                self.backend = StaticTokens(ctx.options.client_tokens)
            except (OSError, ValueError, yaml.YAMLError) as e:
                raise exceptions.OptionsError(f"client_tokens: {e}") from e

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        route = Route.of(flow)
        if flow.response or route is None:
            return
        token = parse_client_credential(flow.request.headers.get("authorization"))
        target = f"connector {route.connector}" if route.name else "this proxy"
        if token is None:
            flow.response = unauthorized(f"authentication required to use {target}")
            return
        if self.backend is None:
            flow.response = oci.error_response(
                503, "UNAVAILABLE", "no client authentication backend is configured (client_tokens)"
            )
            return
        identity = self.backend.authenticate(token)
        if identity is None:
            flow.response = unauthorized(f"invalid or expired token for {target}")
            return
        if route.form == "ping":
            # The shared-host ping names no connector: a valid identity is all it takes.
            flow.response = oci.ping_response()
            return
        if not self.backend.authorize(identity, route.namespace, route.name):
            flow.response = oci.error_response(
                403, "DENIED", f"{identity.subject} may not use connector {route.connector}"
            )
            return
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
        dataclasses.replace(route, subject=identity.subject).store(flow)
