"""The reverse listener speaks plain HTTP, like the in-cluster address clients are configured for.

mitmproxy's reverse mode answers a TLS ClientHello with a certificate of its own. Registry clients
told that a registry is insecure (skopeo `--tls-verify=false`, podman, docker's insecure registries)
try HTTPS first and keep it when it works, so they would talk TLS to a certificate nobody trusts,
and pay for the encryption on every layer. Here a ClientHello is answered the way a plain-HTTP
registry answers it, with a plaintext `HTTP/1.1 400`, and clients fall back to plain HTTP at once.
Nothing is dialled (the reverse placeholder upstream is never contacted). TLS for clients belongs
to the Ingress or the Service mesh in front; `reverse_tls` turns mitmproxy's own back on.

`HeaderTimeout` closes connections that never finish a request head.
"""

from __future__ import annotations

import asyncio
import logging
import weakref

from mitmproxy import connection, ctx, http
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.mode_specs import ReverseMode

from addons import oci
from addons.gate import fail_closed

logger = logging.getLogger(__name__)


# A TLS ClientHello is answered the way a plain-HTTP Go registry answers it: Go's TLS client reports
# "server gave HTTP response to HTTPS client" when the first bytes it reads are `HTTP/`, the one
# error on which docker, containerd and friends retry over http for an insecure registry. Closing
# instead makes them fail with EOF.
TLS_HANDSHAKE = b"\x16\x03"  # a TLS record header: handshake, protocol major version 3
_PLAINTEXT_BODY = b"400 Bad Request: this registry proxy speaks plain HTTP (use http://)\n"
PLAINTEXT_400 = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n"
    b"Content-Length: %d\r\n\r\n" % len(_PLAINTEXT_BODY)
) + _PLAINTEXT_BODY


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# An empty SETTINGS frame, then GOAWAY(last stream 0, HTTP_1_1_REQUIRED): RFC 9113's way to say
# "speak HTTP/1.1 to me", which clients report as such instead of a protocol error.
H2_HTTP_1_1_REQUIRED = (
    b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    b"\x00\x00\x08\x07\x00\x00\x00\x00\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x0d"
)


class AnswerOnce(layer.Layer):
    """Sends one fixed answer to whatever the client opened with, then closes: nothing is dialled."""

    def __init__(self, context, answer: bytes):
        super().__init__(context)
        self.answer = answer
        self.answered = False

    def _handle_event(self, event: events.Event):
        if not self.answered and isinstance(event, (events.Start, events.DataReceived)):
            self.answered = True
            yield commands.SendData(self.context.client, self.answer)
            yield commands.CloseConnection(self.context.client)


class PlainHttpListener:
    def load(self, loader):
        loader.add_option("reverse_tls", bool, False, "Accept TLS from clients on the reverse listener.")

    @fail_closed
    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        context = nextlayer.context
        if ctx.options.reverse_tls or not isinstance(context.client.proxy_mode, ReverseMode):
            return
        # Only the first decision on a connection (what the client opened with): directly below
        # the mode's own layer, nothing yet or what mitmproxy's next_layer has just chosen (with
        # the layers it stacked under it).
        if len(context.layers) > 1 and context.layers[1] is not nextlayer.layer:
            return
        data = nextlayer.data_client()
        if data.startswith(TLS_HANDSHAKE):
            nextlayer.layer = AnswerOnce(context, PLAINTEXT_400)
        elif data.startswith(H2_PREFACE):
            # HTTP/2 with prior knowledge (h2c), which mitmproxy cannot serve (it would read the
            # preface as an HTTP/1 request): ask for HTTP/1.1 the way HTTP/2 does.
            nextlayer.layer = AnswerOnce(context, H2_HTTP_1_1_REQUIRED)


class HeaderTimeout:
    """Connections that do not finish a request head in time are closed (slowloris, half-open).

    Armed when a client connects (`header_timeout`) and again after every response, for the idle
    wait of a kept-alive connection (`keepalive_timeout`); a complete request head disarms it.
    Bodies are not timed here: a large upload may take long, and mitmproxy's `tcp_timeout` ends
    connections that go silent.
    """

    def __init__(self) -> None:
        self._timers: weakref.WeakKeyDictionary[connection.Client, asyncio.TimerHandle] = weakref.WeakKeyDictionary()

    def load(self, loader):
        loader.add_option("header_timeout", int, 30, "Seconds a new connection has to send a complete request head.")
        loader.add_option("keepalive_timeout", int, 75, "Seconds a kept-alive connection may wait for its next request.")

    def _arm(self, client: connection.Client, seconds: int) -> None:
        self._disarm(client)
        if seconds > 0:
            loop = asyncio.get_running_loop()
            self._timers[client] = loop.call_later(seconds, self._expire, weakref.ref(client))

    def _disarm(self, client: connection.Client) -> None:
        timer = self._timers.pop(client, None)
        if timer is not None:
            timer.cancel()

    @staticmethod
    def _expire(client_ref) -> None:
        client = client_ref()
        if client is None:
            return
        handler = ctx.master.addons.get("proxyserver").connections.get(client.id)
        transport = getattr(handler, "transports", {}).get(client) if handler else None
        if transport is not None and transport.handler is not None:
            logger.info("closing a connection from %s: no complete request head in time", client.peername[0])
            transport.handler.cancel("request head timeout")

    def client_connected(self, client: connection.Client) -> None:
        self._arm(client, ctx.options.header_timeout)

    def client_disconnected(self, client: connection.Client) -> None:
        self._disarm(client)

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._disarm(flow.client_conn)

    @fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._disarm(flow.client_conn)

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        if flow.client_conn.connected:
            self._arm(flow.client_conn, ctx.options.keepalive_timeout)


class HttpFraming:
    """Every response leaves framed as HTTP requires, whoever made it (last of our addons).

    - HEAD, 204 and 304 answers carry no body (`oci.frame`); a body there would be read as the
      next response on a kept-alive connection (containerd's resolver failed 7 times in 10).
    - `Connection` tokens are case-insensitive, but mitmproxy compares them as written, so an
      HTTP/1.0 client's `Connection: Keep-Alive` (ApacheBench) made it close a connection it had
      just promised to keep. They are lower-cased on the way in and out, and an HTTP/1.0 client
      that asked to keep the connection is told it is kept.
    """

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        _lower_connection_tokens(flow.request.headers)

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._frame(flow)

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        if not flow.response or flow.response.stream:
            return  # streamed: framed at responseheaders, already sent
        oci.frame(flow.request, flow.response)
        self._frame(flow)

    @staticmethod
    def _frame(flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None:
            return
        _lower_connection_tokens(response.headers)
        request = flow.request
        if request.http_version == "HTTP/1.0" and "keep-alive" in _tokens(request.headers) \
                and "close" not in _tokens(response.headers):
            response.headers["Connection"] = "keep-alive"


def _tokens(headers) -> list[str]:
    return [t.strip().lower() for v in headers.get_all("connection") for t in v.split(",") if t.strip()]


def _lower_connection_tokens(headers) -> None:
    values = headers.get_all("connection")
    if values and any(v != v.lower() for v in values):
        headers.set_all("Connection", [v.lower() for v in values])
