"""`connector-proxy`: the proxy (`serve`) and client configuration (`config render`).

    connector-proxy [serve] (--connectors DIR | --store kubernetes [--kubeconfig PATH] [--namespace NS]...)
                    (--client-tokens FILE | --client-auth kubernetes [--token-audience AUD] [--proxy-permissions])
                    --listen HOST:PORT [--cluster-domain DOMAIN] [--web] [-- extra mitmproxy args]
    connector-proxy config render ...   (see render_cli.py)

`serve` is the default: a bare flag list, as the manifests give it, runs the proxy.

The proxy launcher assembles a mitmproxy command line and runs mitmdump (or mitmweb) with the addon
chain added to its master: everything it sets can be set by hand with
`mitmdump -s addons/connector_proxy.py --set ...` (see the README).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from connector_store import render_cli
from connector_store.cli_args import add_cluster_domain, add_source_arguments, parse_listen

# Reverse mode needs an upstream; every routed request is retargeted to its connector, and the gate
# refuses anything else, so this is never contacted. It is named for what it is (it shows in the
# startup line and in the flow lines of answers the proxy makes itself), and `.invalid` never
# resolves (RFC 2606), should anything ever try.
PLACEHOLDER_UPSTREAM = "http://connector-proxy.invalid"


COMMANDS = ("serve", "config")


def build_parser() -> argparse.ArgumentParser:
    """`connector-proxy serve ...` and `connector-proxy config render ...` (a bare flag list means serve)."""
    p = argparse.ArgumentParser(prog="connector-proxy", description=__doc__.split("\n\n")[0])
    commands = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser("serve", help="run the proxy: mitmdump, or mitmweb with --web",
                                description="Run the proxy (mitmdump, or mitmweb with --web) with its addon chain.")
    add_serve_arguments(serve)
    config = commands.add_parser("config", help="client configuration for workloads")
    config_commands = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    render = config_commands.add_parser("render", help="render config.json, buildkitd.toml, .env ... for a workload",
                                        description=render_cli.__doc__.split("\n\n")[0])
    render_cli.build_parser(render)
    return p


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    add_source_arguments(p)
    add_cluster_domain(p)
    p.add_argument("--namespace", action="append", default=[], metavar="NS",
                   help="watch only this namespace (repeatable; default: all)")
    auth = p.add_mutually_exclusive_group(required=True)
    auth.add_argument("--client-tokens", metavar="FILE", help="static client token file (YAML)")
    auth.add_argument("--client-auth", choices=["kubernetes"],
                      help="ServiceAccount tokens: TokenReview, then SubjectAccessReview on the connector")
    p.add_argument("--token-audience", action="append", default=[], metavar="AUD",
                   help="TokenReview audience (repeatable; default: the API server's)")
    p.add_argument("--proxy-permissions", action="store_true",
                   help="also require the connectors/proxy subresource")
    p.add_argument("--no-status", action="store_true", help="with --store kubernetes: do not write Connector status")
    p.add_argument("--external-url", default="", metavar="URL",
                   help="base URL of the proxy outside the cluster (NodePort, Ingress) for status addresses")
    p.add_argument("--listen", type=parse_listen, default=("127.0.0.1", 8080), metavar="HOST:PORT")
    p.add_argument("--forward-listen", type=parse_listen, metavar="HOST:PORT",
                   help="also serve forward-proxy mode (HTTPS_PROXY) on this address")
    p.add_argument("--ca-dir", metavar="DIR", help="the forward proxy's CA (mitmproxy-ca.pem layout); generated when absent")
    p.add_argument("--forward-address", metavar="HOST:PORT",
                   help="the forward proxy as workloads reach it, for rendered .env/*.proxy (default: --forward-listen)")
    p.add_argument("--refuse-unknown-hosts", action="store_true",
                   help="forward mode: refuse destinations that are no connector's address instead of tunnelling them")
    p.add_argument("--audit-log", metavar="FILE", help="one JSON line per client request to FILE ('-': stdout)")
    p.add_argument("--web", action="store_true", help="run mitmweb (the interactive debugger) instead of mitmdump")
    p.add_argument("--flow-detail", type=int, default=1, help="mitmdump flow log detail (0-4, default 1: one line per request)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: extra mitmproxy arguments")


def ensure_ca(directory: str | Path) -> Path:
    """The forward proxy's CA, before any listener accepts: mitmproxy's files plus `ca.crt`.

    An operator's CA (e.g. a mounted Secret holding mitmproxy-ca.pem) is used as it is; otherwise
    mitmproxy generates one. `ca.crt` is the certificate alone, what clients are given to trust.
    A read-only directory (a Secret volume) is copied to a private temporary one first, because
    mitmproxy writes derived files (.p12, dhparam) next to the CA.
    """
    from mitmproxy import certs

    path = Path(directory).resolve()
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK):
        private = Path(tempfile.mkdtemp(prefix="connector-proxy-ca-"))
        for pem in path.glob("*.pem"):
            shutil.copyfile(pem, private / pem.name)
        path = private
    store = certs.CertStore.from_store(path, "mitmproxy", 2048)
    cert = store.default_ca.to_pem()  # a Secret may hold only mitmproxy-ca.pem (key and certificate)
    for name in ("mitmproxy-ca-cert.pem", "ca.crt"):
        target = path / name
        if not target.exists() or target.read_bytes() != cert:
            target.write_bytes(cert)
    return path


def mitmproxy_args(ns: argparse.Namespace) -> list[str]:
    host, port = ns.listen
    args = [
        "--mode", f"reverse:{PLACEHOLDER_UPSTREAM}@{host}:{port}" if host else f"reverse:{PLACEHOLDER_UPSTREAM}@{port}",
        "--set", "keep_host_header=true",
        "--set", "connection_strategy=lazy",
    ]
    if ns.connectors:
        args += ["--set", f"connectors_dir={Path(ns.connectors).resolve()}"]
    else:
        args += ["--set", "connectors_store=kubernetes", "--set", f"status_writer={str(not ns.no_status).lower()}"]
        if ns.namespace:
            args += ["--set", f"connectors_namespaces={','.join(ns.namespace)}"]
    if ns.kubeconfig:
        args += ["--set", f"kubeconfig={Path(ns.kubeconfig).resolve()}"]
    if ns.cluster_domain:
        args += ["--set", f"cluster_domain={ns.cluster_domain}"]
    if ns.audit_log:
        args += ["--set", f"audit_log={ns.audit_log if ns.audit_log == '-' else Path(ns.audit_log).resolve()}"]
    if ns.external_url:
        args += ["--set", f"external_url={ns.external_url}"]
    if ns.client_tokens:
        args += ["--set", f"client_tokens={Path(ns.client_tokens).resolve()}"]
    else:
        args += ["--set", "client_auth=kubernetes"]
        if ns.token_audience:
            args += ["--set", f"token_audiences={','.join(ns.token_audience)}"]
        if ns.proxy_permissions:
            args += ["--set", "proxy_permissions=true"]
    if ns.forward_listen:
        fhost, fport = ns.forward_listen
        args += ["--mode", f"regular@{fhost}:{fport}"]
        ca_dir = ensure_ca(ns.ca_dir or Path.home() / ".connector-proxy" / "ca")
        args += ["--set", f"confdir={ca_dir}", "--set", f"forward_ca_cert={ca_dir / 'ca.crt'}",
                 "--set", f"forward_address={ns.forward_address or f'{fhost}:{fport}'}"]
        if ns.refuse_unknown_hosts:
            args += ["--set", "forward_refuse_unknown=true"]
    elif ns.ca_dir:
        args += ["--set", f"confdir={ensure_ca(ns.ca_dir)}"]
    if ns.web:
        args += ["--set", "web_open_browser=false"]
    else:
        args += ["--set", f"flow_detail={ns.flow_detail}"]
    extra = list(ns.extra)
    if extra and extra[0] == "--":
        extra = extra[1:]
    return args + extra


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "serve")  # `connector-proxy --store=...`, as the manifests have always said
    ns = build_parser().parse_args(argv)
    if ns.command == "config":
        return render_cli.main(args=ns)
    run_mitmproxy(mitmproxy_args(ns), web=ns.web)
    return 0


# What the proxy uses of mitmdump's built-in addons (by class name). Every other built-in addon's
# options are still registered, so the command line and `--set` accept them, but the addon is not in
# the chain: each one is called for every event of every request (about 36 of them, 8 events).
LEAN_ADDONS = {
    "TermLog", "Core", "Proxyserver", "ScriptLoader", "NextLayer", "TlsConfig", "DisableH2C", "Save",
    "Dumper", "KeepServing", "ErrorCheck",
}


def _lean_master_class():
    from mitmproxy import addonmanager, addons, master
    from mitmproxy.addons import dumper, errorcheck, keepserving, readfile

    class LeanDumpMaster(master.Master):
        """mitmdump with only the built-in addons the proxy needs (see LEAN_ADDONS)."""

        def __init__(self, options, loop=None):
            super().__init__(options, event_loop=loop, with_termlog=True)
            everything = [*addons.default_addons(), dumper.Dumper(), keepserving.KeepServing(),
                          readfile.ReadFileStdin(), errorcheck.ErrorCheck()]
            loader = addonmanager.Loader(self)
            for addon in everything:
                if type(addon).__name__ in LEAN_ADDONS:
                    self.addons.add(addon)
                elif hasattr(addon, "load"):
                    addon.load(loader)  # its options only

    return LeanDumpMaster


def run_mitmproxy(args: list[str], web: bool) -> None:
    """mitmdump (or mitmweb) with our addon chain added to its master, not loaded as a script.

    A `-s` script is watched and reloaded when its file changes, and a reload that fails leaves the
    proxy running with none of our addons (every request relayed unchecked). Added to the master,
    the chain is fixed for the life of the process.
    """
    from mitmproxy.tools import cmdline
    from mitmproxy.tools import main as mitm

    if web:
        from mitmproxy.tools.web.master import WebMaster as base
        make_parser = cmdline.mitmweb
    else:
        base = _lean_master_class()
        make_parser = cmdline.mitmdump

    class ConnectorProxyMaster(base):  # type: ignore[misc, valid-type]
        def __init__(self, options, *a, **kw):
            super().__init__(options, *a, **kw)
            from addons.chain import AddonChain

            ours = AddonChain()
            self.addons.add(ours)
            # Where a -s script would sit (right after the script loader): before mitmproxy's
            # next_layer, and before the addons that record or show flows (save, dumper, the web
            # view), which must only ever see what the scrub addon left.
            chain = self.addons.chain
            chain.remove(ours)
            chain.insert(chain.index(self.addons.get("scriptloader")) + 1, ours)
            # What the script loader does for a script's addons: one configure with every option
            # (defaults included); the command line's options follow as updates.
            from mitmproxy import hooks

            for addon in ours.addons:
                self.addons.invoke_addon_sync(addon, hooks.ConfigureHook(set(self.options.keys())))

    def extra(parsed):  # mitmdump's own: a filter expression applies to saving and dumping
        if getattr(parsed, "filter_args", None):
            v = " ".join(parsed.filter_args)
            return dict(save_stream_filter=v, readfile_filter=v, dumper_filter=v)
        return {}

    mitm.run(ConnectorProxyMaster, make_parser, args, extra if not web else None)


if __name__ == "__main__":
    sys.exit(main())
