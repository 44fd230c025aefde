"""Unit tests for addons/rewrite.py: Location and Link rewrites back to the proxy's origin."""

from __future__ import annotations

from conftest import reverse_tflow
from mitmproxy.test import tutils

from addons.rewrite import Rewrite, rewrite_link, rewrite_url
from addons.routing import Route
from connector_store.model import parse_address

UPSTREAM = parse_address("https://harbor.example.com")
HOST_ROUTE = Route(
    "host", "default", "harbor", "http://c-harbor.default.svc.cluster.local", "", "/v2/a/blobs/uploads/",
    upstream=str(UPSTREAM),
)
PATH_ROUTE = Route(
    "path", "default", "harbor", "http://192.168.1.5:31567", "namespaces/default/connectors/harbor",
    "/v2/a/blobs/uploads/", upstream=str(UPSTREAM),
)
REQUEST_URL = "https://harbor.example.com/v2/a/blobs/uploads/"
STATE = "_state=eyJOYW1lIjoiYSIsIlVVSUQiOiIxIn0%3D%3D&x=a%2Bb%2Fc&empty=&flag"


def test_relative_location_host_form():
    out = rewrite_url(f"/v2/a/blobs/uploads/u1?{STATE}", REQUEST_URL, UPSTREAM, HOST_ROUTE)
    assert out == f"http://c-harbor.default.svc.cluster.local/v2/a/blobs/uploads/u1?{STATE}"


def test_absolute_location_on_the_upstream_host_form():
    out = rewrite_url(f"https://harbor.example.com/v2/a/blobs/uploads/u1?{STATE}", REQUEST_URL, UPSTREAM, HOST_ROUTE)
    assert out == f"http://c-harbor.default.svc.cluster.local/v2/a/blobs/uploads/u1?{STATE}"


def test_absolute_location_with_explicit_default_port():
    out = rewrite_url("https://harbor.example.com:443/v2/a/blobs/uploads/u1", REQUEST_URL, UPSTREAM, HOST_ROUTE)
    assert out == "http://c-harbor.default.svc.cluster.local/v2/a/blobs/uploads/u1"


def test_absolute_location_with_upper_case_host():
    out = rewrite_url("https://HARBOR.example.com/v2/a/blobs/uploads/u1", REQUEST_URL, UPSTREAM, HOST_ROUTE)
    assert out == "http://c-harbor.default.svc.cluster.local/v2/a/blobs/uploads/u1"


def test_path_form_prefix_is_reinserted():
    out = rewrite_url(f"/v2/a/blobs/uploads/u1?{STATE}", REQUEST_URL, UPSTREAM, PATH_ROUTE)
    assert out == f"http://192.168.1.5:31567/v2/namespaces/default/connectors/harbor/a/blobs/uploads/u1?{STATE}"


def test_path_form_absolute_location():
    out = rewrite_url("https://harbor.example.com/v2/a/b/blobs/uploads/u2?_state=x", REQUEST_URL, UPSTREAM, PATH_ROUTE)
    assert out == "http://192.168.1.5:31567/v2/namespaces/default/connectors/harbor/a/b/blobs/uploads/u2?_state=x"


def test_storage_location_on_another_host_untouched():
    s3 = (
        "https://bucket.s3.amazonaws.com/docker/registry/v2/blobs/sha256/ab/abcd/data"
        "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=deadbeef%2F%3D"
    )
    for route in (HOST_ROUTE, PATH_ROUTE):
        assert rewrite_url(s3, REQUEST_URL, UPSTREAM, route) == s3


def test_same_host_other_port_is_another_host():
    url = "https://harbor.example.com:9000/v2/a/blobs/x"
    assert rewrite_url(url, REQUEST_URL, UPSTREAM, HOST_ROUTE) == url


def test_same_host_other_scheme_is_another_origin():
    url = "http://harbor.example.com/storage/blob"
    assert rewrite_url(url, REQUEST_URL, UPSTREAM, HOST_ROUTE) == url


def test_scheme_relative_location_to_storage_untouched():
    url = "//cdn.example.net/blob?sig=1"
    assert rewrite_url(url, REQUEST_URL, UPSTREAM, HOST_ROUTE) == url


def test_upstream_path_prefix_is_removed():
    upstream = parse_address("https://art.example.com:8443/artifactory/api/docker/repo")
    route = Route("path", "ns", "art", "https://proxy.example", "namespaces/ns/connectors/art", "/v2/a/blobs/uploads/",
                  upstream=str(upstream))
    request_url = "https://art.example.com:8443/artifactory/api/docker/repo/v2/a/blobs/uploads/"
    out = rewrite_url("/artifactory/api/docker/repo/v2/a/blobs/uploads/u1?_state=s", request_url, upstream, route)
    assert out == "https://proxy.example/v2/namespaces/ns/connectors/art/a/blobs/uploads/u1?_state=s"
    out = rewrite_url(
        "https://art.example.com:8443/artifactory/api/docker/repo/v2/a/blobs/uploads/u1", request_url, upstream, route
    )
    assert out == "https://proxy.example/v2/namespaces/ns/connectors/art/a/blobs/uploads/u1"


def test_relative_location_without_leading_slash():
    out = rewrite_url("u1?_state=s", REQUEST_URL, UPSTREAM, HOST_ROUTE)
    assert out == "http://c-harbor.default.svc.cluster.local/v2/a/blobs/uploads/u1?_state=s"


def test_query_kept_byte_for_byte():
    query = "_state=Zm9v%2Bbar%2F%3D%3D&digest=sha256%3A" + "0" * 64 + "&a=1&a=2&sp=a+b&pct=%7E%41"
    out = rewrite_url(f"/v2/a/blobs/uploads/u1?{query}", REQUEST_URL, UPSTREAM, PATH_ROUTE)
    assert out.partition("?")[2] == query


def test_origin_scheme_host_and_port_come_from_the_route():
    route = Route("host", "default", "harbor", "https://c-harbor.default.svc:8443", "", "/v2/a/blobs/uploads/")
    out = rewrite_url("/v2/a/blobs/uploads/u1", REQUEST_URL, UPSTREAM, route)
    assert out == "https://c-harbor.default.svc:8443/v2/a/blobs/uploads/u1"


def test_upstream_on_a_non_default_port():
    upstream = parse_address("http://127.0.0.1:5000")
    request_url = "http://127.0.0.1:5000/v2/a/blobs/uploads/"
    route = Route("host", "default", "local", "http://c-local.default:80", "", "/v2/a/blobs/uploads/")
    assert rewrite_url("http://127.0.0.1:5000/v2/a/blobs/uploads/u", request_url, upstream, route) == (
        "http://c-local.default:80/v2/a/blobs/uploads/u"
    )
    assert rewrite_url("http://127.0.0.1/v2/a/blobs/uploads/u", request_url, upstream, route) == (
        "http://127.0.0.1/v2/a/blobs/uploads/u"
    )


def test_location_with_credentials_is_left_alone_not_crashing():
    url = "https://user:pw@harbor.example.com/v2/a"
    assert rewrite_url(url, REQUEST_URL, UPSTREAM, HOST_ROUTE) == url


# ---------------------------------------------------------------- Link


def test_tags_pagination_link_host_form():
    request_url = "https://harbor.example.com/v2/a/tags/list?n=2"
    out = rewrite_link('</v2/a/tags/list?last=x&n=2>; rel="next"', request_url, UPSTREAM, HOST_ROUTE)
    assert out == '<http://c-harbor.default.svc.cluster.local/v2/a/tags/list?last=x&n=2>; rel="next"'


def test_tags_pagination_link_path_form():
    request_url = "https://harbor.example.com/v2/a/tags/list?n=2"
    out = rewrite_link('</v2/a/tags/list?last=x&n=2>; rel="next"', request_url, UPSTREAM, PATH_ROUTE)
    assert out == '<http://192.168.1.5:31567/v2/namespaces/default/connectors/harbor/a/tags/list?last=x&n=2>; rel="next"'


def test_catalog_link_absolute():
    request_url = "https://harbor.example.com/v2/_catalog?n=1"
    out = rewrite_link('<https://harbor.example.com/v2/_catalog?last=b&n=1>; rel="next"', request_url, UPSTREAM, HOST_ROUTE)
    assert out == '<http://c-harbor.default.svc.cluster.local/v2/_catalog?last=b&n=1>; rel="next"'


def test_link_with_several_targets():
    value = '</v2/a/tags/list?last=x&n=2>; rel="next", <https://other.example/doc>; rel="help"'
    out = rewrite_link(value, REQUEST_URL, UPSTREAM, HOST_ROUTE)
    assert out == (
        '<http://c-harbor.default.svc.cluster.local/v2/a/tags/list?last=x&n=2>; rel="next", '
        '<https://other.example/doc>; rel="help"'
    )


# ---------------------------------------------------------------- the Rewrite addon


def upstream_flow(route: Route, status: int, headers: list[tuple[bytes, bytes]]):
    f = reverse_tflow()
    f.request.scheme = "https"
    f.request.host = "harbor.example.com"
    f.request.port = 443
    f.request.path = "/v2/a/blobs/uploads/"
    route.store(f)
    f.response = tutils.tresp(status_code=status, headers=tuple(headers), content=b"")
    return f


def test_addon_rewrites_location_and_link_and_streams_success():
    f = upstream_flow(PATH_ROUTE, 202, [
        (b"Location", b"/v2/a/blobs/uploads/u1?_state=abc%3D"),
        (b"Link", b'</v2/a/tags/list?last=x&n=2>; rel="next"'),
    ])
    Rewrite().responseheaders(f)
    assert f.response.headers["Location"] == (
        "http://192.168.1.5:31567/v2/namespaces/default/connectors/harbor/a/blobs/uploads/u1?_state=abc%3D"
    )
    assert f.response.headers["Link"] == (
        '<http://192.168.1.5:31567/v2/namespaces/default/connectors/harbor/a/tags/list?last=x&n=2>; rel="next"'
    )
    assert f.response.stream


def test_addon_keeps_redirects_to_storage_and_error_bodies_unstreamed():
    s3 = "https://bucket.s3.amazonaws.com/blob?X-Amz-Signature=1"
    f = upstream_flow(HOST_ROUTE, 307, [(b"Location", s3.encode())])
    Rewrite().responseheaders(f)
    assert f.response.headers["Location"] == s3
    f = upstream_flow(HOST_ROUTE, 404, [(b"Content-Length", b"80")])
    Rewrite().responseheaders(f)
    assert not f.response.stream  # a small JSON error: kept whole


def test_large_or_unsized_error_bodies_stream_and_401_is_left_to_upstream_auth():
    """An error body of unknown or large size is never buffered (a hostile registry could send GiBs)."""
    for headers in ([], [(b"Content-Length", str(200 * 1024 * 1024).encode())]):
        f = upstream_flow(HOST_ROUTE, 500, headers)
        Rewrite().responseheaders(f)
        assert f.response.stream
    f = upstream_flow(HOST_ROUTE, 401, [])
    Rewrite().responseheaders(f)
    assert not f.response.stream


def test_addon_ignores_flows_without_route_or_upstream():
    f = reverse_tflow(resp=True)
    f.response.headers["Location"] = "/v2/x"
    Rewrite().responseheaders(f)
    assert f.response.headers["Location"] == "/v2/x"
    f = upstream_flow(Route("ping", origin="http://p"), 200, [(b"Location", b"/v2/x")])
    Rewrite().responseheaders(f)
    assert f.response.headers["Location"] == "/v2/x"


def test_addon_streams_routed_requests_only():
    f = reverse_tflow()
    HOST_ROUTE.store(f)
    Rewrite().requestheaders(f)
    assert f.request.stream
    g = reverse_tflow()
    Rewrite().requestheaders(g)
    assert not g.request.stream
