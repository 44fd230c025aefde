"""Credentials out of every flow before anything logs, saves (`-w`) or shows (mitmweb) it.

mitmproxy records the request as sent, so the header the injector adds would be stored with the
flow. The client's own credential is removed as soon as client auth has read it (it is never
forwarded upstream), and the injected one is redacted at the first hook after the request has gone
out. This addon sits after every other addon of ours, and before mitmproxy's view, save and dump
addons, which run later in the chain.
"""

from __future__ import annotations

from mitmproxy import http

REDACTED = "<redacted>"
CLIENT_CREDENTIAL_HEADERS = ("authorization", "proxy-authorization")


def redacted(value: str) -> str:
    """Keep the scheme (useful when debugging), drop the secret."""
    scheme = value.strip().split(" ", 1)[0]
    return f"{scheme} {REDACTED}" if scheme and scheme != value.strip() else REDACTED


class Scrub:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        for name in CLIENT_CREDENTIAL_HEADERS:
            flow.request.headers.pop(name, None)

    def update(self, flows) -> None:
        # After every event: runs before mitmweb's view broadcasts the flow. (In the one update
        # after which the request is sent, the injector adds the header after this has run.)
        for flow in flows:
            if isinstance(flow, http.HTTPFlow):
                self._redact_sent(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._redact_sent(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._redact_sent(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._redact_sent(flow)

    @staticmethod
    def _redact_sent(flow: http.HTTPFlow) -> None:
        for name in CLIENT_CREDENTIAL_HEADERS:
            values = flow.request.headers.get_all(name)
            if values and not all(v.endswith(REDACTED) for v in values):
                flow.request.headers.set_all(name, [redacted(v) for v in values])
