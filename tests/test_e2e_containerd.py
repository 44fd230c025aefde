"""containerd's registry client (`remotes/docker`, what BuildKit uses) through the proxy, as `ctr` runs it.

A throwaway containerd daemon (localregistry/containerd.py: root, all state in a temp dir, `native`
snapshotter) holds the content; `ctr` itself speaks to the proxy, reusing keep-alive connections the way
BuildKit does. Pulls are `ctr images pull` (fetch, then unpack with the native snapshotter), not
`ctr content fetch`: unpacking works here. Pushes are `ctr images push` of images put in containerd's
store with `ctr images import` (no network involved in the source).

Every pull runs 10 times in a row and every push 10 times (the 64 MiB layer 3 and 2 times), each from a
clean content store (namespaces do not share content: see Containerd.reset), so a 1-in-3 failure
cannot pass. Three address forms:

- host form: `c-harbor.default.svc.cluster.local:<port>/<repo>`; the name resolves to 127.0.0.1 only
  for the `ctr` process (PrivateHosts: a mount namespace with its own /etc/hosts), so requests carry
  `Host: c-harbor...` exactly as in a cluster. containerd's hosts.toml is not used: it would send the
  requests to, and name, the mirror host, i.e. turn the host form into something else.
- path form: `127.0.0.1:<port>/namespaces/default/connectors/harbor/<repo>`;
- forward mode: the registry's own HTTPS name (`registry-a.connector-test:<port>`, see
  test_e2e_forward.py) with `HTTPS_PROXY=http://default%2Fharbor:TOKEN@127.0.0.1:<fport>` and the
  proxy's CA trusted with `--tlscacert`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REGISTRY_USER
from localregistry import Layer, OciImage, make_oci_layout
from localregistry.containerd import Containerd, ContainerdError, CtrError, PrivateHosts
from localregistry.images import MT_INDEX, MT_MANIFEST, REF_NAME
from proxyproc import ProxyProcess
from test_e2e_forward import Forward

FORMS = ("host", "path", "forward")
HOST_FORM = "c-harbor.default.svc.cluster.local"
PATH_PREFIX = "namespaces/default/connectors/harbor/"
PULLS, PUSHES = 10, 10
LARGE_PULLS, LARGE_PUSHES = 3, 2
LARGE_SIZE = 64 << 20
RUN = secrets.token_hex(3)  # fresh repository names per run: pushes upload every blob


# ---- where a client sends what: one address form of one proxy ------------------------------------------

@dataclass
class Target:
    """One address form: how a client names images, and how to check the registry behind it directly."""

    form: str  # host | path | forward
    proxy: ProxyProcess  # its log explains failures
    registry: str  # host[:port] as written in image references
    prefix: str  # repository prefix of the form ("" or namespaces/<ns>/connectors/<name>/)
    token: str  # the workload's proxy token (never a registry credential)
    upstream: str  # the registry's own host:port: seeding and verification only
    upstream_creds: str  # user:password at the registry: seeding and verification only
    upstream_cert_dir: Path | None = None  # CA directory of an HTTPS registry
    env: dict[str, str] = field(default_factory=dict)  # HTTPS_PROXY & co. (forward mode)
    wrap: list[str] = field(default_factory=list)  # command prefix (host form: private /etc/hosts)
    proxy_ca: Path | None = None  # the forward proxy's CA certificate
    proxy_certs: Path | None = None  # a containers-style certs dir holding only that CA

    @property
    def reverse(self) -> bool:
        return self.form != "forward"

    def ref(self, repo: str, tag: str = "v1") -> str:
        return f"{self.registry}/{self.prefix}{repo}:{tag}"

    def upstream_ref(self, repo: str, tag: str = "v1") -> str:
        return f"{self.upstream}/{repo}:{tag}"

    def skopeo_upstream_tls(self, prefix: str = "") -> list[str]:
        if self.upstream_cert_dir:
            return [f"--{prefix}cert-dir", str(self.upstream_cert_dir)]
        return [f"--{prefix}tls-verify=false"]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment without any inherited proxy settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")}
    env.update(extra or {})
    return env


def reverse_targets(world, tmp: Path) -> dict[str, Target]:
    common = dict(proxy=world.proxy, token=world.builder_token, upstream=world.registry.host,
                  upstream_creds=f"{REGISTRY_USER}:{world.registry_password}")
    hosts = PrivateHosts(tmp / "private-hosts", [HOST_FORM])
    return {
        "host": Target("host", registry=f"{HOST_FORM}:{world.proxy.port}", prefix="", wrap=hosts.prefix, **common),
        "path": Target("path", registry=world.proxy.host, prefix=PATH_PREFIX, **common),
    }


def forward_target(fwd: Forward) -> Target:
    env = {k: v for k, v in fwd.env().items() if k.lower() in ("https_proxy", "no_proxy")}
    return Target("forward", proxy=fwd.proxy, registry=fwd.reg_a.host, prefix="", token=fwd.token,
                  upstream=fwd.reg_a.host, upstream_creds=f"pusher:{fwd.password_a}",
                  upstream_cert_dir=fwd.ca.cert_dir, env=env, proxy_ca=fwd.ca_dir / "ca.crt",
                  proxy_certs=fwd.client_certs)


def host_form_problem(tmp: Path) -> str | None:
    """Why the host form cannot be tested here (None: it can)."""
    try:
        PrivateHosts(tmp / "private-hosts-check", [HOST_FORM]).check()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        return f"host form needs {HOST_FORM} to resolve to 127.0.0.1 for the client: {e}"
    return None


# ---- the registry behind the proxy, used directly (seeding, verification) ----------------------------------

def seed(target: Target, layout_ref: str, repo: str, tag: str = "v1", all_images: bool = False) -> None:
    """Push an OCI layout image straight to the registry (no proxy), with the registry's own credentials."""
    cmd = ["skopeo", "copy", "-q", *(["--all"] if all_images else []), "--dest-creds", target.upstream_creds,
           *target.skopeo_upstream_tls("dest-"), layout_ref, f"docker://{target.upstream_ref(repo, tag)}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=clean_env())
    assert proc.returncode == 0, f"seeding {repo} at {target.upstream} failed: {proc.stderr[-2000:]}"


def upstream_manifest(target: Target, repo: str, tag: str = "v1") -> tuple[str, bytes]:
    """(digest, bytes) of the manifest the registry itself holds, read without the proxy."""
    cmd = ["skopeo", "inspect", "--raw", "--creds", target.upstream_creds, *target.skopeo_upstream_tls(),
           f"docker://{target.upstream_ref(repo, tag)}"]
    proc = subprocess.run(cmd, capture_output=True, timeout=120, env=clean_env())
    if proc.returncode != 0:
        raise AssertionError(f"{target.upstream_ref(repo, tag)} is not in the registry: "
                             f"{proc.stderr.decode(errors='replace')[-1000:]}")
    return "sha256:" + hashlib.sha256(proc.stdout).hexdigest(), proc.stdout


@dataclass
class IndexImage:
    layout_dir: Path
    tag: str
    index_digest: str
    platforms: dict[str, OciImage]  # architecture -> image

    @property
    def ref(self) -> str:
        return f"oci:{self.layout_dir}:{self.tag}"

    @property
    def digests(self) -> set[str]:
        out = {self.index_digest}
        for img in self.platforms.values():
            out |= {img.manifest_digest, img.config_digest, *img.layer_digests}
        return out


def make_index_layout(directory: Path, tag: str = "v1", archs: tuple[str, ...] = ("amd64", "arm64")) -> IndexImage:
    """An OCI layout whose ``tag`` is an image index over one small image per architecture."""
    images = {a: make_oci_layout(directory, [Layer(size=60_000), Layer(size=4_000, compressible=True)],
                                 tag=f"only-{a}", architecture=a, labels={"arch": a}) for a in archs}
    blobs = directory / "blobs" / "sha256"
    index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [
        {"mediaType": MT_MANIFEST, "digest": img.manifest_digest,
         "size": (blobs / img.manifest_digest.split(":")[1]).stat().st_size,
         "platform": {"architecture": a, "os": "linux"}} for a, img in images.items()]}
    data = json.dumps(index, separators=(",", ":"), sort_keys=True).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / digest.split(":")[1]).write_bytes(data)
    layout_index = json.loads((directory / "index.json").read_text())
    layout_index["manifests"] = [m for m in layout_index["manifests"]
                                 if m.get("annotations", {}).get(REF_NAME) != tag]
    layout_index["manifests"].append({"mediaType": MT_INDEX, "digest": digest, "size": len(data),
                                      "annotations": {REF_NAME: tag}})
    (directory / "index.json").write_text(json.dumps(layout_index, indent=2))
    return IndexImage(directory, tag, digest, images)


def image_digests(img: OciImage) -> set[str]:
    return {img.manifest_digest, img.config_digest, *img.layer_digests}


# ---- what the proxy said while a client ran ------------------------------------------------------------------

_LOG_INTERESTING = re.compile(
    r"^\S+: (GET|HEAD|POST|PUT|PATCH|DELETE|CONNECT|PRI|OPTIONS) |^\s*<< |error|warn|traceback|exception"
    r"|client (connect|disconnect)|Invalid|not supported|script", re.I)


class LogWindow:
    """The part of a log written from now on (a proxy's: reduced to requests, answers and errors)."""

    def __init__(self, path: Path, interesting: re.Pattern | None = _LOG_INTERESTING):
        self.path = path
        self.interesting = interesting
        self.start = self.path.stat().st_size if self.path.exists() else 0

    def lines(self) -> list[str]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self.start)
            text = f.read().decode(errors="replace")
        return [line.rstrip() for line in text.splitlines()
                if self.interesting is None or self.interesting.search(line)]

    def excerpt(self, limit: int = 40) -> str:
        lines = self.lines()
        skipped = len(lines) - limit
        return "\n".join(([f"  ... {skipped} earlier lines"] if skipped > 0 else []) + [f"  {l}" for l in lines[-limit:]])


@dataclass
class Run:
    ok: bool
    detail: str = ""


def redact(text: str, secrets_: list[str]) -> str:
    for s in secrets_:
        if s:
            text = text.replace(s, "<redacted>")
    return text


def attempt(target: Target, action, ctd: Containerd | None = None) -> Run:
    """Run ``action()``; a failure carries its message and what the proxy (and containerd) logged meanwhile."""
    proxy_log = LogWindow(target.proxy.log_path)
    ctd_log = LogWindow(ctd.log_path, re.compile(r"level=(error|warn)")) if ctd else None
    try:
        action()
        return Run(True)
    except (AssertionError, CtrError, subprocess.SubprocessError, OSError, ValueError, KeyError) as e:
        detail = f"{type(e).__name__}: {str(e).strip()[-1500:]}\n proxy log meanwhile:\n{proxy_log.excerpt()}"
        if ctd_log and ctd_log.lines():
            detail += f"\n containerd log meanwhile:\n{ctd_log.excerpt(10)}"
        return Run(False, redact(detail, [target.token]))


def assert_every_run(runs: list[Run], what: str) -> None:
    ok = sum(r.ok for r in runs)
    if ok == len(runs):
        return
    failures = [f"run {i + 1}: {r.detail}" for i, r in enumerate(runs) if not r.ok]
    raise AssertionError(f"{what}: {ok}/{len(runs)} runs succeeded\n" + "\n".join(failures[:3]))


# ---- fixtures ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ctd():
    try:
        daemon = Containerd().start()
    except ContainerdError as e:
        pytest.skip(f"containerd cannot run here: {e}")
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def fwd(tmp_path_factory):
    f = Forward(tmp_path_factory.mktemp("ctr-forward"))
    yield f
    f.stop()
    written = f.proxy.everything_written()
    leaked = [i for i, s in enumerate(f.secrets) if s.encode() in written]
    assert not leaked, f"secrets #{leaked} appear in {f.proxy.log_path} or {f.proxy.flows_path}"


@dataclass
class Seeds:
    small: OciImage
    index: IndexImage
    large: OciImage
    repos: dict[str, str]  # kind -> repository (same name in both registries)
    # what is pushed: other images, in containerd's `src` namespace, so that no blob containerd reads to
    # push is one that the pulls keep writing and collecting in their namespaces
    push_small: OciImage
    push_index: IndexImage
    push_large: OciImage


@pytest.fixture(scope="module")
def targets(world, fwd, tmp_path_factory) -> dict[str, Target]:
    tmp = tmp_path_factory.mktemp("ctr-targets")
    return {**reverse_targets(world, tmp), "forward": forward_target(fwd)}


def small_image(directory: Path) -> OciImage:
    return make_oci_layout(directory, [Layer(size=300_000), Layer(size=20_000, compressible=True)],
                           tag="v1", labels={"kind": "small"})


def large_image(directory: Path) -> OciImage:
    return make_oci_layout(directory, [Layer(size=LARGE_SIZE), Layer(size=2_000)], tag="v1", labels={"kind": "large"})


def import_image(ctd: Containerd, layout: Path, name: str, namespace: str = "src") -> None:
    """Put an OCI layout into containerd's store as `<name>:<tag>` (no network, no unpacking)."""
    archive = layout.with_suffix(".tar")
    subprocess.run(["tar", "-C", str(layout), "-cf", str(archive), "."], check=True, timeout=120)
    ctd.ctr("images", "import", "--no-unpack", "--all-platforms", "--base-name", name, str(archive),
            namespace=namespace, timeout=300)


@pytest.fixture(scope="module")
def seeds(targets, ctd, tmp_path_factory) -> Seeds:
    """Images to pull in both registries (host and path forms share one), others to push in containerd."""
    tmp = tmp_path_factory.mktemp("ctr-images")
    small, index, large = small_image(tmp / "small"), make_index_layout(tmp / "index"), large_image(tmp / "large")
    repos = {"small": f"ctr-{RUN}/small", "index": f"ctr-{RUN}/index", "large": f"ctr-{RUN}/large"}
    for t in (targets["path"], targets["forward"]):
        seed(t, small.ref, repos["small"])
        seed(t, index.ref, repos["index"], all_images=True)
        seed(t, large.ref, repos["large"])
    push_small, push_index = small_image(tmp / "push-small"), make_index_layout(tmp / "push-index")
    push_large = large_image(tmp / "push-large")
    for kind, img in (("small", push_small), ("index", push_index), ("large", push_large)):
        import_image(ctd, img.layout_dir, f"localhost/{kind}")
    assert {f"localhost/{k}:v1" for k in repos} <= set(ctd.images("src")), ctd.images("src")
    return Seeds(small, index, large, repos, push_small, push_index, push_large)


@pytest.fixture(params=FORMS)
def target(request, targets, tmp_path) -> Target:
    if request.param == "host":
        problem = host_form_problem(tmp_path)
        if problem:
            pytest.skip(problem)
    return targets[request.param]


# ---- ctr through the proxy ---------------------------------------------------------------------------------

def ctr_remote_args(t: Target) -> list[str]:
    if t.reverse:
        return ["--plain-http", "--user", f"x:{t.token}"]
    return ["--tlscacert", str(t.proxy_ca)]  # the client token travels in HTTPS_PROXY


def pull_once(ctd: Containerd, t: Target, ref: str, namespace: str, expect_target: str,
              expect_content: set[str], all_platforms: bool = False, timeout: float = 180) -> None:
    ctd.reset(namespace)  # nothing cached: every blob comes over the network
    ctd.ctr("images", "pull", "--snapshotter", "native", *(["--all-platforms"] if all_platforms else []),
            *ctr_remote_args(t), ref, namespace=namespace, env=t.env, wrap=t.wrap, timeout=timeout)
    images = ctd.images(namespace)
    assert images.get(ref) == expect_target, f"after the pull, {ref} -> {images.get(ref)}, expected {expect_target}"
    missing = expect_content - set(ctd.content(namespace))
    assert not missing, f"pulled content lacks {sorted(missing)}"


def push_once(ctd: Containerd, t: Target, source: str, repo: str, expect_digest: str, timeout: float = 180) -> None:
    ref = t.ref(repo)
    ctd.ctr("images", "tag", "--force", source, ref, namespace="src")
    ctd.ctr("images", "push", *ctr_remote_args(t), ref, namespace="src", env=t.env, wrap=t.wrap, timeout=timeout)
    digest, _ = upstream_manifest(t, repo)
    assert digest == expect_digest, f"the registry holds {digest} at {repo}, expected {expect_digest}"


def repeat(times: int, ctd: Containerd, target: Target, action, what: str) -> None:
    """``action(i)`` ``times`` times in a row; every single run must succeed."""
    assert_every_run([attempt(target, lambda: action(i), ctd) for i in range(times)], what)


def test_pull_small_image_every_time(ctd, target, seeds):
    ref = target.ref(seeds.repos["small"])
    repeat(PULLS, ctd, target, lambda i: pull_once(
        ctd, target, ref, f"pull-small-{target.form}", seeds.small.manifest_digest, image_digests(seeds.small)),
        f"ctr images pull, {target.form} form, {ref}")


def test_push_small_image_every_time(ctd, target, seeds):
    repo = f"ctr-{RUN}/push-small-{target.form}-"
    repeat(PUSHES, ctd, target, lambda i: push_once(
        ctd, target, "localhost/small:v1", f"{repo}{i}", seeds.push_small.manifest_digest),
        f"ctr images push, {target.form} form, {target.ref(repo + 'N')}")


def test_pull_multiplatform_index_every_time(ctd, target, seeds):
    ref = target.ref(seeds.repos["index"])
    repeat(PULLS, ctd, target, lambda i: pull_once(
        ctd, target, ref, f"pull-index-{target.form}", seeds.index.index_digest, seeds.index.digests,
        all_platforms=True),
        f"ctr images pull --all-platforms, {target.form} form, {ref}")


def test_push_multiplatform_index_every_time(ctd, target, seeds):
    repo = f"ctr-{RUN}/push-index-{target.form}-"
    repeat(PUSHES, ctd, target, lambda i: push_once(
        ctd, target, "localhost/index:v1", f"{repo}{i}", seeds.push_index.index_digest),
        f"ctr images push (index, all platforms), {target.form} form, {target.ref(repo + 'N')}")


def test_pull_large_layer_every_time(ctd, target, seeds):
    ref = target.ref(seeds.repos["large"])
    repeat(LARGE_PULLS, ctd, target, lambda i: pull_once(
        ctd, target, ref, f"pull-large-{target.form}", seeds.large.manifest_digest, image_digests(seeds.large),
        timeout=300),
        f"ctr images pull ({LARGE_SIZE >> 20} MiB layer), {target.form} form, {ref}")


def test_push_large_layer_every_time(ctd, target, seeds):
    repo = f"ctr-{RUN}/push-large-{target.form}-"
    repeat(LARGE_PUSHES, ctd, target, lambda i: push_once(
        ctd, target, "localhost/large:v1", f"{repo}{i}", seeds.push_large.manifest_digest, timeout=300),
        f"ctr images push ({LARGE_SIZE >> 20} MiB layer), {target.form} form, {target.ref(repo + 'N')}")
