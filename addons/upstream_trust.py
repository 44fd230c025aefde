"""Upstream TLS trust, per connector and per flow (`spec.caCertSecretRef`), decided alike on every path.

**What is trusted.** A flow routed to a connector trusts the *base* plus that connector's CA, and
nothing else: base = the `ssl_verify_upstream_trusted_ca` file if set, else certifi's bundle (what
mitmproxy itself uses), plus `ssl_verify_upstream_trusted_confdir` when set. Another connector's CA
never counts, even for the same host and port. Flows that belong to no connector (forward-mode
traffic to other hosts) trust the base only.

**How it is decided: OpenSSL, the way curl does it.** Every path verifies with OpenSSL's
X509_verify_cert on the same trust and flags (trusted-first, partial chains allowed as curl does,
no X509_STRICT) and the host-name check without partial wildcards. So a self-signed registry
certificate without Authority Key Identifier or basicConstraints that `curl --cacert` accepts is
accepted, and one curl refuses (wrong name, another CA) is refused, on all of them. One deliberate
difference with curl: the subject CN is never used as a host name (mitmproxy, Go clients and
browsers ignore it too); curl still falls back to it for certificates without DNS names.

- The challenge probe, token fetches and 401 re-sends go through `RegistryClient` (upstream_auth),
  whose Python `ssl` context is `registry_ssl_context()`.
- mitmproxy's own connections (the data path): `tls_start_server` lets mitmproxy's tlsconfig build
  the connection as usual (SNI, ALPN, host-name check, ciphers, client certificate), then switches
  the pyOpenSSL connection to a context built by the same `create_proxy_server_context` with the
  same arguments, except that its CA file holds base + the connector's CA. The SNI, ALPN and
  host-name parameters live on the SSL object and survive the switch (tests/security/test_trust.py).
- Before a connector's flow leaves, a TLS *preflight* (one handshake per trust and address, cached
  while it succeeds) gives a failure the registry's JSON error naming the connector; mitmproxy's
  own handshake would only produce its HTML 502 page. The preflight is a convenience, not the
  guard: mitmproxy's handshake is verified regardless.

**Which flow a server connection is for.** `tls_start_server` has no flow, only the client
connection. `requestheaders` records, per client connection, each flow and its trust; a new
server connection takes the trust of the flows on that client connection that go to its address
and have no server connection yet. HTTP/1 requests on a connection are sequential, and forward
mode intercepts one host per client connection, so that is normally one flow; if flows with
different trusts wait for the same address at once (HTTP/2 multiplexing), the connection is
failed instead of guessed (fail closed).

**Connection reuse.** mitmproxy hands a request an open server connection of the same client
connection whose (address, tls, via) match, without any hook in between, so the check happens in
`requestheaders` and again in `request` (before mitmproxy looks for a connection). Each server
connection remembers the trust it was verified with. A flow whose trust differs may be sent over
it only if the certificate chain that connection presented verifies under the flow's own trust
(OpenSSL again, same store and flags, purpose sslserver; the host name was checked on that
connection for the same name); otherwise, or while that handshake is still running, the flow is
refused with a 502 naming its connector. This is exactly what a fresh connection would decide
with the same server, so:
- a connection accepted only because of connector A's CA never carries a request of connector B
  (another CA or none), whatever the order of their requests on one keep-alive connection;
- two connectors whose bundles both accept the server (the same CA pasted differently, a CA
  being rotated) keep sharing connections; refusing them, or closing connections we do not own
  (mitmproxy offers addons no way to), would break keep-alive clients for no gain.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import socket
import ssl
import tempfile
import weakref
from dataclasses import dataclass

from mitmproxy import connection, ctx, http, tls
from mitmproxy.addons.tlsconfig import _default_ciphers
from mitmproxy.net import tls as net_tls
from OpenSSL import SSL, crypto

from addons import oci
from addons.gate import fail_closed, is_forward
from addons.routing import Route
from addons.store import ConnectorStore
from addons.registry_client import (
    PREFLIGHT_TTL,
    SingleFlightCache,
    base_cafile,
    registry_ssl_context,
    tls_preflight,
    trust_key,
)

logger = logging.getLogger(__name__)

def current_trusted_confdir() -> str | None:
    """`ssl_verify_upstream_trusted_confdir` when running inside mitmproxy, else None."""
    options = getattr(ctx, "options", None)
    return getattr(options, "ssl_verify_upstream_trusted_confdir", None) if options is not None else None


def chain_verifies(chain: list, trust_file: str | None, capath: str | None) -> str | None:
    """Why OpenSSL refuses `chain` (leaf first, as the server sent it) under a trust, or None if it accepts.

    The same store and flags as a handshake with that trust: X509_verify_cert, purpose sslserver,
    trusted-first and partial chains. The host name is not checked here (the caller does).
    """
    store = crypto.X509Store()
    store.load_locations(trust_file, capath)
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    if SSL._lib.X509_STORE_set_purpose(store._store, SSL._lib.X509_PURPOSE_SSL_SERVER) != 1:  # type: ignore[attr-defined]
        return "cannot set the certificate purpose"
    certs = [c if isinstance(c, crypto.X509) else crypto.X509.from_cryptography(c) for c in chain]
    if not certs:
        return "the server sent no certificate"
    try:
        crypto.X509StoreContext(store, certs[0], certs[1:]).verify_certificate()
    except crypto.X509StoreContextError as e:
        return str(e)
    return None


def _refuse_every_certificate(conn, cert, errnum, depth, ok) -> bool:
    return False


def _netloc(host: str, port: int) -> str:
    host = f"[{host}]" if ":" in host else host
    return host if port == 443 else f"{host}:{port}"


# ---------------------------------------------------------------- what is remembered


@dataclass(frozen=True)
class FlowTrust:
    """The trust a flow goes out with."""

    connector: str  # "ns/name"; "" for a flow that belongs to no connector
    ca_pem: str | None

    @property
    def key(self) -> str:
        return trust_key(self.ca_pem)


@dataclass(frozen=True)
class ServerTrust:
    """What a server connection was verified with."""

    key: str  # trust_key(...); AMBIGUOUS for a connection failed on purpose (it trusts nothing)
    connectors: tuple[str, ...]  # for the log
    sni: str | None
    insecure: bool = False


AMBIGUOUS = "ambiguous"  # a key no flow has


class UpstreamTrust:
    def __init__(self, store: ConnectorStore):
        self.store = store
        self._flows: weakref.WeakKeyDictionary[connection.Client, weakref.WeakKeyDictionary[http.HTTPFlow, FlowTrust]] = \
            weakref.WeakKeyDictionary()
        self._servers: weakref.WeakKeyDictionary[connection.Server, ServerTrust] = weakref.WeakKeyDictionary()
        self._client_servers: weakref.WeakKeyDictionary[connection.Client, weakref.WeakSet[connection.Server]] = \
            weakref.WeakKeyDictionary()
        self._dir: str | None = None
        self._files: dict[str, str | None] = {}  # trust key -> CA file for mitmproxy's contexts
        self._contexts: dict[str, ssl.SSLContext] = {}  # trust key -> preflight context
        self.preflights = SingleFlightCache()

    # ---- trust files and contexts

    def _base(self) -> tuple[str | None, str | None]:
        return ctx.options.ssl_verify_upstream_trusted_ca, ctx.options.ssl_verify_upstream_trusted_confdir

    def trust_file(self, ca_pem: str | None) -> str | None:
        """A CA file holding base + the connector's CA (cached per CA, removed at `done`)."""
        key = trust_key(ca_pem)
        if key in self._files:
            return self._files[key]
        option_cafile, capath = self._base()
        cafile = base_cafile(option_cafile, capath)
        if cafile is None and not ca_pem:
            self._files[key] = None  # only the CA directory, as mitmproxy has it
            return None
        data = b""
        if cafile:
            with open(cafile, "rb") as f:
                data = f.read()
        if ca_pem:
            data += b"\n" + ca_pem.encode() + b"\n"
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="connector-proxy-trust-")
        path = os.path.join(self._dir, hashlib.sha256(data).hexdigest() + ".pem")
        if not os.path.exists(path):
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        self._files[key] = path
        return path

    def preflight_context(self, ca_pem: str | None) -> ssl.SSLContext:
        key = trust_key(ca_pem)
        if key not in self._contexts:
            option_cafile, capath = self._base()
            self._contexts[key] = registry_ssl_context(ca_pem, option_cafile, False, capath)
        return self._contexts[key]

    def proxy_server_context(self, tls_start: tls.TlsData, trust_file: str | None) -> SSL.Context:
        """mitmproxy's context for this connection (tlsconfig's arguments) with `trust_file` as CA file."""
        server = tls_start.conn
        opts = ctx.options
        cipher_list = server.cipher_list or _default_ciphers(net_tls.Version[opts.tls_version_server_min])
        client_cert: str | None = None
        if opts.client_certs:
            client_certs = os.path.expanduser(opts.client_certs)
            if os.path.isfile(client_certs):
                client_cert = client_certs
            else:
                p = os.path.join(client_certs, f"{server.sni or server.address[0]}.pem")
                if os.path.isfile(p):
                    client_cert = p
        return net_tls.create_proxy_server_context(
            method=net_tls.Method.DTLS_CLIENT_METHOD if tls_start.is_dtls else net_tls.Method.TLS_CLIENT_METHOD,
            min_version=net_tls.Version[opts.tls_version_server_min],
            max_version=net_tls.Version[opts.tls_version_server_max],
            cipher_list=tuple(cipher_list),
            ecdh_curve=net_tls.get_curve(opts.tls_ecdh_curve_server),
            verify=net_tls.Verify.VERIFY_PEER,
            ca_path=opts.ssl_verify_upstream_trusted_confdir,
            ca_pemfile=trust_file,
            client_cert=client_cert,
            legacy_server_connect=opts.ssl_insecure,
        )

    # ---- which trust a flow has, and which flows a connection is for

    def flow_trust(self, flow: http.HTTPFlow) -> FlowTrust:
        route = Route.of(flow)
        if route is None or not route.name:
            return FlowTrust("", None)
        connector = self.store.get(route.namespace, route.name)
        if connector is None:
            raise LookupError("the flow's connector is gone")  # fail closed: never guess a trust
        return FlowTrust(connector.key, connector.ca_pem)

    def remember(self, flow: http.HTTPFlow) -> FlowTrust:
        """Record `flow` and its trust on its client connection, for the server connection it will get."""
        trust = self.flow_trust(flow)
        self._flows.setdefault(flow.client_conn, weakref.WeakKeyDictionary())[flow] = trust
        return trust

    def server_trust(self, server: connection.Server) -> ServerTrust | None:
        """What a server connection was verified with (None: not set up here)."""
        return self._servers.get(server)

    def _waiting(self, client: connection.Client, address: tuple[str, int]) -> list[FlowTrust]:
        """Trusts of the flows of `client` to `address` that have no server connection yet."""
        flows = self._flows.get(client)
        if not flows:
            return []
        waiting = []
        for flow, trust in list(flows.items()):
            if flow.response is not None or flow.error is not None:
                del flows[flow]  # answered or dead: it needs no connection any more
                continue
            req = flow.request
            if (req.scheme == "https" and (req.host.lower(), req.port) == address
                    and not flow.server_conn.connected):
                waiting.append(trust)
        return waiting

    def reuse_refusal(self, flow: http.HTTPFlow, trust: FlowTrust) -> str | None:
        """Why an open server connection mitmproxy could hand this flow must not carry it, or None."""
        servers = self._client_servers.get(flow.client_conn)
        if not servers:
            return None
        address = (flow.request.host.lower(), flow.request.port)
        for server in list(servers):
            if server.address is None or (server.address[0].lower(), server.address[1]) != address:
                continue
            if not server.connected or server.error:
                servers.discard(server)  # closed or failed: mitmproxy sends nothing over it any more
                continue
            record = self._servers.get(server)
            if record is None:
                return "an open connection to it was set up without a recorded trust"
            if record.insecure or record.key == trust.key:
                continue
            if not server.tls_established:
                return "a connection to it verified with another trust is still being set up"
            if (record.sni or "").lower() != address[0]:
                return "an open connection to it was verified for another name"
            why = chain_verifies([c.to_cryptography() for c in server.certificate_list],
                                 self.trust_file(trust.ca_pem), ctx.options.ssl_verify_upstream_trusted_confdir)
            if why:
                return f"{why} (an open connection to it was accepted with another connector's CA only)"
        return None

    def refuse(self, flow: http.HTTPFlow, trust: FlowTrust, why: str) -> None:
        where = _netloc(flow.request.host, flow.request.port)
        if trust.connector:
            message = f"connector {trust.connector}: TLS verification of {where} failed: {why}"
        else:
            message = f"TLS verification of {where} failed: {why}"
        logger.warning("%s", message)
        forward = not trust.connector and is_forward(flow)
        flow.response = oci.refusal(flow.request, 502, "UNAVAILABLE", message, forward=forward)

    async def preflight(self, flow: http.HTTPFlow, trust: FlowTrust) -> None:
        host, port = flow.request.host.lower(), flow.request.port
        context = self.preflight_context(trust.ca_pem)
        timeout = float(getattr(ctx.options, "upstream_timeout", 30) or 30)

        async def handshake():
            await asyncio.to_thread(tls_preflight, host, port, context, min(timeout, 10.0))
            return True, PREFLIGHT_TTL

        where = _netloc(host, port)
        try:
            await self.preflights.get((trust.key, host, port), handshake)
        except ssl.SSLCertVerificationError as e:
            self.refuse(flow, trust, e.verify_message or e.reason or "certificate verify failed")
        except ssl.SSLError as e:
            self.refuse(flow, trust, f"TLS handshake failed ({e.reason or type(e).__name__})")
        except (TimeoutError, socket.timeout):
            flow.response = oci.refusal(flow.request, 504, "UNAVAILABLE", f"connector {trust.connector}: {where} timed out")
        except OSError as e:
            flow.response = oci.refusal(flow.request, 502, "UNAVAILABLE",
                                        f"connector {trust.connector}: {where} unreachable: {e.strerror or type(e).__name__}")

    # ---- hooks

    @fail_closed
    def configure(self, updated):
        if updated & {"ssl_verify_upstream_trusted_ca", "ssl_verify_upstream_trusted_confdir", "ssl_insecure"}:
            self._files.clear()
            self._contexts.clear()
            self.preflights = SingleFlightCache()

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None or flow.request.scheme != "https":
            return
        trust = self.remember(flow)
        if ctx.options.ssl_insecure:
            return
        why = self.reuse_refusal(flow, trust)
        if why:
            self.refuse(flow, trust, why)
            return
        if trust.connector:
            await self.preflight(flow, trust)

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        # A buffered request looks for its server connection only now: check again what it may reuse.
        if flow.response is not None or flow.error is not None or ctx.options.ssl_insecure:
            return
        trust = self._flows.get(flow.client_conn, {}).get(flow)
        if trust is None:
            if flow.request.scheme != "https":
                return
            trust = self.flow_trust(flow)  # retargeted to https after requestheaders? still check
        why = self.reuse_refusal(flow, trust)
        if why:
            self.refuse(flow, trust, why)

    @fail_closed
    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        if tls_start.ssl_conn is not None or tls_start.conn.address is None:
            return
        ctx.master.addons.get("tlsconfig").tls_start_server(tls_start)  # mitmproxy's own set-up
        if tls_start.ssl_conn is None or tls_start.is_dtls:
            return
        server, client = tls_start.conn, tls_start.context.client
        self._client_servers.setdefault(client, weakref.WeakSet()).add(server)
        if ctx.options.ssl_insecure:
            self._servers[server] = ServerTrust("", (), server.sni, insecure=True)
            return
        try:
            self._apply_trust(tls_start, server, client)
        except Exception:
            tls_start.ssl_conn.set_verify(SSL.VERIFY_PEER, _refuse_every_certificate)
            self._servers[server] = ServerTrust(AMBIGUOUS, (), server.sni)
            raise

    def _apply_trust(self, tls_start: tls.TlsData, server: connection.Server, client: connection.Client) -> None:
        address = (server.address[0].lower(), server.address[1])
        waiting = self._waiting(client, address)
        keys = {t.key for t in waiting}
        names = tuple(sorted({t.connector or "-" for t in waiting}))
        if len(keys) > 1:
            logger.error("upstream TLS to %s refused: flows of connectors %s with different CAs wait for it at once",
                         _netloc(*address), ", ".join(names))
            tls_start.ssl_conn.set_verify(SSL.VERIFY_PEER, _refuse_every_certificate)
            self._servers[server] = ServerTrust(AMBIGUOUS, names, server.sni)
            return
        ca_pem = waiting[0].ca_pem if waiting else None
        ssl_conn = tls_start.ssl_conn
        ssl_conn.set_context(self.proxy_server_context(tls_start, self.trust_file(ca_pem)))
        # curl's partial-chain flag, on this connection's own parameters (where mitmproxy put the host name)
        param = SSL._lib.SSL_get0_param(ssl_conn._ssl)  # type: ignore[attr-defined]
        SSL._lib.X509_VERIFY_PARAM_set_flags(param, SSL._lib.X509_V_FLAG_PARTIAL_CHAIN)  # type: ignore[attr-defined]
        self._servers[server] = ServerTrust(trust_key(ca_pem), names, server.sni)

    @fail_closed
    def done(self):
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._files.clear()
