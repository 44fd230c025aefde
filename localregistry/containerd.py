"""A throwaway containerd daemon, and the `ctr` client that talks to it.

containerd's registry client (`remotes/docker`) is the one BuildKit uses; `ctr images pull/push` runs it
in the `ctr` process itself (containerd 1.6 has no transfer service), with the daemon as the content
store. Everything lives in one temporary directory: root, state, the socket and a minimal config that
disables the plugins this kind of machine cannot load (CRI, the btrfs/zfs/devmapper/aufs/overlayfs
snapshotters); unpacking uses the `native` snapshotter, which needs no mounts.

    with Containerd() as ctd:                           # needs root
        ctd.ctr("images", "pull", "--plain-http", "--user", "x:TOKEN", ref, namespace="t1")
        ctd.reset("t1")                                 # images gone, content collected

Content is isolated per namespace (`content_sharing_policy = "isolated"`), so a fresh namespace or a
`reset` makes the next pull fetch every blob over the network again.

Host-form proxy addresses (`c-<name>.<ns>.svc.cluster.local:<port>`) resolve nowhere. `PrivateHosts`
runs one command in its own mount namespace whose /etc/hosts maps such names to 127.0.0.1, so the
client connects to loopback and still sends `Host: c-<name>...` (unlike containerd's hosts.toml, which
would make the request go to, and name, the mirror host).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

BINARY = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"

# Plugins that need kernel features, filesystems or networking this sandbox lacks; none is needed to
# fetch, store, unpack (native) and push images.
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.overlayfs",
)

_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; containerd also listens on <socket>.ttrpc


class ContainerdError(RuntimeError):
    """containerd could not be started here; the message says why (with its log tail)."""


class CtrError(RuntimeError):
    """A `ctr` command failed (or timed out); carries its exit status and output."""

    def __init__(self, args: Sequence[str], returncode: int | None, stdout: str, stderr: str) -> None:
        status = "timed out" if returncode is None else f"exited {returncode}"
        super().__init__(f"`{' '.join(args)}` {status}: {stderr.strip()[-3000:]}")
        self.cmd = list(args)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


def _binary(name: str, default: str) -> str:
    if os.access(default, os.X_OK):
        return default
    found = shutil.which(name)
    if found:
        return found
    raise ContainerdError(f"{name} not found (looked at {default} and PATH); "
                          "install it with `apt-get install containerd`")


class Containerd:
    """A `containerd` subprocess with all its state under ``workdir`` (a short temp dir by default)."""

    def __init__(self, workdir: Path | None = None, *, startup_timeout: float = 30.0,
                 snapshotter: str = "native", log_level: str = "info") -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else None
        self.startup_timeout = startup_timeout
        self.snapshotter = snapshotter
        self.log_level = log_level
        self.binary = ""
        self.ctr_binary = ""
        self._proc: subprocess.Popen[bytes] | None = None

    # -- paths ----------------------------------------------------------------

    def _dir(self) -> Path:
        if self.workdir is None:
            raise RuntimeError("containerd not started")
        return self.workdir

    @property
    def address(self) -> str:
        return str(self._dir() / "containerd.sock")

    @property
    def config_path(self) -> Path:
        return self._dir() / "config.toml"

    @property
    def log_path(self) -> Path:
        return self._dir() / "containerd.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def config(self) -> str:
        """The config.toml this daemon runs with."""
        d = self._dir()
        disabled = ", ".join(f'"{p}"' for p in DISABLED_PLUGINS)
        return (
            "version = 2\n"
            f'root = "{d / "root"}"\n'
            f'state = "{d / "state"}"\n'
            f'temp = "{d / "tmp"}"\n'
            f"disabled_plugins = [{disabled}]\n"
            "[grpc]\n"
            f'  address = "{self.address}"\n'
            "[debug]\n"
            f'  level = "{self.log_level}"\n'
            "[plugins]\n"
            '  [plugins."io.containerd.metadata.v1.bolt"]\n'
            '    content_sharing_policy = "isolated"\n'
            '  [plugins."io.containerd.internal.v1.opt"]\n'
            f'    path = "{d / "opt"}"\n'
        )

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> Containerd:
        """Launch the daemon and wait (bounded) until `ctr version` reaches it.

        Raises ContainerdError, with the reason, when it cannot run here (not root, not installed,
        exits or never answers)."""
        if self._proc is not None:
            raise RuntimeError("containerd already started")
        if os.geteuid() != 0:
            raise ContainerdError("containerd needs root (it owns its content store and snapshots)")
        self.binary = _binary("containerd", BINARY)
        self.ctr_binary = _binary("ctr", CTR)
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="ctd", dir="/tmp"))  # socket paths must stay short
        if len(self.address) > _SOCKET_PATH_MAX:
            raise ContainerdError(f"socket path too long for a unix socket: {self.address}")
        for sub in ("root", "state", "tmp", "opt"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen([self.binary, "--config", str(self.config_path)],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          env=env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        last = ""
        while True:
            if self._proc.poll() is not None:
                message = f"containerd exited with {self._proc.returncode} during startup: {self.log_tail()}"
                self.stop()
                raise ContainerdError(message)
            try:
                self.ctr("version", timeout=5)
                return self
            except CtrError as e:
                last = e.stderr.strip()
            if time.monotonic() > deadline and self._proc.poll() is None:
                message = (f"containerd did not answer on {self.address} within {self.startup_timeout:.0f} s "
                           f"({last}): {self.log_tail()}")
                self.stop()
                raise ContainerdError(message)
            time.sleep(0.1)  # readiness polling, bounded by the deadline

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (FileNotFoundError, RuntimeError):
            return "(no log)"

    # -- the client ----------------------------------------------------------------

    def ctr(self, *args: str, namespace: str = "default", env: Mapping[str, str] | None = None,
            timeout: float = 120, check: bool = True, wrap: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
        """Run `ctr -a <socket> -n <namespace> ARGS` (prefixed by ``wrap``, e.g. PrivateHosts.prefix).

        ``env`` replaces the inherited environment's matching keys (e.g. HTTPS_PROXY). Raises CtrError
        on a non-zero exit or a timeout when ``check``; otherwise returns the completed process (a
        timeout then has returncode -9)."""
        cmd = [*wrap, self.ctr_binary or CTR, "-a", self.address, "-n", namespace, *args]
        shown = ["ctr", "-n", namespace, *args] + (["(in a private-hosts namespace)"] if wrap else [])
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
        full_env["CONTAINERD_SNAPSHOTTER"] = self.snapshotter
        full_env.update(env or {})
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, env=full_env)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            if check:
                raise CtrError(shown, None, out, err + f"\n(timed out after {timeout} s)") from None
            return subprocess.CompletedProcess(cmd, -9, out, err + f"\n(timed out after {timeout} s)")
        if check and proc.returncode != 0:
            raise CtrError(shown, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def images(self, namespace: str) -> dict[str, str]:
        """Image name -> target digest in ``namespace``."""
        out = self.ctr("images", "ls", namespace=namespace).stdout.splitlines()
        images: dict[str, str] = {}
        for line in out[1:]:  # REF TYPE DIGEST SIZE PLATFORMS LABELS
            fields = line.split()
            if len(fields) >= 3:
                images[fields[0]] = fields[2]
        return images

    def content(self, namespace: str) -> list[str]:
        """Digests of every blob in ``namespace``'s content store."""
        return [d for d in self.ctr("content", "ls", "-q", namespace=namespace).stdout.split() if d]

    def reset(self, namespace: str) -> None:
        """Remove every image of ``namespace`` and collect its content and snapshots synchronously.

        Raises CtrError if content is left (the next pull would not fetch everything)."""
        names = list(self.images(namespace))
        if names:
            self.ctr("images", "rm", "--sync", *names, namespace=namespace)
        left = self.content(namespace)
        if left:
            raise CtrError(["reset", namespace], 1, "", f"content left in namespace {namespace}: {left}")


class PrivateHosts:
    """Names that resolve to 127.0.0.1 for one command, without touching the machine's /etc/hosts.

    ``prefix`` runs the command in a new mount namespace (`unshare --mount`, root only) where a copy of
    /etc/hosts with the extra names is bind-mounted over /etc/hosts. Go's resolver, glibc and curl all
    read it there; the client then connects to loopback while addressing the proxy by that name (the
    Host header keeps the host form). ``binds`` adds more (source, target) bind mounts, e.g. a private
    /etc/docker with a certs.d for dockerd. ``check()`` raises with the reason if this cannot work here.
    """

    def __init__(self, workdir: Path, names: Sequence[str], binds: Sequence[tuple[str, str]] = ()) -> None:
        self.names = list(names)
        workdir.mkdir(parents=True, exist_ok=True)
        self.hosts_file = workdir / "hosts"
        base = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else "127.0.0.1 localhost\n"
        if base and not base.endswith("\n"):
            base += "\n"
        self.hosts_file.write_text(base + "127.0.0.1 " + " ".join(self.names) + "\n")
        self.binds = [(str(self.hosts_file), "/etc/hosts"), *((str(s), str(t)) for s, t in binds)]

    @property
    def prefix(self) -> list[str]:
        script = " && ".join(f'mount --bind "${{{i * 2 + 1}}}" "${{{i * 2 + 2}}}"' for i in range(len(self.binds)))
        # sh -c SCRIPT NAME ARGS...: $0 is NAME; the bind pairs are $1..$2n, the command follows them.
        shift = f"shift {len(self.binds) * 2}"
        args = [a for pair in self.binds for a in pair]
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                f'{script} && {shift} && exec "$@"', "private-hosts", *args]

    def wrap(self, cmd: Sequence[str]) -> list[str]:
        return [*self.prefix, *cmd]

    def check(self) -> None:
        """Raise RuntimeError unless every name resolves to 127.0.0.1 inside the namespace."""
        if shutil.which("unshare") is None:
            raise RuntimeError("unshare (util-linux) is not installed")
        for name in self.names:
            proc = subprocess.run(self.wrap(["getent", "hosts", name]), capture_output=True, text=True, timeout=20)
            if proc.returncode != 0 or not proc.stdout.startswith("127.0.0.1"):
                raise RuntimeError(f"cannot give {name} a private /etc/hosts entry here (unshare --mount, "
                                   f"bind mount): exit {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
