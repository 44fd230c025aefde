"""No registry password, upstream token or client token in anything the proxy writes or returns."""

from __future__ import annotations

import json
import os

from mitmproxy import io as mitmio

from localregistry import make_oci_layout
from proxyproc import ProxyProcess, basic
from test_e2e_clients import authfile_for, run
from test_e2e_protocol import Client


def test_nothing_secret_in_logs_flows_or_responses(world, tmp_path):
    seen_by_clients: list[bytes] = []

    def keep(r):
        seen_by_clients.append(repr(dict(r.headers)).encode() + r.data)
        return r

    with ProxyProcess(tmp_path, world.connectors_dir, world.tokens_file) as proxy:
        # real client traffic: a push and a pull
        image = make_oci_layout(tmp_path / "img", [30_000, 60_000], tag="v1")
        auth = authfile_for(tmp_path, proxy.host, world.builder_token)
        ref = f"docker://{proxy.host}/namespaces/default/connectors/harbor/leak/app:v1"
        run(["skopeo", "copy", "--authfile", str(auth), "--dest-tls-verify=false", image.ref, ref])
        run(["skopeo", "copy", "--authfile", str(auth), "--src-tls-verify=false", ref, f"oci:{tmp_path / 'back'}:v1"])
        # raw traffic covering every outcome: uploads, 401, 403, 404, 502, 503, insufficient scope, Basic upstream
        c = Client(proxy, world.builder_token)
        c.upload_chunked("leak/raw", os.urandom(20_000), chunks=2)
        keep(c.call("GET", c.v2("leak/app/manifests/v1"), headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}))
        keep(c.call("GET", c.v2("leak/app/tags/list")))
        keep(c.call("POST", c.v2("leak/app/blobs/uploads/")))
        other = Client(proxy, world.builder_token, prefix="/v2/namespaces/team/connectors/other")
        keep(other.call("POST", other.v2("leak/ht/blobs/uploads/")))
        for auth_header in (None, basic("x", "wrong"), basic("x", world.team_token), f"Bearer {world.builder_token}"):
            keep(proxy.request("GET", "/v2/namespaces/default/connectors/harbor/leak/app/manifests/v1", auth=auth_header))
        for name in ("down", "broken", "readonly", "nope"):
            keep(proxy.request("POST", f"/v2/namespaces/default/connectors/{name}/leak/x/blobs/uploads/",
                               auth=basic("x", world.builder_token)))
        keep(proxy.request("GET", "/metrics"))

    written = proxy.everything_written()
    assert b"GET" in written and len(written) > 10_000  # the search covers real, verbose output
    secrets = [s.encode() for s in world.secrets]
    assert len(world.token_server.issued_tokens) > 0
    for s in secrets:
        assert s not in written, "a secret was written by the proxy"
        for body in seen_by_clients:
            assert s not in body, "a secret was sent to a client"
    # base64 forms too: Basic credentials travel encoded
    import base64
    for user, pw in (("pusher", world.registry_password), ("htuser", world.ht_password)):
        assert base64.b64encode(f"{user}:{pw}".encode()) not in written

    # the flow file is valid, and shows that credentials were there and were redacted
    with proxy.flows_path.open("rb") as f:
        flows = list(mitmio.FlowReader(f).stream())
    assert len(flows) > 20
    # the out-of-band probe and token fetches are recorded too, with the token replaced
    token_flows = [fl for fl in flows if fl.metadata.get("connector_proxy_replay", {}).get("kind") == "token"]
    assert token_flows and all(json.loads(fl.response.content)["token"] == "<redacted>" for fl in token_flows)
    assert any(fl.metadata.get("connector_proxy_replay", {}).get("kind") == "probe" for fl in flows)
    injected = [fl for fl in flows if "authorization" in fl.request.headers]
    assert injected, "no flow shows the (redacted) upstream credential"
    assert all("<redacted>" in fl.request.headers["authorization"] for fl in injected)
