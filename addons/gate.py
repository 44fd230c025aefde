"""Fail closed: nothing leaves the proxy unless the authorization step said it may.

mitmproxy logs an addon's exception and carries on with the flow: a check that raises would let the
request through. Two things turn that around:

- `fail_closed` wraps every hook of our addons. An exception becomes a refusal in the registry's
  JSON error format (or a killed flow once the response has started), one log line with the
  traceback's frames but not the exception's message (which may quote a header value), and the
  proxy keeps serving.
- `Gate` sits at the very end of mitmproxy's addon chain (it appends itself, like `LateSecrets`),
  so it runs even when an addon before it raised. A request, a CONNECT or a raw TCP stream may go
  upstream only if our authorization step granted it a `Verdict` *and* the flow still points where
  the verdict says: a request that was authorized but never retargeted (the upstream addon failed
  half-way) is refused too.
"""

from __future__ import annotations

import functools
import inspect
import logging
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from mitmproxy import connection, http, tcp

from addons import oci

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """Why a flow may leave, and the one place it may go."""

    subject: str  # who is calling ("" for nobody in particular: never granted)
    connector: str  # "ns/name"; "" for forward-mode traffic to a host that is no connector
    destination: tuple[str, str, int]  # (scheme, host, port) the request was authorized for


def describe_exception(e: BaseException) -> str:
    """The exception type and where it was raised, never its message (it may quote a secret)."""
    frames = traceback.extract_tb(e.__traceback__)
    where = " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames))
    return f"{type(e).__name__} at {where}" if where else type(e).__name__


def is_forward(flow: http.HTTPFlow) -> bool:
    from mitmproxy.proxy.mode_specs import RegularMode

    return isinstance(flow.client_conn.proxy_mode, RegularMode)


def refuse_after_error(flow, hook: str, e: BaseException, credential_problem: bool) -> None:
    """Turn an exception in one of our hooks into a refusal of that flow."""
    logger.error("refused %s: %s in %s", _flow_label(flow), describe_exception(e), hook)
    if isinstance(flow, tcp.TCPFlow):
        flow.kill()
        return
    if not isinstance(flow, http.HTTPFlow):
        return
    response_started = flow.response is not None and hook in ("responseheaders", "response")
    if response_started:
        # The registry's answer is on its way (or already streamed): close the stream so the
        # client sees a failed request, never a wrong or unscrubbed answer.
        flow.kill()
        return
    forward = is_forward(flow)
    if credential_problem:
        status, code = (407, "UNAUTHORIZED") if forward else (401, "UNAUTHORIZED")
        message = "the credentials could not be checked"
    else:
        status, code = (502, "UNKNOWN") if forward else (500, "UNKNOWN")
        message = "internal error: the request was refused and not forwarded"
    flow.response = oci.refusal(flow.request, status, code, message, forward=forward)


def _flow_label(flow) -> str:
    if isinstance(flow, http.HTTPFlow):
        return f"{flow.request.method} request (flow {flow.id[:8]})"
    return f"flow {getattr(flow, 'id', '?')[:8]}"


def fail_closed(fn: Callable | None = None, *, credentials: bool = False):
    """Decorate a hook: an exception refuses the flow instead of letting it through.

    `credentials=True` marks hooks whose failure means the caller's credentials could not be
    checked (401, or 407 in forward mode) rather than an internal error (500, or 502).
    """

    def wrap(hook: Callable):
        name = hook.__name__

        def refuse(args, e: Exception) -> None:
            flow = next((a for a in args if isinstance(a, (http.HTTPFlow, tcp.TCPFlow))), None)
            if flow is None:  # not a flow hook (configure, running ...): mitmproxy's own handling
                raise e
            refuse_after_error(flow, name, e, credentials)

        if inspect.iscoroutinefunction(hook):
            @functools.wraps(hook)
            async def guarded_async(*args, **kwargs):
                try:
                    return await hook(*args, **kwargs)
                except Exception as e:
                    refuse(args, e)
            return guarded_async

        @functools.wraps(hook)
        def guarded(*args, **kwargs):
            try:
                return hook(*args, **kwargs)
            except Exception as e:
                refuse(args, e)
        return guarded

    return wrap(fn) if fn is not None else wrap


def destination(request: http.Request) -> tuple[str, str, int]:
    return (request.scheme, request.host.lower(), request.port)


class Gate:
    """The last addon in mitmproxy's chain: refuses every flow without a matching verdict."""

    def __init__(self) -> None:
        self._flows: weakref.WeakKeyDictionary[http.HTTPFlow, Verdict] = weakref.WeakKeyDictionary()
        self._connections: weakref.WeakKeyDictionary[connection.Client, Verdict] = weakref.WeakKeyDictionary()
        self.refused = 0  # flows the gate itself had to stop: a bug upstream of it, counted for /metrics

    # ---- what the authorization step calls

    def grant(self, flow: http.HTTPFlow, verdict: Verdict) -> None:
        self._flows[flow] = verdict

    def grant_connection(self, client: connection.Client, verdict: Verdict) -> None:
        """A forward-mode client connection whose CONNECT was authorized (its tunnel may flow)."""
        self._connections[client] = verdict

    def verdict(self, flow: http.HTTPFlow) -> Verdict | None:
        return self._flows.get(flow)

    def connection_verdict(self, client: connection.Client) -> Verdict | None:
        return self._connections.get(client)

    def permitted(self, flow: http.HTTPFlow) -> Verdict | None:
        """The verdict, if the flow may leave as it stands (what the upstream pool sends by)."""
        verdict = self._flows.get(flow)
        if verdict is None or flow.response is not None or flow.error is not None \
                or destination(flow.request) != verdict.destination:
            return None
        return verdict

    # ---- placement: after every addon, including mitmproxy's own

    def running(self) -> None:
        # Added by the Scrub addon's running hook so that it sits after everything else.
        pass

    # ---- hooks

    def _check(self, flow: http.HTTPFlow, hook: str) -> None:
        if flow.response is not None or flow.error is not None:
            return  # answered by the proxy (or dead): nothing goes upstream
        verdict = self._flows.get(flow)
        reason = None
        if verdict is None:
            reason = "no authorization decision"
        elif destination(flow.request) != verdict.destination:
            reason = "the request no longer points where it was authorized to go"
        if reason is None:
            # Scrub removes the client's own credential; should that have been skipped (an addon
            # before it raised), it still never goes upstream. The injected one is set after this.
            for name in ("authorization", "proxy-authorization"):
                flow.request.headers.pop(name, None)
            return
        self.refused += 1
        forward = is_forward(flow)
        logger.error("gate refused %s at %s: %s", _flow_label(flow), hook, reason)
        status, code = (502, "UNKNOWN") if forward else (500, "UNKNOWN")
        flow.response = oci.refusal(flow.request, status, code, "internal error: the request was refused and not forwarded",
                                    forward=forward)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.request.stream:  # a streamed request leaves right after this event; others after `request`
            self._check(flow, "requestheaders")

    def request(self, flow: http.HTTPFlow) -> None:
        if not flow.request.stream:  # a streamed one was checked (and has gone) at requestheaders
            self._check(flow, "request")

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return
        if self._connections.get(flow.client_conn) is None and self._flows.get(flow) is None:
            self.refused += 1
            logger.error("gate refused a CONNECT without an authorization decision")
            flow.response = oci.refusal(flow.request, 407, "UNAUTHORIZED", "proxy authentication required",
                                        forward=True)

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        # Raw TCP only ever flows inside a tunnel a CONNECT opened; the reverse listener never relays it.
        if self._connections.get(flow.client_conn) is None:
            self.refused += 1
            logger.error("gate refused a raw TCP stream on a connection nobody authorized")
            flow.kill()
