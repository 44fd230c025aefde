"""mitmweb while a streamed upload is in flight: the injected upstream Authorization is not shown.

mitmweb serves the flows it holds in memory (`GET /flows`, `GET /flows/dump`) at any moment, not only
after an event. The client holds the upload body open (headers and part of the body sent, the rest
later), so the request is live while the UI is asked for its flows: either once its head (with the
injected credential) has reached the registry ("connected"), or while mitmproxy is still connecting
upstream ("connecting": the registry's listen queue is kept full, so the connect stalls until the UI
has been asked; a slow or distant registry does the same).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from urllib.parse import urlsplit

import pytest

from proxyproc import basic, connector, secret, write_manifests

from .hostile import RawConn, RealRegistry, describe, leaks, request_bytes, start_proxy, write_tokens

PREFIX = "/v2/namespaces/default/connectors/harbor"
BODY = b"live-upload-" * 20_000  # 240 KB: streamed
FIRST_PART = 30_000
POLL_LIMIT = 10.0  # seconds to wait for mitmweb to list the in-flight flow


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# (id, method): a chunk PATCHed to the session's Location, a monolithic PUT to it (with ?digest=),
# a monolithic POST (?digest=) without a session
UPLOADS = [
    ("patch-chunk", "PATCH"),
    ("put-monolithic", "PUT"),
    ("post-monolithic", "POST"),
]


class World:
    def __init__(self, tmp):
        self.password = "live-pw-" + secrets.token_hex(10)
        self.token = "live-client-" + secrets.token_hex(12)
        self.registry = RealRegistry(tmp / "registry", {"pusher": self.password})
        write_manifests(tmp / "connectors", "c.yaml", [
            connector("default", "harbor", self.registry.url, "harbor-secret"),
            secret("default", "harbor-secret", "pusher", self.password),
        ])
        write_tokens(tmp / "tokens.yaml", [{"token": self.token, "subject": "ci", "connectors": ["*"]}])
        self.proxy = start_proxy(tmp / "proxy", tmp / "connectors", tmp / "tokens.yaml", web=True)
        self.web = f"http://127.0.0.1:{self.proxy.web_port}"

    @property
    def secrets(self) -> list[str]:
        return [self.password, self.token, base64.b64encode(f"pusher:{self.password}".encode()).decode(),
                base64.b64encode(f"ci:{self.token}".encode()).decode(), *self.registry.token_server.issued_tokens]

    def web_get(self, path: str):
        return self.proxy.http.request("GET", self.web + path, headers={"Authorization": f"Bearer {self.proxy.web_password}"})

    def stop(self) -> None:
        self.proxy.stop()
        self.registry.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("live"))
    yield w
    w.stop()


def listed_flows(world) -> tuple[bytes, list[dict]]:
    r = world.web_get("/flows")
    assert r.status == 200, r.status
    return r.data, json.loads(r.data)


def live_flow(flows: list[dict], method: str, marker: str) -> dict | None:
    for f in flows:
        if f["request"]["method"] == method and marker in f["request"]["path"] and not f.get("response"):
            return f
    return None


# connected: the request head has reached the registry and the body is still streaming.
# connecting: the registry's listener accepts nothing (SYNs dropped) until mitmweb has been asked,
#   so the request is live while mitmproxy is still connecting upstream.
UPSTREAMS = ["connected", "connecting"]


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize("upload", UPLOADS, ids=[u[0] for u in UPLOADS])
def test_mitmweb_hides_the_injected_credential_while_the_upload_streams(world, upload, upstream):
    _, method = upload
    repo = f"sec/live{secrets.token_hex(4)}"
    auth = ("Authorization", basic("ci", world.token))
    proxy = world.proxy
    counter = world.registry.counter
    # an upload session; it also leaves the connector's challenge and token cached
    r = proxy.request("POST", f"{PREFIX}/{repo}/blobs/uploads/", auth=auth[1])
    assert r.status == 202, r.data
    if method == "POST":
        target = f"{PREFIX}/{repo}/blobs/uploads/?digest={digest(BODY)}"
    else:
        loc = urlsplit(r.headers["Location"])
        target = loc.path + "?" + loc.query + (f"&digest={digest(BODY)}" if method == "PUT" else "")
    head = request_bytes(method, target, [("Host", proxy.host), auth, ("Content-Type", "application/octet-stream"),
                                          ("Content-Length", str(len(BODY)))])
    sent_before = counter.snapshot()[1]
    if upstream == "connecting":
        counter.block()
    shown = b""
    try:
        with RawConn(proxy.port, timeout=30) as c:
            c.send(head + BODY[:FIRST_PART])  # the rest is held back: the upload is in flight
            deadline = time.monotonic() + POLL_LIMIT
            flow = None
            # bounded: until mitmweb lists the live flow (and, when connected, the head has gone upstream)
            while time.monotonic() < deadline:
                data, flows = listed_flows(world)
                flow = live_flow(flows, method, repo)
                if flow is not None and (upstream == "connecting" or counter.snapshot()[1] > sent_before):
                    break
                time.sleep(0.02)
            assert flow is not None, f"mitmweb never listed the in-flight {method} (or it never reached the registry)"
            if upstream == "connecting":
                assert counter.snapshot()[1] == sent_before, "the request reached the registry: not connecting any more"
            data, flows = listed_flows(world)
            dump = world.web_get("/flows/dump")
            assert dump.status == 200
            shown += data + dump.data
            found = leaks(shown, world.secrets)
            assert not found, f"mitmweb shows {found} while the {method} upload is in flight ({upstream})"
            live = next(f for f in flows if f["id"] == flow["id"])
            upstream_auth = [v for k, v in live["request"]["headers"] if k.lower() == "authorization"]
            assert all("<redacted>" in v for v in upstream_auth), f"mitmweb shows Authorization {upstream_auth}"
            if upstream == "connecting":
                counter.release()
            c.send(BODY[FIRST_PART:])
            resp = c.read_response(method)
    finally:
        if upstream == "connecting":
            counter.release()
    assert resp is not None and resp.status in (201, 202), describe(resp)


def test_zz_nothing_written_holds_a_secret(world):
    world.proxy.stop()
    found = leaks(world.proxy.everything_written(), world.secrets)
    assert not found, f"{found} written to {world.proxy.log_path} or {world.proxy.flows_path}"
