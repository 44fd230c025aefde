"""Per-connector upstream TLS trust (`spec.caCertSecretRef`) for the connections mitmproxy makes.

mitmproxy verifies upstream certificates against one trust store for everybody (system CAs, or
`ssl_verify_upstream_trusted_ca`). A connector may bring its own CA, which must be trusted for that
connector's address only. Here mitmproxy's TLS set-up runs as usual and the connection is then given
a verify callback: a chain OpenSSL accepts stays accepted; a chain it rejects is accepted only when
cryptography's verifier builds it to the connector's CA for the host being connected to. (The
challenge probe and token fetches add the same CA in upstream_auth's RegistryClient.)
"""

from __future__ import annotations

import ipaddress
import logging

from cryptography import x509
from cryptography.x509 import verification
from mitmproxy import ctx, tls
from OpenSSL import SSL

from addons.store import ConnectorStore
from connector_store.model import Connector

logger = logging.getLogger(__name__)


def connector_verifier(ca_pem: str, host: str) -> verification.ServerVerifier:
    """A verifier for `host` whose only roots are the connector's CA certificates."""
    roots = verification.Store(x509.load_pem_x509_certificates(ca_pem.encode()))
    try:
        subject: verification.Subject = verification.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        subject = verification.DNSName(host)
    return verification.PolicyBuilder().store(roots).build_server_verifier(subject)


class ChainCheck:
    """The verify callback: OpenSSL's verdict, or the connector CA's when OpenSSL says no."""

    def __init__(self, verifier: verification.ServerVerifier):
        self.verifier = verifier
        self.chain: dict[int, x509.Certificate] = {}
        self.overridden = False

    def __call__(self, conn: SSL.Connection, cert, errnum: int, depth: int, ok: int) -> bool:
        self.chain[depth] = cert.to_cryptography()
        if depth > 0:
            if not ok:
                self.overridden = True  # decided at the leaf, with the whole chain
            return True
        if ok and not self.overridden:
            return True
        intermediates = [self.chain[d] for d in sorted(self.chain) if d > 0]
        try:
            self.verifier.verify(self.chain[0], intermediates)
            return True
        except verification.VerificationError as e:
            logger.warning("upstream certificate rejected (system CAs and the connector's CA): %s", e)
            return False


class UpstreamTrust:
    def __init__(self, store: ConnectorStore):
        self.store = store

    def _connector_for(self, host: str, port: int) -> Connector | None:
        for c in self.store.catalog.connectors.values():
            if c.ca_pem and c.address and (c.address.host, c.address.port) == (host.lower(), port):
                return c
        return None

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        if tls_start.ssl_conn is not None or tls_start.conn.address is None:
            return
        host, port = tls_start.conn.address[:2]
        connector = self._connector_for(host, port)
        if connector is None:
            return
        tlsconfig = ctx.master.addons.get("tlsconfig")
        tlsconfig.tls_start_server(tls_start)  # mitmproxy's own set-up (SNI, ALPN, host name check)
        if ctx.options.ssl_insecure or tls_start.ssl_conn is None:
            return
        sni = tls_start.conn.sni or host
        tls_start.ssl_conn.set_verify(SSL.VERIFY_PEER, ChainCheck(connector_verifier(connector.ca_pem, sni)))
