"""A rollout does not cut a push in half: SIGTERM drains, the upload in flight completes.

Two proxy replicas with the same connectors and client tokens share nothing else. An upload's
PATCH is in flight on replica A when A gets SIGTERM: A reports not ready at once, finishes the
PATCH, stops accepting and exits; the push is finished on replica B (the upload session lives in
the registry's Location, so any replica can continue it).
"""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import socket
import subprocess
import time

import pytest

from proxyproc import ProxyProcess, basic

REPO = "namespaces/default/connectors/harbor/test/rollout"


def head_and_body(conn: socket.socket) -> tuple[int, dict[str, str], bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        assert chunk, f"connection closed: {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    want = int(headers.get("content-length", "0"))
    while len(body) < want:
        body += conn.recv(65536)
    return int(lines[0].split()[1]), headers, body


@pytest.fixture
def replicas(world, tmp_path):
    key = tmp_path / "token.key"
    key.write_bytes(base64.b64encode(os.urandom(48)))
    made = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        made.append(ProxyProcess(tmp_path / name, world.connectors_dir, world.tokens_file, extra=(
            "--set", f"token_key_file={key}", "--set", "shutdown_delay=1", "--set", "shutdown_grace=30",
        )).start())
    yield made
    for p in made:
        p.stop()


def test_an_upload_in_flight_during_sigterm_completes_and_the_push_finishes_on_another_replica(world, replicas):
    a, b = replicas
    auth = basic("x", world.builder_token)
    r = a.http.request("POST", f"{a.url}/v2/{REPO}/blobs/uploads/", headers={"Authorization": auth})
    assert r.status == 202, r.data
    location = r.headers["Location"]
    path = location.split(a.host, 1)[1]
    blob = os.urandom(4 * 1024 * 1024)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()

    conn = socket.create_connection(("127.0.0.1", a.port), timeout=30)
    conn.sendall((f"PATCH {path} HTTP/1.1\r\nHost: {a.host}\r\nAuthorization: {auth}\r\n"
                  f"Content-Type: application/octet-stream\r\nContent-Length: {len(blob)}\r\n\r\n").encode())
    conn.sendall(blob[: len(blob) // 2])  # half the body is on its way when the rollout begins
    a.proc.send_signal(signal.SIGTERM)
    # Not ready at once (the listener still accepts during shutdown_delay).
    deadline = time.monotonic() + 5
    while a.http.request("GET", f"{a.url}/readyz").status != 503:
        assert time.monotonic() < deadline, "readyz still 200 after SIGTERM"
        time.sleep(0.05)  # polling a state change, bounded by the deadline
    conn.sendall(blob[len(blob) // 2:])
    status, headers, body = head_and_body(conn)
    conn.close()
    assert status == 202, body
    assert headers.get("connection") == "close"  # kept-alive clients are sent elsewhere
    # The push finishes on the other replica.
    next_path = headers["location"].split(a.host, 1)[1]
    sep = "&" if "?" in next_path else "?"
    r = b.http.request("PUT", f"{b.url}{next_path}{sep}digest={digest}", headers={"Authorization": auth})
    assert r.status == 201, r.data
    r = b.http.request("HEAD", f"{b.url}/v2/{REPO}/blobs/{digest}", headers={"Authorization": auth})
    assert r.status == 200 and int(r.headers["Content-Length"]) == len(blob)
    # Replica A exits by itself once drained.
    assert a.proc.wait(timeout=40) == 0
    assert "drained: exiting" in a.output()
