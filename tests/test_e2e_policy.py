"""Least privilege: a connector's policy (annotation) enforced before anything goes upstream, with the
upstream token's scopes checked at the real token server; and the audit log of a push and a pull.

One registry, two connectors to it: `default/open` (the seed's shape: no policy) and
`default/policed` with the policy below. Two callers may use both: the builder
(system:serviceaccount:ci:builder) and a reader in another namespace.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess

import pytest
import yaml

from conftest import REGISTRY_USER
from localregistry import make_oci_layout
from proxyproc import ProxyProcess, basic, connector, secret, write_manifests
from test_e2e_clients import authfile_for, run
from test_e2e_protocol import MANIFEST_TYPE, Client, digest_of

POLICY = """\
- repositories: ["base/*"]
  actions: [pull]
- subjects: ["system:serviceaccount:ci:builder"]
  repositories: ["team-a/*"]
  actions: [pull, push]
- namespaces: [ci]
  repositories: ["team-a/tmp*", "base/*"]
  actions: [delete, catalog]
- subjects: ["system:serviceaccount:ci:builder"]
  repositories: ["drop/*"]
  actions: [push]
"""
FLOW_LINE = re.compile(r"^127\.0\.0\.1:[1-9]\d*: (?:GET|HEAD|POST|PUT|PATCH|DELETE) ", re.MULTILINE)  # mitmdump's flow lines; port 0: the recorder's own
BUILDER, READER = "system:serviceaccount:ci:builder", "system:serviceaccount:other:reader"


@pytest.fixture(scope="module")
def policed(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("policy")
    builder, reader = "pb-" + secrets.token_hex(12), "pr-" + secrets.token_hex(12)
    tokens = tmp / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"tokens": [
        {"token": builder, "subject": BUILDER, "connectors": ["default/*"]},
        {"token": reader, "subject": READER, "connectors": ["default/*"]},
    ]}))
    policed = connector("default", "policed", world.registry.url, "s")
    policed["metadata"]["annotations"] = {"connectors.alauda.io/policy": POLICY}
    broken = connector("default", "badpolicy", world.registry.url, "s")
    broken["metadata"]["annotations"] = {"connectors.alauda.io/policy": "- actions: [fly]\n  repositories: [x]\n"}
    write_manifests(tmp / "connectors", "c.yaml", [
        connector("default", "open", world.registry.url, "s"), policed, broken,
        secret("default", "s", REGISTRY_USER, world.registry_password),
    ])
    audit = tmp / "audit.jsonl"
    proxy = ProxyProcess(tmp, tmp / "connectors", tokens, extra=("--set", f"audit_log={audit}")).start()
    # Content through the unrestricted connector: base/app, team-a/app, team-b/app.
    seed = Client(proxy, builder, prefix="/v2/namespaces/default/connectors/open")
    layer = os.urandom(20_000)
    for repo in ("base/app", "team-a/app", "team-b/app", "team-a/tmp1"):
        seed.upload_monolithic(repo, layer)
        seed.put_manifest(repo, "v1", [layer])
    for i in range(60):  # enough names that the registry sends its catalog chunked (no Content-Length)
        seed.upload_monolithic(f"team-b/filler-{i:02d}-{'x' * 40}", layer[:100])
    yield proxy, builder, reader, layer, audit
    proxy.stop()
    written = proxy.everything_written() + audit.read_bytes()
    for s in (builder, reader, world.registry_password, *world.token_server.issued_tokens):
        assert s.encode() not in written


FORMS = {"path": ("/v2/namespaces/default/connectors/policed", None), "host": ("/v2", "c-policed.default.svc.cluster.local")}


def clients(proxy, token):
    return {form: Client(proxy, token, prefix=prefix, host=host) for form, (prefix, host) in FORMS.items()}


def denied(r, what: str):
    assert r.status == 403, (r.status, r.data)
    if not r.data:  # a HEAD answer: no body
        return ""
    err = json.loads(r.data)["errors"][0]
    assert err["code"] == "DENIED" and "policy" in err["message"] and what in err["message"], err
    return err["message"]


@pytest.mark.parametrize("form", FORMS)
def test_pulls_follow_the_policy(policed, form):
    proxy, builder, reader, _, _ = policed
    accept = {"Accept": MANIFEST_TYPE}
    for token in (builder, reader):
        assert clients(proxy, token)[form].call("GET", clients(proxy, token)[form].v2("base/app/manifests/v1"), headers=accept).status == 200
    b, r = clients(proxy, builder)[form], clients(proxy, reader)[form]
    assert b.call("GET", b.v2("team-a/app/manifests/v1"), headers=accept).status == 200
    message = denied(r.call("GET", r.v2("team-a/app/manifests/v1"), headers=accept), "team-a/app")
    assert READER in message and "no rule" in message
    denied(b.call("HEAD", b.v2("team-b/app/manifests/v1"), headers=accept), "team-b/app")


@pytest.mark.parametrize("form", FORMS)
def test_pushes_and_deletes_follow_the_policy(policed, form):
    proxy, builder, reader, layer, _ = policed
    b, r = clients(proxy, builder)[form], clients(proxy, reader)[form]
    b.upload_monolithic(f"team-a/{form}", os.urandom(5000))  # allowed
    message = denied(b.call("POST", b.v2("base/app/blobs/uploads/")), "base/app")
    assert "rule 1" in message and "not push" in message  # names the rule that covers it, without push
    denied(r.call("POST", r.v2("team-a/x/blobs/uploads/")), "team-a/x")
    denied(b.call("DELETE", b.v2("team-a/app/manifests/v1")), "team-a/app")
    digest = digest_of(layer)
    assert b.call("DELETE", b.v2(f"team-a/tmp1/blobs/{digest}")).status in (202, 404)  # allowed: the registry decides


@pytest.mark.parametrize("form", FORMS)
def test_a_mount_from_outside_the_policy_becomes_a_plain_upload(policed, form):
    proxy, builder, _, layer, _ = policed
    b = clients(proxy, builder)[form]
    digest = digest_of(layer)
    prefix = "namespaces/default/connectors/policed/" if form == "path" else ""
    inside = b.call("POST", b.v2(f"team-a/m{form}/blobs/uploads/?mount={digest}&from={prefix}base/app"))
    assert inside.status == 201, inside.data  # base/* may be pulled: mounted
    outside = b.call("POST", b.v2(f"team-a/n{form}/blobs/uploads/?mount={digest}&from={prefix}team-b/app"))
    assert outside.status == 202, outside.data  # team-b/* may not: an upload session instead


def test_catalog_is_refused_or_filtered(policed):
    proxy, builder, reader, _, _ = policed
    b, r = clients(proxy, builder)["path"], clients(proxy, reader)["path"]
    listed = b.call("GET", b.v2("_catalog"))
    assert listed.status == 200, listed.data
    repos = json.loads(listed.data)["repositories"]
    assert "base/app" in repos and "team-a/tmp1" in repos
    assert "team-a/app" in repos  # named by the builder's rule 2
    assert not any(x.startswith("team-b/") for x in repos)  # named by no rule of theirs
    denied(r.call("GET", r.v2("_catalog")), "catalog")


def test_upstream_token_scopes_never_exceed_the_policy(policed, world):
    """At the token server: the proxy asked for push only where the policy gives push only."""
    proxy, builder, _, _, _ = policed
    b = clients(proxy, builder)["path"]
    before = len(world.token_server.fetches)
    r = b.call("POST", b.v2("drop/box/blobs/uploads/"))  # push allowed, pull not
    # distribution wants pull too for an upload: it refuses the narrowed token, and says so.
    assert r.status == 403 and b"insufficient_scope" in r.data, r.data
    scopes = [s for f in world.token_server.fetches[before:] for s in f.scopes]
    assert "repository:drop/box:push" in scopes, scopes
    assert not any(s.startswith("repository:drop/box:") and "pull" in s for s in scopes), scopes


def test_an_unparseable_policy_makes_only_its_connector_unusable(policed):
    proxy, builder, _, _, _ = policed
    r = proxy.request("GET", "/v2/namespaces/default/connectors/badpolicy/base/app/tags/list", auth=basic("x", builder))
    assert r.status == 503 and b"policy" in r.data and b"fly" in r.data
    r = proxy.request("GET", "/v2/namespaces/default/connectors/open/base/app/tags/list", auth=basic("x", builder))
    assert r.status == 200


def test_skopeo_push_and_pull_are_in_the_audit_log(policed, tmp_path):
    """A real client's push and pull under the policy (the Bearer flow, with proxy tokens), every
    request of it in the audit log with its caller, connector, repository and action, no secret."""
    proxy, builder, _, _, audit = policed
    image = make_oci_layout(tmp_path / "img", [30_000, 10_000], tag="v1")
    auth = authfile_for(tmp_path, proxy.host, builder)
    ref = f"docker://{proxy.host}/namespaces/default/connectors/policed/team-a/skopeo:v1"
    start = len(audit.read_text().splitlines())
    logged_before = len(FLOW_LINE.findall(proxy.output()))
    run(["skopeo", "copy", "--authfile", str(auth), "--dest-tls-verify=false", image.ref, ref])
    run(["skopeo", "copy", "--authfile", str(auth), "--src-tls-verify=false", ref, f"oci:{tmp_path / 'back'}:v1"])
    denied_ref = f"docker://{proxy.host}/namespaces/default/connectors/policed/base/skopeo:v1"
    assert subprocess.run(["skopeo", "copy", "--authfile", str(auth), "--dest-tls-verify=false", image.ref, denied_ref],
                          capture_output=True, timeout=120).returncode != 0
    records = [json.loads(line) for line in audit.read_text().splitlines()[start:]]
    ours = [r for r in records if r["repository"] == "team-a/skopeo"]
    assert {r["action"] for r in ours} >= {"push", "pull"}
    assert all(r["subject"] == BUILDER and r["connector"] == "default/policed" for r in ours)
    assert all(r["policy"]["decision"] == "allowed" for r in ours)
    assert any(r["method"] == "PUT" and "/manifests/v1" in r["path"] and r["status"] == 201 for r in ours)
    assert any(r["method"] == "PATCH" and r["bytes_in"] > 0 for r in ours) or any(
        r["method"] == "PUT" and r["bytes_in"] >= 10_000 for r in ours)
    assert any(r["repository"] == "base/skopeo" and r["policy"]["decision"] == "denied" and r["status"] == 403 for r in records)
    assert all("=" not in (r["path"] or "").partition("?")[2] for r in records)  # no query values
    # Every request the proxy answered in that window is in the audit log: one record per flow line.
    assert len(records) == len(FLOW_LINE.findall(proxy.output())) - logged_before
