"""The fake API server, exercised with the real `kubernetes` client (v37) end to end.

No sleeps for synchronisation: the watch stream itself, threading events, queue timeouts and
``server.wait_for_watches`` bound every wait.
"""

from __future__ import annotations

import base64
import copy
import datetime
import json
import queue
import threading
import time
import urllib.error
import urllib.request

import pytest
import urllib3
import yaml
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from fake_apiserver import FakeApiServer

SEED = yaml.safe_load("""
apiVersion: connectors.alauda.io/v1alpha1
kind: Connector
metadata: {name: harbor, namespace: default}
spec:
  address: https://harbor.example.com
  auth:
    name: tokenAuth
    params: [{name: repository, value: testing/busybox}]
    secretRef: {name: harbor-secret}
  connectorClassName: oci
""")
G, V, P = "connectors.alauda.io", "v1alpha1", "connectors"


def connector(name="harbor", namespace="default", **labels):
    obj = copy.deepcopy(SEED)
    obj["metadata"] = {"name": name, "namespace": namespace}
    if labels:
        obj["metadata"]["labels"] = labels
    return obj


def status_of(exc: ApiException) -> dict:
    return json.loads(exc.body)


@pytest.fixture
def server():
    with FakeApiServer(bookmark_interval=0.2) as s:
        yield s


@pytest.fixture
def api(server, tmp_path):
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
    c = config.new_client_from_config(config_file=str(kubeconfig))
    yield c
    c.close()


class WatchThread:
    """Runs a real kubernetes.watch.Watch().stream in a thread and hands its events over a queue."""

    def __init__(self, func, *args, **kwargs):
        self.w = watch.Watch()
        self.events: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(func, args, kwargs), daemon=True)
        self.thread.start()

    def _run(self, func, args, kwargs):
        try:
            for event in self.w.stream(func, *args, **kwargs):
                self.events.put(event)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e
        finally:
            self.done.set()

    def next(self, timeout=3.0, bookmarks=False):
        deadline = time.monotonic() + timeout
        while True:
            event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if bookmarks or event["type"] != "BOOKMARK":
                return event

    def stop(self):
        self.w.stop()
        self.thread.join(3)


def test_kubeconfig_is_accepted_by_the_client(server, tmp_path):
    path = server.write_kubeconfig(tmp_path / "kc", token="admin-token")
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(path), client_configuration=cfg)
    assert cfg.host == server.url
    with client.ApiClient(cfg) as c:
        assert client.VersionApi(c).get_code().git_version.startswith("v1.")
        names = [n.metadata.name for n in client.CoreV1Api(c).list_namespace().items]
    assert {"default", "kube-system"} <= set(names)
    assert server.request_log[-1].headers["Authorization"] == "Bearer admin-token"


def test_secrets_crud(api, server):
    v1 = client.CoreV1Api(api)
    created = v1.create_namespaced_secret("default", client.V1Secret(
        metadata=client.V1ObjectMeta(name="harbor-secret", labels={"app": "reg"}),
        type="cpaas.io/distribution-registry-token", string_data={"username": "u", "password": "p"}))
    assert created.string_data is None                       # folded into data, like a real server
    assert base64.b64decode(created.data["password"]) == b"p"
    assert created.metadata.uid and created.metadata.creation_timestamp
    rv1 = created.metadata.resource_version

    with pytest.raises(ApiException) as e:
        v1.create_namespaced_secret("default", {"metadata": {"name": "harbor-secret"}})
    assert e.value.status == 409 and status_of(e.value)["reason"] == "AlreadyExists"

    assert v1.read_namespaced_secret("harbor-secret", "default").type == "cpaas.io/distribution-registry-token"
    assert [s.metadata.name for s in v1.list_namespaced_secret("default", label_selector="app=reg").items] == [
        "harbor-secret"]
    assert v1.list_namespaced_secret("default", label_selector="app=other").items == []
    assert len(v1.list_secret_for_all_namespaces(field_selector="metadata.name=harbor-secret").items) == 1
    listing = v1.list_namespaced_secret("default")
    assert int(listing.metadata.resource_version) >= int(rv1)

    # replace: current resourceVersion ok, stale one 409
    current = v1.read_namespaced_secret("harbor-secret", "default")
    current.data["password"] = base64.b64encode(b"p2").decode()
    replaced = v1.replace_namespaced_secret("harbor-secret", "default", current)
    assert int(replaced.metadata.resource_version) > int(rv1)
    with pytest.raises(ApiException) as e:
        v1.replace_namespaced_secret("harbor-secret", "default", current)  # still carries the old rv
    assert e.value.status == 409 and status_of(e.value)["reason"] == "Conflict"

    # patch: a dict goes as strategic merge patch, a list as JSON patch
    patched = v1.patch_namespaced_secret("harbor-secret", "default", {"metadata": {"labels": {"tier": "x"}}})
    assert patched.metadata.labels == {"app": "reg", "tier": "x"}
    patched = v1.patch_namespaced_secret("harbor-secret", "default", [
        {"op": "remove", "path": "/metadata/labels/tier"},
        {"op": "replace", "path": "/data/username", "value": base64.b64encode(b"u2").decode()}])
    assert patched.metadata.labels == {"app": "reg"} and base64.b64decode(patched.data["username"]) == b"u2"
    assert server.request_log[-1].headers["Content-Type"] == "application/json-patch+json"
    assert server.request_log[-2].headers["Content-Type"] == "application/strategic-merge-patch+json"

    status = v1.delete_namespaced_secret("harbor-secret", "default")
    assert status["kind"] == "Status" and status["status"] == "Success"
    with pytest.raises(ApiException) as e:
        v1.read_namespaced_secret("harbor-secret", "default")
    assert e.value.status == 404
    assert status_of(e.value) == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                  "message": 'secrets "harbor-secret" not found', "reason": "NotFound",
                                  "code": 404, "details": {"name": "harbor-secret", "kind": "secrets"}}


def test_services_crud(api):
    v1 = client.CoreV1Api(api)
    svc = v1.create_namespaced_service("team", client.V1Service(
        metadata=client.V1ObjectMeta(name="proxy", labels={"app": "proxy"}),
        spec=client.V1ServiceSpec(selector={"app": "proxy"}, ports=[client.V1ServicePort(port=3128)])))
    assert svc.spec.cluster_ip and svc.spec.type == "ClusterIP" and svc.spec.ports[0].target_port == 3128
    assert [s.metadata.namespace for s in v1.list_service_for_all_namespaces(label_selector="app=proxy").items] == [
        "team"]
    assert "team" in [n.metadata.name for n in v1.list_namespace().items]
    svc.spec.ports[0].port = 8080
    svc.spec.ports[0].target_port = 8080
    replaced = v1.replace_namespaced_service("proxy", "team", svc)
    assert replaced.spec.ports[0].port == 8080 and replaced.spec.cluster_ip == svc.spec.cluster_ip
    patched = v1.patch_namespaced_service("proxy", "team", {"metadata": {"annotations": {"a": "b"}}})
    assert patched.metadata.annotations == {"a": "b"}
    deleted = v1.delete_namespaced_service("proxy", "team")       # services return the deleted object
    assert deleted.metadata.name == "proxy"
    assert v1.list_namespaced_service("team").items == []


def test_connectors_crud_and_status_subresource(api, server):
    co = client.CustomObjectsApi(api)
    body = connector()
    body["status"] = {"conditions": [{"type": "Ready", "status": "True"}]}
    created = co.create_namespaced_custom_object(G, V, "default", P, body)
    assert "status" not in created                                # create cannot set status
    assert created["metadata"]["generation"] == 1 and created["spec"] == SEED["spec"]

    ready = {"conditions": [{"type": "Ready", "status": "True", "reason": "Checked"}]}
    after_status = co.patch_namespaced_custom_object_status(G, V, "default", P, "harbor",
                                                            {"status": ready, "spec": {"address": "https://evil"}})
    assert after_status["status"] == ready and after_status["spec"] == SEED["spec"]   # status only
    assert after_status["metadata"]["generation"] == 1
    assert co.get_namespaced_custom_object_status(G, V, "default", P, "harbor")["status"] == ready

    # main-resource writes ignore status; spec changes bump generation
    patched = co.patch_namespaced_custom_object(G, V, "default", P, "harbor", {
        "spec": {"address": "https://harbor2.example.com"}, "status": {"conditions": []}})
    assert patched["status"] == ready and patched["spec"]["address"] == "https://harbor2.example.com"
    assert patched["metadata"]["generation"] == 2
    labelled = co.patch_namespaced_custom_object(G, V, "default", P, "harbor", {"metadata": {"labels": {"a": "b"}}})
    assert labelled["metadata"]["generation"] == 2                # metadata changes do not bump generation

    # no-op writes change nothing
    again = co.patch_namespaced_custom_object(G, V, "default", P, "harbor", {"metadata": {"labels": {"a": "b"}}})
    assert again["metadata"]["resourceVersion"] == labelled["metadata"]["resourceVersion"]

    # replace: CRs need a resourceVersion (422 without), stale is 409, status is kept
    obj = co.get_namespaced_custom_object(G, V, "default", P, "harbor")
    stale = copy.deepcopy(obj)
    obj["spec"]["connectorClassName"] = "oci2"
    obj["status"] = {"hacked": True}
    replaced = co.replace_namespaced_custom_object(G, V, "default", P, "harbor", obj)
    assert replaced["spec"]["connectorClassName"] == "oci2" and replaced["status"] == ready
    with pytest.raises(ApiException) as e:
        co.replace_namespaced_custom_object(G, V, "default", P, "harbor", stale)
    assert e.value.status == 409 and status_of(e.value)["reason"] == "Conflict"
    no_rv = copy.deepcopy(stale)
    del no_rv["metadata"]["resourceVersion"]
    with pytest.raises(ApiException) as e:
        co.replace_namespaced_custom_object(G, V, "default", P, "harbor", no_rv)
    assert e.value.status == 422 and status_of(e.value)["reason"] == "Invalid"

    # status PUT changes only status
    st = co.get_namespaced_custom_object(G, V, "default", P, "harbor")
    st["status"] = {"phase": "Ok"}
    st["spec"]["address"] = "https://ignored"
    put = co.replace_namespaced_custom_object_status(G, V, "default", P, "harbor", st)
    assert put["status"] == {"phase": "Ok"} and put["spec"]["address"] == "https://harbor2.example.com"

    # JSON patch on a custom object needs an explicit content type (the client defaults to merge patch)
    jp = co.patch_namespaced_custom_object(G, V, "default", P, "harbor",
                                           [{"op": "add", "path": "/spec/auth/params/-",
                                             "value": {"name": "x", "value": "y"}}],
                                           _content_type="application/json-patch+json")
    assert jp["spec"]["auth"]["params"][-1] == {"name": "x", "value": "y"}

    server.put_object(connector("other", "team", env="prod"))
    all_ns = co.list_cluster_custom_object(G, V, P)
    assert all_ns["kind"] == "ConnectorList" and {i["metadata"]["name"] for i in all_ns["items"]} == {
        "harbor", "other"}
    assert all(i["kind"] == "Connector" and i["apiVersion"] == f"{G}/{V}" for i in all_ns["items"])
    assert [i["metadata"]["name"] for i in co.list_cluster_custom_object(
        G, V, P, label_selector="env=prod")["items"]] == ["other"]
    assert [i["metadata"]["name"] for i in co.list_namespaced_custom_object(
        G, V, "team", P, field_selector="metadata.name=other")["items"]] == ["other"]

    deleted = co.delete_namespaced_custom_object(G, V, "default", P, "harbor")
    assert deleted["metadata"]["name"] == "harbor"                 # CRs return the deleted object
    with pytest.raises(ApiException) as e:
        co.get_namespaced_custom_object(G, V, "default", P, "harbor")
    assert status_of(e.value)["message"] == 'connectors.connectors.alauda.io "harbor" not found'
    assert server.get_object(f"{G}/{V}", "Connector", "default", "harbor") is None


def test_watch_connectors_sees_changes_and_bookmarks(api, server):
    co = client.CustomObjectsApi(api)
    server.put_object(connector("before"))
    listing = co.list_cluster_custom_object(G, V, P)
    rv = listing["metadata"]["resourceVersion"]
    server.put_object(connector("missed", "team"))           # after the list, before the watch: replayed

    wt = WatchThread(co.list_cluster_custom_object, G, V, P, resource_version=rv,
                     allow_watch_bookmarks=True, timeout_seconds=10)
    try:
        first = wt.next()
        assert (first["type"], first["object"]["metadata"]["name"]) == ("ADDED", "missed")
        assert server.wait_for_watches(1, "connectors")

        co.create_namespaced_custom_object(G, V, "default", P, connector("harbor"))
        co.patch_namespaced_custom_object(G, V, "default", P, "harbor", {"spec": {"address": "https://h2"}})
        server.delete_object(f"{G}/{V}", "connectors", "default", "harbor")
        events = [wt.next() for _ in range(3)]
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
            ("ADDED", "harbor"), ("MODIFIED", "harbor"), ("DELETED", "harbor")]
        assert events[1]["object"]["spec"]["address"] == "https://h2"
        rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
        assert rvs == sorted(rvs) and len(set(rvs)) == 3

        bookmark = wt.next(bookmarks=True)
        assert bookmark["type"] == "BOOKMARK"
        assert set(bookmark["raw_object"]) == {"kind", "apiVersion", "metadata"}
        assert bookmark["raw_object"]["metadata"]["resourceVersion"] == server.resource_version
        assert wt.w.resource_version == server.resource_version     # the client tracks bookmarks
    finally:
        wt.stop()
    assert wt.done.is_set()
    req = [r for r in server.request_log if r.watch][0]
    assert req.query["allowWatchBookmarks"] == "true" and req.query["timeoutSeconds"] == "10"


def test_watch_from_zero_lists_first_and_selectors_transition(api, server):
    co = client.CustomObjectsApi(api)
    server.put_object(connector("a", env="prod"))
    server.put_object(connector("b", env="dev"))
    wt = WatchThread(co.list_cluster_custom_object, G, V, P, resource_version="0", label_selector="env=prod",
                     timeout_seconds=10)
    try:
        e = wt.next()
        assert (e["type"], e["object"]["metadata"]["name"]) == ("ADDED", "a")
        assert server.wait_for_watches(1)
        server.put_object(connector("b", env="prod"))              # starts matching: ADDED
        server.put_object(connector("a", env="dev"))               # stops matching: DELETED
        got = [(e["type"], e["object"]["metadata"]["name"]) for e in (wt.next(), wt.next())]
        assert got == [("ADDED", "b"), ("DELETED", "a")]
    finally:
        wt.stop()


def test_watch_from_compacted_resource_version_is_410(api, server):
    co = client.CustomObjectsApi(api)
    old_rv = server.resource_version
    server.put_object(connector())
    server.compact()

    # On the wire: HTTP 200 and one ERROR event carrying a 410 Expired Status, then the end of the stream.
    resp = co.list_cluster_custom_object(G, V, P, watch=True, resource_version=old_rv, _preload_content=False)
    assert resp.status == 200
    lines = resp.read().decode().splitlines()
    resp.release_conn()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["type"] == "ERROR"
    assert event["object"]["code"] == 410 and event["object"]["reason"] == "Expired"

    # kubernetes v37 Watch: without timeout_seconds it retries once from the same rv, then raises ApiException 410
    before = server.count("GET", "/connectors", watch=True)
    with pytest.raises(ApiException) as e:
        for _ in watch.Watch().stream(co.list_cluster_custom_object, G, V, P, resource_version=old_rv):
            pass
    assert e.value.status == 410 and e.value.reason.startswith("Expired: too old resource version")
    assert server.count("GET", "/connectors", watch=True) - before == 2

    # ... and with timeout_seconds it raises at once
    before = server.count("GET", "/connectors", watch=True)
    with pytest.raises(ApiException) as e:
        for _ in watch.Watch().stream(co.list_cluster_custom_object, G, V, P, resource_version=old_rv,
                                      timeout_seconds=5):
            pass
    assert e.value.status == 410
    assert server.count("GET", "/connectors", watch=True) - before == 1

    # the current resourceVersion is still fine
    resp = co.list_cluster_custom_object(G, V, P, watch=True, resource_version=server.resource_version,
                                         timeout_seconds=1, _preload_content=False)
    assert resp.status == 200


def test_disconnect_watches(api, server):
    co = client.CustomObjectsApi(api)
    rv = co.list_cluster_custom_object(G, V, P)["metadata"]["resourceVersion"]

    # With timeout_seconds the client does not reconnect: the generator simply ends.
    wt = WatchThread(co.list_cluster_custom_object, G, V, P, resource_version=rv, timeout_seconds=30)
    assert server.wait_for_watches(1)
    assert server.disconnect_watches() == 1
    assert wt.done.wait(3) and wt.error is None

    # Without it, v37's Watch reconnects by itself from the last resourceVersion it saw: nothing lost or repeated.
    wt = WatchThread(co.list_cluster_custom_object, G, V, P, resource_version=rv)
    try:
        assert server.wait_for_watches(1)
        server.put_object(connector("one"))
        assert wt.next()["object"]["metadata"]["name"] == "one"
        server.disconnect_watches()
        assert server.wait_for_watches(1)
        server.put_object(connector("two"))
        assert wt.next()["object"]["metadata"]["name"] == "two"
        assert wt.events.empty()
        watches = [r for r in server.request_log if r.watch]
        assert len(watches) == 3 and watches[-1].query["resourceVersion"] != rv
    finally:
        wt.stop()
    assert server.wait_for_no_watches()

    # An abrupt disconnect (connection cut mid-stream) surfaces as a urllib3 ProtocolError.
    wt = WatchThread(co.list_cluster_custom_object, G, V, P, resource_version=server.resource_version)
    assert server.wait_for_watches(1)
    server.disconnect_watches(abrupt=True)
    assert wt.done.wait(3)
    assert isinstance(wt.error, urllib3.exceptions.ProtocolError)


def test_watch_timeout_seconds_ends_stream(api, server):
    co = client.CustomObjectsApi(api)
    start = time.monotonic()
    events = list(watch.Watch().stream(co.list_cluster_custom_object, G, V, P,
                                       resource_version=server.resource_version, timeout_seconds=1))
    assert events == [] and 0.9 < time.monotonic() - start < 3


def test_restart_on_the_same_port(api, server, tmp_path):
    v1 = client.CoreV1Api(api)
    co = client.CustomObjectsApi(api)
    v1.create_namespaced_secret("default", {"metadata": {"name": "s"}, "stringData": {"k": "v"}})
    rv = server.resource_version
    port = server.port

    wt = WatchThread(co.list_cluster_custom_object, G, V, P, resource_version=rv)   # no timeout: reconnects
    assert server.wait_for_watches(1)
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 2.5 and server.open_watches == 0
    assert wt.done.wait(3)                     # its reconnect is refused: the client surfaces the error
    assert isinstance(wt.error, urllib3.exceptions.MaxRetryError)
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        v1.read_namespaced_secret("s", "default", _request_timeout=2)

    # a new instance on the same port with the same store (etcd survived): the same client carries on
    with FakeApiServer(port=port, store=server.store, bookmark_interval=0.2) as again:
        assert v1.read_namespaced_secret("s", "default").data == {"k": "dg=="}
        wt = WatchThread(co.list_cluster_custom_object, G, V, P, resource_version=rv, timeout_seconds=5)
        again.put_object(connector())
        assert wt.next()["object"]["metadata"]["name"] == "harbor"
        wt.stop()

    # a fresh store on the same port: data gone; stop()/start() on one object keeps the port
    fresh = FakeApiServer(port=port).start()
    try:
        with pytest.raises(ApiException) as e:
            v1.read_namespaced_secret("s", "default")
        assert e.value.status == 404
        fresh.stop()
        fresh.start()
        assert fresh.port == port and v1.list_namespaced_secret("default").items == []
    finally:
        fresh.stop()
    server.start()  # let the fixture stop it again


def test_token_review(api, server):
    auth = client.AuthenticationV1Api(api)
    server.add_token("builder-token", "system:serviceaccount:ci:builder", uid="u-1",
                     groups=["system:serviceaccounts", "system:serviceaccounts:ci"])
    server.tokens["proxy-token"] = {"username": "alice", "uid": "u-2", "groups": ["devs"],
                                    "audiences": ["oci-proxy", "other"]}

    def review(token, audiences=None):
        return auth.create_token_review(client.V1TokenReview(
            spec=client.V1TokenReviewSpec(token=token, audiences=audiences))).status

    st = review("builder-token")
    assert st.authenticated is True and st.user.username == "system:serviceaccount:ci:builder"
    assert st.user.uid == "u-1" and "system:serviceaccounts:ci" in st.user.groups
    assert st.audiences == server.api_audiences                    # none requested: the API server's own

    st = review("proxy-token", ["oci-proxy", "nope"])
    assert st.authenticated and st.audiences == ["oci-proxy"] and st.user.username == "alice"
    st = review("proxy-token", ["nope"])
    assert not st.authenticated and "audiences" in st.error
    st = review("proxy-token")                                     # not valid for the API server audience
    assert not st.authenticated

    st = review("unknown-token")
    assert not st.authenticated and st.error.startswith("[invalid bearer token")
    server.expire_token("builder-token")
    st = review("builder-token")
    assert not st.authenticated and "expired" in st.error
    assert server.count("POST", "tokenreviews") == 6
    assert server.bodies("POST", "tokenreviews")[1]["spec"]["audiences"] == ["oci-proxy", "nope"]


def test_subject_access_review(api, server):
    authz = client.AuthorizationV1Api(api)
    server.allow("system:serviceaccount:ci:builder", "get", G, "connectors", "default", "harbor")
    server.allow("group:team-a", "get", G, "connectors", "team-a", "*", subresource="*")

    def sar(user, name, namespace="default", subresource=None, groups=None):
        return authz.create_subject_access_review(client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
            user=user, groups=groups, resource_attributes=client.V1ResourceAttributes(
                verb="get", group=G, resource="connectors", namespace=namespace, name=name,
                subresource=subresource)))).status

    st = sar("system:serviceaccount:ci:builder", "harbor")
    assert st.allowed is True and st.reason
    assert sar("system:serviceaccount:ci:builder", "other").allowed is False
    assert sar("system:serviceaccount:ci:builder", "harbor", subresource="proxy").allowed is False  # like RBAC
    assert sar("bob", "anything", "team-a", subresource="proxy", groups=["team-a"]).allowed is True
    assert sar("bob", "anything", "default", groups=["team-a"]).allowed is False
    server.allow("*", "*", "*", "*", subresource="*")
    assert sar("anyone", "x", "y", subresource="proxy").allowed is True
    body = server.bodies("POST", "subjectaccessreviews")[0]
    assert body["spec"]["resourceAttributes"]["resource"] == "connectors"


def test_lease_create_replace_conflict(api):
    coord = client.CoordinationV1Api(api)
    now = datetime.datetime.now(datetime.timezone.utc)
    lease = client.V1Lease(metadata=client.V1ObjectMeta(name="proxy-leader"), spec=client.V1LeaseSpec(
        holder_identity="replica-a", lease_duration_seconds=15, acquire_time=now, renew_time=now))
    created = coord.create_namespaced_lease("default", lease)
    assert created.spec.holder_identity == "replica-a"
    with pytest.raises(ApiException) as e:
        coord.create_namespaced_lease("default", lease)
    assert e.value.status == 409 and status_of(e.value)["reason"] == "AlreadyExists"

    mine = coord.read_namespaced_lease("proxy-leader", "default")
    theirs = coord.read_namespaced_lease("proxy-leader", "default")
    mine.spec.renew_time = now + datetime.timedelta(seconds=5)
    renewed = coord.replace_namespaced_lease("proxy-leader", "default", mine)
    assert renewed.metadata.resource_version != theirs.metadata.resource_version
    theirs.spec.holder_identity = "replica-b"
    with pytest.raises(ApiException) as e:
        coord.replace_namespaced_lease("proxy-leader", "default", theirs)
    assert e.value.status == 409 and "the object has been modified" in status_of(e.value)["message"]
    assert coord.read_namespaced_lease("proxy-leader", "default").spec.holder_identity == "replica-a"


def test_errors_auth_and_failure_injection(api, server, tmp_path):
    v1 = client.CoreV1Api(api)
    req = urllib.request.Request(server.url + "/apis/example.com/v1/things",
                                 headers={"Authorization": "Bearer admin-token"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 404 and json.loads(e.value.read())["kind"] == "Status"

    with config.new_client_from_config(config_file=str(server.write_kubeconfig(tmp_path / "bad", "wrong"))) as bad:
        with pytest.raises(ApiException) as e:
            client.CoreV1Api(bad).list_namespace()
    assert e.value.status == 401 and status_of(e.value)["reason"] == "Unauthorized"

    server.fail_next(1, 503, path_substring="/secrets")
    with pytest.raises(ApiException) as e:
        v1.list_namespaced_secret("default")
    assert e.value.status == 503 and status_of(e.value)["reason"] == "ServiceUnavailable"
    assert v1.list_namespaced_secret("default").items == []

    # callers can be held to the same rules as SubjectAccessReviews
    server.authorize_callers = True
    token = server.add_service_account_token("ci", "reader")
    server.allow("system:serviceaccount:ci:reader", "list", "", "secrets", "default")
    with config.new_client_from_config(config_file=str(server.write_kubeconfig(tmp_path / "sa", token))) as sa:
        assert client.CoreV1Api(sa).list_namespaced_secret("default").items == []
        with pytest.raises(ApiException) as e:
            client.CoreV1Api(sa).list_namespaced_secret("kube-system")
    assert e.value.status == 403 and "cannot list resource" in status_of(e.value)["message"]
    assert server.count("GET", "/api/v1/namespaces/default/secrets") == 3
