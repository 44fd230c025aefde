"""Secrets in at the last moment, out at the first: nothing that logs, saves (`-w`) or shows (mitmweb)
a flow ever holds a credential.

mitmproxy records flows as they are: the headers we send upstream, the bodies we send back. Two
addons keep secrets out of those records:

- `Scrub` (in our chain, before mitmproxy's view, save and dump addons) removes the client's own
  credential as soon as client auth has read it, and redacts the injected upstream one at every
  later event.
- `LateSecrets`, appended to the very end of mitmproxy's chain, holds what other addons want sent
  (the upstream `Authorization`, a rendered config body containing the caller's token) and puts it
  on the flow in the `update` hook that mitmproxy runs right before the message goes out: after the
  view has broadcast the flow and after save and dump have recorded it. A response body is put back
  to its placeholder as soon as it has been written to the client (the flow is no longer live). (A request header stays on the
  in-memory flow while a streamed upload is in flight, until the next event redacts it; it is never
  logged, saved or broadcast.)
"""

from __future__ import annotations

import asyncio

from mitmproxy import ctx, http

from addons.oci import has_body

REDACTED = "<redacted>"
CLIENT_CREDENTIAL_HEADERS = ("authorization", "proxy-authorization")


def redacted(value: str) -> str:
    """Keep the scheme (useful when debugging), drop the secret."""
    scheme = value.strip().split(" ", 1)[0]
    return f"{scheme} {REDACTED}" if scheme and scheme != value.strip() else REDACTED


def redact_request(flow: http.HTTPFlow) -> None:
    for name in CLIENT_CREDENTIAL_HEADERS:
        values = flow.request.headers.get_all(name)
        if values and not all(v.endswith(REDACTED) for v in values):
            flow.request.headers.set_all(name, [redacted(v) for v in values])


class LateSecrets:
    """The last addon of the chain: sets secrets right before they are sent (see the module docstring)."""

    def __init__(self) -> None:
        self._headers: dict[str, tuple[str, str]] = {}
        self._bodies: dict[str, tuple[bytes, bytes]] = {}
        self._armed_requests: set[str] = set()
        self._armed_responses: set[str] = set()

    # ---- what other addons call

    def request_header(self, flow: http.HTTPFlow, name: str, value: str) -> None:
        """Send `name: value` upstream with this request, without recording it."""
        self._headers[flow.id] = (name, value)

    def response_body(self, flow: http.HTTPFlow, content: bytes) -> None:
        """Send `content` to the client instead of the (placeholder) body `flow.response` holds."""
        assert flow.response is not None
        self._bodies[flow.id] = (content, flow.response.content or b"")

    # ---- hooks, at the end of the chain

    def running(self) -> None:
        pass

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # A streamed body goes out right after this event; anything else after `request`.
        if flow.id in self._headers and flow.request.stream and has_body(flow.request) and not flow.response:
            self._armed_requests.add(flow.id)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.id in self._headers:
            self._armed_requests.add(flow.id)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.id in self._bodies:
            self._armed_responses.add(flow.id)

    def update(self, flows) -> None:
        for flow in flows:
            if flow.id in self._armed_requests:
                self._armed_requests.discard(flow.id)
                name, value = self._headers.pop(flow.id)
                if not flow.response:
                    flow.request.headers[name] = value
            if flow.id in self._armed_responses and flow.response is not None:
                self._armed_responses.discard(flow.id)
                content, placeholder = self._bodies.pop(flow.id)
                flow.response.content = content
                _restore_body_when_sent(flow, placeholder)

    def error(self, flow: http.HTTPFlow) -> None:
        self._forget(flow)

    def _forget(self, flow: http.HTTPFlow) -> None:
        self._headers.pop(flow.id, None)
        self._bodies.pop(flow.id, None)
        self._armed_requests.discard(flow.id)
        self._armed_responses.discard(flow.id)


SEND_WAIT_ITERATIONS = 1000


def _restore_body_when_sent(flow: http.HTTPFlow, placeholder: bytes, waited: int = 0) -> None:
    """Put the placeholder back once mitmproxy has written the response (the flow is no longer live).

    The write happens a loop iteration or two after the hook (mitmproxy runs hooks as eager tasks
    that queue behind the connection's event lock); the wait is bounded, and restoring early would
    only ever send the placeholder, never leak.
    """
    if flow.live and waited < SEND_WAIT_ITERATIONS:
        asyncio.get_running_loop().call_soon(_restore_body_when_sent, flow, placeholder, waited + 1)
    elif flow.response is not None:
        flow.response.content = placeholder


class Scrub:
    """In our chain: client credentials out at once, injected ones redacted at every later event."""

    def __init__(self) -> None:
        self.late = LateSecrets()

    def running(self) -> None:
        if self.late not in ctx.master.addons.chain:
            ctx.master.addons.add(self.late)

    def done(self) -> None:
        if self.late in ctx.master.addons.chain:
            ctx.master.addons.remove(self.late)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        for name in CLIENT_CREDENTIAL_HEADERS:
            flow.request.headers.pop(name, None)

    def update(self, flows) -> None:
        # After every event, before mitmweb's view broadcasts the flow. (In the one update after
        # which the request is sent, LateSecrets adds the header after this has run.)
        for flow in flows:
            if isinstance(flow, http.HTTPFlow):
                redact_request(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        redact_request(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        redact_request(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        redact_request(flow)
