"""Least privilege: a connector's policy (connector_store/policy.py) enforced before anything goes upstream.

After client auth has said who is calling and that they may use the connector, each request is
checked against the connector's policy: a pull, push or delete of a repository, or the catalog.
Outside the policy: `403 DENIED` naming the rule (or that none covers it), and nothing leaves. A
cross-repo mount whose source is outside the policy becomes a plain upload (the mount is dropped).
The upstream token's scopes are narrowed to the policy by the upstream addon (`allowed_scopes`),
and `_catalog` answers are filtered to the repositories the caller's rules name.

The decision is kept in `flow.metadata` (no secrets) for the audit log.
"""

from __future__ import annotations

import json
import logging
from urllib.parse import parse_qsl, urlencode

from mitmproxy import http

from addons import oci
from addons.gate import fail_closed
from addons.routing import MOUNT_FROM_RE, Route
from addons.store import ConnectorStore
from connector_store.model import Connector
from connector_store.policy import Decision, Policy, narrow_scope

logger = logging.getLogger(__name__)

POLICY_KEY = "connector_proxy_policy"  # flow.metadata: {"decision": "allowed"|"denied"|"none", "rule": ...}
MAX_CATALOG = 16 * 1024 * 1024  # a catalog answer the proxy will hold to filter


def action_of(method: str, api: oci.ApiPath) -> str:
    if api.kind == "catalog":
        return "catalog"
    method = method.upper()
    if method in ("GET", "HEAD"):
        return "pull"
    if method == "DELETE":
        return "delete"
    return "push"


def policy_decision(connector: Connector | None, subject: str, method: str, path: str) -> Decision | None:
    """The connector policy's decision on a request (its upstream API path), None without a policy."""
    if connector is None or connector.policy is None:
        return None
    try:
        api = oci.parse_api_path(path)
    except oci.ProtocolError:
        return None
    if api.kind == "ping":
        return None
    return connector.policy.decide(subject, api.repository, action_of(method, api))


def allowed_scopes(policy: Policy | None, subject: str, scopes: tuple[str, ...]) -> tuple[str, ...]:
    """The upstream token scopes, narrowed to what the policy allows `subject` (the token can't exceed it)."""
    if policy is None:
        return scopes
    out = []
    for scope in scopes:
        kind, _, rest = scope.partition(":")
        if kind != "repository":
            out.append(scope)
            continue
        name = rest.rpartition(":")[0]
        narrowed = narrow_scope(scope, policy.allowed_actions(subject, name))
        if narrowed:
            out.append(narrowed)
    return tuple(sorted(out))


def filter_catalog(body: bytes, policy: Policy, subject: str) -> bytes | None:
    """A `_catalog` answer with only the repositories the caller's rules name; None if it is not one."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("repositories"), list):
        return None
    doc["repositories"] = [r for r in doc["repositories"] if isinstance(r, str) and policy.lists(subject, r)]
    return json.dumps(doc).encode()


class PolicyEnforcer:
    def __init__(self, store: ConnectorStore):
        self.store = store

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        route = Route.of(flow)
        if flow.response or route is None or not route.name or route.form == "ping":
            return
        connector = self.store.get(route.namespace, route.name)
        policy = connector.policy if connector else None
        if policy is None:
            flow.metadata[POLICY_KEY] = {"decision": "none"}
            return
        decision = policy_decision(connector, route.subject, flow.request.method, route.path)
        if decision is None:
            return
        api = oci.parse_api_path(route.path)
        flow.metadata[POLICY_KEY] = {"decision": "allowed" if decision.allowed else "denied", "rule": decision.reason}
        if not decision.allowed:
            flow.response = oci.refusal(flow.request, 403, "DENIED", f"connector {route.connector} policy: {decision.reason}")
            return
        if api.kind == "upload" and flow.request.method.upper() == "POST":
            self._check_mount(flow, route, policy)

    def _check_mount(self, flow: http.HTTPFlow, route: Route, policy: Policy) -> None:
        """A mount from a repository outside the policy would read it: make it a plain upload."""
        path, _, query = flow.request.path.partition("?")
        try:
            params = parse_qsl(query, keep_blank_values=True, errors="strict")
        except UnicodeDecodeError:
            return  # routing's translation drops an undecodable mount anyway
        source = next((v for k, v in params if k == "from"), None)
        if source is None:
            return
        m = MOUNT_FROM_RE.match(source)
        if m and (m.group("namespace"), m.group("name")) == (route.namespace, route.name):
            source = m.group("repo")  # the path form names the source as the client sees it
        elif m:
            return  # another connector: routing drops the mount
        if not policy.decide(route.subject, source, "pull").allowed:
            kept = [(k, v) for k, v in params if k not in ("mount", "from")]
            flow.request.path = path + (f"?{urlencode(kept)}" if kept else "")
            flow.metadata[POLICY_KEY]["mount"] = f"dropped: {source} is outside the policy"

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # A catalog under a policy is collected (bounded) and sent filtered, whatever its framing.
        connector = self._catalog_policy(flow)
        if connector is None:
            return
        route = Route.of(flow)
        assert route is not None and flow.response is not None
        flow.metadata.setdefault(POLICY_KEY, {})["hold"] = True  # the rewrite addon leaves the stream to us
        flow.response.headers.pop("content-length", None)
        flow.response.headers["Transfer-Encoding"] = "chunked"
        flow.response.stream = CatalogFilter(connector.policy, route.subject)

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        # An empty catalog answer is not streamed: filter what was read (nothing) the same way.
        connector = self._catalog_policy(flow)
        if connector is None or flow.response is None or flow.response.stream:
            return
        route = Route.of(flow)
        filtered = filter_catalog(flow.response.get_content(strict=False) or b"", connector.policy, route.subject)
        if filtered is None:
            flow.response = oci.refusal(flow.request, 502, "UNAVAILABLE",
                                        f"connector {route.connector}: the registry's catalog answer could not be filtered")
            return
        flow.response.headers.pop("transfer-encoding", None)
        flow.response.set_content(filtered)

    def _catalog_policy(self, flow: http.HTTPFlow) -> Connector | None:
        route = Route.of(flow)
        if route is None or flow.response is None or route.path != "/v2/_catalog" or flow.response.status_code != 200:
            return None
        connector = self.store.get(route.namespace, route.name)
        return connector if connector is not None and connector.policy is not None else None


class CatalogFilter:
    """A `response.stream` that collects a `_catalog` answer (up to MAX_CATALOG) and sends it filtered.

    Past the cap, or if the answer is no catalog, it raises: the stream is cut (the client sees a
    failed request), never an unfiltered list.
    """

    def __init__(self, policy: Policy, subject: str):
        self.policy = policy
        self.subject = subject
        self.body = bytearray()

    def __call__(self, chunk: bytes) -> list[bytes]:
        if chunk:
            self.body += chunk
            if len(self.body) > MAX_CATALOG:
                raise ValueError("catalog answer larger than the proxy will filter")
            return []
        filtered = filter_catalog(bytes(self.body), self.policy, self.subject)
        if filtered is None:
            raise ValueError("the registry's catalog answer is not a catalog")
        return [filtered]
