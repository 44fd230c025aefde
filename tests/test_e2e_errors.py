"""Identity and upstream failures: the right status, the registry's JSON error format, no secrets."""

from __future__ import annotations

import json

import pytest

from proxyproc import basic

MANIFEST = "/v2/namespaces/{ns}/connectors/{name}/test/abc/manifests/v1"


def error_of(r) -> dict:
    assert r.headers["Content-Type"].startswith("application/json")
    body = json.loads(r.data)
    assert isinstance(body["errors"], list) and body["errors"], body
    return body["errors"][0]


def test_no_token_gets_401_with_challenge(proxy):
    r = proxy.request("GET", MANIFEST.format(ns="default", name="harbor"))
    assert r.status == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer realm=\"http://")
    assert "/.connectors/token" in r.headers["WWW-Authenticate"]
    assert error_of(r)["code"] == "UNAUTHORIZED"


def test_shared_host_ping_challenges_then_accepts(world, proxy):
    r = proxy.request("GET", "/v2/")
    assert r.status == 401 and "WWW-Authenticate" in r.headers
    r = proxy.request("GET", "/v2/", auth=basic("x", world.builder_token))
    assert r.status == 200
    r = proxy.request("GET", "/v2/", auth=f"Bearer {world.builder_token}")
    assert r.status == 200


@pytest.mark.parametrize("auth", [
    basic("x", "not-a-token"), "Bearer nope", "Basic !!!notbase64", "Basic " + "QQ==" * 5000, "Digest x", "",
])
def test_wrong_or_garbage_token_gets_401(world, proxy, auth):
    r = proxy.request("GET", MANIFEST.format(ns="default", name="harbor"), auth=auth or None)
    assert r.status == 401
    err = error_of(r)
    assert err["code"] == "UNAUTHORIZED"
    assert "not-a-token" not in r.data.decode()


def test_token_of_another_connector_gets_403(world, proxy):
    r = proxy.request("GET", MANIFEST.format(ns="default", name="harbor"), auth=basic("x", world.team_token))
    assert r.status == 403
    err = error_of(r)
    assert err["code"] == "DENIED"
    assert "default/harbor" in err["message"]
    assert world.team_token not in r.data.decode()


def test_unknown_connector_404_only_for_those_allowed(world, proxy):
    r = proxy.request("GET", MANIFEST.format(ns="default", name="nope"), auth=basic("x", world.builder_token))
    assert r.status == 404
    assert error_of(r)["code"] == "NAME_UNKNOWN"
    assert "default/nope" in error_of(r)["message"]
    # someone who may not use default/* learns nothing about what exists there
    r = proxy.request("GET", MANIFEST.format(ns="default", name="nope"), auth=basic("x", world.team_token))
    assert r.status == 403


def test_upstream_down_gets_502_naming_the_connector(world, proxy):
    r = proxy.request("GET", MANIFEST.format(ns="default", name="down"), auth=basic("x", world.builder_token))
    assert r.status == 502
    err = error_of(r)
    assert "default/down" in err["message"]
    assert "127.0.0.1" in err["message"]


def test_connector_without_its_secret_is_unusable_with_reason(world, proxy):
    r = proxy.request("GET", MANIFEST.format(ns="default", name="broken"), auth=basic("x", world.builder_token))
    assert r.status == 503
    err = error_of(r)
    assert "default/broken" in err["message"] and "missing-secret" in err["message"]
    # and the others keep working
    r = proxy.request("GET", "/v2/namespaces/default/connectors/harbor/test/abc/tags/list", auth=basic("x", world.builder_token))
    assert r.status in (200, 404)
    assert r.status != 404 or error_of(r)["code"] == "NAME_UNKNOWN"


def test_credential_without_push_permission_gets_403_denied(world, proxy):
    r = proxy.request("POST", "/v2/namespaces/default/connectors/readonly/ro/app/blobs/uploads/",
                      auth=basic("x", world.builder_token))
    assert r.status == 403, r.data
    err = error_of(r)
    assert err["code"] == "DENIED"
    assert "insufficient_scope" in err["message"]
    assert "WWW-Authenticate" not in r.headers  # asking the client to log in again would not help


@pytest.mark.parametrize("path,status,code", [
    ("/v2/namespaces/default/connectors/harbor/a/../b/manifests/v1", 400, "NAME_INVALID"),
    ("/v2/namespaces/default/connectors/harbor/UPPER/manifests/v1", 400, "NAME_INVALID"),
    ("/v2/namespaces/default/connectors/harbor/a%2f..%2fb/manifests/v1", 400, "NAME_INVALID"),
    ("/v2/namespaces/Bad_NS/connectors/harbor/a/manifests/v1", 400, "NAME_INVALID"),
    ("/v2/test/abc/manifests/v1", 404, "NAME_UNKNOWN"),  # shared host, no connector named
    ("/v1/search", 404, "NAME_UNKNOWN"),
])
def test_malformed_requests_get_registry_errors(world, proxy, path, status, code):
    status_got, headers, body = proxy.raw_request("GET", path, {"Authorization": basic("x", world.builder_token)})
    assert status_got == status, body
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["errors"][0]["code"] == code


def test_bad_host_header_on_a_repository_path(world, proxy):
    r = proxy.request("GET", "/v2/test/abc/manifests/v1", auth=basic("x", world.builder_token), host="c-.default.svc")
    assert r.status == 404
    assert error_of(r)["code"] == "NAME_UNKNOWN"


def test_health_endpoints_need_no_credentials_and_reveal_none(world, proxy):
    assert proxy.request("GET", "/healthz").status == 200
    assert proxy.request("GET", "/readyz").status == 200
    r = proxy.request("GET", "/metrics")
    assert r.status == 200
    text = r.data.decode()
    assert "connector_proxy_upstream_token_fetches_total" in text
    assert 'connector_proxy_connectors 5' in text
    for s in world.secrets:
        assert s not in text


def client_hello() -> bytes:
    """The first flight of a real TLS client, as bytes (what docker or containerd send first)."""
    import ssl

    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="registry.example")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_reverse_listener_answers_tls_with_plaintext_400_so_clients_fall_back_to_http(world, proxy):
    """A plain-HTTP Go registry answers a ClientHello with `HTTP/1.1 400`; Go clients then report
    "server gave HTTP response to HTTPS client" and retry over http (an EOF would abort them)."""
    import socket

    before = proxy.output().count("connector-proxy.invalid")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
        raw.sendall(client_hello())
        answer = b""
        while chunk := raw.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Connection: close" in head and int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) == len(body)
    assert proxy.output().count("connector-proxy.invalid") == before  # nothing dialled, nothing logged
    assert "127.0.0.1:9" not in proxy.output()
    # and plain HTTP keeps working for everyone
    assert proxy.request("GET", "/v2/", auth=basic("x", world.builder_token)).status == 200


def test_the_launcher_loads_no_script_that_a_reload_could_drop(world, proxy):
    """mitmproxy reloads a -s script when its file changes, and one that fails to load leaves the
    proxy running with none of our addons: `connector-proxy` adds the chain to the master instead."""
    assert "Loading script" not in proxy.output()
    assert proxy.request("GET", MANIFEST.format(ns="default", name="harbor")).status == 401  # the chain is there
