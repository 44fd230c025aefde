"""What the manifests run, run here: every workload in manifests/ and manifests/examples/, started
from its container command, args, env and volumes exactly as written, against the fake API server.

A manifest whose containers do not start, do not become ready, or do not exit 0 fails the suite.
Each Pod becomes a small local "Pod" (root only: namespaces, overlay and bind mounts); the rules:

Pods and containers
- A Pod is a network namespace of its own (`unshare --net`, loopback up): its containers share it,
  as in Kubernetes, so fixed ports (8080, 3128, 127.0.0.1:8080 of the sidecar) are used as written.
- A container is a mount namespace whose root is an overlay of this machine's `/` (the "image")
  with a private tmpfs as its writable layer; `/dev`, `/proc`, `/sys` are bound in. The image's
  own files are added to that layer (see Images). Each volumeMount is bind-mounted at exactly its
  mountPath (read-only where the manifest says so, and always for Secret, ConfigMap, projected and
  downward API volumes, as the kubelet does); mount points are created in the writable layer, so
  this machine's files are never touched. `readOnlyRootFilesystem: true` remounts that root
  read-only: the process can write only to its volumes, exactly as in a cluster (a write elsewhere
  fails with EROFS there and here).
- The user: `runAsUser` (container, then Pod) or the image's USER; a non-root user runs in a user
  namespace that maps it (`unshare --user --map-user`), so the process sees the manifest's uid and
  has no capabilities. `runAsNonRoot` is checked like the kubelet does (a uid 0 or an image that
  names its user without a number is refused). Root containers (privileged builds) run as root.
- Env: the image's ENV, then the kubelet's (`KUBERNETES_SERVICE_HOST`/`_PORT`, `HOSTNAME`), then
  the manifest's `env` in order: `value` with `$(VAR)` expanded from the variables before it
  (`$$` escapes), `fieldRef` from the downward API values below. `$(VAR)` in command and args is
  expanded the same way; a missing command is the image's ENTRYPOINT, as in Kubernetes.
- Downward API: metadata.name/namespace, spec.serviceAccountName, spec.nodeName (`node-1`),
  status.podIP/hostIP (`127.0.0.1`).

Volumes
- emptyDir: a fresh directory per Pod (mode 0777, shared by its containers; `medium: Memory` too).
- secret: the Secret the test created (`optional: true` and absent: an empty directory).
- configMap: the ConfigMaps of the manifests, and `kube-root-ca.crt` (the fake API server's CA).
- projected: serviceAccountToken -> a file holding a token the fake API server knows for the
  Pod's ServiceAccount with that audience (none: the API server's own audiences); configMap,
  secret and downwardAPI sources as above.
- The ServiceAccount token the kubelet automounts (unless the Pod or its ServiceAccount says
  `automountServiceAccountToken: false`) is such a projected volume at
  /var/run/secrets/kubernetes.io/serviceaccount (token, ca.crt, namespace) in every container, so
  `load_incluster_config()` runs unchanged.

Cluster
- The API server: the fake one (tests/fake_apiserver.py) behind TLS with a test CA, reached in every
  Pod at KUBERNETES_SERVICE_HOST=127.0.96.1, port 443 (the `kubernetes` Service), a bridge into the
  Pod's network namespace. It enforces RBAC (`authorize_callers`): the rules are the manifests'
  own Roles, ClusterRoles and bindings (and `system:auth-delegator`, which the sidecar example
  binds), so a missing permission makes the Pod fail as it would in a cluster.
- Services: `connector-proxy.connectors-system.svc[.cluster.local]` and the host-form names
  `c-<name>.<ns>.svc[.cluster.local]` (ExternalName Services pointing at it) resolve, through the
  container's /etc/hosts, to 127.0.96.10; its ports 80 and 3128 are bridged to the first ready
  replica's targetPorts. Before a replica is ready the address refuses connections, as a Service
  without endpoints does.
- The test world's registry and token server (conftest `world`, on this machine's loopback) are
  bridged into the proxy Pods at the same 127.0.0.1 ports; the seed's Connector and Secret are
  applied with their address and credentials replaced by those (README: "then edit the address
  and Secret").
- Secrets the README says to create: `connector-proxy-token-key` (key) and `connector-proxy-ca`
  (mitmproxy-ca.pem, a CA made here).
- Workloads come from `kubectl kustomize` of manifests/ and manifests/namespaced/ (without kubectl,
  manifests/ is read through its kustomization's resources, and the namespaced install is skipped).
- manifests/components/autoscaling starts nothing of its own and no autoscaler runs here (the fake
  API server serves neither apps/v1 nor autoscaling/v2): its HorizontalPodAutoscaler is checked
  against the build it is added to, whose Pods are the ones run here.
- A Deployment runs all its replicas; a Job's init containers run in order, each to exit 0, a
  native sidecar (`restartPolicy: Always`) is started and waited for with its startupProbe, then the
  containers run to exit 0, then the sidecar gets SIGTERM and must exit within the Pod's
  terminationGracePeriodSeconds. A Tekton TaskRun's steps are containers run in order:
  `$(workspaces.<name>.path)` is /workspace/<name> (a workspace volume mounted there), a `script`
  is written to a file and executed as Tekton does.

Images (what stands in for each, this machine's binaries in the container's root)
- The proxy image is read from the Containerfile (USER, ENV, WORKDIR, ENTRYPOINT, the COPY of the
  credential helper to /usr/local/bin); `connector-proxy` (what `pip install .` puts in
  /usr/local/bin) runs `python -m connector_store.cli` from this repository, `python` is the test
  venv's interpreter. Nothing of the manifest's arguments is changed.
- curlimages/curl: this machine's curl; /bin/sh and tar are BusyBox's (as in that alpine image) when
  busybox is installed, else this machine's (the image's user is named, not numbered).
- buildah/stable, skopeo/stable: this machine's buildah and skopeo, as root.
- moby/buildkit: buildctl-daemonless.sh and buildkitd are not installable here: that container is
  reported as a skip with that reason. Its environment (mounts, PATH, config.json, the credential
  helper under BusyBox's sh) is exercised by a stand-in that pushes with skopeo, which reads the
  same credHelpers; the stand-in also mounts the image it pushes at /stand-in.

What differs from the manifests, and only in these checks: the BuildKit stand-in above; the
namespaced install's negative check adds one `--namespace=team-a` (no RoleBinding) to show the
proxy is refused and never ready; the namespaced install runs one replica instead of two.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import kubernetes_validate
import pytest
import urllib3
import yaml

from conftest import REGISTRY_USER
from fake_apiserver import ROUTES, FakeApiServer
from localregistry import TestCA, make_oci_layout, skopeo

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "manifests"
PYTHON = sys.executable  # the test venv's interpreter: the proxy image's `python`
# This checkout, the venv and the interpreter it links to: bound into every container's root.
CODE_PATHS = sorted({os.path.realpath(p) for p in (REPO, sys.prefix, sys.base_prefix)})

API_IP = "127.0.96.1"       # KUBERNETES_SERVICE_HOST in every Pod
SERVICE_IP = "127.0.96.10"  # the connector-proxy Service and the c-<name> ExternalName Services
NODE = "node-1"
STD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
START_TIMEOUT = 60.0   # a proxy must be ready within this
RUN_TIMEOUT = 240.0    # an init container, build or step must exit within this
GROUP = "connectors.alauda.io"
K8S_VERSION = "1.30.0"  # the Kubernetes schemas the manifests are validated against (as tests/test_manifests.py)
PROXY_SA = "system:serviceaccount:connectors-system:connector-proxy"

# The built-in ClusterRoles the manifests bind (what a real cluster defines for them).
BUILTIN_CLUSTER_ROLES = {
    "system:auth-delegator": [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
        {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
    ],
}


def _requirements() -> str:
    if os.geteuid() != 0:
        return "needs root (mount, network and user namespaces, overlay mounts)"
    for tool in ("unshare", "nsenter", "mount", "ip", "curl", "tar", "skopeo"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = subprocess.run(["unshare", "--mount", "--net", "--user", "--map-user=65532", "--map-group=65532",
                            "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"namespaces are not available here: {probe.stderr.strip()}"
    return ""


pytestmark = pytest.mark.skipif(bool(_requirements()), reason=_requirements() or "ok")


# ============================================================================ manifests


def documents(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def kustomize(directory: Path) -> list[dict]:
    """`kubectl kustomize DIR`; without kubectl, the resources of kustomizations without patches."""
    if shutil.which("kubectl"):
        proc = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"kubectl kustomize {directory}: {proc.stderr}"
        return documents(proc.stdout)
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    if set(k) - {"apiVersion", "kind", "resources"}:
        pytest.skip(f"kubectl (kustomize) is not installed: {directory.relative_to(REPO)} needs more than resources")
    docs: list[dict] = []
    for resource in k["resources"]:
        path = directory / resource
        docs += kustomize(path) if path.is_dir() else documents(path.read_text())
    return docs


def example(name: str) -> list[dict]:
    return documents((MANIFESTS / "examples" / name).read_text())


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"].get("name") == name)]
    assert found, f"no {kind} {name or ''} in the manifests"
    return found[0]


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, `$$` is a literal `$`."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, value)


# ============================================================================ images


@dataclass
class Image:
    """What stands in for a container image: this machine's root plus `files`."""

    user: str = "0"                      # the image's USER as written (a name, or uid[:gid])
    uid: int = 0                         # the uid that name stands for
    env: dict[str, str] = field(default_factory=lambda: {"PATH": STD_PATH})
    entrypoint: list[str] = field(default_factory=list)
    workdir: str = "/"
    files: dict[str, tuple] = field(default_factory=dict)  # path -> ("copy", src) | ("text", content) | ("link", to)
    unavailable: str = ""                # why it cannot run here


def proxy_image() -> Image:
    """The image the Containerfile builds, read from the Containerfile itself."""
    image = Image(env={"PATH": STD_PATH})  # python:3.12-slim's PATH
    image.files["/usr/local/bin/connector-proxy"] = (  # what `pip install .` makes of [project.scripts]
        "text", f"#!/bin/sh\nexec {PYTHON} -m connector_store.cli \"$@\"\n")
    image.files["/usr/local/bin/python"] = ("text", f"#!/bin/sh\nexec {PYTHON} \"$@\"\n")
    for line in (REPO / "Containerfile").read_text().splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "USER":
            image.user = rest.strip()
            image.uid = int(image.user.split(":")[0])
        elif word == "ENV":
            key, _, value = rest.strip().partition("=")
            image.env[key] = value
        elif word == "WORKDIR":
            image.workdir = rest.strip()
        elif word == "ENTRYPOINT":
            image.entrypoint = json.loads(rest)
        elif word == "COPY":
            src, dest = rest.split()[-2:]
            if dest.startswith("/usr/local/bin/"):
                image.files[dest] = ("copy", REPO / src)
    return image


def alpine_sh() -> dict[str, tuple]:
    """Alpine-based images' /bin/sh and tar are BusyBox's: this machine's busybox, when installed."""
    busybox = shutil.which("busybox")
    return {"/bin/sh": ("link", busybox), "/bin/tar": ("link", busybox)} if busybox else {}


def image_for(ref: str) -> Image:
    repository = ref.rsplit(":", 1)[0] if ":" in ref.rsplit("/", 1)[-1] else ref
    if repository.endswith("/oci-connector-proxy") or repository == "oci-connector-proxy":
        return proxy_image()
    if repository.endswith("curlimages/curl"):
        return Image(user="curl_user", uid=100, env={"PATH": STD_PATH, "HOME": "/home/curl_user"},
                     entrypoint=["/entrypoint.sh"], files=alpine_sh())
    if repository.endswith(("buildah/stable", "skopeo/stable")):
        return Image()
    if repository.endswith("moby/buildkit"):
        return Image(unavailable="BuildKit (buildctl-daemonless.sh, buildkitd) is not installable here")
    raise AssertionError(f"no stand-in for the image {ref}: add one to image_for()")


# ============================================================================ network


def socket_in(netns: int | None) -> socket.socket:
    """A TCP socket in that network namespace (an fd of /proc/PID/ns/net), or in ours (None)."""
    if netns is None:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    out: dict = {}

    def create():  # setns changes only this (short-lived) thread's network namespace
        try:
            os.setns(netns, os.CLONE_NEWNET)
            out["sock"] = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            out["error"] = e

    t = threading.Thread(target=create)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["sock"]


Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class Network:
    """TCP bridges between Pods' network namespaces and this machine, on one asyncio thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(lambda loop, context: None)  # handshakes cut short: not ours
        self.thread = threading.Thread(target=self.loop.run_forever, name="pod-network", daemon=True)
        self.thread.start()
        self.servers: list[asyncio.Server] = []

    def call(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def listen(self, netns: int | None, host: str, port: int, connect: Connect,
               tls: ssl.SSLContext | None = None) -> tuple[asyncio.Server, int]:
        sock = socket_in(netns)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)

        async def handle(reader, writer):
            try:
                upstream = await asyncio.wait_for(connect(), 10)
            except (OSError, asyncio.TimeoutError):
                writer.close()
                return
            await splice(reader, writer, *upstream)

        server = self.call(asyncio.start_server(handle, sock=sock, ssl=tls))
        self.servers.append(server)
        return server, sock.getsockname()[1]

    def close(self, server: asyncio.Server) -> None:
        async def close():
            server.close()
        self.call(close())

    def stop(self) -> None:
        for server in self.servers:
            self.close(server)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def to_host(host: str, port: int) -> Connect:
    return lambda: asyncio.open_connection(host, port)


def to_netns(netns: int, host: str, port: int) -> Connect:
    async def connect():
        loop = asyncio.get_running_loop()
        sock = await loop.run_in_executor(None, socket_in, netns)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)
    return connect


async def splice(r1, w1, r2, w2) -> None:
    async def pump(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError, ConnectionError):
            pass
        finally:
            try:
                if writer.can_write_eof():
                    writer.write_eof()
                else:
                    writer.close()
            except (OSError, RuntimeError):
                pass

    await asyncio.gather(pump(r1, w2), pump(r2, w1))
    for w in (w1, w2):
        w.close()


# ============================================================================ Pods


class ContainerFailed(AssertionError):
    pass


class Container:
    """One container process (see the module docstring for what it is made of)."""

    def __init__(self, pod: Pod, spec: dict, *, argv: list[str] | None = None, label: str = "",
                 extra_mounts: tuple[tuple[Path, str], ...] = (), image: Image | None = None):
        self.pod, self.spec = pod, spec
        self.name = spec["name"] + (f"-{label}" if label else "")
        self.image = image or image_for(spec["image"])
        if self.image.unavailable:
            pytest.skip(f"container {spec['name']} ({spec['image']}): {self.image.unavailable}")
        self.dir = pod.dir / "containers" / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "output.log"
        self.env = self._env()
        self.argv = argv or self._argv()
        self.extra_mounts = extra_mounts
        self.proc: subprocess.Popen | None = None

    # ---- what the kubelet would compute
    def _env(self) -> dict[str, str]:
        env = dict(self.image.env)
        env.update(HOSTNAME=self.pod.name, KUBERNETES_SERVICE_HOST=API_IP, KUBERNETES_SERVICE_PORT="443",
                   KUBERNETES_SERVICE_PORT_HTTPS="443")
        for e in self.spec.get("env") or []:
            if "value" in e:
                env[e["name"]] = expand(str(e["value"]), env)
            elif "fieldRef" in (e.get("valueFrom") or {}):
                env[e["name"]] = self.pod.field(e["valueFrom"]["fieldRef"]["fieldPath"])
            else:
                raise AssertionError(f"env {e['name']}: only value and fieldRef are emulated")
        return env

    def _argv(self) -> list[str]:
        command = self.spec.get("command") or self.image.entrypoint
        args = self.spec.get("args") or []
        argv = [expand(a, self.env) for a in [*command, *args]]
        assert argv, f"container {self.name} has no command"
        return argv

    def _security(self) -> tuple[int, int, bool, bool]:
        pod_sc = self.pod.spec.get("securityContext") or {}
        sc = self.spec.get("securityContext") or {}
        privileged = bool(sc.get("privileged"))
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        gid = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
        image_user, _, image_group = self.image.user.partition(":")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            if uid is None and not image_user.isdigit():
                raise ContainerFailed(f"{self.name}: container has runAsNonRoot and image has non-numeric user "
                                      f"({image_user}), cannot verify user is non-root (the kubelet's refusal)")
            if (uid if uid is not None else int(image_user)) == 0:
                raise ContainerFailed(f"{self.name}: container has runAsNonRoot and image will run as root")
        if uid is None:
            uid = self.image.uid
        if gid is None:
            gid = int(image_group) if image_group.isdigit() else uid
        return int(uid), int(gid), privileged, bool(sc.get("readOnlyRootFilesystem"))

    def mounts(self) -> list[tuple[Path, str, bool]]:
        out = []
        for m in self.spec.get("volumeMounts") or []:
            source, always_ro = self.pod.volumes[m["name"]]
            out.append((source, m["mountPath"], bool(m.get("readOnly")) or always_ro))
        if self.pod.automount and not any(mp == SA_MOUNT for _, mp, _ in out):
            out.append((self.pod.automount, SA_MOUNT, True))
        out += [(src, mp, True) for src, mp in self.extra_mounts]
        return out

    # ---- running it
    def script(self) -> str:
        uid, gid, privileged, read_only = self._security()
        q = shlex.quote
        lines = [
            "set -eu",
            'CTR_PATH="${PATH:-}"',
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            f"L={q(str(self.dir / 'layer'))}", f"R={q(str(self.dir / 'root'))}",
            'mkdir -p "$L" "$R"',
            'mount -t tmpfs -o mode=0755 layer "$L"',
            'mkdir "$L/upper" "$L/work"',
            'mount -t overlay overlay -o "lowerdir=/,upperdir=$L/upper,workdir=$L/work" "$R"',
            'for d in dev proc sys; do mount --rbind "/$d" "$R/$d"; done',
        ]
        for path, (how, what) in self.image.files.items():
            # the file itself is replaced (not what a symlink there points to); its directory is
            # resolved as in the container (/bin -> /usr/bin)
            target = "$R" + q(os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path)))
            lines.append(f"mkdir -p $(dirname {target}) && rm -f {target}")
            if how == "copy":
                lines.append(f"cp {q(str(what))} {target} && chmod 0755 {target}")
            elif how == "link":
                lines.append(f"ln -s {q(str(what))} {target}")
            else:
                staged = self.dir / ("file-" + hashlib.sha256(path.encode()).hexdigest()[:12])
                staged.write_text(what)
                lines.append(f"cp {q(str(staged))} {target} && chmod 0755 {target}")
        hosts = "$R" + q(os.path.realpath("/etc/hosts"))
        lines.append(f"rm -f {hosts} && cp {q(str(self.pod.hosts_file))} {hosts}")
        for source, mount_path, ro in self.mounts():
            # resolved against this machine's root, which is the container's lower layer: a symlink
            # on the way (/var/run -> /run) leads where it leads in the container
            target = "$R" + q(os.path.realpath(mount_path))
            kind = "-d" if source.is_dir() else "-f"
            lines.append(f"[ -e {target} ] || {{ mkdir -p $(dirname {target}); "
                         + ("mkdir " if source.is_dir() else "touch ") + f"{target}; }}")
            lines.append(f"[ {kind} {target} ]")
            lines.append(f"mount --bind {q(str(source))} {target}")
            if ro:
                lines.append(f"mount -o remount,bind,ro {target}")
        for code in CODE_PATHS:
            # What stands in for the image's installed code (this checkout, the test venv and its
            # interpreter) stays visible even where a volume covers its path (an emptyDir on /tmp
            # hides a checkout under /tmp, as CI's may be).
            target = "$R" + q(code)
            lines += [f"mkdir -p {target}", f"mount --bind {q(code)} {target}", f"mount -o remount,bind,ro {target}"]
        workdir = self.spec.get("workingDir") or self.image.workdir
        lines.append("mkdir -p \"$R\"" + q(os.path.realpath(workdir)))  # the image's WORKDIR exists
        if read_only and not privileged:
            lines.append('mount -o remount,ro "$R"')
        lines += ['PATH="$CTR_PATH"', "export PATH"]
        userns = f"--user --map-user={uid} --map-group={gid} " if uid != 0 else ""
        lines.append(f'exec /usr/bin/unshare {userns}--root="$R" --wd={q(workdir)} -- "$@"')
        return "\n".join(lines) + "\n"

    def start(self) -> Container:
        script = self.dir / "setup.sh"
        script.write_text(self.script())
        log = self.log_path.open("ab")
        cmd = ["/usr/bin/nsenter", f"--net=/proc/{self.pod.holder.pid}/ns/net", "--",
               "/usr/bin/unshare", "--mount", "--propagation", "private", "--",
               "/bin/sh", str(script), *self.argv]
        self.proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.pod.containers.append(self)
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ContainerFailed(f"{self.name} did not finish in {timeout} s:\n{self.output()[-4000:]}") from None

    def run(self, timeout: float = RUN_TIMEOUT) -> Container:
        """Start it and require exit 0 (an init container, a build, a step)."""
        rc = self.start().wait(timeout)
        if rc != 0:
            raise ContainerFailed(f"{self.name} ({' '.join(self.argv)[:300]}) exited {rc}:\n{self.output()[-4000:]}")
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> int | None:
        """SIGTERM, then what the kubelet does after terminationGracePeriodSeconds."""
        if not self.running():
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        grace = self.pod.spec.get("terminationGracePeriodSeconds", 30)
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ContainerFailed(f"{self.name} ignored SIGTERM for {grace} s (terminationGracePeriodSeconds)") from None

    def kill(self) -> None:
        if self.running():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class Pod:
    """A Pod of `spec`: its network namespace, its volumes, its containers (module docstring)."""

    def __init__(self, cluster: Cluster, name: str, namespace: str, spec: dict, workdir: Path, *,
                 backs_service: bool = False):
        self.cluster, self.name, self.namespace, self.spec = cluster, name, namespace, spec
        # A Pod behind the Service does not get its address: here that address is local (loopback),
        # and it would hold the ports the Pod listens on (0.0.0.0:3128).
        self.backs_service = backs_service
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.service_account = spec.get("serviceAccountName") or "default"
        self.containers: list[Container] = []
        self.holder = subprocess.Popen(
            ["unshare", "--net", "--", "/bin/sh", "-c", "ip link set lo up && echo up && exec sleep 86400"],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        assert self.holder.stdout.readline().strip() == "up", "network namespace not set up"
        self.netns = os.open(f"/proc/{self.holder.pid}/ns/net", os.O_RDONLY)
        self.hosts_file = self.dir / "hosts"
        names = " ".join(cluster.service_names)
        self.hosts_file.write_text(Path("/etc/hosts").read_text().rstrip("\n")
                                   + f"\n127.0.0.1 {name}\n{SERVICE_IP} {names}\n")
        # what every Pod reaches: the API server, the connector-proxy Service
        cluster.network.listen(self.netns, API_IP, 443, to_host("127.0.0.1", cluster.api.port), cluster.api_tls)
        self.service_servers: list[asyncio.Server] = []
        cluster.pods.append(self)
        if cluster.endpoint is not None:
            self.connect_service()
        self.volumes: dict[str, tuple[Path, bool]] = {}
        for volume in spec.get("volumes") or []:
            self.volumes[volume["name"]] = self._materialise(volume)
        sa = cluster.service_accounts.get((namespace, self.service_account), {})
        automount = spec.get("automountServiceAccountToken", sa.get("automountServiceAccountToken", True))
        self.automount: Path | None = None
        if automount:
            self.automount = self._projected("kube-api-access-automount", [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
            ])

    def field(self, path: str) -> str:
        values = {"metadata.name": self.name, "metadata.namespace": self.namespace,
                  "spec.serviceAccountName": self.service_account, "spec.nodeName": NODE,
                  "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1"}
        assert path in values, f"downward API field {path} is not emulated"
        return values[path]

    def connect_service(self) -> None:
        """The connector-proxy Service's ports in this Pod's network, to the current endpoint."""
        if self.backs_service or self.service_servers:
            return
        for port, target in self.cluster.service_ports:
            server, _ = self.cluster.network.listen(self.netns, SERVICE_IP, port,
                                                    lambda target=target: self.cluster.endpoint(target))
            self.service_servers.append(server)

    # ---- volumes
    def _materialise(self, volume: dict) -> tuple[Path, bool]:
        name = volume["name"]
        if "emptyDir" in volume:
            path = self.dir / "volumes" / name
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o777)
            return path, False
        if "secret" in volume:
            s = volume["secret"]
            data = self.cluster.secret_data(self.namespace, s["secretName"], s.get("optional", False))
            return self._files(name, data, s.get("items")), True
        if "configMap" in volume:
            c = volume["configMap"]
            return self._files(name, self.cluster.configmap(self.namespace, c["name"]), c.get("items")), True
        if "projected" in volume:
            return self._projected(name, volume["projected"]["sources"]), True
        raise AssertionError(f"volume {name}: {sorted(volume)} is not emulated")

    def _files(self, name: str, data: dict[str, bytes], items: list | None = None) -> Path:
        path = self.dir / "volumes" / name
        path.mkdir(parents=True, exist_ok=True)
        chosen = {i["path"]: data[i["key"]] for i in items} if items else data
        for key, content in chosen.items():
            (path / key).parent.mkdir(parents=True, exist_ok=True)
            (path / key).write_bytes(content)
            (path / key).chmod(0o644)
        return path

    def _projected(self, name: str, sources: list[dict]) -> Path:
        data: dict[str, bytes] = {}
        for source in sources:
            if "serviceAccountToken" in source:
                t = source["serviceAccountToken"]
                audience = t.get("audience")
                token = self.cluster.api.add_service_account_token(
                    self.namespace, self.service_account, audiences=[audience] if audience else None)
                self.cluster.tokens.append(token)
                data[t["path"]] = token.encode()
            elif "configMap" in source:
                c = source["configMap"]
                cm = self.cluster.configmap(self.namespace, c["name"])
                data.update({i["path"]: cm[i["key"]] for i in c["items"]} if c.get("items") else cm)
            elif "secret" in source:
                s = source["secret"]
                sd = self.cluster.secret_data(self.namespace, s["name"], s.get("optional", False))
                data.update({i["path"]: sd[i["key"]] for i in s["items"]} if s.get("items") else sd)
            elif "downwardAPI" in source:
                for item in source["downwardAPI"]["items"]:
                    data[item["path"]] = self.field(item["fieldRef"]["fieldPath"]).encode()
            else:
                raise AssertionError(f"projected source {sorted(source)} is not emulated")
        return self._files(name, data)

    def token(self, volume: str, path: str = "token") -> str:
        return (self.volumes[volume][0] / path).read_text()

    # ---- containers
    def container(self, spec: dict, **kw) -> Container:
        return Container(self, spec, **kw)

    def exec_probe(self, spec: dict, probe: dict) -> bool:
        """An exec probe: its command with the container's image, env and mounts, in this Pod."""
        c = Container(self, spec, argv=[expand(a, {}) for a in probe["exec"]["command"]],
                      label=f"probe{len(self.containers)}")
        return c.start().wait(60) == 0

    def stop(self) -> None:
        if self.netns < 0:
            return
        for c in self.containers:
            c.kill()
        for server in self.service_servers:
            self.cluster.network.close(server)
        self.holder.kill()
        self.holder.wait(10)
        os.close(self.netns)
        self.netns = -1


# ============================================================================ the cluster


def rbac_rules(docs: list[dict]) -> list[dict]:
    """The bindings' rules as fake_apiserver allow() arguments (user, verb, group, resource, namespace,
    name, subresource), as RBAC grants them."""
    roles = {("ClusterRole", None, name): rules for name, rules in BUILTIN_CLUSTER_ROLES.items()}
    for d in docs:
        if d.get("kind") in ("Role", "ClusterRole"):
            ns = d["metadata"].get("namespace") if d["kind"] == "Role" else None
            roles[(d["kind"], ns, d["metadata"]["name"])] = d.get("rules") or []
    out = []
    for d in docs:
        if d.get("kind") not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        ns = d["metadata"].get("namespace", "default") if d["kind"] == "RoleBinding" else None
        ref = d["roleRef"]
        key = (ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"])
        assert key in roles, f"{d['kind']} {d['metadata']['name']} refers to a missing {ref['kind']} {ref['name']}"
        for subject in d["subjects"]:
            if subject["kind"] == "ServiceAccount":
                user = f"system:serviceaccount:{subject.get('namespace') or ns}:{subject['name']}"
            elif subject["kind"] == "Group":
                user = f"group:{subject['name']}"
            else:
                user = subject["name"]
            for rule in roles[key]:
                for group in rule.get("apiGroups", []):
                    for resource in rule.get("resources", []):
                        res, _, sub = resource.partition("/")
                        if res == "*":
                            sub = "*"
                        for verb in rule["verbs"]:
                            for name in rule.get("resourceNames") or ["*"]:
                                out.append(dict(user=user, verb=verb, group=group, resource=res,
                                                namespace=ns or "*", name=name, subresource=sub))
    return out


def api_calls(api: FakeApiServer, user: str) -> list[tuple[str, str, str, int | None]]:
    """(verb, group, resource[/sub], status) of every request `user` made, as RBAC names them."""
    calls = []
    for r in api.request_log:
        if r.user != user:
            continue
        for pattern, handler in ROUTES:
            m = pattern.fullmatch(r.path)
            if m and handler == "resource":
                g = m.groupdict()
                resource = g["resource"] + (f"/{g['sub']}" if g.get("sub") else "")
                if g.get("name") is None:
                    verb = {"GET": "watch" if r.watch else "list", "POST": "create",
                            "DELETE": "deletecollection"}[r.method]
                else:
                    verb = {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[r.method]
                calls.append((verb, g.get("group") or "", resource, r.status))
                break
    return calls


def granted(docs: list[dict], user: str) -> set[tuple[str, str, str]]:
    return {(r["verb"], r["group"], r["resource"] + (f"/{r['subresource']}" if r["subresource"] else ""))
            for r in rbac_rules(docs) if r["user"] == user}


class Cluster:
    """The fake API server behind TLS, the Services, the Secrets and ConfigMaps, the Pods."""

    def __init__(self, world, workdir: Path, docs: list[dict]):
        self.world, self.dir, self.docs = world, workdir, docs
        self.network = Network()
        self.pods: list[Pod] = []
        self.tokens: list[str] = []
        self.api = FakeApiServer().start()
        self.api.authorize_callers = True
        for rule in rbac_rules(docs):
            self.api.allow(**rule)
        ca = TestCA(workdir / "api-ca", key_type="ec")
        cert, key = ca.issue(["kubernetes.default.svc", "kubernetes.default.svc.cluster.local"],
                             workdir / "api-tls", ip_addresses=(API_IP,))
        self.api_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.api_tls.load_cert_chain(cert, key)
        self.configmaps = {("*", "kube-root-ca.crt"): {"ca.crt": ca.cert_pem}}
        for d in docs:
            if d.get("kind") == "ConfigMap":
                self.configmaps[(d["metadata"].get("namespace", "default"), d["metadata"]["name"])] = {
                    k: v.encode() for k, v in (d.get("data") or {}).items()}
        self.service_accounts = {(d["metadata"].get("namespace", "default"), d["metadata"]["name"]): d
                                 for d in docs if d.get("kind") == "ServiceAccount"}
        self.secrets: dict[tuple[str, str], dict[str, bytes]] = {}
        self.service_names: list[str] = []
        self.service_ports: list[tuple[int, int]] = []
        self.endpoint: Callable | None = None
        self.forward_ca_pem = b""

    # ---- objects
    def add_secret(self, namespace: str, name: str, data: dict[str, bytes], type: str = "Opaque") -> None:
        self.secrets[(namespace, name)] = data
        self.api.put_object({"apiVersion": "v1", "kind": "Secret", "type": type,
                             "metadata": {"name": name, "namespace": namespace},
                             "data": {k: base64.b64encode(v).decode() for k, v in data.items()}})

    def secret_data(self, namespace: str, name: str, optional: bool) -> dict[str, bytes]:
        if (namespace, name) not in self.secrets:
            assert optional, f"Secret {namespace}/{name} does not exist (the Pod would not start)"
            return {}
        return self.secrets[(namespace, name)]

    def configmap(self, namespace: str, name: str) -> dict[str, bytes]:
        found = self.configmaps.get((namespace, name)) or self.configmaps.get(("*", name))
        assert found is not None, f"ConfigMap {namespace}/{name} does not exist (the Pod would not start)"
        return found

    def apply_seed(self, namespace: str = "default", name: str = "harbor") -> None:
        """The seed's Connector and Secret, address and credentials edited to the test registry."""
        seed = example("seed/harbor.yaml")
        connector = find(seed, "Connector")
        connector["metadata"]["name"] = name
        connector["metadata"]["namespace"] = namespace
        connector["spec"]["address"] = self.world.registry.url
        secret = find(seed, "Secret")
        self.api.put_object(connector)
        self.add_secret(namespace, secret["metadata"]["name"],
                        {"username": REGISTRY_USER.encode(), "password": self.world.registry_password.encode()},
                        type=secret["type"])

    def expose_world(self, pod: Pod) -> None:
        """The test registry and its token server at their 127.0.0.1 ports inside the Pod."""
        for port in (self.world.registry.port, self.world.token_server.port):
            self.network.listen(pod.netns, "127.0.0.1", port, to_host("127.0.0.1", port))

    # ---- the connector-proxy Service
    def define_service(self, service: dict, connectors: list[tuple[str, str]]) -> None:
        ns, name = service["metadata"]["namespace"], service["metadata"]["name"]
        self.service_names = [f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]
        for cns, cname in connectors:  # the c-<name> ExternalName Services point here
            self.service_names += [f"c-{cname}.{cns}.svc", f"c-{cname}.{cns}.svc.cluster.local"]
        self.service_ports = [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]]

    def set_endpoint(self, pod: Pod, container_ports: dict[str, int]) -> None:
        """Ready: the Service's ports now lead to this Pod (named targetPorts resolved)."""
        def endpoint(target):
            port = container_ports[target] if isinstance(target, str) else target
            return to_netns(pod.netns, "127.0.0.1", port)()
        self.endpoint = endpoint
        for p in self.pods:
            p.connect_service()

    def stop(self) -> None:
        for pod in self.pods:
            pod.stop()
        self.network.stop()
        self.api.stop()


# ============================================================================ the proxy Deployment


@dataclass
class Replica:
    pod: Pod
    container: Container
    port: int  # this machine's port that leads to the Pod's http port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


HTTP = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=60))


def http(method: str, url: str, **kw) -> urllib3.BaseHTTPResponse:
    return HTTP.request(method, url, redirect=False, **kw)


def basic(token: str, user: str = "build") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()}


def deploy(cluster: Cluster, docs: list[dict], workdir: Path) -> list[Replica]:
    """Every replica of the Deployment, each to /readyz 200 within START_TIMEOUT."""
    deployment = find(docs, "Deployment", "connector-proxy")
    cluster.define_service(find(docs, "Service", "connector-proxy"), [("default", "harbor")])
    replicas = [start_replica(cluster, deployment, workdir, f"connector-proxy-7d9f-{i}")
                for i in range(deployment["spec"].get("replicas", 1))]
    for r in replicas:
        probe = r.container.spec["readinessProbe"]["httpGet"]
        wait_http_ok(r, probe["path"])
        if cluster.endpoint is None:
            cluster.set_endpoint(r.pod, {p["name"]: p["containerPort"] for p in r.container.spec["ports"]})
    return replicas


def start_replica(cluster: Cluster, deployment: dict, workdir: Path, name: str) -> Replica:
    template = deployment["spec"]["template"]["spec"]
    pod = Pod(cluster, name, deployment["metadata"]["namespace"], template, workdir, backs_service=True)
    cluster.expose_world(pod)
    [spec] = template["containers"]
    ports = {p["name"]: p["containerPort"] for p in spec.get("ports") or []}
    _, host_port = cluster.network.listen(None, "127.0.0.1", 0, to_netns(pod.netns, "127.0.0.1", ports["http"]))
    return Replica(pod, pod.container(spec).start(), host_port)


def wait_http_ok(replica: Replica, path: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    status = None
    while True:
        if not replica.container.running():
            raise ContainerFailed(f"{replica.pod.name} exited with {replica.container.proc.returncode} before "
                                  f"{path} answered 200:\n{replica.container.output()[-4000:]}")
        try:
            status = http("GET", replica.url + path, timeout=2).status
            if status == 200:
                return
        except urllib3.exceptions.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise ContainerFailed(f"{replica.pod.name}: {path} not 200 after {timeout} s (last: {status}):\n"
                                  f"{replica.container.output()[-4000:]}")
        time.sleep(0.2)  # readiness polling, bounded by the deadline


# ============================================================================ fixtures


@pytest.fixture(scope="module")
def cluster_docs() -> list[dict]:
    docs = kustomize(MANIFESTS)
    for name in ("workload-rbac.yaml", "buildkit-job.yaml", "buildah-job.yaml", "sidecar.yaml"):
        docs += example(name)
    return docs


@pytest.fixture(scope="module")
def cluster(world, tmp_path_factory, cluster_docs):
    c = Cluster(world, tmp_path_factory.mktemp("cluster"), cluster_docs)
    install_secrets(c)
    c.apply_seed()
    # a c-harbor Service someone edited: the status writer must read it back and correct it
    c.api.put_object({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "c-harbor", "namespace": "default"},
                      "spec": {"type": "ExternalName", "externalName": "elsewhere.example.com"}})
    seed_registry(world, c.dir)
    yield c
    c.stop()


def install_secrets(c: Cluster, forward_ca: bool = True) -> None:
    """What README "Installing into a cluster" says to create, and (optional) the forward proxy's CA."""
    c.api.put_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "connectors-system"}})
    c.add_secret("connectors-system", "connector-proxy-token-key", {"key": base64.b64encode(os.urandom(48))})
    if not forward_ca:
        return
    ca = TestCA(c.dir / "forward-ca")
    key_pem = ca.write_key(c.dir / "forward-ca-key.pem").read_bytes()
    c.forward_ca_pem = ca.cert_pem
    c.add_secret("connectors-system", "connector-proxy-ca", {"mitmproxy-ca.pem": key_pem + ca.cert_pem})


def seed_registry(world, tmp: Path) -> None:
    """The image the sidecar example mirrors (the seed Connector's check repository)."""
    image = make_oci_layout(tmp / "busybox", [4_000], tag="latest", labels={"seeded": "yes"})
    skopeo.copy(image.ref, f"docker://{world.registry.host}/testing/busybox:latest",
                dest_creds=f"{REGISTRY_USER}:{world.registry_password}", tls_verify=False)


@pytest.fixture(scope="module")
def deployment(cluster, cluster_docs) -> list[Replica]:
    replicas = deploy(cluster, cluster_docs, cluster.dir / "pods")
    yield replicas
    for r in replicas:
        r.container.terminate()


def registry_digest(world, ref: str) -> str:
    return skopeo.inspect(f"docker://{world.registry.host}/{ref}",
                          creds=f"{REGISTRY_USER}:{world.registry_password}", tls_verify=False)["Digest"]


def job_pod(cluster: Cluster, job: dict, workdir: Path) -> Pod:
    pod = Pod(cluster, f"{job['metadata']['name']}-x7k2p", job["metadata"].get("namespace", "default"),
              job["spec"]["template"]["spec"], workdir)
    return pod


# ============================================================================ the Deployment


def test_deployment_args_start_and_become_ready(deployment):
    """Both replicas, started from the manifest's args (the in-cluster configuration, the CA
    Secret, the token key Secret, POD_NAMESPACE), answer /readyz and /healthz on their http port."""
    assert len(deployment) == 2
    for r in deployment:
        liveness = r.container.spec["livenessProbe"]["httpGet"]["path"]
        assert http("GET", r.url + liveness).status == 200
        assert "--set=confdir" not in " ".join(r.container.argv), "--set=confdir would replace the --ca-dir CA"


def test_deployment_writes_only_to_its_volumes(deployment):
    """readOnlyRootFilesystem: the root was read-only, and what the proxy wrote is under /tmp."""
    for r in deployment:
        assert (r.container.spec["securityContext"] or {}).get("readOnlyRootFilesystem") is True
        assert "mount -o remount,ro \"$R\"" in (r.container.dir / "setup.sh").read_text()
        tmp = r.pod.volumes["tmp"][0]
        assert any(tmp.rglob("*")), "the proxy wrote nothing to /tmp (HOME): where did mitmproxy put its files?"


def test_forward_proxy_ca_is_the_secret_one(cluster, deployment):
    """--ca-dir=/etc/connector-proxy/ca (a read-only Secret) is the CA the forward proxy presents:
    every replica serves the same ca.crt, the Secret's certificate."""
    workload = cluster.api.add_service_account_token("default", "builder", audiences=["connector-proxy"])
    for r in deployment:
        resp = http("GET", r.url + "/.connectors/config?use=default/harbor&names=ca.crt&format=json",
                    headers=basic(workload))
        assert resp.status == 200, resp.data[:500]
        ca = json.loads(resp.data)["files"]["ca.crt"]
        assert ca.strip() == cluster.forward_ca_pem.decode().strip()


def test_replicas_accept_each_others_proxy_tokens(cluster, deployment):
    """The token key Secret is shared: a proxy token issued by one replica works on the other."""
    workload = cluster.api.add_service_account_token("default", "builder", audiences=["connector-proxy"])
    first, second = deployment
    path = "/v2/namespaces/default/connectors/harbor/testing/busybox/tags/list"
    challenge = http("GET", first.url + path).headers["WWW-Authenticate"]
    params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    realm = re.sub(r"^https?://[^/]+", "", params["realm"])
    token_resp = http("GET", first.url + realm, fields={"service": params["service"], "scope": params["scope"]},
                      headers=basic(workload))
    assert token_resp.status == 200, token_resp.data[:300]
    proxy_token = json.loads(token_resp.data)["token"]
    resp = http("GET", second.url + path, headers={"Authorization": f"Bearer {proxy_token}"})
    assert resp.status == 200, resp.data[:300]
    assert "latest" in json.loads(resp.data)["tags"]


def wait_status_written(cluster: Cluster) -> dict:
    deadline = time.monotonic() + 30
    while True:
        connector = cluster.api.get_object(f"{GROUP}/v1alpha1", "connectors", "default", "harbor") or {}
        ready = {c["type"]: c for c in (connector.get("status") or {}).get("conditions", [])}.get("Ready", {})
        service = cluster.api.get_object("v1", "services", "default", "c-harbor") or {}
        if ready.get("status") == "True" and service["spec"].get("externalName", "").startswith("connector-proxy."):
            break
        assert time.monotonic() < deadline, f"status not written: {ready} {service.get('spec')}"
        time.sleep(0.2)  # polling the status writer, bounded by the deadline
    return connector


def test_status_writer_runs_with_its_rbac(cluster, deployment):
    """The status writer (one replica, through the Lease) writes Ready and the address, and corrects
    the edited c-harbor Service: with the manifests' RBAC only."""
    connector = wait_status_written(cluster)
    url = connector["status"]["proxy"]["httpAddress"]["url"]
    assert url == "http://c-harbor.default.svc.cluster.local/namespaces/default/connectors/harbor"
    lease = cluster.api.get_object("coordination.k8s.io/v1", "leases", "connectors-system", "connector-proxy-status")
    assert lease and lease["spec"]["holderIdentity"]


def test_proxy_rbac_is_exactly_what_it_uses(cluster, cluster_docs, deployment):
    """Every API call the proxy made was allowed (no 403), and every verb the manifests grant its
    ServiceAccount was used: the RBAC is sufficient and holds nothing more."""
    wait_status_written(cluster)
    workload = cluster.api.add_service_account_token("default", "builder", audiences=["connector-proxy"])
    path = "/v2/namespaces/default/connectors/harbor/testing/busybox/tags/list"
    assert http("GET", deployment[0].url + path, headers=basic(workload)).status == 200  # TokenReview, SAR
    deadline = time.monotonic() + 10
    grants = granted(cluster_docs, PROXY_SA)
    while True:  # the Lease is renewed (update) every second by the holder
        calls = api_calls(cluster.api, PROXY_SA)
        used = {(verb, group, resource) for verb, group, resource, _ in calls}
        if used >= grants or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # polling the request log, bounded by the deadline
    refused = [c for c in calls if c[3] == 403]
    assert not refused, f"the proxy was refused: {refused}"
    assert used == grants, f"granted but unused: {sorted(grants - used)}; used but not granted: {sorted(used - grants)}"


# ============================================================================ the examples' Jobs


def test_buildkit_job_init_containers_retry_until_the_proxy_answers(cluster, deployment, tmp_path, world):
    """The BuildKit Job's init containers as written: the helper is copied, the curl step retries
    while the Service refuses connections and succeeds once it answers, and nothing but the helper
    name (no token) is left in the volumes. Then the build container's environment pushes through
    the host-form address with the credential helper (skopeo standing in for buildctl)."""
    job = find(example("buildkit-job.yaml"), "Job")
    spec = job["spec"]["template"]["spec"]
    endpoint, cluster.endpoint = cluster.endpoint, None  # the Service has no ready endpoint yet
    pod = job_pod(cluster, job, tmp_path)
    assert not pod.service_servers
    helper, config = [pod.container(c) for c in spec["initContainers"]]
    helper.run()
    config.start()
    time.sleep(3)  # curl is refused meanwhile and retries (--retry-connrefused)
    assert config.running(), f"the init container gave up while the proxy was starting:\n{config.output()}"
    cluster.endpoint = endpoint
    pod.connect_service()
    assert config.wait() == 0, config.output()

    bin_dir = pod.volumes["connector-bin"][0]
    assert os.access(bin_dir / "docker-credential-connector-proxy", os.X_OK)
    toml = (pod.volumes["buildkitd-config"][0] / "buildkitd.toml").read_text()
    assert '[registry."c-harbor.default.svc.cluster.local"]' in toml and "http = true" in toml
    docker_config = json.loads((pod.volumes["docker-config"][0] / "config.json").read_text())
    assert docker_config == {"credHelpers": {"c-harbor.default.svc.cluster.local": "connector-proxy"}}
    token = pod.token("proxy-token")
    for volume in ("docker-config", "buildkitd-config", "connector-bin"):
        for f in pod.volumes[volume][0].rglob("*"):
            assert not f.is_file() or token.encode() not in f.read_bytes(), f"{f.name} holds the token"

    [build] = spec["containers"]
    output = next(a for a in build["args"][0].split() if a.startswith("type=image,name="))
    target = output.split("name=")[1].split(",")[0]
    image = make_oci_layout(tmp_path / "stand-in", [3_000], tag="v1", labels={"built-by": "buildkit-stand-in"})
    # the build container's env, mounts and PATH, its alpine /bin/sh (the helper's shell), skopeo
    # for buildctl, and the image to push mounted at /stand-in
    pod.container(build, label="stand-in", image=Image(files=alpine_sh()),
                  extra_mounts=((tmp_path / "stand-in", "/stand-in"),), argv=[
        "skopeo", "copy", "--authfile", "/root/.docker/config.json", "--dest-tls-verify=false",
        "oci:/stand-in:v1", f"docker://{target}"]).run()
    assert registry_digest(world, target.split("/", 1)[1]) == image.manifest_digest
    pod.stop()


def test_buildkit_job_build_container(cluster):
    """The buildctl build itself."""
    job = find(example("buildkit-job.yaml"), "Job")
    [build] = job["spec"]["template"]["spec"]["containers"]
    pytest.skip(f"{build['image']}: {image_for(build['image']).unavailable}; its init containers and its "
                "credentials are exercised by test_buildkit_job_init_containers_retry_until_the_proxy_answers")


@pytest.mark.skipif(shutil.which("buildah") is None, reason="buildah is not installed")
def test_buildah_job_builds_and_pushes(cluster, deployment, tmp_path, world):
    """The buildah Job as written: the init container, then buildah bud + push through the Service
    to the host-form address, credentials from the helper."""
    job = find(example("buildah-job.yaml"), "Job")
    spec = job["spec"]["template"]["spec"]
    pod = job_pod(cluster, job, tmp_path)
    for init in spec["initContainers"]:
        pod.container(init).run()
    [build] = spec["containers"]
    pod.container(build).run()
    assert registry_digest(world, "test/buildah:v1").startswith("sha256:")
    pod.stop()


def tekton_pod(cluster: Cluster, taskrun: dict, workdir: Path) -> tuple[Pod, list[dict]]:
    """The Pod Tekton makes of a TaskRun: steps as containers, workspaces at /workspace/<name>."""
    spec = taskrun["spec"]
    volumes = list((spec.get("podTemplate") or {}).get("volumes") or [])
    mounts = []
    for ws in spec.get("workspaces") or []:
        volumes.append({k: v for k, v in ws.items()})
        mounts.append({"name": ws["name"], "mountPath": f"/workspace/{ws['name']}"})
    volumes.append({"name": "tekton-scripts", "emptyDir": {}})
    pod_spec = {"serviceAccountName": spec.get("serviceAccountName"), "volumes": volumes}
    pod = Pod(cluster, taskrun["metadata"]["generateName"] + "pod", taskrun["metadata"]["namespace"], pod_spec, workdir)
    scripts = pod.volumes["tekton-scripts"][0]

    def substitute(text: str) -> str:
        return re.sub(r"\$\(workspaces\.([a-z0-9-]+)\.path\)", r"/workspace/\1", text)

    steps = []
    for i, step in enumerate(spec["taskSpec"]["steps"]):
        container = {k: v for k, v in step.items() if k != "script"}
        container["volumeMounts"] = [*(step.get("volumeMounts") or []), *mounts,
                                     {"name": "tekton-scripts", "mountPath": "/tekton/scripts", "readOnly": True}]
        if "script" in step:
            path = scripts / f"script-{i}"
            path.write_text(substitute(step["script"]))
            path.chmod(0o755)
            container["command"] = [f"/tekton/scripts/script-{i}"]
        steps.append(container)
    return pod, steps


@pytest.mark.skipif(shutil.which("buildah") is None, reason="buildah is not installed")
def test_tekton_taskrun_steps_run(cluster, deployment, tmp_path, world):
    """The TaskRun's steps as written, in order, each to exit 0; the image lands in the registry."""
    taskrun = find(example("tekton-taskrun.yaml"), "TaskRun")
    pod, steps = tekton_pod(cluster, taskrun, tmp_path)
    for step in steps:
        pod.container(step).run()
    workspace = pod.volumes["docker-config"][0]
    assert json.loads((workspace / "config.json").read_text())["credHelpers"]
    assert registry_digest(world, "test/tekton:v1").startswith("sha256:")
    pod.stop()


def test_sidecar_job_completes(cluster, tmp_path, world):
    """The sidecar Job as written: the native sidecar starts with the Pod's own RBAC (no cluster
    install needed), its startupProbe passes, the build mirrors an image through it and exits 0,
    then the sidecar stops on SIGTERM within the grace period: the Job completes."""
    docs = example("sidecar.yaml")
    job = find(docs, "Job")
    spec = job["spec"]["template"]["spec"]
    [sidecar] = spec["initContainers"]
    assert sidecar.get("restartPolicy") == "Always", "a regular sidecar container never lets the Job finish"
    pod = job_pod(cluster, job, tmp_path)
    assert pod.automount is None and "kube-api-access" in pod.volumes
    cluster.expose_world(pod)
    proxy = pod.container(sidecar).start()
    deadline = time.monotonic() + START_TIMEOUT
    probe = sidecar["startupProbe"]
    while not pod.exec_probe(sidecar, probe):
        assert proxy.running(), f"the sidecar exited:\n{proxy.output()[-4000:]}"
        assert time.monotonic() < deadline, f"startupProbe never passed:\n{proxy.output()[-4000:]}"
        time.sleep(probe.get("periodSeconds", 10) / 4)  # probing, bounded by the deadline
    [build] = spec["containers"]
    pod.container(build).run()
    assert registry_digest(world, "mirror/busybox:latest") == registry_digest(world, "testing/busybox:latest")
    proxy.terminate()
    pod.stop()
    calls = api_calls(cluster.api, "system:serviceaccount:default:connector-sidecar")
    assert calls and not [c for c in calls if c[3] == 403], calls


# ============================================================================ the namespaced install


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) is not installed")
def test_namespaced_install_serves_its_namespaces_only(world, tmp_path):
    """manifests/namespaced/ as kustomize builds it, against an API server enforcing its RBAC: the
    proxy becomes ready reading only `default`, serves default/harbor, knows nothing of a
    connector elsewhere, and never asked for anything cluster-wide but the reviews. (Without the
    optional connector-proxy-ca Secret: the proxy starts with a CA of its own.)"""
    docs = kustomize(MANIFESTS / "namespaced") + example("workload-rbac.yaml")
    deployment = find(docs, "Deployment")
    deployment["spec"]["replicas"] = 1
    c = Cluster(world, tmp_path, docs)
    try:
        install_secrets(c, forward_ca=False)
        c.apply_seed("default")
        c.apply_seed("elsewhere")
        [replica] = deploy(c, docs, tmp_path / "pods")
        workload = c.api.add_service_account_token("default", "builder", audiences=["connector-proxy"])
        c.api.allow("system:serviceaccount:default:builder", "get", GROUP, "connectors", "elsewhere", "harbor")
        ok = http("GET", replica.url + "/v2/namespaces/default/connectors/harbor/testing/busybox/tags/list",
                  headers=basic(workload))
        assert ok.status in (200, 404), ok.data[:300]
        other = http("GET", replica.url + "/v2/namespaces/elsewhere/connectors/harbor/testing/busybox/tags/list",
                     headers=basic(workload))
        assert other.status == 404 and b"not found" in other.data, other.data[:300]
        calls = api_calls(c.api, PROXY_SA)
        assert not [x for x in calls if x[3] == 403], calls
        cluster_wide = [r.path for r in c.api.request_log if r.user == PROXY_SA and "/namespaces/" not in r.path]
        assert all(p.endswith(("tokenreviews", "subjectaccessreviews")) for p in cluster_wide), cluster_wide
        replica.container.terminate()

        # README (namespaced): a --namespace without its RoleBinding is refused and never ready.
        # (This replica's args differ from the manifest by that one argument, on purpose.)
        deployment["spec"]["template"]["spec"]["containers"][0]["args"].insert(0, "--namespace=team-a")
        unbound = start_replica(c, deployment, tmp_path / "pods", "connector-proxy-unbound")
        deadline = time.monotonic() + 15
        while not any(r.status == 403 and "/namespaces/team-a/" in r.path for r in c.api.request_log):
            assert time.monotonic() < deadline, "the proxy never asked for team-a"
            time.sleep(0.2)  # polling the request log, bounded by the deadline
        while True:  # once it answers at all, it answers "not ready"
            try:
                assert http("GET", unbound.url + "/readyz", timeout=2).status == 503
                break
            except urllib3.exceptions.HTTPError:
                assert unbound.container.running() and time.monotonic() < deadline, unbound.container.output()
                time.sleep(0.2)  # the listener is starting, bounded by the deadline
        unbound.container.terminate()
    finally:
        c.stop()


# ============================================================================ autoscaling


AUTOSCALING = MANIFESTS / "components" / "autoscaling"


def with_component(install: Path, component: Path, workdir: Path) -> list[dict]:
    """What an operator's overlay of `install` plus `component` applies (kustomize's output)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(install, workdir)], "components": [os.path.relpath(component, workdir)]}))
    return kustomize(workdir)


def millicores(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity (`100m`, `2`, `0.5`) in millicores."""
    text = str(quantity)
    return float(text[:-1]) if text.endswith("m") else float(text) * 1000


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) is not installed")
@pytest.mark.parametrize("install", ["", "namespaced"], ids=["cluster-wide", "namespaced"])
def test_autoscaling_component_scales_the_shipped_deployment(install, tmp_path):
    """manifests/components/autoscaling added to either install: its HorizontalPodAutoscaler
    targets the proxy Deployment of that very build (apiVersion, kind, name, namespace), which
    it adds nothing to but removes `spec.replicas` from (the autoscaler owns the count; the Pods
    run are those of the install without it). Its CPU target is one a proxy pod can reach (one
    process, one event loop: at most one core; tests/test_e2e_scale_out.py's replicas show scaling
    out is by replicas) and that the proxy container's CPU request makes measurable; it never
    goes below what the PodDisruptionBudget keeps serving, and it scales down one drained replica
    at a time: no faster than a removed replica's terminationGracePeriodSeconds."""
    plain = kustomize(MANIFESTS / install)
    docs = with_component(MANIFESTS / install, AUTOSCALING, tmp_path / "overlay")
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)

    [hpa] = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    [target] = [d for d in docs if (d["apiVersion"], d["kind"], d["metadata"]["name"]) ==
                (ref["apiVersion"], ref["kind"], ref["name"])]
    assert target["metadata"]["namespace"] == hpa["metadata"]["namespace"]
    service = find(docs, "Service", "connector-proxy")
    assert target is find(docs, "Deployment", "connector-proxy")
    assert service["spec"]["selector"].items() <= target["spec"]["template"]["metadata"]["labels"].items()

    # The component adds the HPA and takes `replicas` out; everything else is the install as it is.
    shipped = find(plain, "Deployment", "connector-proxy")
    assert "replicas" not in target["spec"] and shipped["spec"]["replicas"] >= 1
    assert target["spec"] == {k: v for k, v in shipped["spec"].items() if k != "replicas"}
    assert [d for d in docs if d is not target and d is not hpa] == [d for d in plain if d is not shipped]

    # The CPU target: measurable (a CPU request on the proxy container) and reachable by one pod.
    [proxy] = target["spec"]["template"]["spec"]["containers"]
    request = millicores(proxy["resources"]["requests"]["cpu"])
    assert request > 0
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    goal = metric["resource"]["target"]
    per_pod = (request * goal["averageUtilization"] / 100 if goal["type"] == "Utilization"
               else millicores(goal["averageValue"]))
    assert 0 < per_pod < 1000, f"a pod scales out at {per_pod}m: one proxy process never uses more than one core"

    # Replicas: never fewer than a drain can take down and still serve.
    pdb = find(docs, "PodDisruptionBudget", "connector-proxy")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= target["spec"]["template"]["metadata"]["labels"].items()
    low, high = hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]
    assert 2 <= low <= high and low > pdb["spec"]["maxUnavailable"]

    # Down slowly: after a stabilization window longer than the default, one replica per period,
    # each period longer than a removed replica may take to drain.
    down = hpa["spec"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 300
    assert down.get("selectPolicy", "Max") != "Disabled" and down["policies"]
    grace = target["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    for policy in down["policies"]:
        assert policy["type"] == "Pods" and 1 <= policy["value"] <= pdb["spec"]["maxUnavailable"], policy
        assert policy["periodSeconds"] >= grace, policy


# ============================================================================ the emulation itself


def test_the_emulation_enforces_the_security_context(cluster, tmp_path):
    """What the rules above promise, checked: a read-only root refuses writes outside the volumes,
    the process has the manifest's uid and no capabilities, the in-cluster files are where
    load_incluster_config reads them, and the kubelet's runAsNonRoot refusal happens."""
    spec = {"volumes": [{"name": "tmp", "emptyDir": {}}], "serviceAccountName": "builder"}
    pod = Pod(cluster, "emulation-check", "default", spec, tmp_path)
    container = {
        "name": "check", "image": "registry.example.com/oci-connector-proxy:0.1.0",
        "command": ["/bin/sh", "-c"],
        "args": ["set -e; test \"$(id -u)\" = 4242; grep -q '^CapEff:.0000000000000000' /proc/self/status;"
                 " if touch /etc/written 2>/dev/null; then exit 10; fi;"
                 " if touch /app/written 2>/dev/null; then exit 11; fi;"
                 " touch /tmp/written; test -s " + SA_MOUNT + "/token; test -s " + SA_MOUNT + "/ca.crt;"
                 " test \"$(cat " + SA_MOUNT + "/namespace)\" = default; test \"$HOME\" = /tmp;"
                 " command -v connector-proxy; command -v docker-credential-connector-proxy"],
        "securityContext": {"runAsUser": 4242, "runAsNonRoot": True, "readOnlyRootFilesystem": True},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    c = pod.container(container).run(60)
    assert "/usr/local/bin/docker-credential-connector-proxy" in c.output()
    assert (pod.volumes["tmp"][0] / "written").exists()
    assert not Path("/etc/written").exists() and not Path("/app/written").exists()
    curl = {"name": "curl", "image": "docker.io/curlimages/curl:8.11.1", "command": ["true"],
            "securityContext": {"runAsNonRoot": True}}
    with pytest.raises(ContainerFailed, match="non-numeric user"):
        pod.container(curl).start()
    pod.stop()
