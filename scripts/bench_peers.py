"""Peers for scripts/bench: other proxies in front of the same registry, measured beside the proxy.

* `NginxPeer`: nginx as a credential-injecting reverse proxy: a static registry token in a
  header, bodies streamed both ways (no buffering), an upstream keep-alive pool. What a C proxy
  doing the same job costs. Reverse mode only (nginx does not intercept CONNECT).
* `MitmdumpPeer`: a plain `mitmdump` with no script, streaming bodies, the client sending the
  registry token itself: what mitmproxy itself costs, the platform's ceiling. Reverse mode
  (`--mode reverse:`) or forward mode (`--mode regular`, intercepting TLS with its own CA).

Both run unprivileged in a directory of their own (config, logs, pid file, CA); each is stopped
by its own pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from bench_http import Processes

NGINX_CANDIDATES = ("/usr/sbin/nginx",)  # Debian's; /usr/sbin is not on every user's PATH


class PeerError(RuntimeError):
    """A peer did not start."""


def find_nginx() -> str | None:
    return shutil.which("nginx") or next((p for p in NGINX_CANDIDATES if os.access(p, os.X_OK)), None)


def find_mitmdump() -> str | None:
    """The mitmdump next to this Python (the project's .venv), else one on PATH."""
    beside = Path(sys.executable).parent / "mitmdump"
    return str(beside) if os.access(beside, os.X_OK) else shutil.which("mitmdump")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no log)"


def _wait_listening(proc: subprocess.Popen[bytes], port: int, what: str, log: Path, timeout: float = 30,
                    also: Path | None = None) -> None:
    """Until `port` accepts a connection (and the file `also` exists); the process must stay up."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise PeerError(f"{what} exited with {proc.returncode}:\n{_log_tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            if also is None or also.exists():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise PeerError(f"{what} not listening on {port} after {timeout} s:\n{_log_tail(log)}")
        time.sleep(0.05)  # bounded readiness polling


def _stop(proc: subprocess.Popen[bytes] | None, sig: signal.Signals) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


NGINX_CONF = """\
# Written by scripts/bench: nginx as a credential-injecting reverse proxy for one registry.
{user}worker_processes 1;  # one core, like the proxy's event loop
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/temp/body;
    proxy_temp_path {dir}/temp/proxy;
    fastcgi_temp_path {dir}/temp/fastcgi;
    uwsgi_temp_path {dir}/temp/uwsgi;
    scgi_temp_path {dir}/temp/scgi;
    keepalive_requests 1000000;  # the default (1000) would reconnect wrk's connections mid-run
    upstream registry {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        location / {{
            proxy_pass http://registry;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # The client's Host: the registry builds upload Locations from it, so they lead back here.
            proxy_set_header Host $http_host;
            proxy_set_header Authorization "{authorization}";
            # Streamed both ways; with buffering off each read moves at most one buffer of
            # proxy_buffer_size (client_body_buffer_size upwards), 4-16 KiB by default:
            # 64 KiB, like the proxy's reads, so the syscall count does not decide the race.
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_buffer_size 64k;
            proxy_buffers 4 64k;  # unused without buffering, but nginx checks their sizes together
            client_body_buffer_size 64k;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
    }}
}}
"""


class NginxPeer:
    """nginx in front of a plain-HTTP registry, started per session with the token of the moment
    (registry tokens live minutes; a restart takes milliseconds)."""

    def __init__(self, binary: str, directory: Path, upstream: str) -> None:
        self.binary, self.directory, self.upstream = binary, directory, upstream  # upstream: host:port
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / "error.log"

    def start(self, authorization: str) -> Processes:
        (self.directory / "temp").mkdir(parents=True, exist_ok=True)
        conf = self.directory / "nginx.conf"
        # As root, nginx would switch its workers to `nobody`, who may not enter the temp dir.
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf.write_text(NGINX_CONF.format(user=user, dir=self.directory, upstream=self.upstream,
                                          port=self.port, authorization=authorization))
        with open(self.directory / "nginx.out", "ab") as out:
            self.proc = subprocess.Popen(
                [self.binary, "-p", str(self.directory), "-c", str(conf), "-e", str(self.log_path)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        _wait_listening(self.proc, self.port, "nginx", self.log_path)
        return Processes(self.proc.pid, with_children=True)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        _stop(proc, signal.SIGTERM)  # nginx's fast shutdown

    @contextlib.contextmanager
    def serving(self, authorization: str) -> Iterator[Processes]:
        try:
            yield self.start(authorization)
        finally:
            self.stop()


class MitmdumpPeer:
    """Plain mitmdump: no script, bodies streamed (as the proxy streams them), no flow log.

    Reverse mode keeps the client's Host header (the registry's upload Locations lead back
    through it, as they do through the proxy); forward mode intercepts TLS with a CA in its
    directory (`ca_cert`) and verifies the registry with `upstream_ca`.
    """

    def __init__(self, binary: str, directory: Path, *, reverse_to: str | None = None,
                 upstream_ca: Path | None = None) -> None:
        self.binary, self.directory = binary, directory
        self.reverse_to, self.upstream_ca = reverse_to, upstream_ca
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / "mitmdump.log"

    @property
    def ca_cert(self) -> Path:
        return self.directory / "mitmproxy-ca-cert.pem"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        mode = f"reverse:{self.reverse_to}" if self.reverse_to else "regular"
        cmd = [self.binary, "--mode", f"{mode}@127.0.0.1:{self.port}", "-q",
               "--set", "flow_detail=0", "--set", f"confdir={self.directory}",
               # Like the proxy: connect upstream when a request needs it; keep small bodies
               # (manifests, < 1 MiB) whole and stream the rest.
               "--set", "connection_strategy=lazy", "--set", "stream_large_bodies=1m"]
        if self.reverse_to:
            cmd += ["--set", "keep_host_header=true"]
        if self.upstream_ca:
            cmd += ["--set", f"ssl_verify_upstream_trusted_ca={self.upstream_ca}"]
        return cmd

    def start(self) -> MitmdumpPeer:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        _wait_listening(self.proc, self.port, "mitmdump", self.log_path,
                        also=None if self.reverse_to else self.ca_cert)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        _stop(proc, signal.SIGINT)  # mitmdump's clean shutdown
