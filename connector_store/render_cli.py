"""`connector-proxy config render`: client configuration files for a workload, from its own token.

    connector-proxy config render (--connectors DIR | --store kubernetes [--kubeconfig PATH])
        --use default/harbor[,team/other] --names registry-config,buildkitd --token-file FILE
        [--proxy-url http://HOST:PORT] [--forward-proxy HOST:PORT] [--ca-file PEM] --out DIR [--watch]

With `--watch` the files are rendered again whenever the token file (a projected ServiceAccount
token rotates) or the connectors change, and files no longer rendered are removed.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from pathlib import Path

from connector_store.cli_args import add_cluster_domain, add_source_arguments
from connector_store.files import DirectoryStore
from connector_store.model import Connector, ManifestError, NAME_RE, NAMESPACE_RE, parse_connector
from connector_store.render import RenderError, RenderRequest, render, write_files

logger = logging.getLogger("connector-proxy.render")
WATCH_INTERVAL = 0.25  # seconds between checks of the token file; a rotation is seen well within 2 s


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The `config render` flags; on `p` when given (the launcher's subcommand), else a parser of its own."""
    if p is None:
        p = argparse.ArgumentParser(prog="connector-proxy config render", description=__doc__.split("\n\n")[0])
    add_source_arguments(p)
    add_cluster_domain(p)
    p.add_argument("--use", required=True, metavar="NS/NAME[,NS/NAME]", help="the connectors to configure")
    p.add_argument("--names", default="", help="configuration.names, e.g. registry-config,buildkitd,!ca.crt")
    p.add_argument("--token-file", required=True, type=Path, help="the workload's token (e.g. a projected SA token)")
    p.add_argument("--proxy-url", help="base URL workloads use to reach the proxy (path form); default: host form")
    p.add_argument("--forward-proxy", metavar="HOST:PORT", help="the forward proxy listener, for .env and *.proxy")
    p.add_argument("--ca-file", type=Path, help="the forward proxy's CA certificate, for ca.crt")
    p.add_argument("--out", required=True, type=Path, help="directory to write the files into")
    p.add_argument("--mode", default="0600", help="file mode (octal), e.g. 0644 when containers run as other users")
    p.add_argument("--watch", action="store_true", help="keep running and re-render when inputs change")
    return p


def parse_use(value: str) -> list[tuple[str, str]]:
    refs = []
    for item in value.split(","):
        ns, sep, name = item.strip().partition("/")
        if not sep or not NAMESPACE_RE.match(ns) or not NAME_RE.match(name):
            raise RenderError(f"--use: {item.strip()!r} is not <namespace>/<name>")
        refs.append((ns, name))
    if not refs:
        raise RenderError("--use names no connector")
    return refs


class ConnectorSource:
    """The connectors named by --use, from a directory or from the cluster (GET, no Secret access needed)."""

    def __init__(self, args: argparse.Namespace):
        self.refs = parse_use(args.use)
        self.directory = DirectoryStore(args.connectors) if args.connectors else None
        self.custom = None
        if args.store:
            from kubernetes import client

            from connector_store.kube import api_client

            self.custom = client.CustomObjectsApi(api_client(args.kubeconfig))

    def connectors(self) -> list[Connector]:
        if self.directory is not None:
            self.directory.refresh()
            found = [self.directory.catalog.get(ns, name) for ns, name in self.refs]
        else:
            found = [self._get(ns, name) for ns, name in self.refs]
        missing = [f"{ns}/{name}" for (ns, name), c in zip(self.refs, found) if c is None]
        if missing:
            raise RenderError(f"connector(s) not found: {', '.join(missing)}")
        return found  # type: ignore[return-value]

    def signature(self) -> tuple:
        if self.directory is None:
            return ()
        try:
            return self.directory.signature()
        except OSError:
            return ()

    def _get(self, ns: str, name: str) -> Connector | None:
        from kubernetes.client.rest import ApiException

        from connector_store.kube import CONNECTOR_PLURAL, CONNECTOR_VERSION
        from connector_store.model import CONNECTOR_API_GROUP

        try:
            obj = self.custom.get_namespaced_custom_object(CONNECTOR_API_GROUP, CONNECTOR_VERSION, ns, CONNECTOR_PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise RenderError(f"reading connector {ns}/{name}: {e.status} {e.reason}") from None
        try:
            return parse_connector(obj, {})  # the renderer needs names and class only, never the Secret
        except ManifestError as e:
            raise RenderError(str(e)) from None


def render_once(args: argparse.Namespace, source: ConnectorSource, previous: set[str]) -> tuple[set[str], tuple]:
    """Render from the inputs as they are now; returns the files written and the fingerprint of
    exactly the inputs used (the token bytes read, the connectors' signature taken before reading
    them), so a rotation that lands during a render is seen by the next check."""
    signature = source.signature()
    token_bytes = args.token_file.read_bytes()
    ca_pem = args.ca_file.read_text() if args.ca_file else None
    files = render(RenderRequest(source.connectors(), token_bytes.decode(), args.names, args.proxy_url,
                                 args.forward_proxy, ca_pem, args.cluster_domain))
    written = set(write_files(args.out, files, mode=int(args.mode, 8)))
    for stale in previous - written:
        (args.out / stale).unlink(missing_ok=True)
    logger.info("rendered %s into %s", ", ".join(sorted(written)), args.out)
    return written, (hashlib.sha256(token_bytes).hexdigest(), signature)


def _fingerprint(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args is None:
        args = build_parser().parse_args(argv)
    try:
        source = ConnectorSource(args)
        written, seen = render_once(args, source, set())
    except (RenderError, OSError, UnicodeDecodeError) as e:
        print(f"connector-proxy config render: {e}", file=sys.stderr)
        return 2
    if not args.watch:
        return 0
    try:
        while True:
            time.sleep(WATCH_INTERVAL)  # polling the inputs: a projected token is swapped by symlink
            current = (_fingerprint(args.token_file), source.signature())
            if current == seen:
                continue
            try:
                written, seen = render_once(args, source, written)
            except (RenderError, OSError, UnicodeDecodeError) as e:
                logger.error("not re-rendered: %s", e)  # keep the last good files
                seen = current
    except KeyboardInterrupt:
        return 0
