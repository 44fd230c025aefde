"""Recorded and hand-built registry conversations, replayed offline through the real proxy.

Every file in tests/flows/ replays against local servers standing in for its registry, token
realm and storage hosts (see tests/replay.py and tests/flows/README.md). No registry, no network.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.test import tflow
from replay import (
    FLOWS_DIR,
    REPLAY_KEY,
    REPO,
    Conversation,
    ReplayResult,
    ReplayWorld,
    flow_files,
    origin_of,
    read_flows,
    scan_flow_file,
    scan_flows,
    write_flows,
)

from addons.oci import parse_realm
from addons.registry_client import realm_refusal
from connector_store.model import parse_address

FLOWS = flow_files()
RECORDED = [p for p in FLOWS if p.parent.name == "recorded"]
HANDBUILT = [p for p in FLOWS if p.parent.name == "handbuilt"]
BREAK_LOCATION = FLOWS_DIR / "break_location.py"
RECORDED_PUSH = FLOWS_DIR / "recorded" / "distribution-token-skopeo.mitm"


class Replays:
    """One proxy for the whole module; each recording replayed once, on first use."""

    def __init__(self, world: ReplayWorld):
        self.world = world
        self.handles = {p: world.add(p) for p in FLOWS}
        self.results: dict[Path, ReplayResult] = {}

    def __getitem__(self, name: str) -> ReplayResult:
        path = next(p for p in FLOWS if p.stem == name)
        if path not in self.results:
            self.results[path] = self.world.replay(self.handles[path])
        return self.results[path]


@pytest.fixture(scope="module")
def replays(tmp_path_factory):
    world = ReplayWorld(tmp_path_factory.mktemp("replay"))
    r = Replays(world)
    world.start()
    yield r
    world.close()
    # The replay proxy's own log and -w file: none of the replay's credentials, at flow detail 4.
    written = world.proxy.everything_written()
    assert b"GET" in written
    for secret in [*world.secrets, *world.issued_tokens()]:
        assert secret.encode() not in written, "a replay credential was written by the proxy"


# ---------------------------------------------------------------- every flow replays


def test_the_library_covers_the_registries_and_clients():
    names = {p.stem for p in FLOWS}
    for auth in ("token", "htpasswd"):
        for client in ("skopeo", "buildah", "podman"):
            assert f"distribution-{auth}-{client}" in names
    for shape in ("harbor", "dockerhub", "ghcr", "quay", "ecr-basic", "ecr-public", "gar", "s3-redirect"):
        assert any(shape in n for n in names), shape
    for path in RECORDED:  # real recordings: a push (manifest PUT) and a pull (blob GET) each
        flows = read_flows(path)
        assert any(f.request.method == "PUT" and "/manifests/" in f.request.path for f in flows), path.name
        assert any(f.request.method == "GET" and "/blobs/" in f.request.path and f.response.status_code == 200
                   for f in flows), path.name
        # what the proxy itself records: API flows, plus its out-of-band probe and token fetches
        kinds = {f.metadata[REPLAY_KEY].get("kind") for f in flows if REPLAY_KEY in f.metadata}
        assert kinds <= {"probe", "token"}, f"{path.name} is not a plain proxy recording: {kinds}"


@pytest.mark.parametrize("path", FLOWS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_flow_replays(replays, path):
    started = time.monotonic()
    result = replays[path.stem]
    assert result.ok, result.report()
    assert result.exchanges >= 3
    assert time.monotonic() - started < 5, "a replay must take seconds at most"
    # the replay reached the registry for every exchange the registry answered in the recording
    conv = Conversation.load(path)
    assert len([r for r in result.received if r.kind in ("api", "direct")]) == len(
        [e for e in conv.exchanges if e.served_by_upstream or e.kind == "direct"])


# ---------------------------------------------------------------- the harness catches regressions


def test_broken_location_rewrite_fails_a_recorded_push(tmp_path):
    """The proxy with `rewrite_url` patched to change nothing: the replay of a real push must fail."""
    with ReplayWorld(tmp_path, extra=("-s", str(BREAK_LOCATION))) as world:
        result = world.replay(RECORDED_PUSH)
    assert not result.ok
    report = result.report()
    assert "Location" in report and "expected" in report
    # the client followed the unrewritten Location straight to the registry, without credentials
    assert "bypassing the proxy" in report
    assert "Authorization missing" in report


# ---------------------------------------------------------------- each registry's quirk


def test_dockerhub_scopes_name_library(replays):
    result = replays["dockerhub-library-pull"]
    assert result.ok, result.report()
    tokens = result.at("https://auth.docker.io", "token")
    assert tokens, "no token fetched from auth.docker.io"
    for t in tokens:
        assert ("service", "registry.docker.io") in t.params
        assert [v for k, v in t.params if k == "scope"] == ["repository:library/alpine:pull"]
        assert t.authorization.startswith("Basic ")
    api = result.at("https://registry-1.docker.io", "api")
    assert api and all(r.path.startswith("/v2/library/alpine/") for r in api)
    assert all(r.authorization.startswith("Bearer replayed-token-") for r in api)


def test_ecr_basic_challenge_means_basic_everywhere_and_no_token(replays):
    result = replays["ecr-basic-push-pull"]
    assert result.ok, result.report()
    registry = "https://123456789012.dkr.ecr.us-east-1.amazonaws.com"
    assert result.at(registry, "probe"), "the proxy never learnt the challenge"
    assert not [r for r in result.received if r.kind == "token"]
    api = result.at(registry, "api")
    assert len(api) == 5 and all(r.authorization.startswith("Basic ") for r in api)
    # the relative upload Location went back through the proxy (the PUT carried the blob upstream)
    put = next(r for r in api if r.method == "PUT" and "/blobs/uploads/" in r.path)
    assert put.body_length == 4000 and put.query.startswith("digest=")


def test_ecr_public_gets_bearer_never_proactive_basic(replays):
    result = replays["ecr-public-pull"]
    assert result.ok, result.report()
    registry = "https://public.ecr.aws"
    assert not result.at(registry, "reject"), "Basic credentials reached the ECR Public API (it answers 400)"
    api = result.at(registry, "api")
    assert api and all(r.authorization.startswith("Bearer ") for r in api)
    tokens = result.at(registry, "token")
    assert tokens and all(t.authorization.startswith("Basic ") for t in tokens)


def test_gar_relative_redirect_is_followed_on_the_registry_host_without_credentials(replays):
    result = replays["gar-relative-blob-redirect"]
    assert result.ok, result.report()
    registry = "https://us-docker.pkg.dev"
    downloads = result.at(registry, "direct")
    assert len(downloads) == 1
    assert downloads[0].path.startswith("/artifacts-downloads/")
    assert not downloads[0].authorization
    assert 302 in result.client_statuses
    tokens = result.at(registry, "token")
    assert tokens and all(not any(k == "service" for k, _ in t.params) for t in tokens)  # realm-only challenge


@pytest.mark.parametrize("name,storage", [
    ("distribution-s3-redirect", "https://example-registry-bucket.s3.us-east-1.amazonaws.com"),
    ("dockerhub-library-pull", "https://production.cloudflare.docker.com"),
    ("ghcr-anonymous-pull", "https://github-production-container-registry.s3.amazonaws.com"),
])
def test_storage_host_after_307_gets_no_registry_credentials(replays, name, storage):
    result = replays[name]
    assert result.ok, result.report()
    assert 307 in result.client_statuses
    got = result.at(storage)
    assert got, f"{storage} was never reached"
    for r in got:
        assert r.kind == "direct"
        assert "authorization" not in r.headers and "proxy-authorization" not in r.headers
        assert "x-replay-direct" in r.headers  # straight from the client: the proxy never went there


def test_harbor_token_service_and_host_form_rewrites(replays):
    result = replays["harbor-host-form-push-pull"]
    assert result.ok, result.report()  # includes: Location and Link rewritten to the host-form origin
    tokens = result.at("https://harbor.example.com", "token")
    assert tokens and {t.path for t in tokens} == {"/service/token"}
    assert all(("service", "harbor-registry") in t.params for t in tokens)
    scopes = {v for t in tokens for k, v in t.params if k == "scope"}
    assert scopes == {"repository:ci/app:pull", "repository:ci/app:pull,push"}
    # the second page of tags was asked for through the Link the proxy rewrote
    pages = [r.query for r in result.at("https://harbor.example.com", "api") if r.path.endswith("/tags/list")]
    assert pages == ["n=1", "last=v1&n=1"]


def test_ghcr_tokens_are_anonymous(replays):
    result = replays["ghcr-anonymous-pull"]
    assert result.ok, result.report()
    tokens = result.at("https://ghcr.io", "token")
    assert tokens and all(not t.authorization for t in tokens)
    assert all(("service", "ghcr.io") in t.params for t in tokens)


def test_quay_realm_under_v2_is_the_token_endpoint(replays):
    result = replays["quay-robot-push"]
    assert result.ok, result.report()
    tokens = result.at("https://quay.io", "token")
    assert tokens and {t.path for t in tokens} == {"/v2/auth"}
    assert not result.at("https://quay.io", "unexpected")


@pytest.mark.parametrize("path", HANDBUILT, ids=lambda p: p.stem)
def test_handbuilt_shapes_pass_the_proxys_realm_policy_with_their_real_hosts(path):
    """Replays map every host to 127.0.0.1; the realm rule itself is checked on the real names here
    (auth.docker.io may receive registry-1.docker.io's credentials: same registrable domain)."""
    conv = Conversation.load(path)
    if conv.realm and conv.auth.get("credentials") == "basic":
        assert realm_refusal(parse_address(conv.registry), parse_realm(conv.realm)) is None
    assert realm_refusal(parse_address(conv.registry), parse_realm("https://attacker.example.net/token")) is not None


# ---------------------------------------------------------------- what the files hold


def repository_flow_files() -> list[Path]:
    skip = {".git", ".venv", ".local", "node_modules", ".pytest_cache"}
    return sorted(p for pattern in ("*.mitm", "*.flow", "*.flows") for p in REPO.rglob(pattern)
                  if not skip & set(p.relative_to(REPO).parts))


def test_no_credential_in_any_flow_file_of_the_repository():
    files = repository_flow_files()
    assert set(FLOWS) <= set(files) and len(files) >= 14
    findings = {str(p.relative_to(REPO)): scan_flow_file(p) for p in files}
    assert not any(findings.values()), {k: v for k, v in findings.items() if v}


def test_the_scan_finds_planted_credentials(tmp_path):
    """The scan is not vacuous: each kind of leak it looks for is found when planted."""
    def planted(**kw) -> list[str]:
        f = tflow.tflow(resp=True)
        for k, v in kw.get("req_headers", {}).items():
            f.request.headers[k] = v
        if "resp_body" in kw:
            f.response.content = kw["resp_body"]
        if "location" in kw:
            f.response.headers["Location"] = kw["location"]
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.mitm"
        write_flows(path, [f])
        return scan_flow_file(path, kw.get("known", ()))

    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJjaSIsImV4cCI6MX0.c2lnbmF0dXJl"
    assert planted(req_headers={"Authorization": f"Bearer {token}"})
    assert planted(req_headers={"Authorization": "Basic " + base64.b64encode(b"robot$ci:s3cr3t").decode()})
    assert planted(req_headers={"Cookie": "sid=0123456789abcdef"})
    assert planted(resp_body=json.dumps({"token": "abc123def456", "expires_in": 300}).encode())
    assert planted(location="https://bucket.s3.amazonaws.com/x?X-Amz-Signature=0f1e2d3c4b5a69788796a5b4c3d2e1f0")
    assert planted(req_headers={"X-Note": "AKIAQWERTYUIOPASDFGH"})
    assert planted(req_headers={"X-Note": "the password is hunter2hunter2"}, known=["hunter2hunter2"])
    # and placeholders pass
    assert not planted(req_headers={"Authorization": "Bearer <redacted>"},
                       resp_body=json.dumps({"token": "<redacted>"}).encode(),
                       location="https://bucket.s3.amazonaws.com/x?X-Amz-Signature=EXAMPLE")
    assert not scan_flows([], b'{"quirk": "Basic credentials, Bearer accepted"}')


def test_handbuilt_files_are_what_their_generator_writes():
    spec = importlib.util.spec_from_file_location("build_flows", REPO / "scripts" / "build_flows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0, "tests/flows/handbuilt/ is stale: run scripts/build_flows.py"


@pytest.mark.parametrize("path", HANDBUILT, ids=lambda p: p.stem)
def test_handbuilt_conversations_cite_their_sources(path):
    notes = Conversation.load(path).info
    assert notes.get("title") and notes.get("quirk")
    assert notes.get("sources") and all(s.startswith("https://") for s in notes["sources"])


def test_recordings_hold_redacted_credentials_and_no_blob(replays):
    for path in RECORDED:
        for f in read_flows(path):
            auth = f.request.headers.get("authorization")
            assert auth is None or auth.endswith("<redacted>")
            if "/blobs/sha256:" in f.request.path and f.request.method == "GET" and f.response.status_code == 200:
                assert f.response.raw_content is None and f.metadata["connector_proxy_blob"]["size"] > 0


def test_origin_of_normalises():
    assert origin_of("HTTPS://Reg.Example:443/v2/") == "https://reg.example"
    assert origin_of("http://127.0.0.1:5000/x") == "http://127.0.0.1:5000"


def test_flow_objects_round_trip(tmp_path):
    f = tflow.tflow(resp=True)
    f.metadata["connector_proxy_blob"] = {"size": 3, "digest": None}
    write_flows(tmp_path / "one.mitm", [f])
    [g] = read_flows(tmp_path / "one.mitm")
    assert isinstance(g, http.HTTPFlow) and g.metadata == f.metadata


# ---------------------------------------------------------------- recording


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
def test_record_script_writes_a_scrubbed_replayable_recording(tmp_path):
    """scripts/record: a real skopeo push through the proxy to a local registry becomes a flow file
    that holds no credential and replays offline."""
    out = tmp_path / "session.mitm"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "record.py"), "--out", str(out), "--local", "token", "--",
         "sh", "-c", "skopeo copy -q --dest-tls-verify=false $IMAGE docker://$REF/rec/app:v1"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.exists() and "record: " in proc.stderr
    flows = read_flows(out)
    assert any(f.request.method == "PUT" and "/manifests/v1" in f.request.path for f in flows)
    assert not any(f.request.path.startswith("/readyz") for f in flows)
    assert not scan_flow_file(out)
    with ReplayWorld(tmp_path / "replay") as world:
        result = world.replay(out)
    assert result.ok, result.report()
