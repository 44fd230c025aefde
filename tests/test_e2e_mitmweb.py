"""mitmweb, the debugger, never shows a credential: neither live (websocket updates) nor via its API."""

from __future__ import annotations

import base64
import json
import threading

import websocket

from proxyproc import ProxyProcess
from test_e2e_protocol import Client


def test_mitmweb_shows_flows_without_credentials(world, tmp_path):
    with ProxyProcess(tmp_path, world.connectors_dir, world.tokens_file, web=True) as proxy:
        web = f"127.0.0.1:{proxy.web_port}"
        messages: list[str] = []
        ws = websocket.create_connection(f"ws://{web}/updates?token={proxy.web_password}", timeout=10)
        reader_done = threading.Event()

        def read() -> None:
            try:
                while True:
                    messages.append(ws.recv())
            except Exception:
                reader_done.set()

        threading.Thread(target=read, daemon=True).start()
        c = Client(proxy, world.builder_token)
        c.upload_chunked("web/app", b"x" * 50_000, chunks=2)
        c.call("GET", c.v2("web/app/tags/list"))
        c.call("GET", c.v2("web/app/manifests/v1"))
        # the rendered configuration carries the caller's token: the client gets it, the UI must not
        for fmt in ("json", "tar"):
            r = proxy.request("GET", f"/.connectors/config?use=default/harbor&names=registry-config&format={fmt}",
                              auth=f"Bearer {world.builder_token}")
            assert r.status == 200 and world.builder_token.encode() in r.data
        # the API's view of every flow, as the UI loads it
        flows = proxy.http.request("GET", f"http://{web}/flows", headers={"Authorization": f"Bearer {proxy.web_password}"})
        dump = proxy.http.request("GET", f"http://{web}/flows/dump", headers={"Authorization": f"Bearer {proxy.web_password}"})
        ws.close()
        reader_done.wait(10)
        assert flows.status == 200 and dump.status == 200
        listed = json.loads(flows.data)
        assert len(listed) >= 6
        # the upstream credential was there (redacted), so the check is not vacuous
        assert any("<redacted>" in json.dumps(f["request"]["headers"]) for f in listed)
        assert any('"flows/add"' in m for m in messages) and any('"flows/update"' in m for m in messages)
        shown = "\n".join(messages).encode() + flows.data + dump.data
        config_flows = [f for f in listed if f["request"]["path"].startswith("/.connectors/config")]
        assert len(config_flows) == 2
        for f in config_flows:
            body = proxy.http.request("GET", f"http://{web}/flows/{f['id']}/response/content.data",
                                      headers={"Authorization": f"Bearer {proxy.web_password}"})
            assert body.status == 200
            assert b"not recorded" in body.data
            shown += body.data
        for s in world.secrets + [base64.b64encode(f"connector-proxy:{world.builder_token}".encode()).decode()]:
            i = shown.find(s.encode())
            assert i < 0, shown[max(0, i - 600):i + 50]
