"""A registry that stalls, trickles, resets or dies mid-stream: the client gets a closed stream or
a clear error, never a hang and never a wrong body, and the proxy keeps serving everybody else.

The real registry (token auth) sits behind `FaultProxy`; the token server is reached directly.
"""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
import urllib3

from conftest import REGISTRY_USER
from faults.faultproxy import FaultProxy
from localregistry import make_oci_layout
from proxyproc import ProxyProcess, basic, connector, secret, write_manifests
from test_e2e_clients import run

BLOB_SIZE = 3 * 1024 * 1024


@pytest.fixture(scope="module")
def faulty(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    host, port = world.registry.host.rsplit(":", 1)
    fp = FaultProxy((host, int(port)))
    d = tmp / "connectors"
    write_manifests(d, "c.yaml", [
        connector("default", "faulty", fp.url, "faulty-secret"),
        secret("default", "faulty-secret", REGISTRY_USER, world.registry_password),
        connector("default", "steady", world.registry.url, "steady-secret"),
        secret("default", "steady-secret", REGISTRY_USER, world.registry_password),
    ])
    proxy = ProxyProcess(tmp, d, world.tokens_file, extra=("--set", "upstream_idle_timeout=3")).start()
    # One image with a 3 MiB layer, pushed straight through the steady connector.
    image = make_oci_layout(tmp / "img", [BLOB_SIZE], tag="v1")
    auth = tmp / "auth.json"
    auth.write_text(json.dumps({"auths": {proxy.host: {"auth": base64.b64encode(f"x:{world.builder_token}".encode()).decode()}}}))
    run(["skopeo", "copy", "--authfile", str(auth), "--dest-tls-verify=false", image.ref,
         f"docker://{proxy.host}/namespaces/default/connectors/steady/faults/app:v1"])
    yield proxy, fp, image, None
    proxy.stop()
    fp.stop()


def blob_digest(proxy, world) -> tuple[str, int]:
    r = proxy.request("GET", "/v2/namespaces/default/connectors/steady/faults/app/manifests/v1",
                      auth=basic("x", world.builder_token),
                      headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert r.status == 200, r.data
    layer = max(json.loads(r.data)["layers"], key=lambda l: l["size"])
    return layer["digest"], layer["size"]


def fetch(proxy, world, digest: str):
    """GET the blob through the faulty connector; (status, body, error) with the body as far as it came."""
    http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=60))
    body = b""
    try:
        r = http.request("GET", f"{proxy.url}/v2/namespaces/default/connectors/faulty/faults/app/blobs/{digest}",
                         headers={"Authorization": basic("x", world.builder_token)}, preload_content=False,
                         redirect=False)
        for chunk in r.stream(65536):
            body += chunk
        return r.status, body, None
    except urllib3.exceptions.ReadTimeoutError as e:
        raise AssertionError("the client hung until its own read timeout") from e
    except (urllib3.exceptions.ProtocolError, urllib3.exceptions.HTTPError) as e:
        return None, body, e


@pytest.mark.parametrize("fault", ["close_body:200000", "reset_body:200000", "stall_body:200000", "stall_head"])
def test_a_failing_registry_never_yields_a_wrong_body_or_a_hang(world, faulty, fault):
    proxy, fp, _, _ = faulty
    digest, size = blob_digest(proxy, world)
    fp.fault = fault
    try:
        status, body, error = fetch(proxy, world, digest)
    finally:
        fp.fault = "pass"
    # Either the stream was cut (the client can tell: an error or a short body) or a JSON error.
    if error is None:
        if status == 200:
            assert len(body) < size, "a cut stream must not look complete"
        else:
            assert status in (502, 504), status
    else:
        assert len(body) < size
    # Nobody else is hurt, and the same request works again at once.
    status, body, error = fetch(proxy, world, digest)
    assert error is None and status == 200
    assert "sha256:" + hashlib.sha256(body).hexdigest() == digest


def test_a_trickling_registry_still_delivers_the_right_body(world, faulty):
    proxy, fp, _, _ = faulty
    digest, size = blob_digest(proxy, world)
    fp.fault = "trickle:16384"
    try:
        status, body, error = fetch(proxy, world, digest)
    finally:
        fp.fault = "pass"
    assert error is None and status == 200 and len(body) == size
    assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
