"""Rendered client configuration is all real clients need: skopeo, buildah, podman push and pull with it."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib

import pytest

from localregistry import make_oci_layout
from proxyproc import REPO, basic
from test_e2e_clients import run


def render_cli(world, tmp_path, *extra: str, names: str = "registry-config,buildkitd") -> subprocess.CompletedProcess:
    token_file = tmp_path / "token"
    if not token_file.exists():
        token_file.write_text(world.builder_token + "\n")
    cmd = [sys.executable, "-m", "connector_store.cli", "config", "render", "--connectors", str(world.connectors_dir),
           "--use", "default/harbor,team/other", "--names", names, "--token-file", str(token_file),
           "--proxy-url", world.proxy.url, "--out", str(tmp_path / "out"), *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.fixture
def rendered(world, tmp_path):
    proc = render_cli(world, tmp_path)
    assert proc.returncode == 0, proc.stderr
    return tmp_path / "out"


def test_rendered_files_hold_the_proxy_token_and_no_registry_credential(world, rendered):
    config = json.loads((rendered / "config.json").read_text())
    assert list(config["auths"]) == [world.proxy.host]
    user, _, token = base64.b64decode(config["auths"][world.proxy.host]["auth"]).decode().partition(":")
    assert token == world.builder_token and user
    toml = tomllib.loads((rendered / "buildkitd.toml").read_text())
    assert toml == {"registry": {world.proxy.host: {"http": True}}}
    for f in rendered.iterdir():
        data = f.read_bytes()
        for secret in (world.registry_password, world.ht_password, *world.token_server.issued_tokens):
            assert secret.encode() not in data


def test_skopeo_with_only_the_rendered_config(world, rendered, tmp_path):
    image = make_oci_layout(tmp_path / "img", [20_000, 30_000], tag="v1")
    for connector in ("default/connectors/harbor", "team/connectors/other"):  # both registries, one config
        ref = f"docker://{world.proxy.host}/namespaces/{connector}/cfg/skopeo:v1"
        run(["skopeo", "copy", "--authfile", str(rendered / "config.json"), "--dest-tls-verify=false", image.ref, ref])
        out = json.loads(run(["skopeo", "inspect", "--authfile", str(rendered / "config.json"), "--tls-verify=false", ref]))
        assert out["Digest"] == image.manifest_digest


@pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed")
@pytest.mark.parametrize("tool", ["buildah", "podman"])
def test_buildah_and_podman_with_only_the_rendered_config(world, rendered, tmp_path, tool):
    runroot = tempfile.mkdtemp(prefix="rr", dir="/tmp")  # podman refuses run roots over 50 characters
    storage = ["--root", str(tmp_path / "root"), "--runroot", runroot, "--storage-driver", "vfs"]
    if tool == "podman":
        storage += ["--cgroup-manager", "cgroupfs", "--events-backend", "file"]
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Containerfile").write_text(f'FROM scratch\nLABEL built-by="{tool}"\nENV APP_VERSION="1.0.0"\n')
    ref = f"{world.proxy.host}/namespaces/default/connectors/harbor/cfg/{tool}:v1"
    auth = ["--authfile", str(rendered / "config.json"), "--tls-verify=false"]
    run([tool, *storage, "build", "--isolation", "chroot", "-t", f"localhost/{tool}:v1", "-f", str(context / "Containerfile"), str(context)])
    run([tool, *storage, "push", *auth, f"localhost/{tool}:v1", f"docker://{ref}"])
    run([tool, *storage, "rmi", "-a", "-f"])
    run([tool, *storage, "pull", *auth, f"docker://{ref}"])
    info = json.loads(run([tool, *storage, "inspect", "--type", "image", ref]))
    labels = info["OCIv1"]["config"]["Labels"] if tool == "buildah" else info[0]["Config"]["Labels"]
    assert labels["built-by"] == tool
    shutil.rmtree(runroot, ignore_errors=True)


def test_http_endpoint_serves_the_same_render(world, proxy, rendered):
    q = (f"/.connectors/config?use=default/harbor,team/other&names=registry-config,buildkitd"
         f"&proxy_url={proxy.url}")
    r = proxy.request("GET", q, auth=basic("init", world.builder_token))
    assert r.status == 200, r.data
    assert r.headers["Content-Type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(r.data)) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for name in ("config.json", "buildkitd.toml", "context.token", "connector.status.proxyAddress"):
        assert files[name] == (rendered / name).read_bytes(), name  # byte-identical to the CLI's
    r = proxy.request("GET", q + "&format=json", auth=basic("init", world.builder_token))
    assert json.loads(r.data)["files"]["config.json"] == (rendered / "config.json").read_text()


def test_http_endpoint_refuses_who_may_not(world, proxy):
    q = "/.connectors/config?use=default/harbor&names=registry-config"
    assert proxy.request("GET", q).status == 401
    assert proxy.request("GET", q, auth=basic("x", "bogus")).status == 401
    r = proxy.request("GET", q, auth=basic("x", world.team_token))
    assert r.status == 403 and world.team_token not in r.data.decode()
    r = proxy.request("GET", "/.connectors/config?use=default/harbor&names=nonsense", auth=basic("x", world.builder_token))
    assert r.status == 400 and "nonsense" in json.loads(r.data)["errors"][0]["message"]


def test_unknown_names_are_errors_that_say_which(world, tmp_path):
    proc = render_cli(world, tmp_path, names="registry-config,bogus,!nofile")
    assert proc.returncode == 2
    assert "bogus" in proc.stderr and "!nofile" in proc.stderr


def test_watch_rerenders_a_rotated_token_within_two_seconds(world, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("first-token")
    cmd = [sys.executable, "-m", "connector_store.cli", "config", "render", "--connectors", str(world.connectors_dir),
           "--use", "default/harbor", "--names", "registry-config", "--token-file", str(token_file),
           "--out", str(tmp_path / "out"), "--watch"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        context_token = tmp_path / "out" / "context.token"
        deadline = time.monotonic() + 20
        while not (context_token.exists() and context_token.read_text() == "first-token"):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "first render never appeared"
            time.sleep(0.02)
        rotated_at = time.monotonic()
        token_file.write_text("second-token")
        while context_token.read_text() != "second-token":
            assert time.monotonic() - rotated_at < 2.0, "the rotated token was not rendered within 2 s"
            time.sleep(0.02)
        config = json.loads((tmp_path / "out" / "config.json").read_text())
        [entry] = config["auths"].values()
        assert base64.b64decode(entry["auth"]).decode().endswith(":second-token")
    finally:
        proc.terminate()
        proc.wait(10)


def test_docker_with_only_the_rendered_config(world, rendered, tmp_path, dockerd):
    image = make_oci_layout(tmp_path / "img", [10_000], tag="v1", labels={"built-by": "docker-test"})
    archive = tmp_path / "image.tar"
    run(["skopeo", "copy", image.ref, f"docker-archive:{archive}:localhost/cfg-docker:v1"])
    env = dict(dockerd, DOCKER_CONFIG=str(rendered))  # config.json with nothing but the proxy token
    ref = f"{world.proxy.host}/namespaces/default/connectors/harbor/cfg/docker:v1"
    run(["docker", "load", "-i", str(archive)], env=env)
    run(["docker", "tag", "localhost/cfg-docker:v1", ref], env=env)
    run(["docker", "push", ref], env=env)
    run(["docker", "rmi", ref, "localhost/cfg-docker:v1"], env=env)
    run(["docker", "pull", ref], env=env)
    labels = json.loads(run(["docker", "image", "inspect", ref], env=env))[0]["Config"]["Labels"]
    assert labels["built-by"] == "docker-test"
