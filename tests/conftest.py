"""The test world: real registries (token auth and htpasswd), a real token server, the real proxy.

Passwords and tokens are random per run, so a leak search for them means something.
"""

from __future__ import annotations

import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from localregistry import Registry, TokenServer, free_port
from proxyproc import ProxyProcess, connector, secret, write_manifests

REGISTRY_USER = "pusher"
READER_USER = "reader"  # may pull, never push: proves insufficient_scope handling
HT_USER = "htuser"


def pull_only_for_reader(user, rtype, name, actions):
    if user is None:
        return []
    if user == READER_USER:
        return [a for a in actions if a == "pull"]
    return list(actions)


@dataclass
class World:
    tmp: Path
    token_server: TokenServer
    registry: Registry
    ht_registry: Registry
    registry_password: str
    reader_password: str
    ht_password: str
    builder_token: str  # may use every connector
    team_token: str  # may use team/* only
    connectors_dir: Path
    tokens_file: Path
    proxy: ProxyProcess | None = None
    extra_secrets: list[str] = field(default_factory=list)

    @property
    def secrets(self) -> list[str]:
        """Everything that must never appear in what the proxy writes or returns."""
        return [self.registry_password, self.reader_password, self.ht_password, self.builder_token,
                self.team_token, *self.token_server.issued_tokens, *self.extra_secrets]


def write_world_config(w: World) -> None:
    closed_port = free_port()  # nothing listens there: the "upstream down" connector
    write_manifests(w.connectors_dir, "connectors.yaml", [
        connector("default", "harbor", w.registry.url, "harbor-secret", repository="testing/busybox"),
        secret("default", "harbor-secret", REGISTRY_USER, w.registry_password),
        connector("default", "readonly", w.registry.url, "reader-secret"),
        secret("default", "reader-secret", READER_USER, w.reader_password, type="kubernetes.io/basic-auth", encoded=True),
        connector("team", "other", w.ht_registry.url, "ht-secret"),
        secret("team", "ht-secret", HT_USER, w.ht_password, type="kubernetes.io/basic-auth"),
        connector("default", "down", f"http://127.0.0.1:{closed_port}"),
        connector("default", "broken", w.registry.url, "missing-secret"),
    ])
    w.tokens_file.write_text(yaml.safe_dump({"tokens": [
        {"token": w.builder_token, "subject": "system:serviceaccount:ci:builder", "connectors": ["*"]},
        {"token": w.team_token, "subject": "system:serviceaccount:team:deployer", "connectors": ["team/*"]},
    ]}))


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    for tool in ("skopeo",):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is not installed (.ci/run installs it)")
    tmp = tmp_path_factory.mktemp("world")
    registry_password = "regpw-" + secrets.token_hex(12)
    reader_password = "readpw-" + secrets.token_hex(12)
    ht_password = "htpw-" + secrets.token_hex(12)
    ts = TokenServer("localregistry", {REGISTRY_USER: registry_password, READER_USER: reader_password},
                     access=pull_only_for_reader).start()
    reg = Registry(tmp / "registry", "token", token_server=ts).start()
    ht = Registry(tmp / "htregistry", "htpasswd", htpasswd_users={HT_USER: ht_password}).start()
    w = World(tmp, ts, reg, ht, registry_password, reader_password, ht_password,
              "cli-" + secrets.token_hex(16), "team-" + secrets.token_hex(16),
              tmp / "connectors", tmp / "tokens.yaml")
    write_world_config(w)
    w.proxy = ProxyProcess(tmp, w.connectors_dir, w.tokens_file).start()
    yield w
    w.proxy.stop()
    # Everything the session's proxy wrote, across all tests, at the most verbose flow detail.
    written = w.proxy.everything_written()
    leaked = [i for i, s in enumerate(w.secrets) if s.encode() in written]
    assert not leaked, f"secrets #{leaked} appear in {w.proxy.log_path} or {w.proxy.flows_path}"
    ht.stop()
    reg.stop()
    ts.stop()


@pytest.fixture
def proxy(world) -> ProxyProcess:
    return world.proxy


def reverse_tflow(**kwargs):
    """A mitmproxy test flow as it arrives on the reverse listener (tflow defaults to regular mode)."""
    from mitmproxy.proxy.mode_specs import ProxyMode
    from mitmproxy.test import tflow

    flow = tflow.tflow(**kwargs)
    flow.client_conn.proxy_mode = ProxyMode.parse("reverse:http://127.0.0.1:9")
    return flow


@pytest.fixture(scope="module")
def dockerd():
    """A throwaway dockerd (vfs storage, no networking set-up): the environment that reaches it, or
    a skip saying why there is none."""
    import os
    import subprocess
    import tempfile
    import time

    binary = shutil.which("dockerd")
    if binary is None or shutil.which("docker") is None:
        pytest.skip("dockerd is not installed (Debian package docker.io)")
    root = tempfile.mkdtemp(prefix="dk", dir="/tmp")  # unix socket paths must stay short
    sock = f"{root}/docker.sock"
    with open(f"{root}/dockerd.log", "wb") as log:
        proc = subprocess.Popen([binary, "--data-root", f"{root}/data", "--exec-root", f"{root}/exec",
                                 "--pidfile", f"{root}/docker.pid", "-H", f"unix://{sock}", "--storage-driver=vfs",
                                 "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-masq=false"],
                                stdout=log, stderr=subprocess.STDOUT)
    env = dict(os.environ, DOCKER_HOST=f"unix://{sock}")
    deadline = time.monotonic() + 30
    while subprocess.run(["docker", "version"], env=env, capture_output=True).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            tail = Path(f"{root}/dockerd.log").read_bytes()[-800:].decode(errors="replace")
            pytest.skip(f"dockerd cannot run on this machine: {tail}")
        time.sleep(0.1)  # readiness polling, bounded by the deadline
    yield env
    proc.terminate()
    proc.wait(20)
    shutil.rmtree(root, ignore_errors=True)
