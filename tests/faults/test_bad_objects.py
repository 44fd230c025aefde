"""One bad manifest or Secret never stops the store: every other connector keeps working, live and
after a restart, and the bad one answers 503 saying why.

Both backends: the directory store (a file per bad object, next to good ones) and the Kubernetes
store (the real kubernetes client against the fake API server).
"""

from __future__ import annotations

import base64
import json

import pytest
import yaml

from fake_apiserver import FakeApiServer
from proxyproc import ProxyProcess, basic, connector, secret, write_manifests

GROUP = "connectors.alauda.io"

# Valid YAML, wrong types: each of these once killed the directory store's polling task.
BAD_FILES = {
    "params-int.yaml": "apiVersion: connectors.alauda.io/v1alpha1\nkind: Connector\nmetadata: {name: bad1}\n"
                       "spec: {address: 'http://127.0.0.1:1', connectorClassName: oci, auth: {name: tokenAuth, params: 5}}\n",
    "ext-bool.yaml": "apiVersion: connectors.alauda.io/v1alpha1\nkind: Connector\nmetadata: {name: bad2}\n"
                     "spec: {address: 'http://127.0.0.1:1', connectorClassName: oci, addressExtensions: true}\n",
    "list-items.yaml": "apiVersion: v1\nkind: List\nitems: 5\n",
    "auths-list.yaml": "apiVersion: v1\nkind: Secret\nmetadata: {name: dcj}\ntype: kubernetes.io/dockerconfigjson\n"
                       "stringData: {.dockerconfigjson: '{\"auths\":[1]}'}\n---\n"
                       "apiVersion: connectors.alauda.io/v1alpha1\nkind: Connector\nmetadata: {name: bad3}\n"
                       "spec: {address: 'http://127.0.0.1:1', connectorClassName: oci, auth: {name: tokenAuth, secretRef: {name: dcj}}}\n",
    "alias.yaml": "a: &a [*a]\n",
}
BAD_BYTES = {"utf8.yaml": b"kind: Connector\nmetadata: {name: \xff\xfe}\n"}


def status_of(proxy: ProxyProcess, name: str, token: str) -> int:
    return proxy.request("GET", f"/v2/namespaces/default/connectors/{name}/x/tags/list", auth=basic("x", token)).status


def good(world, name: str) -> list[dict]:
    from conftest import REGISTRY_USER
    return [connector("default", name, world.registry.url, f"{name}-secret"),
            secret("default", f"{name}-secret", REGISTRY_USER, world.registry_password)]


def test_bad_files_never_stop_the_directory_store(world, tmp_path):
    d = tmp_path / "connectors"
    write_manifests(d, "good.yaml", good(world, "good"))
    for name, text in BAD_FILES.items():
        (d / name).write_text(text)
    for name, data in BAD_BYTES.items():
        (d / name).write_bytes(data)
    # Start-up with the bad files present serves the others.
    proxy = ProxyProcess(tmp_path, d, world.tokens_file).start()
    try:
        token = world.builder_token
        assert status_of(proxy, "good", token) in (200, 404)  # 404: the repository is empty upstream
        assert status_of(proxy, "bad1", token) in (404, 503)
        # Live: a new connector is served, a change to a good one too, and the bad file fixed.
        write_manifests(d, "late.yaml", good(world, "late"))
        proxy.wait_for(lambda: status_of(proxy, "late", token) != 404 or b"not found" not in proxy.request(
            "GET", "/v2/namespaces/default/connectors/late/x/tags/list", auth=basic("x", token)).data, 5)
        (d / "params-int.yaml").write_text(yaml.safe_dump_all(good(world, "bad1")))
        proxy.wait_for(lambda: status_of(proxy, "bad1", token) not in (503,) and b"not found" not in proxy.request(
            "GET", "/v2/namespaces/default/connectors/bad1/x/tags/list", auth=basic("x", token)).data, 5)
        assert proxy.proc.poll() is None
    finally:
        proxy.stop()


def encoded(doc: dict) -> dict:
    doc = dict(doc)
    data = {k: base64.b64encode(v.encode()).decode() for k, v in doc.pop("stringData").items()}
    return {**doc, "data": data}


def test_a_bad_secret_in_one_namespace_never_stops_the_kubernetes_store(world, tmp_path):
    api = FakeApiServer().start()
    try:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        tokens = tmp_path / "tokens.yaml"
        tokens.write_text(yaml.safe_dump({"tokens": [{"token": world.builder_token, "subject": "b", "connectors": ["*"]}]}))
        api.put_object({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "dcj", "namespace": "tenant-a"},
                        "type": "kubernetes.io/dockerconfigjson",
                        "data": {".dockerconfigjson": base64.b64encode(json.dumps({"auths": [1]}).encode()).decode()}})
        api.put_object(connector("tenant-a", "broken", world.registry.url, "dcj"))
        for d in good(world, "good"):
            api.put_object(encoded(d) if d["kind"] == "Secret" else d)
        source = ("--store", "kubernetes", "--kubeconfig", str(kubeconfig), "--client-tokens", str(tokens), "--no-status")
        proxy = ProxyProcess(tmp_path, None, None, source=source).start()  # a restart with it present starts
        try:
            token = world.builder_token
            assert status_of(proxy, "good", token) in (200, 404)
            r = proxy.request("GET", "/v2/namespaces/tenant-a/connectors/broken/x/tags/list", auth=basic("x", token))
            assert r.status == 503 and b"tenant-a/broken" in r.data
            # Live changes in any namespace still apply: the watch did not freeze on the bad Secret.
            for d in good(world, "late"):
                api.put_object(encoded(d) if d["kind"] == "Secret" else d)
            proxy.wait_for(lambda: b"not found" not in proxy.request(
                "GET", "/v2/namespaces/default/connectors/late/x/tags/list", auth=basic("x", token)).data, 5)
            api.put_object({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "dcj", "namespace": "tenant-a"},
                            "type": "kubernetes.io/dockerconfigjson",
                            "data": {".dockerconfigjson": base64.b64encode(json.dumps({"auths": {}}).encode()).decode()}})
            api.delete_object(f"{GROUP}/v1alpha1", "connectors", "default", "good")
            proxy.wait_for(lambda: b"connector default/good not found" in proxy.request(
                "GET", "/v2/namespaces/default/connectors/good/x/tags/list", auth=basic("x", token)).data, 5)
        finally:
            proxy.stop()
    finally:
        api.stop()
