"""The embedded default: a local registry with token auth, its token server, and the proxy in front.

Started by `scripts/run-local` (which sets up first). State lives in `.local/` and is kept between
runs, so pushed images survive a restart. Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from localregistry import Registry, TokenServer, make_oci_layout  # noqa: E402

EXAMPLES = REPO / "manifests" / "examples" / "local"
EXAMPLE_ADDRESS = "http://127.0.0.1:5000"


def write_connectors(target: Path, registry_url: str) -> None:
    """Copy the example manifests, pointing them at the registry actually started."""
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("*.yaml"):
        old.unlink()
    for src in sorted(EXAMPLES.glob("*.yaml")):
        docs = list(yaml.safe_load_all(src.read_text()))
        for doc in docs:
            if doc and doc.get("kind") == "Connector" and doc["spec"].get("address") == EXAMPLE_ADDRESS:
                doc["spec"]["address"] = registry_url
        (target / src.name).write_text(yaml.safe_dump_all(docs, allow_unicode=True))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--registry-port", type=int, default=5000)
    p.add_argument("--token-port", type=int, default=5001)
    p.add_argument("--listen", default="127.0.0.1:8080", help="proxy listen address")
    p.add_argument("--web", action="store_true", help="run mitmweb (web UI on 127.0.0.1:8081)")
    p.add_argument("--workdir", type=Path, default=REPO / ".local")
    p.add_argument("mitmproxy_options", nargs="*", metavar="-- --set NAME=VALUE",
                   help="passed on to the proxy's mitmproxy, e.g. -- --set upstream_pool=false")
    args = p.parse_args()

    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    token_file = work / "client-token"
    if not token_file.exists():
        token_file.write_text(secrets.token_urlsafe(24))
        token_file.chmod(0o600)
    client_token = token_file.read_text().strip()
    (work / "client-tokens.yaml").write_text(yaml.safe_dump({"tokens": [
        {"token": client_token, "subject": "local:demo", "connectors": ["*"]},
    ]}))

    ts = TokenServer("localregistry", {"admin": "admin"}, port=args.token_port).start()
    registry = Registry(work / "registry", "token", token_server=ts, port=args.registry_port).start()
    write_connectors(work / "connectors", registry.url)
    image = make_oci_layout(work / "example-image", [b"hello from the OCI connector proxy\n", 64 * 1024],
                            tag="v1", labels={"org.example.demo": "true"})

    cmd = [sys.executable, "-m", "connector_store.cli", "--connectors", str(work / "connectors"),
           "--client-tokens", str(work / "client-tokens.yaml"), "--listen", args.listen]
    if args.web:
        cmd.append("--web")
    if args.mitmproxy_options:
        cmd += ["--", *args.mitmproxy_options]
    proxy = subprocess.Popen(cmd, cwd=REPO)
    host = args.listen
    repo_base = f"{host}/namespaces/default/connectors/harbor"
    storage = "--root .local/buildah --runroot .local/buildah-run --storage-driver vfs"
    print(f"""
Registry (token auth, admin/admin): {registry.url}   token server: {ts.realm}
Proxy: http://{host}   connectors: {work / 'connectors'}   client token: {token_file}
{"mitmweb: http://127.0.0.1:8081" if args.web else ""}
Push and pull through the proxy with nothing but the client token:

  TOKEN=$(cat {token_file.relative_to(REPO) if token_file.is_relative_to(REPO) else token_file})
  skopeo copy --dest-creds demo:$TOKEN --dest-tls-verify=false \\
      oci:{image.layout_dir}:v1 docker://{repo_base}/test/abc:v1
  skopeo inspect --creds demo:$TOKEN --tls-verify=false docker://{repo_base}/test/abc:v1

  buildah {storage} bud --isolation chroot -t localhost/seed:v1 {EXAMPLES.relative_to(REPO)}
  buildah {storage} push --creds demo:$TOKEN --tls-verify=false \\
      localhost/seed:v1 docker://{repo_base}/test/test-cjt:v1

Host form (what in-cluster workloads use): Host c-harbor.default.svc.cluster.local, e.g.
  curl -u demo:$TOKEN -H 'Host: c-harbor.default.svc.cluster.local' http://{host}/v2/test/abc/tags/list
Ctrl-C stops the proxy, the registry and the token server.
""", flush=True)
    try:
        return proxy.wait()
    except KeyboardInterrupt:
        proxy.send_signal(signal.SIGINT)
        return proxy.wait()
    finally:
        registry.stop()
        ts.stop()
        shutil.rmtree(work / "buildah-run", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
