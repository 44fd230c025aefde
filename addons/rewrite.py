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

from addons.routing import Route
from connector_store.model import Address, parse_address

_LINK_TARGET_RE = re.compile(r"<([^>]*)>")


def rewrite_url(url: str, request_url: str, upstream: Address, route: Route) -> str:
    """Map a URL the registry sent to the proxy's address for it; foreign hosts are kept as they are."""
    absolute = urlsplit(urljoin(request_url, url))
    try:
        target = parse_address(f"{absolute.scheme}://{absolute.netloc}")
    except ValueError:
        return url
    if (target.scheme, target.host, target.port) != (upstream.scheme, upstream.host, upstream.port):
        return url
    path = absolute.path
    if upstream.path_prefix and path.startswith(upstream.path_prefix + "/"):
        path = path[len(upstream.path_prefix):]
    if route.prefix and path.startswith("/v2/"):
        path = f"/v2/{route.prefix}/{path[len('/v2/'):]}"
    origin = urlsplit(route.origin)
    return urlunsplit((origin.scheme, origin.netloc, path, absolute.query, absolute.fragment))


def rewrite_link(value: str, request_url: str, upstream: Address, route: Route) -> str:
    """`</v2/a/tags/list?last=x&n=2>; rel="next"` with every target rewritten."""
    return _LINK_TARGET_RE.sub(lambda m: f"<{rewrite_url(m.group(1), request_url, upstream, route)}>", value)


class Rewrite:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not flow.response and Route.of(flow):
            flow.request.stream = True

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        route = Route.of(flow)
        if route is None or not route.upstream or flow.response is None:
            return
        upstream = parse_address(route.upstream)
        request_url = flow.request.url
        headers = flow.response.headers
        if "location" in headers:
            headers["Location"] = rewrite_url(headers["location"], request_url, upstream, route)
        if "link" in headers:
            headers.set_all("Link", [rewrite_link(v, request_url, upstream, route) for v in headers.get_all("link")])
        # Error bodies are small JSON: keep them whole (the upstream addon may need to replace a 401).
        if flow.response.status_code < 400:
            flow.response.stream = True
