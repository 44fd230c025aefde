"""Forward proxy mode (HTTPS_PROXY): clients keep the registry's own image names.

The caller names its connectors and token in `Proxy-Authorization`:
`Basic base64("<ns>/<name>[,<ns2>/<name2>]:<token>")` (in a proxy URL the `/` is written `%2F`).
The identity is checked on CONNECT (missing or malformed: 407; a connector it may not use or that
does not exist: 403) and bound to that client connection. TLS is intercepted only for the bound
connectors' own addresses (`spec.address` and `spec.addressExtensions`), where the requests get a
forward `Route` and then go through the same client-auth, upstream-auth and scrub addons as in
reverse mode. Every other destination is tunnelled untouched (the client keeps the real
certificate and gets no credentials), or refused when `forward_refuse_unknown` is set.
Plain-HTTP forward requests carry `Proxy-Authorization` themselves and are handled the same way.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from urllib.parse import unquote

from mitmproxy import connection, ctx, http, tls
from mitmproxy.proxy.mode_specs import RegularMode

from addons import oci
from addons.client_auth import MAX_CREDENTIAL_LENGTH, ClientAuth, Refusal, decode_basic, valid_token
from addons.gate import Verdict, destination, fail_closed
from addons.routing import NAME_RE, NAMESPACE_RE, Route
from addons.store import ConnectorStore
from connector_store.model import Connector, parse_address

logger = logging.getLogger(__name__)

PROXY_CHALLENGE = 'Basic realm="oci-connector-proxy"'


@dataclass(frozen=True)
class Binding:
    """Who is on a client connection, and which connectors they named (all checked)."""

    subject: str
    connectors: tuple[str, ...]  # "ns/name"


def parse_proxy_authorization(value: str | None) -> tuple[tuple[tuple[str, str], ...], str] | None:
    """`Basic base64("ns/name[,ns/name]:token")` -> (((ns, name), ...), token); None when malformed.

    Never raises: the header comes from anybody.
    """
    if not value or len(value) > MAX_CREDENTIAL_LENGTH:
        return None
    scheme, _, encoded = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    decoded = decode_basic(encoded.strip())
    if decoded is None:
        return None
    user, sep, token = decoded.partition(":")
    if not sep or not valid_token(token):
        return None
    refs = []
    for item in unquote(user).split(","):
        ns, slash, name = item.strip().partition("/")
        if not slash or not NAMESPACE_RE.match(ns) or not NAME_RE.match(name):
            return None
        refs.append((ns, name))
    return (tuple(refs), token) if refs else None


def connector_origins(connector: Connector) -> set[tuple[str, int]]:
    """(host, port) pairs a connector answers for: its address and its address extensions."""
    origins = set()
    if connector.address:
        origins.add((connector.address.host, connector.address.port))
    for extra in connector.address_extensions:
        try:
            a = parse_address(extra)
        except ValueError:
            continue
        origins.add((a.host, a.port))
    return origins


def is_forward(flow_or_conn) -> bool:
    client = flow_or_conn.client_conn if isinstance(flow_or_conn, http.HTTPFlow) else flow_or_conn
    return isinstance(client.proxy_mode, RegularMode)


def proxy_auth_required(request: http.Request, message: str) -> http.Response:
    return oci.refusal(request, 407, "UNAUTHORIZED", message, headers={"Proxy-Authenticate": PROXY_CHALLENGE}, forward=True)


class ForwardProxy:
    def __init__(self, store: ConnectorStore, client_auth: ClientAuth):
        self.store = store
        self.client_auth = client_auth
        self.gate = client_auth.gate
        self.bindings: weakref.WeakKeyDictionary[connection.Client, Binding] = weakref.WeakKeyDictionary()

    def load(self, loader):
        loader.add_option(
            "forward_refuse_unknown", bool, False,
            "Forward mode: refuse destinations that are no connector's address (default: tunnel them untouched).",
        )

    def configure(self, updated):
        # HTTP/2 is off where the proxy terminates TLS (the intercepted forward connections).
        # The upstream Authorization must be on a request before its head leaves, and a streamed
        # request's head leaves right after `requestheaders`, unless it has no body, when it waits
        # for `request`. On HTTP/1 the headers say which (Content-Length, Transfer-Encoding); an
        # HTTP/2 request may carry a body with neither, and mitmproxy does not tell addons whether
        # its HEADERS frame ended the stream: an upload there lost its credentials and its body
        # (202 Range: 0-0, then DIGEST_INVALID). Registry clients speak HTTP/1.1 just as well.
        if "http2" in updated and ctx.options.http2:
            ctx.options.update(http2=False)

    # ---- identity

    async def _bind(self, flow: http.HTTPFlow) -> Binding | None:
        """Check Proxy-Authorization; answer 407/403/503 on the flow, or return the binding."""
        parsed = parse_proxy_authorization(flow.request.headers.get("proxy-authorization"))
        if parsed is None:
            flow.response = proxy_auth_required(
                flow.request, "Proxy-Authorization must be Basic <namespace>/<name>[,<namespace>/<name>]:<token>")
            return None
        refs, token = parsed
        result = await self.client_auth.admit(token, refs, require_usable=False)
        if isinstance(result, Refusal):
            if result.status == 401:
                flow.response = proxy_auth_required(flow.request, result.message)
            elif result.status == 404:  # forward mode: a connector that does not exist is just not allowed
                flow.response = oci.refusal(flow.request, 403, "DENIED", result.message, forward=True)
            else:
                flow.response = oci.refusal(flow.request, result.status, result.code, result.message, forward=True)
            return None
        binding = Binding(result.identity.subject, tuple(c.key for c in result.connectors))
        self.bindings[flow.client_conn] = binding
        return binding

    def _connector_for(self, binding: Binding | None, host: str, port: int) -> Connector | None:
        if binding is None:
            return None
        for key in binding.connectors:
            ns, _, name = key.partition("/")
            connector = self.store.get(ns, name)
            if connector and (host.lower(), port) in connector_origins(connector):
                return connector
        return None

    # ---- hooks

    @fail_closed(credentials=True)
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if not is_forward(flow):
            return
        binding = await self._bind(flow)
        if binding is None:
            return
        if ctx.options.forward_refuse_unknown and not self._connector_for(binding, flow.request.host, flow.request.port):
            flow.response = oci.refusal(flow.request, 403, "DENIED",
                                        f"{flow.request.host}:{flow.request.port} is no connector's address", forward=True)
            return
        # The tunnel may open: TLS to a connector's address is intercepted and every request in it
        # checked again; anything else is relayed untouched to the host the CONNECT named.
        self.gate.grant_connection(flow.client_conn, Verdict(binding.subject, "", destination(flow.request)))

    @fail_closed
    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        client = data.context.client
        if not isinstance(client.proxy_mode, RegularMode) or data.context.server.address is None:
            return
        host, port = data.context.server.address
        if self._connector_for(self.bindings.get(client), host, port) is None:
            data.ignore_connection = True  # not a connector: the client talks TLS with the real server

    @fail_closed(credentials=True)
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or not is_forward(flow):
            return
        binding = self.bindings.get(flow.client_conn)
        if flow.request.scheme == "http" and "proxy-authorization" in flow.request.headers:
            binding = await self._bind(flow)  # plain-HTTP forward request: credentials on every request
            if binding is None:
                return
        if binding is None:
            flow.response = proxy_auth_required(flow.request, "proxy authentication required")
            return
        connector = self._connector_for(binding, flow.request.host, flow.request.port)
        if connector is None:
            if ctx.options.forward_refuse_unknown:
                flow.response = oci.refusal(flow.request, 403, "DENIED", f"{flow.request.host} is no connector's address",
                                            forward=True)
                return
            # Not a connector: forwarded as it is, without credentials.
            self.gate.grant(flow, Verdict(binding.subject, "", destination(flow.request)))
            return
        path = flow.request.path.partition("?")[0]
        try:
            oci.parse_api_path(path)
        except oci.ProtocolError as e:
            flow.response = oci.refusal(flow.request, e.status, e.code, str(e))
            return
        origin = f"{flow.request.scheme}://{flow.request.host_header or flow.request.host}"
        Route("forward", connector.namespace, connector.name, origin, "", path, subject=binding.subject).store(flow)
