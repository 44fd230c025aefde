"""The Kubernetes backends end to end: the real kubernetes client in the proxy, against the fake API
server, with the real registry and real clients.

Everything that must happen "within 2 s" is polled with a 2 s bound; nothing sleeps.
"""

from __future__ import annotations

import base64
import json
import secrets

import pytest

from conftest import REGISTRY_USER
from fake_apiserver import FakeApiServer
from localregistry import make_oci_layout
from proxyproc import ProxyProcess, basic, connector, secret
from test_e2e_clients import run

GROUP = "connectors.alauda.io"
SERVED_WITHIN = 2.0


def encoded(doc: dict) -> dict:
    """A Secret as the API server stores it: base64 `data`."""
    doc = dict(doc)
    data = {k: base64.b64encode(v.encode()).decode() for k, v in doc.pop("stringData").items()}
    return {**doc, "data": data}


class Cluster:
    def __init__(self, api: FakeApiServer, world, tmp_path):
        self.api = api
        self.world = world
        self.kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        self.builder = api.add_service_account_token("ci", "builder")
        self.outsider = api.add_service_account_token("ci", "outsider")
        api.allow("system:serviceaccount:ci:builder", "get", GROUP, "connectors", "default", "*")
        api.put_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "connectors-system"}})

    def apply(self, *docs: dict) -> None:
        for d in docs:
            self.api.put_object(encoded(d) if d["kind"] == "Secret" else d)

    def status(self, name: str, namespace: str = "default") -> dict:
        obj = self.api.get_object(f"{GROUP}/v1alpha1", "connectors", namespace, name) or {}
        return obj.get("status") or {}

    def condition(self, name: str, ctype: str) -> dict:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == ctype), {})


@pytest.fixture(scope="module")
def cluster(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kube")
    api = FakeApiServer().start()
    c = Cluster(api, world, tmp)
    c.apply(
        connector("default", "harbor", world.registry.url, "harbor-secret", repository="testing/busybox"),
        secret("default", "harbor-secret", REGISTRY_USER, world.registry_password),
        connector("default", "wrongpw", world.registry.url, "wrongpw-secret", repository="testing/busybox"),
        secret("default", "wrongpw-secret", REGISTRY_USER, "not-the-password"),
        connector("default", "nosecret", world.registry.url, "missing"),
        connector("default", "unreachable", "http://127.0.0.1:1"),
    )
    proxy = ProxyProcess(tmp, None, None, source=(
        "--store", "kubernetes", "--kubeconfig", str(c.kubeconfig), "--client-auth", "kubernetes",
    ), extra=("--set", "status_interval=1", "--set", "proxy_namespace=connectors-system")).start()
    c.proxy = proxy
    yield c
    proxy.stop()
    api.stop()
    written = proxy.everything_written()
    for s in (*world.secrets, c.builder, c.outsider):
        assert s.encode() not in written


def manifest_status(c: Cluster, name: str, token: str | None = None) -> int:
    path = f"/v2/namespaces/default/connectors/{name}/kube/app/tags/list"
    return c.proxy.request("GET", path, auth=basic("sa", token or c.builder)).status


def test_serviceaccount_pushes_and_pulls_with_a_real_client(cluster, tmp_path):
    image = make_oci_layout(tmp_path / "img", [30_000, 20_000], tag="v1")
    ref = f"docker://{cluster.proxy.host}/namespaces/default/connectors/harbor/kube/sa:v1"
    creds = f"builder:{cluster.builder}"
    run(["skopeo", "copy", "--dest-creds", creds, "--dest-tls-verify=false", image.ref, ref])
    out = json.loads(run(["skopeo", "inspect", "--creds", creds, "--tls-verify=false", ref]))
    assert out["Digest"] == image.manifest_digest
    run(["skopeo", "copy", "--src-creds", creds, "--src-tls-verify=false", ref, f"oci:{tmp_path / 'back'}:v1"])
    assert json.loads((tmp_path / "back" / "index.json").read_text())["manifests"][0]["digest"] == image.manifest_digest


def test_identity_failures_and_review_caching(cluster):
    api = cluster.api
    assert manifest_status(cluster, "harbor", cluster.outsider) == 403  # the SubjectAccessReview says no
    assert manifest_status(cluster, "harbor", "not-a-serviceaccount-token") == 401
    expired = api.add_service_account_token("ci", "expired")
    api.allow("system:serviceaccount:ci:expired", "get", GROUP, "connectors", "default", "*")
    api.expire_token(expired)
    assert manifest_status(cluster, "harbor", expired) == 401
    before = api.count("POST", "tokenreviews"), api.count("POST", "subjectaccessreviews")
    for _ in range(10):
        assert manifest_status(cluster, "harbor") in (200, 404)
    after = api.count("POST", "tokenreviews"), api.count("POST", "subjectaccessreviews")
    assert after[0] - before[0] <= 1 and after[1] - before[1] <= 1, (before, after)


def test_connector_create_update_delete_is_served_within_2s(cluster, world):
    c, proxy = cluster, cluster.proxy
    assert manifest_status(c, "late") == 404
    c.apply(connector("default", "late", world.registry.url, "late-secret"),
            secret("default", "late-secret", REGISTRY_USER, world.registry_password))
    proxy.wait_for(lambda: manifest_status(c, "late") != 404 or _named_upstream_404(c, "late"), SERVED_WITHIN)
    # update: point it at the htpasswd registry with its credentials
    c.apply(connector("default", "late", world.ht_registry.url, "late-secret"),
            secret("default", "late-secret", "htuser", world.ht_password))
    proxy.wait_for(lambda: _upstream_of(c, "late") == world.ht_registry.host, SERVED_WITHIN)
    c.api.delete_object(f"{GROUP}/v1alpha1", "connectors", "default", "late")
    proxy.wait_for(lambda: _connector_missing(c, "late"), SERVED_WITHIN)


def _named_upstream_404(c, name) -> bool:
    r = c.proxy.request("GET", f"/v2/namespaces/default/connectors/{name}/kube/app/tags/list", auth=basic("sa", c.builder))
    return r.status == 404 and b"connector default/" not in r.data


def _connector_missing(c, name) -> bool:
    r = c.proxy.request("GET", f"/v2/namespaces/default/connectors/{name}/kube/app/tags/list", auth=basic("sa", c.builder))
    return r.status == 404 and f"connector default/{name} not found".encode() in r.data


def _upstream_of(c, name) -> str | None:
    """Which registry answered: push a blob upload and read the Location's _state-free path back."""
    r = c.proxy.request("POST", f"/v2/namespaces/default/connectors/{name}/kube/probe/blobs/uploads/",
                        auth=basic("sa", c.builder))
    if r.status != 202:
        return None
    uuid = r.headers["Location"].split("/blobs/uploads/")[1].split("?")[0]
    for reg in (c.world.registry, c.world.ht_registry):
        if (reg.storage_dir / "docker/registry/v2/repositories/kube/probe/_uploads" / uuid).exists():
            return reg.host
    return None


def test_secret_rotation_uses_the_new_credentials_and_drops_old_tokens(cluster, world):
    c = cluster
    old_pw, new_pw = "rot-old-" + secrets.token_hex(6), "rot-new-" + secrets.token_hex(6)
    world.token_server.users["rotator"] = old_pw
    world.extra_secrets += [old_pw, new_pw]
    c.apply(connector("default", "rot", world.registry.url, "rot-secret"), secret("default", "rot-secret", "rotator", old_pw))
    c.proxy.wait_for(lambda: c.proxy.request("POST", "/v2/namespaces/default/connectors/rot/kube/rot/blobs/uploads/",
                                             auth=basic("sa", c.builder)).status == 202, SERVED_WITHIN)
    # rotate: the registry stops accepting the old password at the same moment
    world.token_server.users["rotator"] = new_pw
    c.apply(secret("default", "rot-secret", "rotator", new_pw))
    fetches_before = len(world.token_server.fetches)

    def pushes_with_new_password() -> bool:
        r = c.proxy.request("POST", "/v2/namespaces/default/connectors/rot/kube/rot/blobs/uploads/", auth=basic("sa", c.builder))
        return r.status == 202

    c.proxy.wait_for(pushes_with_new_password, SERVED_WITHIN)
    new_fetches = [f for f in world.token_server.fetches[fetches_before:] if f.user == "rotator"]
    assert new_fetches, "the push after the rotation did not fetch a token with the new Secret"
    metrics = c.proxy.request("GET", "/metrics").data.decode()
    assert "connector_proxy_upstream_token_cache_entries" in metrics


def restart_api(c: Cluster, down=None) -> None:
    """Stop the API server and start a new one on the same port with the same data (etcd survives)."""
    port, store = c.api.port, c.api.store
    tokens, rules = dict(c.api.tokens), list(c.api.rules)
    c.api.stop()
    try:
        if down:
            down()
    finally:
        c.api = FakeApiServer(port=port, store=store).start()
        c.api.tokens.update(tokens)
        c.api.rules.extend(rules)


def test_api_server_restart_and_410_are_recovered(cluster, world):
    c = cluster
    restart_api(c)
    c.apply(connector("default", "after-restart", world.registry.url, "harbor-secret"))
    c.proxy.wait_for(lambda: not _connector_missing(c, "after-restart"), 10)  # reconnect backoff, then served
    # changes made while the proxy could not watch, then compacted away: resuming from its last
    # resourceVersion gets 410 Gone, and the store relists
    def change_and_compact():
        c.apply(connector("default", "after-410", world.registry.url, "harbor-secret"))
        c.api.compact()

    restart_api(c, change_and_compact)
    c.proxy.wait_for(lambda: not _connector_missing(c, "after-410"), 10)
    assert "relisting" in c.proxy.output()


def test_api_server_down_keeps_serving_what_it_knew(cluster, world):
    c = cluster
    assert manifest_status(c, "harbor") in (200, 404)  # identity and decision cached now

    def while_down():
        assert manifest_status(c, "harbor") in (200, 404)
        c.proxy.wait_for(lambda: b"serving the last known" in c.proxy.request("GET", "/readyz").data, 10)
        assert c.proxy.request("GET", "/readyz").status == 200

    restart_api(c, while_down)


def test_conditions_say_what_is_wrong(cluster, world):
    c = cluster

    def ready_is(name, status):
        return lambda: c.condition(name, "Ready").get("status") == status

    c.proxy.wait_for(ready_is("harbor", "True"), 15)
    assert c.condition("harbor", "AuthReady")["reason"] == "TokenIssued"
    assert c.status("harbor")["proxy"]["httpAddress"]["url"] == \
        "http://c-harbor.default.svc.cluster.local/namespaces/default/connectors/harbor"

    c.proxy.wait_for(ready_is("wrongpw", "False"), 15)
    assert c.condition("wrongpw", "AuthReady")["status"] == "False"
    assert c.condition("wrongpw", "AuthReady")["reason"] == "AuthFailed"
    assert c.condition("wrongpw", "LivenessReady")["status"] == "True"

    c.proxy.wait_for(ready_is("nosecret", "False"), 15)
    assert c.condition("nosecret", "SecretReady")["reason"] == "SecretNotFound"

    c.proxy.wait_for(ready_is("unreachable", "False"), 15)
    assert c.condition("unreachable", "LivenessReady")["reason"] == "RegistryUnreachable"

    service = c.api.get_object("v1", "services", "default", "c-harbor")
    assert service["spec"]["externalName"] == "connector-proxy.connectors-system.svc.cluster.local"
    lease = c.api.get_object("coordination.k8s.io/v1", "leases", "connectors-system", "connector-proxy-status")
    assert lease["spec"]["holderIdentity"]
    for cond in c.status("wrongpw")["conditions"]:
        assert "not-the-password" not in json.dumps(cond)


def test_audiences_and_proxy_permissions(tmp_path):
    from connector_store.kube import KubeIdentities, api_client

    with FakeApiServer() as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        minted = api.add_service_account_token("ci", "minted", audiences=["connector-proxy"])
        plain = api.add_service_account_token("ci", "plain")
        both = api.add_service_account_token("ci", "plain", audiences=["connector-proxy"])
        for sa in ("minted", "plain"):
            api.allow(f"system:serviceaccount:ci:{sa}", "get", GROUP, "connectors", "default", "harbor")
        api.allow("system:serviceaccount:ci:minted", "get", GROUP, "connectors", "default", "harbor", subresource="proxy")

        narrowed = KubeIdentities(api_client(str(kubeconfig)), audiences=["connector-proxy"])
        assert narrowed.authenticate(minted).subject == "system:serviceaccount:ci:minted"
        assert narrowed.authenticate(plain) is None  # not minted for the proxy

        strict = KubeIdentities(api_client(str(kubeconfig)), audiences=["connector-proxy"], proxy_permissions=True)
        assert strict.authorize(strict.authenticate(minted), "default", "harbor") is True
        assert strict.authorize(strict.authenticate(both), "default", "harbor") is False  # no connectors/proxy
        assert strict.authorize(strict.authenticate(minted), "default", "other") is False
        reviews = api.count("POST", "subjectaccessreviews")
        strict.authorize(strict.authenticate(minted), "default", "harbor")
        assert api.count("POST", "subjectaccessreviews") == reviews  # cached


def test_status_conditions_carry_the_observed_generation(cluster):
    obj = cluster.api.get_object(f"{GROUP}/v1alpha1", "connectors", "default", "harbor")
    generation = obj["metadata"]["generation"]
    cluster.proxy.wait_for(lambda: all(c.get("observedGeneration") == generation
                                       for c in cluster.status("harbor").get("conditions", [{}])), SERVED_WITHIN * 3)


def test_a_host_form_service_with_other_content_is_corrected(cluster):
    """The `c-<name>` Service is created and kept right: one edited to point elsewhere is put back."""
    api = cluster.api
    cluster.proxy.wait_for(lambda: api.get_object("v1", "services", "default", "c-harbor") is not None, SERVED_WITHIN * 3)
    svc = api.get_object("v1", "services", "default", "c-harbor")
    wanted = svc["spec"]["externalName"]
    svc["spec"]["externalName"] = "attacker.example.com"
    api.put_object(svc)
    cluster.proxy.wait_for(
        lambda: (api.get_object("v1", "services", "default", "c-harbor") or {}).get("spec", {}).get("externalName") == wanted,
        SERVED_WITHIN * 3)
    assert wanted.endswith(".svc.cluster.local")


def test_sixteen_concurrent_first_requests_with_one_token_make_one_review_each(cluster):
    """The identity cache has single flight: one TokenReview, one SubjectAccessReview per connector."""
    from concurrent.futures import ThreadPoolExecutor

    api = cluster.api
    token = api.add_service_account_token("ci", "burst")
    api.allow("system:serviceaccount:ci:burst", "get", GROUP, "connectors", "default", "*")
    before = api.count("POST", "tokenreviews"), api.count("POST", "subjectaccessreviews")
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: manifest_status(cluster, "harbor", token), range(16)))
    assert all(s in (200, 404) for s in statuses), statuses
    after = api.count("POST", "tokenreviews"), api.count("POST", "subjectaccessreviews")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1), (before, after)
