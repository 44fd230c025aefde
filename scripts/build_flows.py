"""Hand-built registry conversations for the replay tests: tests/flows/handbuilt/*.mitm.

We cannot record Harbor, Docker Hub, GHCR, Quay, ECR or Artifact Registry in CI, so their
conversations are written here, each in the exact form the proxy records one (`-w`): the request
as sent upstream with the injected Authorization redacted, the response as the client saw it, and
the same metadata (route, upstream auth shape and scopes, the registry's original Location/Link,
blob size and digest). Each conversation cites where its *shape* comes from: hosts, realms,
services, status codes, headers and redirects. Digests, UUIDs, account ids and signatures are
invented (signatures and signed paths say EXAMPLE); blobs are zero bytes, with their real digest.

On top of what the proxy records, `connector_proxy_replay` metadata holds the conversation's notes
(title, sources, quirk) on its first flow, and flows the proxy never records because they happen
out of band or elsewhere:

- `kind: probe`  the registry's answer to the proxy's `GET /v2/` (the challenge);
- `kind: token`  a token fetch, the token values replaced by `<redacted>` (a replay serves
                 `replayed-token-<n>` in their place);
- `kind: reject` what the registry answers to a request it refuses (ECR Public and Basic);
- `kind: direct` a request the client sends straight to another host after a redirect (storage).

A Location the proxy rewrites is written both ways, as it records them: the client's view, and
the registry's original in metadata. `client_location` below is the rule the proxy follows
(DESIGN section 5): the registry's API URLs go back to the proxy origin the client used, with the
path-form prefix; anything else (storage hosts, the registry's own signed download URLs outside
/v2/) is left for the client to follow itself, made absolute.

    .venv/bin/python scripts/build_flows.py           # (re)write tests/flows/handbuilt/
    .venv/bin/python scripts/build_flows.py --check   # exit 1 if the files differ from this script
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

from mitmproxy import connection, http
from mitmproxy import io as mitmio

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "flows" / "handbuilt"
T0 = 1767225600.0  # 2026-01-01T00:00:00Z: fixed, so the files are reproducible byte for byte
REDACTED = "<redacted>"
MIB = 1024 * 1024

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ACCEPT_MANIFESTS = f"{MT_MANIFEST}, {MT_INDEX}, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json"
API_VERSION = ("Docker-Distribution-Api-Version", "registry/2.0")
SUBJECT = "system:serviceaccount:ci:builder"


def zeros_digest(size: int) -> str:
    return "sha256:" + hashlib.sha256(b"\0" * size).hexdigest()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def origin_of(url: str) -> str:
    p = urlsplit(url)
    port = p.port
    default = {"http": 80, "https": 443}[p.scheme]
    return f"{p.scheme}://{p.hostname}" + (f":{port}" if port and port != default else "")


def scopes_for(method: str, path: str) -> list[str]:
    """The scopes a request needs (DESIGN section 4), written out independently of addons/oci.py."""
    m = re.match(r"^/v2/(.+)/(?:manifests|blobs|tags|referrers)/", path)
    if not m:
        return []
    actions = "pull" if method in ("GET", "HEAD") else "delete" if method == "DELETE" else "pull,push"
    return [f"repository:{m.group(1)}:{actions}"]


def image(layer_size: int, labels: dict[str, str]) -> tuple[bytes, bytes, str]:
    """(config, manifest) JSON of a one-layer image and the layer digest."""
    layer = zeros_digest(layer_size)
    config = canonical({"architecture": "amd64", "os": "linux", "config": {"Labels": labels},
                        "rootfs": {"type": "layers", "diff_ids": [layer]}})
    manifest = canonical({"schemaVersion": 2, "mediaType": MT_MANIFEST,
                          "config": {"mediaType": MT_CONFIG, "digest": digest_of(config), "size": len(config)},
                          "layers": [{"mediaType": MT_LAYER, "digest": layer, "size": layer_size}]})
    return config, manifest, layer


class Conversation:
    """Writes one conversation's flows the way the proxy records them."""

    def __init__(self, name: str, *, title: str, quirk: str, sources: list[str], registry: str,
                 connector: tuple[str, str], form: str, credentials: str, challenge: str,
                 realm: str = "", service: str = "", proxy_origin: str = "http://192.168.1.5:31567",
                 user_agent: str = "containerd/1.7.13"):
        self.name = name
        self.registry = registry.rstrip("/")
        self.namespace, self.connector = connector
        self.form = form
        self.origin = f"http://c-{self.connector}.{self.namespace}.svc.cluster.local" if form == "host" else proxy_origin
        self.prefix = f"namespaces/{self.namespace}/connectors/{self.connector}" if form == "path" else ""
        self.credentials = credentials
        self.challenge = challenge
        self.realm = realm
        self.service = service
        self.user_agent = user_agent
        self.flows: list[http.HTTPFlow] = []
        self.notes = {"title": title, "quirk": quirk, "sources": sources}

    # ---- plumbing

    def _flow(self, request: http.Request, response: http.Response, *, upstream_host: tuple[str, int] | None) -> http.HTTPFlow:
        i = len(self.flows)
        ts = T0 + i
        ident = lambda part: str(uuid.uuid5(uuid.NAMESPACE_URL, f"connector-proxy/{self.name}/{i}/{part}"))
        client = connection.Client.from_state({
            "peername": ("10.244.1.17", 40000 + i), "sockname": ("10.96.0.20", 8080), "id": ident("client"),
            "transport_protocol": "tcp", "error": None, "tls": False, "certificate_list": [], "alpn": None,
            "alpn_offers": [], "cipher": None, "cipher_list": [], "tls_version": None, "sni": None,
            "timestamp_start": ts, "timestamp_end": ts + 0.5, "timestamp_tls_setup": None, "mitmcert": None,
            "proxy_mode": "reverse:http://127.0.0.1:9@8080",
        })
        server = connection.Server.from_state({
            "peername": None, "sockname": None, "id": ident("server"), "transport_protocol": "tcp",
            "error": None, "tls": False, "certificate_list": [], "alpn": None, "alpn_offers": [], "cipher": None,
            "cipher_list": [], "tls_version": None, "sni": None,
            "timestamp_start": ts + 0.1 if upstream_host else None, "timestamp_end": ts + 0.4 if upstream_host else None,
            "timestamp_tls_setup": None, "address": upstream_host or ("127.0.0.1", 9),
            "timestamp_tcp_setup": ts + 0.1 if upstream_host else None, "via": None,
        })
        flow = http.HTTPFlow(client, server)
        flow.id = ident("flow")
        flow.timestamp_created = ts
        request.timestamp_start, request.timestamp_end = ts + 0.05, ts + 0.1
        response.timestamp_start, response.timestamp_end = ts + 0.2, ts + 0.3
        if request.method in ("GET", "HEAD") and not request.raw_content:
            request.headers.pop("Content-Length", None)  # Request.make adds one; clients send none
        flow.request, flow.response = request, response
        if not self.flows:
            flow.metadata["connector_proxy_replay"] = {"conversation": self.notes}
        self.flows.append(flow)
        return flow

    @staticmethod
    def _mark(flow: http.HTTPFlow, kind: str) -> http.HTTPFlow:
        """A flow the proxy does not record itself (see the module docstring)."""
        flow.metadata["connector_proxy_replay"] = {**flow.metadata.get("connector_proxy_replay", {}), "kind": kind}
        return flow

    def _auth_header(self) -> dict[str, str]:
        if self.challenge == "basic" and self.credentials == "basic":
            return {"Authorization": f"Basic {REDACTED}"}
        if self.challenge == "bearer":
            return {"Authorization": f"Bearer {REDACTED}"}
        return {}

    def _auth_shape(self) -> dict:
        return {"credentials": self.credentials, "challenge": self.challenge, "realm": self.realm, "service": self.service}

    def _host(self, url: str) -> tuple[str, int]:
        p = urlsplit(url)
        return p.hostname or "", p.port or (443 if p.scheme == "https" else 80)

    def client_location(self, url: str, request_url: str) -> str:
        """What the proxy makes of a URL the registry sent (addons/rewrite.py, DESIGN section 5)."""
        absolute = urljoin(request_url, url)
        if origin_of(absolute) != origin_of(self.registry):
            return url  # another host: the client goes there itself
        p = urlsplit(absolute)
        if not p.path.startswith("/v2/"):
            return absolute  # the registry's own host, outside its API
        path = f"/v2/{self.prefix}/{p.path[4:]}" if self.prefix else p.path
        o = urlsplit(self.origin)
        return urlunsplit((o.scheme, o.netloc, path, p.query, p.fragment))

    # ---- what the proxy records

    def exchange(self, method: str, path: str, status: int, *, headers: dict | None = None, body: bytes | None = b"",
                 request_headers: dict | None = None, request_body: bytes | None = b"", upload_size: int | None = None,
                 location: str | None = None, link: str | None = None, blob: tuple[int, str] | None = None) -> http.HTTPFlow:
        """One request the proxy forwarded upstream and the registry's answer.

        `path` is the registry API path with its query. `location`/`link`: as the registry sent
        them. `blob`: (size, digest) of a streamed response body (not kept). `upload_size`: a
        streamed request body (not kept)."""
        url = self.registry + path
        api_path = path.partition("?")[0]
        req_headers = {"Host": urlsplit(self.registry).netloc, "User-Agent": self.user_agent, **(request_headers or {})}
        if upload_size is not None:
            req_headers.setdefault("Content-Type", "application/octet-stream")
            req_headers["Content-Length"] = str(upload_size)
        elif request_body:
            req_headers["Content-Length"] = str(len(request_body))
        elif method in ("POST", "PUT", "PATCH"):
            req_headers["Content-Length"] = "0"
        req_headers.update(self._auth_header())
        request = http.Request.make(method, url, request_body or b"", req_headers)
        if upload_size is not None:  # streamed: the proxy keeps its size, not its bytes
            request.data.content = None
            request.headers["Content-Length"] = str(upload_size)
        resp_headers = dict(headers or {})
        resp_headers.setdefault(*API_VERSION)
        original: dict = {}
        if location is not None:
            original["location"] = location
            resp_headers["Location"] = self.client_location(location, url)
        if link is not None:
            original["link"] = [link]
            resp_headers["Link"] = re.sub(r"<([^>]*)>", lambda m: f"<{self.client_location(m.group(1), url)}>", link)
        if blob is not None:
            resp_headers["Content-Length"] = str(blob[0])
        elif body is not None and "Content-Length" not in resp_headers:
            resp_headers["Content-Length"] = str(len(body))
        response = http.Response.make(status, body or b"", resp_headers)
        if blob is not None:
            response.data.content = None
            response.headers["Content-Length"] = str(blob[0])
        flow = self._flow(request, response, upstream_host=self._host(self.registry))
        flow.metadata["connector_proxy"] = {
            "form": self.form, "namespace": self.namespace, "name": self.connector, "origin": self.origin,
            "prefix": self.prefix, "path": api_path, "subject": SUBJECT, "upstream": self.registry,
        }
        flow.metadata["connector_proxy_upstream"] = {
            "scopes": scopes_for(method, api_path), "retry": False,
            "has_body": bool(request_body) or bool(upload_size), "auth": self._auth_shape(),
        }
        if original:
            flow.metadata["connector_proxy_upstream_headers"] = original
        if blob is not None or (status < 400 and "/blobs/" in api_path):
            flow.metadata["connector_proxy_blob"] = {"size": blob[0] if blob else 0,
                                                     "digest": blob[1] if blob else resp_headers.get("Docker-Content-Digest")}
        return flow

    def ping(self, authenticated: bool) -> http.HTTPFlow:
        """The client's `GET /v2/`, answered by the proxy itself: a 401 challenge, or 200 once authenticated.

        Host form: the connector's own ping; path form: the shared ping of the proxy's host."""
        host_form = self.form == "host"
        request = http.Request.make("GET", f"{self.origin}/v2/", b"", {"Host": urlsplit(self.origin).netloc,
                                                                       "User-Agent": self.user_agent})
        if authenticated:
            response = http.Response.make(200, b"{}", {"Content-Type": "application/json", API_VERSION[0]: API_VERSION[1]})
        else:
            target = f"connector {self.namespace}/{self.connector}" if host_form else "this proxy"
            body = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": f"authentication required to use {target}"}]}).encode()
            response = http.Response.make(401, body, {"Content-Type": "application/json", API_VERSION[0]: API_VERSION[1],
                                                      "WWW-Authenticate": 'Basic realm="oci-connector-proxy"'})
        flow = self._flow(request, response, upstream_host=None)
        flow.metadata["connector_proxy"] = {
            "form": "host" if host_form else "ping", "namespace": self.namespace if host_form else "",
            "name": self.connector if host_form else "", "origin": self.origin, "prefix": "", "path": "/v2/",
            "subject": SUBJECT if authenticated and host_form else "", "upstream": "",
        }
        return flow

    # ---- what happens out of band or elsewhere (never recorded by the proxy itself)

    def probe(self, www_authenticate: str, body: bytes = b"") -> None:
        """The registry's answer to the proxy's `GET /v2/` challenge probe."""
        body = body or json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "authentication required", "detail": None}]}).encode()
        request = http.Request.make("GET", self.registry + "/v2/", b"", {"Host": urlsplit(self.registry).netloc})
        response = http.Response.make(401, body, {"Content-Type": "application/json; charset=utf-8", API_VERSION[0]: API_VERSION[1],
                                                  "WWW-Authenticate": www_authenticate, "Content-Length": str(len(body))})
        self._mark(self._flow(request, response, upstream_host=self._host(self.registry)), "probe")

    def token(self, scopes: list[str], body: dict) -> None:
        """A token fetch as the proxy sends it (Basic credentials only for a connector with a Secret)."""
        query = ([("service", self.service)] if self.service else []) + [("scope", s) for s in scopes]
        url = self.realm + ("&" if "?" in self.realm else "?") + urlencode(query)
        headers = {"Host": urlsplit(self.realm).netloc}
        if self.credentials == "basic":
            headers["Authorization"] = f"Basic {REDACTED}"
        content = json.dumps(body).encode()
        response = http.Response.make(200, content, {"Content-Type": "application/json", "Content-Length": str(len(content))})
        self._mark(self._flow(http.Request.make("GET", url, b"", headers), response, upstream_host=self._host(self.realm)), "token")

    def reject(self, method: str, path: str, status: int, body: dict) -> None:
        """What the registry answers when a request carries credentials it refuses."""
        headers = {"Host": urlsplit(self.registry).netloc, "User-Agent": "curl/8.5.0", "Authorization": f"Basic {REDACTED}"}
        content = json.dumps(body).encode()
        response = http.Response.make(status, content, {"Content-Type": "application/json; charset=utf-8",
                                                        API_VERSION[0]: API_VERSION[1], "Content-Length": str(len(content))})
        self._mark(self._flow(http.Request.make(method, self.registry + path, b"", headers), response,
                              upstream_host=self._host(self.registry)), "reject")

    def direct(self, url: str, size: int, digest: str, headers: dict | None = None) -> None:
        """The client following a redirect to another host itself: no proxy, no credentials."""
        request = http.Request.make("GET", url, b"", {"Host": urlsplit(url).netloc, "User-Agent": self.user_agent})
        response = http.Response.make(200, b"", {"Content-Type": "application/octet-stream", **(headers or {})})
        response.data.content = None
        response.headers["Content-Length"] = str(size)
        flow = self._mark(self._flow(request, response, upstream_host=self._host(url)), "direct")
        flow.metadata["connector_proxy_blob"] = {"size": size, "digest": digest}

    def write(self, directory: Path) -> Path:
        path = directory / f"{self.name}.mitm"
        with path.open("wb") as f:
            writer = mitmio.FlowWriter(f)
            for flow in self.flows:
                writer.add(flow)
        return path


# ---------------------------------------------------------------- the conversations


def upload(c: Conversation, repo: str, size: int, uuid_: str, state: str, *, absolute: bool, digest: str,
           chunked_state: str, with_state: bool = True) -> None:
    """POST, PATCH, PUT of one blob (the distribution spec's chunked upload)."""
    base = c.registry if absolute else ""
    q0 = f"?_state={state}" if with_state else ""
    q1 = f"?_state={chunked_state}" if with_state else ""
    c.exchange("HEAD", f"/v2/{repo}/blobs/{digest}", 404, body=b"", headers={"Content-Type": "application/json; charset=utf-8"})
    c.exchange("POST", f"/v2/{repo}/blobs/uploads/", 202, body=b"",
               headers={"Docker-Upload-Uuid": uuid_, "Range": "0-0"}, location=f"{base}/v2/{repo}/blobs/uploads/{uuid_}{q0}")
    c.exchange("PATCH", f"/v2/{repo}/blobs/uploads/{uuid_}{q0}", 202, body=b"", upload_size=size,
               headers={"Docker-Upload-Uuid": uuid_, "Range": f"0-{size - 1}"}, location=f"{base}/v2/{repo}/blobs/uploads/{uuid_}{q1}")
    sep = "&" if q1 else "?"
    c.exchange("PUT", f"/v2/{repo}/blobs/uploads/{uuid_}{q1}{sep}digest={digest.replace(':', '%3A')}", 201, body=b"",
               headers={"Docker-Content-Digest": digest}, location=f"{base}/v2/{repo}/blobs/{digest}")


def harbor() -> Conversation:
    c = Conversation(
        "harbor-host-form-push-pull",
        title="Harbor: robot account push and pull in host form, with tag-list pagination",
        quirk="token service at /service/token with service=\"harbor-registry\"; absolute upload Locations "
              "rewritten to the host-form origin; a relative Link rewritten too",
        sources=[
            "https://github.com/goharbor/harbor/issues/12192 (challenge: Bearer realm=\"https://demo.goharbor.io/service/token\",service=\"harbor-registry\")",
            "https://github.com/goharbor/harbor/issues/9317 (token fetch: /service/token?service=harbor-registry&scope=repository:project/repo:pull)",
            "https://github.com/goharbor/harbor/issues/10522 (401 headers of harbor-core)",
            "https://distribution.github.io/distribution/spec/auth/token/ (token response: token, expires_in, issued_at)",
            "https://github.com/opencontainers/distribution-spec/blob/main/spec.md#listing-tags (n, last, Link rel=\"next\")",
        ],
        registry="https://harbor.example.com", connector=("default", "harbor"), form="host",
        credentials="basic", challenge="bearer", realm="https://harbor.example.com/service/token", service="harbor-registry",
        user_agent="buildkit/v0.13",
    )
    c.probe('Bearer realm="https://harbor.example.com/service/token",service="harbor-registry"')
    c.token(["repository:ci/app:pull,push"], {"token": REDACTED, "expires_in": 1800, "issued_at": "2026-01-01T00:00:00Z"})
    c.ping(authenticated=False)
    c.ping(authenticated=True)
    config, manifest, layer = image(3000, {"org.opencontainers.image.source": "https://git.example.com/ci/app"})
    upload(c, "ci/app", 3000, "2d1a5a43-5f35-4a2f-9a3e-6c3f0a1b9e10",
           "ZXhhbXBsZS1zdGF0ZS0w", absolute=True, digest=layer, chunked_state="ZXhhbXBsZS1zdGF0ZS0x")
    upload(c, "ci/app", len(config), "9b0e7f52-1c4d-4f0e-8a55-2a8a7d1c3b21",
           "ZXhhbXBsZS1zdGF0ZS0y", absolute=True, digest=digest_of(config), chunked_state="ZXhhbXBsZS1zdGF0ZS0z")
    md = digest_of(manifest)
    c.exchange("PUT", "/v2/ci/app/manifests/v1", 201, body=b"", request_body=manifest,
               request_headers={"Content-Type": MT_MANIFEST}, headers={"Docker-Content-Digest": md},
               location=f"https://harbor.example.com/v2/ci/app/manifests/{md}")
    tags1 = canonical({"name": "ci/app", "tags": ["v1"]})
    c.exchange("GET", "/v2/ci/app/tags/list?n=1", 200, body=tags1, headers={"Content-Type": "application/json; charset=utf-8"},
               link='</v2/ci/app/tags/list?last=v1&n=1>; rel="next"')
    tags2 = canonical({"name": "ci/app", "tags": ["v0"]})
    c.exchange("GET", "/v2/ci/app/tags/list?last=v1&n=1", 200, body=tags2, headers={"Content-Type": "application/json; charset=utf-8"})
    c.exchange("GET", "/v2/ci/app/manifests/v1", 200, body=manifest, request_headers={"Accept": ACCEPT_MANIFESTS},
               headers={"Content-Type": MT_MANIFEST, "Docker-Content-Digest": md, "Etag": f'"{md}"'})
    c.exchange("GET", f"/v2/ci/app/blobs/{layer}", 200, blob=(3000, layer),
               headers={"Content-Type": "application/octet-stream", "Docker-Content-Digest": layer})
    return c


def dockerhub() -> Conversation:
    c = Conversation(
        "dockerhub-library-pull",
        title="Docker Hub: pull of an official image (library/alpine) with a Docker ID and access token",
        quirk="official images live under library/, so scopes name repository:library/alpine:pull; the token "
              "comes from auth.docker.io for service registry.docker.io; blobs redirect to the CDN",
        sources=[
            "https://distribution.github.io/distribution/spec/auth/token/ (example challenge: realm=\"https://auth.docker.io/token\",service=\"registry.docker.io\")",
            "https://github.com/distribution/reference/blob/main/normalize.go (official images: the library/ prefix on docker.io)",
            "https://docs.docker.com/docker-hub/usage/pulls/ (ratelimit-limit, ratelimit-remaining headers)",
            "https://github.com/osism/ansible-collection-services/pull/1049 (hosts: registry-1.docker.io, auth.docker.io, production.cloudflare.docker.com)",
            "https://github.com/huangzheng2016/TheOnlyMirror/pull/5 (blob Locations on production.cloudflare.docker.com)",
        ],
        registry="https://registry-1.docker.io", connector=("default", "dockerhub"), form="path",
        credentials="basic", challenge="bearer", realm="https://auth.docker.io/token", service="registry.docker.io",
        user_agent="containerd/1.7.13",
    )
    c.probe('Bearer realm="https://auth.docker.io/token",service="registry.docker.io"')
    c.token(["repository:library/alpine:pull"], {"token": REDACTED, "access_token": REDACTED, "expires_in": 300,
                                                 "issued_at": "2026-01-01T00:00:00.000000000Z"})
    c.ping(authenticated=False)
    _config, manifest, layer = image(3500, {})
    md = digest_of(manifest)
    index = canonical({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [
        {"mediaType": MT_MANIFEST, "digest": md, "size": len(manifest), "platform": {"architecture": "amd64", "os": "linux"}}]})
    limits = {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "97;w=21600", "docker-ratelimit-source": "203.0.113.7"}
    c.exchange("GET", "/v2/library/alpine/manifests/3.20", 200, body=index, request_headers={"Accept": ACCEPT_MANIFESTS},
               headers={"Content-Type": MT_INDEX, "Docker-Content-Digest": digest_of(index), **limits})
    c.exchange("GET", f"/v2/library/alpine/manifests/{md}", 200, body=manifest, request_headers={"Accept": ACCEPT_MANIFESTS},
               headers={"Content-Type": MT_MANIFEST, "Docker-Content-Digest": md, **limits})
    cdn = (f"https://production.cloudflare.docker.com/registry-v2/docker/registry/v2/blobs/sha256/{layer[7:9]}/{layer[7:]}/data"
           "?verify=1767229200-EXAMPLEsignature")
    c.exchange("GET", f"/v2/library/alpine/blobs/{layer}", 307, body=b"", location=cdn,
               headers={"Content-Type": "text/html; charset=utf-8", "Content-Length": "0"})
    c.direct(cdn, 3500, layer)
    return c


def ghcr() -> Conversation:
    c = Conversation(
        "ghcr-anonymous-pull",
        title="GHCR: anonymous pull of a public image (a connector without a Secret)",
        quirk="even public images need a token: fetched anonymously from https://ghcr.io/token (no Authorization), "
              "service ghcr.io; the blob redirects to S3",
        sources=[
            "https://github.com/containerd/stargz-snapshotter/pull/167 (anonymous token from ghcr.io/token?scope=...; 307 to github-production-container-registry.s3.amazonaws.com)",
            "https://github.com/CodesWhat/drydock/pull/87 (GHCR needs the token exchange even for public repositories)",
            "https://github.com/jdx/mise/pull/9273 (challenge: Bearer realm=\"https://ghcr.io/token\",service=\"ghcr.io\")",
        ],
        registry="https://ghcr.io", connector=("oss", "ghcr"), form="path", proxy_origin="http://connector-proxy.connectors.svc:8080",
        credentials="anonymous", challenge="bearer", realm="https://ghcr.io/token", service="ghcr.io",
        user_agent="skopeo/1.9.3",
    )
    c.probe('Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:user/image:pull"')
    c.token(["repository:stargz-containers/python:pull"], {"token": REDACTED})
    _config, manifest, layer = image(2500, {"org.opencontainers.image.source": "https://github.com/containerd/stargz-snapshotter"})
    md = digest_of(manifest)
    c.exchange("HEAD", "/v2/stargz-containers/python/manifests/3.9-org", 200, body=b"", request_headers={"Accept": ACCEPT_MANIFESTS},
               headers={"Content-Type": MT_MANIFEST, "Docker-Content-Digest": md, "Content-Length": str(len(manifest))})
    c.exchange("GET", f"/v2/stargz-containers/python/manifests/{md}", 200, body=manifest, request_headers={"Accept": ACCEPT_MANIFESTS},
               headers={"Content-Type": MT_MANIFEST, "Docker-Content-Digest": md})
    s3 = (f"https://github-production-container-registry.s3.amazonaws.com/blobs/sha256/{layer[7:]}/data"
          "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=EXAMPLE%2F20260101%2Fus-east-1%2Fs3%2Faws4_request"
          "&X-Amz-Date=20260101T000000Z&X-Amz-Expires=300&X-Amz-SignedHeaders=host&X-Amz-Signature=EXAMPLE")
    c.exchange("GET", f"/v2/stargz-containers/python/blobs/{layer}", 307, body=b"", location=s3,
               headers={"Content-Type": "text/html; charset=utf-8", "Content-Length": "0"})
    c.direct(s3, 2500, layer)
    return c


def quay() -> Conversation:
    c = Conversation(
        "quay-robot-push",
        title="Quay: robot account push",
        quirk="realm https://quay.io/v2/auth (under /v2/, yet not an API path), service quay.io, a challenge "
              "without scope (the proxy works the scopes out itself); absolute upload Locations without _state",
        sources=[
            "https://github.com/quay/claircore/pull/879 (realm https://quay.io/v2/auth)",
            "https://github.com/OctopusDeploy/Issues/issues/5076 (Quay's challenge carries no scope)",
            "https://github.com/quay/mirror-registry/issues/71 (Basic credentials to /v2/auth?service=...&scope=...)",
            "https://github.com/quay/quay/blob/master/endpoints/v2/blob.py (Location: get_app_url() + url_for('v2.upload_chunk', ...))",
        ],
        registry="https://quay.io", connector=("team", "quay"), form="path",
        credentials="basic", challenge="bearer", realm="https://quay.io/v2/auth", service="quay.io",
        user_agent="Buildah/1.28.2",
    )
    c.probe('Bearer realm="https://quay.io/v2/auth",service="quay.io"')
    c.token(["repository:myorg/app:pull,push"], {"token": REDACTED})
    c.ping(authenticated=False)
    config, manifest, layer = image(2200, {"quay.expires-after": "2w"})
    upload(c, "myorg/app", 2200, "5e2f0c6e-7a7c-4b9e-9d8e-0c1a2b3c4d5e", "", absolute=True, digest=layer,
           chunked_state="", with_state=False)
    upload(c, "myorg/app", len(config), "c7d1f3a9-2b4e-4c6d-8e0f-1a2b3c4d5e6f", "", absolute=True, digest=digest_of(config),
           chunked_state="", with_state=False)
    md = digest_of(manifest)
    c.exchange("PUT", "/v2/myorg/app/manifests/latest", 201, body=b"", request_body=manifest,
               request_headers={"Content-Type": MT_MANIFEST}, headers={"Docker-Content-Digest": md},
               location=f"https://quay.io/v2/myorg/app/manifests/{md}")
    return c


def ecr() -> Conversation:
    c = Conversation(
        "ecr-basic-push-pull",
        title="Amazon ECR (private): push and pull with `AWS` and a get-login-password token",
        quirk="no token server: the /v2/ challenge is Basic (realm = the registry itself, service ecr.amazonaws.com), "
              "so the proxy sends the connector's Basic credentials on every request and fetches no token",
        sources=[
            "https://docs.aws.amazon.com/AmazonECR/latest/userguide/registry_auth.html (user AWS, password from aws ecr get-login-password)",
            "https://github.com/mayflower/docker-ls/issues/28 (challenge: Basic realm=\"https://111111111111.dkr.ecr.us-east-1.amazonaws.com/\",service=\"ecr.amazonaws.com\")",
            "https://github.com/dotnet/Docker.DotNet/issues/488 (ECR takes Authorization: Basic)",
            "https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pushing-a-blob-monolithically (POST then a PUT with the body; relative Locations allowed)",
        ],
        registry="https://123456789012.dkr.ecr.us-east-1.amazonaws.com", connector=("prod", "ecr"), form="path",
        credentials="basic", challenge="basic", user_agent="docker/27.0.3 go/go1.21.11",
    )
    c.probe('Basic realm="https://123456789012.dkr.ecr.us-east-1.amazonaws.com/",service="ecr.amazonaws.com"',
            body=b'{"errors":[{"code":"DENIED","message":"Not Authorized"}]}')
    c.ping(authenticated=False)
    _config, manifest, layer = image(4000, {})
    u = "0a1b2c3d-0000-4000-8000-ecr000000001"
    c.exchange("HEAD", f"/v2/app/blobs/{layer}", 404, body=b"", headers={"Content-Type": "application/json; charset=utf-8"})
    c.exchange("POST", "/v2/app/blobs/uploads/", 202, body=b"", headers={"Docker-Upload-Uuid": u, "Range": "0-0"},
               location=f"/v2/app/blobs/uploads/{u}")
    c.exchange("PUT", f"/v2/app/blobs/uploads/{u}?digest={layer.replace(':', '%3A')}", 201, body=b"", upload_size=4000,
               headers={"Docker-Content-Digest": layer}, location=f"/v2/app/blobs/{layer}")
    md = digest_of(manifest)
    c.exchange("PUT", "/v2/app/manifests/v2", 201, body=b"", request_body=manifest,
               request_headers={"Content-Type": MT_MANIFEST}, headers={"Docker-Content-Digest": md},
               location=f"/v2/app/manifests/{md}")
    c.exchange("GET", "/v2/app/manifests/v2", 200, body=manifest, request_headers={"Accept": ACCEPT_MANIFESTS},
               headers={"Content-Type": MT_MANIFEST, "Docker-Content-Digest": md})
    return c


def ecr_public() -> Conversation:
    c = Conversation(
        "ecr-public-pull",
        title="Amazon ECR Public: pull with an ecr-public get-login-password token",
        quirk="public.ecr.aws answers 400 DENIED (not 401) to Basic credentials on its API; it wants the "
              "token flow: Basic only to https://public.ecr.aws/token, Bearer to the registry",
        sources=[
            "https://github.com/dependabot/proxy/issues/157 (400 DENIED \"Your Authorization Token is invalid.\" to Basic, not on /token)",
            "https://github.com/kreuzwerker/terraform-provider-docker/pull/666 (Basic refused, Bearer accepted)",
            "https://github.com/lablup/backend.ai/pull/2549 (401 on /v2 without credentials, 400 with a bad one)",
            "https://github.com/apple/containerization/pull/711 (clients retrying without the header after the 400)",
        ],
        registry="https://public.ecr.aws", connector=("default", "ecr-public"), form="path",
        credentials="basic", challenge="bearer", realm="https://public.ecr.aws/token", service="public.ecr.aws",
        user_agent="containerd/1.7.13",
    )
    c.probe('Bearer realm="https://public.ecr.aws/token",service="public.ecr.aws",scope="aws"')
    c.reject("GET", "/v2/docker/library/alpine/manifests/latest", 400,
             {"errors": [{"code": "DENIED", "message": "Your Authorization Token is invalid."}]})
    c.token(["repository:docker/library/alpine:pull"], {"token": REDACTED})
    _config, manifest, layer = image(1800, {})
    md = digest_of(manifest)
    c.exchange("GET", "/v2/docker/library/alpine/manifests/latest", 200, body=manifest, request_headers={"Accept": ACCEPT_MANIFESTS},
               headers={"Content-Type": MT_MANIFEST, "Docker-Content-Digest": md})
    tags = canonical({"name": "docker/library/alpine", "tags": ["3.19", "3.20", "latest"]})
    c.exchange("GET", "/v2/docker/library/alpine/tags/list", 200, body=tags, headers={"Content-Type": "application/json; charset=utf-8"})
    c.exchange("GET", f"/v2/docker/library/alpine/blobs/{layer}", 200, blob=(1800, layer),
               headers={"Content-Type": "application/octet-stream", "Docker-Content-Digest": layer})
    return c


def gar() -> Conversation:
    c = Conversation(
        "gar-relative-blob-redirect",
        title="Google Artifact Registry: pull whose blob answers with a relative redirect",
        quirk="the blob GET answers 302 with a relative Location outside the API "
              "(/artifacts-downloads/.../downloads/<signed>); the proxy makes it absolute on the registry's host and "
              "the client fetches it there without credentials; the challenge has a realm and no service",
        sources=[
            "https://github.com/ahmetb/serverless-registry-proxy/issues/8 (302 to /artifacts-downloads/namespaces/<p>/repositories/<r>/downloads/<signed>, fetched without Authorization)",
            "https://github.com/sonatype/nexus-public/issues/1061 (GAR's relative blob Location breaks proxies)",
            "https://github.com/nicholas-fedor/watchtower/pull/1895 (GAR's realm-only /v2/ challenge)",
            "https://cloud.google.com/artifact-registry/docs/docker/authentication (users oauth2accesstoken and _json_key)",
        ],
        registry="https://us-docker.pkg.dev", connector=("ml", "gar"), form="host",
        credentials="basic", challenge="bearer", realm="https://us-docker.pkg.dev/v2/token", service="",
        user_agent="containerd/1.7.13",
    )
    c.probe('Bearer realm="https://us-docker.pkg.dev/v2/token"')
    c.token(["repository:my-project/my-repo/app:pull"], {"token": REDACTED, "expires_in": 3600})
    _config, manifest, layer = image(2600, {})
    md = digest_of(manifest)
    c.exchange("GET", "/v2/my-project/my-repo/app/manifests/1.0", 200, body=manifest, request_headers={"Accept": ACCEPT_MANIFESTS},
               headers={"Content-Type": MT_MANIFEST, "Docker-Content-Digest": md})
    download = "/artifacts-downloads/namespaces/my-project/repositories/my-repo/downloads/EXAMPLE-SIGNED-DOWNLOAD-TOKEN"
    c.exchange("GET", f"/v2/my-project/my-repo/app/blobs/{layer}", 302, body=b"", location=download,
               headers={"Content-Type": "text/html; charset=UTF-8", "Content-Length": "0"})
    c.direct("https://us-docker.pkg.dev" + download, 2600, layer)
    return c


def s3_redirect() -> Conversation:
    c = Conversation(
        "distribution-s3-redirect",
        title="CNCF distribution on S3: blob download redirected to a presigned S3 URL",
        quirk="GET blob answers 307 to the bucket; the client follows it itself and the storage host never "
              "sees the registry's credentials (nor the proxy); the token realm is another host of the same domain",
        sources=[
            "https://distribution.github.io/distribution/about/configuration/#redirect (storage redirects are on by default)",
            "https://github.com/distribution/distribution/issues/2313 (registry answering 307 to S3)",
            "https://github.com/cloudfoundry-community/docker-registry-boshrelease/pull/15 (clients go to the bucket directly)",
        ],
        registry="https://registry.example.com", connector=("default", "s3reg"), form="path",
        credentials="basic", challenge="bearer", realm="https://auth.example.com/token", service="registry.example.com",
        user_agent="skopeo/1.9.3",
    )
    c.probe('Bearer realm="https://auth.example.com/token",service="registry.example.com"')
    c.token(["repository:team/app:pull"], {"token": REDACTED, "expires_in": 300})
    c.ping(authenticated=False)
    _config, manifest, layer = image(5000, {})
    md = digest_of(manifest)
    c.exchange("GET", "/v2/team/app/manifests/v1", 200, body=manifest, request_headers={"Accept": ACCEPT_MANIFESTS},
               headers={"Content-Type": MT_MANIFEST, "Docker-Content-Digest": md})
    c.exchange("HEAD", f"/v2/team/app/blobs/{layer}", 200, body=b"", blob=(5000, layer),
               headers={"Content-Type": "application/octet-stream", "Docker-Content-Digest": layer})
    s3 = (f"https://example-registry-bucket.s3.us-east-1.amazonaws.com/docker/registry/v2/blobs/sha256/{layer[7:9]}/{layer[7:]}/data"
          "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=EXAMPLE%2F20260101%2Fus-east-1%2Fs3%2Faws4_request"
          "&X-Amz-Date=20260101T000000Z&X-Amz-Expires=1200&X-Amz-SignedHeaders=host&X-Amz-Signature=EXAMPLE")
    c.exchange("GET", f"/v2/team/app/blobs/{layer}", 307, body=b"", location=s3,
               headers={"Content-Type": "application/octet-stream", "Docker-Content-Digest": layer, "Content-Length": "0"})
    c.direct(s3, 5000, layer, headers={"ETag": '"EXAMPLEetag"', "x-amz-request-id": "EXAMPLE0000000000"})
    return c


CONVERSATIONS = [harbor, dockerhub, ghcr, quay, ecr, ecr_public, gar, s3_redirect]


def build(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return [make().write(directory) for make in CONVERSATIONS]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare with tests/flows/handbuilt/ instead of writing")
    p.add_argument("--out", type=Path, default=OUT)
    ns = p.parse_args(argv)
    if ns.check:
        with tempfile.TemporaryDirectory() as tmp:
            stale = [path.name for path in build(Path(tmp))
                     if not (ns.out / path.name).exists() or (ns.out / path.name).read_bytes() != path.read_bytes()]
        if stale:
            print(f"out of date (run scripts/build_flows.py): {', '.join(stale)}", file=sys.stderr)
            return 1
        return 0
    for path in build(ns.out):
        print(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
