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
  view has broadcast the flow and after save and dump have recorded it. The header comes off the
  live flow again while mitmproxy opens the upstream connection (`server_connect`, back on in the
  last hook before the head is written) and as soon as the head has been written, so mitmweb's API
  cannot read it while a body streams. A response body is put back to its placeholder as soon as
  it has been written to the client (the flow is no longer live).

`Scrub` also redacts, by value, whatever a registry or token server echoes of the injected
credential: in response headers, whole bodies, streamed bodies (`StreamRedactor`, across chunk
edges, same length) and the recorded original `Location`/`Link`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
import weakref

from mitmproxy import ctx, http
from mitmproxy.hooks import ConfigureHook

from addons.gate import Gate, fail_closed
from addons.oci import has_body
from addons.rewrite import UPSTREAM_HEADERS_KEY

REDACTED = "<redacted>"
CLIENT_CREDENTIAL_HEADERS = ("authorization", "proxy-authorization")


def redacted(value: str) -> str:
    """Keep the scheme (useful when debugging), drop the secret."""
    scheme = value.strip().split(" ", 1)[0]
    return f"{scheme} {REDACTED}" if scheme and scheme != value.strip() else REDACTED


MIN_SECRET_LENGTH = 8  # shorter strings (a seed password "admin") would redact ordinary words


def secret_parts(header_value: str) -> list[str]:
    """What of an Authorization value is secret: the credential, and for Basic its decoded forms."""
    scheme, _, credential = header_value.strip().partition(" ")
    credential = credential.strip()
    parts = [credential] if credential else []
    if scheme.lower() == "basic" and credential:
        try:
            decoded = base64.b64decode(credential, validate=True).decode()
        except (binascii.Error, ValueError):
            decoded = ""
        if decoded:
            parts.append(decoded)
            parts.append(decoded.partition(":")[2])
    return [p for p in parts if len(p) >= MIN_SECRET_LENGTH]


def redact_values(data: bytes, secrets: list[bytes]) -> bytes:
    """Every occurrence of a secret overwritten with as many `*` (lengths, and so framing, stay)."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        if secret and secret in data:
            data = data.replace(secret, b"*" * len(secret))
    return data


def redact_text(value: str, secrets: list[str]) -> str:
    for secret in sorted(set(secrets), key=len, reverse=True):
        if secret and secret in value:
            value = value.replace(secret, REDACTED)
    return value


class StreamRedactor:
    """A `response.stream` callable that redacts secrets from a streamed body, across chunk edges.

    It holds back the end of a chunk only when it could be the start of a secret (a prefix of
    one), until the next chunk (or the end) shows whether it is. A chunk without any of that, by far
    the common case for blob bytes, is passed on as it came: no copy, no join. Returns lists: an
    empty bytes chunk would end an HTTP/1 chunked body early.
    """

    def __init__(self, secrets: list[bytes]):
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)  # longest first, once
        self.first_bytes = {s[:1] for s in self.secrets}
        self.keep = max((len(s) for s in self.secrets), default=1) - 1
        self.held = b""

    def __call__(self, chunk: bytes) -> list[bytes]:
        if not chunk:  # end of the body
            out, self.held = self._redact(self.held), b""
            return [out] if out else []
        data = self._redact(self.held + chunk if self.held else chunk)
        hold = self._partial_tail(data)
        self.held = data[len(data) - hold:] if hold else b""
        out = data[:len(data) - hold] if hold else data
        return [out] if out else []

    def _redact(self, data: bytes) -> bytes:
        for secret in self.secrets:
            if secret in data:
                data = data.replace(secret, b"*" * len(secret))
        return data

    def _partial_tail(self, data: bytes) -> int:
        """How many bytes at the end of `data` are the beginning of a secret (0 if none)."""
        start = max(0, len(data) - self.keep)
        earliest = len(data)
        for first in self.first_bytes:
            pos = data.find(first, start, earliest)
            while pos != -1:
                tail = data[pos:]
                if any(len(s) > len(tail) and s.startswith(tail) for s in self.secrets):
                    earliest = pos
                    break
                pos = data.find(first, pos + 1, earliest)
        return len(data) - earliest


def redact_request(flow: http.HTTPFlow, names: tuple[str, ...] = CLIENT_CREDENTIAL_HEADERS) -> None:
    for name in names:
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
        # What each flow's response must not echo (the injected credential in all its forms).
        self._secrets: weakref.WeakKeyDictionary[http.HTTPFlow, list[str]] = weakref.WeakKeyDictionary()
        # Injected and not yet written: flow id -> (flow, name, value); and, while mitmproxy opens
        # the upstream connection such a flow waits for, server connection id -> those flows.
        self._unsent: dict[str, tuple[http.HTTPFlow, str, str]] = {}
        self._connecting: dict[str, list[tuple[http.HTTPFlow, str, str]]] = {}

    # ---- what other addons call

    def request_header(self, flow: http.HTTPFlow, name: str, value: str) -> None:
        """Send `name: value` upstream with this request, without recording it."""
        self._headers[flow.id] = (name, value)
        self._secrets[flow] = secret_parts(value)

    def response_body(self, flow: http.HTTPFlow, content: bytes) -> None:
        """Send `content` to the client instead of the (placeholder) body `flow.response` holds."""
        assert flow.response is not None
        self._bodies[flow.id] = (content, flow.response.content or b"")

    def remember(self, flow: http.HTTPFlow, value: str) -> None:
        """A credential sent for this flow some other way (a retry): its response must not echo it."""
        self._secrets[flow] = self._secrets.get(flow, []) + secret_parts(value)

    def secrets(self, flow: http.HTTPFlow) -> list[str]:
        return self._secrets.get(flow, [])

    def pending_request_header(self, flow: http.HTTPFlow) -> tuple[str, str] | None:
        """The header this flow's request is to carry, not yet set on it (the upstream pool sends it)."""
        return self._headers.get(flow.id)

    def sent_elsewhere(self, flow: http.HTTPFlow) -> None:
        """The request went out another way (the upstream pool): its header goes on the flow only
        redacted, as it is after mitmproxy sent it; its response is still redacted of it."""
        header = self._headers.pop(flow.id, None)
        self._armed_requests.discard(flow.id)
        if header is not None:
            flow.request.headers[header[0]] = redacted(header[1])

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
                    self._set(flow, name, value)
            if flow.id in self._armed_responses and flow.response is not None:
                self._armed_responses.discard(flow.id)
                content, placeholder = self._bodies.pop(flow.id)
                flow.response.content = content
                _restore_body_when_sent(flow, placeholder)

    def _set(self, flow: http.HTTPFlow, name: str, value: str) -> None:
        flow.request.headers[name] = value
        self._unsent[flow.id] = (flow, name, value)
        _redact_header_when_sent(flow, name, time.monotonic() + SEND_WAIT_SECONDS, self._unsent)

    # While mitmproxy opens the connection a request waits for (TCP, then TLS), the head is not
    # written and the flow is on show (mitmweb's API): the header comes off at `server_connect`
    # and goes back on in the last hook before the head is written.

    def server_connect(self, data) -> None:
        address = tuple(data.server.address[:2]) if data.server.address else None
        waiting = [
            entry for entry in self._unsent.values()
            if entry[0].client_conn.id == data.client.id and (entry[0].request.host, entry[0].request.port) == address
        ]
        for flow, name, _ in waiting:
            redact_request(flow, (name,))
            flow.request.headers.pop(name, None)
        if waiting:
            self._connecting[data.server.id] = waiting

    def server_connected(self, data) -> None:
        if not data.server.tls:
            self._reinject(data.server.id)

    def tls_established_server(self, data) -> None:
        self._reinject(data.conn.id)

    def server_connect_error(self, data) -> None:
        self._connecting.pop(data.server.id, None)

    def _reinject(self, server_id: str) -> None:
        for flow, name, value in self._connecting.pop(server_id, []):
            if flow.live and flow.response is None and flow.error is None:
                self._set(flow, name, value)

    def error(self, flow: http.HTTPFlow) -> None:
        self._forget(flow)

    def _forget(self, flow: http.HTTPFlow) -> None:
        self._unsent.pop(flow.id, None)
        self._headers.pop(flow.id, None)
        self._bodies.pop(flow.id, None)
        self._armed_requests.discard(flow.id)
        self._armed_responses.discard(flow.id)


SEND_WAIT_ITERATIONS = 1000
SEND_WAIT_SECONDS = 30.0
SEND_POLL_SECONDS = 0.001


def _redact_header_when_sent(flow: http.HTTPFlow, name: str, deadline: float,
                             unsent: dict[str, tuple] | None = None) -> None:
    """Take the injected header off the live flow as soon as mitmproxy has written the request head.

    mitmproxy writes the head in the same synchronous step in which it attaches the server
    connection to the flow, so once `flow.server_conn` is connected to where the request points,
    the header has gone and the in-memory flow (what mitmweb's API reads while a body streams)
    need not hold it. Until then (connection set-up) it is polled; a deadline bounds the wait, and
    taking it off too early could only fail the request upstream (401), never leak.
    """
    server = flow.server_conn
    sent = server.connected and server.address is not None and tuple(server.address[:2]) == (flow.request.host, flow.request.port)
    if sent or flow.response is not None or flow.error is not None or time.monotonic() > deadline:
        redact_request(flow, (name,))
        if unsent is not None:
            unsent.pop(flow.id, None)
        return
    asyncio.get_running_loop().call_later(SEND_POLL_SECONDS, _redact_header_when_sent, flow, name, deadline, unsent)


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
    """In our chain: client credentials out at once, injected ones redacted at every later event,
    and anything of them a registry echoes redacted from its response."""

    def __init__(self, gate: Gate | None = None) -> None:
        self.late = LateSecrets()
        self.gate = gate
        self.tail: list = []  # after LateSecrets: what sends requests itself (the upstream pool)

    def running(self) -> None:
        # The gate and then LateSecrets go last, after mitmproxy's own addons: the gate runs even
        # when an addon before it raised, and LateSecrets sets secrets after everything recorded.
        for addon in (self.gate, self.late, *self.tail):
            if addon is not None and addon not in ctx.master.addons.chain:
                ctx.master.addons.add(addon)
                # Added after startup: mitmproxy only runs `load`; the options it reads are set now.
                ctx.master.addons.invoke_addon_sync(addon, ConfigureHook(set(ctx.options.keys())))

    def done(self) -> None:
        for addon in (self.gate, self.late, *self.tail):
            if addon is not None and addon in ctx.master.addons.chain:
                ctx.master.addons.remove(addon)

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        for name in CLIENT_CREDENTIAL_HEADERS:
            flow.request.headers.pop(name, None)

    def update(self, flows) -> None:
        # After every event, before mitmweb's view broadcasts the flow. (In the one update after
        # which the request is sent, LateSecrets adds the header after this has run.)
        for flow in flows:
            if isinstance(flow, http.HTTPFlow):
                redact_request(flow)

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        redact_request(flow)
        secrets = self.late.secrets(flow)
        if not secrets or flow.response is None:
            return
        headers = flow.response.headers
        for name in set(headers.keys()):
            values = headers.get_all(name)
            clean = [redact_text(v, secrets) for v in values]
            if clean != values:
                headers.set_all(name, clean)
        _redact_original_headers(flow, secrets)
        if flow.response.stream is True:
            flow.response.stream = StreamRedactor([s.encode() for s in secrets])
        elif callable(flow.response.stream):
            inner, redactor = flow.response.stream, StreamRedactor([s.encode() for s in secrets])
            flow.response.stream = lambda chunk: [
                out for piece in _as_list(inner(chunk)) if piece for out in redactor(piece)
            ] + (redactor(b"") if not chunk else [])

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        redact_request(flow)
        secrets = self.late.secrets(flow)
        if secrets and flow.response is not None and not flow.response.stream and flow.response.raw_content:
            body = flow.response.get_content(strict=False) or b""  # decoded: a gzipped echo is caught too
            clean = redact_values(body, [s.encode() for s in secrets])
            if clean != body:
                flow.response.set_content(clean)
            for name in set(flow.response.headers.keys()):
                values = flow.response.headers.get_all(name)
                cleaned = [redact_text(v, secrets) for v in values]
                if cleaned != values:
                    flow.response.headers.set_all(name, cleaned)
        if secrets:
            _redact_original_headers(flow, secrets)  # a retried answer's, stored after responseheaders

    def error(self, flow: http.HTTPFlow) -> None:
        redact_request(flow)


def _redact_original_headers(flow: http.HTTPFlow, secrets: list[str]) -> None:
    """What the registry said before rewriting (kept in metadata for debugging and replays) is recorded too."""
    original = flow.metadata.get(UPSTREAM_HEADERS_KEY)
    if isinstance(original, dict):
        flow.metadata[UPSTREAM_HEADERS_KEY] = {
            k: [redact_text(str(x), secrets) for x in v] if isinstance(v, list) else redact_text(str(v), secrets)
            for k, v in original.items()
        }


def _as_list(chunks) -> list[bytes]:
    return [chunks] if isinstance(chunks, bytes) else list(chunks)
