"""The reverse listener speaks plain HTTP, like the in-cluster address clients are configured for.

mitmproxy's reverse mode answers a TLS ClientHello with a certificate of its own. Registry clients
told that a registry is insecure (skopeo `--tls-verify=false`, podman, docker's insecure registries)
try HTTPS first and keep it when it works, so they would talk TLS to a certificate nobody trusts,
and pay for the encryption on every layer. Here the handshake is refused (the connection is closed
without a TLS answer), and clients fall back to plain HTTP at once, as they do against a
plain-HTTP registry. TLS for clients belongs to the Ingress or the Service mesh in front;
`reverse_tls` turns mitmproxy's own back on.
"""

from __future__ import annotations

import asyncio
import logging
import weakref

from mitmproxy import connection, ctx, http, tls
from mitmproxy.proxy.mode_specs import ReverseMode

from addons.gate import fail_closed

logger = logging.getLogger(__name__)


class PlainHttpListener:
    def load(self, loader):
        loader.add_option("reverse_tls", bool, False, "Accept TLS from clients on the reverse listener.")

    @fail_closed
    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if not ctx.options.reverse_tls and isinstance(data.context.client.proxy_mode, ReverseMode):
            # No TLS layer: the bytes would go to the reverse placeholder upstream, which is never
            # reachable, so the client connection is closed before any certificate is sent.
            data.ignore_connection = True


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

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._disarm(flow.client_conn)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._disarm(flow.client_conn)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.client_conn.connected:
            self._arm(flow.client_conn, ctx.options.keepalive_timeout)
