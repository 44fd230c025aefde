"""The script plain mitmdump and mitmweb load: the OCI Connector Proxy's addon chain (addons/chain.py).

    mitmdump -s addons/connector_proxy.py --mode reverse:http://connector-proxy.invalid@8080 \
        --set keep_host_header=true --set connection_strategy=lazy \
        --set connectors_dir=manifests/examples --set client_tokens=tokens.yaml

`connector-proxy` does not load this file: it adds the chain to mitmproxy's master itself, so a
script reload (mitmproxy reloads `-s` scripts when they change, and one that fails to load leaves
the proxy running without any of our addons) can never take the checks away from a running proxy.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # loaded by path with `-s`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from addons.chain import make_addons  # noqa: E402

addons = make_addons()
