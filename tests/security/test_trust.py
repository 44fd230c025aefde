"""Upstream TLS trust (addons/upstream_trust.py), in process, against real TLS servers on loopback.

Each path's verdict is measured, not assumed: `curl --cacert`, the Python `ssl` context the
challenge probe and token fetches use (`registry_ssl_context`), and the pyOpenSSL connection
mitmproxy's data path gets from `UpstreamTrust.tls_start_server` (built by mitmproxy's real
tlsconfig addon, then switched to the connector's trust), each doing a real handshake.
The end-to-end proofs with the real registry and the proxy subprocess are in
tests/test_e2e_upstream_tls.py.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from OpenSSL import SSL

from addons.routing import Route
from addons.registry_client import registry_ssl_context, tls_preflight
from addons.upstream_trust import AMBIGUOUS, UpstreamTrust
from connector_store.model import Connector, parse_address
from localregistry import TestCA, check_test_hosts
from localregistry.tlsca import self_signed_certificate

HOST = "registry-a.connector-test"
OTHER = "other.connector-test"


# ---------------------------------------------------------------- a TLS server that tells what it saw


@dataclass
class TlsServer:
    """Serves one certificate on 127.0.0.1, answers any request with an empty 200, records SNI/ALPN."""

    cert: Path
    key: Path
    alpn: tuple[str, ...] = ("http/1.1",)
    seen: list[tuple[str | None, str | None]] = field(default_factory=list)
    handshaken: threading.Event = field(default_factory=threading.Event)  # set once `seen` has an entry

    def __post_init__(self):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(self.cert, self.key)
        self.context.set_alpn_protocols(list(self.alpn))
        self._sni: dict[int, str | None] = {}
        self.context.sni_callback = lambda sock, name, c: self._sni.__setitem__(id(sock), name)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket):
        raw.settimeout(10)
        try:
            with self.context.wrap_socket(raw, server_side=True) as t:
                self.seen.append((self._sni.get(id(t)), t.selected_alpn_protocol()))
                self.handshaken.set()
                if t.recv(65536):
                    t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        except (OSError, ssl.SSLError):
            pass  # the client refused our certificate: that is what several tests want

    def close(self):
        self.sock.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    check_test_hosts()
    tmp = tmp_path_factory.mktemp("trust")
    ca, other_ca = TestCA(tmp / "ca", key_type="ec"), TestCA(tmp / "other-ca", common_name="other CA", key_type="ec")
    return {
        "bare": self_signed_certificate([HOST], tmp / "bare"),  # no AKI, no basicConstraints
        "bare-misnamed": self_signed_certificate([OTHER], tmp / "misnamed", ip_addresses=()),
        "bare-other-key": self_signed_certificate([HOST], tmp / "other-key"),
        "ca-issued": ca.issue([HOST], tmp / "issued"),
        "other-ca-issued": other_ca.issue([HOST], tmp / "other-issued"),
        "ca": ca.cert_path,
        "other-ca": other_ca.cert_path,
    }


@pytest.fixture
def servers(certs):
    started: list[TlsServer] = []

    def start(name: str, **kw) -> TlsServer:
        cert, key = certs[name]
        started.append(TlsServer(cert, key, **kw))
        return started[-1]

    yield start
    for s in started:
        s.close()


def curl_accepts(cafile: Path, host: str, port: int) -> bool:
    """curl's verdict: exit 0, or 60 for a certificate it refuses (anything else is a test bug)."""
    r = subprocess.run(["curl", "-sS", "-o", "/dev/null", "--noproxy", "*", "--max-time", "10",
                        "--cacert", str(cafile), f"https://{host}:{port}/"], capture_output=True, text=True)
    assert r.returncode in (0, 60), r.stderr
    return r.returncode == 0


def python_accepts(ca_pem: str | None, host: str, port: int) -> bool:
    try:
        tls_preflight(host, port, registry_ssl_context(ca_pem, None, False), 10)
        return True
    except ssl.SSLCertVerificationError:
        return False


# ---------------------------------------------------------------- mitmproxy's data path, in process


class Store:
    def __init__(self, *connectors: Connector):
        self.connectors = {c.key: c for c in connectors}

    def get(self, namespace: str, name: str):
        return self.connectors.get(f"{namespace}/{name}")


def make_connector(name: str, address: str, ca_pem: str | None) -> Connector:
    return Connector("default", name, "oci", parse_address(address), ca_pem=ca_pem)


class DataPath:
    """mitmproxy's real tlsconfig + UpstreamTrust in a test master; connections are real handshakes."""

    def __init__(self, tmp: Path, *connectors: Connector):
        from mitmproxy import options
        from mitmproxy.addons import tlsconfig
        from mitmproxy.test import taddons

        self.trust = UpstreamTrust(Store(*connectors))
        self.flows: list = []  # in flight: mitmproxy holds them (UpstreamTrust only remembers them weakly)
        self.tctx = taddons.context(tlsconfig.TlsConfig(), self.trust, options=options.Options(confdir=str(tmp)))

    def client(self):
        from mitmproxy import connection
        return connection.Client(peername=("127.0.0.1", 40000), sockname=("127.0.0.1", 8080),
                                 timestamp_start=time.time())

    def flow(self, client, connector: str | None, port: int, host: str = HOST):
        from mitmproxy.test import tflow

        flow = tflow.tflow()
        flow.client_conn = client
        flow.server_conn = tflow.tserver_conn()  # the placeholder: not connected
        flow.request.scheme, flow.request.host, flow.request.port = "https", host, port
        if connector:
            Route("path", "default", connector, "http://proxy", f"namespaces/default/{connector}", "/v2/").store(flow)
        self.flows.append(flow)
        return flow

    def connect(self, client, port: int, host: str = HOST, alpn: tuple[bytes, ...] = ()):
        """Let the addons set up the server connection, then hand-shake with it. -> (server, verdict)."""
        from mitmproxy import connection, tls
        from mitmproxy.proxy import context

        server = connection.Server(address=(host, port))
        server.alpn_offers = alpn
        ctx = context.Context(client, self.tctx.options)
        ctx.server = server
        tls_start = tls.TlsData(server, ctx)
        self.trust.tls_start_server(tls_start)
        return server, tls_start.ssl_conn, handshake(tls_start.ssl_conn, port, server)


def handshake(conn: SSL.Connection, port: int, server=None) -> str:
    """'ok', or OpenSSL's verify error; mitmproxy's memory-BIO style, against 127.0.0.1:port."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            while True:
                try:
                    conn.do_handshake()
                    break
                except SSL.WantReadError:
                    s.sendall(conn.bio_read(65536))
                    data = s.recv(65536)
                    if not data:
                        return "closed"
                    conn.bio_write(data)
        except SSL.Error:
            result = SSL._lib.SSL_get_verify_result(conn._ssl)
            reason = SSL._ffi.string(SSL._lib.X509_verify_cert_error_string(result)).decode()
            return "handshake failed" if reason == "ok" else reason  # e.g. a verify callback said no
        try:
            s.sendall(conn.bio_read(65536))  # the client's Finished
        except SSL.WantReadError:
            pass
        if server is not None:  # what mitmproxy records after a handshake
            from mitmproxy import certs as mcerts
            server.certificate_list = [mcerts.Cert.from_pyopenssl(c) for c in conn.get_peer_cert_chain() or []]
            server.timestamp_tls_setup = time.time()
            server.timestamp_start = time.time()
            from mitmproxy.connection import ConnectionState
            server.state = ConnectionState.OPEN
        return "ok"


@pytest.fixture
def data_path(tmp_path):
    made: list[DataPath] = []

    def make(*connectors: Connector) -> DataPath:
        made.append(DataPath(tmp_path / f"confdir{len(made)}", *connectors))
        return made[-1]

    yield make
    for d in made:
        d.trust.done()
        d.tctx.__exit__(None, None, None)


# ---------------------------------------------------------------- the tests


CASES = [
    # (served certificate, the connector's CA file, expected verdict, why)
    ("bare", "bare", True, "self-signed, no AKI, no basicConstraints, trusted as itself"),
    ("ca-issued", "ca", True, "issued by the connector's CA"),
    ("bare-misnamed", "bare-misnamed", False, "trusted certificate, but for another host name"),
    ("bare-other-key", "bare", False, "same name, but not the certificate the connector trusts"),
    ("other-ca-issued", "ca", False, "issued by another CA"),
]


@pytest.mark.parametrize("served, ca, accepted, why", CASES, ids=[c[0] + "/" + c[1] for c in CASES])
def test_every_path_decides_like_curl(certs, servers, data_path, served, ca, accepted, why):
    """curl --cacert, the probe/token context and mitmproxy's data-path connection give one verdict.

    Proves: the same certificate is accepted or refused by all three, as curl decides (in
    particular the bare self-signed certificate that cryptography's strict verifier refused is
    accepted, and a wrong name or another CA is refused), and the data path only trusts the CA
    because the flow waiting for that connection belongs to the connector holding it.
    """
    server = servers(served)
    ca_path = certs[ca][0] if isinstance(certs[ca], tuple) else certs[ca]
    ca_pem = ca_path.read_text()
    assert curl_accepts(ca_path, HOST, server.port) is accepted, why
    assert python_accepts(ca_pem, HOST, server.port) is accepted, why
    dp = data_path(make_connector("c", f"https://{HOST}:{server.port}", ca_pem))
    client = dp.client()
    dp.trust.remember(dp.flow(client, "c", server.port))
    _, _, verdict = dp.connect(client, server.port)
    assert (verdict == "ok") is accepted, (why, verdict)


def test_no_connector_ca_means_base_trust_only(certs, servers, data_path):
    """A server only the connector's CA vouches for is refused by every path without that CA.

    Proves: a connection set up for a flow of another connector (no CA), or for no flow at all,
    gets the base (certifi) only, not the CA of some connector with the same address.
    """
    server = servers("bare")
    assert not curl_accepts(Path(__import__("certifi").where()), HOST, server.port)
    assert not python_accepts(None, HOST, server.port)
    address = f"https://{HOST}:{server.port}"
    dp = data_path(make_connector("a", address, certs["bare"][0].read_text()), make_connector("b", address, None))
    client = dp.client()
    dp.trust.remember(dp.flow(client, "b", server.port))
    assert dp.connect(client, server.port)[2] == "self-signed certificate"
    _, _, verdict = dp.connect(dp.client(), server.port)  # a client connection with no flow recorded
    assert verdict == "self-signed certificate"


def test_context_switch_keeps_sni_alpn_and_host_name_check(certs, servers, data_path):
    """tlsconfig's per-connection settings survive `set_context` to the connector's trust.

    Proves (measured on the server side): the SNI and ALPN mitmproxy put on the SSL object are
    still sent after the switch, and the host-name check still applies (a certificate the new
    trust holds but for another name is refused).
    """
    server = servers("bare", alpn=("h2", "http/1.1"))
    dp = data_path(make_connector("c", f"https://{HOST}:{server.port}", certs["bare"][0].read_text()))
    client = dp.client()
    dp.trust.remember(dp.flow(client, "c", server.port))
    _, conn, verdict = dp.connect(client, server.port, alpn=(b"http/1.1",))
    assert verdict == "ok"
    assert conn.get_alpn_proto_negotiated() == b"http/1.1"
    assert server.handshaken.wait(10)  # the server thread records after its side of the handshake
    assert server.seen[0] == (HOST, "http/1.1")

    misnamed = servers("bare-misnamed")
    dp = data_path(make_connector("m", f"https://{HOST}:{misnamed.port}", certs["bare-misnamed"][0].read_text()))
    client = dp.client()
    dp.trust.remember(dp.flow(client, "m", misnamed.port))
    assert dp.connect(client, misnamed.port)[2] == "hostname mismatch"


def test_reused_connection_is_checked_against_the_new_flows_trust(certs, servers, data_path, tmp_path):
    """A server connection accepted with connector A's CA carries no request of a connector that does not trust it.

    Proves: after A's connection is up on a client connection, a flow of B (no CA) or W (another
    certificate) to the same address is refused before mitmproxy could reuse that connection, in
    `requestheaders` and in `request`; a flow of A, or of C whose different bundle also accepts the
    server's chain, may share it; a connection whose handshake is still running is never shared
    across trusts.
    """
    server = servers("bare")
    address = f"https://{HOST}:{server.port}"
    bare = certs["bare"][0].read_text()
    bundle = bare + "\n" + certs["ca"].read_text()  # another bundle that also holds A's certificate
    dp = data_path(make_connector("a", address, bare), make_connector("b", address, None),
                   make_connector("w", address, certs["bare-other-key"][0].read_text()),
                   make_connector("c", address, bundle))
    client = dp.client()
    flow_a = dp.flow(client, "a", server.port)
    dp.trust.remember(flow_a)
    s_a, _, verdict = dp.connect(client, server.port)
    assert verdict == "ok"
    flow_a.server_conn = s_a
    flow_a.response = __import__("mitmproxy.test.tutils", fromlist=["tresp"]).tresp()

    for name, allowed in (("a", True), ("c", True), ("b", False), ("w", False)):
        flow = dp.flow(client, name, server.port)
        why = dp.trust.reuse_refusal(flow, dp.trust.remember(flow))
        assert (why is None) is allowed, (name, why)
        dp.trust.request(flow)  # the hook: refuses with the registry's JSON error naming the connector
        if allowed:
            assert flow.response is None
        else:
            assert flow.response.status_code == 502
            assert f"connector default/{name}: TLS verification of {HOST}:{server.port} failed" in flow.response.text
            assert "another connector's CA" in flow.response.text

    # A connection still shaking hands (no certificate yet) is never shared across trusts.
    other_client = dp.client()
    dp.trust.remember(dp.flow(other_client, "a", server.port))
    from mitmproxy import connection, tls
    from mitmproxy.connection import ConnectionState
    from mitmproxy.proxy import context
    pending = connection.Server(address=(HOST, server.port))
    ctx = context.Context(other_client, dp.tctx.options)
    ctx.server = pending
    dp.trust.tls_start_server(tls.TlsData(pending, ctx))
    pending.state = ConnectionState.OPEN
    flow_b = dp.flow(other_client, "b", server.port)
    assert "still being set up" in dp.trust.reuse_refusal(flow_b, dp.trust.remember(flow_b))


def test_flows_of_different_trusts_waiting_at_once_fail_the_connection(certs, servers, data_path):
    """Two flows with different trusts waiting for one new connection (HTTP/2): it is failed, not guessed.

    Proves: the connection then trusts nothing at all (here even a certificate the base itself
    trusts, through `ssl_verify_upstream_trusted_ca`, is refused), so neither flow can be carried
    by a connection verified for the other; with one of the flows alone the same server is accepted.
    """
    server = servers("bare")
    address = f"https://{HOST}:{server.port}"
    bare = certs["bare"][0].read_text()
    dp = data_path(make_connector("a", address, bare), make_connector("c", address, bare + "\n" + certs["ca"].read_text()))
    dp.tctx.options.update(ssl_verify_upstream_trusted_ca=str(certs["bare"][0]))
    client = dp.client()
    dp.trust.remember(dp.flow(client, "a", server.port))
    dp.trust.remember(dp.flow(client, "c", server.port))
    s, _, verdict = dp.connect(client, server.port)
    assert verdict != "ok"  # refused by the callback that trusts nothing
    assert dp.trust.server_trust(s).key == AMBIGUOUS
    alone = dp.client()
    dp.trust.remember(dp.flow(alone, "c", server.port))
    assert dp.connect(alone, server.port)[2] == "ok"
    base_only = dp.client()  # and the option is the base: no flow, no connector CA, still accepted
    assert dp.connect(base_only, server.port)[2] == "ok"


def test_trust_files_are_per_ca_and_removed_at_done(certs, data_path):
    """The data path's CA files hold base + one connector's CA, are shared per CA, and go at shutdown."""
    bare = certs["bare"][0].read_text()
    dp = data_path()
    with_ca, again, base = dp.trust.trust_file(bare), dp.trust.trust_file(bare), dp.trust.trust_file(None)
    assert with_ca == again and with_ca != base
    certifi_pem = Path(__import__("certifi").where()).read_text()
    assert Path(with_ca).read_text().startswith(certifi_pem) and bare in Path(with_ca).read_text()
    assert Path(base).read_text().strip() == certifi_pem.strip()
    dp.trust.done()
    assert not Path(with_ca).exists()


def test_weak_bookkeeping_does_not_keep_connections_alive(data_path):
    """Flows, client and server connections are remembered weakly (a long-running proxy must not grow)."""
    dp = data_path()
    assert isinstance(dp.trust._flows, weakref.WeakKeyDictionary)
    assert isinstance(dp.trust._servers, weakref.WeakKeyDictionary)
    assert isinstance(dp.trust._client_servers, weakref.WeakKeyDictionary)
