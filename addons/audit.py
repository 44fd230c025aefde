"""The audit log: one JSON line per client request, reverse and forward, to answer "who pushed what".

    --audit-log FILE   (or `-` for stdout; `--set audit_log=...` with plain mitmdump)

Each line: `time` (when the request arrived, UTC), `listener` (reverse|forward), `subject` (the
authenticated caller, or null), `connector`, `repository`, `action` (pull|push|delete|catalog),
`method`, `path` (without query values: `?digest&_state`), `status` (or null when the exchange
failed, with `error`), `bytes_in`, `bytes_out`, `duration_ms`, `upstream` (the registry's host, when
the request went there) and `policy` (`allowed`, `denied`, or `none` without a policy, with the
rule). Never a credential: no header, query value or body is written. Ship it like any container
log: `-` to stdout for the cluster's log collector, or a file on an emptyDir that a sidecar tails.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import weakref
from datetime import UTC, datetime
from typing import TextIO

from mitmproxy import ctx, exceptions, http

from addons import oci
from addons.gate import Gate, fail_closed
from addons.policy import POLICY_KEY, action_of
from addons.routing import Route, is_reverse

logger = logging.getLogger(__name__)


class Counter:
    """A `stream` callable that counts the bytes passing through (after any other stream function)."""

    def __init__(self, inner=None):
        self.inner = inner if callable(inner) else None
        self.bytes = 0

    def __call__(self, chunk: bytes):
        out = self.inner(chunk) if self.inner else chunk
        pieces = [out] if isinstance(out, bytes) else list(out)
        self.bytes += sum(len(p) for p in pieces)
        return pieces if self.inner else out


def query_keys(path: str) -> str:
    """`/v2/a/blobs/uploads/x?_state=SECRETISH&digest=sha256:..` -> `/v2/a/blobs/uploads/x?_state&digest`."""
    base, sep, query = path.partition("?")
    if not sep:
        return base
    keys = [part.partition("=")[0] for part in query.split("&") if part]
    return base + "?" + "&".join(keys)


def record_of(flow: http.HTTPFlow, verdict, bytes_in: int | None, bytes_out: int | None) -> dict:
    """The audit record of a finished flow (pure: everything comes from the flow and the verdict)."""
    route = Route.of(flow)
    repository = action = None
    if route is not None and route.name:
        try:
            api = oci.parse_api_path(route.path)
            repository = api.repository
            action = action_of(flow.request.method, api) if api.kind != "ping" else None
        except oci.ProtocolError:
            pass
    policy = flow.metadata.get(POLICY_KEY) or {}
    started = flow.request.timestamp_start or time.time()
    ended = (flow.response.timestamp_end if flow.response and flow.response.timestamp_end else None) or time.time()
    subject = (route.subject if route and route.subject else None) or (verdict.subject if verdict else None)
    return {
        "time": datetime.fromtimestamp(started, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "listener": "reverse" if is_reverse(flow) else "forward",
        "subject": subject or None,
        "connector": route.connector if route and route.name and subject else None,
        "repository": repository if subject else None,
        "action": action if subject else None,
        "method": flow.request.method,
        "path": query_keys(route.path if route and route.name and subject else flow.request.path)
        if route and route.name and subject else None,
        "status": flow.response.status_code if flow.response else None,
        "error": flow.error.msg if flow.error and not flow.response else None,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "duration_ms": round(max(0.0, ended - started) * 1000, 1),
        "upstream": route.upstream.split("://", 1)[-1] if route and route.upstream else None,
        "policy": {k: v for k, v in policy.items() if k != "hold"} or None,
    }


class AuditLog:
    def __init__(self, gate: Gate):
        self.gate = gate
        self.out: TextIO | None = None
        self._counters: weakref.WeakKeyDictionary[http.HTTPFlow, tuple[Counter | None, Counter | None]] = (
            weakref.WeakKeyDictionary())

    def load(self, loader):
        loader.add_option("audit_log", str, "", "Write one JSON line per client request to this file ('-': stdout).")

    def configure(self, updated):
        if "audit_log" not in updated:
            return
        self._close()
        path = ctx.options.audit_log
        if not path:
            return
        if path == "-":
            self.out = sys.stdout
            return
        try:
            self.out = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - held open, closed in done
        except OSError as e:
            raise exceptions.OptionsError(f"audit_log: {e}") from e

    def _close(self) -> None:
        if self.out is not None and self.out is not sys.stdout:
            self.out.close()
        self.out = None

    def done(self) -> None:
        self._close()

    # Counting streamed bodies: after the rewrite and scrub addons have set their stream functions.

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if self.out is None or flow.response is not None or not flow.request.stream:
            return
        counter = Counter(flow.request.stream)
        flow.request.stream = counter
        self._counters[flow] = (counter, None)

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if self.out is None or flow.response is None or not flow.response.stream:
            return
        counter = Counter(flow.response.stream)
        flow.response.stream = counter
        self._counters[flow] = (self._counters.get(flow, (None, None))[0], counter)

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        self._write(flow)

    @fail_closed
    def error(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:
            self._write(flow)

    @fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        if self.out is not None and flow.response is not None:  # a refused CONNECT (an opened one is logged per request)
            self._write(flow)

    def _write(self, flow: http.HTTPFlow) -> None:
        if self.out is None:
            return
        try:
            counted_in, counted_out = self._counters.pop(flow, (None, None))
            bytes_in = counted_in.bytes if counted_in else len(flow.request.raw_content or b"")
            bytes_out = counted_out.bytes if counted_out else (len(flow.response.raw_content or b"") if flow.response else 0)
            verdict = self.gate.verdict(flow)
            self.out.write(json.dumps(record_of(flow, verdict, bytes_in, bytes_out), separators=(",", ":")) + "\n")
        except Exception as e:  # the audit log never breaks a request; it says it lost a line
            logger.warning("audit log: a record was not written: %s", type(e).__name__)
