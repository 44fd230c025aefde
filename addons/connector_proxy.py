"""The script mitmdump and mitmweb load: the OCI Connector Proxy's addon chain, in request order.

    mitmdump -s addons/connector_proxy.py --mode reverse:http://127.0.0.1:9@8080 \
        --set keep_host_header=true --set connection_strategy=lazy \
        --set connectors_dir=manifests/examples --set client_tokens=tokens.yaml

connector store (+ status writer) -> health, client config -> forward/reverse routing -> client auth -> upstream auth -> streaming and rewrites -> scrub,
plus scrub's LateSecrets, which appends itself to the very end of mitmproxy's chain.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # loaded by path with `-s`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from addons.client_auth import ClientAuth  # noqa: E402
from addons.client_config import ClientConfig  # noqa: E402
from addons.forward import ForwardProxy  # noqa: E402
from addons.gate import Gate  # noqa: E402
from addons.health import Health  # noqa: E402
from addons.lifecycle import GracefulShutdown  # noqa: E402
from addons.listener import HeaderTimeout, HttpFraming, PlainHttpListener  # noqa: E402
from addons.record import OutOfBandRecorder  # noqa: E402
from addons.rewrite import Rewrite  # noqa: E402
from addons.routing import Routing  # noqa: E402
from addons.scrub import Scrub  # noqa: E402
from addons.status import ConnectorStatus  # noqa: E402
from addons.store import ConnectorStore  # noqa: E402
from addons.token_endpoint import TokenEndpoint  # noqa: E402
from addons.upstream_auth import UpstreamCredentials  # noqa: E402
from addons.upstream_trust import UpstreamTrust  # noqa: E402


def make_addons() -> list:
    store = ConnectorStore()
    gate = Gate()
    lifecycle = GracefulShutdown()
    scrub = Scrub(gate)
    recorder = OutOfBandRecorder()
    client_auth = ClientAuth(store, gate)
    upstream = UpstreamCredentials(store, scrub.late, recorder, client_auth)
    return [
        PlainHttpListener(),
        HeaderTimeout(),
        lifecycle,
        store,
        ConnectorStatus(store),
        Health(store, upstream, gate),
        ClientConfig(store, client_auth, scrub.late),
        TokenEndpoint(client_auth, scrub.late),
        ForwardProxy(store, client_auth),
        Routing(),
        client_auth,
        upstream,
        UpstreamTrust(store),
        Rewrite(),
        scrub,
        recorder,
        HttpFraming(),
    ]


addons = make_addons()
