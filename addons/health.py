"""`/healthz`, `/readyz` and `/metrics` on the proxy listener: no credentials needed, none revealed."""

from __future__ import annotations

from collections import Counter

from mitmproxy import http

from addons.routing import Route, is_reverse
from addons.store import ConnectorStore
from addons.upstream_auth import UpstreamCredentials

TEXT = {"Content-Type": "text/plain; charset=utf-8"}


def render_metrics(
    responses: Counter, connectors_total: int, connectors_unusable: int, token_fetches: int,
    token_cache_hits: int, token_cache_entries: int,
) -> str:
    """Prometheus text exposition format."""
    lines = [
        "# HELP connector_proxy_responses_total Responses sent to clients, by connector and status.",
        "# TYPE connector_proxy_responses_total counter",
    ]
    for (connector, status), n in sorted(responses.items()):
        lines.append(f'connector_proxy_responses_total{{connector="{connector}",status="{status}"}} {n}')
    lines += [
        "# HELP connector_proxy_connectors Known connectors.",
        "# TYPE connector_proxy_connectors gauge",
        f"connector_proxy_connectors {connectors_total}",
        "# HELP connector_proxy_connectors_unusable Connectors that cannot be used (see logs for why).",
        "# TYPE connector_proxy_connectors_unusable gauge",
        f"connector_proxy_connectors_unusable {connectors_unusable}",
        "# HELP connector_proxy_upstream_token_fetches_total Tokens fetched from registry token servers.",
        "# TYPE connector_proxy_upstream_token_fetches_total counter",
        f"connector_proxy_upstream_token_fetches_total {token_fetches}",
        "# HELP connector_proxy_upstream_token_cache_hits_total Requests served from the token cache.",
        "# TYPE connector_proxy_upstream_token_cache_hits_total counter",
        f"connector_proxy_upstream_token_cache_hits_total {token_cache_hits}",
        "# HELP connector_proxy_upstream_token_cache_entries Cached upstream tokens.",
        "# TYPE connector_proxy_upstream_token_cache_entries gauge",
        f"connector_proxy_upstream_token_cache_entries {token_cache_entries}",
    ]
    return "\n".join(lines) + "\n"


class Health:
    def __init__(self, store: ConnectorStore, upstream: UpstreamCredentials):
        self.store = store
        self.upstream = upstream
        self.responses: Counter = Counter()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not is_reverse(flow):  # on the forward listener these paths belong to other hosts
            return
        path = flow.request.path.partition("?")[0]
        if path == "/healthz":
            flow.response = http.Response.make(200, b"ok\n", TEXT)
        elif path == "/readyz":
            # Stale but synced still serves: the last known connectors keep working while the
            # API server is away (taking the pod out of its Service would stop every build).
            if not self.store.synced:
                flow.response = http.Response.make(503, b"connector store not synced\n", TEXT)
            elif reason := self.store.stale_reason:
                flow.response = http.Response.make(200, f"ready, serving the last known connectors: {reason}\n".encode(), TEXT)
            else:
                flow.response = http.Response.make(200, b"ready\n", TEXT)
        elif path == "/metrics":
            catalog = self.store.catalog
            body = render_metrics(
                self.responses,
                len(catalog),
                sum(1 for c in catalog.connectors.values() if not c.usable),
                self.upstream.token_fetches,
                self.upstream.tokens.hits,
                len(self.upstream.tokens),
            )
            flow.response = http.Response.make(200, body.encode(), {"Content-Type": "text/plain; version=0.0.4"})

    def response(self, flow: http.HTTPFlow) -> None:
        route = Route.of(flow)
        if route is not None and flow.response is not None:
            self.responses[(route.connector or "-", flow.response.status_code)] += 1

    def error(self, flow: http.HTTPFlow) -> None:
        route = Route.of(flow)
        if route is not None and not flow.response:
            self.responses[(route.connector or "-", "error")] += 1
