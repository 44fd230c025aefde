"""localregistry over HTTPS under test host names, verified for real.

skopeo (Go, containers/image) trusts the TestCA only through ``--cert-dir``
with verification on; Python clients through ``TestCA.client_context()``.
The host names come from /etc/hosts (scripts/setup adds them).
"""

from __future__ import annotations

import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from localregistry import (
    TEST_HOSTS,
    OciImage,
    Registry,
    TestCA,
    TestHostsError,
    TokenServer,
    check_test_hosts,
    make_oci_layout,
    skopeo,
)
from localregistry.skopeo import SkopeoError

HOST_A, HOST_B, HOST_OTHER = TEST_HOSTS
SERVICE = "localregistry-tls-test"
ALICE = ("alice", "alice-pw")
CAROL = ("carol", "carol-pw")


def creds(user: tuple[str, str]) -> str:
    return ":".join(user)


@pytest.fixture(scope="module", autouse=True)
def _test_hosts() -> None:
    check_test_hosts()  # a clear error naming scripts/setup if /etc/hosts lacks them


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def tls_a(ca: TestCA, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    # Kept outside the CA dir; registry-b's pair below goes into it.
    return ca.issue([HOST_A], tmp_path_factory.mktemp("tls-a"))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> OciImage:
    return make_oci_layout(tmp_path_factory.mktemp("oci") / "layout", [4096, b"hello tls\n"],
                           tag="v1", labels={"org.example.tls": "yes"})


@pytest.fixture
def token_server_a(tls_a: tuple[Path, Path]) -> Iterator[TokenServer]:
    with TokenServer(SERVICE, dict([ALICE]), tls=tls_a, public_host=HOST_A) as ts:
        yield ts


@pytest.fixture
def registry_a(tmp_path: Path, tls_a: tuple[Path, Path],
               token_server_a: TokenServer) -> Iterator[Registry]:
    with Registry(tmp_path / "registry-a", "token", token_server=token_server_a,
                  tls=tls_a, public_host=HOST_A) as reg:
        yield reg


# -- certificates --------------------------------------------------------------


def test_ca_and_leaf_extensions(ca: TestCA, tls_a: tuple[Path, Path]) -> None:
    ca_cert = x509.load_pem_x509_certificate(ca.cert_path.read_bytes())
    bc = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca_cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign
    assert ca_cert.issuer == ca_cert.subject
    # A containers cert dir: *.crt only; a stray *.key would make Go clients fail.
    assert sorted(p.name for p in ca.cert_dir.iterdir() if p.suffix in (".crt", ".cert", ".key")) \
        == ["ca.crt"]

    leaf = x509.load_pem_x509_certificate(tls_a[0].read_bytes())
    assert leaf.issuer == ca_cert.subject
    ext = leaf.extensions
    assert not ext.get_extension_for_class(x509.BasicConstraints).value.ca
    ku = ext.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    assert ExtendedKeyUsageOID.SERVER_AUTH in ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [HOST_A]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert leaf.not_valid_before_utc < ca_cert.not_valid_after_utc
    days = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days
    assert 30 <= days <= 31  # yesterday .. +30 days


def test_check_test_hosts_names_setup() -> None:
    with pytest.raises(TestHostsError, match=r"scripts/setup.*no-such-host\.invalid"):
        check_test_hosts(["no-such-host.invalid"])


# -- token server --------------------------------------------------------------


def test_token_server_https_under_public_host(ca: TestCA, token_server_a: TokenServer) -> None:
    ts = token_server_a
    assert ts.url == f"https://{HOST_A}:{ts.port}"
    assert ts.realm == f"https://{HOST_A}:{ts.port}/token"
    assert ts.local_url == f"https://127.0.0.1:{ts.port}"

    # A connection that never handshakes must not stall other clients.
    with socket.create_connection(("127.0.0.1", ts.port)):
        with urllib.request.urlopen(f"{ts.realm}?service={SERVICE}", context=ca.client_context(),
                                    timeout=5) as resp:
            assert resp.status == 200  # anonymous token

    with pytest.raises(urllib.error.URLError) as e:  # system trust store: not trusted
        urllib.request.urlopen(f"{ts.realm}?service={SERVICE}", timeout=5)
    assert isinstance(e.value.reason, ssl.SSLCertVerificationError)


# -- registries ----------------------------------------------------------------


def test_token_registry_https_config_and_challenge(ca: TestCA, registry_a: Registry,
                                                   token_server_a: TokenServer) -> None:
    reg, ts = registry_a, token_server_a
    assert reg.url == f"https://{HOST_A}:{reg.port}"
    assert reg.host == f"{HOST_A}:{reg.port}"
    assert reg.local_url == f"https://127.0.0.1:{reg.port}"
    cfg = yaml.safe_load(reg.config_path.read_text())
    assert cfg["http"]["addr"] == f"127.0.0.1:{reg.port}"
    assert cfg["http"]["tls"] == {"certificate": str(reg.tls[0]), "key": str(reg.tls[1])}
    assert cfg["auth"]["token"]["realm"] == ts.realm

    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(reg.url + "/v2/", context=ca.client_context(), timeout=5)
    assert e.value.code == 401
    challenge = e.value.headers["WWW-Authenticate"]
    assert challenge.startswith(f'Bearer realm="https://{HOST_A}:{ts.port}/token"')


def test_skopeo_push_and_inspect_token_auth_verified(ca: TestCA, registry_a: Registry,
                                                     token_server_a: TokenServer,
                                                     image: OciImage) -> None:
    ref = f"docker://{registry_a.host}/test/tls:v1"
    skopeo.copy(image.ref, ref, dest_creds=creds(ALICE), tls_verify=True, dest_cert_dir=ca.cert_dir)
    info = skopeo.inspect(ref, creds=creds(ALICE), tls_verify=True, cert_dir=ca.cert_dir)
    assert info["Digest"] == image.manifest_digest
    assert info["Labels"] == {"org.example.tls": "yes"}
    assert info["Name"] == f"{HOST_A}:{registry_a.port}/test/tls"
    # The tokens came from the HTTPS realm, for alice.
    assert {f.user for f in token_server_a.fetches} == {"alice"}
    assert any(s.startswith("repository:test/tls:") and "push" in s
               for f in token_server_a.fetches for s in f.scopes)


def test_skopeo_rejects_untrusted_or_mismatched_certificate(registry_a: Registry, ca: TestCA,
                                                            tmp_path: Path) -> None:
    # Verification on but no CA: unknown authority.
    with pytest.raises(SkopeoError, match="x509: certificate signed by unknown authority"):
        skopeo.inspect(f"docker://{registry_a.host}/test/none:v1", creds=creds(ALICE),
                       tls_verify=True, cert_dir=tmp_path)
    # Trusted CA, but a name the certificate does not cover (same port).
    with pytest.raises(SkopeoError, match=f"certificate is valid for {HOST_A}, not {HOST_OTHER}"):
        skopeo.inspect(f"docker://{HOST_OTHER}:{registry_a.port}/test/none:v1", creds=creds(ALICE),
                       cert_dir=ca.cert_dir)


def test_htpasswd_registry_b_https(ca: TestCA, tmp_path: Path, image: OciImage) -> None:
    cert, key = ca.issue([HOST_B])  # into the CA dir: must not spoil it as a cert dir
    with Registry(tmp_path / "registry-b", "htpasswd", htpasswd_users=dict([CAROL]),
                  tls=(cert, key), public_host=HOST_B) as reg:
        assert reg.url == f"https://{HOST_B}:{reg.port}"
        ref = f"docker://{reg.host}/team/app:v1"
        skopeo.copy(image.ref, ref, dest_creds=creds(CAROL), dest_cert_dir=ca.cert_dir)
        info = skopeo.inspect(ref, creds=creds(CAROL), cert_dir=ca.cert_dir)
        assert info["Digest"] == image.manifest_digest
        with pytest.raises(SkopeoError, match="unauthorized|authentication required"):
            skopeo.inspect(ref, creds="carol:wrong", cert_dir=ca.cert_dir)


def test_plain_http_registry_with_public_host(tmp_path: Path) -> None:
    with Registry(tmp_path / "plain", public_host=HOST_OTHER) as reg:
        assert reg.url == f"http://{HOST_OTHER}:{reg.port}"
        assert "tls" not in yaml.safe_load(reg.config_path.read_text())["http"]
        with urllib.request.urlopen(reg.url + "/v2/", timeout=5) as resp:
            assert resp.status == 200
