"""Unit tests for addons/health.py: the endpoints, and which labels a flow may leave in /metrics."""

from __future__ import annotations

import math

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from addons.gate import Gate, Verdict
from addons.health import ERROR, NO_CONNECTOR, Health, status_label
from addons.routing import Routing
from addons.scrub import Scrub
from addons.upstream_auth import UpstreamCredentials
from conftest import reverse_tflow
from connector_store.model import Catalog, build_catalog
from proxyproc import connector, secret

DESTINATION = ("http", "127.0.0.1", 5000)


class FakeStore:
    def __init__(self, catalog: Catalog | None = None, synced: bool = True, stale_reason: str | None = None):
        self.catalog = catalog if catalog is not None else Catalog()
        self.synced = synced
        self.stale_reason = stale_reason


def catalog() -> Catalog:
    docs = [
        connector("default", "harbor", "http://127.0.0.1:5000", "harbor-secret"),
        secret("default", "harbor-secret", "pusher", "registry-password-xyz"),
        connector("default", "broken", "http://127.0.0.1:5000", "missing-secret"),
    ]
    return build_catalog(("test", d) for d in docs)


def make_health(store=None, gate: Gate | None = None) -> Health:
    store = store or FakeStore(catalog())
    return Health(store, UpstreamCredentials(store, Scrub().late), gate if gate is not None else Gate())


def registry_flow(path: str = "/v2/namespaces/default/connectors/harbor/test/abc/manifests/v1",
                  host: str = "127.0.0.1:8080", method: str = "GET") -> http.HTTPFlow:
    """A flow on the reverse listener that went through routing, as the real chain does."""
    f = reverse_tflow(req=tutils.treq(method=method.encode(), path=path.encode(), host="127.0.0.1", port=8080))
    f.request.host_header = host
    Routing().requestheaders(f)
    assert f.response is None, "the routing addon refused the test request"
    return f


def answer(f: http.HTTPFlow, status: int) -> http.HTTPFlow:
    f.response = http.Response.make(status, b"{}", {"Content-Type": "application/json"})
    return f


def scrape(h: Health, method: str = "GET") -> http.HTTPFlow:
    f = reverse_tflow(req=tutils.treq(method=method.encode(), path=b"/metrics"))
    h.requestheaders(f)
    assert f.response is not None
    return f


def samples(h: Health, name: str = "connector_proxy_responses") -> dict[tuple[tuple[str, str], ...], float]:
    """Parse /metrics as Prometheus would: {sorted labels: value} of the family's samples."""
    text = scrape(h).response.get_text()
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for s in family.samples:
                if s.name.endswith("_total") or family.type != "counter":
                    out[tuple(sorted(s.labels.items()))] = s.value
    return out


def responses(h: Health) -> dict[tuple[str, str], float]:
    return {(dict(k)["connector"], dict(k)["status"]): v for k, v in samples(h).items()}


# ---------------------------------------------------------------- label rules


def test_an_unauthorized_flow_is_counted_without_its_connector_name():
    h = make_health()
    f = answer(registry_flow("/v2/namespaces/default/connectors/harbor/test/abc/manifests/v1"), 401)
    h.response(f)
    g = answer(registry_flow("/v2/test/abc/manifests/v1", host="c-sneaky.guess.svc.cluster.local"), 401)
    h.response(g)
    assert responses(h) == {(NO_CONNECTOR, "401"): 2}
    text = scrape(h).response.get_text()
    assert "harbor" not in text and "sneaky" not in text and "guess" not in text


def test_an_authorized_flow_is_counted_under_its_connector():
    gate = Gate()
    h = make_health(gate=gate)
    f = answer(registry_flow(), 200)
    gate.grant(f, Verdict("system:serviceaccount:ci:builder", "default/harbor", DESTINATION))
    h.response(f)
    assert responses(h) == {("default/harbor", "200"): 1}
    assert "system:serviceaccount" not in scrape(h).response.get_text()  # who called is no label


def test_without_a_gate_every_flow_is_unattributed():
    store = FakeStore(catalog())
    h = Health(store, UpstreamCredentials(store, Scrub().late))
    h.response(answer(registry_flow(), 200))
    assert responses(h) == {(NO_CONNECTOR, "200"): 1}


@pytest.mark.parametrize("name", ["", 'x"} 1\nevil{a="', "Default/Harbor", "a/b/c", "default/" + "a" * 300, None])
def test_a_verdict_with_an_odd_connector_string_never_becomes_a_label(name):
    gate = Gate()
    h = make_health(gate=gate)
    f = answer(registry_flow(), 200)
    gate.grant(f, Verdict("someone", name, DESTINATION))  # type: ignore[arg-type]
    h.response(f)
    assert responses(h) == {(NO_CONNECTOR, "200"): 1}


def test_a_flow_that_ended_without_a_response_is_an_error():
    gate = Gate()
    h = make_health(gate=gate)
    f = registry_flow()
    f.error = tflow.terr()
    gate.grant(f, Verdict("s", "default/harbor", DESTINATION))
    h.error(f)
    g = registry_flow()
    g.error = tflow.terr()
    h.error(g)
    assert responses(h) == {("default/harbor", ERROR): 1, (NO_CONNECTOR, ERROR): 1}


def test_an_interrupted_response_is_an_error_and_a_complete_one_is_counted_once():
    h = make_health()
    # response headers came, the body never did: the response hook never ran
    f = answer(registry_flow(), 200)
    f.response.timestamp_end = None
    f.error = tflow.terr()
    h.error(f)
    # a complete response, then the client hung up while it was sent
    g = answer(registry_flow(), 200)
    h.response(g)
    g.error = tflow.terr()
    h.error(g)
    assert responses(h) == {(NO_CONNECTOR, ERROR): 1, (NO_CONNECTOR, "200"): 1}


def test_mixing_statuses_and_errors_never_breaks_rendering():
    gate = Gate()
    h = make_health(gate=gate)
    for i, status in enumerate([200, 404, 401, 502, 200, None, None, 307, 500]):
        f = registry_flow()
        if i % 2:
            gate.grant(f, Verdict("s", "default/harbor", DESTINATION))
        if status is None:
            f.error = tflow.terr()
            h.error(f)
        else:
            h.response(answer(f, status))
    r = scrape(h)
    assert r.response.status_code == 200
    got = responses(h)
    assert got[(NO_CONNECTOR, "200")] == 2
    assert got[("default/harbor", ERROR)] == 1 and got[(NO_CONNECTOR, ERROR)] == 1
    assert all(isinstance(status, str) for _, status in got)


@pytest.mark.parametrize("code, label", [(200, "200"), (100, "100"), (999, "999"), (0, "other"), (1000, "other"),
                                         (-1, "other"), ("200", "other")])
def test_status_labels_are_bounded_strings(code, label):
    assert status_label(code) == label


def test_the_proxys_own_endpoints_and_unrouted_flows_are_not_counted():
    h = make_health()
    for path in ("/healthz", "/readyz", "/metrics"):
        f = reverse_tflow(req=tutils.treq(path=path.encode()))
        h.requestheaders(f)
        h.response(f)
    h.response(answer(reverse_tflow(), 404))  # no route was worked out (refused before routing)
    assert responses(h) == {}


def test_credentials_in_a_request_never_reach_the_metrics():
    gate = Gate()
    h = make_health(gate=gate)
    f = answer(registry_flow(), 200)
    f.request.headers["Authorization"] = "Bearer client-token-abc123"
    f.response.headers["WWW-Authenticate"] = 'Bearer realm="http://x/token",error="upstream-token-zzz"'
    gate.grant(f, Verdict("s", "default/harbor", DESTINATION))
    h.response(f)
    text = scrape(h).response.get_text()
    for s in ("client-token-abc123", "upstream-token-zzz", "registry-password-xyz", "pusher"):
        assert s not in text


# ---------------------------------------------------------------- /metrics itself


def test_metrics_content_type_and_names():
    gate = Gate()
    gate.refused = 3
    h = make_health(gate=gate)
    f = scrape(h)
    assert f.response.status_code == 200
    assert f.response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    families = {m.name: m for m in text_string_to_metric_families(f.response.get_text())}
    for name in ("connector_proxy_responses", "connector_proxy_connectors", "connector_proxy_connectors_unusable",
                 "connector_proxy_upstream_token_fetches", "connector_proxy_upstream_token_cache_hits",
                 "connector_proxy_upstream_token_cache_entries", "connector_proxy_gate_refused",
                 "process_resident_memory_bytes", "python_info"):
        assert name in families, name
    value = lambda n: families[n].samples[0].value  # noqa: E731
    assert value("connector_proxy_connectors") == 2
    assert value("connector_proxy_connectors_unusable") == 1
    assert value("connector_proxy_gate_refused") == 3
    assert value("connector_proxy_upstream_token_fetches") == 0


def test_gauges_are_read_at_scrape_time():
    store = FakeStore(Catalog())
    h = make_health(store)
    upstream = h.upstream
    assert samples(h, "connector_proxy_connectors") == {(): 0}
    store.catalog = catalog()
    upstream.token_fetches = 7
    upstream.tokens.hits = 4
    assert samples(h, "connector_proxy_connectors") == {(): 2}
    assert samples(h, "connector_proxy_upstream_token_fetches") == {(): 7}
    assert samples(h, "connector_proxy_upstream_token_cache_hits") == {(): 4}


def test_a_value_that_cannot_be_read_does_not_break_the_scrape():
    class Broken(FakeStore):
        @property
        def catalog(self):
            raise RuntimeError("secret-in-message")

        @catalog.setter
        def catalog(self, _):
            pass

    h = make_health(Broken())
    f = scrape(h)
    assert f.response.status_code == 200
    assert math.isnan(samples(h, "connector_proxy_connectors")[()])
    assert "secret-in-message" not in f.response.get_text()


def test_head_gets_no_body():
    h = make_health()
    f = scrape(h, "HEAD")
    assert f.response.status_code == 200
    assert f.response.raw_content == b""
    assert int(f.response.headers["Content-Length"]) > 0


def test_each_health_has_its_own_registry_and_none_is_global():
    a, b = make_health(), make_health()
    a.response(answer(registry_flow(), 404))
    assert responses(a) == {(NO_CONNECTOR, "404"): 1}
    assert responses(b) == {}
    assert a.registry is not b.registry and a.registry is not REGISTRY
    assert REGISTRY.get_sample_value("connector_proxy_responses_total", {"connector": "-", "status": "404"}) is None


def test_a_failing_scrape_is_refused_not_raised(monkeypatch):
    h = make_health()

    def boom():
        raise RuntimeError("nope")

    monkeypatch.setattr(h, "render", boom)
    f = scrape(h)
    assert f.response.status_code == 500
    assert f.response.headers["Content-Type"] == "application/json"


def test_every_hook_fails_closed():
    for hook in ("requestheaders", "response", "error"):
        assert hasattr(getattr(Health, hook), "__wrapped__"), hook


# ---------------------------------------------------------------- health endpoints


@pytest.mark.parametrize("store, status, body", [
    (FakeStore(), 200, b"ready\n"),
    (FakeStore(synced=False), 503, b"connector store not synced\n"),
    (FakeStore(stale_reason="the API server is unreachable"), 200,
     b"ready, serving the last known connectors: the API server is unreachable\n"),
])
def test_readyz(store, status, body):
    h = make_health(store)
    f = reverse_tflow(req=tutils.treq(path=b"/readyz?verbose=1"))
    h.requestheaders(f)
    assert (f.response.status_code, f.response.content) == (status, body)


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
def test_healthz(method):
    f = reverse_tflow(req=tutils.treq(method=method.encode(), path=b"/healthz"))
    make_health().requestheaders(f)
    assert f.response.status_code == 200
    assert f.response.raw_content == (b"" if method == "HEAD" else b"ok\n")


def test_endpoints_belong_to_other_hosts_on_the_forward_listener():
    f = tflow.tflow(req=tutils.treq(path=b"/metrics"))  # regular (forward) mode
    make_health().requestheaders(f)
    assert f.response is None


def test_a_request_already_answered_is_left_alone():
    f = reverse_tflow(req=tutils.treq(path=b"/metrics"))
    f.response = http.Response.make(400, b"no")
    make_health().requestheaders(f)
    assert f.response.status_code == 400


async def test_a_full_event_cycle_in_mitmproxy():
    gate = Gate()
    h = make_health(gate=gate)
    with taddons.context(h) as tctx:
        f = answer(registry_flow(), 201)
        gate.grant(f, Verdict("s", "default/harbor", DESTINATION))
        await tctx.cycle(h, f)
        g = registry_flow("/v2/test/abc/blobs/uploads/", host="c-nobody.nowhere.svc")
        g.error = tflow.terr()
        await tctx.cycle(h, g)
    assert responses(h) == {("default/harbor", "201"): 1, (NO_CONNECTOR, ERROR): 1}
