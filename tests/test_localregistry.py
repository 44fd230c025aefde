"""Real-process tests for localregistry: token server, distribution registry, OCI images."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import socket
import subprocess
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography import x509

from localregistry import (
    Layer,
    OciImage,
    Registry,
    RegistryError,
    TokenServer,
    make_oci_layout,
    parse_scope,
    skopeo,
)

SERVICE = "localregistry-test"
USERS = {"alice": "alice-pw", "bob": "bob-pw"}
ALICE = "alice:alice-pw"


# -- fixtures ------------------------------------------------------------------


@pytest.fixture
def token_server() -> Iterator[TokenServer]:
    with TokenServer(SERVICE, USERS) as ts:
        yield ts


@pytest.fixture
def token_registry(tmp_path: Path, token_server: TokenServer) -> Iterator[Registry]:
    with Registry(tmp_path / "registry", "token", token_server=token_server) as reg:
        yield reg


@pytest.fixture
def htpasswd_registry(tmp_path: Path) -> Iterator[Registry]:
    with Registry(tmp_path / "registry", "htpasswd", htpasswd_users={"carol": "carol-pw"}) as reg:
        yield reg


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> OciImage:
    # One small incompressible layer, one compressible with a chosen path.
    return make_oci_layout(
        tmp_path_factory.mktemp("oci") / "layout",
        [4096, Layer(size=256 * 1024, compressible=True, path="data/blob.txt")],
        tag="v1", labels={"org.example.test": "yes"}, env={"FOO": "bar"},
    )


# -- helpers -------------------------------------------------------------------


def get_token(ts: TokenServer, scopes: list[str], creds: tuple[str, str] | None = None,
              service: str = SERVICE) -> tuple[int, dict]:
    query = urllib.parse.urlencode([("service", service), *(("scope", s) for s in scopes)])
    req = urllib.request.Request(f"{ts.realm}?{query}")
    if creds:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(creds).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def decode(ts: TokenServer, token: str) -> dict:
    return jwt.decode(token, ts.public_key, algorithms=["RS256"], audience=SERVICE, issuer=ts.issuer)


# -- token server on its own -------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    ("repository:test/abc:pull,push", ("repository", "test/abc", ["pull", "push"], None)),
    ("repository:localhost:5000/a/b:pull", ("repository", "localhost:5000/a/b", ["pull"], None)),
    ("registry:catalog:*", ("registry", "catalog", ["*"], None)),
    ("repository(plugin):x/y:pull", ("repository", "x/y", ["pull"], "plugin")),
    ("repository:a:", ("repository", "a", [], None)),
])
def test_parse_scope(raw: str, expected: tuple) -> None:
    assert tuple(parse_scope(raw)) == expected


@pytest.mark.parametrize("raw", ["repository", "repository:abc", ":a:pull", "repository::pull"])
def test_parse_scope_rejects_malformed(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_scope(raw)


def test_token_claims_and_x5c(token_server: TokenServer) -> None:
    scopes = ["repository:test/abc:pull,push", "repository:127.0.0.1:5000/x/y:pull", "registry:catalog:*"]
    status, body = get_token(token_server, scopes, ("alice", "alice-pw"))
    assert status == 200
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 300 and body["issued_at"].endswith("Z")

    claims = decode(token_server, body["token"])
    assert claims["sub"] == "alice" and claims["aud"] == SERVICE
    assert claims["exp"] - claims["iat"] == 300 and claims["nbf"] <= claims["iat"]
    assert claims["access"] == [
        {"type": "repository", "name": "test/abc", "actions": ["pull", "push"]},
        {"type": "repository", "name": "127.0.0.1:5000/x/y", "actions": ["pull"]},
        {"type": "registry", "name": "catalog", "actions": ["*"]},
    ]
    # x5c carries exactly the cert written to cert_path (the registry's rootcertbundle).
    header = jwt.get_unverified_header(body["token"])
    pem_cert = x509.load_pem_x509_certificate(token_server.cert_path.read_bytes())
    assert x509.load_der_x509_certificate(base64.b64decode(header["x5c"][0])) == pem_cert

    assert [(f.user, f.scopes) for f in token_server.fetches] == [("alice", tuple(scopes))]
    assert token_server.issued_tokens == [body["token"]]
    token_server.reset()
    assert token_server.fetches == [] and token_server.issued_tokens == []


def test_anonymous_gets_empty_access(token_server: TokenServer) -> None:
    status, body = get_token(token_server, ["repository:test/abc:pull"])
    assert status == 200
    claims = decode(token_server, body["token"])
    assert claims["sub"] == "" and claims["access"] == []
    assert token_server.fetches[0].user is None


def test_wrong_password_and_unknown_service(token_server: TokenServer) -> None:
    status, body = get_token(token_server, ["repository:a:pull"], ("alice", "nope"))
    assert status == 401 and body["errors"][0]["code"] == "UNAUTHORIZED"
    status, _ = get_token(token_server, ["repository:a:pull"], ("mallory", "x"))
    assert status == 401
    status, _ = get_token(token_server, ["repository:a:pull"], ("alice", "alice-pw"), service="other")
    assert status == 400
    assert token_server.fetches == [] and token_server.issued_tokens == []
    assert [f.user for f in token_server.failures] == ["alice", "mallory"]


def test_oauth2_password_grant_and_runtime_expiry(token_server: TokenServer) -> None:
    token_server.expires_in = 7
    form = urllib.parse.urlencode({
        "grant_type": "password", "username": "bob", "password": "bob-pw", "service": SERVICE,
        "client_id": "test", "scope": "repository:a/b:pull repository:c:push",
    }).encode()
    with urllib.request.urlopen(urllib.request.Request(token_server.realm, data=form), timeout=5) as resp:
        body = json.load(resp)
    assert body["expires_in"] == 7
    claims = decode(token_server, body["access_token"])
    assert claims["exp"] - claims["iat"] == 7
    assert [a["name"] for a in claims["access"]] == ["a/b", "c"]

    bad = urllib.parse.urlencode({"grant_type": "password", "username": "bob", "password": "x"}).encode()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(token_server.realm, data=bad), timeout=5)
    assert err.value.code == 401


def test_token_server_script(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    proc = subprocess.Popen(
        [sys.executable, "-m", "localregistry.token_server", "--service", "s", "--user", "u:p:w",
         "--cert-out", str(cert)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert cert.read_text().startswith("-----BEGIN CERTIFICATE-----")
        req = urllib.request.Request(info["realm"] + "?service=s&scope=repository:r:pull")
        req.add_header("Authorization", "Basic " + base64.b64encode(b"u:p:w").decode())  # password "p:w"
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert "token" in json.load(resp)
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


# -- images ------------------------------------------------------------------------


def test_oci_layout_digests_are_real(image: OciImage) -> None:
    layout = image.layout_dir
    index = json.loads((layout / "index.json").read_text())
    assert index["manifests"][0]["digest"] == image.manifest_digest
    manifest = json.loads(image.blob_path(image.manifest_digest).read_bytes())
    assert [d["digest"] for d in manifest["layers"]] == image.layer_digests
    for digest, diff_id in zip(image.layer_digests, image.diff_ids):
        blob = image.blob_path(digest).read_bytes()
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == digest
        raw = gzip.decompress(blob)
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == diff_id
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(image.blob_path(image.layer_digests[1]).read_bytes()))) as tar:
        member = tar.getmember("data/blob.txt")
        assert member.size == 256 * 1024
    # Compressible data compresses; the random layer does not.
    assert image.layer_sizes[1] < 64 * 1024 and image.layer_sizes[0] > 4096


def test_streamed_layer_is_reproducible_with_seed(tmp_path: Path) -> None:
    a = make_oci_layout(tmp_path / "a", [Layer(size=3 * 1024 * 1024 + 17, seed=42)])
    b = make_oci_layout(tmp_path / "b", [Layer(size=3 * 1024 * 1024 + 17, seed=42)])
    c = make_oci_layout(tmp_path / "c", [3 * 1024 * 1024 + 17])
    assert a.layer_digests == b.layer_digests != c.layer_digests
    # A second tag in the same layout is added to index.json.
    d = make_oci_layout(tmp_path / "a", [b"hello"], tag="other")
    tags = [m["annotations"]["org.opencontainers.image.ref.name"]
            for m in json.loads((tmp_path / "a" / "index.json").read_text())["manifests"]]
    assert tags == ["latest", "other"] and d.manifest_digest != a.manifest_digest


# -- real registry + skopeo ----------------------------------------------------------


def test_token_auth_push_and_inspect(token_server: TokenServer, token_registry: Registry,
                                     image: OciImage) -> None:
    ref = f"docker://{token_registry.host}/test/abc:v1"
    skopeo.copy(image.ref, ref, dest_creds=ALICE)
    info = skopeo.inspect(ref, creds=ALICE)
    assert info["Digest"] == image.manifest_digest
    assert info["Layers"] == image.layer_digests
    assert info["Labels"] == {"org.example.test": "yes"} and "FOO=bar" in info["Env"]

    fetches = token_server.fetches
    assert fetches and all(f.user == "alice" for f in fetches)
    assert any("repository:test/abc:pull,push" in f.scopes for f in fetches)
    assert len(token_server.issued_tokens) == len(fetches)


def test_token_auth_wrong_password_refused(token_server: TokenServer, token_registry: Registry,
                                           image: OciImage) -> None:
    with pytest.raises(skopeo.SkopeoError):
        skopeo.copy(image.ref, f"docker://{token_registry.host}/test/abc:v1", dest_creds="alice:wrong")
    assert token_server.issued_tokens == []
    assert [f.user for f in token_server.failures] and all(f.user == "alice" for f in token_server.failures)


def test_token_auth_anonymous_and_policy(tmp_path: Path, image: OciImage) -> None:
    # Policy: alice may push and pull, bob may only pull.
    def access(user: str | None, rtype: str, name: str, actions: list[str]) -> list[str]:
        if user == "alice":
            return actions
        return [a for a in actions if a == "pull"] if user == "bob" else []

    with TokenServer(SERVICE, USERS, access=access) as ts, \
            Registry(tmp_path / "reg", "token", token_server=ts) as reg:
        ref = f"docker://{reg.host}/team/app:v1"
        with pytest.raises(skopeo.SkopeoError):
            skopeo.copy(image.ref, ref, dest_creds="bob:bob-pw")
        skopeo.copy(image.ref, ref, dest_creds=ALICE)
        assert skopeo.inspect(ref, creds="bob:bob-pw")["Digest"] == image.manifest_digest
        with pytest.raises(skopeo.SkopeoError):
            skopeo.inspect(ref)  # anonymous token has empty access
        assert None in {f.user for f in ts.fetches}


def test_htpasswd_push_inspect_and_wrong_password(htpasswd_registry: Registry, image: OciImage) -> None:
    assert htpasswd_registry.config()["auth"]["htpasswd"]["path"].endswith("htpasswd")
    assert (htpasswd_registry.workdir / "htpasswd").read_text().startswith("carol:$2")
    ref = f"docker://{htpasswd_registry.host}/test/abc:v1"
    skopeo.copy(image.ref, ref, dest_creds="carol:carol-pw")
    info = skopeo.inspect(ref, creds="carol:carol-pw")
    assert info["Digest"] == image.manifest_digest and info["Layers"] == image.layer_digests
    with pytest.raises(skopeo.SkopeoError):
        skopeo.inspect(ref, creds="carol:wrong")
    with pytest.raises(skopeo.SkopeoError):
        skopeo.inspect(ref)


def test_registry_start_failure_reports_log(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        reg = Registry(tmp_path / "reg", None, port=busy.getsockname()[1], startup_timeout=10)
        with pytest.raises(RegistryError, match="address already in use"):
            reg.start()


def test_htpasswd_line_bcrypt_and_cli_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import bcrypt

    from localregistry import bcrypt_htpasswd_line

    user, hashed = bcrypt_htpasswd_line("dave", "s3cret").split(":", 1)
    assert user == "dave" and bcrypt.checkpw(b"s3cret", hashed.encode())
    if shutil.which("htpasswd") is None:
        pytest.skip("apache2-utils htpasswd not installed")
    monkeypatch.setitem(sys.modules, "bcrypt", None)  # force the CLI path
    user, hashed = bcrypt_htpasswd_line("dave", "s3cret").split(":", 1)
    assert user == "dave" and hashed.startswith("$2y$05$")
    monkeypatch.undo()
    assert bcrypt.checkpw(b"s3cret", hashed.encode())


def test_module_entry_point_runs_stack(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "localregistry", "--workdir", str(tmp_path / "w"), "--user", "u:p"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(info["url"] + "/v2/", timeout=5)
        assert err.value.code == 401
        assert f'realm="{info["realm"]}"' in err.value.headers["WWW-Authenticate"]
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    with pytest.raises(OSError):  # the registry went away with it
        urllib.request.urlopen(info["url"] + "/v2/", timeout=2)
