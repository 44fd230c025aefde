"""In-cluster addresses, in one place: the host form of a connector and the proxy Service's name.

`c-<name>.<namespace>.svc.<cluster domain>` (and its shorter spellings) is how workloads address a
connector in host form; the cluster domain is `cluster.local` unless the cluster says otherwise
(`--cluster-domain`). Routing, client configuration and the status writer all build and parse
these names here.
"""

from __future__ import annotations

import functools
import re

DEFAULT_CLUSTER_DOMAIN = "cluster.local"
LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_LABEL_RE = re.compile(rf"{LABEL}\Z")
_DOMAIN_RE = re.compile(rf"{LABEL}(?:\.{LABEL})*\Z")


def valid_cluster_domain(domain: str) -> bool:
    return bool(_DOMAIN_RE.match(domain)) and len(domain) <= 253


def service_host(service: str, namespace: str, cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> str:
    """`<service>.<namespace>.svc.<cluster domain>`."""
    return f"{service}.{namespace}.svc.{cluster_domain}"


def host_form_host(name: str, namespace: str, cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> str | None:
    """`c-<name>.<ns>.svc.<cluster domain>`, or None when `c-<name>` is no single DNS label."""
    label = f"c-{name}"
    if not _LABEL_RE.match(label) or not _LABEL_RE.match(namespace):
        return None
    return service_host(label, namespace, cluster_domain)


@functools.lru_cache(maxsize=8)
def _host_form_re(cluster_domain: str) -> re.Pattern[str]:
    domain = re.escape(cluster_domain)
    return re.compile(
        rf"c-(?P<name>{LABEL})\.(?P<namespace>{LABEL})(?:\.svc(?:\.{domain})?)?\.?(?::[0-9]{{1,5}})?\Z"
    )


def parse_host_form(host: str | None, cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> tuple[str, str] | None:
    """`c-harbor.default.svc.cluster.local:80` (or `.svc`, or no suffix, any port) -> ("default", "harbor")."""
    if not host:
        return None
    m = _host_form_re(cluster_domain).match(host.lower())
    return (m.group("namespace"), m.group("name")) if m else None
