"""Run the real proxy (`connector-proxy`, i.e. mitmdump with our addons) as a subprocess for tests."""

from __future__ import annotations

import base64
import http.client
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import urllib3
import yaml

from localregistry import free_port

REPO = Path(__file__).resolve().parent.parent


def write_manifests(directory: Path, name: str, docs: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(docs))
    tmp.rename(path)  # atomic: the store never reads half a file
    return path


def connector(namespace: str, name: str, address: str, secret: str | None = None, **params: str) -> dict:
    spec: dict = {"address": address, "connectorClassName": "oci", "auth": {"name": "tokenAuth"}}
    if secret:
        spec["auth"]["secretRef"] = {"name": secret}
    if params:
        spec["auth"]["params"] = [{"name": k, "value": v} for k, v in params.items()]
    return {
        "apiVersion": "connectors.alauda.io/v1alpha1",
        "kind": "Connector",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def secret(namespace: str, name: str, username: str, password: str,
           type: str = "cpaas.io/distribution-registry-token", encoded: bool = False) -> dict:
    doc: dict = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace}, "type": type}
    if encoded:  # as the API server returns it
        doc["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in (("username", username), ("password", password))}
    else:
        doc["stringData"] = {"username": username, "password": password}
    return doc


def basic(user: str, token: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


class ProxyProcess:
    """`connector-proxy` on a free loopback port, at the most verbose flow detail, saving flows with -w."""

    def __init__(self, workdir: Path, connectors_dir: Path | None, tokens_file: Path | None,
                 extra: tuple[str, ...] = (), web: bool = False, source: tuple[str, ...] = ()):
        """`source`: launcher arguments replacing --connectors/--client-tokens (e.g. the Kubernetes backends)."""
        self.source = source or ("--connectors", str(connectors_dir), "--client-tokens", str(tokens_file))
        self.web = web
        self.web_port = 0
        self.web_password = "web-" + os.urandom(8).hex()
        self.workdir = workdir
        self.connectors_dir = connectors_dir
        self.tokens_file = tokens_file
        self.extra = extra
        self.port = 0
        self.log_path = workdir / "proxy.log"
        self.flows_path = workdir / "flows.mitm"
        self.proc: subprocess.Popen | None = None
        self.http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=60))

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> ProxyProcess:
        self.port = free_port()
        web: list[str] = []
        if self.web:
            self.web_port = free_port()
            web = ["--set", f"web_port={self.web_port}", "--set", f"web_password={self.web_password}"]
        cmd = [
            sys.executable, "-m", "connector_store.cli",
            *self.source,
            "--listen", self.host,
            "--flow-detail", "4",
            *(["--web"] if self.web else []),
            "--",
            *web,
            "-w", str(self.flows_path),
            "--set", "termlog_verbosity=debug",
            "--set", "connectors_poll_ms=200",
            *self.extra,
        ]
        log = self.log_path.open("ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                if self.http.request("GET", f"{self.url}/readyz").status == 200:
                    return self
            except urllib3.exceptions.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"proxy not ready after 30 s:\n{self.output()[-3000:]}")
            time.sleep(0.05)  # readiness polling, bounded by the deadline

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # mitmdump flushes the -w file on a clean shutdown
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def everything_written(self) -> bytes:
        """The proxy's log and saved flows: what a leak search must cover."""
        data = self.log_path.read_bytes() if self.log_path.exists() else b""
        if self.flows_path.exists():
            data += self.flows_path.read_bytes()
        return data

    def request(self, method: str, path: str, *, auth: str | None = None, host: str | None = None,
                headers: dict | None = None, body: bytes | None = None, preload: bool = True):
        h = dict(headers or {})
        if auth:
            h["Authorization"] = auth
        if host:
            h["Host"] = host
        return self.http.request(method, self.url + path, headers=h, body=body, redirect=False,
                                 preload_content=preload)

    def raw_request(self, method: str, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
        """Send the path exactly as given (urllib3 would normalise `..` away)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for k, v in (headers or {}).items():
                conn.putheader(k, v)
            conn.endheaders()
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def wait_for(self, predicate, timeout: float = 5.0) -> None:
        """Poll a condition the proxy will reach (e.g. a connector file picked up), bounded in time."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not reached in {timeout} s")
            time.sleep(0.05)

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
