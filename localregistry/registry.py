"""Run a real CNCF distribution registry (``docker-registry``) on loopback."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import yaml

from .token_server import AccessPolicy, TokenServer

AuthMode = Literal["token", "htpasswd"] | None

BINARY_CANDIDATES = ("/usr/bin/docker-registry",)
BINARY_NAMES = ("docker-registry", "registry")

# Cheap bcrypt cost: distribution checks the password on every request, and
# the default cost (10) adds tens of ms to each blob/manifest call.
HTPASSWD_BCRYPT_COST = 5


class RegistryError(RuntimeError):
    """The registry could not be started; the message carries its log tail."""


def find_registry_binary() -> str:
    """Path of the distribution binary, or a RegistryError saying how to get it."""
    env = os.environ.get("LOCALREGISTRY_BINARY")
    if env:
        if os.access(env, os.X_OK):
            return env
        raise RegistryError(f"LOCALREGISTRY_BINARY={env!r} is not an executable file")
    for path in BINARY_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    for name in BINARY_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise RegistryError(
        "CNCF distribution registry binary not found (looked for /usr/bin/docker-registry and "
        "docker-registry/registry on PATH); install it with `apt-get install docker-registry` "
        "or set LOCALREGISTRY_BINARY"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (callers retry if it gets taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def bcrypt_htpasswd_line(user: str, password: str, cost: int = HTPASSWD_BCRYPT_COST) -> str:
    """One ``user:$2b$...`` htpasswd line.

    Uses the ``bcrypt`` module (a hard dependency of mitmproxy, so always
    present where this project runs); falls back to ``htpasswd -Bbn`` from
    apache2-utils if it is somehow missing.
    """
    if ":" in user:
        raise ValueError("htpasswd user names cannot contain ':'")
    try:
        import bcrypt
    except ImportError:
        exe = shutil.which("htpasswd")
        if exe is None:
            raise RegistryError("need the bcrypt module or apache2-utils' htpasswd") from None
        out = subprocess.run([exe, "-Bbn", "-C", str(cost), user, password],
                             check=True, capture_output=True, text=True).stdout
        return out.strip()
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost)).decode()
    return f"{user}:{hashed}"


class Registry:
    """A ``docker-registry serve`` subprocess with its config and storage in ``workdir``.

    Construction only records the settings; :meth:`start` (or ``with``) writes
    ``config.yml``, launches the registry and waits until ``GET /v2/`` answers.
    """

    def __init__(
        self,
        workdir: Path,
        auth: AuthMode = None,
        token_server: TokenServer | None = None,
        htpasswd_users: dict[str, str] | None = None,
        port: int | None = None,
        *,
        log_level: str = "warn",
        startup_timeout: float = 20.0,
        binary: str | None = None,
        tls: tuple[Path, Path] | None = None,
        public_host: str = "127.0.0.1",
    ) -> None:
        """``tls=(cert_path, key_path)`` serves HTTPS (see :class:`localregistry.TestCA`).
        The registry always listens on 127.0.0.1; ``public_host`` is the name
        in :attr:`host`/:attr:`url` (e.g. ``registry-a.connector-test``,
        which must resolve to 127.0.0.1 and be in the certificate's SANs).
        With token auth the advertised realm is ``token_server.realm``, so
        give the token server the same ``public_host``/TLS setup."""
        if auth == "token" and token_server is None:
            raise ValueError("auth='token' needs a (started) token_server")
        if auth == "htpasswd" and not htpasswd_users:
            raise ValueError("auth='htpasswd' needs htpasswd_users")
        if auth not in ("token", "htpasswd", None):
            raise ValueError(f"unknown auth mode {auth!r}")
        self.workdir = Path(workdir)
        self.auth = auth
        self.token_server = token_server
        self.htpasswd_users = dict(htpasswd_users or {})
        self.log_level = log_level
        self.startup_timeout = startup_timeout
        self.binary = binary
        self.tls: tuple[Path, Path] | None = (Path(tls[0]), Path(tls[1])) if tls else None
        self.public_host = public_host
        self._fixed_port = port
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- paths and addresses -------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.yml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "registry.log"

    @property
    def storage_dir(self) -> Path:
        return self.workdir / "storage"

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("registry not started")
        return self._port

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def host(self) -> str:
        """``PUBLIC_HOST:PORT`` (default ``127.0.0.1:PORT``), the registry part of image references."""
        return f"{self.public_host}:{self.port}"

    @property
    def url(self) -> str:
        """``SCHEME://PUBLIC_HOST:PORT``."""
        return f"{self.scheme}://{self.host}"

    @property
    def local_url(self) -> str:
        """``SCHEME://127.0.0.1:PORT``: reachable without name resolution."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> Registry:
        if self._proc is not None:
            raise RuntimeError("registry already started")
        binary = self.binary or find_registry_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(exist_ok=True)
        # A port picked by free_port() can be taken before the registry binds
        # it; retry a few times with a fresh one in that (rare) case.
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            self._port = self._fixed_port or free_port()
            self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
            try:
                self._launch(binary)
                return self
            except RegistryError:
                self.stop()
                if attempt + 1 == attempts or "address already in use" not in self.log_tail():
                    raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------

    def config(self) -> dict[str, object]:
        """The distribution config.yml content for the current settings."""
        cfg: dict[str, object] = {
            "version": 0.1,
            "log": {"level": self.log_level, "formatter": "text"},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                # No background upload purging mid-test.
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": f"127.0.0.1:{self.port}",
                # Fixed secret: silences the "no secret" warning.
                "secret": "localregistry-not-a-secret",
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        if self.tls:
            cfg["http"]["tls"] = {  # type: ignore[index]
                "certificate": str(self.tls[0]),
                "key": str(self.tls[1]),
            }
        if self.auth == "token":
            assert self.token_server is not None
            ts = self.token_server
            cfg["auth"] = {"token": {
                "realm": ts.realm,
                "service": ts.service,
                "issuer": ts.issuer,
                "rootcertbundle": str(ts.cert_path),
            }}
        elif self.auth == "htpasswd":
            htpasswd = self.workdir / "htpasswd"
            htpasswd.write_text("".join(
                bcrypt_htpasswd_line(u, p) + "\n" for u, p in self.htpasswd_users.items()))
            cfg["auth"] = {"htpasswd": {"realm": "localregistry", "path": str(htpasswd)}}
        return cfg

    def _launch(self, binary: str) -> None:
        # distribution lets REGISTRY_* env vars override config.yml; drop any
        # inherited ones so the config we wrote is what runs.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        with open(self.log_path, "ab") as logf:
            self._proc = subprocess.Popen(
                [binary, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                cwd=self.workdir, env=env,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._proc.poll() is not None:
                raise RegistryError(
                    f"registry exited with code {self._proc.returncode} during startup; "
                    f"log tail:\n{self.log_tail()}")
            if self._answers():
                return
            if time.monotonic() > deadline:
                raise RegistryError(
                    f"registry did not answer on {self.local_url}/v2/ within {self.startup_timeout}s; "
                    f"log tail:\n{self.log_tail()}")
            time.sleep(0.05)  # bounded readiness polling

    def _answers(self) -> bool:
        # Any /v2/ answer (401 included) carrying distribution's API header
        # means "up"; the header check guards against another server that
        # grabbed a port picked by free_port().
        # Probe 127.0.0.1 directly (public_host may not resolve yet) and,
        # with TLS, without verification: this only asks "is it up?"; clients
        # verify the certificate for real.
        ctx = None
        if self.tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        # No proxies: an inherited HTTP(S)_PROXY must not intercept the probe.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPSHandler(context=ctx))
        try:
            with opener.open(self.local_url + "/v2/", timeout=1) as resp:
                headers = resp.headers
        except urllib.error.HTTPError as e:
            headers = e.headers
        except OSError:
            return False
        return headers.get("Docker-Distribution-Api-Version", "").startswith("registry/2")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


@contextlib.contextmanager
def token_auth_registry(
    workdir: Path,
    users: dict[str, str],
    *,
    service: str = "localregistry",
    access: AccessPolicy | None = None,
    expires_in: int = 300,
    log_level: str = "warn",
    tls: tuple[Path, Path] | None = None,
    public_host: str = "127.0.0.1",
) -> Iterator[tuple[TokenServer, Registry]]:
    """Start a TokenServer and a token-auth Registry using it; stop both on exit.

    ``tls``/``public_host`` apply to both (one certificate serves both ports).
    """
    with TokenServer(service, users, access=access, expires_in=expires_in,
                     tls=tls, public_host=public_host) as ts:
        with Registry(Path(workdir), "token", token_server=ts, log_level=log_level,
                      tls=tls, public_host=public_host) as reg:
            yield ts, reg
