"""The command-line flags `connector-proxy serve` and `connector-proxy config render` share, in one place."""

from __future__ import annotations

import argparse

from connector_store.addresses import DEFAULT_CLUSTER_DOMAIN, valid_cluster_domain


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """Where connectors come from: the same flags for the proxy and for `config render`."""
    store = p.add_mutually_exclusive_group(required=True)
    store.add_argument("--connectors", metavar="DIR", help="directory of Connector and Secret manifests")
    store.add_argument("--store", choices=["kubernetes"], help="read the Connectors from the cluster")
    p.add_argument("--kubeconfig", metavar="PATH", help="kubeconfig (default: in-cluster configuration)")


def cluster_domain(value: str) -> str:
    if not valid_cluster_domain(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a DNS domain")
    return value


def add_cluster_domain(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster-domain", type=cluster_domain, default=DEFAULT_CLUSTER_DOMAIN, metavar="DOMAIN",
                   help=f"the cluster's DNS domain, for host-form names c-<name>.<ns>.svc.DOMAIN (default {DEFAULT_CLUSTER_DOMAIN})")
