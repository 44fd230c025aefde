"""The client matrix: real clients, in every address form they support, push and pull through the proxy.

client x form x operation -> pass / FAIL / skip (with the reason). Every cell is a test; a cell passes
only when the client succeeded and the registry behind the proxy, read directly, holds what was pushed
(or the client got exactly what the registry holds). Nothing is xfail: a cell that cannot apply is a
skip that says why. `scripts/client-matrix` runs this module and prints the table (the module writes it
at teardown to the file named by CLIENT_MATRIX_TABLE).

Forms (see test_e2e_containerd.py for how each is addressed):
- host: `c-harbor.default.svc.cluster.local:<port>`, resolved to 127.0.0.1 only for the client process
  (a private /etc/hosts in a mount namespace; curl uses its own `--resolve`);
- path: `127.0.0.1:<port>/namespaces/default/connectors/harbor/<repo>`;
- forward: the registry's HTTPS name through `HTTPS_PROXY=http://default%2Fharbor:TOKEN@...`, the
  proxy's CA trusted.

How each client authenticates, the way its users configure it:
- skopeo, buildah, podman: `--creds x:TOKEN`; docker: a config.json holding only the proxy token
  (what `config render` writes); ctr: `--user x:TOKEN`; all of them answer the proxy's challenge.
- oras-py: the same config.json (`config_path=`), with its `token` backend (OAuth2 token flow against
  the challenge's realm) and its `basic` backend (Basic on every request after a 401).
- python-dxf: it refuses to authenticate over plain HTTP (DXFAuthInsecureError), so on the reverse
  listener it is given the token as a preset Bearer token (`dxf.token = TOKEN`, its documented way).
- curl: `-u x:TOKEN` (Basic, sent up front) over HTTP/1.1, `--http2` (h2c upgrade offer on plain HTTP,
  ALPN through the forward proxy) and `--http2-prior-knowledge` (cleartext HTTP/2 from the first byte).
  A pull is one curl invocation (HEAD manifest, GET manifest, GET blobs on one kept-alive connection).
- In forward mode no client holds any credential but the token in its proxy URL.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import pytest

from localregistry import Layer, OciImage, make_oci_layout
from localregistry.containerd import Containerd, ContainerdError, PrivateHosts
from localregistry.images import MT_MANIFEST
from test_e2e_containerd import (
    HOST_FORM,
    RUN,
    LogWindow,
    Target,
    clean_env,
    forward_target,
    host_form_problem,
    import_image,
    pull_once,
    push_once,
    redact,
    reverse_targets,
    seed,
    upstream_manifest,
)
from test_e2e_forward import Forward

FORMS = ("host", "path", "forward")
OPS = ("pull", "push", "manifest")
CURL_VARIANTS = {"curl http/1.1": "--http1.1", "curl --http2": "--http2",
                 "curl --http2-prior-knowledge": "--http2-prior-knowledge"}
CLIENTS = ("skopeo", "buildah", "podman", "docker", "ctr", "oras-py token", "oras-py basic", "python-dxf",
           *CURL_VARIANTS)
TIMEOUT = 240

H2C_REFUSED = ("the reverse listener speaks HTTP/1.1 (mitmproxy cannot serve HTTP/2 with prior knowledge): it answers "
               "the h2c preface with GOAWAY HTTP_1_1_REQUIRED, as HTTP/2 asks (tests/test_e2e_framing.py shows it); "
               "`curl --http2` on plain http falls back to HTTP/1.1 and passes")
EXPLAINED_SKIPS = {
    ("curl --http2-prior-knowledge", "host"): H2C_REFUSED,
    ("curl --http2-prior-knowledge", "path"): H2C_REFUSED,
    ("curl --http2-prior-knowledge", "forward"):
        "prior knowledge is cleartext HTTP/2 (h2c); through the forward proxy the registry connection is TLS, "
        "where curl negotiates HTTP/2 by ALPN: that is the `curl --http2` forward row",
}


@dataclass(frozen=True)
class Cell:
    client: str
    form: str
    op: str

    def __str__(self) -> str:
        return f"{self.client}/{self.form}/{self.op}".replace(" ", "_")


CELLS = [Cell(c, f, op) for c in CLIENTS for f in FORMS for op in ("pull", "push")] + [
    Cell("docker", "host", "manifest"), Cell("docker", "path", "manifest")]

RESULTS: dict[Cell, tuple[str, str]] = {}  # cell -> (pass|FAIL|skip, why)


class ClientFailed(AssertionError):
    """A client exited non-zero: ``str()`` is what it said last; ``command`` what it was."""

    def __init__(self, message: str, command: str = "", output: str = ""):
        super().__init__(message)
        self.command = command
        self.output = output


def run(cmd: list[str], t: Target | None = None, *, env: dict | None = None, wrap: bool = True,
        timeout: float = TIMEOUT, cwd: Path | None = None, label: str | None = None,
        prefix: list[str] | None = None) -> str:
    """Run a client (with the target's proxy environment and, for the host form, its private hosts).

    ``prefix`` replaces the target's command prefix; ``label`` names the client in messages."""
    full_env = clean_env({**(t.env if t else {}), **(env or {})})
    if prefix is None:
        prefix = t.wrap if t and wrap else []
    full = [*prefix, *cmd]
    label = label or Path(cmd[0]).name
    shown = " ".join([label, *cmd[1:]]) if label == Path(cmd[0]).name else label
    try:
        proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ClientFailed(f"{label} timed out after {timeout} s", shown) from None
    if proc.returncode != 0:
        output = (proc.stderr.strip() or proc.stdout.strip())
        last = list(dict.fromkeys(line.strip() for line in output.splitlines() if line.strip()))[-2:]
        raise ClientFailed(f"{label} exited {proc.returncode}: {' | '.join(last)}", shown, output[-3000:])
    return proc.stdout


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def layer_files(image: OciImage) -> dict[str, str]:
    """File name -> digest of what the image's layers hold (each layer of a test image holds one file)."""
    files = {}
    for digest in image.layer_digests:
        with tarfile.open(image.blob_path(digest), "r:gz") as tar:
            for member in tar:
                if member.isfile():
                    f = tar.extractfile(member)
                    assert f is not None
                    files[Path(member.name).name] = "sha256:" + hashlib.sha256(f.read()).hexdigest()
    return files


def upstream_config(t: Target, repo: str, tag: str = "v1") -> dict:
    """The image config the registry itself holds (read without the proxy)."""
    cmd = ["skopeo", "inspect", "--config", "--raw", "--creds", t.upstream_creds, *t.skopeo_upstream_tls(),
           f"docker://{t.upstream_ref(repo, tag)}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=clean_env())
    if proc.returncode != 0:
        raise ClientFailed(f"{t.upstream_ref(repo, tag)} is not in the registry after the push: {proc.stderr[-800:]}")
    return json.loads(proc.stdout)


def assert_same_image(t: Target, repo: str, image: OciImage) -> None:
    """Pushed: the registry holds an image with the same uncompressed layers (clients may recompress)."""
    diff_ids = upstream_config(t, repo).get("rootfs", {}).get("diff_ids")
    assert diff_ids == image.diff_ids, f"the registry holds layers {diff_ids} at {repo}, expected {image.diff_ids}"


def docker_config(directory: Path, hosts: list[str], token: str) -> Path:
    """A config.json whose only credential is the proxy token, as `config render` writes it."""
    directory.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"builder:{token}".encode()).decode()
    (directory / "config.json").write_text(json.dumps({"auths": {h: {"auth": auth} for h in hosts}}))
    return directory / "config.json"


def push_repo(client: str, form: str, op: str = "push") -> str:
    return f"matrix-{RUN}/{re.sub(r'[^a-z0-9]+', '-', client.lower()).strip('-')}-{form}-{op}"


# ---- the world: both proxies, the images, daemons started on first use ---------------------------------------

class Matrix:
    def __init__(self, world, fwd: Forward, tmp: Path):
        self.tmp = tmp
        self.world = world
        self.fwd = fwd
        self.targets = {**reverse_targets(world, tmp), "forward": forward_target(fwd)}
        self.host_problem = host_form_problem(tmp)
        # What is pulled: one image (2 layers, one > 1 MiB so curl sends Expect: 100-continue) and an arm64
        # sibling for docker's manifest list. What the daemons push (docker, ctr) is another image: what a
        # daemon pulls must not already be in its store, nor be content it is reading to push.
        self.src = make_oci_layout(tmp / "src", [Layer(size=1_500_000), Layer(size=30_000, compressible=True)],
                                   tag="v1", labels={"matrix": "src"})
        self.src_arm = make_oci_layout(tmp / "src-arm", [Layer(size=40_000)], tag="v1", architecture="arm64")
        self.push_src = make_oci_layout(tmp / "push-src", [Layer(size=200_000)], tag="v1",
                                          labels={"matrix": "push"})
        self.src_repo = f"matrix-{RUN}/src"
        for t in (self.targets["path"], self.targets["forward"]):  # host and path share a registry
            seed(t, self.src.ref, self.src_repo)
            seed(t, self.src_arm.ref, self.src_repo, tag="arm64")
        self._containerd: Containerd | None = None
        self._containerd_problem: str | None = None
        self._dockerd: Dockerd | None = None
        self._dockerd_problem: str | None = None

    def target(self, form: str) -> Target:
        if form == "host" and self.host_problem:
            pytest.skip(self.host_problem)
        return self.targets[form]

    def containerd(self) -> Containerd:
        if self._containerd is None and self._containerd_problem is None:
            try:
                self._containerd = Containerd().start()
                import_image(self._containerd, self.push_src.layout_dir, "localhost/matrix-push")
            except ContainerdError as e:
                self._containerd_problem = f"containerd cannot run here: {e}"
        if self._containerd_problem:
            pytest.skip(self._containerd_problem)
        assert self._containerd is not None
        return self._containerd

    def dockerd(self) -> Dockerd:
        if self._dockerd is None and self._dockerd_problem is None:
            if self.host_problem:
                self._dockerd_problem = f"dockerd needs the host form name: {self.host_problem}"
            else:
                try:
                    self._dockerd = Dockerd(self).start()
                except DockerdUnavailable as e:
                    self._dockerd_problem = str(e)
        if self._dockerd_problem:
            pytest.skip(self._dockerd_problem)
        assert self._dockerd is not None
        return self._dockerd

    def stop(self) -> None:
        if self._dockerd:
            self._dockerd.stop()
        if self._containerd:
            self._containerd.stop()


class DockerdUnavailable(RuntimeError):
    pass


class Dockerd:
    """A throwaway dockerd (vfs, no networking set-up) that knows the host form and trusts the forward proxy.

    It runs in a mount namespace with a private /etc/hosts (host form) and a private /etc/docker whose
    certs.d trusts the proxy CA for the forward-mode registry; HTTPS_PROXY points at the forward proxy
    (NO_PROXY keeps the reverse listener direct); the host form is an insecure (plain HTTP) registry."""

    def __init__(self, mx: Matrix):
        self.mx = mx
        self.root = Path(tempfile.mkdtemp(prefix="dk", dir="/tmp"))  # unix socket paths must stay short
        self.sock = self.root / "docker.sock"
        self.proc: subprocess.Popen | None = None
        fwd_t = mx.targets["forward"]
        etc = self.root / "etc-docker"
        certs = etc / "certs.d" / fwd_t.registry
        certs.mkdir(parents=True)
        shutil.copy(fwd_t.proxy_ca, certs / "ca.crt")
        (etc / "daemon.json").write_text("{}")
        self.hosts = PrivateHosts(self.root / "hosts", [HOST_FORM], binds=[(str(etc), "/etc/docker")])
        self.config_dir = self.root / "client"
        reverse = [mx.targets["host"].registry, mx.targets["path"].registry]
        docker_config(self.config_dir, reverse, mx.world.builder_token)
        self.env = clean_env({"DOCKER_HOST": f"unix://{self.sock}", "DOCKER_CONFIG": str(self.config_dir)})

    def start(self) -> Dockerd:
        binary = shutil.which("dockerd")
        if binary is None or shutil.which("docker") is None:
            raise DockerdUnavailable("dockerd is not installed (Debian package docker.io)")
        fwd_t = self.mx.targets["forward"]
        daemon_env = clean_env({**fwd_t.env, "NO_PROXY": f"{HOST_FORM},127.0.0.1,localhost",
                                "no_proxy": f"{HOST_FORM},127.0.0.1,localhost"})
        cmd = self.hosts.wrap([
            binary, "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
            "--pidfile", str(self.root / "docker.pid"), "-H", f"unix://{self.sock}",
            "--config-file", "/etc/docker/daemon.json", "--storage-driver=vfs", "--bridge=none",
            "--iptables=false", "--ip6tables=false", "--ip-masq=false",
            "--insecure-registry", self.mx.targets["host"].registry])
        log = open(self.root / "dockerd.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=daemon_env)
        log.close()
        deadline = time.monotonic() + 40
        while subprocess.run(["docker", "version"], env=self.env, capture_output=True).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.root / "dockerd.log").read_bytes()[-800:].decode(errors="replace")
                raise DockerdUnavailable(f"dockerd cannot run on this machine: {tail}")
            time.sleep(0.2)  # readiness polling, bounded by the deadline
        return self

    def docker(self, *args: str, wrap: bool = False, timeout: float = TIMEOUT) -> str:
        return run(["docker", *args], None, env=self.env, timeout=timeout,
                   prefix=self.hosts.prefix if wrap else [])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


# ---- the clients ---------------------------------------------------------------------------------------------

def containers_tls(t: Target, prefix: str = "") -> list[str]:
    """containers/image flags: plain HTTP to the reverse listener, the proxy CA in forward mode."""
    if t.reverse:
        return [f"--{prefix}tls-verify=false", f"--{prefix}creds", f"x:{t.token}"]
    return [f"--{prefix}cert-dir", str(t.proxy_certs)]


def skopeo_cell(mx: Matrix, t: Target, cell: Cell, tmp: Path) -> None:
    if cell.op == "pull":
        run(["skopeo", "copy", *containers_tls(t, "src-"), f"docker://{t.ref(mx.src_repo)}", f"oci:{tmp / 'out'}:v1"], t)
        got = json.loads((tmp / "out" / "index.json").read_text())["manifests"][0]["digest"]
        assert got == mx.src.manifest_digest, f"pulled {got}, the registry holds {mx.src.manifest_digest}"
    else:
        repo = push_repo(cell.client, cell.form)
        run(["skopeo", "copy", *containers_tls(t, "dest-"), mx.src.ref, f"docker://{t.ref(repo)}"], t)
        assert_same_image(t, repo, mx.src)


def storage_cell(tool: str, mx: Matrix, t: Target, cell: Cell, tmp: Path) -> None:
    """buildah and podman: a private vfs store per cell, so a pull finds nothing to reuse."""
    runroot = tempfile.mkdtemp(prefix="mx", dir="/tmp")
    storage = ["--root", str(tmp / "root"), "--runroot", runroot, "--storage-driver", "vfs"]
    try:
        if cell.op == "pull":
            ref = t.ref(mx.src_repo)
            run([tool, *storage, "pull", *containers_tls(t), ref if tool == "podman" else f"docker://{ref}"], t)
            fmt = "{{.Digest}}" if tool == "podman" else "{{.FromImageDigest}}"
            inspect = ["image", "inspect"] if tool == "podman" else ["inspect", "--type", "image"]
            got = run([tool, *storage, *inspect, "--format", fmt, ref], wrap=False).strip()
            assert got == mx.src.manifest_digest, f"pulled {got}, the registry holds {mx.src.manifest_digest}"
        else:
            local = "localhost/matrix/src:v1"
            run(["skopeo", "copy", mx.src.ref, f"containers-storage:[vfs@{tmp / 'root'}+{runroot}]{local}"])
            repo = push_repo(cell.client, cell.form)
            run([tool, *storage, "push", *containers_tls(t), local, f"docker://{t.ref(repo)}"], t)
            assert_same_image(t, repo, mx.src)
    finally:
        shutil.rmtree(runroot, ignore_errors=True)


def docker_cell(mx: Matrix, t: Target, cell: Cell, tmp: Path) -> None:
    d = mx.dockerd()
    wrap = t.form == "host"  # `docker manifest` runs in the CLI, which then resolves the host form itself
    if cell.op == "pull":
        ref = t.ref(mx.src_repo)
        subprocess.run(["docker", "rmi", "-f", ref], env=d.env, capture_output=True)
        d.docker("pull", ref)
        digests = json.loads(d.docker("image", "inspect", "--format", "{{json .RepoDigests}}", ref))
        d.docker("rmi", "-f", ref)  # its layers go too: the next form downloads them again
        assert any(x.endswith("@" + mx.src.manifest_digest) for x in digests), \
            f"pulled {digests}, the registry holds {mx.src.manifest_digest}"
    elif cell.op == "push":
        local = "localhost/matrix/push-src:v1"
        if not subprocess.run(["docker", "image", "inspect", local], env=d.env, capture_output=True).returncode == 0:
            archive = mx.tmp / "push-src.tar"
            if not archive.exists():
                run(["skopeo", "copy", mx.push_src.ref, f"docker-archive:{archive}:{local}"])
            d.docker("load", "-i", str(archive))
        repo = push_repo(cell.client, cell.form)
        d.docker("tag", local, t.ref(repo))
        d.docker("push", t.ref(repo))
        assert_same_image(t, repo, mx.push_src)
    else:  # manifest list over the amd64 and arm64 images, made and pushed by the docker CLI itself
        repo = push_repo(cell.client, cell.form, "manifest")
        members = [t.ref(mx.src_repo), t.ref(mx.src_repo, "arm64")]
        d.docker("manifest", "create", "--insecure", t.ref(repo), *members, wrap=wrap)
        d.docker("manifest", "push", "--insecure", t.ref(repo), wrap=wrap)
        _, raw = upstream_manifest(t, repo)
        listed = {m["digest"] for m in json.loads(raw).get("manifests", [])}
        expected = {mx.src.manifest_digest, mx.src_arm.manifest_digest}
        assert listed == expected, f"the registry's list at {repo} names {listed}, expected {expected}"


def ctr_cell(mx: Matrix, t: Target, cell: Cell, tmp: Path) -> None:
    ctd = mx.containerd()
    if cell.op == "pull":
        pull_once(ctd, t, t.ref(mx.src_repo), f"mx-{cell.form}", mx.src.manifest_digest,
                  {mx.src.manifest_digest, mx.src.config_digest, *mx.src.layer_digests})
    else:
        push_once(ctd, t, "localhost/matrix-push:v1", push_repo(cell.client, cell.form), mx.push_src.manifest_digest)


ORAS_SCRIPT = r"""
import json, os, sys
import oras.client
a = json.loads(sys.argv[1])
client = oras.client.OrasClient(insecure=a["insecure"], tls_verify=a["tls_verify"], auth_backend=a["backend"])
if a["op"] == "push":
    os.chdir(a["workdir"])
    client.push(target=a["ref"], files=["artifact.txt"], config_path=a["config"])
else:
    # image layers (tar+gzip) are what oras-py takes for directories: it extracts them into outdir
    client.pull(target=a["ref"], outdir=a["outdir"], config_path=a["config"])
"""


def oras_cell(mx: Matrix, t: Target, cell: Cell, tmp: Path) -> None:
    try:
        import oras  # noqa: F401
    except ImportError:
        pytest.skip("oras-py is not installed (PyPI `oras`, in the test extras)")
    config = docker_config(tmp / "docker", [t.registry], t.token) if t.reverse else tmp / "none.json"
    if not t.reverse:
        config.write_text('{"auths": {}}')  # forward mode: the client holds no credential at all
    args = {"insecure": t.reverse, "tls_verify": True if t.reverse else str(t.proxy_ca),
            "backend": cell.client.split()[-1], "op": cell.op, "config": str(config)}
    env = {"HOME": str(tmp)}
    if cell.op == "pull":
        (tmp / "out").mkdir()
        run([sys.executable, "-c", ORAS_SCRIPT, json.dumps({**args, "ref": t.ref(mx.src_repo),
                                                                   "outdir": str(tmp / "out")})], t, env=env,
                  label=f"oras-py ({args['backend']}) pull")
        got = {p.name: sha256_file(p) for p in (tmp / "out").iterdir()}
        expected = layer_files(mx.src)
        assert got == expected, f"pulled and extracted {got}, the image's layers hold {expected}"
    else:
        repo = push_repo(cell.client, cell.form)
        (tmp / "artifact.txt").write_bytes(os.urandom(64 << 10))
        run([sys.executable, "-c", ORAS_SCRIPT, json.dumps({**args, "ref": t.ref(repo), "workdir": str(tmp)})],
            t, env=env, label=f"oras-py ({args['backend']}) push")
        _, raw = upstream_manifest(t, repo)
        layers = [layer["digest"] for layer in json.loads(raw)["layers"]]
        assert layers == [sha256_file(tmp / "artifact.txt")], f"the registry's manifest at {repo} has layers {layers}"


DXF_SCRIPT = r"""
import hashlib, json, sys
from dxf import DXF
a = json.loads(sys.argv[1])
with DXF(a["host"], a["repo"], insecure=a["insecure"], tlsverify=a["tlsverify"]) as d:
    if a["token"]:
        d.token = a["token"]  # Bearer on every request: python-dxf will not authenticate over plain HTTP
    if a["op"] == "push":
        layer = d.push_blob(a["layer"])
        config = d.push_blob(a["config"])
        manifest = json.dumps({"schemaVersion": 2, "mediaType": a["mt"],
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": a["config_size"]},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": a["layer_size"]}]})
        d.set_manifest("v1", manifest)
        print("sha256:" + hashlib.sha256(manifest.encode()).hexdigest())
    else:
        manifest, response = d.get_manifest_and_response("v1")
        got = {"manifest": response.headers.get("Docker-Content-Digest"), "blobs": []}
        m = json.loads(manifest)
        for desc in [m["config"], *m["layers"]]:
            h = hashlib.sha256()
            for chunk in d.pull_blob(desc["digest"]):
                h.update(chunk)
            got["blobs"].append("sha256:" + h.hexdigest())
        print(json.dumps(got))
"""


def dxf_cell(mx: Matrix, t: Target, cell: Cell, tmp: Path) -> None:
    try:
        import dxf  # noqa: F401
    except ImportError:
        pytest.skip("python-dxf is not installed (PyPI `python-dxf`, in the test extras)")
    base = {"host": t.registry, "insecure": t.reverse, "tlsverify": True if t.reverse else str(t.proxy_ca),
            "token": t.token if t.reverse else None, "op": cell.op}
    if cell.op == "pull":
        out = run([sys.executable, "-c", DXF_SCRIPT, json.dumps({**base, "repo": t.prefix + mx.src_repo})], t,
                  label="python-dxf pull")
        got = json.loads(out.strip().splitlines()[-1])
        assert got["manifest"] == mx.src.manifest_digest, f"pulled manifest {got['manifest']}"
        assert got["blobs"] == [mx.src.config_digest, *mx.src.layer_digests], f"pulled blobs {got['blobs']}"
    else:
        repo = push_repo(cell.client, cell.form)
        layer, config = mx.src.blob_path(mx.src.layer_digests[1]), mx.src.blob_path(mx.src.config_digest)
        out = run([sys.executable, "-c", DXF_SCRIPT, json.dumps({
            **base, "repo": t.prefix + repo, "layer": str(layer), "config": str(config), "mt": MT_MANIFEST,
            "layer_size": layer.stat().st_size, "config_size": config.stat().st_size})], t, label="python-dxf push")
        pushed = out.strip().splitlines()[-1]
        digest, _ = upstream_manifest(t, repo)
        assert digest == pushed, f"the registry holds {digest} at {repo}, python-dxf pushed {pushed}"


class Curl:
    """curl against one target: plain HTTP (with --resolve for the host form) or through the forward proxy."""

    def __init__(self, t: Target, variant: str, tmp: Path):
        self.t = t
        self.tmp = tmp
        self.origin = (f"http://{t.registry}" if t.reverse else f"https://{t.registry}")
        host, _, port = t.registry.rpartition(":")
        self.common = ["curl", "-sS", CURL_VARIANTS[variant]]
        if t.reverse:
            self.common += ["-u", f"x:{t.token}"]
            if t.form == "host":
                self.common += ["--resolve", f"{host}:{port}:127.0.0.1"]
        else:
            self.common += ["--cacert", str(t.proxy_ca)]  # the token travels in https_proxy
        self.n = 0
        self.seen: set[str] = set()

    def url(self, repo: str, rest: str) -> str:
        return f"{self.origin}/v2/{self.t.prefix}{repo}/{rest}"

    def many(self, requests: list[list[str]]) -> list[tuple[int, str, str]]:
        """One curl invocation, one connection reused for every request: [(status, http version, location)]."""
        cmd = list(self.common)
        for i, req in enumerate(requests):
            if i:
                cmd += ["--next", *self.common[1:]]
            cmd += ["-w", "%{http_code} %{http_version} %header{location}\\n", *req]
        out = run(cmd, self.t, wrap=False)
        rows = []
        for line in out.strip().splitlines()[-len(requests):]:
            code, version, *loc = line.split(" ", 2)
            rows.append((int(code), version, loc[0] if loc else ""))
            self.seen.add(version)
        return rows

    def versions(self) -> str:
        """The HTTP versions curl ended up speaking (an h2c upgrade offer may be declined)."""
        return "HTTP/" + ",".join(sorted(self.seen))

    def out(self) -> str:
        self.n += 1
        return str(self.tmp / f"body-{self.n}")

    def push_blob(self, repo: str, path: Path) -> None:
        digest = sha256_file(path)
        rows = self.many([["-I", self.url(repo, f"blobs/{digest}"), "-o", "/dev/null"],
                          ["-X", "POST", "-o", "/dev/null", self.url(repo, "blobs/uploads/")]])
        assert rows[0][0] == 404 and rows[1][0] == 202, f"HEAD blob, POST upload answered {rows}"
        location = urljoin(self.origin + "/", rows[1][2])
        sep = "&" if "?" in location else "?"
        [(code, _, _)] = self.many([["-X", "PUT", "-o", self.out(), "-H", "Content-Type: application/octet-stream",
                                     "--data-binary", f"@{path}", f"{location}{sep}digest={digest}"]])
        assert code == 201, f"PUT blob answered {code}: {Path(self.tmp / f'body-{self.n}').read_text(errors='replace')[:300]}"


def curl_cell(mx: Matrix, t: Target, cell: Cell, tmp: Path) -> str:
    c = Curl(t, cell.client, tmp)
    accept = ["-H", f"Accept: {MT_MANIFEST}"]
    if cell.op == "pull":
        blobs = [mx.src.config_digest, *mx.src.layer_digests]
        outs = [tmp / f"pulled-{i}" for i in range(len(blobs) + 1)]
        rows = c.many([["-I", *accept, "-o", "/dev/null", c.url(mx.src_repo, "manifests/v1")],
                       [*accept, "-o", str(outs[0]), c.url(mx.src_repo, "manifests/v1")],
                       *[["-L", "-o", str(o), c.url(mx.src_repo, f"blobs/{d}")] for o, d in zip(outs[1:], blobs)]])
        assert [r[0] for r in rows] == [200] * len(rows), f"answers: {rows}"
        got = [sha256_file(o) for o in outs]
        assert got == [mx.src.manifest_digest, *blobs], f"pulled {got}"
        return c.versions()
    else:
        repo = push_repo(cell.client, cell.form)
        for digest in (mx.src.layer_digests[0], mx.src.config_digest):
            c.push_blob(repo, mx.src.blob_path(digest))
        manifest = json.dumps({"schemaVersion": 2, "mediaType": MT_MANIFEST,
                               "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                          "digest": mx.src.config_digest,
                                          "size": mx.src.blob_path(mx.src.config_digest).stat().st_size},
                               "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                           "digest": mx.src.layer_digests[0],
                                           "size": mx.src.layer_sizes[0]}]}).encode()
        (tmp / "manifest.json").write_bytes(manifest)
        [(code, _, _)] = c.many([["-X", "PUT", "-o", c.out(), "-H", f"Content-Type: {MT_MANIFEST}",
                                  "--data-binary", f"@{tmp / 'manifest.json'}", c.url(repo, "manifests/v1")]])
        assert code == 201, f"PUT manifest answered {code}"
        digest, _ = upstream_manifest(t, repo)
        assert digest == "sha256:" + hashlib.sha256(manifest).hexdigest(), f"the registry holds {digest}"
        return c.versions()


RUNNERS = {
    "skopeo": skopeo_cell,
    "buildah": lambda *a: storage_cell("buildah", *a),
    "podman": lambda *a: storage_cell("podman", *a),
    "docker": docker_cell,
    "ctr": ctr_cell,
    "oras-py token": oras_cell,
    "oras-py basic": oras_cell,
    "python-dxf": dxf_cell,
    **{name: curl_cell for name in CURL_VARIANTS},
}


# ---- fixtures, the cells, the table ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fwd(tmp_path_factory):
    f = Forward(tmp_path_factory.mktemp("matrix-forward"))
    yield f
    f.stop()
    written = f.proxy.everything_written()
    leaked = [i for i, s in enumerate(f.secrets) if s.encode() in written]
    assert not leaked, f"secrets #{leaked} appear in {f.proxy.log_path} or {f.proxy.flows_path}"


@pytest.fixture(scope="module")
def mx(world, fwd, tmp_path_factory):
    m = Matrix(world, fwd, tmp_path_factory.mktemp("matrix"))
    yield m
    m.stop()


@pytest.fixture(scope="module", autouse=True)
def table():
    RESULTS.clear()
    yield
    path = os.environ.get("CLIENT_MATRIX_TABLE")
    if path:
        Path(path).write_text(render_table())


def render_table() -> str:
    notes: list[str] = []
    rows = []
    for client in CLIENTS:
        for form in FORMS:
            row = [client, form]
            for op in OPS:
                cell = Cell(client, form, op)
                if cell not in CELLS:
                    row.append("-")
                elif cell not in RESULTS:
                    row.append("not run")
                else:
                    status, why = RESULTS[cell]
                    if status == "pass":
                        row.append(f"pass ({why})" if why else "pass")
                    else:
                        notes.append(f"[{len(notes) + 1}] {client} / {form} / {op}: {why}")
                        row.append(f"{status} [{len(notes)}]")
            rows.append(row)
    header = ["client", "form", *OPS]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    counts = {s: sum(1 for v in RESULTS.values() if v[0] == s) for s in ("pass", "FAIL", "skip")}
    summary = (f"{counts['pass']} pass, {counts['FAIL']} FAIL, {counts['skip']} skip, "
               f"{len(CELLS) - len(RESULTS)} not run (of {len(CELLS)} cells)")
    return "\n".join(["client matrix: " + summary, "", *lines, "", *notes, ""])


_PROXY_TROUBLE = re.compile(r"not supported|error|traceback|exception|killed|refus", re.I)


def proxy_hint(lines: list[str]) -> str:
    """The first line of the proxy's log that says something went wrong (not a JSON error body)."""
    for line in lines:
        if _PROXY_TROUBLE.search(line) and not line.lstrip().startswith('"'):
            return line.strip()
    return ""


def one_line(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


@pytest.mark.parametrize("cell", CELLS, ids=str)
def test_cell(mx, cell, tmp_path):
    why = EXPLAINED_SKIPS.get((cell.client, cell.form))
    if why:
        RESULTS[cell] = ("skip", why)
        pytest.skip(why)
    window = None
    try:
        t = mx.target(cell.form)
        window = LogWindow(t.proxy.log_path)
        note = RUNNERS[cell.client](mx, t, cell, tmp_path)
    except pytest.skip.Exception as e:
        RESULTS[cell] = ("skip", str(e))
        raise
    except Exception as e:
        secrets_ = [mx.world.builder_token, mx.fwd.token]
        message = redact(str(e) if isinstance(e, (ClientFailed, AssertionError)) else f"{type(e).__name__}: {e}", secrets_)
        hint = proxy_hint(window.lines()) if window else ""
        RESULTS[cell] = ("FAIL", one_line(message) + (f" (proxy log: {one_line(hint, 200)})" if hint else ""))
        detail = ""
        if isinstance(e, ClientFailed):
            detail = f"\n command: {e.command}\n output:\n{e.output}"
        log = window.excerpt() if window else "(none)"
        raise AssertionError(redact(f"{cell}: {message}{detail}\n proxy log meanwhile:\n{log}", secrets_)) from None
    RESULTS[cell] = ("pass", note or "")
