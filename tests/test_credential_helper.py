"""Long builds keep pushing: scripts/docker-credential-connector-proxy answers with the token as its
file holds it at that moment, so a client that asks it when it pushes gets the kubelet's latest
rotation, not the token of Pod start.

- The helper speaks the docker credential-helper protocol (`get`, `list`, `store`, `erase`,
  `version`) under every POSIX shell found here: dash, bash and BusyBox ash (the /bin/sh of the
  alpine-based moby/buildkit image).
- Real clients that read `credHelpers` pull through the proxy with it, then the token file is
  rotated the way the kubelet rotates a projected token (a new timestamped directory, the `..data`
  symlink swapped) and the first token is removed from the proxy's static token file (the proxy
  re-reads it when it changes): the first token is refused from then on, and the push works with the
  second one, with no change to the client's configuration. The clients: skopeo (containers/image
  reads credHelpers from its auth file: buildah and podman too) and the docker CLI with a throwaway
  dockerd (docker/cli's config package, which buildctl uses to read config.json).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import REGISTRY_USER
from localregistry import make_oci_layout, skopeo
from proxyproc import REPO, ProxyProcess, basic

HELPER = REPO / "scripts" / "docker-credential-connector-proxy"
SHELLS = {"dash": ["dash"], "bash": ["bash", "--posix"], "busybox ash": ["busybox", "sh"]}
SUBJECT = "system:serviceaccount:ci:long-build"
PATH_FORM = "namespaces/default/connectors/harbor"


def helper(action: str, stdin: str = "", shell: tuple[str, ...] = ("sh",), env: dict | None = None):
    return subprocess.run([*shell, str(HELPER), action], input=stdin, capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


# ============================================================================ the protocol


@pytest.mark.parametrize("shell", SHELLS, ids=list(SHELLS))
def test_protocol(shell, tmp_path):
    argv = SHELLS[shell]
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed")
    token_file = tmp_path / "token"
    token_file.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln\n")  # a JWT and the file's newline
    env = {"CONNECTOR_PROXY_TOKEN_FILE": str(token_file)}

    got = helper("get", "c-harbor.default.svc.cluster.local", argv, env)
    assert got.returncode == 0, got
    assert json.loads(got.stdout) == {"ServerURL": "c-harbor.default.svc.cluster.local",
                                      "Username": "connector-proxy",
                                      "Secret": "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"}
    # a server URL with quotes and backslashes still makes valid JSON
    odd = helper("get", 'https://we"ird\\host:5000\n', argv, env)
    assert json.loads(odd.stdout)["ServerURL"] == 'https://we"ird\\host:5000'
    # read at every call: the new content, no restart, no cache
    token_file.write_text("second-token")
    assert json.loads(helper("get", "h", argv, env).stdout)["Secret"] == "second-token"

    assert helper("list", "", argv, env).stdout.strip() == "{}"
    for action, stdin in (("store", '{"ServerURL":"h","Username":"u","Secret":"s"}'), ("erase", "h")):
        done = helper(action, stdin, argv, env)
        assert done.returncode == 0 and done.stdout == "", done
    assert token_file.read_text() == "second-token"  # store never writes the token file
    assert helper("version", "", argv, env).stdout.startswith("docker-credential-connector-proxy ")
    assert helper("bogus", "", argv, env).returncode != 0

    # failures say why on stdout (what clients show) and exit 1
    token_file.write_text("")
    empty = helper("get", "h", argv, env)
    assert empty.returncode == 1 and "is empty" in empty.stdout
    token_file.write_text('bad"token')
    assert helper("get", "h", argv, env).returncode == 1
    token_file.unlink()
    missing = helper("get", "h", argv, env)
    assert missing.returncode == 1 and "does not exist" in missing.stdout


def test_default_token_path_is_where_the_examples_mount_it():
    assert "${CONNECTOR_PROXY_TOKEN_FILE:-/var/run/secrets/connector-proxy/token}" in HELPER.read_text()
    assert os.access(HELPER, os.X_OK) and HELPER.read_text().startswith("#!/bin/sh\n")


# ============================================================================ real clients


class ProjectedToken:
    """A projected ServiceAccount token volume as the kubelet writes it (AtomicWriter): `token`
    -> `..data/token`, `..data` -> a timestamped directory, swapped by a rename on rotation."""

    def __init__(self, directory: Path, token: str):
        self.dir = directory
        self.dir.mkdir(parents=True)
        self.generation = 0
        self.rotate(token)
        (self.dir / "token").symlink_to("..data/token")

    @property
    def path(self) -> Path:
        return self.dir / "token"

    def rotate(self, token: str) -> None:
        self.generation += 1
        old = os.readlink(self.dir / "..data") if (self.dir / "..data").is_symlink() else None
        new = self.dir / f"..2025_01_01_00_00_0{self.generation}.000000001"
        new.mkdir()
        (new / "token").write_text(token)
        (self.dir / "..data_tmp").symlink_to(new.name)
        os.rename(self.dir / "..data_tmp", self.dir / "..data")
        if old:
            shutil.rmtree(self.dir / old)


class LongBuild:
    """A proxy with its own static token file, a projected token, and the helper on PATH."""

    def __init__(self, world, tmp: Path):
        self.world = world
        self.first = "first-" + secrets.token_hex(16)
        self.second = "second-" + secrets.token_hex(16)
        self.tokens_file = tmp / "tokens.yaml"
        self.allow(self.first)
        self.proxy = ProxyProcess(tmp, world.connectors_dir, self.tokens_file).start()
        self.token = ProjectedToken(tmp / "projected", self.first)
        self.bin = tmp / "connector-bin"  # what the examples' init container copies
        self.bin.mkdir()
        shutil.copy2(HELPER, self.bin / HELPER.name)
        self.config_dir = tmp / "docker-config"
        self.config_dir.mkdir()
        self.config = self.config_dir / "config.json"
        self.config.write_text(json.dumps({"credHelpers": {self.proxy.host: "connector-proxy"}}))
        self.env = {"PATH": f"{self.bin}:{os.environ['PATH']}", "CONNECTOR_PROXY_TOKEN_FILE": str(self.token.path)}

    def allow(self, token: str) -> None:
        tmp = self.tokens_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({"tokens": [{"token": token, "subject": SUBJECT,
                                                   "connectors": ["default/harbor"]}]}))
        tmp.rename(self.tokens_file)

    def status_with(self, token: str) -> int:
        return self.proxy.request("GET", f"/v2/{PATH_FORM}/test/long-build/tags/list", auth=basic("x", token)).status

    def rotate(self) -> None:
        """The kubelet rotates the projected token; the first token stops being valid."""
        self.token.rotate(self.second)
        self.allow(self.second)
        deadline = time.monotonic() + 10
        while self.status_with(self.first) != 401:
            assert time.monotonic() < deadline, "the proxy still accepts the first token"
            time.sleep(0.1)  # the proxy re-reads its token file, bounded by the deadline
        assert self.status_with(self.second) != 401

    def ref(self, repo_tag: str) -> str:
        return f"{self.proxy.host}/{PATH_FORM}/{repo_tag}"

    def stop(self) -> None:
        self.proxy.stop()
        written = self.proxy.everything_written()
        for s in (self.first, self.second, self.world.registry_password):
            assert s.encode() not in written


@pytest.fixture
def long_build(world, tmp_path):
    b = LongBuild(world, tmp_path)
    yield b
    b.stop()


def run(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env},
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def upstream_digest(world, repo_tag: str) -> str:
    return skopeo.inspect(f"docker://{world.registry.host}/{repo_tag}",
                          creds=f"{REGISTRY_USER}:{world.registry_password}", tls_verify=False)["Digest"]


def test_skopeo_pulls_then_pushes_after_the_token_rotated(world, long_build, tmp_path):
    b = long_build
    image = make_oci_layout(tmp_path / "img", [20_000], tag="v1", labels={"step": "before-rotation"})
    skopeo.copy(image.ref, f"docker://{world.registry.host}/test/long-build:v1",
                dest_creds=f"{REGISTRY_USER}:{world.registry_password}", tls_verify=False)
    auth = ["--authfile", str(b.config)]  # credHelpers only: no token in it

    run(["skopeo", "copy", *auth, "--src-tls-verify=false", f"docker://{b.ref('test/long-build:v1')}",
         f"oci:{tmp_path / 'pulled'}:v1"], b.env)
    assert json.loads((tmp_path / "pulled" / "index.json").read_text())["manifests"][0]["digest"] == image.manifest_digest

    b.rotate()
    later = make_oci_layout(tmp_path / "later", [30_000], tag="v2", labels={"step": "after-rotation"})
    run(["skopeo", "copy", *auth, "--dest-tls-verify=false", later.ref, f"docker://{b.ref('test/long-build:v2')}"],
        b.env)
    assert upstream_digest(world, "test/long-build:v2") == later.manifest_digest
    assert b.first not in b.config.read_text() and b.second not in b.config.read_text()

    # and it was the helper that answered: without its token file the client says what the helper said
    (b.token.dir / "..data").unlink()
    failed = subprocess.run(["skopeo", "inspect", *auth, "--tls-verify=false", f"docker://{b.ref('test/long-build:v2')}"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, **b.env})
    assert failed.returncode != 0 and "does not exist" in failed.stderr, failed.stderr


def test_docker_cli_pulls_then_pushes_after_the_token_rotated(world, long_build, dockerd, tmp_path):
    b = long_build
    image = make_oci_layout(tmp_path / "img", [15_000], tag="v1", labels={"client": "docker"})
    skopeo.copy(image.ref, f"docker://{world.registry.host}/test/long-build-docker:v1",
                dest_creds=f"{REGISTRY_USER}:{world.registry_password}", tls_verify=False)
    env = {**dockerd, **b.env, "DOCKER_CONFIG": str(b.config_dir)}
    pulled, pushed = b.ref("test/long-build-docker:v1"), b.ref("test/long-build-docker:v2")

    run(["docker", "pull", pulled], env)
    b.rotate()
    run(["docker", "tag", pulled, pushed], env)
    run(["docker", "push", pushed], env)
    pushed_image = skopeo.inspect(f"docker://{world.registry.host}/test/long-build-docker:v2",
                                  creds=f"{REGISTRY_USER}:{world.registry_password}", tls_verify=False)
    assert pushed_image["Labels"] == {"client": "docker"}
    # docker never wrote a credential into its config (store is a no-op, and nothing else was asked)
    assert json.loads(b.config.read_text()) == {"credHelpers": {b.proxy.host: "connector-proxy"}}
    run(["docker", "rmi", pulled, pushed], env)
