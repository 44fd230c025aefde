"""Unit tests for addons/client_auth.py: credential parsing, static tokens, the ClientAuth addon."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path

import pytest
from conftest import reverse_tflow
from mitmproxy import ctx, exceptions
from mitmproxy.test import taddons

from addons.gate import Gate
from addons.client_auth import ClientAuth, parse_client_credential
from connector_store.identity import Identity, StaticTokens, may_use, token_digest
from addons.routing import Route, Routing
from addons.store import ConnectorStore
from connector_store.files import DirectoryStore

ALICE = "tok-alice-7f3a9c1d2e"  # may use default/harbor, default/broken, default/ghost
BOB = "tok-bob-55aa77cc99"  # may use team/* only
ROOT = "tok-root-0011223344"  # may use everything
ALL_TOKENS = (ALICE, BOB, ROOT)

MANIFESTS = """\
apiVersion: connectors.alauda.io/v1alpha1
kind: Connector
metadata:
  name: harbor
spec:
  address: https://harbor.example.com
  auth:
    name: tokenAuth
    secretRef:
      name: harbor-secret
  connectorClassName: oci
---
apiVersion: v1
stringData:
  password: admin
  username: admin
kind: Secret
metadata:
  name: harbor-secret
type: cpaas.io/distribution-registry-token
---
apiVersion: connectors.alauda.io/v1alpha1
kind: Connector
metadata:
  name: broken
spec:
  address: https://broken.example.com
  auth:
    name: tokenAuth
    secretRef:
      name: missing-secret
  connectorClassName: oci
"""

TOKENS = f"""\
tokens:
- token: {ALICE}
  subject: system:serviceaccount:default:alice
  connectors: [default/harbor, default/broken, default/ghost]
- token: {BOB}
  subject: system:serviceaccount:team:bob
  connectors: ["team/*"]
- token: {ROOT}
  subject: admin
  connectors: ["*"]
"""


def basic(user: str, token: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


# ---------------------------------------------------------------- parse_client_credential


def test_basic_with_any_user():
    assert parse_client_credential(basic("anything", "tok")) == "tok"
    assert parse_client_credential(basic("", "tok")) == "tok"
    assert parse_client_credential(basic("default/harbor", "a:b:c")) == "a:b:c"


def test_bearer():
    assert parse_client_credential("Bearer eyJhbGciOi.payload.sig") == "eyJhbGciOi.payload.sig"
    assert parse_client_credential("bearer tok") == "tok"
    assert parse_client_credential("  Bearer   tok  ") == "tok"


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "   ",
        "Bearer",
        "Bearer   ",
        "Basic",
        "Basic !!!not-base64!!!",
        "Basic " + base64.b64encode(b"no-colon-here").decode(),
        "Basic " + base64.b64encode(b"user:").decode(),  # empty token
        "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),  # not UTF-8
        "Digest username=x",
        "tok-without-scheme",
        "Bearer " + "a" * 20_000,  # absurdly large
        basic("u", "t" * 20_000),
    ],
)
def test_garbage_credentials_are_none(header):
    assert parse_client_credential(header) is None


def test_may_use_patterns():
    assert may_use(("default/harbor",), "default", "harbor")
    assert not may_use(("default/harbor",), "default", "other")
    assert may_use(("default/*",), "default", "other")
    assert not may_use(("default/*",), "team", "harbor")
    assert may_use(("*",), "team", "harbor")
    assert not may_use((), "default", "harbor")
    assert not may_use(("default/harb*",), "default", "harbor")


# ---------------------------------------------------------------- StaticTokens


def test_static_tokens_authenticate_and_authorize(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text(TOKENS)
    st = StaticTokens(path)
    alice = st.authenticate(ALICE)
    assert alice == Identity("system:serviceaccount:default:alice", ("default/harbor", "default/broken", "default/ghost"))
    assert st.authenticate("nope") is None
    assert st.authorize(alice, "default", "harbor")
    assert not st.authorize(alice, "team", "x")
    bob = st.authenticate(BOB)
    assert st.authorize(bob, "team", "anything") and not st.authorize(bob, "default", "harbor")


def test_static_tokens_keep_no_plain_token(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text(TOKENS)
    st = StaticTokens(path)
    assert ALICE not in repr(vars(st))
    assert token_digest(ALICE) != ALICE and len(token_digest(ALICE)) == 64


def test_static_tokens_reload_when_the_file_changes(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text(TOKENS)
    os.utime(path, ns=(1_000_000_000_000_000_000,) * 2)
    st = StaticTokens(path)
    assert st.authenticate("tok-new-carol") is None
    path.write_text(TOKENS + "- token: tok-new-carol\n  subject: carol\n  connectors: [default/harbor]\n")
    os.utime(path, ns=(1_000_000_005_000_000_000,) * 2)
    carol = st.authenticate("tok-new-carol")
    assert carol is not None and carol.subject == "carol"
    # removing a token takes effect too
    path.write_text(f"tokens:\n- token: {ROOT}\n  subject: admin\n  connectors: ['*']\n")
    os.utime(path, ns=(1_000_000_010_000_000_000,) * 2)
    assert st.authenticate(ALICE) is None
    assert st.authenticate(ROOT).subject == "admin"


def test_static_tokens_keep_previous_table_when_file_breaks(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text(TOKENS)
    os.utime(path, ns=(1_000_000_000_000_000_000,) * 2)
    st = StaticTokens(path)
    path.write_text("tokens: [ {unclosed")
    os.utime(path, ns=(1_000_000_005_000_000_000,) * 2)
    assert st.authenticate(ALICE) is not None
    path.unlink()
    assert st.authenticate(ALICE) is not None


@pytest.mark.parametrize("text", ["tokens: 3\n", "- a\n- b\n", "tokens:\n- subject: x\n", "tokens:\n- token: t\n  subject: s\n  connectors: x\n"])
def test_static_tokens_invalid_file(tmp_path, text):
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    with pytest.raises(ValueError):
        StaticTokens(path)


# ---------------------------------------------------------------- the ClientAuth addon


@pytest.fixture
def env(tmp_path):
    connectors = tmp_path / "connectors"
    connectors.mkdir()
    (connectors / "all.yaml").write_text(MANIFESTS)
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(TOKENS)
    store = ConnectorStore()
    store.backend = DirectoryStore(connectors)
    assert store.backend.refresh()
    assert store.get("default", "harbor").usable
    assert not store.get("default", "broken").usable
    addon = ClientAuth(store, Gate())
    with taddons.context(addon) as tctx:
        tctx.configure(addon, client_tokens=str(tokens))
        yield addon


def run(addon: ClientAuth, path: str, authorization: str | None = None, host: str = "proxy.example:8080"):
    f = reverse_tflow()
    f.request.path = path
    f.request.host_header = host
    f.client_conn.timestamp_tls_setup = None
    if authorization is not None:
        f.request.headers["Authorization"] = authorization
    Routing().requestheaders(f)
    assert f.response is None, "routing must accept the request"
    asyncio.run(addon.requestheaders(f))
    return f


def error_of(f) -> dict:
    assert f.response is not None
    assert f.response.headers["Content-Type"] == "application/json"
    [err] = json.loads(f.response.content)["errors"]
    return err


HARBOR_MANIFEST = "/v2/namespaces/default/connectors/harbor/testing/busybox/manifests/latest"


def assert_no_token_in(f):
    text = f.response.content.decode() + "\n" + "\n".join(f"{k}: {v}" for k, v in f.response.headers.items())
    for tok in ALL_TOKENS:
        assert tok not in text
        assert base64.b64encode(f"x:{tok}".encode()).decode() not in text


def test_no_authorization_is_401_with_a_registry_like_bearer_challenge(env):
    """Like a registry: a realm on the proxy's own token endpoint, the connector as service, the scope."""
    f = run(env, HARBOR_MANIFEST)
    assert f.response.status_code == 401
    assert f.response.headers["WWW-Authenticate"] == (
        'Bearer realm="http://proxy.example:8080/.connectors/token",service="default/harbor",'
        'scope="repository:namespaces/default/connectors/harbor/testing/busybox:pull"'
    )
    assert error_of(f)["code"] == "UNAUTHORIZED"


def test_basic_challenge_mode(env):
    ctx.options.client_challenge = "basic"
    f = run(env, HARBOR_MANIFEST)
    assert f.response.headers["WWW-Authenticate"] == 'Basic realm="oci-connector-proxy"'


def test_proxy_tokens_are_checked_for_connector_and_scope(env):
    from addons.proxy_token import Access
    tokens = env.tokens
    pull, _ = tokens.issue("alice", "default/harbor", "default/harbor",
                           [Access("repository", "namespaces/default/connectors/harbor/testing/busybox", ("pull",))])
    f = run(env, HARBOR_MANIFEST, f"Bearer {pull}")
    assert f.response is None  # granted: on to the upstream
    f = run(env, HARBOR_MANIFEST.replace("busybox", "other"), f"Bearer {pull}")
    assert f.response.status_code == 401 and 'error="insufficient_scope"' in f.response.headers["WWW-Authenticate"]
    other, _ = tokens.issue("alice", "team/other", "team/other", [])
    f = run(env, HARBOR_MANIFEST, f"Bearer {other}")
    assert f.response.status_code == 401
    forged = pull[:-4] + ("AAAA" if not pull.endswith("AAAA") else "BBBB")
    f = run(env, HARBOR_MANIFEST, f"Bearer {forged}")
    assert f.response.status_code == 401 and "invalid or expired" in f.response.content.decode()


def test_shared_host_ping_without_credentials_is_challenged(env):
    f = run(env, "/v2/")
    assert f.response.status_code == 401
    assert "WWW-Authenticate" in f.response.headers


def test_shared_host_ping_with_valid_credentials_is_200(env):
    f = run(env, "/v2/", basic("x", BOB))
    assert f.response.status_code == 200


def test_wrong_token_is_401(env):
    f = run(env, HARBOR_MANIFEST, basic("x", "tok-wrong-123"))
    assert f.response.status_code == 401
    assert error_of(f)["code"] == "UNAUTHORIZED"
    assert f.response.headers["WWW-Authenticate"].startswith("Bearer realm=")
    assert "tok-wrong-123" not in f.response.content.decode()


def test_garbage_authorization_is_401(env):
    f = run(env, HARBOR_MANIFEST, "Basic %%%garbage")
    assert f.response.status_code == 401


def test_token_for_another_connector_is_403(env):
    f = run(env, HARBOR_MANIFEST, basic("x", BOB))
    assert f.response.status_code == 403
    err = error_of(f)
    assert err["code"] == "DENIED"
    assert "default/harbor" in err["message"]


def test_no_permission_on_unknown_connector_is_403_not_404(env):
    f = run(env, "/v2/namespaces/default/connectors/ghost/a/manifests/v1", basic("x", BOB))
    assert f.response.status_code == 403


def test_allowed_but_unknown_connector_is_404(env):
    f = run(env, "/v2/namespaces/default/connectors/ghost/a/manifests/v1", basic("x", ALICE))
    assert f.response.status_code == 404
    err = error_of(f)
    assert err["code"] == "NAME_UNKNOWN"
    assert "default/ghost" in err["message"]


def test_unusable_connector_is_503_naming_the_reason(env):
    f = run(env, "/v2/namespaces/default/connectors/broken/a/manifests/v1", f"Bearer {ALICE}")
    assert f.response.status_code == 503
    err = error_of(f)
    assert "default/broken" in err["message"]
    assert "missing-secret" in err["message"] and "not found" in err["message"]


def test_allowed_request_goes_on_with_subject(env):
    f = run(env, HARBOR_MANIFEST, basic("anyone", ALICE))
    assert f.response is None
    r = Route.of(f)
    assert r.connector == "default/harbor"
    assert r.subject == "system:serviceaccount:default:alice"


def test_bearer_credential_accepted(env):
    f = run(env, HARBOR_MANIFEST, f"Bearer {ROOT}")
    assert f.response is None
    assert Route.of(f).subject == "admin"


def test_host_form_request(env):
    f = run(env, "/v2/testing/busybox/manifests/latest", basic("x", ALICE), host="c-harbor.default.svc.cluster.local")
    assert f.response is None
    assert Route.of(f).subject.endswith(":alice")
    g = run(env, "/v2/testing/busybox/manifests/latest", basic("x", BOB), host="c-harbor.default.svc")
    assert g.response.status_code == 403


def test_connector_ping_answered_by_proxy(env):
    f = run(env, "/v2/namespaces/default/connectors/harbor/", basic("x", ALICE))
    assert f.response.status_code == 200
    f = run(env, "/v2/", basic("x", ALICE), host="c-harbor.default")
    assert f.response.status_code == 200


def test_connector_ping_without_credentials_is_challenged(env):
    f = run(env, "/v2/namespaces/default/connectors/harbor/")
    assert f.response.status_code == 401
    assert "WWW-Authenticate" in f.response.headers


def test_token_never_appears_in_any_response(env):
    cases = [
        (HARBOR_MANIFEST, tok, form)
        for tok in ALL_TOKENS + ("tok-wrong-123",)
        for form in ("basic", "bearer")
    ] + [(p, ALICE, "basic") for p in (
        "/v2/namespaces/default/connectors/ghost/a/manifests/v1",
        "/v2/namespaces/default/connectors/broken/a/manifests/v1",
        "/v2/namespaces/team/connectors/x/a/manifests/v1",
        "/v2/",
    )]
    answered = 0
    for path, tok, form in cases:
        f = run(env, path, basic("x", tok) if form == "basic" else f"Bearer {tok}")
        if f.response is not None:
            answered += 1
            assert_no_token_in(f)
    assert answered >= 8


def test_already_answered_or_unrouted_flows_are_left_alone(env):
    f = reverse_tflow()
    asyncio.run(env.requestheaders(f))  # no route: not a registry request
    assert f.response is None
    g = reverse_tflow(resp=True)
    Route("path", "default", "harbor", "http://p", "namespaces/default/connectors/harbor", "/v2/a/tags/list").store(g)
    asyncio.run(env.requestheaders(g))
    assert g.response.status_code == 200 and g.response.content == b"message"


def test_without_token_backend_valid_looking_credentials_get_503(tmp_path):
    store = ConnectorStore()
    addon = ClientAuth(store, Gate())
    with taddons.context(addon):
        f = run(addon, HARBOR_MANIFEST, basic("x", "something"))
        assert f.response.status_code == 503
        assert "something" not in f.response.content.decode()


def test_invalid_token_file_is_an_options_error(tmp_path):
    bad = tmp_path / "tokens.yaml"
    bad.write_text("tokens: 7\n")
    addon = ClientAuth(ConnectorStore(), Gate())
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(addon, client_tokens=str(bad))
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(addon, client_tokens=str(tmp_path / "missing.yaml"))


def test_connector_removed_from_store_becomes_404(env, tmp_path):
    d: Path = env.store.backend.directory
    (d / "all.yaml").write_text(MANIFESTS.split("---\n", 1)[1])  # drop the harbor Connector
    os.utime(d / "all.yaml", ns=(1_000_000_000_000_000_000,) * 2)
    assert env.store.backend.refresh()
    f = run(env, HARBOR_MANIFEST, basic("x", ALICE))
    assert f.response.status_code == 404


def test_before_the_first_sync_an_allowed_caller_gets_503_not_404(env):
    """A Kubernetes store that has not listed yet knows no connector: saying 404 would be a lie."""
    env.store.backend.synced = False
    try:
        f = run(env, HARBOR_MANIFEST, basic("x", ALICE))
        assert f.response.status_code == 503
        assert "not loaded yet" in error_of(f)["message"]
    finally:
        env.store.backend.synced = True


def test_an_identity_backend_outage_is_a_json_503_everywhere_config_endpoint_included(env):
    """The API server away: registry requests and `/.connectors/config` answer the same JSON 503."""
    from addons.client_config import ClientConfig
    from addons.scrub import LateSecrets

    class Down:
        blocking = False

        def authenticate(self, token):
            raise ConnectionError("api server unreachable")

        def authorize(self, identity, namespace, name):
            raise ConnectionError("api server unreachable")

    env.backend = Down()
    f = run(env, HARBOR_MANIFEST, basic("x", ALICE))
    assert f.response.status_code == 503 and error_of(f)["code"] == "UNAVAILABLE"
    config = ClientConfig(env.store, env, LateSecrets())
    g = reverse_tflow()
    g.request.path = "/.connectors/config?use=default/harbor&names=registry-config"
    g.request.headers["Authorization"] = basic("x", ALICE)
    asyncio.run(config.requestheaders(g))
    assert g.response.status_code == 503
    assert json.loads(g.response.content)["errors"][0]["code"] == "UNAVAILABLE"
    assert ALICE not in g.response.content.decode()


def test_the_token_endpoint_refuses_large_or_unsized_forms(env):
    """Its form is read whole: a chunked or huge POST is refused before any byte is buffered."""
    from addons.scrub import LateSecrets
    from addons.token_endpoint import TokenEndpoint

    endpoint = TokenEndpoint(env, LateSecrets())
    for headers in ({"Transfer-Encoding": "chunked"}, {"Content-Length": str(10 * 1024 * 1024)}):
        f = reverse_tflow()
        f.request.method = "POST"
        f.request.path = "/.connectors/token"
        f.request.headers.update(headers)
        f.request.headers.pop("content-length", None) if "Transfer-Encoding" in headers else None
        endpoint.requestheaders(f)
        assert f.response is not None and f.response.status_code == 413
