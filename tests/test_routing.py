"""Unit tests for addons/routing.py: host form, path form, route_request, mount translation, retarget."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

import pytest
from conftest import reverse_tflow

from addons import oci
from addons.oci import ProtocolError
from addons.routing import (
    METADATA_KEY,
    Route,
    Routing,
    parse_host_form,
    parse_path_form,
    retarget,
    route_request,
    translate_mount_query,
)
from connector_store.model import parse_address

DIGEST = "sha256:" + "c" * 64
ORIGIN = "http://proxy.example:8080"


# ---------------------------------------------------------------- host form


@pytest.mark.parametrize(
    "host",
    [
        "c-harbor.default.svc.cluster.local",
        "c-harbor.default.svc.cluster.local:80",
        "c-harbor.default.svc.cluster.local:5000",
        "c-harbor.default.svc",
        "c-harbor.default.svc:443",
        "c-harbor.default",
        "c-harbor.default:8080",
        "C-HARBOR.DEFAULT.SVC.CLUSTER.LOCAL",
        "C-Harbor.Default.Svc:80",
        "c-harbor.default.svc.cluster.local.",  # fully qualified with the root dot
    ],
)
def test_host_form_variants(host):
    assert parse_host_form(host) == ("default", "harbor")


def test_host_form_names_with_dashes_and_digits():
    assert parse_host_form("c-my-harbor-2.team-a.svc.cluster.local") == ("team-a", "my-harbor-2")


@pytest.mark.parametrize(
    "host",
    [
        None,
        "",
        "harbor.default.svc",  # no c- prefix
        "harbor.default.svc.cluster.local",
        "c-harbor",  # no namespace
        "c-.default.svc",  # empty name
        "c-harbor..svc",
        "c-harbor.default.example.com",
        "c-harbor.default.svc.cluster.local.evil.com",
        "c-harbor.default.svc.other",
        "proxy.example.com",
        "localhost:8080",
        "127.0.0.1",
        "192.168.1.5:31567",
        "[::1]:8080",
        "c-harbor_x.default",  # underscore is not a DNS label character
        "c-harbor.default:port",
        "c-harbor.default:123456",
    ],
)
def test_non_matching_hosts(host):
    assert parse_host_form(host) is None


# ---------------------------------------------------------------- path form


def test_path_form_prefix_is_stripped():
    assert parse_path_form("/v2/namespaces/ns/connectors/c/test/abc/manifests/v1") == (
        "ns", "c", "/v2/test/abc/manifests/v1",
    )


@pytest.mark.parametrize("path", ["/v2/namespaces/ns/connectors/c/", "/v2/namespaces/ns/connectors/c"])
def test_path_form_connector_ping(path):
    assert parse_path_form(path) == ("ns", "c", "/v2/")


def test_path_form_blob_upload_path():
    assert parse_path_form("/v2/namespaces/default/connectors/harbor/a/b/blobs/uploads/") == (
        "default", "harbor", "/v2/a/b/blobs/uploads/",
    )


def test_path_form_connector_name_may_contain_dots():
    assert parse_path_form("/v2/namespaces/ns/connectors/my.registry/x/tags/list") == (
        "ns", "my.registry", "/v2/x/tags/list",
    )


@pytest.mark.parametrize("path", ["/v2/", "/v2/a/manifests/v1", "/v2/namespaces/ns/manifests/v1", "/namespaces/ns/connectors/c/"])
def test_not_path_form(path):
    assert parse_path_form(path) is None


@pytest.mark.parametrize(
    "path",
    [
        "/v2/namespaces/NS/connectors/c/a/manifests/v1",
        "/v2/namespaces/ns/connectors/C/a/manifests/v1",
        "/v2/namespaces//connectors/c/a/manifests/v1",
        "/v2/namespaces/ns/connectors//a/manifests/v1",
        "/v2/namespaces/ns_1/connectors/c/",
        "/v2/namespaces/-ns/connectors/c/",
        "/v2/namespaces/ns/connectors/c-/",
        "/v2/namespaces/ns/connectors/" + "a" * 254 + "/",
        "/v2/namespaces/" + "n" * 64 + "/connectors/c/",
    ],
)
def test_path_form_invalid_namespace_or_name(path):
    with pytest.raises(ProtocolError) as e:
        parse_path_form(path)
    assert e.value.status == 400
    assert e.value.code == "NAME_INVALID"


# ---------------------------------------------------------------- route_request


def test_route_path_form():
    r = route_request("/v2/namespaces/default/connectors/harbor/test/abc/manifests/v1", "proxy.example:8080", ORIGIN)
    assert r.form == "path"
    assert (r.namespace, r.name) == ("default", "harbor")
    assert r.connector == "default/harbor"
    assert r.prefix == "namespaces/default/connectors/harbor"
    assert r.path == "/v2/test/abc/manifests/v1"
    assert r.origin == ORIGIN


def test_route_host_form():
    r = route_request("/v2/test/abc/manifests/v1", "c-harbor.default.svc.cluster.local", "http://c-harbor.default.svc.cluster.local")
    assert r.form == "host"
    assert (r.namespace, r.name, r.prefix, r.path) == ("default", "harbor", "", "/v2/test/abc/manifests/v1")


def test_route_path_form_wins_over_host_form():
    r = route_request("/v2/namespaces/other/connectors/quay/x/tags/list", "c-harbor.default.svc", ORIGIN)
    assert r.form == "path"
    assert (r.namespace, r.name, r.path) == ("other", "quay", "/v2/x/tags/list")


def test_route_host_form_ping():
    r = route_request("/v2/", "c-harbor.default", ORIGIN)
    assert (r.form, r.connector, r.path) == ("host", "default/harbor", "/v2/")


def test_route_path_form_ping():
    r = route_request("/v2/namespaces/default/connectors/harbor/", "192.168.1.5:31567", ORIGIN)
    assert (r.form, r.connector, r.path) == ("path", "default/harbor", "/v2/")


@pytest.mark.parametrize("path", ["/v2/", "/v2"])
def test_route_shared_host_ping(path):
    r = route_request(path, "192.168.1.5:31567", ORIGIN)
    assert r.form == "ping"
    assert r.connector == ""
    assert r.origin == ORIGIN


def test_route_shared_host_ping_without_host_header():
    assert route_request("/v2/", None, ORIGIN).form == "ping"


@pytest.mark.parametrize("path", ["/v2/test/abc/manifests/v1", "/v2/_catalog", "/v2/a/blobs/uploads/"])
def test_route_shared_host_without_connector_is_404(path):
    with pytest.raises(ProtocolError) as e:
        route_request(path, "proxy.example:8080", ORIGIN)
    assert e.value.status == 404
    assert e.value.code == "NAME_UNKNOWN"


@pytest.mark.parametrize(
    "path",
    [
        "/v2/namespaces/default/connectors/harbor/a/../b/manifests/v1",
        "/v2/namespaces/default/connectors/harbor/../other/x/manifests/v1",
        "/v2/namespaces/default/connectors/harbor/a/..",
        "/v2/namespaces/default/connectors/harbor/./a/manifests/v1",
        "/v2/a%2fb/manifests/v1",
        "/v2/a%2Fb/manifests/v1",
        "/v2/namespaces/default%2Fconnectors/harbor/a/manifests/v1",
        "/v2/a\\b/manifests/v1",
        "/v2/namespaces/default/connectors/harbor/a\\..\\b/manifests/v1",
    ],
)
def test_route_rejects_traversal_and_encoded_slashes(path):
    for host in ("c-harbor.default.svc", "proxy.example"):
        with pytest.raises(ProtocolError) as e:
            route_request(path, host, ORIGIN)
        assert e.value.status == 400


def test_route_rejects_malformed_repository_in_path_form():
    with pytest.raises(ProtocolError) as e:
        route_request("/v2/namespaces/default/connectors/harbor/UPPER/manifests/v1", "proxy", ORIGIN)
    assert (e.value.status, e.value.code) == (400, "NAME_INVALID")


def test_route_rejects_malformed_repository_in_host_form():
    with pytest.raises(ProtocolError) as e:
        route_request("/v2/a//b/manifests/v1", "c-harbor.default", ORIGIN)
    assert (e.value.status, e.value.code) == (400, "NAME_INVALID")


def test_route_host_form_non_registry_path_is_404():
    with pytest.raises(ProtocolError) as e:
        route_request("/index.html", "c-harbor.default", ORIGIN)
    assert e.value.status == 404


def test_route_is_stored_in_metadata_and_read_back():
    f = reverse_tflow()
    r = Route("path", "default", "harbor", ORIGIN, "namespaces/default/connectors/harbor", "/v2/a/tags/list")
    r.store(f)
    assert isinstance(f.metadata[METADATA_KEY], dict)
    json.dumps(f.metadata[METADATA_KEY])  # plain data: it is saved with the flow
    assert Route.of(f) == r


def test_route_of_a_flow_without_route_is_none():
    assert Route.of(reverse_tflow()) is None


# ---------------------------------------------------------------- translate_mount_query

PATH_ROUTE = Route("path", "default", "harbor", ORIGIN, "namespaces/default/connectors/harbor", "/v2/dst/blobs/uploads/")


def test_mount_from_same_connector_strips_prefix():
    query = f"mount={DIGEST}&from=namespaces/default/connectors/harbor/src/repo"
    out = translate_mount_query(query, PATH_ROUTE)
    assert parse_qsl(out) == [("mount", DIGEST), ("from", "src/repo")]


def test_mount_from_same_connector_url_encoded():
    query = f"mount={DIGEST}&from=namespaces%2Fdefault%2Fconnectors%2Fharbor%2Fsrc%2Frepo"
    assert dict(parse_qsl(translate_mount_query(query, PATH_ROUTE)))["from"] == "src/repo"


def test_mount_from_other_connector_drops_mount_and_from():
    query = f"mount={DIGEST}&from=namespaces/team/connectors/quay/src/repo"
    out = translate_mount_query(query, PATH_ROUTE)
    params = dict(parse_qsl(out, keep_blank_values=True))
    assert "mount" not in params and "from" not in params


def test_mount_from_other_namespace_same_name_is_another_connector():
    query = f"mount={DIGEST}&from=namespaces/team/connectors/harbor/src"
    assert "from" not in dict(parse_qsl(translate_mount_query(query, PATH_ROUTE)))


def test_mount_from_plain_repository_untouched():
    query = f"mount={DIGEST}&from=src/repo"
    host_route = Route("host", "default", "harbor", ORIGIN, "", "/v2/dst/blobs/uploads/")
    assert translate_mount_query(query, host_route) == query
    assert translate_mount_query(query, PATH_ROUTE) == query


def test_query_without_from_untouched():
    assert translate_mount_query("digest=" + DIGEST, PATH_ROUTE) == "digest=" + DIGEST
    assert translate_mount_query("", PATH_ROUTE) == ""


def test_other_params_kept_when_translating():
    query = f"_state=abc%3D%3D&mount={DIGEST}&from=namespaces/default/connectors/harbor/src&x="
    params = parse_qsl(translate_mount_query(query, PATH_ROUTE), keep_blank_values=True)
    assert params == [("_state", "abc=="), ("mount", DIGEST), ("from", "src"), ("x", "")]


def test_other_params_kept_when_dropping_mount():
    query = f"_state=s1&mount={DIGEST}&from=namespaces/x/connectors/y/src&digest={DIGEST}"
    params = parse_qsl(translate_mount_query(query, PATH_ROUTE), keep_blank_values=True)
    assert params == [("_state", "s1"), ("digest", DIGEST)]


# ---------------------------------------------------------------- retarget


def test_retarget_to_https_default_port():
    req = reverse_tflow().request
    req.host_header = "c-harbor.default.svc"
    req.path = "/v2/a/manifests/v1?foo=bar"
    route = Route("host", "default", "harbor", ORIGIN, "", "/v2/a/manifests/v1")
    retarget(req, route, parse_address("https://harbor.example.com"))
    assert req.scheme == "https"
    assert req.host == "harbor.example.com"
    assert req.port == 443
    assert req.host_header == "harbor.example.com"
    assert req.path == "/v2/a/manifests/v1?foo=bar"
    assert req.url == "https://harbor.example.com/v2/a/manifests/v1?foo=bar"


def test_retarget_path_form_with_port_and_prefix():
    req = reverse_tflow().request
    req.host_header = "proxy.example:8080"
    req.path = "/v2/namespaces/default/connectors/harbor/a/b/tags/list?n=2&last=x"
    route = route_request(req.path.partition("?")[0], req.host_header, ORIGIN)
    retarget(req, route, parse_address("http://registry.local:5000/artifactory/api/docker/repo/v2/"))
    assert (req.scheme, req.host, req.port) == ("http", "registry.local", 5000)
    assert req.host_header == "registry.local:5000"
    assert req.path == "/artifactory/api/docker/repo/v2/a/b/tags/list?n=2&last=x"


def test_retarget_without_query():
    req = reverse_tflow().request
    req.path = "/v2/namespaces/default/connectors/harbor/a/blobs/" + DIGEST
    route = route_request(req.path, "proxy", ORIGIN)
    retarget(req, route, parse_address("https://harbor.example.com:8443"))
    assert req.path == "/v2/a/blobs/" + DIGEST
    assert req.host_header == "harbor.example.com:8443"
    assert req.port == 8443


def test_retarget_translates_mount_query():
    req = reverse_tflow().request
    req.method = "POST"
    req.path = f"/v2/namespaces/default/connectors/harbor/dst/blobs/uploads/?mount={DIGEST}&from=namespaces/default/connectors/harbor/src"
    route = route_request(req.path.partition("?")[0], "proxy", ORIGIN)
    retarget(req, route, parse_address("https://harbor.example.com"))
    path, _, query = req.path.partition("?")
    assert path == "/v2/dst/blobs/uploads/"
    assert parse_qsl(query) == [("mount", DIGEST), ("from", "src")]


def test_retarget_keeps_query_byte_for_byte_when_no_mount():
    req = reverse_tflow().request
    raw = "/v2/a/blobs/uploads/u1?_state=AbC%2Bd%2F%3D%3D&digest=sha256%3Aabc"
    req.path = raw
    route = route_request("/v2/a/blobs/uploads/u1", "c-harbor.default", ORIGIN)
    retarget(req, route, parse_address("https://harbor.example.com"))
    assert req.path == raw


# ---------------------------------------------------------------- the Routing addon


def make_flow(path: str, host: str | None, tls: bool = False, method: str = "GET"):
    f = reverse_tflow()
    f.request.method = method
    f.request.path = path
    if host is None:
        f.request.headers.pop("Host", None)
    else:
        f.request.host_header = host
    if not tls:
        f.client_conn.timestamp_tls_setup = None
    return f


def test_addon_stores_path_form_route():
    f = make_flow("/v2/namespaces/default/connectors/harbor/test/abc/manifests/v1?x=1", "192.168.1.5:31567")
    Routing().requestheaders(f)
    assert f.response is None
    r = Route.of(f)
    assert r is not None
    assert r.form == "path"
    assert r.connector == "default/harbor"
    assert r.path == "/v2/test/abc/manifests/v1"
    assert r.origin == "http://192.168.1.5:31567"


def test_addon_stores_host_form_route_with_tls_origin():
    f = make_flow("/v2/a/manifests/v1", "c-harbor.default.svc.cluster.local", tls=True)
    Routing().requestheaders(f)
    r = Route.of(f)
    assert r is not None and r.form == "host" and r.connector == "default/harbor"
    assert r.origin == "https://c-harbor.default.svc.cluster.local"


def test_addon_shared_host_ping():
    f = make_flow("/v2/", "proxy.example:8080")
    Routing().requestheaders(f)
    assert f.response is None
    assert Route.of(f).form == "ping"


def error_of(f) -> dict:
    assert f.response is not None
    assert f.response.headers["Content-Type"] == "application/json"
    [err] = json.loads(f.response.content)["errors"]
    return err


@pytest.mark.parametrize(
    "path, host, status, code",
    [
        ("/v2/namespaces/default/connectors/harbor/a/../b/manifests/v1", "proxy", 400, "NAME_INVALID"),
        ("/v2/a%2Fb/manifests/v1", "c-harbor.default", 400, "NAME_INVALID"),
        ("/v2/namespaces/BAD/connectors/harbor/a/manifests/v1", "proxy", 400, "NAME_INVALID"),
        ("/v2/Upper/manifests/v1", "c-harbor.default", 400, "NAME_INVALID"),
        ("/v2/a/manifests/v1", "proxy.example", 404, "NAME_UNKNOWN"),
    ],
)
def test_addon_answers_malformed_input_with_json_error(path, host, status, code):
    f = make_flow(path, host)
    Routing().requestheaders(f)
    assert f.response.status_code == status
    err = error_of(f)
    assert err["code"] == code
    assert err["message"]
    assert METADATA_KEY not in f.metadata


def test_addon_leaves_already_answered_flows_alone():
    f = make_flow("/v2/a/manifests/v1", "proxy.example")
    f.response = oci.ping_response()
    Routing().requestheaders(f)
    assert f.response.status_code == 200
    assert METADATA_KEY not in f.metadata


def test_addon_route_survives_flow_serialisation():
    f = make_flow("/v2/namespaces/default/connectors/harbor/a/tags/list", "proxy:1")
    Routing().requestheaders(f)
    copy = f.copy()
    assert Route.of(copy) == Route.of(f)
