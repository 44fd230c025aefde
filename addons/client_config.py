"""`GET /.connectors/config`: the client configuration render, over HTTP, for an authenticated caller.

An init container needs nothing but curl and its (projected ServiceAccount) token:

    curl -sf -u x:$(cat /var/run/secrets/tokens/proxy) \
      "http://connector-proxy.connectors-system.svc/.connectors/config?use=default/harbor&names=registry-config" \
      | tar -x -C /root/.docker

Query: `use` (ns/name[,ns/name]), `names` (configuration.names), optional `proxy_url` (path form on
that base URL; default: the `external_url` option, else the in-cluster host form), `format`
(`tar`, the default, or `json`). The caller must be allowed to use every connector named; the files
carry the caller's own token, so the body is handed to the scrub addon's `LateSecrets` and the flow
only ever records a placeholder.
"""

from __future__ import annotations

import io
import json
import tarfile
from urllib.parse import parse_qs

from mitmproxy import ctx, http

from addons import oci
from addons.client_auth import ClientAuth, Refusal, parse_client_credential
from addons.gate import fail_closed
from addons.routing import NAME_RE, NAMESPACE_RE
from addons.routing import is_reverse
from addons.scrub import LateSecrets
from addons.store import ConnectorStore
from connector_store.render import RenderError, RenderRequest, render

PATH = "/.connectors/config"
PLACEHOLDER = b"<rendered client configuration: not recorded, it holds the caller's token>"


def tar_of(files: dict[str, bytes]) -> bytes:
    """A deterministic tar (fixed mtimes and owners) of the rendered files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


class ClientConfig:
    def __init__(self, store: ConnectorStore, client_auth: ClientAuth, secrets: LateSecrets):
        self.store = store
        self.client_auth = client_auth
        self.secrets = secrets

    def load(self, loader):
        loader.add_option("forward_address", str, "",
                          "host:port of the forward proxy as workloads reach it (for rendered .env and *.proxy).")
        loader.add_option("forward_ca_cert", str, "", "PEM file of the forward proxy's CA certificate (for rendered ca.crt).")

    @fail_closed(credentials=True)
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or not is_reverse(flow) or flow.request.path.partition("?")[0] != PATH:
            return
        if flow.request.method not in ("GET", "HEAD"):
            flow.response = oci.refusal(flow.request, 405, "UNSUPPORTED", f"{PATH} answers GET only")
            return
        query = {k: v[-1] for k, v in parse_qs(flow.request.path.partition("?")[2]).items()}
        token = parse_client_credential(flow.request.headers.get("authorization"))
        refs = []
        for ref in (r.strip() for r in query.get("use", "").split(",") if r.strip()):
            ns, slash, name = ref.partition("/")
            if not slash or not NAMESPACE_RE.match(ns) or not NAME_RE.match(name):
                flow.response = oci.refusal(flow.request, 400, "NAME_INVALID", f"use: {ref!r} is not <namespace>/<name>")
                return
            refs.append((ns, name))
        if token is not None and not refs:
            flow.response = oci.refusal(flow.request, 400, "UNSUPPORTED", "use=<namespace>/<name>[,...] is required")
            return
        result = await self.client_auth.admit(token, refs, require_usable=False)
        if isinstance(result, Refusal):
            flow.response = self.client_auth.refuse(flow.request, result)
            return
        connectors = list(result.connectors)
        proxy_url = query.get("proxy_url") or ctx.options.external_url or None
        try:
            files = render(RenderRequest(connectors, token, query.get("names", ""), proxy_url,
                                         ctx.options.forward_address or None, self._ca_pem(),
                                         ctx.options.cluster_domain))
        except RenderError as e:
            flow.response = oci.refusal(flow.request, 400, "UNSUPPORTED", str(e))
            return
        if query.get("format", "tar") == "json":
            body = json.dumps({"files": {k: v.decode() for k, v in files.items()}}, indent=2).encode()
            content_type = "application/json"
        else:
            body = tar_of(files)
            content_type = "application/x-tar"
        headers = {"Content-Type": content_type, "Cache-Control": "no-store"}
        if flow.request.method == "HEAD":  # the length of what GET would send, and no body
            flow.response = http.Response.make(200, b"", headers)
            flow.response.headers["Content-Length"] = str(len(body))
            return
        flow.response = http.Response.make(200, PLACEHOLDER, headers)
        self.secrets.response_body(flow, body)

    def _ca_pem(self) -> str | None:
        """The forward proxy's CA certificate (never its key), when forward mode is on."""
        path = ctx.options.forward_ca_cert
        if path:
            try:
                with open(path) as f:
                    return f.read()
            except OSError:
                return None
        return None
