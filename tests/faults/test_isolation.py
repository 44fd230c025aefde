"""One tenant never hurts another: a registry whose token server hangs delays only its own requests.

The slow connector's token server blocks every token request until the test releases it. With
upstream calls on a shared executor, 24 concurrent requests for distinct repositories (24
token fetches) would take every worker and the fast connector's request would wait behind them;
here it is answered while the slow ones are still blocked. No timing is asserted: the fast answer
must arrive before the test releases the slow token server.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import urllib3
import yaml

from proxyproc import ProxyProcess, basic, connector, secret, write_manifests

TOKEN = "isolation-client-token-0123456789"


class TokenRegistry:
    """A registry and its token server in one: `/token` waits for `release` when `hold` is set."""

    def __init__(self, hold: bool):
        self.release = threading.Event()
        self.token_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _send(self, status, body=b"{}", headers=()):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self):
                if self.path.startswith("/token"):
                    with outer.lock:
                        outer.token_requests += 1
                        outer.in_flight += 1
                        outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                    if hold:
                        outer.release.wait(60)
                    with outer.lock:
                        outer.in_flight -= 1
                    return self._send(200, json.dumps({"token": "t-" + "x" * 20, "expires_in": 300}).encode())
                if "Authorization" not in self.headers:
                    realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
                    return self._send(401, b"{}", [("WWW-Authenticate", f'Bearer realm="{realm}",service="r"')])
                return self._send(200)

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def two_tenants(tmp_path):
    slow, fast = TokenRegistry(hold=True), TokenRegistry(hold=False)
    write_manifests(tmp_path / "connectors", "c.yaml", [
        connector("default", "slow", slow.url, "s"), secret("default", "s", "u", "slow-password-123"),
        connector("default", "fast", fast.url, "f"), secret("default", "f", "u", "fast-password-123"),
    ])
    (tmp_path / "tokens.yaml").write_text(yaml.safe_dump({"tokens": [{"token": TOKEN, "subject": "t", "connectors": ["*"]}]}))
    proxy = ProxyProcess(tmp_path, tmp_path / "connectors", tmp_path / "tokens.yaml").start()
    yield proxy, slow, fast
    slow.close()
    proxy.stop()
    fast.close()


def test_a_hanging_token_server_delays_only_its_own_connector(two_tenants):
    proxy, slow, fast = two_tenants
    auth = {"Authorization": basic("x", TOKEN)}
    http = urllib3.PoolManager(maxsize=16, retries=False, timeout=urllib3.Timeout(connect=5, read=60))
    with ThreadPoolExecutor(24) as pool:
        stuck = [pool.submit(http.request, "GET", f"{proxy.url}/v2/namespaces/default/connectors/slow/repo{i}/tags/list",
                             headers=auth) for i in range(24)]
        deadline = time.monotonic() + 20
        while slow.in_flight < 4:  # the slow connector has taken all it may take
            assert time.monotonic() < deadline, f"only {slow.in_flight} token fetches arrived"
            time.sleep(0.01)  # waiting for a state, bounded by the deadline
        # The fast connector answers while all eight slow requests are still blocked upstream.
        r = urllib3.request("GET", f"{proxy.url}/v2/namespaces/default/connectors/fast/repo/tags/list", headers=auth,
                            timeout=urllib3.Timeout(connect=5, read=20), retries=False)
        assert r.status == 200, r.data
        assert not any(f.done() for f in stuck), "the slow token server was released early"
        slow.release.set()
        assert [f.result().status for f in stuck] == [200] * 24
    assert slow.max_in_flight == 4  # never more than upstream_concurrency of its calls at once
