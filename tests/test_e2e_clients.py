"""Real clients (skopeo, buildah) push and pull through the proxy to a real token-auth registry."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess

import pytest

from conftest import REGISTRY_USER
from localregistry import make_oci_layout, skopeo

PATH_FORM = "namespaces/default/connectors/harbor"


def authfile_for(tmp_path, host: str, token: str):
    """A docker config.json whose only credential is the proxy token (what `config render` produces)."""
    path = tmp_path / "auth.json"
    path.write_text(json.dumps({"auths": {host: {"auth": base64.b64encode(f"builder:{token}".encode()).decode()}}}))
    return path


def run(cmd: list[str], **kw) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, f"{cmd[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_skopeo_multilayer_roundtrip_path_form(world, proxy, tmp_path):
    image = make_oci_layout(tmp_path / "src", [200_000, 1_500_000, 30_000], tag="v1", labels={"app": "multi"})
    auth = authfile_for(tmp_path, proxy.host, world.builder_token)
    dest = f"docker://{proxy.host}/{PATH_FORM}/test/multi:v1"

    run(["skopeo", "copy", "--authfile", str(auth), "--dest-tls-verify=false", image.ref, dest])
    run(["skopeo", "copy", "--authfile", str(auth), "--src-tls-verify=false", dest, f"oci:{tmp_path / 'back'}:v1"])

    back_index = json.loads((tmp_path / "back" / "index.json").read_text())
    assert back_index["manifests"][0]["digest"] == image.manifest_digest
    for digest in image.layer_digests:
        algo, hexd = digest.split(":")
        assert (tmp_path / "back" / "blobs" / algo / hexd).exists()

    # Upstream holds it under the unprefixed name, reachable with the registry's own credentials.
    upstream = skopeo.inspect(f"docker://{world.registry.host}/test/multi:v1",
                              creds=f"{REGISTRY_USER}:{world.registry_password}")
    assert upstream["Digest"] == image.manifest_digest
    assert upstream["Layers"] == image.layer_digests
    # The authfile the client used holds nothing but the proxy token.
    assert world.registry_password not in auth.read_text()


@pytest.mark.skipif(shutil.which("buildah") is None, reason="buildah is not installed")
def test_buildah_builds_seed_dockerfile_pushes_and_pulls(world, proxy, tmp_path):
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(
        'FROM scratch\nLABEL maintainer="example@example.com"\nWORKDIR /app\nENV APP_VERSION="1.0.0"\n'
    )
    storage = ["--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run"), "--storage-driver", "vfs"]
    auth = authfile_for(tmp_path, proxy.host, world.builder_token)
    ref = f"{proxy.host}/{PATH_FORM}/test/test-cjt:v1"
    run(["buildah", *storage, "bud", "--isolation", "chroot", "-t", "localhost/seed:v1", str(context)])
    run(["buildah", *storage, "push", "--authfile", str(auth), "--tls-verify=false", "localhost/seed:v1", f"docker://{ref}"])
    run(["buildah", *storage, "rmi", "-a", "-f"])
    run(["buildah", *storage, "pull", "--authfile", str(auth), "--tls-verify=false", f"docker://{ref}"])
    info = json.loads(run(["buildah", *storage, "inspect", "--type", "image", ref]))
    config = info["OCIv1"]["config"]
    assert config["Labels"]["maintainer"] == "example@example.com"
    assert "APP_VERSION=1.0.0" in config["Env"]
    assert config["WorkingDir"] == "/app"
    upstream = skopeo.inspect(f"docker://{world.registry.host}/test/test-cjt:v1",
                              creds=f"{REGISTRY_USER}:{world.registry_password}")
    assert upstream["Labels"]["maintainer"] == "example@example.com"
