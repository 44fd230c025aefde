"""mitmproxy addons of the OCI Connector Proxy; `connector_proxy.py` is the script mitmdump loads."""
