"""Which connector a request is for (Host form or path form), and where it goes upstream.

Host form: `c-<name>.<namespace>[.svc[.cluster.local]][:port]`.
Path form: any host, `/v2/namespaces/<ns>/connectors/<name>/<repository>/...`.

The `Routing` addon only works out the route and records it in `flow.metadata`; it does not look
the connector up or answer 404, because client authentication must come first (DESIGN section 3:
nobody learns which connectors exist without permission). `retarget` is applied later, by the
upstream addon, once the caller is known to be allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, urlencode

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy.mode_specs import ReverseMode

from addons import oci
from addons.gate import fail_closed
from connector_store import addresses
from connector_store.addresses import DEFAULT_CLUSTER_DOMAIN
from connector_store.model import Address

METADATA_KEY = "connector_proxy"
OWN_ENDPOINTS = "/.connectors/"  # /.connectors/config, /.connectors/token: not registry paths

_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
PATH_FORM_RE = re.compile(
    r"^/v2/namespaces/(?P<namespace>[^/]*)/connectors/(?P<name>[^/]*)(?P<rest>/.*)?\Z"
)
NAMESPACE_RE = re.compile(rf"^{_LABEL}\Z")
NAME_RE = re.compile(r"^[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?\Z")
MOUNT_FROM_RE = re.compile(r"^namespaces/(?P<namespace>[^/]+)/connectors/(?P<name>[^/]+)/(?P<repo>.+)\Z")


@dataclass(frozen=True)
class Route:
    """Where a client request goes; kept in flow.metadata as plain data (it is saved with the flow)."""

    form: Literal["host", "path", "ping", "forward"]
    namespace: str = ""
    name: str = ""
    origin: str = ""  # the proxy origin as the client addressed it, e.g. http://c-harbor.default.svc:80
    prefix: str = ""  # path form: "namespaces/<ns>/connectors/<name>"; "" otherwise
    path: str = "/v2/"  # the upstream API path, without query
    subject: str = ""  # the authenticated caller, once known
    upstream: str = ""  # the connector's address, once the request is retargeted

    @property
    def connector(self) -> str:
        return f"{self.namespace}/{self.name}" if self.name else ""

    def store(self, flow: http.HTTPFlow) -> None:
        flow.metadata[METADATA_KEY] = dict(self.__dict__)  # plain data (saved with the flow); asdict deep-copies, slowly

    @classmethod
    def of(cls, flow: http.HTTPFlow) -> Route | None:
        data = flow.metadata.get(METADATA_KEY)
        return cls(**data) if isinstance(data, dict) else None


def parse_host_form(host_header: str | None, cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> tuple[str, str] | None:
    """`c-harbor.default.svc.cluster.local:80` -> ("default", "harbor")."""
    return addresses.parse_host_form(host_header, cluster_domain)


def parse_path_form(path: str) -> tuple[str, str, str] | None:
    """`/v2/namespaces/ns/connectors/c/test/abc/manifests/v1` -> ("ns", "c", "/v2/test/abc/manifests/v1")."""
    m = PATH_FORM_RE.match(path)
    if not m:
        return None
    namespace, name, rest = m.group("namespace"), m.group("name"), m.group("rest") or "/"
    if not NAMESPACE_RE.match(namespace) or not NAME_RE.match(name):
        raise oci.ProtocolError(400, "NAME_INVALID", f"invalid connector reference {namespace!r}/{name!r}")
    return namespace, name, "/v2" + rest


def route_request(path: str, host_header: str | None, origin: str,
                  cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> Route:
    """Work out the route for a client request path (without query); raises ProtocolError."""
    if "\\" in path or "%2f" in path.lower() or "/../" in path + "/" or "/./" in path + "/":
        raise oci.ProtocolError(400, "NAME_INVALID", "path segments '.', '..' and encoded slashes are not allowed")
    path_form = parse_path_form(path)
    if path_form:
        namespace, name, upstream = path_form
        oci.parse_api_path(upstream)  # reject malformed repository names before anything else
        return Route("path", namespace, name, origin, f"namespaces/{namespace}/connectors/{name}", upstream)
    host_form = parse_host_form(host_header, cluster_domain)
    if host_form:
        oci.parse_api_path(path)
        return Route("host", host_form[0], host_form[1], origin, "", path)
    if path in ("/v2", "/v2/"):
        return Route("ping", origin=origin)
    raise oci.ProtocolError(
        404,
        "NAME_UNKNOWN",
        "no connector named: use the host c-<name>.<namespace>.svc.cluster.local "
        "or the path /v2/namespaces/<namespace>/connectors/<name>/<repository>/...",
    )


def client_origin(flow: http.HTTPFlow) -> str:
    scheme = "https" if flow.client_conn.tls_established else "http"
    return f"{scheme}://{flow.request.host_header or flow.request.host}"


def translate_mount_query(query: str, route: Route) -> str:
    """A cross-repo mount names its source in the proxy's naming; translate it to the upstream's.

    Same connector: strip the path-form prefix. Another connector: the registry cannot mount
    from a different registry, so drop mount/from and let it become a plain upload.
    """
    try:
        params = parse_qsl(query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        # Not UTF-8: no repository name can be in it; drop the mount, a plain upload still works.
        return "&".join(p for p in query.split("&") if not p.startswith(("mount=", "from=")))
    source = next((v for k, v in params if k == "from"), None)
    if source is None:
        return query
    m = MOUNT_FROM_RE.match(source)
    if not m:
        return query
    if (m.group("namespace"), m.group("name")) == (route.namespace, route.name):
        params = [(k, m.group("repo") if k == "from" else v) for k, v in params]
    else:
        params = [(k, v) for k, v in params if k not in ("mount", "from")]
    try:
        return urlencode(params)
    except UnicodeEncodeError:  # surrogate-escaped bytes: no valid repository, a plain upload
        return urlencode([(k, v) for k, v in params if k not in ("mount", "from") and (k + v).isascii()])


def retarget(request: http.Request, route: Route, address: Address) -> None:
    """Point the request at the connector's registry (scheme, host, port, path prefix)."""
    query = request.path.partition("?")[2]
    if route.form != "ping" and query and "from=" in query:
        query = translate_mount_query(query, route)
    request.scheme = address.scheme
    request.host = address.host
    request.port = address.port
    request.host_header = address.netloc
    request.path = address.path_prefix + route.path + (f"?{query}" if query else "")


def is_reverse(flow: http.HTTPFlow) -> bool:
    """Whether the request came in on the reverse listener (not the forward one)."""
    return isinstance(flow.client_conn.proxy_mode, ReverseMode)


class Routing:
    """requestheaders: record the Route of every registry request, or answer a malformed one.

    Reverse listener only: forward-mode routes come from the forward addon."""

    def __init__(self) -> None:
        self.cluster_domain = DEFAULT_CLUSTER_DOMAIN

    def load(self, loader):
        loader.add_option("cluster_domain", str, DEFAULT_CLUSTER_DOMAIN,
                          "The cluster's DNS domain: host-form names are c-<name>.<ns>.svc.<cluster_domain>.")

    def configure(self, updated):
        if "cluster_domain" in updated:
            if not addresses.valid_cluster_domain(ctx.options.cluster_domain):
                raise exceptions.OptionsError(f"cluster_domain: {ctx.options.cluster_domain!r} is not a DNS domain")
            self.cluster_domain = ctx.options.cluster_domain

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or not is_reverse(flow):
            return
        path = flow.request.path.partition("?")[0]
        if path.startswith(OWN_ENDPOINTS):
            return  # the proxy's own endpoints (config, token) answer for themselves
        try:
            route = route_request(path, flow.request.host_header, client_origin(flow), self.cluster_domain)
        except oci.ProtocolError as e:
            flow.response = oci.refusal(flow.request, e.status, e.code, str(e))
            return
        route.store(flow)
