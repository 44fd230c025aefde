"""The script mitmdump and mitmweb load: the OCI Connector Proxy's addon chain, in request order.

    mitmdump -s addons/connector_proxy.py --mode reverse:http://127.0.0.1:9@8080 \
        --set keep_host_header=true --set connection_strategy=lazy \
        --set connectors_dir=manifests/examples --set client_tokens=tokens.yaml

connector store (+ status writer) -> health -> routing -> client auth -> upstream auth -> streaming and rewrites -> scrub,
plus the credential injector, which appends itself to the very end of mitmproxy's chain.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # loaded by path with `-s`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from addons.client_auth import ClientAuth  # noqa: E402
from addons.health import Health  # noqa: E402
from addons.rewrite import Rewrite  # noqa: E402
from addons.routing import Routing  # noqa: E402
from addons.scrub import Scrub  # noqa: E402
from addons.status import ConnectorStatus  # noqa: E402
from addons.store import ConnectorStore  # noqa: E402
from addons.upstream_auth import UpstreamCredentials  # noqa: E402


def make_addons() -> list:
    store = ConnectorStore()
    upstream = UpstreamCredentials(store)
    return [
        store,
        ConnectorStatus(store),
        Health(store, upstream),
        Routing(),
        ClientAuth(store),
        upstream,
        Rewrite(),
        Scrub(),
    ]


addons = make_addons()
