"""Strangers leave no trace in /metrics: the real proxy, hundreds of unauthenticated requests.

Each request names a different connector, in both address forms (Host header and path). The
metrics must name none of them, must keep the same series, and must not grow beyond the digits of
the counters; an aborted request (a flow that ends in an error) must not break the scrape.
"""

from __future__ import annotations

import http.client
import re
import secrets
import socket
import threading

import pytest
import yaml
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from proxyproc import ProxyProcess, basic, connector, write_manifests

REQUESTS = 300  # per address form


def series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """The proxy's own series (sample name and labels), parsed as Prometheus would."""
    out = set()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("connector_proxy_"):
                out.add((s.name, tuple(sorted(s.labels.items()))))
    return out


def connector_proxy_lines(text: str) -> str:
    """Only the proxy's own lines: the process_* figures change by themselves."""
    return "\n".join(line for line in text.splitlines() if "connector_proxy_" in line)


class SilentRegistry:
    """Accepts connections and never answers: the client times out, its flow ends in an error."""

    MAX_CONNECTIONS = 50

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while len(self.held) < self.MAX_CONNECTIONS:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            self.held.append(conn)

    def close(self):
        self.sock.close()
        for c in self.held:
            c.close()


@pytest.fixture(scope="module")
def lone_proxy(tmp_path_factory):
    """A proxy of its own: the session proxy's counters are shared with other tests."""
    tmp = tmp_path_factory.mktemp("metrics")
    silent = SilentRegistry()
    token = "metrics-" + secrets.token_hex(16)
    write_manifests(tmp / "connectors", "connectors.yaml", [
        connector("default", "harbor", "http://127.0.0.1:9"),
        # a static bearer token: the request goes straight upstream, no challenge probe first
        connector("default", "silent", f"http://127.0.0.1:{silent.port}", "silent-token"),
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "silent-token", "namespace": "default"},
         "type": "Opaque", "stringData": {"token": "robot-" + secrets.token_hex(8)}},
    ])
    tokens = tmp / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"tokens": [{"token": token, "subject": "ci", "connectors": ["*"]}]}))
    try:
        with ProxyProcess(tmp, tmp / "connectors", tokens) as proxy:
            proxy.client_token = token
            yield proxy
    finally:
        silent.close()


def unauthenticated(proxy: ProxyProcess, conn: http.client.HTTPConnection, i: int, tag: str, method: str = "GET",
                    host_form: bool = True) -> int:
    ns, name = f"ns{i}-{tag}", f"name{i}-{tag}"
    if host_form:
        conn.request(method, "/v2/repo/manifests/v1", headers={"Host": f"c-{name}.{ns}.svc.cluster.local"})
    else:
        conn.request(method, f"/v2/namespaces/{ns}/connectors/{name}/repo/manifests/v1",
                     headers={"Host": proxy.host})
    r = conn.getresponse()
    r.read()
    return r.status


def aborted_request(proxy: ProxyProcess, tag: str) -> None:
    """A request whose body never comes: the client gives up (the flow may end in an error)."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(f"PUT /v2/namespaces/ab-{tag}/connectors/ab-{tag}/repo/blobs/uploads/x HTTP/1.1\r\n"
                  f"Host: {proxy.host}\r\nContent-Length: 100000\r\n\r\npartial".encode())


def test_unauthenticated_names_leave_no_trace_in_metrics(lone_proxy):
    proxy = lone_proxy
    tag = secrets.token_hex(4)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    # One of each kind first, so the "-" series exist; then the flood must add none.
    for host_form in (True, False):
        assert unauthenticated(proxy, conn, 0, "warmup", host_form=host_form) == 401
    aborted_request(proxy, "warmup")
    before = proxy.request("GET", "/metrics")
    assert before.status == 200
    text_before = before.data.decode()

    names = []
    for i in range(REQUESTS):
        for host_form in (True, False):
            method = "POST" if i % 7 == 0 else "GET"
            assert unauthenticated(proxy, conn, i, tag, method, host_form) == 401
        names += [f"name{i}-{tag}", f"ns{i}-{tag}"]
        if i % 50 == 0:
            aborted_request(proxy, f"{tag}{i}")
    conn.close()

    after = proxy.request("GET", "/metrics")
    assert after.status == 200
    text_after = after.data.decode()
    leaked = [n for n in names if n in text_after]
    assert not leaked, f"{len(leaked)} caller-chosen names in /metrics, e.g. {leaked[:3]}"
    assert tag not in text_after
    assert after.headers["Content-Type"] == CONTENT_TYPE_LATEST
    assert series(text_after) == series(text_before), "strangers created new series"
    assert all(dict(labels).get("connector", "-") == "-" for _, labels in series(text_after))
    # the counters went up by the 2 x REQUESTS refusals: a few more digits, nothing else
    growth = len(connector_proxy_lines(text_after)) - len(connector_proxy_lines(text_before))
    assert growth <= 16, f"/metrics grew by {growth} bytes"
    refused = {s.labels["status"]: s.value for family in text_string_to_metric_families(text_after)
               for s in family.samples
               if s.name == "connector_proxy_responses_total" and s.labels["connector"] == "-"}
    assert refused.get("401", 0) >= 2 * REQUESTS + 2  # every one of them counted, under "-"
    # and the health endpoints still answer
    assert proxy.request("GET", "/healthz").status == 200
    assert proxy.request("GET", "/readyz").status == 200
    head = proxy.request("HEAD", "/metrics")
    assert head.status == 200 and head.data == b""


def client_times_out(proxy: ProxyProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=1)
    try:
        conn.request("GET", "/v2/namespaces/default/connectors/silent/repo/manifests/v1",
                     headers={"Authorization": basic("x", proxy.client_token)})
        with pytest.raises(TimeoutError):
            conn.getresponse()
    finally:
        conn.close()


def test_metrics_keep_working_after_errors_and_odd_requests(lone_proxy):
    proxy = lone_proxy
    # the same connector, once refused (status 401) and once timed out (status "error")
    assert proxy.request("GET", "/v2/namespaces/default/connectors/silent/repo/manifests/v1").status == 401
    client_times_out(proxy)
    proxy.wait_for(lambda: 'status="error"' in proxy.request("GET", "/metrics").data.decode(), 10)
    for i in range(5):
        aborted_request(proxy, f"odd{i}")
    for method in ("POST", "DELETE", "OPTIONS", "HEAD"):
        assert proxy.request(method, "/metrics?x=\"}{").status == 200
    status, headers, body = proxy.raw_request("GET", "/metrics?name=%22%7D%0Aevil")
    assert status == 200 and b"evil" not in body
    # Each scrape parses; whatever the mix of statuses and errors, every status label is a string.
    text = proxy.request("GET", "/metrics").data.decode()
    counted = {(s.labels["connector"], s.labels["status"]) for f in text_string_to_metric_families(text)
               for s in f.samples if s.name == "connector_proxy_responses_total"}
    assert all(re.fullmatch(r"\d{3}|error|other", status) for _, status in counted), counted
    # the refusal is nobody's; the authorized request that timed out is the connector's
    assert ("-", "401") in counted and ("default/silent", "error") in counted, counted


def test_only_an_authorized_connector_becomes_a_label(lone_proxy):
    """The harbor connector's registry is down (port 9): the authorized request fails upstream."""
    proxy = lone_proxy
    proxy.request("GET", "/v2/namespaces/default/connectors/harbor/repo/manifests/v1",
                  auth=basic("x", proxy.client_token))
    proxy.request("GET", "/v2/namespaces/default/connectors/harbor/repo/manifests/v1", auth=basic("x", "wrong"))
    text = proxy.request("GET", "/metrics").data.decode()
    assert proxy.client_token not in text
    labels = {dict(labels).get("connector") for _, labels in series(text)} - {None}
    assert "default/harbor" in labels  # the authorized request, whatever the registry did
    assert labels <= {"-", "default/harbor", "default/silent"}
