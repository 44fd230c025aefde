"""Unit tests for addons/scrub.py: client credentials removed, injected credentials redacted."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import flow as mflow
from mitmproxy.test import tflow

from addons.scrub import REDACTED, Scrub, redacted

CLIENT_TOKEN = "client-sa-token-9d8c7b"
UPSTREAM_TOKEN = "upstream-jwt-abcdef123456"
BASIC = "Basic " + base64.b64encode(b"admin:registry-password").decode()


def flow_with(headers: list[tuple[str, str]]):
    f = tflow.tflow()
    for k, v in headers:
        f.request.headers.add(k, v)
    return f


def dump(f) -> str:
    return repr(f.get_state())


def test_requestheaders_removes_client_credentials():
    f = flow_with([
        ("Authorization", f"Bearer {CLIENT_TOKEN}"),
        ("Proxy-Authorization", "Basic " + base64.b64encode(f"default/harbor:{CLIENT_TOKEN}".encode()).decode()),
        ("Accept", "application/vnd.oci.image.manifest.v1+json"),
    ])
    Scrub().requestheaders(f)
    assert "authorization" not in f.request.headers
    assert "proxy-authorization" not in f.request.headers
    assert f.request.headers["Accept"] == "application/vnd.oci.image.manifest.v1+json"
    assert CLIENT_TOKEN not in dump(f)


def test_requestheaders_removes_repeated_and_oddly_cased_headers():
    f = flow_with([("authorization", "Bearer a"), ("AUTHORIZATION", "Bearer b"), ("proxy-AUTHORIZATION", "Basic c")])
    Scrub().requestheaders(f)
    assert f.request.headers.get_all("authorization") == []
    assert f.request.headers.get_all("proxy-authorization") == []


def test_requestheaders_without_credentials_changes_nothing():
    f = tflow.tflow()
    before = list(f.request.headers.items(multi=True))
    Scrub().requestheaders(f)
    assert list(f.request.headers.items(multi=True)) == before


@pytest.mark.parametrize("hook", ["responseheaders", "response", "error"])
def test_injected_authorization_is_redacted(hook):
    f = tflow.tflow(resp=True, err=(hook == "error"))
    f.request.headers["Authorization"] = f"Bearer {UPSTREAM_TOKEN}"
    getattr(Scrub(), hook)(f)
    assert f.request.headers["Authorization"] == f"Bearer {REDACTED}"
    assert UPSTREAM_TOKEN not in dump(f)


@pytest.mark.parametrize("hook", ["responseheaders", "response", "error"])
def test_injected_basic_is_redacted(hook):
    f = tflow.tflow(resp=True)
    f.request.headers["Authorization"] = BASIC
    getattr(Scrub(), hook)(f)
    assert f.request.headers["Authorization"] == f"Basic {REDACTED}"
    state = dump(f)
    assert "registry-password" not in state
    assert BASIC.split(" ")[1] not in state


def test_error_without_response_is_redacted():
    f = tflow.tflow(err=True)
    assert f.response is None
    f.request.headers["Authorization"] = f"Bearer {UPSTREAM_TOKEN}"
    Scrub().error(f)
    assert UPSTREAM_TOKEN not in dump(f)
    assert isinstance(f.error, mflow.Error)


def test_all_values_of_repeated_headers_are_redacted():
    f = tflow.tflow(resp=True)
    f.request.headers.add("Authorization", f"Bearer {UPSTREAM_TOKEN}")
    f.request.headers.add("Authorization", "Basic Zm9vOmJhcg==")
    f.request.headers.add("Proxy-Authorization", "Basic c2VjcmV0")
    Scrub().response(f)
    assert f.request.headers.get_all("Authorization") == [f"Bearer {REDACTED}", f"Basic {REDACTED}"]
    assert f.request.headers.get_all("Proxy-Authorization") == [f"Basic {REDACTED}"]


def test_redaction_is_idempotent():
    f = tflow.tflow(resp=True)
    f.request.headers["Authorization"] = f"Bearer {UPSTREAM_TOKEN}"
    s = Scrub()
    s.responseheaders(f)
    s.response(f)
    assert f.request.headers["Authorization"] == f"Bearer {REDACTED}"


def test_other_headers_untouched_by_redaction():
    f = tflow.tflow(resp=True)
    f.request.headers["Authorization"] = f"Bearer {UPSTREAM_TOKEN}"
    f.request.headers["X-Other"] = "keep-me"
    Scrub().response(f)
    assert f.request.headers["X-Other"] == "keep-me"
    assert f.response.headers["header-response"] == "svalue"


@pytest.mark.parametrize(
    "value, expected",
    [
        ("Bearer abc.def.ghi", f"Bearer {REDACTED}"),
        ("Basic YWRtaW46YWRtaW4=", f"Basic {REDACTED}"),
        ("  Bearer   spaced  ", f"Bearer {REDACTED}"),
        ("bare-secret-without-scheme", REDACTED),
        ("Bearer", REDACTED),
        ("", REDACTED),
        ("   ", REDACTED),
    ],
)
def test_redacted(value, expected):
    assert redacted(value) == expected


def test_redacted_never_contains_the_secret():
    for secret in ("s3cr3t", "a b c", "x" * 1000):
        for value in (f"Bearer {secret}", f"Basic {secret}", secret):
            out = redacted(value)
            assert secret not in out
            assert REDACTED in out


# ---------------------------------------------------------------- by value: what a registry echoes


def echoed_flow(scrub: Scrub, injected: str, status: int, headers: list[tuple[bytes, bytes]], body: bytes):
    f = tflow.tflow(resp=True)
    scrub.late.request_header(f, "Authorization", injected)
    f.response.status_code = status
    f.response.headers = __import__("mitmproxy").http.Headers(headers)
    f.response.content = body
    return f


@pytest.mark.parametrize("injected", [f"Bearer {UPSTREAM_TOKEN}", BASIC])
def test_an_echoed_credential_is_redacted_from_headers_and_a_whole_body(injected):
    scrub = Scrub()
    secret = injected.split(" ", 1)[1]
    body = b'{"errors":[{"code":"DENIED","detail":"' + secret.encode() + b'"}]}'
    f = echoed_flow(scrub, injected, 403, [(b"X-Echo", injected.encode()), (b"Content-Type", b"application/json")], body)
    scrub.responseheaders(f)
    scrub.response(f)
    assert secret not in dump(f)
    assert len(f.response.content) == len(body)  # same length: Content-Length and framing hold
    if injected.startswith("Basic"):
        assert "registry-password" not in dump(f)  # the decoded form too


def test_an_echoed_credential_is_redacted_from_a_streamed_body_across_chunk_edges():
    scrub = Scrub()
    f = echoed_flow(scrub, f"Bearer {UPSTREAM_TOKEN}", 200, [], b"")
    f.response.stream = True
    scrub.responseheaders(f)
    data = (b"x" * 7 + UPSTREAM_TOKEN.encode()) * 50
    out = []
    for i in range(0, len(data), 5):
        out += f.response.stream(data[i:i + 5])
    out += f.response.stream(b"")
    sent = b"".join(out)
    assert len(sent) == len(data) and UPSTREAM_TOKEN.encode() not in sent
    assert all(chunk for chunk in out)  # never an empty chunk (it would end a chunked body)


def test_short_secrets_are_not_redacted_from_bodies():
    """A password like the seed's "admin" would corrupt ordinary documents: only long values count."""
    from addons.scrub import secret_parts
    assert secret_parts("Basic " + base64.b64encode(b"admin:admin").decode()) == [
        base64.b64encode(b"admin:admin").decode(), "admin:admin"]


@settings(max_examples=300, deadline=None)
@given(
    secrets=st.lists(st.binary(min_size=1, max_size=12).filter(lambda b: b"*" not in b), min_size=1, max_size=3),
    pieces=st.lists(st.one_of(st.binary(max_size=20), st.integers(min_value=0, max_value=40)), max_size=30),
    cuts=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=20),
)
def test_no_chunking_lets_a_secret_through_a_streamed_body(secrets, pieces, cuts):
    """Any chunking of any body (whole secrets, their prefixes and overlaps anywhere): no secret in
    what is sent, the same length, every byte the body's or a `*`, never an empty chunk."""
    from addons.scrub import StreamRedactor

    body = b"".join(p if isinstance(p, bytes) else secrets[p % len(secrets)][: 1 + p // 3] for p in pieces)
    redactor = StreamRedactor(secrets)
    out, i, k = [], 0, 0
    while i < len(body):
        n = cuts[k % len(cuts)]
        out += redactor(body[i:i + n])
        i, k = i + n, k + 1
    out += redactor(b"")
    sent = b"".join(out)
    assert len(sent) == len(body)
    assert not any(secret in sent for secret in secrets)
    assert all(a == b or a == ord("*") for a, b in zip(sent, body))
    assert all(chunk for chunk in out)


def test_a_streamed_chunk_without_a_secret_or_its_start_is_passed_on_as_it_came():
    from addons.scrub import StreamRedactor

    redactor = StreamRedactor([b"registry-token-0123456789"])
    chunk = b"x" * 65536
    assert redactor(chunk)[0] is chunk  # no copy
    held = b"x" * 100 + b"registry-tok"
    assert redactor(held) == [b"x" * 100]  # a possible start waits for the next chunk
    assert redactor(b"en-0123456789 and on") == [b"*" * 25 + b" and on"]
