"""Upstream TLS, end to end: per-connector trust (spec.caCertSecretRef), decided like curl on every path.

The real distribution registry and token server over HTTPS under test host names, the proxy as a
real mitmdump subprocess. The paths: the challenge probe and token fetches (the proxy's registry
client) and the data path (mitmproxy's own upstream connections). Certificates are checked with
`curl --cacert` in the tests themselves, so "accepted" and "refused" mean what curl says.
In-process checks of the same decisions are in tests/security/test_trust.py.
"""

from __future__ import annotations

import http.client
import json
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import certifi
import pytest

from localregistry import Registry, TestCA, TokenServer, check_test_hosts, free_port, make_oci_layout
from localregistry.tlsca import self_signed_certificate
from proxyproc import ProxyProcess, basic, connector, secret, write_manifests
from test_e2e_clients import run

HOST = "registry-a.connector-test"
OTHER = "other.connector-test"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def ca_secret(name: str, *pems: str) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": name, "namespace": "default"},
            "stringData": {"ca.crt": "\n".join(pems)}}


def with_ca(doc: dict, secret_name: str | None) -> dict:
    if secret_name:
        doc["spec"]["caCertSecretRef"] = {"name": secret_name}
    return doc


def curl_verdict(cafile: Path, url: str) -> bool:
    """curl --cacert's verdict on the server's certificate: True (any HTTP answer) or False (exit 60)."""
    r = subprocess.run(["curl", "-sS", "-o", "/dev/null", "--noproxy", "*", "--max-time", "20",
                        "--cacert", str(cafile), url], capture_output=True, text=True)
    assert r.returncode in (0, 60), f"curl exited {r.returncode}: {r.stderr}"
    return r.returncode == 0


@dataclass
class TlsWorld:
    tmp: Path
    proxy: ProxyProcess
    token: str  # the client's token for the proxy
    bare: Path  # the self-signed registry certificate: no AKI, no basicConstraints
    other_key: Path  # a self-signed certificate for the same name with another key
    ca: TestCA  # a regular CA (for the certificate swap test)
    ts: TokenServer  # token server of `reg`, with `bare`
    reg: Registry  # token auth, `bare`
    bad_ts: TokenServer  # token server with `other_key`
    bad_realm_reg: Registry  # token auth via `bad_ts`, itself with `bare`
    open_reg: Registry  # no auth, `bare`: only the data path talks to it (bearer connectors)
    swap_port: int  # where test_reused_connection... runs its own registry
    connectors_dir: Path
    tokens_file: Path

    def get(self, name: str, path: str, conn: http.client.HTTPConnection | None = None, accept: str = OCI_MANIFEST):
        """GET through the proxy (path form); on `conn` when given (a keep-alive connection)."""
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.proxy.port, timeout=60)
        try:
            conn.request("GET", f"/v2/namespaces/default/connectors/{name}{path}",
                         headers={"Authorization": basic("x", self.token), "Accept": accept})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            if own:
                conn.close()


@pytest.fixture(scope="module")
def tls_world(tmp_path_factory):
    check_test_hosts()
    tmp = tmp_path_factory.mktemp("upstream-tls")
    bare, bare_key = self_signed_certificate([HOST], tmp / "bare")
    other_key, other_key_key = self_signed_certificate([HOST], tmp / "other-key")
    ca = TestCA(tmp / "ca", key_type="ec")
    password = "tls-pw-" + secrets.token_hex(8)
    bearer = "tls-bearer-" + secrets.token_hex(8)
    ts = TokenServer("private", {"pusher": password}, tls=(bare, bare_key), public_host=HOST).start()
    reg = Registry(tmp / "reg", "token", token_server=ts, tls=(bare, bare_key), public_host=HOST).start()
    bad_ts = TokenServer("badrealm", {"pusher": password}, tls=(other_key, other_key_key), public_host=HOST).start()
    bad_realm_reg = Registry(tmp / "bad-realm-reg", "token", token_server=bad_ts, tls=(bare, bare_key),
                             public_host=HOST).start()
    open_reg = Registry(tmp / "open-reg", None, tls=(bare, bare_key), public_host=HOST).start()
    swap_port = free_port()
    swap_url = f"https://{HOST}:{swap_port}"
    docs = [
        secret("default", "creds", "pusher", password),
        {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": "bearer", "namespace": "default"},
         "stringData": {"token": bearer}},
        ca_secret("bare-ca", bare.read_text()),
        ca_secret("other-key-ca", other_key.read_text()),
        ca_secret("test-ca", ca.cert_pem.decode()),
        ca_secret("test-ca-and-bare", ca.cert_pem.decode(), bare.read_text()),
        # token auth: probe, token fetch, data
        with_ca(connector("default", "private", reg.url, "creds"), "bare-ca"),
        connector("default", "plain", reg.url, "creds"),  # same address, no CA
        with_ca(connector("default", "wrong", reg.url, "creds"), "other-key-ca"),  # same address, another certificate
        with_ca(connector("default", "misnamed", f"https://{OTHER}:{reg.port}", "creds"), "bare-ca"),  # wrong name
        with_ca(connector("default", "badrealm", bad_realm_reg.url, "creds"), "bare-ca"),  # realm's certificate untrusted
        # a static bearer token: no probe, no token fetch; only mitmproxy's data path talks to the registry
        with_ca(connector("default", "open-ok", open_reg.url, "bearer"), "bare-ca"),
        connector("default", "open-noca", open_reg.url, "bearer"),
        with_ca(connector("default", "open-wrong", open_reg.url, "bearer"), "other-key-ca"),
        with_ca(connector("default", "swap-a", swap_url, "bearer"), "test-ca-and-bare"),
        with_ca(connector("default", "swap-b", swap_url, "bearer"), "test-ca"),
    ]
    write_manifests(tmp / "c", "c.yaml", docs)
    token = "tls-client-" + secrets.token_hex(8)
    tokens_file = tmp / "tokens.yaml"
    tokens_file.write_text(json.dumps({"tokens": [{"token": token, "subject": "t", "connectors": ["*"]}]}))
    proxy = ProxyProcess(tmp, tmp / "c", tokens_file).start()  # no global upstream CA option: the base is certifi
    yield TlsWorld(tmp, proxy, token, bare, other_key, ca, ts, reg, bad_ts, bad_realm_reg, open_reg, swap_port,
                   tmp / "c", tokens_file)
    proxy.stop()
    for r in (reg, bad_realm_reg, open_reg):
        r.stop()
    ts.stop()
    bad_ts.stop()
    for s in (password, bearer, token, *ts.issued_tokens, *bad_ts.issued_tokens):
        assert s.encode() not in proxy.everything_written()


@pytest.fixture(scope="module")
def open_image(tls_world, tmp_path_factory):
    """An image pushed into the open registry through the proxy's `open-ok` connector (data path only)."""
    tmp = tmp_path_factory.mktemp("open-image")
    image = make_oci_layout(tmp / "img", [8_000], tag="v1")
    run(["skopeo", "copy", "--dest-creds", f"x:{tls_world.token}", "--dest-tls-verify=false", image.ref,
         f"docker://{tls_world.proxy.host}/namespaces/default/connectors/open-ok/tls/open:v1"])
    return image


def assert_refused(status: int, body: bytes, name: str, where: str) -> None:
    assert status == 502, body
    err = json.loads(body)["errors"][0]
    assert f"connector default/{name}: TLS verification of {where} failed" in err["message"], err


# ---------------------------------------------------------------- accepted where curl accepts


def test_bare_self_signed_certificate_works_on_every_path(tls_world, tmp_path):
    """A self-signed registry certificate without AKI and basicConstraints, trusted as the connector's CA.

    Proves: curl --cacert accepts it for the registry and its token server; through the proxy a
    skopeo push and pull work, which needs the challenge probe, token fetches (the token server
    issues tokens for them) and mitmproxy's data path to all accept it (cryptography's strict
    verifier, used before, refused this certificate on the data path).
    """
    w = tls_world
    assert curl_verdict(w.bare, f"{w.reg.url}/v2/")
    assert curl_verdict(w.bare, f"{w.ts.realm}?service=private")
    fetches = len(w.ts.fetches)
    image = make_oci_layout(tmp_path / "img", [20_000], tag="v1")
    ref = f"docker://{w.proxy.host}/namespaces/default/connectors/private/tls/app:v1"
    run(["skopeo", "copy", "--dest-creds", f"x:{w.token}", "--dest-tls-verify=false", image.ref, ref])
    run(["skopeo", "copy", "--src-creds", f"x:{w.token}", "--src-tls-verify=false", ref, f"oci:{tmp_path / 'back'}:v1"])
    back = json.loads((tmp_path / "back" / "index.json").read_text())
    assert back["manifests"][0]["digest"] == image.manifest_digest
    assert len(w.ts.fetches) > fetches  # the token path was taken, over TLS with that certificate


def test_bare_self_signed_certificate_works_on_the_data_path_alone(tls_world, open_image):
    """The same certificate where only mitmproxy's own connection talks to the registry (static bearer token).

    Proves: with no probe and no token fetch in between, the data path alone accepts what curl
    accepts: the push in `open_image` and this manifest GET reach the registry.
    """
    w = tls_world
    assert curl_verdict(w.bare, f"{w.open_reg.url}/v2/")
    status, headers, body = w.get("open-ok", "/tls/open/manifests/v1")
    assert status == 200, body
    assert headers["Docker-Content-Digest"] == open_image.manifest_digest


# ---------------------------------------------------------------- refused where curl refuses


REFUSED = [
    # (connector, its CA file in the world, what curl is pointed at, the path that decides)
    ("plain", "certifi", "reg", "probe"),  # no CA: the base (certifi) does not know the certificate
    ("wrong", "other_key", "reg", "probe"),  # a CA for the same name, but not this certificate
    ("misnamed", "bare", "misnamed", "probe"),  # the right certificate, but the address uses another name
    ("badrealm", "bare", "bad_realm", "token"),  # the registry is fine, its token server is not
    ("open-noca", "certifi", "open", "data"),
    ("open-wrong", "other_key", "open", "data"),
]


@pytest.mark.parametrize("name, cafile, target, path", REFUSED, ids=[f"{r[0]}-{r[3]}" for r in REFUSED])
def test_certificate_curl_refuses_is_refused(tls_world, name, cafile, target, path):
    """A certificate curl --cacert refuses for the connector's CA is refused on the path that meets it first.

    Proves, per path: curl refuses (same CA file, same URL); the proxy answers 502 with the
    registry's JSON error naming the connector and the host it could not verify; no token is
    issued to a connector whose registry or token server was not verified (never a success).
    """
    w = tls_world
    ca = {"certifi": Path(certifi.where()), "other_key": w.other_key, "bare": w.bare}[cafile]
    where, url = {
        "reg": (f"{HOST}:{w.reg.port}", f"{w.reg.url}/v2/"),
        "misnamed": (f"{OTHER}:{w.reg.port}", f"https://{OTHER}:{w.reg.port}/v2/"),
        "bad_realm": (f"{HOST}:{w.bad_ts.port}", f"{w.bad_ts.realm}?service=badrealm"),
        "open": (f"{HOST}:{w.open_reg.port}", f"{w.open_reg.url}/v2/"),
    }[target]
    assert not curl_verdict(ca, url)
    if path == "token":
        assert curl_verdict(w.bare, f"{w.bad_realm_reg.url}/v2/")  # ... while the registry itself is fine
    issued = len(w.ts.issued_tokens) + len(w.bad_ts.issued_tokens)
    status, _, body = w.get(name, "/tls/app/tags/list")
    assert_refused(status, body, name, where)
    assert len(w.ts.issued_tokens) + len(w.bad_ts.issued_tokens) == issued


# ---------------------------------------------------------------- one address, several connectors


PAIRS = [("open-ok", "open-noca"), ("open-ok", "open-wrong"), ("private", "plain"), ("private", "wrong")]


@pytest.mark.parametrize("a, b", PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
@pytest.mark.parametrize("b_first", [False, True], ids=["a-then-b", "b-then-a"])
def test_other_connector_on_same_address_does_not_inherit_the_ca(tls_world, open_image, a, b, b_first):
    """Connector B has A's address but not A's CA: B never trusts the server only A's CA vouches for.

    Proves: on ONE keep-alive client connection (the same socket throughout), alternating A and B
    in both orders, every request of A reaches the registry and every request of B gets a 502
    naming B, however many times A has already been served (before, the CA was picked by host
    and port across all connectors, so B inherited A's trust).
    """
    w = tls_world
    where = f"{HOST}:{(w.open_reg if a == 'open-ok' else w.reg).port}"
    path = "/tls/open/manifests/v1" if a == "open-ok" else "/tls/app/tags/list"
    conn = http.client.HTTPConnection("127.0.0.1", w.proxy.port, timeout=60)
    try:
        order = [b, a, b, a, b] if b_first else [a, b, a, b, a]
        sockets = set()
        for name in order:
            status, _, body = w.get(name, path, conn)
            sockets.add(id(conn.sock))
            if name == a:
                assert status in (200, 404), body  # the registry answered (404: no such repository yet)
                if status == 404:
                    assert json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN"
            else:
                assert_refused(status, body, b, where)
        assert len(sockets) == 1 and conn.sock is not None  # one client connection, kept alive
    finally:
        conn.close()


def test_reused_upstream_connection_is_not_inherited(tls_world, tmp_path):
    """mitmproxy's reuse of an open upstream connection cannot smuggle B's request over A's trust.

    Set-up: swap-a trusts (test CA + bare), swap-b trusts the test CA only, same address. The
    registry first serves a test-CA certificate, which both accept: swap-b's request succeeds
    (and its TLS preflight is now cached as good). Then the registry is restarted on the same port
    with the bare certificate, which only swap-a accepts (curl agrees).
    Proves: (1) on one keep-alive client connection, after swap-a's request opened an upstream
    connection verified with swap-a's CA, swap-b's request is refused (502 naming swap-b, by the
    reuse check: its preflight verdict is still the cached good one) and swap-a keeps working;
    (2) swap-b first on a new client connection: mitmproxy's own handshake, with swap-b's trust,
    refuses the certificate: a 502, never an answer from the registry; (3) the upstream pool keeps
    connections per trust, so swap-b's small exchange after swap-a's gets its own handshake, refused.
    """
    w = tls_world
    where = f"{HOST}:{w.swap_port}"
    bundle = tmp_path / "a-bundle.crt"
    bundle.write_text(w.ca.cert_pem.decode() + w.bare.read_text())
    first = Registry(tmp_path / "swap1", None, tls=w.ca.issue([HOST], tmp_path / "issued"), public_host=HOST,
                     port=w.swap_port).start()
    try:
        status, _, body = w.get("swap-b", "/swap/app/tags/list")
        assert status == 404 and json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN", body
    finally:
        first.stop()
    bare_key = w.bare.with_name(w.bare.name.replace("-cert.pem", "-key.pem"))
    second = Registry(tmp_path / "swap2", None, tls=(w.bare, bare_key), public_host=HOST, port=w.swap_port).start()
    try:
        assert curl_verdict(bundle, f"https://{where}/v2/") and not curl_verdict(w.ca.cert_path, f"https://{where}/v2/")
        # A blob GET streams over mitmproxy's own connection (small exchanges go over the upstream
        # pool, whose connections are kept per trust: tried below).
        blob = "/swap/app/blobs/sha256:" + "0" * 64
        conn = http.client.HTTPConnection("127.0.0.1", w.proxy.port, timeout=60)
        try:
            for name in ("swap-a", "swap-b", "swap-a", "swap-b"):
                status, _, body = w.get(name, blob, conn)
                if name == "swap-a":
                    assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN", body
                else:
                    assert_refused(status, body, "swap-b", where)
                    assert "another connector's CA" in json.loads(body)["errors"][0]["message"]
        finally:
            conn.close()
        # The pool (new client connections, small exchanges): swap-a's kept upstream connection is
        # never swap-b's; swap-b's own handshake, with its own trust, refuses the certificate.
        for _ in range(2):
            status, _, body = w.get("swap-a", "/swap/app/tags/list")
            assert status == 404 and json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN", body
            status, _, body = w.get("swap-b", "/swap/app/tags/list")
            assert_refused(status, body, "swap-b", where)
            assert "certificate verify failed" in json.loads(body)["errors"][0]["message"].lower()
        status, _, body = w.get("swap-b", blob)
        assert status == 502, body
        assert b"BLOB_UNKNOWN" not in body
        assert "Certificate verify failed" in w.proxy.output()
    finally:
        second.stop()


# ---------------------------------------------------------------- the addon is what makes it work

DROP_TRUST = '''\
"""Test only: take the UpstreamTrust addon out of the proxy's chain, to show what it does."""
import logging
from mitmproxy import ctx
from mitmproxy.addonmanager import traverse


class DropUpstreamTrust:
    def running(self):
        # The launcher puts the chain on the master itself; a -s script nests it.
        chain = ctx.master.addons.chain
        for a in [a for a in chain if type(a).__name__ == "UpstreamTrust"]:
            chain.remove(a)
            logging.warning("test: UpstreamTrust removed")
        for addon in list(traverse(chain)):
            nested = getattr(addon, "addons", None)
            if isinstance(nested, list):
                for a in [a for a in nested if type(a).__name__ == "UpstreamTrust"]:
                    nested.remove(a)
                    logging.warning("test: UpstreamTrust removed")


addons = [DropUpstreamTrust()]
'''


def test_without_the_trust_addon_the_data_path_refuses(tls_world, tmp_path):
    """The same proxy without UpstreamTrust: probe and token fetch still pass, the push fails.

    Proves: mitmproxy's data path verifies upstream certificates itself (certifi only) and
    trusts the connector's CA only because of the addon, and that the registry client's own
    trust (which still has the CA) is not what lets the push through in the other tests.
    """
    w = tls_world
    script = tmp_path / "drop_trust.py"
    script.write_text(DROP_TRUST)
    proxy = ProxyProcess(tmp_path, w.connectors_dir, w.tokens_file, extra=("-s", str(script))).start()
    try:
        assert "test: UpstreamTrust removed" in proxy.output()
        issued = len(w.ts.issued_tokens)
        image = make_oci_layout(tmp_path / "img", [4_000], tag="v1")
        r = subprocess.run(["skopeo", "copy", "--retry-times", "0", "--dest-creds", f"x:{w.token}",
                            "--dest-tls-verify=false", image.ref,
                            f"docker://{proxy.host}/namespaces/default/connectors/private/tls/nodrop:v1"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode != 0
        assert "502" in r.stderr, r.stderr
        assert len(w.ts.issued_tokens) > issued  # the token path (registry client, with the CA) worked
        assert "Certificate verify failed: self-signed certificate" in proxy.output()
    finally:
        proxy.stop()
