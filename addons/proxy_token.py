"""Proxy tokens: what the proxy's token endpoint issues and client authentication verifies.

Pure (no mitmproxy): an HS256 JWT bound to the subject, the connector and the granted scopes,
signed with a key every replica reads from the same file, so any replica accepts what another
issued and nothing is stored. The format is the registry token flow's own (`access` claims of
`{type, name, actions}`), but the token is useless against the registry itself.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import jwt

from addons import oci
from addons.routing import NAME_RE, NAMESPACE_RE

ISSUER = "oci-connector-proxy"
SHARED_SERVICE = "connector-proxy"  # the service of the shared-host ping: no connector
ALGORITHM = "HS256"
DEFAULT_LIFETIME = 300
ACTIONS = ("pull", "push", "delete", "*")
MAX_VERIFIED = 4096  # verified tokens remembered per process


@dataclass(frozen=True)
class Access:
    """One `scope` of the token flow: `repository:<name>:<actions>` or `registry:catalog:*`."""

    type: str
    name: str
    actions: tuple[str, ...]

    def to_claim(self) -> dict:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


def parse_scope(scope: str) -> Access | None:
    """`repository:ns/repo:pull,push` -> Access; None for anything else (ignored, as registries do)."""
    kind, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not (sep and sep2) or kind not in ("repository", "registry") or not name:
        return None
    wanted = tuple(a for a in actions.split(",") if a in ACTIONS)
    if not wanted:
        return None
    if kind == "repository":
        try:
            oci.validate_repository(name)
        except oci.ProtocolError:
            return None
    elif name != "catalog":
        return None
    return Access(kind, name, wanted)


def connector_of(service: str, scopes: list[Access]) -> tuple[str, str] | None:
    """Which connector a token request is for: its `service` (ns/name, what the challenge named),
    else the path-form prefix of its repository scopes."""
    ns, slash, name = service.partition("/")
    if slash and NAMESPACE_RE.match(ns) and NAME_RE.match(name):
        return ns, name
    for access in scopes:
        parts = access.name.split("/")
        if len(parts) > 4 and parts[0] == "namespaces" and parts[2] == "connectors":
            if NAMESPACE_RE.match(parts[1]) and NAME_RE.match(parts[3]):
                return parts[1], parts[3]
    return None


@dataclass(frozen=True)
class ProxyTokenClaims:
    subject: str
    connector: str  # "ns/name", or "" for a token that only pings
    access: tuple[Access, ...]
    expires: float

    def allows(self, repository: str | None, actions: tuple[str, ...]) -> bool:
        """Whether the token covers `actions` on `repository` (None: the catalog)."""
        for a in self.access:
            if repository is None and a.type == "registry" and a.name == "catalog":
                return True
            if repository is not None and a.type == "repository" and a.name == repository:
                if "*" in a.actions or all(x in a.actions for x in actions):
                    return True
        return False


class ProxyTokens:
    """Issues and verifies proxy tokens; stateless, so every replica with the same key agrees."""

    def __init__(self, key: bytes, lifetime: int = DEFAULT_LIFETIME, clock=time.time):
        if len(key) < 32:
            raise ValueError("the proxy token key must be at least 32 bytes")
        self.key = key
        self.lifetime = lifetime
        self.clock = clock  # for the cache; jwt checks a token's first use against its own clock
        # Verified tokens, so that a client's every request does not pay an HMAC and a JSON parse
        # (a sixth of the proxy's own CPU per small request). Bounded; an entry counts only until
        # its token expires.
        self._verified: dict[str, ProxyTokenClaims] = {}

    def issue(self, subject: str, connector: str, service: str, access: list[Access], now: float | None = None) -> tuple[str, int]:
        now = time.time() if now is None else now
        claims = {
            "iss": ISSUER, "sub": subject, "aud": service, "iat": int(now), "nbf": int(now) - 1,
            "exp": int(now) + self.lifetime, "jti": uuid.uuid4().hex, "connector": connector,
            "access": [a.to_claim() for a in access],
        }
        return jwt.encode(claims, self.key, algorithm=ALGORITHM), self.lifetime

    def verify(self, token: str) -> ProxyTokenClaims | None:
        """The claims of a valid, unexpired proxy token; None for anything else."""
        claims = self._verified.get(token)
        if claims is not None:
            if claims.expires > self.clock():
                return claims
            del self._verified[token]
        claims = self._decode(token)
        if claims is not None:
            while len(self._verified) >= MAX_VERIFIED:
                del self._verified[next(iter(self._verified))]  # the oldest
            self._verified[token] = claims
        return claims

    def _decode(self, token: str) -> ProxyTokenClaims | None:
        try:
            claims = jwt.decode(token, self.key, algorithms=[ALGORITHM], issuer=ISSUER,
                                options={"verify_aud": False, "require": ["exp", "iss", "sub"]})
            access = tuple(
                Access(str(a["type"]), str(a["name"]), tuple(str(x) for x in a["actions"]))
                for a in claims.get("access", [])
            )
            return ProxyTokenClaims(str(claims["sub"]), str(claims.get("connector", "")), access, float(claims["exp"]))
        except (jwt.PyJWTError, KeyError, TypeError, ValueError, AttributeError):
            return None

    @staticmethod
    def looks_like_ours(token: str) -> bool:
        """An unverified peek: a JWT whose header says HS256 (ServiceAccount tokens are RS256)."""
        try:
            return jwt.get_unverified_header(token).get("alg") == ALGORITHM
        except jwt.PyJWTError:
            return False


def read_key(path: str) -> bytes:
    with open(path, "rb") as f:
        key = f.read().strip()
    if len(key) < 32:
        raise ValueError(f"{path}: the proxy token key must be at least 32 bytes")
    return key
