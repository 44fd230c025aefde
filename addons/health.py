"""`/healthz`, `/readyz` and `/metrics` on the proxy listener: no credentials needed, none revealed.

`/metrics` is Prometheus' text format, made by `prometheus_client` from a registry of this addon's
own (never the library's global one). Nothing a stranger sends leaves a trace in it but a count:
the `connector` label names a connector only for flows the authorization step granted (the
gate's `Verdict`), every other flow is counted under `-`; the `status` label is the numeric status
or `error`. So the set of series is bounded by the connectors and statuses that really served
authorized callers, whatever unauthenticated clients put in their Host headers and paths, and the
metrics do not tell anybody which connectors exist.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator

from mitmproxy import http
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from addons import oci
from addons.gate import Gate, fail_closed
from addons.routing import METADATA_KEY, is_reverse
from addons.store import ConnectorStore
from addons.upstream_auth import UpstreamCredentials
from addons.upstream_pool import PooledUpstream

logger = logging.getLogger(__name__)

TEXT = {"Content-Type": "text/plain; charset=utf-8"}
NO_CONNECTOR = "-"  # the connector label of every flow that was not authorized for one
ERROR = "error"  # the status label of a flow that ended without a (complete) response
OTHER_STATUS = "other"  # a status code outside 100..999 (no well-formed HTTP response has one)

# What an authorized connector name looks like ("<namespace>/<name>", as in addons.routing): a
# last line of defence, so that no other string can ever become a label value.
_CONNECTOR_LABEL_RE = re.compile(
    r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?/[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?"
)


def status_label(status_code: object) -> str:
    """The status label: always a string, from a bounded set."""
    if isinstance(status_code, int) and 100 <= status_code <= 999:
        return str(status_code)
    return OTHER_STATUS


class _StateCollector:
    """Gauges and counters read from the proxy's objects at scrape time (nothing kept here)."""

    def __init__(self, health: Health):
        self.health = health

    def describe(self) -> Iterator[Metric]:
        return self._families(lambda _: None)

    def collect(self) -> Iterator[Metric]:
        return self._families(_safe)

    def _families(self, read: Callable[[Callable[[], float]], float | None]) -> Iterator[Metric]:
        h = self.health
        families: list[tuple[type, str, str, Callable[[], float]]] = [
            (GaugeMetricFamily, "connector_proxy_connectors", "Known connectors.",
             lambda: len(h.store.catalog)),
            (GaugeMetricFamily, "connector_proxy_connectors_unusable",
             "Connectors that cannot be used (see logs for why).",
             lambda: sum(1 for c in h.store.catalog.connectors.values() if not c.usable)),
            (CounterMetricFamily, "connector_proxy_upstream_token_fetches",
             "Tokens fetched from registry token servers.",
             lambda: h.upstream.token_fetches),
            (CounterMetricFamily, "connector_proxy_upstream_token_cache_hits",
             "Requests served from the token cache.",
             lambda: h.upstream.tokens.hits),
            (GaugeMetricFamily, "connector_proxy_upstream_token_cache_entries", "Cached upstream tokens.",
             lambda: len(h.upstream.tokens)),
            (CounterMetricFamily, "connector_proxy_upstream_pooled",
             "Exchanges sent over upstream connections kept across client connections.",
             lambda: h.pool.pooled if h.pool is not None else 0),
            (CounterMetricFamily, "connector_proxy_upstream_pool_bypassed",
             "Poolable exchanges that took an unpooled connection (pool busy, answer too large, connection failed).",
             lambda: h.pool.bypassed if h.pool is not None else 0),
            (CounterMetricFamily, "connector_proxy_gate_refused",
             "Flows the gate refused because no authorization decision matched them (a bug before the gate).",
             lambda: h.gate.refused if h.gate is not None else 0),
        ]
        for family, name, documentation, value in families:
            v = read(value)
            yield family(name, documentation) if v is None else family(name, documentation, value=v)


def _safe(value: Callable[[], float]) -> float:
    """A scrape never fails because one figure could not be read: that figure is NaN."""
    try:
        return float(value())
    except Exception as e:  # noqa: BLE001 (logged without its message, which could quote anything)
        logger.error("metrics: a value could not be read (%s)", type(e).__name__)
        return math.nan


class Health:
    def __init__(self, store: ConnectorStore, upstream: UpstreamCredentials, gate: Gate | None = None,
                 pool: PooledUpstream | None = None):
        self.store = store
        self.gate = gate
        self.upstream = upstream
        self.pool = pool
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.responses = Counter(
            "connector_proxy_responses", "Responses sent to clients, by connector and status.",
            ("connector", "status"), registry=self.registry,
        )
        self.registry.register(_StateCollector(self))

    # ---- what /metrics shows

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def connector_label(self, flow: http.HTTPFlow) -> str:
        """The connector the flow was authorized for, or `-`: never a name a caller merely wrote."""
        verdict = self.gate.verdict(flow) if self.gate is not None else None
        connector = verdict.connector if verdict is not None else ""
        if isinstance(connector, str) and _CONNECTOR_LABEL_RE.fullmatch(connector):
            return connector
        return NO_CONNECTOR

    def _count(self, flow: http.HTTPFlow, status: str) -> None:
        # Registry traffic only (a route was worked out, or the flow was authorized): not the
        # probes of /healthz and /metrics, nor requests to hosts that are no connector.
        if not isinstance(flow.metadata.get(METADATA_KEY), dict) and (
            self.gate is None or self.gate.verdict(flow) is None
        ):
            return
        self.responses.labels(self.connector_label(flow), status).inc()

    # ---- hooks

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not is_reverse(flow):  # on the forward listener these paths belong to other hosts
            return
        path = flow.request.path.partition("?")[0]
        if path == "/healthz":
            self._answer(flow, 200, b"ok\n", TEXT)
        elif path == "/readyz":
            # Stale but synced still serves: the last known connectors keep working while the
            # API server is away (taking the pod out of its Service would stop every build).
            if not self.store.synced:
                self._answer(flow, 503, b"connector store not synced\n", TEXT)
            elif reason := self.store.stale_reason:
                self._answer(flow, 200, f"ready, serving the last known connectors: {reason}\n".encode(), TEXT)
            else:
                self._answer(flow, 200, b"ready\n", TEXT)
        elif path == "/metrics":
            self._answer(flow, 200, self.render(), {"Content-Type": CONTENT_TYPE_LATEST})

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            self._count(flow, status_label(flow.response.status_code))

    @fail_closed
    def error(self, flow: http.HTTPFlow) -> None:
        # A complete response was counted by `response` (the client may still hang up while it is
        # sent); anything else ended without one.
        if flow.response is not None and flow.response.timestamp_end is not None:
            return
        self._count(flow, ERROR)

    @staticmethod
    def _answer(flow: http.HTTPFlow, status: int, body: bytes, headers: dict[str, str]) -> None:
        flow.response = oci.frame(flow.request, http.Response.make(status, body, headers))
