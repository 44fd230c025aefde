"""Upstream token economy and recovery, counted at the real token server."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import urllib3
from mitmproxy.test import taddons, tflow

from addons.routing import Route
from addons.scrub import LateSecrets
from addons.store import ConnectorStore
from addons.upstream_auth import UpstreamCredentials
from conftest import REGISTRY_USER
from localregistry import Registry, TokenServer, make_oci_layout
from proxyproc import ProxyProcess, basic, connector, secret, write_manifests
from test_e2e_clients import authfile_for, run


def test_pushing_n_layers_costs_one_token_per_scope(world, proxy, tmp_path):
    image = make_oci_layout(tmp_path / "img", [40_000] * 6, tag="v1")
    auth = authfile_for(tmp_path, proxy.host, world.builder_token)
    before = len(world.token_server.fetches)
    run(["skopeo", "copy", "--authfile", str(auth), "--dest-tls-verify=false", image.ref,
         f"docker://{proxy.host}/namespaces/default/connectors/harbor/tok/six:v1"])
    run(["skopeo", "copy", "--authfile", str(auth), "--src-tls-verify=false",
         f"docker://{proxy.host}/namespaces/default/connectors/harbor/tok/six:v1", f"oci:{tmp_path / 'back'}:v1"])
    fetches = [f for f in world.token_server.fetches[before:] if any("tok/six" in s for s in f.scopes)]
    per_scope = Counter(f.scopes for f in fetches)
    assert per_scope, "the push fetched no token at all?"
    assert all(n == 1 for n in per_scope.values()), per_scope
    # skopeo made dozens of requests on new connections; the token server saw at most one per scope
    assert len(fetches) <= 2, per_scope


@pytest.fixture
def upstream_in_process(world, tmp_path):
    """The store and upstream addons in-process, with a clock the test controls."""
    write_manifests(tmp_path / "c", "c.yaml", [
        connector("default", "harbor", world.registry.url, "harbor-secret"),
        secret("default", "harbor-secret", REGISTRY_USER, world.registry_password),
    ])
    store = ConnectorStore()
    late = LateSecrets()
    upstream = UpstreamCredentials(store, late)
    now = [1000.0]
    upstream.tokens.clock = lambda: now[0]
    with taddons.context(store, upstream) as tctx:
        tctx.configure(store, connectors_dir=str(tmp_path / "c"))
        yield upstream, now


async def authorize(upstream, path: str) -> str:
    flow = tflow.tflow()
    flow.request.method = "GET"
    Route("path", "default", "harbor", "http://proxy", "namespaces/default/connectors/harbor", path).store(flow)
    await upstream.requestheaders(flow)
    assert flow.response is None, flow.response and flow.response.content
    return upstream.secrets._headers.pop(flow.id)[1]


async def test_expired_token_is_replaced_before_use(world, upstream_in_process):
    upstream, now = upstream_in_process
    http = urllib3.PoolManager()
    path = "/v2/tok/expiry/tags/list"
    before = len(world.token_server.fetches)
    first = await authorize(upstream, path)
    assert await authorize(upstream, path) == first  # cached
    assert len(world.token_server.fetches) == before + 1

    now[0] += world.token_server.expires_in  # past the token's lifetime
    second = await authorize(upstream, path)
    assert second != first
    assert len(world.token_server.fetches) == before + 2
    r = http.request("GET", world.registry.url + path, headers={"Authorization": second})
    assert r.status != 401, r.data  # the fresh token works upstream (404: the repository is new)


def test_revoked_token_is_retried_once_with_a_fresh_one(tmp_path):
    """The registry stops trusting the cached token (signing key rotated, realm moved): bodiless
    requests are retried with a fresh token and the client never sees the 401."""
    users = {"rot": "rot-" + os.urandom(8).hex()}
    ts_old = TokenServer("rot", users).start()
    reg = Registry(tmp_path / "reg", "token", token_server=ts_old).start()
    ts_new = None
    try:
        token = "tok-" + os.urandom(8).hex()
        (tmp_path / "tokens.yaml").write_text(json.dumps({"tokens": [{"token": token, "subject": "t", "connectors": ["*"]}]}))
        write_manifests(tmp_path / "c", "c.yaml", [
            connector("default", "rot", reg.url, "s"), secret("default", "s", "rot", users["rot"]),
        ])
        with ProxyProcess(tmp_path, tmp_path / "c", tmp_path / "tokens.yaml") as proxy:
            auth = basic("x", token)
            path = "/v2/namespaces/default/connectors/rot/rot/app/tags/list"
            assert proxy.request("GET", path, auth=auth).status == 404  # token cached; repo unknown
            port = reg.port
            reg.stop()
            ts_new = TokenServer("rot", users).start()
            reg = Registry(tmp_path / "reg", "token", token_server=ts_new, port=port).start()
            # the first request after the rotation is a bodiless POST: its old-realm token is refused,
            # it is retried with a fresh one, and the retried answer's Location is rewritten
            r = proxy.request("POST", "/v2/namespaces/default/connectors/rot/rot/app/blobs/uploads/", auth=auth)
            assert r.status == 202, r.data
            assert r.headers["Location"].startswith(
                f"{proxy.url}/v2/namespaces/default/connectors/rot/rot/app/blobs/uploads/")
            assert len(ts_new.fetches) == 1
            r = proxy.request("GET", path, auth=auth)
            assert r.status == 404, r.data  # not 401: the new realm's tokens are used from now on
            assert json.loads(r.data)["errors"][0]["code"] == "NAME_UNKNOWN"
        written = proxy.everything_written()
        for s in [token, users["rot"], *ts_old.issued_tokens, *ts_new.issued_tokens]:
            assert s.encode() not in written
    finally:
        reg.stop()
        ts_old.stop()
        if ts_new:
            ts_new.stop()
