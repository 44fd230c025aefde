"""Upstream TLS: verified against the system CAs plus the connector's own CA (spec.caCertSecretRef)."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509 import verification

from addons.upstream_trust import connector_verifier

from localregistry import Registry, TestCA, TokenServer, check_test_hosts, make_oci_layout
from proxyproc import ProxyProcess, basic, connector, secret, write_manifests
from test_e2e_clients import run

HOST = "registry-a.connector-test"


@pytest.fixture(scope="module")
def private_ca_world(tmp_path_factory):
    check_test_hosts()
    tmp = tmp_path_factory.mktemp("upstream-tls")
    ca = TestCA(tmp / "ca")
    other_ca = TestCA(tmp / "other-ca", common_name="someone else's CA")
    tls = ca.issue([HOST], tmp / "tls")
    password = "tls-pw-" + secrets.token_hex(8)
    ts = TokenServer("private", {"pusher": password}, tls=tls, public_host=HOST).start()
    reg = Registry(tmp / "reg", "token", token_server=ts, tls=tls, public_host=HOST).start()
    ca_secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                 "metadata": {"name": "private-ca", "namespace": "default"},
                 "stringData": {"ca.crt": ca.cert_path.read_text()}}
    wrong_ca = {**ca_secret, "metadata": {"name": "wrong-ca", "namespace": "default"},
                "stringData": {"ca.crt": other_ca.cert_path.read_text()}}
    with_ca = connector("default", "private", reg.url, "creds")
    with_ca["spec"]["caCertSecretRef"] = {"name": "private-ca"}
    wrong = connector("default", "wrong", reg.url, "creds")
    wrong["spec"]["caCertSecretRef"] = {"name": "wrong-ca"}
    write_manifests(tmp / "c", "c.yaml", [
        with_ca, wrong, connector("default", "plain", reg.url, "creds"),
        secret("default", "creds", "pusher", password), ca_secret, wrong_ca,
    ])
    token = "tls-client-" + secrets.token_hex(8)
    (tmp / "tokens.yaml").write_text(json.dumps({"tokens": [{"token": token, "subject": "t", "connectors": ["*"]}]}))
    proxy = ProxyProcess(tmp, tmp / "c", tmp / "tokens.yaml").start()  # no global upstream CA option
    yield proxy, token, tmp
    proxy.stop()
    reg.stop()
    ts.stop()
    for s in (password, token, *ts.issued_tokens):
        assert s.encode() not in proxy.everything_written()


def test_connector_ca_is_trusted_for_its_registry(private_ca_world, tmp_path):
    proxy, token, _ = private_ca_world
    image = make_oci_layout(tmp_path / "img", [20_000], tag="v1")
    ref = f"docker://{proxy.host}/namespaces/default/connectors/private/tls/app:v1"
    run(["skopeo", "copy", "--dest-creds", f"x:{token}", "--dest-tls-verify=false", image.ref, ref])
    run(["skopeo", "copy", "--src-creds", f"x:{token}", "--src-tls-verify=false", ref, f"oci:{tmp_path / 'back'}:v1"])


@pytest.mark.parametrize("name", ["plain", "wrong"])
def test_registry_certificate_is_refused_without_its_ca(private_ca_world, name):
    proxy, token, _ = private_ca_world
    r = proxy.request("GET", f"/v2/namespaces/default/connectors/{name}/tls/app/tags/list", auth=basic("x", token))
    assert r.status == 502, r.data
    err = json.loads(r.data)["errors"][0]
    assert f"default/{name}" in err["message"] and "TLS" in err["message"]


def test_connector_ca_does_not_vouch_for_other_hosts(tmp_path):
    """The verifier is bound to the connector's host name: a certificate for another name fails."""
    test_ca = TestCA(tmp_path / "ca")
    cert_path, _ = test_ca.issue(["evil.connector-test"], tmp_path / "tls")
    leaf = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    with pytest.raises(verification.VerificationError):
        connector_verifier(test_ca.cert_path.read_text(), HOST).verify(leaf, [])
    connector_verifier(test_ca.cert_path.read_text(), "evil.connector-test").verify(leaf, [])


def test_chain_check_keeps_openssl_verdicts_and_needs_the_connector_ca_otherwise(tmp_path):
    from OpenSSL import crypto

    from addons.upstream_trust import ChainCheck

    ours, theirs = TestCA(tmp_path / "ours"), TestCA(tmp_path / "theirs", common_name="theirs")
    leaf = crypto.X509.from_cryptography(
        x509.load_pem_x509_certificate(Path(ours.issue([HOST], tmp_path / "tls")[0]).read_bytes()))
    root = crypto.X509.from_cryptography(ours.cert)
    # OpenSSL trusted the whole chain (a public CA): its verdict stands, no second opinion needed
    check = ChainCheck(connector_verifier(theirs.cert_path.read_text(), HOST))
    assert check(None, root, 0, 1, 1) and check(None, leaf, 0, 0, 1)
    # OpenSSL did not know the issuer: the connector's CA decides, at the leaf
    check = ChainCheck(connector_verifier(ours.cert_path.read_text(), HOST))
    assert check(None, root, 20, 1, 0) is True and check(None, leaf, 0, 0, 1) is True
    check = ChainCheck(connector_verifier(theirs.cert_path.read_text(), HOST))
    assert check(None, root, 20, 1, 0) is True and check(None, leaf, 0, 0, 1) is False
