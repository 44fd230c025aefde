"""The upstream pool: small exchanges share kept-alive registry connections across client connections.

Pure parts first (what may be pooled, the headers sent, the response built), then the real thing:
the proxy in front of the real token-auth registry, with a counting TCP relay between them, so the
number of upstream connections is seen, not assumed. The same requests through a proxy with the
pool off are the contrast.
"""

from __future__ import annotations

import hashlib
import http.client as httpclient
import json
import socket

import pytest
from mitmproxy import http

from addons.upstream_auth import response_from_upstream
from addons.upstream_pool import poolable, request_headers
from conftest import REGISTRY_USER
from proxyproc import ProxyProcess, basic, connector, secret, write_manifests
from tcp_balancer import TcpBalancer

REPO = "pool/app"
CLIENTS = 20  # fresh client connections per measurement


# ---------------------------------------------------------------- pure


@pytest.mark.parametrize("method, path, has_body, buffered, expected", [
    ("HEAD", "/v2/a/blobs/sha256:1", False, True, True),
    ("GET", "/v2/a/manifests/v1", False, True, True),
    ("GET", "/v2/a/tags/list", False, True, True),
    ("GET", "/v2/a/blobs/sha256:1", False, True, False),  # may be gigabytes: streamed
    ("GET", "/v2/a/blobs/uploads/123", False, True, False),  # conservative: anything under /blobs/
    ("POST", "/v2/a/blobs/uploads/", False, True, True),
    ("PUT", "/v2/a/blobs/uploads/123", False, True, True),  # the final PUT of a chunked upload
    ("PUT", "/v2/a/manifests/v1", True, True, True),  # a small manifest, held whole
    ("PUT", "/v2/a/blobs/uploads/123", True, False, False),  # a monolithic upload streams
    ("PATCH", "/v2/a/blobs/uploads/123", True, False, False),
    ("DELETE", "/v2/a/manifests/sha256:1", False, True, True),
    ("GET", "/v2/_catalog", False, True, False),  # filtered by the policy addon, with its own cap
])
def test_what_may_be_pooled(method, path, has_body, buffered, expected):
    assert poolable(method, path, has_body, buffered) is expected


def test_request_headers_drop_hop_by_hop_and_credentials_and_carry_the_injected_one():
    request = http.Request.make("GET", "http://r.example/v2/a/manifests/v1", headers=[
        (b"Accept", b"application/vnd.oci.image.manifest.v1+json"),
        (b"Accept", b"application/vnd.oci.image.index.v1+json"),
        (b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"),
        (b"Authorization", b"Basic Y2xpZW50OnRva2Vu"), (b"Proxy-Authorization", b"Basic eA=="),
        (b"Content-Length", b"0"), (b"Host", b"r.example"),
    ])
    sent = request_headers(request, ("Authorization", "Bearer upstream"))
    assert sent == {
        "Accept": "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
        "Host": "r.example",
        "Authorization": "Bearer upstream",
    }
    assert "Authorization" not in request_headers(request, None)


def test_a_head_answer_keeps_the_length_of_what_get_sends():
    r = response_from_upstream("HEAD", 200, "OK", [("Content-Length", "1048576"), ("Docker-Content-Digest", "sha256:1")], b"")
    assert r.headers["content-length"] == "1048576" and r.raw_content == b""


def test_a_body_read_whole_gets_its_own_length_and_loses_its_transfer_coding():
    r = response_from_upstream("GET", 200, "OK", [("Transfer-Encoding", "chunked"), ("Connection", "close"),
                                                  ("Content-Type", "application/json")], b'{"tags":[]}')
    assert r.headers.get("transfer-encoding") is None and r.headers.get("connection") is None
    assert r.headers["content-length"] == "11" and r.raw_content == b'{"tags":[]}'
    assert r.headers["content-type"] == "application/json"


def test_no_body_statuses_get_no_length_invented():
    r = response_from_upstream("DELETE", 202, "Accepted", [("Content-Length", "0")], b"")
    assert r.headers["content-length"] == "0"
    r = response_from_upstream("GET", 304, "Not Modified", [], b"")
    assert "content-length" not in r.headers


# ---------------------------------------------------------------- on the wire


class Pooled:
    def __init__(self, relay: TcpBalancer, on: ProxyProcess, off: ProxyProcess, token: str, manifest: bytes,
                 digest: str, blob: bytes, blob_digest: str):
        self.relay, self.on, self.off, self.token = relay, on, off, token
        self.manifest, self.digest, self.blob, self.blob_digest = manifest, digest, blob, blob_digest

    def auth(self) -> dict[str, str]:
        return {"Authorization": basic("ci", self.token)}


@pytest.fixture(scope="module")
def pooled(world, tmp_path_factory):
    relay = TcpBalancer([("127.0.0.1", world.registry.port)]).start()
    tmp = tmp_path_factory.mktemp("pool")
    write_manifests(tmp / "connectors", "pooled.yaml", [
        connector("default", "pooled", relay.url, "pooled-secret"),
        secret("default", "pooled-secret", REGISTRY_USER, world.registry_password),
    ])
    (tmp / "on").mkdir()
    (tmp / "off").mkdir()
    on = ProxyProcess(tmp / "on", tmp / "connectors", world.tokens_file)
    off = ProxyProcess(tmp / "off", tmp / "connectors", world.tokens_file, extra=("--set", "upstream_pool=false"))
    try:
        on.start()
        off.start()
        yield Pooled(relay, on, off, world.builder_token, *push_image(on, world.builder_token))
    finally:  # also when the set-up failed half-way: no proxy outlives the module
        on.stop()
        off.stop()
        relay.stop()
    for proxy in (on, off):
        written = proxy.everything_written()
        leaked = [i for i, s in enumerate(world.secrets) if s.encode() in written]
        assert not leaked, f"secrets #{leaked} appear in what {proxy.workdir} wrote"


def push_image(on: ProxyProcess, token: str) -> tuple[bytes, str, bytes, str]:
    """A blob, a config and a manifest pushed through the pooling proxy: (manifest, digest, blob, digest)."""
    blob = b"pooled layer " * 1000
    blob_digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    prefix = f"/v2/namespaces/default/connectors/pooled/{REPO}"
    headers = {"Authorization": basic("ci", token)}

    def upload(data: bytes, digest: str) -> None:
        r = on.http.request("POST", on.url + f"{prefix}/blobs/uploads/", headers=headers)
        assert r.status == 202, r.data
        location = r.headers["Location"]
        url = (location if location.startswith("http") else on.url + location)
        r = on.http.request("PUT", url + ("&" if "?" in url else "?") + f"digest={digest}",
                            body=data, headers={**headers, "Content-Type": "application/octet-stream"})
        assert r.status == 201, r.data

    upload(blob, blob_digest)
    config = b"{}"
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    upload(config, config_digest)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": blob_digest, "size": len(blob)}],
    }).encode()
    r = on.http.request("PUT", on.url + f"{prefix}/manifests/v1", body=manifest,
                        headers={**headers, "Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert r.status == 201, r.data
    return manifest, "sha256:" + hashlib.sha256(manifest).hexdigest(), blob, blob_digest


def fresh_connection_exchange(proxy: ProxyProcess, method: str, path: str, headers: dict[str, str]):
    conn = httpclient.HTTPConnection(proxy.host.split(":")[0], proxy.port, timeout=30)
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def metric(proxy: ProxyProcess, name: str) -> float:
    text = proxy.http.request("GET", proxy.url + "/metrics").data.decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_small_exchanges_of_many_client_connections_share_few_upstream_connections(pooled):
    path = f"/v2/namespaces/default/connectors/pooled/{REPO}/manifests/v1"
    headers = {**pooled.auth(), "Accept": "application/vnd.oci.image.manifest.v1+json"}
    for proxy in (pooled.on, pooled.off):  # warm: probe and token fetched, one upstream connection open
        assert fresh_connection_exchange(proxy, "GET", path, headers)[0] == 200

    def upstream_connections_for(proxy: ProxyProcess) -> int:
        before = pooled.relay.counts[0]
        for i in range(CLIENTS):
            status, hdrs, body = fresh_connection_exchange(proxy, "HEAD" if i % 2 else "GET", path, headers)
            assert status == 200 and hdrs["docker-content-digest"] == pooled.digest
            assert hdrs["content-length"] == str(len(pooled.manifest))
            assert body == (b"" if i % 2 else pooled.manifest)
        return pooled.relay.counts[0] - before

    pooled_before = metric(pooled.on, "connector_proxy_upstream_pooled_total")
    assert upstream_connections_for(pooled.on) <= 1  # the warm connection serves all, maybe one more
    assert metric(pooled.on, "connector_proxy_upstream_pooled_total") - pooled_before == CLIENTS
    assert upstream_connections_for(pooled.off) == CLIENTS  # the contrast: one per client connection


def test_a_blob_get_streams_through_mitmproxy_not_the_pool(pooled):
    path = f"/v2/namespaces/default/connectors/pooled/{REPO}/blobs/{pooled.blob_digest}"
    before = metric(pooled.on, "connector_proxy_upstream_pooled_total")
    status, hdrs, body = fresh_connection_exchange(pooled.on, "GET", path, pooled.auth())
    assert status == 200 and body == pooled.blob
    assert metric(pooled.on, "connector_proxy_upstream_pooled_total") == before
    # Its HEAD is pooled, and says the GET's length.
    status, hdrs, body = fresh_connection_exchange(pooled.on, "HEAD", path, pooled.auth())
    assert status == 200 and body == b"" and hdrs["content-length"] == str(len(pooled.blob))
    assert metric(pooled.on, "connector_proxy_upstream_pooled_total") == before + 1


def test_a_kept_alive_connection_sends_its_first_request_over_the_pool_and_the_rest_over_its_own(pooled):
    """HEAD, 404s, GETs in a row on one connection, the first pooled, the others over mitmproxy's
    own connection (cheaper once open): every answer has exactly its Content-Length bytes (none after
    a HEAD), so the next answer starts where it should."""
    from test_e2e_framing import exchange

    pooled_before = metric(pooled.on, "connector_proxy_upstream_pooled_total")
    upstream_before = pooled.relay.counts[0]
    prefix = f"/v2/namespaces/default/connectors/pooled/{REPO}"
    conn = socket.create_connection(("127.0.0.1", pooled.on.port), timeout=30)
    headers = {**pooled.auth(), "Host": pooled.on.host, "Accept": "application/vnd.oci.image.manifest.v1+json"}
    try:
        status, hdrs, body = exchange(conn, "HEAD", f"{prefix}/manifests/v1", headers)
        assert (status, body, hdrs["content-length"]) == (200, b"", str(len(pooled.manifest)))
        status, hdrs, body = exchange(conn, "HEAD", f"{prefix}/manifests/missing", headers)
        assert status == 404 and body == b"" and int(hdrs["content-length"]) > 0
        status, hdrs, body = exchange(conn, "GET", f"{prefix}/manifests/missing", headers)
        assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        status, hdrs, body = exchange(conn, "GET", f"{prefix}/manifests/v1", headers)
        assert status == 200 and body == pooled.manifest
        status, hdrs, body = exchange(conn, "GET", f"{prefix}/tags/list", headers)
        assert status == 200 and json.loads(body)["tags"] == ["v1"]
    finally:
        conn.close()
    assert metric(pooled.on, "connector_proxy_upstream_pooled_total") - pooled_before == 1
    assert pooled.relay.counts[0] - upstream_before <= 2  # mitmproxy's one (and at most one more for the pool)


def test_an_unreachable_registry_is_answered_in_the_registry_error_format(pooled, world, tmp_path):
    """A pooled POST to a registry that is gone: a JSON 502 for the client, and the proxy serves on."""
    relay = TcpBalancer([("127.0.0.1", world.registry.port)]).start()
    write_manifests(tmp_path / "connectors", "gone.yaml", [
        connector("default", "gone", relay.url, "gone-secret"),
        secret("default", "gone-secret", REGISTRY_USER, world.registry_password),
    ])
    proxy = ProxyProcess(tmp_path, tmp_path / "connectors", world.tokens_file).start()
    try:
        prefix = f"/v2/namespaces/default/connectors/gone/{REPO}"
        status, _, _ = fresh_connection_exchange(proxy, "POST", f"{prefix}/blobs/uploads/", pooled.auth())
        assert status == 202  # pooled, through the relay
        relay.stop()
        status, hdrs, body = fresh_connection_exchange(proxy, "POST", f"{prefix}/blobs/uploads/", pooled.auth())
        assert status in (502, 504) and json.loads(body)["errors"][0]["code"] in ("UNAVAILABLE", "UNAUTHORIZED")
        assert fresh_connection_exchange(proxy, "GET", "/healthz", {})[0] == 200
    finally:
        proxy.stop()
