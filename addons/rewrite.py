"""Streaming, and the upstream's URLs turned back into the proxy's.

Bodies stream in both directions: mitmproxy would otherwise buffer a 512 MiB layer in memory
(1-2.6 GiB). Upload-session `Location` headers and pagination `Link` headers name the registry;
they are rewritten to the proxy origin the client used (so the host form keeps working and
containerd keeps its credentials), with the path-form prefix put back. Locations on other hosts
(a blob's 307 to object storage) are left alone: the client goes there directly, and it never
gets the registry's credentials.
"""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit, urlunsplit

from mitmproxy import http

from addons.gate import fail_closed
from addons.routing import Route
from connector_store.model import Address, parse_address

_LINK_TARGET_RE = re.compile(r"<([^<>]*)>")  # [^<>]: no quadratic backtracking on "<<<<..."


def rewrite_url(url: str, request_url: str, upstream: Address, route: Route) -> str:
    """Map a URL the registry sent to the proxy's address for it; foreign hosts are kept as they are.

    Never raises: a URL that cannot be parsed (`http://[::1`) is not the registry's, and is kept.
    """
    try:
        absolute = urlsplit(urljoin(request_url, url))
        target = parse_address(f"{absolute.scheme}://{absolute.netloc}")
    except ValueError:
        return url
    if (target.scheme, target.host, target.port) != (upstream.scheme, upstream.host, upstream.port):
        return url
    path = absolute.path
    if upstream.path_prefix and path.startswith(upstream.path_prefix + "/"):
        path = path[len(upstream.path_prefix):]
    if path != "/v2" and not path.startswith("/v2/"):
        # The registry's host, outside its API (Artifact Registry's relative
        # /artifacts-downloads/... blob redirect, a signed URL): no proxy route serves it,
        # so the client follows it to the registry itself, as it does a storage redirect.
        return urlunsplit(absolute)
    if route.prefix and path.startswith("/v2/"):
        path = f"/v2/{route.prefix}/{path[len('/v2/'):]}"
    origin = urlsplit(route.origin)
    return urlunsplit((origin.scheme, origin.netloc, path, absolute.query, absolute.fragment))


def rewrite_link(value: str, request_url: str, upstream: Address, route: Route) -> str:
    """`</v2/a/tags/list?last=x&n=2>; rel="next"` with every target rewritten."""
    return _LINK_TARGET_RE.sub(lambda m: f"<{rewrite_url(m.group(1), request_url, upstream, route)}>", value)


SMALL_BODY = 1024 * 1024  # manifests, indexes, tag lists, errors: kept whole (and recorded with -w)
UPSTREAM_HEADERS_KEY = "connector_proxy_upstream_headers"  # flow.metadata: Location/Link before rewriting
BLOB_KEY = "connector_proxy_blob"
HOLD_KEY = "connector_proxy_policy"  # the policy addon's metadata: {"hold": True} keeps a body whole  # flow.metadata: size and digest of a streamed body (recordings keep no blob)


def is_small_document(headers, max_size: int = SMALL_BODY) -> bool:
    """A body that is worth keeping on the flow: a known, small size (blobs are neither)."""
    length = headers.get("content-length", "")
    return length.isascii() and length.isdigit() and int(length) <= max_size


def stream_request(flow: http.HTTPFlow) -> bool:
    """Stream every upload except a small manifest (its body is what a recording wants to show)."""
    route = Route.of(flow)
    small_manifest = (
        flow.request.method == "PUT" and route is not None and "/manifests/" in route.path
        and is_small_document(flow.request.headers)
    )
    return not small_manifest


def stream_response(flow: http.HTTPFlow) -> bool:
    """Stream every body unless it is a small document (manifests, tag lists, JSON errors), which is
    kept whole so recordings show it. A 401 is the upstream addon's to answer (it keeps small ones
    and replaces large ones without reading them)."""
    assert flow.response is not None
    if flow.response.status_code == 401:
        return False
    if flow.metadata.get(HOLD_KEY, {}).get("hold"):
        return False  # the policy addon filters it (a catalog), bounded by its own cap
    if flow.response.status_code >= 400:
        return not is_small_document(flow.response.headers)
    route = Route.of(flow)
    is_blob = route is not None and "/blobs/" in route.path
    return is_blob or not is_small_document(flow.response.headers)


def rewrite_response_headers(flow: http.HTTPFlow) -> None:
    """Location and Link of a registry response, back to the proxy origin the client used."""
    assert flow.response is not None
    headers = flow.response.headers
    if "location" not in headers and "link" not in headers:
        return  # most answers (manifests, blobs, HEADs): nothing to rewrite, nothing to parse
    route = Route.of(flow)
    assert route is not None
    upstream = parse_address(route.upstream)
    request_url = flow.request.url
    original: dict[str, object] = {}
    if "location" in headers:
        original["location"] = headers["location"]
        headers["Location"] = rewrite_url(headers["location"], request_url, upstream, route)
    if "link" in headers:
        original["link"] = headers.get_all("link")
        headers.set_all("Link", [rewrite_link(v, request_url, upstream, route) for v in headers.get_all("link")])
    if original:  # what the registry said, for debugging and for replaying recordings
        flow.metadata[UPSTREAM_HEADERS_KEY] = original


class Rewrite:
    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not flow.response and Route.of(flow) and stream_request(flow):
            flow.request.stream = True

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        route = Route.of(flow)
        if route is None or not route.upstream or flow.response is None:
            return
        rewrite_response_headers(flow)
        headers = flow.response.headers
        if stream_response(flow):
            flow.response.stream = True
            length = headers.get("content-length", "")
            flow.metadata[BLOB_KEY] = {
                "size": int(length) if length.isascii() and length.isdigit() else None,
                "digest": headers.get("docker-content-digest"),
            }
