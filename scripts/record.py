"""Record a registry session through the proxy into a scrubbed flow file, ready to replay as a test.

    scripts/record --out tests/flows/recorded/NAME.mitm [--local token|htpasswd]
                   [--registry URL (--user USER --password-file FILE | --anonymous)]
                   [--connector NS/NAME] -- COMMAND [ARG...]

The proxy runs with `-w` (its flows are scrubbed as they are saved: the injected Authorization is
redacted, the client's own credential removed, blob bodies never kept). COMMAND runs with:

    PROXY     the proxy, host:port            REF        $PROXY/namespaces/NS/connectors/NAME
    TOKEN     the client token                IMAGE      a tiny OCI image, `oci:DIR:v1`
    REGISTRY_AUTH_FILE, DOCKER_CONFIG         credentials for $PROXY (skopeo, buildah, podman, docker, crane)
    WORKDIR   a scratch directory (client storage, build contexts)

for example:

    scripts/record --out /tmp/s.mitm -- sh -c \\
        'skopeo copy --dest-tls-verify=false $IMAGE docker://$REF/demo/app:v1'

Afterwards the proxy's own endpoints (/healthz, /readyz, /metrics) are dropped, and the file is
searched for credentials: the connector's password, the client token, every token the local token
server issued, and anything that looks like one (see tests/replay.py). A file with findings is not
written. Without --registry, a local CNCF distribution registry (token auth by default) is started
with random credentials.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import yaml  # noqa: E402

from localregistry import Layer, Registry, TokenServer, make_oci_layout  # noqa: E402
from proxyproc import ProxyProcess, connector, secret, write_manifests  # noqa: E402
from replay import ROUTE_KEY, read_flows, scan_flow_file, write_flows  # noqa: E402

OWN_ENDPOINTS = ("/healthz", "/readyz", "/metrics")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/record", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the flow file to write (.mitm)")
    p.add_argument("--local", choices=["token", "htpasswd"], default="token",
                   help="auth of the local registry started when --registry is not given (default: token)")
    p.add_argument("--registry", help="a live registry address, e.g. https://harbor.example.com")
    p.add_argument("--user", default="", help="registry user (with --registry)")
    p.add_argument("--password-file", type=Path, help="file holding the registry password or token")
    p.add_argument("--anonymous", action="store_true", help="no Secret: anonymous tokens (public images)")
    p.add_argument("--connector", default="default/registry", help="NS/NAME of the connector (default: default/registry)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (proxy log, raw flows)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="after --: the client command to record")
    ns = p.parse_args(argv)
    if ns.command[:1] == ["--"]:
        ns.command = ns.command[1:]
    if not ns.command:
        p.error("give the client command after --")
    if ns.registry and not ns.anonymous and not ns.password_file:
        p.error("--registry needs --password-file (or --anonymous)")
    if "/" not in ns.connector:
        p.error("--connector is NS/NAME")
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(sys.argv[1:] if argv is None else argv)
    namespace, name = ns.connector.split("/", 1)
    work = Path(tempfile.mkdtemp(prefix="rec-"))  # short: podman's runroot must stay under 50 chars
    started: list = []
    known: list[str] = []
    known_basic: list[tuple[str, str]] = []
    token_server: TokenServer | None = None
    try:
        # ---- the registry and the connector
        docs: list[dict] = []
        if ns.registry:
            address = ns.registry
            if not ns.anonymous:
                password = ns.password_file.read_text().strip()
                known.append(password)
                known_basic.append((ns.user, password))
                docs.append(secret(namespace, f"{name}-secret", ns.user, password))
        else:
            user, password = "recorder", "recpw-" + secrets.token_hex(12)
            known.append(password)
            known_basic.append((user, password))
            if ns.local == "token":
                token_server = TokenServer("localregistry", {user: password}).start()
                started.append(token_server)
                registry = Registry(work / "registry", "token", token_server=token_server).start()
            else:
                registry = Registry(work / "registry", "htpasswd", htpasswd_users={user: password}).start()
            started.append(registry)
            address = registry.url
            docs.append(secret(namespace, f"{name}-secret", user, password))
        docs.insert(0, connector(namespace, name, address, f"{name}-secret" if docs else None))
        write_manifests(work / "connectors", "connectors.yaml", docs)

        # ---- the proxy, and the client's view of it
        client_token = "rec-" + secrets.token_hex(16)
        known.append(client_token)
        (work / "tokens.yaml").write_text(yaml.safe_dump({"tokens": [
            {"token": client_token, "subject": "recorder", "connectors": [f"{namespace}/{name}"]},
        ]}))
        # Recorded with the Basic challenge: a replay cannot authenticate at the proxy's token
        # endpoint (the client's credentials are scrubbed from the recording), Basic needs none.
        proxy = ProxyProcess(work, work / "connectors", work / "tokens.yaml",
                             extra=("--set", "client_challenge=basic")).start()
        started.append(proxy)
        auth = {"auths": {proxy.host: {"auth": base64.b64encode(f"recorder:{client_token}".encode()).decode()}}}
        known_basic.append(("recorder", client_token))
        (work / "auth.json").write_text(json.dumps(auth))
        (work / "docker").mkdir()
        (work / "docker" / "config.json").write_text(json.dumps(auth))
        scratch = work / "c"
        scratch.mkdir()
        # One small gzip layer: a recording stays a few kilobytes.
        layer = Layer(content=b"recorded through the OCI connector proxy\n", path="hello.txt")
        image = make_oci_layout(work / "image", [layer], tag="v1", labels={"recorded": "true"})
        env = dict(os.environ, PROXY=proxy.host, TOKEN=client_token, REF=f"{proxy.host}/namespaces/{namespace}/connectors/{name}",
                   IMAGE=image.ref, REGISTRY_AUTH_FILE=str(work / "auth.json"), DOCKER_CONFIG=str(work / "docker"),
                   WORKDIR=str(scratch))

        # ---- the session
        print(f"record: proxy {proxy.host} -> {address}; running {' '.join(ns.command)}", file=sys.stderr)
        rc = subprocess.run(ns.command, env=env, check=False).returncode
        proxy.stop()
        started.remove(proxy)
        if token_server is not None:
            known.extend(token_server.issued_tokens)

        # ---- keep what a replay needs, and nothing secret
        flows = [fl for fl in read_flows(proxy.flows_path)
                 if ROUTE_KEY in fl.metadata or fl.request.path.partition("?")[0] not in OWN_ENDPOINTS]
        candidate = work / "candidate.mitm"
        write_flows(candidate, flows)
        findings = scan_flow_file(candidate, known, known_basic)
        if findings:
            print("record: NOT written, the recording holds credentials:", file=sys.stderr)
            for f in findings:
                print(f"  - {f}", file=sys.stderr)
            return 2
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        candidate.replace(ns.out)
        statuses = sorted({fl.response.status_code for fl in flows if fl.response})
        print(f"record: {len(flows)} flows, {ns.out.stat().st_size} bytes, statuses {statuses} -> {ns.out}", file=sys.stderr)
        if rc:
            print(f"record: the command exited with {rc} (the recording is kept: it shows what happened)", file=sys.stderr)
        return rc
    finally:
        for thing in reversed(started):
            thing.stop()
        if ns.keep:
            print(f"record: work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
