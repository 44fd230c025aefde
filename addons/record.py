"""Out-of-band exchanges (the `GET /v2/` challenge probe, token fetches) as redacted flows.

The upstream addon talks to registries and token servers itself, outside mitmproxy's flows. So
that a recording (`-w`, mitmweb) shows the whole conversation, each exchange becomes a flow of its
own, marked `connector_proxy_replay: {"kind": "probe" | "token"}` (what the replay harness in
tests/ serves), with the credentials it carried and the token it returned replaced by placeholders.
It is handed to mitmproxy's save, view and dump addons only: it never runs through our own hooks.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from mitmproxy import connection, ctx, http

from addons.scrub import REDACTED, redact_text, redact_values, redacted, secret_parts

REPLAY_KEY = "connector_proxy_replay"
TOKEN_FIELDS = ("token", "access_token", "refresh_token", "id_token")
TOKEN_PLACEHOLDER = REDACTED  # the same placeholder as redacted headers


@dataclass(frozen=True)
class Exchange:
    """One request to a registry or token server and its answer, already redacted."""

    kind: str  # "probe" | "token"
    method: str
    url: str
    request_headers: tuple[tuple[str, str], ...]
    status: int
    response_headers: tuple[tuple[str, str], ...]
    body: bytes


def redact_token_body(body: bytes) -> bytes:
    """A token response with every token value replaced by a recognisable placeholder."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body if not body else b"<redacted: not JSON>"
    if isinstance(doc, dict):
        for name in TOKEN_FIELDS:
            if name in doc:
                doc[name] = TOKEN_PLACEHOLDER
    return json.dumps(doc).encode()


def token_values(body: bytes) -> list[str]:
    """The token strings a token response carries (to be redacted wherever else they appear)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return []
    if not isinstance(doc, dict):
        return []
    return [v for k in TOKEN_FIELDS if isinstance(v := doc.get(k), str) and v]


def make_exchange(kind: str, method: str, url: str, request_headers: dict[str, str], status: int,
                  response_headers: list[tuple[str, str]], body: bytes) -> Exchange:
    """Redact at the source: nothing secret leaves the thread that made the request.

    By name (Authorization, token fields) and by value: a token server that copies the token into
    another field or a header, or a registry that echoes the credentials, gets them redacted too.
    """
    secrets: list[str] = []
    for k, v in request_headers.items():
        if k.lower() == "authorization":
            secrets += secret_parts(v)
    secrets += token_values(body)
    sent = tuple((k, redacted(v) if k.lower() == "authorization" else v) for k, v in request_headers.items())
    answer = redact_token_body(body) if kind == "token" else body
    answer = redact_values(answer, [s.encode() for s in secrets])
    kept = tuple(
        (k, redact_text(v, secrets)) for k, v in response_headers if k.lower() not in ("set-cookie", "content-length")
    )
    return Exchange(kind, method, url, sent, status, kept, answer)


def exchange_flow(exchange: Exchange) -> http.HTTPFlow:
    parts = urlsplit(exchange.url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    now = time.time()
    client = connection.Client(peername=("127.0.0.1", 0), sockname=("127.0.0.1", 0), timestamp_start=now)
    server = connection.Server(address=(parts.hostname or "", port))
    flow = http.HTTPFlow(client, server)
    flow.request = http.Request.make(exchange.method, exchange.url, b"", dict(exchange.request_headers))
    flow.request.timestamp_start = flow.request.timestamp_end = now
    flow.response = http.Response.make(exchange.status, exchange.body, dict(exchange.response_headers))
    flow.response.timestamp_start = flow.response.timestamp_end = now
    flow.metadata[REPLAY_KEY] = {"kind": exchange.kind}
    return flow


class OutOfBandRecorder:
    """Receives exchanges from the upstream addon's HTTP threads; records them on the event loop."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def running(self) -> None:
        self._loop = asyncio.get_running_loop()

    def observe(self, kind: str, method: str, url: str, request_headers: dict[str, str], status: int,
                response_headers: list[tuple[str, str]], body: bytes) -> None:
        """The registry client's observer: redacts on the calling thread, records on the event loop."""
        exchange = make_exchange(kind, method, url, request_headers, status, response_headers, body)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._record, exchange)

    @staticmethod
    def _record(exchange: Exchange) -> None:
        flow = exchange_flow(exchange)
        for name in ("save", "dumper"):
            addon = ctx.master.addons.get(name)
            if addon is not None:
                addon.response(flow)
        view = ctx.master.addons.get("view")
        if view is not None:
            view.add([flow])
