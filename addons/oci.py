"""Pure OCI distribution protocol helpers: challenges, API paths, scopes, JSON errors.

Nothing here knows about mitmproxy flows except the response builders (`refusal`, `frame`,
`ping_response`), which import mitmproxy when called, so the parsing half can be
used without it (addons/registry_client.py); everything else is plain data in, plain data out, so tests drive it directly.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # building responses needs mitmproxy; parsing does not (registry_client.py)
    from mitmproxy import http

API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")

# distribution/reference's repository name grammar: path components of lower-case alphanumerics
# joined by separators; no empty, "." or ".." component can match.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
REPOSITORY_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*\Z")
REFERENCE_RE = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,1024})\Z")
DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,1024}\Z")
MAX_REPOSITORY_LENGTH = 255

_ENDPOINT_RE = re.compile(
    r"^/v2/(?P<name>.+)/(?:"
    r"manifests/(?P<reference>[^/]+)"
    r"|blobs/uploads/(?P<upload>[^/]*)"
    r"|blobs/(?P<digest>[^/]+)"
    r"|tags/(?P<tags>list)"
    r"|referrers/(?P<referrers>[^/]+)"
    r")\Z"
)


class ProtocolError(ValueError):
    """Malformed client input; carries the registry error code and HTTP status to answer with."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code


# ---------------------------------------------------------------- WWW-Authenticate challenges


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "bearer", "basic"
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        return self.params.get("service")

    @property
    def error(self) -> str | None:
        return self.params.get("error")


_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_CHALLENGE_PART_RE = re.compile(
    rf"\s*(?:(?P<key>{_TOKEN})\s*=\s*(?:\"(?P<quoted>(?:[^\"\\]|\\.)*)\"|(?P<bare>[^,\s]*))|(?P<scheme>{_TOKEN})(?=\s|,|$))\s*,?"
)


def parse_www_authenticate(value: str) -> list[Challenge]:
    """Parse a WWW-Authenticate header (RFC 7235): several challenges, quoted params with commas.

    Unparseable garbage yields no challenges rather than an exception: a hostile or broken
    upstream must not crash the proxy.
    """
    challenges: list[Challenge] = []
    pos = 0
    scheme: str | None = None
    params: dict[str, str] = {}
    value = value or ""
    while pos < len(value):
        m = _CHALLENGE_PART_RE.match(value, pos)
        if not m or m.end() == pos:
            break
        pos = m.end()
        if m.group("scheme"):
            if scheme is not None:
                challenges.append(Challenge(scheme, params))
            scheme, params = m.group("scheme").lower(), {}
        elif scheme is not None:
            raw = m.group("quoted")
            val = re.sub(r"\\(.)", r"\1", raw) if raw is not None else m.group("bare")
            params[m.group("key").lower()] = val
    if scheme is not None:
        challenges.append(Challenge(scheme, params))
    return challenges


def pick_challenge(challenges: list[Challenge]) -> Challenge | None:
    """Prefer Bearer (the token flow) over Basic, as docker does."""
    for wanted in ("bearer", "basic"):
        for c in challenges:
            if c.scheme == wanted:
                return c
    return None


class RealmError(ValueError):
    """A token realm the proxy will not call: its message says why (never quoting credentials)."""


@dataclass(frozen=True)
class Realm:
    """A token realm, parsed once: the request for a token is built from these parts alone."""

    scheme: str  # "http" or "https"
    host: str  # lower-case DNS name, IPv4 address, or IPv6 address without brackets
    port: int
    target: str  # path and query, starting with "/"

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = {"http": 80, "https": 443}[self.scheme]
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.target}"

    def with_query(self, query: str) -> str:
        """The request target (path and query) with `query` appended."""
        if not query:
            return self.target
        return self.target + ("&" if "?" in self.target else "?") + query


_REALM_RE = re.compile(
    r"(?P<scheme>https?)://"
    r"(?:(?P<name>[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*\.?)"
    r"|\[(?P<ipv6>[0-9a-f:.]+)\])"
    r"(?::(?P<port>[0-9]{1,5}))?"
    r"(?P<target>/(?:[A-Za-z0-9\-._~!$&'()*+,;=:/?]|%[0-9A-Fa-f]{2})*)?",
    re.IGNORECASE,
)
MAX_REALM_LENGTH = 2048


def parse_realm(value: str) -> Realm:
    """Parse a token realm strictly; raises RealmError for anything two URL parsers could read differently.

    Refused: other schemes, userinfo (`@` anywhere), backslashes, whitespace, control and non-ASCII
    characters, fragments, bad percent-escapes, ports out of range, and hosts that are neither a
    DNS name nor an IP address. What is accepted has one reading, and the token request is built
    from the parts returned here, so the host that was checked is the host that is called.
    """
    if not isinstance(value, str) or not value:
        raise RealmError("the token realm is empty")
    if len(value) > MAX_REALM_LENGTH:
        raise RealmError("the token realm is too long")
    m = _REALM_RE.fullmatch(value) if value.isascii() else None
    if not m:
        raise RealmError(f"the token realm {_printable(value)!r} is not a plain http(s) URL")
    port = int(m.group("port")) if m.group("port") else (443 if m.group("scheme") == "https" else 80)
    if not 0 < port < 65536:
        raise RealmError(f"the token realm's port {port} is out of range")
    if m.group("ipv6") is not None:
        try:
            host = str(ipaddress.IPv6Address(m.group("ipv6")))
        except ValueError:
            raise RealmError("the token realm's IPv6 address is malformed") from None
    else:
        host = m.group("name").rstrip(".").lower()
        last = host.rsplit(".", 1)[-1]
        if last.isdigit() or last.startswith("0x"):
            # Numeric hosts have one reading only as a canonical dotted quad: the resolver would
            # take "0x7f.1" or "127.1" as 127.0.0.1, which no string comparison would see.
            try:
                host = str(ipaddress.IPv4Address(host))
            except ValueError:
                raise RealmError(f"the token realm's host {host!r} is not a canonical IPv4 address") from None
    return Realm(m.group("scheme").lower(), host.lower(), port, m.group("target") or "/")


def _printable(value: str, limit: int = 200) -> str:
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in value[:limit])


# ---------------------------------------------------------------- API paths and scopes


@dataclass(frozen=True)
class ApiPath:
    """A parsed `/v2/...` path. `repository` is None for the ping and the catalog."""

    kind: str  # "ping", "catalog", "manifest", "blob", "upload", "tags", "referrers"
    repository: str | None = None
    reference: str | None = None


def validate_repository(name: str) -> str:
    if len(name) > MAX_REPOSITORY_LENGTH or not REPOSITORY_RE.match(name):
        raise ProtocolError(400, "NAME_INVALID", f"invalid repository name {name!r}")
    return name


def parse_api_path(path: str) -> ApiPath:
    """Classify an upstream API path (query string already removed)."""
    if path in ("/v2", "/v2/"):
        return ApiPath("ping")
    if path == "/v2/_catalog":
        return ApiPath("catalog")
    if not path.startswith("/v2/"):
        raise ProtocolError(404, "NOT_FOUND", f"{path!r} is not a registry API path (expected /v2/...)")
    m = _ENDPOINT_RE.match(path)
    if not m:
        raise ProtocolError(404, "NOT_FOUND", f"{path!r} is not a registry API endpoint")
    name = validate_repository(m.group("name"))
    if m.group("reference") is not None:
        ref = m.group("reference")
        if not REFERENCE_RE.match(ref):
            raise ProtocolError(400, "MANIFEST_INVALID", f"invalid tag or digest {ref!r}")
        return ApiPath("manifest", name, ref)
    if m.group("upload") is not None:
        return ApiPath("upload", name, m.group("upload") or None)
    if m.group("digest") is not None:
        digest = m.group("digest")
        if not DIGEST_RE.match(digest):
            raise ProtocolError(400, "DIGEST_INVALID", f"invalid digest {digest!r}")
        return ApiPath("blob", name, digest)
    if m.group("tags") is not None:
        return ApiPath("tags", name)
    return ApiPath("referrers", name, m.group("referrers"))


def required_scopes(method: str, api: ApiPath, query: str = "") -> tuple[str, ...]:
    """The token scopes a request needs, known before it is forwarded (streamed bodies can't be replayed)."""
    if api.kind == "ping":
        return ()
    if api.kind == "catalog":
        return ("registry:catalog:*",)
    assert api.repository is not None
    method = method.upper()
    if method in ("GET", "HEAD"):
        actions = "pull"
    elif method == "DELETE":
        actions = "delete"
    else:  # POST, PUT, PATCH: distribution asks for pull too when pushing
        actions = "pull,push"
    scopes = [f"repository:{api.repository}:{actions}"]
    if api.kind == "upload" and method == "POST":
        q = dict(parse_qsl(query))
        source = q.get("from")
        if q.get("mount") and source and source != api.repository:
            try:
                scopes.append(f"repository:{validate_repository(source)}:pull")
            except ProtocolError:
                pass  # the registry will refuse the mount and start a plain upload
    return tuple(sorted(scopes))


def has_body(request: http.Request) -> bool:
    """Whether a body follows the headers (the request can then not be sent twice)."""
    if "chunked" in request.headers.get("transfer-encoding", "").lower():
        return True
    length = request.headers.get("content-length", "0").strip() or "0"
    # ASCII digits only ("²".isdigit() is True and int("²") raises), and no int() of thousands of
    # digits (Python refuses those): anything but a plain small number is taken to mean a body.
    if not (length.isascii() and length.isdigit()) or len(length) > 18:
        return True
    return int(length) > 0


# ---------------------------------------------------------------- errors


def error_body(code: str, message: str, detail: object = None) -> bytes:
    err: dict[str, object] = {"code": code, "message": message}
    if detail is not None:
        err["detail"] = detail
    return json.dumps({"errors": [err]}).encode()


NO_BODY_STATUSES = (204, 304)


def refusal(
    request: http.Request, status: int, code: str, message: str, detail: object = None,
    headers: dict[str, str] | None = None, forward: bool = False,
) -> http.Response:
    """Every response the proxy makes itself, framed for the request it answers.

    A registry's JSON error, with its API version header; HEAD, 204 and 304 carry no body (a body
    on a kept-alive connection would be read as the next response), but HEAD keeps the length the
    GET would have had, as a registry does. `forward`: an answer of the forward proxy, not of a
    registry (no registry API header).
    """
    from mitmproxy import http

    all_headers = {"Content-Type": "application/json"}
    if not forward:
        all_headers[API_VERSION_HEADER[0]] = API_VERSION_HEADER[1]
    all_headers.update(headers or {})
    body = error_body(code, message, detail)
    return frame(request, http.Response.make(status, body, all_headers))


def frame(request: http.Request, response: http.Response) -> http.Response:
    """Drop the body where HTTP forbids one (HEAD keeps the Content-Length of what GET would get)."""
    if not response.raw_content:
        return response  # nothing to drop: an upstream HEAD answer keeps its Content-Length as it is
    if request.method.upper() == "HEAD" or response.status_code in NO_BODY_STATUSES or response.status_code < 200:
        length = len(response.raw_content)
        response.content = b""
        if request.method.upper() == "HEAD" and response.status_code not in NO_BODY_STATUSES:
            response.headers["Content-Length"] = str(length)
        else:
            response.headers.pop("Content-Length", None)
    return response


def ping_response() -> http.Response:
    """`200 {}` for `GET /v2/`: the client is authenticated and may go on."""
    from mitmproxy import http

    return http.Response.make(
        200, b"{}", {"Content-Type": "application/json", API_VERSION_HEADER[0]: API_VERSION_HEADER[1]}
    )
