"""Forward proxy mode: HTTPS_PROXY, TLS interception with the proxy's CA, per-connector injection.

Real HTTPS registries under test host names (scripts/setup maps them to 127.0.0.1; Go clients never
proxy loopback names), real skopeo and buildah that trust the proxy CA through a certs directory.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from urllib.parse import quote

import pytest
from mitmproxy import io as mitmio

from localregistry import Registry, TestCA, TokenServer, check_test_hosts, free_port, make_oci_layout
from proxyproc import ProxyProcess, connector, secret, write_manifests

A, B, OTHER = "registry-a.connector-test", "registry-b.connector-test", "other.connector-test"


class Forward:
    """Two HTTPS registries behind connectors, a third that is no connector, and the proxy."""

    def __init__(self, tmp):
        check_test_hosts()
        self.tmp = tmp
        self.ca = TestCA(tmp / "test-ca")
        self.password_a = "fwd-a-" + secrets.token_hex(8)
        self.password_b = "fwd-b-" + secrets.token_hex(8)
        self.password_other = "fwd-o-" + secrets.token_hex(8)
        self.token = "fwd-client-" + secrets.token_hex(12)
        self.team_token = "fwd-team-" + secrets.token_hex(12)
        tls_a = self.ca.issue([A], tmp / "tls")
        self.ts = TokenServer("registry-a", {"pusher": self.password_a}, tls=tls_a, public_host=A).start()
        self.reg_a = Registry(tmp / "a", "token", token_server=self.ts, tls=tls_a, public_host=A).start()
        self.reg_b = Registry(tmp / "b", "htpasswd", htpasswd_users={"hb": self.password_b},
                              tls=self.ca.issue([B], tmp / "tls"), public_host=B).start()
        self.reg_other = Registry(tmp / "o", "htpasswd", htpasswd_users={"ho": self.password_other},
                                  tls=self.ca.issue([OTHER], tmp / "tls"), public_host=OTHER).start()
        write_manifests(tmp / "connectors", "c.yaml", [
            connector("default", "harbor", self.reg_a.url, "a-secret"),
            secret("default", "a-secret", "pusher", self.password_a),
            connector("team", "other", self.reg_b.url, "b-secret"),
            secret("team", "b-secret", "hb", self.password_b, type="kubernetes.io/basic-auth"),
        ])
        (tmp / "tokens.yaml").write_text(json.dumps({"tokens": [
            {"token": self.token, "subject": "ci:builder", "connectors": ["*"]},
            {"token": self.team_token, "subject": "team:deployer", "connectors": ["team/*"]},
        ]}))
        self.forward_port = free_port()
        self.ca_dir = tmp / "proxy-ca"
        self.proxy = ProxyProcess(tmp, None, None, source=(
            "--connectors", str(tmp / "connectors"), "--client-tokens", str(tmp / "tokens.yaml"),
            "--forward-listen", f"127.0.0.1:{self.forward_port}", "--ca-dir", str(self.ca_dir),
        ), extra=("--set", f"ssl_verify_upstream_trusted_ca={self.ca.cert_path}")).start()
        # what clients trust: the proxy's CA only (a containers certs directory holding ca.crt)
        self.client_certs = tmp / "client-certs"
        self.client_certs.mkdir()
        shutil.copy(self.ca_dir / "ca.crt", self.client_certs / "ca.crt")

    def env(self, connectors: str = "default/harbor", token: str | None = None) -> dict:
        user = ",".join(quote(c, safe="") for c in connectors.split(","))
        proxy = f"http://{user}:{token or self.token}@127.0.0.1:{self.forward_port}"
        return dict(os.environ, HTTPS_PROXY=proxy, https_proxy=proxy, NO_PROXY="", no_proxy="")

    @property
    def secrets(self) -> list[str]:
        return [self.password_a, self.password_b, self.password_other, self.token, self.team_token,
                *self.ts.issued_tokens]

    def stop(self) -> None:
        self.proxy.stop()
        for r in (self.reg_a, self.reg_b, self.reg_other):
            r.stop()
        self.ts.stop()


@pytest.fixture(scope="module")
def fwd(tmp_path_factory):
    f = Forward(tmp_path_factory.mktemp("forward"))
    yield f
    f.stop()
    written = f.proxy.everything_written()
    for s in f.secrets:
        assert s.encode() not in written, "a secret was written by the proxy"


def skopeo(fwd, *args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["skopeo", *args], env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_ca_exists_before_the_listener_accepts(fwd):
    assert (fwd.ca_dir / "mitmproxy-ca-cert.pem").read_bytes() == (fwd.ca_dir / "ca.crt").read_bytes()
    assert b"PRIVATE KEY" not in (fwd.ca_dir / "ca.crt").read_bytes()


def test_skopeo_pushes_and_pulls_the_original_name_through_the_proxy(fwd, tmp_path):
    image = make_oci_layout(tmp_path / "img", [40_000, 10_000], tag="v1")
    ref = f"docker://{fwd.reg_a.host}/fwd/skopeo:v1"
    env = fwd.env()
    skopeo(fwd, "copy", "--dest-cert-dir", str(fwd.client_certs), image.ref, ref, env=env)
    out = json.loads(skopeo(fwd, "inspect", "--cert-dir", str(fwd.client_certs), ref, env=env).stdout)
    assert out["Digest"] == image.manifest_digest
    skopeo(fwd, "copy", "--src-cert-dir", str(fwd.client_certs), ref, f"oci:{tmp_path / 'back'}:v1", env=env)
    assert json.loads((tmp_path / "back" / "index.json").read_text())["manifests"][0]["digest"] == image.manifest_digest
    # without the proxy, the client has no credential at all
    bare = dict(os.environ, HTTPS_PROXY="", https_proxy="")
    denied = skopeo(fwd, "inspect", "--cert-dir", str(fwd.ca.cert_dir), ref, env=bare, check=False)
    assert denied.returncode != 0 and "unauthorized" in denied.stderr.lower()


def test_buildah_pushes_and_pulls_through_the_proxy(fwd, tmp_path):
    runroot = tempfile.mkdtemp(prefix="fb", dir="/tmp")
    storage = ["--root", str(tmp_path / "root"), "--runroot", runroot, "--storage-driver", "vfs"]
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text('FROM scratch\nLABEL mode="forward"\n')
    ref = f"{fwd.reg_a.host}/fwd/buildah:v1"
    env = fwd.env()
    certs = ["--cert-dir", str(fwd.client_certs)]

    def buildah(*args):
        proc = subprocess.run(["buildah", *storage, *args], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    try:
        buildah("bud", "--isolation", "chroot", "-t", ref, str(ctx))
        buildah("push", *certs, ref)
        buildah("rmi", "-a", "-f")
        buildah("pull", *certs, ref)
        assert json.loads(buildah("inspect", "--type", "image", ref))["OCIv1"]["config"]["Labels"]["mode"] == "forward"
    finally:
        shutil.rmtree(runroot, ignore_errors=True)


def test_two_connectors_in_one_authorization_each_gets_its_own_credentials(fwd, tmp_path):
    image = make_oci_layout(tmp_path / "img", [5000], tag="v1")
    env = fwd.env("default/harbor,team/other")
    fetches = len(fwd.ts.fetches)
    for reg in (fwd.reg_a, fwd.reg_b):
        ref = f"docker://{reg.host}/fwd/both:v1"
        skopeo(fwd, "copy", "--dest-cert-dir", str(fwd.client_certs), image.ref, ref, env=env)
    assert all(f.user == "pusher" for f in fwd.ts.fetches[fetches:])  # registry A's token server, A's user
    # the third host is tunnelled: the client sees that registry's real certificate (it trusts only
    # the test CA here, not the proxy's) and that registry's own 401, because it gets no credentials
    ref = f"docker://{fwd.reg_other.host}/fwd/x:v1"
    out = skopeo(fwd, "inspect", "--cert-dir", str(fwd.ca.cert_dir), ref, env=env, check=False)
    assert out.returncode != 0
    assert "unauthorized" in out.stderr.lower() or "authentication required" in out.stderr.lower(), out.stderr


def connect(fwd, target: str, proxy_authorization: str | None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", fwd.forward_port, timeout=10)
    headers = {"Proxy-Authorization": proxy_authorization} if proxy_authorization else {}
    try:
        conn.request("CONNECT", target, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def proxy_basic(user: str, token: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


def test_proxy_authorization_failures(fwd):
    target = fwd.reg_a.host
    assert connect(fwd, target, None) == 407
    assert connect(fwd, target, proxy_basic("default/harbor", "wrong-token")) == 407
    assert connect(fwd, target, proxy_basic("harbor", fwd.token)) == 407  # no namespace
    assert connect(fwd, target, proxy_basic("", fwd.token)) == 407  # empty list
    assert connect(fwd, target, "Bearer " + fwd.token) == 407
    assert connect(fwd, target, proxy_basic("default/harbor", fwd.team_token)) == 403  # may not use it
    assert connect(fwd, target, proxy_basic("default/nope", fwd.token)) == 403  # does not exist
    assert connect(fwd, target, proxy_basic("default/harbor", fwd.token)) == 200


def test_proxy_authorization_is_never_forwarded(fwd, tmp_path):
    image = make_oci_layout(tmp_path / "img", [3000], tag="v1")
    skopeo(fwd, "copy", "--dest-cert-dir", str(fwd.client_certs), image.ref,
           f"docker://{fwd.reg_a.host}/fwd/noleak:v1", env=fwd.env())
    fwd.proxy.stop()  # flush the flow file
    try:
        with fwd.proxy.flows_path.open("rb") as f:
            flows = [fl for fl in mitmio.FlowReader(f).stream() if fl.request.method != "CONNECT"]
        assert flows
        for fl in flows:
            assert "proxy-authorization" not in fl.request.headers
            auth = fl.request.headers.get("authorization", "")
            assert auth in ("", "Bearer <redacted>", "Basic <redacted>"), auth
    finally:
        fwd.proxy.start()


def test_operator_ca_with_only_the_key_pem_is_used(tmp_path):
    """A Secret holding only mitmproxy-ca.pem: the same CA is served, its certificate published."""
    from connector_store.cli import ensure_ca

    generated = ensure_ca(tmp_path / "first")
    operator = tmp_path / "secret"
    operator.mkdir()
    shutil.copyfile(generated / "mitmproxy-ca.pem", operator / "mitmproxy-ca.pem")
    used = ensure_ca(operator)
    assert (used / "ca.crt").read_bytes() == (generated / "ca.crt").read_bytes()
    assert (used / "mitmproxy-ca-cert.pem").read_bytes() == (generated / "ca.crt").read_bytes()


def test_a_streamed_upload_asked_over_http2_goes_through_whole(fwd, tmp_path):
    """curl asks for HTTP/2 through HTTPS_PROXY and streams a PATCH with no Content-Length: the proxy
    speaks HTTP/1.1 on intercepted connections (see ForwardProxy.configure), the body and the
    injected credentials arrive, and the blob is committed with the right digest."""
    import hashlib

    blob = os.urandom(300_000)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    (tmp_path / "blob").write_bytes(blob)
    env = fwd.env()
    base = f"https://{fwd.reg_a.host}/v2/fwd/h2"
    curl = ["curl", "-sS", "--http2", "--cacert", str(fwd.ca_dir / "ca.crt"), "-o", "/dev/null",
            "-w", "%{http_code} %{http_version} %header{location}"]
    out = subprocess.run([*curl, "-X", "POST", f"{base}/blobs/uploads/"], env=env, capture_output=True,
                         text=True, timeout=60)
    status, version, location = out.stdout.split(" ", 2)
    assert status == "202", out
    assert version == "1.1"  # HTTP/2 was asked for and declined
    patch = subprocess.run([*curl, "-X", "PATCH", "-H", "Transfer-Encoding: chunked",
                            "-H", "Content-Type: application/octet-stream",
                            "--data-binary", f"@{tmp_path / 'blob'}", location], env=env,
                           capture_output=True, text=True, timeout=60)
    status, _, location = patch.stdout.split(" ", 2)
    assert status == "202", patch
    sep = "&" if "?" in location else "?"
    put = subprocess.run([*curl, "-X", "PUT", f"{location}{sep}digest={digest}"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert put.stdout.split(" ")[0] == "201", put
    head = subprocess.run([*curl, "-I", f"{base}/blobs/{digest}"], env=env, capture_output=True, text=True, timeout=60)
    assert head.stdout.split(" ")[0] == "200", head


def test_a_connector_policy_holds_in_forward_mode(fwd, tmp_path):
    """The same policy enforcement with the registry's own names: push to fwd/* only."""
    import yaml as _yaml

    policed = connector("default", "fpoliced", fwd.reg_a.url, "a-secret")
    policed["metadata"]["annotations"] = {"connectors.alauda.io/policy": "- repositories: ['fwd/*']\n  actions: [pull, push]\n"}
    (fwd.tmp / "connectors" / "policed.yaml").write_text(_yaml.safe_dump(policed))
    env = fwd.env("default/fpoliced")

    def call(method: str, path: str) -> tuple[str, str]:
        verb = ["-I"] if method == "HEAD" else ["-X", method]  # curl -X HEAD would wait for a body
        out = subprocess.run(["curl", "-sS", "--cacert", str(fwd.ca_dir / "ca.crt"), "-o", "-", "-w", "\n%{http_code}",
                              *verb, f"https://{fwd.reg_a.host}{path}"], env=env,
                             capture_output=True, text=True, timeout=60).stdout
        body, _, status = out.rpartition("\n")
        return status, body

    digest = "sha256:" + "0" * 64
    fwd.proxy.wait_for(lambda: call("POST", "/v2/fwd/ok/blobs/uploads/")[0] == "202", 5)  # the file is picked up
    before = len(fwd.ts.fetches)
    assert call("HEAD", f"/v2/fwd/ok/blobs/{digest}")[0] == "404"  # pull allowed: the registry answers
    for method, path, what in [
        ("POST", "/v2/elsewhere/x/blobs/uploads/", "elsewhere/x"),  # push outside the policy
        ("GET", "/v2/elsewhere/x/tags/list", "elsewhere/x"),  # pull outside
        ("DELETE", f"/v2/fwd/ok/manifests/{digest}", "fwd/ok"),  # delete is not in the policy
        ("GET", "/v2/_catalog", "catalog"),
    ]:
        status, body = call(method, path)
        assert status == "403" and "policy" in body and what in body, (method, path, status, body)
    # A mount from outside the policy becomes a plain upload (202, not 201).
    assert call("POST", f"/v2/fwd/m/blobs/uploads/?mount={digest}&from=elsewhere/x")[0] == "202"
    scopes = [sc for f in fwd.ts.fetches[before:] for sc in f.scopes]
    assert scopes and all(sc.startswith("repository:fwd/") for sc in scopes), scopes  # the token never exceeds it
