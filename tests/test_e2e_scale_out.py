"""Scale out by design: two replicas behind one address serve one client session.

Two proxy processes share nothing but their configuration: the same connectors directory, the same
client tokens and the same proxy-token signing key file (in a cluster: the API server and the
`connector-proxy-token-key` Secret). In front of them one address, a TCP round-robin balancer (what
a Service does: an endpoint per connection), so every new client connection lands on the other
replica unless the test pins it. Then:

- a hand-driven push whose upload starts on replica A and is finished on replica B (and the
  other way round), with a proxy token one replica issued used on the other, pulled back
  identical; each replica's own audit log and /metrics say what it served;
- a real client (skopeo, a new connection for nearly every request) pushes and pulls a
  multi-layer image through the one address: both replicas serve the session, the image comes
  back identical;
- a proxy token from A's token endpoint is accepted by B; one signed with another key is refused
  by both with the registry's 401 JSON error and a challenge.

Nothing here waits by sleeping: every connection's replica is known from the balancer's record.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import jwt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from addons.proxy_token import Access, ProxyTokens
from conftest import REGISTRY_USER
from localregistry import make_oci_layout, skopeo
from proxyproc import ProxyProcess, basic
from tcp_balancer import TcpBalancer
from test_e2e_clients import authfile_for, run

PREFIX = "namespaces/default/connectors/harbor"
CONNECTOR = "default/harbor"
BUILDER = "system:serviceaccount:ci:builder"
A, B = 0, 1
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclass
class Scaled:
    replicas: list[ProxyProcess]
    balancer: TcpBalancer
    audit_paths: list[Path]
    issued: list[str] = field(default_factory=list)  # proxy tokens the tests obtained: never written
    opened: list[http.client.HTTPConnection] = field(default_factory=list)

    def audit(self, i: int) -> list[dict]:
        return [json.loads(line) for line in self.audit_paths[i].read_text().splitlines()]

    def connect(self, backend: int) -> http.client.HTTPConnection:
        """A new client connection to the one address, which the balancer sends to `backend`."""
        self.balancer.pin(backend)
        conn = http.client.HTTPConnection(self.balancer.host_ip, self.balancer.port, timeout=60)
        conn.connect()
        self.opened.append(conn)
        assert self.balancer.backend_of(conn.sock.getsockname()) == backend
        return conn


@pytest.fixture(scope="module")
def scaled(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale-out")
    key = tmp / "token.key"
    key.write_bytes(base64.b64encode(os.urandom(48)))  # the Secret every replica mounts
    replicas: list[ProxyProcess] = []
    audits = []
    balancer = s = None
    try:
        for name in ("a", "b"):
            (tmp / name).mkdir()
            audits.append(tmp / name / "audit.jsonl")
            replicas.append(ProxyProcess(tmp / name, world.connectors_dir, world.tokens_file, extra=(
                "--set", f"token_key_file={key}", "--set", f"audit_log={audits[-1]}",
            )).start())
        balancer = TcpBalancer([("127.0.0.1", p.port) for p in replicas]).start()
        s = Scaled(replicas, balancer, audits)
        yield s
    finally:
        for conn in s.opened if s else ():
            conn.close()
        if balancer:
            balancer.stop()
        for p in replicas:
            p.stop()
    # Neither replica wrote a secret: not the registry's, not the client's, not a proxy token.
    for p, audit in zip(replicas, audits):
        written = p.everything_written() + (audit.read_bytes() if audit.exists() else b"")
        leaked = [i for i, secret in enumerate([*world.secrets, *s.issued]) if secret.encode() in written]
        assert not leaked, f"secrets #{leaked} appear in what {p.workdir} wrote"


# ============================================================================ helpers


def exchange(conn: http.client.HTTPConnection, method: str, path: str, headers: dict | None = None,
             body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def settled(proxy: ProxyProcess) -> None:
    """A barrier: the replica has run the hooks (audit log, metrics, flow log) of every exchange
    it answered before this one. Hook tasks are queued on its event loop before a new connection
    is even accepted, so a request on a new connection is answered after them."""
    assert proxy.request("GET", "/healthz").status == 200


def responses(proxy: ProxyProcess) -> dict[tuple[str, str], float]:
    """The replica's own count of responses by (connector, status), read from its /metrics."""
    r = proxy.request("GET", "/metrics")
    assert r.status == 200
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(r.data.decode()):
        if family.name == "connector_proxy_responses":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out[(sample.labels["connector"], sample.labels["status"])] = sample.value
    return out


def moved(before: dict, after: dict) -> dict[tuple[str, str], float]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def challenge_params(header: str) -> dict[str, str]:
    assert header.startswith("Bearer "), header
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


def fetch_token(conn: http.client.HTTPConnection, realm: str, service: str, scope: str, client_token: str) -> str:
    path = urlsplit(realm).path + "?" + urlencode({"service": service, "scope": scope})
    status, _, body = exchange(conn, "GET", path, {"Authorization": basic("builder", client_token)})
    assert status == 200, body
    return json.loads(body)["token"]


def local(location: str, host: str) -> str:
    """The path of a Location the proxy rewrote to the address the client used."""
    parts = urlsplit(location)
    assert parts.netloc == host, f"Location {location} does not name the one address {host}"
    return parts.path + ("?" + parts.query if parts.query else "")


def open_upload(conn: http.client.HTTPConnection, host: str, repo: str, auth: dict) -> str:
    """POST an upload session; the path of its Location (which names the one address)."""
    status, headers, body = exchange(conn, "POST", f"/v2/{repo}/blobs/uploads/", auth)
    assert status == 202, body
    return local(headers["location"], host)


def upload_id_of(path: str) -> str:
    upload_id = path.partition("?")[0].rsplit("/", 1)[1]
    assert re.fullmatch(r"[0-9a-f-]{36}", upload_id), path
    return upload_id


TOKEN_LINE = re.compile(r"^127\.0\.0\.1:\d+: (?:GET|POST) \S+/\.connectors/token[?\s]", re.MULTILINE)


def tokens_issued(proxy: ProxyProcess) -> int:
    """Requests to the replica's token endpoint, from its own log (mitmdump's flow lines)."""
    return len(TOKEN_LINE.findall(proxy.output()))


def with_digest(path: str, digest: str) -> str:
    return path + ("&" if "?" in path else "?") + "digest=" + digest


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ============================================================================ tests


def test_a_push_starts_on_one_replica_and_finishes_on_the_other(world, scaled):
    """Upload sessions and proxy tokens cross replicas: the layer's upload is opened on A and its
    PATCH and PUT go to B; the config's the other way round; every request after the token fetch
    carries a token that the other replica issued. The image pulls back identical."""
    lb, (a, b) = scaled.balancer, scaled.replicas
    repo = f"{PREFIX}/scale/handdriven"
    layer = os.urandom(300_000)
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [sha(layer)]}}).encode()
    before = [responses(a), responses(b), lb.counts, [tokens_issued(a), tokens_issued(b)]]

    # A challenges (its realm is on the one address), B issues the token.
    with_a = scaled.connect(A)
    status, headers, _ = exchange(with_a, "POST", f"/v2/{repo}/blobs/uploads/")
    assert status == 401
    challenge = challenge_params(headers["www-authenticate"])
    assert challenge["realm"] == f"{lb.url}/.connectors/token"
    assert "push" in challenge["scope"]
    with_b = scaled.connect(B)
    token_b = fetch_token(with_b, challenge["realm"], challenge["service"], challenge["scope"], world.builder_token)
    scaled.issued.append(token_b)
    by_b = {"Authorization": f"Bearer {token_b}"}

    # The layer: POST on A (with B's token) ...
    started = open_upload(scaled.connect(A), lb.host, repo, by_b)
    upload_id = upload_id_of(started)
    # ... PATCH (first half) and PUT (second half, digest) on one connection to B.
    with_b = scaled.connect(B)
    half = len(layer) // 2
    status, headers, body = exchange(with_b, "PATCH", started, {
        **by_b, "Content-Type": "application/octet-stream", "Content-Range": f"0-{half - 1}"}, layer[:half])
    assert status == 202, body
    assert headers["range"] == f"0-{half - 1}"
    status, headers, body = exchange(with_b, "PUT", with_digest(local(headers["location"], lb.host), sha(layer)), {
        **by_b, "Content-Type": "application/octet-stream"}, layer[half:])
    assert status == 201, body
    assert headers["docker-content-digest"] == sha(layer)

    # A token from A, for the rest of the push and for the pull.
    with_a = scaled.connect(A)
    token_a = fetch_token(with_a, challenge["realm"], challenge["service"], challenge["scope"], world.builder_token)
    scaled.issued.append(token_a)
    by_a = {"Authorization": f"Bearer {token_a}"}
    assert token_a != token_b

    # The config: POST on B (with A's token), PUT on A (with B's); the manifest on B (with A's).
    config_upload = open_upload(scaled.connect(B), lb.host, repo, by_a)
    config_id = upload_id_of(config_upload)
    with_a = scaled.connect(A)
    status, headers, body = exchange(with_a, "PUT", with_digest(config_upload, sha(config)), {
        **by_b, "Content-Type": "application/octet-stream"}, config)
    assert status == 201, body
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(layer), "size": len(layer)}],
    }).encode()
    with_b = scaled.connect(B)
    status, headers, body = exchange(with_b, "PUT", f"/v2/{repo}/manifests/v1", {
        **by_a, "Content-Type": OCI_MANIFEST}, manifest)
    assert status == 201, body
    assert headers["docker-content-digest"] == sha(manifest)

    # Pulled back through the one address, on each replica with the other's token: identical.
    with_a = scaled.connect(A)
    status, headers, body = exchange(with_a, "GET", f"/v2/{repo}/manifests/v1", {**by_b, "Accept": OCI_MANIFEST})
    assert status == 200, body
    assert body == manifest and headers["docker-content-digest"] == sha(manifest)
    with_b = scaled.connect(B)
    status, headers, body = exchange(with_b, "GET", f"/v2/{repo}/blobs/{sha(layer)}", by_a)
    assert status == 200 and sha(body) == sha(layer)
    status, headers, body = exchange(with_b, "GET", f"/v2/{repo}/blobs/{sha(config)}", by_a)
    assert status == 200 and body == config
    # ... and upstream, with the registry's own credentials.
    upstream = skopeo.inspect(f"docker://{world.registry.host}/scale/handdriven:v1",
                              creds=f"{REGISTRY_USER}:{world.registry_password}")
    assert upstream["Digest"] == sha(manifest) and upstream["Layers"] == [sha(layer)]

    # Every exchange on the last connection to each replica has run its hooks (audit, metrics,
    # log) once a further request on that connection is answered: HTTP/1 answers in order.
    for conn in (with_a, with_b):
        assert exchange(conn, "GET", "/healthz")[0] == 200

    # The balancer's record: five connections each, as pinned.
    assert [lb.counts[i] - before[2][i] for i in (A, B)] == [5, 5]
    # Each replica's own record. The token endpoint: one token each.
    assert [tokens_issued(p) - n for p, n in zip((a, b), before[3])] == [1, 1]
    # The audit logs: A opened the layer's upload and never saw it again, B continued and
    # finished it; the config's upload went the other way.
    audit_a = [r for r in scaled.audit(A) if r["repository"] == "scale/handdriven"]
    audit_b = [r for r in scaled.audit(B) if r["repository"] == "scale/handdriven"]
    assert all(r["subject"] == BUILDER and r["connector"] == CONNECTOR for r in audit_a + audit_b)
    assert [(r["method"], r["status"]) for r in audit_a if upload_id in r["path"]] == []
    assert [(r["method"], r["status"], r["bytes_in"]) for r in audit_b if upload_id in r["path"]] == [
        ("PATCH", 202, half), ("PUT", 201, len(layer) - half)]
    assert [(r["method"], r["status"]) for r in audit_b if config_id in r["path"]] == []
    assert [(r["method"], r["status"]) for r in audit_a if config_id in r["path"]] == [("PUT", 201)]
    # A: the layer's upload opened, the config's finished, the manifest pulled; B: the rest.
    assert sorted((r["method"], r["status"]) for r in audit_a) == [("GET", 200), ("POST", 202), ("PUT", 201)]
    assert sorted((r["method"], r["status"]) for r in audit_b) == [
        ("GET", 200), ("GET", 200), ("PATCH", 202), ("POST", 202), ("PUT", 201), ("PUT", 201)]
    # /metrics agrees: what each replica answered for the connector (and A's one challenge).
    assert moved(before[0], responses(a)) == {
        ("-", "401"): 1, (CONNECTOR, "202"): 1, (CONNECTOR, "201"): 1, (CONNECTOR, "200"): 1}
    assert moved(before[1], responses(b)) == {(CONNECTOR, "202"): 2, (CONNECTOR, "201"): 2, (CONNECTOR, "200"): 2}


def test_a_real_client_session_is_served_by_both_replicas(world, scaled, tmp_path):
    """skopeo pushes and pulls a multi-layer image through the one address, opening new
    connections as it goes: both replicas serve the push and the pull, with the proxy tokens
    either of them issued, and the image comes back identical."""
    lb, (a, b) = scaled.balancer, scaled.replicas
    image = make_oci_layout(tmp_path / "src", [120_000, 700_000, 30_000, 5_000], tag="v1", labels={"scaled": "out"})
    auth = authfile_for(tmp_path, lb.host, world.builder_token)
    ref = f"docker://{lb.host}/{PREFIX}/scale/skopeo:v1"
    before = [lb.counts, len(scaled.audit(A)), len(scaled.audit(B))]

    run(["skopeo", "copy", "--authfile", str(auth), "--dest-tls-verify=false", image.ref, ref])
    pushed = [c - n for c, n in zip(lb.counts, before[0])]
    run(["skopeo", "copy", "--authfile", str(auth), "--src-tls-verify=false", ref, f"oci:{tmp_path / 'back'}:v1"])
    pulled = [c - n - p for c, n, p in zip(lb.counts, before[0], pushed)]

    back = json.loads((tmp_path / "back" / "index.json").read_text())
    assert back["manifests"][0]["digest"] == image.manifest_digest
    for digest in image.layer_digests:
        assert sha((tmp_path / "back" / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()) == digest
    upstream = skopeo.inspect(f"docker://{world.registry.host}/scale/skopeo:v1",
                              creds=f"{REGISTRY_USER}:{world.registry_password}")
    assert upstream["Digest"] == image.manifest_digest and upstream["Layers"] == image.layer_digests

    # The balancer alternated over many connections, in both phases.
    assert min(pushed) >= 3 and min(pulled) >= 3, (pushed, pulled)
    # Each replica's own audit log: it served authenticated requests of both the push and the pull.
    sessions: list[set[str]] = []
    for i, proxy in ((A, a), (B, b)):
        settled(proxy)
        ours = [r for r in scaled.audit(i)[before[1 + i]:] if r["repository"] == "scale/skopeo"]
        assert all(r["subject"] == BUILDER and r["connector"] == CONNECTOR for r in ours)
        served = {r["action"] for r in ours if 200 <= r["status"] < 300}
        assert served == {"push", "pull"}, (i, [(r["method"], r["path"], r["status"]) for r in ours])
        sessions.append({upload_id_of(r["path"]) for r in ours if r["method"] in ("PATCH", "PUT")
                         and "/blobs/uploads/" in r["path"] and not r["path"].endswith("/uploads/")})
    # skopeo uploads a blob as POST, PATCH, PUT, each on a new connection, and the config blob
    # alone after the layers: so at least its session was continued on the other replica (with
    # this skopeo, every blob's was).
    assert sessions[A] & sessions[B], sessions


def test_a_proxy_token_one_replica_issued_is_accepted_by_the_other_and_a_foreign_key_is_not(world, scaled):
    """The token key file is the only thing the replicas share for this: B accepts what A issued,
    and refuses the very same claims signed with another key (401, the registry's JSON error, a
    challenge to get a good one)."""
    a, b = scaled.replicas
    repo = f"{PREFIX}/scale/tokens"
    path = f"/v2/{repo}/tags/list"
    r = a.request("GET", path)
    assert r.status == 401
    challenge = challenge_params(r.headers["WWW-Authenticate"])
    assert challenge["realm"] == f"{a.url}/.connectors/token"
    r = a.request("GET", "/.connectors/token?" + urlencode({"service": challenge["service"], "scope": challenge["scope"]}),
                  auth=basic("builder", world.builder_token))
    assert r.status == 200, r.data
    token = json.loads(r.data)["token"]
    scaled.issued.append(token)

    # B accepts it: the request reaches the registry, which knows no such repository.
    r = b.request("GET", path, headers={"Authorization": f"Bearer {token}"})
    assert r.status == 404, r.data
    assert json.loads(r.data)["errors"][0]["code"] == "NAME_UNKNOWN"

    # The same claims, signed with a key no replica has: refused by both, as a registry refuses.
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == BUILDER and claims["connector"] == CONNECTOR
    forged = ProxyTokens(base64.b64encode(os.urandom(48))).issue(
        claims["sub"], claims["connector"], claims["aud"],
        [Access(x["type"], x["name"], tuple(x["actions"])) for x in claims["access"]])[0]
    assert jwt.decode(forged, options={"verify_signature": False}).keys() == claims.keys()
    for proxy in (b, a):
        r = proxy.request("GET", path, headers={"Authorization": f"Bearer {forged}"})
        assert r.status == 401, r.data
        assert r.headers["Content-Type"] == "application/json"
        [error] = json.loads(r.data)["errors"]
        assert error["code"] == "UNAUTHORIZED" and error["message"]
        assert forged not in r.data.decode()
        again = challenge_params(r.headers["WWW-Authenticate"])
        assert again["realm"] == f"{proxy.url}/.connectors/token" and again["scope"] == challenge["scope"]
