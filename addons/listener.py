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

from mitmproxy import ctx, tls
from mitmproxy.proxy.mode_specs import ReverseMode


class PlainHttpListener:
    def load(self, loader):
        loader.add_option("reverse_tls", bool, False, "Accept TLS from clients on the reverse listener.")

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if not ctx.options.reverse_tls and isinstance(data.context.client.proxy_mode, ReverseMode):
            # No TLS layer: the bytes would go to the reverse placeholder upstream, which is never
            # reachable, so the client connection is closed before any certificate is sent.
            data.ignore_connection = True
