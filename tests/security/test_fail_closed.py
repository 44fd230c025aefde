"""Fail closed: when one of the proxy's own hooks raises, the request is refused and nothing leaves.

The proxy runs as a real mitmdump subprocess with `tests/security/sabotage.py` loaded after it,
which makes one hook (or one function a hook calls) raise. The connector points at a counting
registry stand-in that needs no credentials, so any request that got through would reach it.
"""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import urllib3
import yaml

from tests.proxyproc import ProxyProcess, basic, connector, write_manifests
from tests.security.sabotage import MARKER

TOKEN = "fail-closed-client-token-0123456789"
TARGET = "/v2/namespaces/default/connectors/open/team/app/manifests/v1"


class CountingRegistry:
    """An open registry (no auth) that records every request path it is sent."""

    def __init__(self) -> None:
        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                seen.append((self.command, self.path, dict(self.headers)))
                body = b"{}"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Docker-Distribution-API-Version", "registry/2.0")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def api_requests(self) -> list[str]:
        return [path for _, path, _ in self.seen if path not in ("/v2/", "/v2")]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def registry():
    r = CountingRegistry()
    yield r
    r.close()


def start_proxy(tmp_path: Path, registry: CountingRegistry, sabotage: str) -> ProxyProcess:
    connectors = tmp_path / "connectors"
    write_manifests(connectors, "open.yaml", [connector("default", "open", registry.address)])
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"tokens": [{"token": TOKEN, "subject": "tester", "connectors": ["*"]}]}))
    proxy = ProxyProcess(tmp_path, connectors, tokens, extra=("-s", "tests/security/sabotage.py"))
    os.environ["SABOTAGE"] = sabotage
    try:
        proxy.start()
    finally:
        del os.environ["SABOTAGE"]
    assert proxy.http.request("GET", proxy.url + "/__sabotage__").data == b"armed"
    return proxy


def test_unsabotaged_request_reaches_the_registry(tmp_path, registry):
    """The control: without sabotage the same request does reach the registry (so the others can fail)."""
    proxy = start_proxy(tmp_path, registry, "")
    try:
        before = len(registry.api_requests())
        r = proxy.http.request("GET", proxy.url + TARGET, headers={"Authorization": basic("x", TOKEN)})
        assert r.status == 200
        assert registry.api_requests()[before:] == ["/v2/team/app/manifests/v1"]
        # The client's own credential never goes upstream.
        assert all("Authorization" not in h for _, p, h in registry.seen if p.endswith("/manifests/v1"))
    finally:
        proxy.stop()


# Request-phase failures: each must be refused with a JSON error and never reach the registry.
# (hook: ...) replaces the hook itself, so only the gate at the end of mitmproxy's chain stands
# between the request and the registry; (inner: ...) makes a function the hook calls raise, which
# the hook's own fail_closed wrapper must catch.
REQUEST_PHASE = [
    ("hook:ClientAuth.requestheaders", {500}),
    ("hook:Routing.requestheaders", {500}),
    ("hook:UpstreamCredentials.requestheaders", {500}),
    ("hook:Rewrite.requestheaders", {500, 200}),  # the gate lets it pass only with a verdict, scrubbed
    ("hook:Scrub.requestheaders", {500, 200}),
    ("inner:addons.routing.route_request", {500}),
    ("inner:addons.client_auth.parse_client_credential", {401}),
    ("inner:addons.upstream_auth.retarget", {500}),
    ("inner:addons.oci.required_scopes", {500}),
    ("inner:addons.client_auth.Verdict", {401}),
    # The upstream pool sends what the gate permits; when it breaks, nothing is sent by it...
    ("inner:addons.upstream_pool.request_headers", {500}),
    # ...and when its hook is gone, the request takes mitmproxy's own path, checked as ever.
    ("hook:PooledUpstream.request", {200}),
]


@pytest.mark.parametrize("sabotage, statuses", REQUEST_PHASE, ids=[s for s, _ in REQUEST_PHASE])
def test_a_raising_hook_refuses_the_request(tmp_path, registry, sabotage, statuses):
    proxy = start_proxy(tmp_path, registry, sabotage)
    try:
        before = list(registry.seen)
        headers = {"Authorization": basic("x", TOKEN)}
        if "upstream_pool" in sabotage or "PooledUpstream" in sabotage:
            headers["Connection"] = "close"  # the pool carries a client connection's first request only
        for method in ("GET", "HEAD"):
            r = proxy.http.request(method, proxy.url + TARGET, headers=headers)
            assert r.status in statuses, (method, r.status, r.data)
            if r.status == 200:
                # Only hooks that have nothing to do with authorization may fail without a refusal,
                # and even then the client's credential must not have gone upstream.
                new = [h for _, p, h in registry.seen[len(before):] if p.endswith("/manifests/v1")]
                assert new and all("Authorization" not in h for h in new)
                continue
            if method == "GET":
                assert json.loads(r.data)["errors"][0]["code"] in ("UNKNOWN", "UNAUTHORIZED")
            else:
                assert r.data == b""  # a HEAD answer has no body, also when refused
            assert MARKER.encode() not in r.data
        if 200 not in statuses:
            assert [p for _, p, _ in registry.seen[len(before):] if p not in ("/v2/", "/v2")] == []
        # It keeps serving everybody else (on a connection of their own).
        assert urllib3.PoolManager(retries=False).request("GET", proxy.url + "/healthz").status == 200
    finally:
        proxy.stop()
    written = proxy.everything_written()
    if sabotage.startswith("inner:"):
        # Our wrapper logs where it failed, not the exception's message (it may quote a secret).
        # (A replaced hook has no wrapper: mitmproxy itself logs that exception.)
        assert MARKER.encode() not in written
        assert b"refused" in written
    assert TOKEN.encode() not in written


def test_a_raising_response_hook_never_delivers_an_unprocessed_answer(tmp_path, registry):
    """After the registry answered: the stream is closed rather than passing an unrewritten response."""
    proxy = start_proxy(tmp_path, registry, "inner:addons.rewrite.rewrite_response_headers")
    try:
        with pytest.raises(urllib3.exceptions.HTTPError):
            r = proxy.http.request("GET", proxy.url + TARGET, headers={"Authorization": basic("x", TOKEN)})
            raise AssertionError(f"answered {r.status}")  # pragma: no cover
        assert proxy.http.request("GET", proxy.url + "/healthz").status == 200
    finally:
        proxy.stop()
    assert MARKER.encode() not in proxy.everything_written()
