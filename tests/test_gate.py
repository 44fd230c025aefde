"""The gate and the fail_closed wrapper, driven without a proxy (the subprocess proof is in tests/security)."""

from __future__ import annotations

import asyncio
import json

import pytest
from mitmproxy.test import tflow

from addons import oci
from addons.gate import Gate, Verdict, describe_exception, fail_closed
from tests.conftest import reverse_tflow

DEST = ("https", "registry.example.com", 443)


def upstream_flow():
    f = reverse_tflow()
    f.request.scheme, f.request.host, f.request.port = DEST
    return f


def test_a_flow_without_verdict_is_refused():
    gate, f = Gate(), upstream_flow()
    gate.request(f)
    assert f.response.status_code == 500
    assert json.loads(f.response.content)["errors"][0]["code"] == "UNKNOWN"
    assert gate.refused == 1


def test_a_flow_with_a_matching_verdict_passes_without_the_clients_credential():
    gate, f = Gate(), upstream_flow()
    f.request.headers["Authorization"] = "Basic Y2xpZW50OnRva2Vu"
    gate.grant(f, Verdict("alice", "default/harbor", DEST))
    f.request.stream = True
    gate.requestheaders(f)
    assert f.response is None
    assert "authorization" not in f.request.headers


def test_a_verdict_for_another_destination_is_refused():
    """Authorized for the connector's registry, but still pointing at the placeholder: never sent."""
    gate, f = Gate(), reverse_tflow()
    gate.grant(f, Verdict("alice", "default/harbor", DEST))
    gate.request(f)
    assert f.response.status_code == 500


def test_a_streamed_request_is_checked_before_its_body_goes():
    gate, f = Gate(), reverse_tflow()
    f.request.stream = True
    gate.requestheaders(f)
    assert f.response.status_code == 500


def test_answered_flows_are_left_alone():
    gate, f = Gate(), upstream_flow()
    f.response = oci.refusal(f.request, 404, "NAME_UNKNOWN", "x")
    gate.request(f)
    assert f.response.status_code == 404


def test_connect_and_raw_tcp_need_an_authorized_connection():
    gate = Gate()
    f = tflow.tflow()
    f.request.method = "CONNECT"
    gate.http_connect(f)
    assert f.response.status_code == 407
    t = tflow.ttcpflow()
    gate.tcp_start(t)
    assert t.error is not None
    t2 = tflow.ttcpflow()
    gate.grant_connection(t2.client_conn, Verdict("alice", "", ("http", "other", 80)))
    gate.tcp_start(t2)
    assert t2.error is None


class Hooks:
    @fail_closed
    def requestheaders(self, flow):
        raise ValueError("secret-value-in-message")

    @fail_closed(credentials=True)
    async def request(self, flow):
        raise KeyError("secret-value-in-message")

    @fail_closed
    def responseheaders(self, flow):
        raise RuntimeError("x")


def test_fail_closed_turns_exceptions_into_refusals(caplog):
    f = reverse_tflow()
    Hooks().requestheaders(f)
    assert f.response.status_code == 500
    g = reverse_tflow()
    asyncio.run(Hooks().request(g))
    assert g.response.status_code == 401
    h = tflow.tflow()  # forward listener: the proxy's own statuses
    asyncio.run(Hooks().request(h))
    assert h.response.status_code == 407
    assert "secret-value-in-message" not in caplog.text
    assert "ValueError" in caplog.text and "requestheaders" in caplog.text


def test_fail_closed_kills_a_flow_whose_response_started():
    f = reverse_tflow(resp=True)
    Hooks().responseheaders(f)
    assert f.error is not None and f.error.msg == "Connection killed."


def test_describe_exception_has_frames_but_no_message():
    try:
        raise ValueError("Bearer abc.def")
    except ValueError as e:
        text = describe_exception(e)
    assert "ValueError" in text and "test_gate.py" in text and "abc.def" not in text


# ---------------------------------------------------------------- framing of the proxy's own answers


@pytest.mark.parametrize("status", [401, 403, 404, 400, 500, 502, 503, 504, 407])
def test_refusals_to_head_have_no_body_but_the_length(status):
    f = reverse_tflow()
    f.request.method = "HEAD"
    r = oci.refusal(f.request, status, "X", "message")
    assert r.raw_content == b""
    assert int(r.headers["Content-Length"]) == len(oci.error_body("X", "message"))
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    f.request.method = "GET"
    r = oci.refusal(f.request, status, "X", "message")
    assert json.loads(r.raw_content)["errors"][0]["message"] == "message"
    assert r.headers["Content-Type"] == "application/json"
