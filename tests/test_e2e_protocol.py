"""The distribution API through the proxy, request by request, against the real registry.

Covers what naive proxies break: upload-session Locations, pagination Links, cross-repo mounts,
Range requests, HEAD, DELETE, and both address forms.
"""

from __future__ import annotations

import hashlib
import json
import os
from urllib.parse import urlsplit

import pytest

from proxyproc import basic

PATH_PREFIX = "/v2/namespaces/default/connectors/harbor"
HOST_FORM = "c-harbor.default.svc.cluster.local"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Client:
    """A registry client speaking raw HTTP to the proxy in one address form."""

    def __init__(self, proxy, token: str, prefix: str = PATH_PREFIX, host: str | None = None):
        self.proxy = proxy
        self.auth = basic("client", token)
        self.prefix = prefix
        self.host = host

    def call(self, method: str, path: str, **kw):
        return self.proxy.request(method, path, auth=self.auth, host=self.host, **kw)

    def follow(self, method: str, location: str, **kw):
        """Use a Location as a client would: its path and query, sent to the proxy with its host."""
        parts = urlsplit(location)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        host = parts.netloc if self.host else None
        return self.proxy.request(method, path, auth=self.auth, host=host, **kw)

    def v2(self, repo_path: str) -> str:
        return f"{self.prefix}/{repo_path}"

    def upload_chunked(self, repo: str, data: bytes, chunks: int = 3) -> str:
        r = self.call("POST", self.v2(f"{repo}/blobs/uploads/"))
        assert r.status == 202, r.data
        location = r.headers["Location"]
        step = -(-len(data) // chunks)
        offset = 0
        while offset < len(data):
            chunk = data[offset:offset + step]
            r = self.follow("PATCH", location, body=chunk, headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
            })
            assert r.status == 202, r.data
            location = r.headers["Location"]
            offset += len(chunk)
        sep = "&" if "?" in location else "?"
        r = self.follow("PUT", f"{location}{sep}digest={digest_of(data)}")
        assert r.status == 201, r.data
        return location

    def upload_monolithic(self, repo: str, data: bytes) -> None:
        r = self.call("POST", self.v2(f"{repo}/blobs/uploads/"))
        assert r.status == 202, r.data
        location = r.headers["Location"]
        sep = "&" if "?" in location else "?"
        r = self.follow("PUT", f"{location}{sep}digest={digest_of(data)}", body=data,
                        headers={"Content-Type": "application/octet-stream"})
        assert r.status == 201, r.data

    def put_manifest(self, repo: str, tag: str, layers: list[bytes]) -> tuple[str, bytes]:
        config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        self.upload_monolithic(repo, config)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest_of(config), "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest_of(b), "size": len(b)} for b in layers],
        }).encode()
        r = self.call("PUT", self.v2(f"{repo}/manifests/{tag}"), body=manifest, headers={"Content-Type": MANIFEST_TYPE})
        assert r.status == 201, r.data
        return digest_of(manifest), manifest


@pytest.fixture
def client(world, proxy):
    return Client(proxy, world.builder_token)


def test_chunked_upload_rewrites_location_to_path_form(client, proxy):
    data = os.urandom(300_000)
    r = client.call("POST", client.v2("proto/chunked/blobs/uploads/"))
    assert r.status == 202
    location = r.headers["Location"]
    assert location.startswith(f"{proxy.url}{PATH_PREFIX}/proto/chunked/blobs/uploads/"), location
    assert "_state=" in location
    client.upload_chunked("proto/chunked", data)
    r = client.call("GET", client.v2(f"proto/chunked/blobs/{digest_of(data)}"))
    assert r.status == 200 and r.data == data


@pytest.mark.parametrize("host", [HOST_FORM, f"{HOST_FORM}:8080", "c-harbor.default.svc", "c-harbor.default"])
def test_host_form_push_and_pull(world, proxy, host):
    c = Client(proxy, world.builder_token, prefix="/v2", host=host)
    r = c.call("GET", "/v2/")
    assert r.status == 200
    r = c.call("POST", "/v2/proto/hostform/blobs/uploads/")
    assert r.status == 202
    assert r.headers["Location"].startswith(f"http://{host}/v2/proto/hostform/blobs/uploads/"), r.headers["Location"]
    layer = os.urandom(50_000)
    c.upload_chunked("proto/hostform", layer, chunks=2)
    digest, manifest = c.put_manifest("proto/hostform", "v1", [layer])
    r = c.call("GET", "/v2/proto/hostform/manifests/v1", headers={"Accept": MANIFEST_TYPE})
    assert r.status == 200 and r.data == manifest
    assert r.headers["Docker-Content-Digest"] == digest


def test_monolithic_upload_head_range_and_delete(client):
    layer = os.urandom(100_000)
    client.upload_monolithic("proto/mono", layer)
    digest, manifest = client.put_manifest("proto/mono", "v1", [layer])

    r = client.call("HEAD", client.v2("proto/mono/manifests/v1"), headers={"Accept": MANIFEST_TYPE})
    assert r.status == 200
    assert r.headers["Docker-Content-Digest"] == digest
    assert int(r.headers["Content-Length"]) == len(manifest)

    r = client.call("GET", client.v2(f"proto/mono/blobs/{digest_of(layer)}"), headers={"Range": "bytes=10-19"})
    assert r.status == 206
    assert r.data == layer[10:20]
    assert r.headers["Content-Range"].startswith("bytes 10-19/")

    r = client.call("DELETE", client.v2(f"proto/mono/manifests/{digest}"))
    assert r.status == 202, r.data
    r = client.call("GET", client.v2("proto/mono/manifests/v1"), headers={"Accept": MANIFEST_TYPE})
    assert r.status == 404
    assert json.loads(r.data)["errors"][0]["code"] == "MANIFEST_UNKNOWN"


def test_cross_repo_mount_in_path_form(client, world):
    layer = os.urandom(80_000)
    client.upload_chunked("proto/mount-src", layer, chunks=1)
    source = "namespaces/default/connectors/harbor/proto/mount-src"
    r = client.call("POST", client.v2(f"proto/mount-dst/blobs/uploads/?mount={digest_of(layer)}&from={source}"))
    assert r.status == 201, r.data  # mounted, not a new upload session
    assert r.headers["Location"].startswith(f"{world.proxy.url}{PATH_PREFIX}/proto/mount-dst/blobs/")
    r = client.call("HEAD", client.v2(f"proto/mount-dst/blobs/{digest_of(layer)}"))
    assert r.status == 200


def test_mount_from_another_connector_becomes_plain_upload(client):
    layer = os.urandom(1000)
    source = "namespaces/team/connectors/other/proto/elsewhere"
    r = client.call("POST", client.v2(f"proto/mount-x/blobs/uploads/?mount={digest_of(layer)}&from={source}"))
    assert r.status == 202, r.data
    assert "/blobs/uploads/" in r.headers["Location"]


def test_tag_list(client):
    layer = os.urandom(2000)
    client.upload_monolithic("proto/tags", layer)
    for tag in ("a", "b", "c"):
        client.put_manifest("proto/tags", tag, [layer])
    r = client.call("GET", client.v2("proto/tags/tags/list"))
    assert r.status == 200
    assert sorted(json.loads(r.data)["tags"]) == ["a", "b", "c"]


def test_catalog_pagination_link_is_rewritten_to_host_form(world, proxy):
    # distribution 2.8 paginates the catalog (not tag lists) with Link headers; the catalog has no
    # repository, so it is reachable in the host form only.
    c = Client(proxy, world.builder_token, prefix="/v2", host=HOST_FORM)
    layer = os.urandom(1000)
    for i in range(5):
        c.upload_monolithic(f"catalog/repo{i}", layer)
    seen: list[str] = []
    path, pages = "/v2/_catalog?n=2", 0
    while True:
        r = c.call("GET", path)
        assert r.status == 200, r.data
        seen += json.loads(r.data)["repositories"]
        pages += 1
        link = r.headers.get("Link")
        if not link:
            break
        target = link.split(";")[0].strip("<> ")
        assert target.startswith(f"http://{HOST_FORM}/v2/_catalog?"), link
        assert 'rel="next"' in link
        path = target[len(f"http://{HOST_FORM}"):]
    assert {f"catalog/repo{i}" for i in range(5)} <= set(seen)
    assert pages >= 3


def test_two_connectors_two_registries_no_cross_talk(world, proxy):
    harbor = Client(proxy, world.builder_token)
    other = Client(proxy, world.builder_token, prefix="/v2/namespaces/team/connectors/other")
    a, b = os.urandom(5000), os.urandom(5000)
    harbor.upload_monolithic("iso/a", a)
    other.upload_monolithic("iso/b", b)
    # each blob is only in its own registry
    assert harbor.call("HEAD", harbor.v2(f"iso/a/blobs/{digest_of(a)}")).status == 200
    assert other.call("HEAD", other.v2(f"iso/b/blobs/{digest_of(b)}")).status == 200
    assert harbor.call("HEAD", harbor.v2(f"iso/b/blobs/{digest_of(b)}")).status == 404
    assert other.call("HEAD", other.v2(f"iso/a/blobs/{digest_of(a)}")).status == 404
    # and upstream, with each registry's own credentials
    r = world.proxy.http.request("GET", f"{world.ht_registry.url}/v2/_catalog",
                                 headers={"Authorization": basic("htuser", world.ht_password)})
    assert "iso/b" in json.loads(r.data)["repositories"]
    assert "iso/a" not in json.loads(r.data)["repositories"]
