"""The manifests, offline: every one validates against the Kubernetes schemas; the CRD accepts the
seed's Connector and refuses what the proxy would silently ignore; the RBAC is exactly what the code
does with the API server; both installs build with kustomize and agree with themselves; the
Deployment, the examples and the Containerfile keep the promises the README makes about them.

(tests/test_manifests_run.py runs them.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "manifests"
K8S_VERSION = "1.30.0"
GROUP = "connectors.alauda.io"
PROXY_SA = ("connectors-system", "connector-proxy")
LEASE_NAME = "connector-proxy-status"


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_manifest_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.rglob("*.yaml") if p.name != "kustomization.yaml")


def crd() -> dict:
    [doc] = documents(MANIFESTS / "base" / "crd.yaml")
    return doc


def crd_schema() -> dict:
    [version] = crd()["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def build(directory: Path) -> list[dict]:
    """What `kubectl apply -k DIR` applies: kustomize's output, or (without kubectl) the resources of
    kustomizations that have nothing else."""
    if shutil.which("kubectl"):
        proc = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return [d for d in yaml.safe_load_all(proc.stdout) if d]
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    if set(k) - {"apiVersion", "kind", "resources"}:
        pytest.skip(f"kubectl (kustomize) is not installed: {directory.relative_to(REPO)} needs more than resources")
    out: list[dict] = []
    for r in k["resources"]:
        out += build(directory / r) if (directory / r).is_dir() else documents(directory / r)
    return out


def example(name: str) -> list[dict]:
    return documents(MANIFESTS / "examples" / name)


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


# ============================================================================ schemas


@pytest.mark.parametrize("path", all_manifest_files(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_manifest_validates(path):
    docs = documents(path)
    assert docs, f"{path} holds no manifest"
    for doc in docs:
        if doc.get("kind") == "Connector":
            jsonschema.validate(doc, crd_schema())
        elif doc.get("apiVersion", "").startswith("tekton.dev/"):
            validate_tekton(doc)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def validate_tekton(doc: dict) -> None:
    """Tekton has no Kubernetes schema here: its steps are Containers, its volumes Pod volumes."""
    steps = doc["spec"]["taskSpec"]["steps"]
    volumes = (doc["spec"].get("podTemplate") or {}).get("volumes", [])
    for step in steps:
        container = {k: v for k, v in step.items() if k != "script"}
        container.setdefault("command", ["/bin/sh"])
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "tekton-step"},
               "spec": {"containers": [container], "volumes": volumes}}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def kustomizations() -> list[Path]:
    return sorted(p.parent for p in MANIFESTS.rglob("kustomization.yaml"))


@pytest.mark.parametrize("directory", kustomizations(), ids=lambda p: str(p.relative_to(MANIFESTS)) or ".")
def test_kustomization_lists_existing_files(directory):
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        target = directory / resource
        assert target.is_file() or (target / "kustomization.yaml").is_file(), resource


@pytest.mark.parametrize("install", ["", "namespaced"], ids=["cluster-wide", "namespaced"])
def test_installs_build_and_validate(install):
    docs = build(MANIFESTS / install)
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole", "Deployment", "Service",
            "PodDisruptionBudget"} <= kinds


# ============================================================================ the CRD


def test_crd_accepts_the_seed_connector_and_rejects_nonsense():
    seed = [d for d in documents(MANIFESTS / "examples" / "seed" / "harbor.yaml") if d["kind"] == "Connector"][0]
    jsonschema.validate(seed, crd_schema())
    broken = {**seed, "spec": {k: v for k, v in seed["spec"].items() if k != "address"}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, crd_schema())


def test_crd_has_status_subresource_and_printer_columns():
    [version] = crd()["spec"]["versions"]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"].upper() for c in version["additionalPrinterColumns"]]
    assert columns == ["CLASS", "ADDRESS", "READY", "REASON", "AGE"]


def secret_ref_schema() -> dict:
    return crd_schema()["properties"]["spec"]["properties"]["auth"]["properties"]["secretRef"]


def test_crd_refuses_secret_ref_namespace_with_a_rule():
    """The proxy looks a Secret up in its Connector's namespace only; a secretRef.namespace is kept in
    the schema (not pruned silently) and refused by a CEL rule that says why."""
    ref = secret_ref_schema()
    assert "namespace" in ref["properties"], "a pruned field would vanish without a word"
    [rule] = ref["x-kubernetes-validations"]
    # `namespace` is a CEL reserved word: Kubernetes exposes the property as __namespace__
    assert rule["rule"] == "!has(self.__namespace__)"
    assert "Connector's own namespace" in " ".join(rule["message"].split())
    assert rule.get("fieldPath") == ".namespace"


# Kubernetes' escaping of property names in CEL (apiextensions-apiserver, cel/model/escaping.go).
CEL_RESERVED = {"true", "false", "null", "in", "as", "break", "const", "continue", "else", "for", "function", "if",
                "import", "let", "loop", "package", "namespace", "return", "var", "void", "while"}


def cel_escape(name: str) -> str:
    if name in CEL_RESERVED:
        return f"__{name}__"
    return (name.replace("__", "__underscores__").replace(".", "__dot__").replace("-", "__dash__")
            .replace("/", "__slash__"))


def cel_violations(schema: dict, obj, path: str = "") -> list[str]:
    """Every x-kubernetes-validations rule of the schema evaluated on the object, as the API server
    does (celpy: cel-python); the messages of the rules that fail."""
    celpy = pytest.importorskip("celpy", reason="cel-python is not installed (pip install cel-python)")
    out = []
    if isinstance(obj, dict):
        env = celpy.Environment()
        for rule in schema.get("x-kubernetes-validations", []):
            program = env.program(env.compile(rule["rule"]))
            escaped = {cel_escape(k): v for k, v in obj.items()}
            if not program.evaluate({"self": celpy.json_to_cel(escaped)}):
                out.append(f"{path}: {rule['message']}")
        for key, sub in (schema.get("properties") or {}).items():
            if key in obj:
                out += cel_violations(sub, obj[key], f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            out += cel_violations(schema["items"], item, f"{path}[{i}]")
    return out


def test_crd_rule_refuses_a_secret_namespace_and_accepts_the_seed():
    seed = [d for d in documents(MANIFESTS / "examples" / "seed" / "harbor.yaml") if d["kind"] == "Connector"][0]
    assert cel_violations(crd_schema(), seed) == []
    other = {**seed, "spec": {**seed["spec"], "auth": {**seed["spec"]["auth"],
                                                       "secretRef": {"name": "harbor-secret", "namespace": "ops"}}}}
    jsonschema.validate(other, crd_schema())  # structurally fine: the rule is what refuses it
    [message] = cel_violations(crd_schema(), other)
    assert message.startswith(".spec.auth.secretRef: spec.auth.secretRef.namespace is not supported")


# ============================================================================ RBAC


# What each Kubernetes client call the proxy makes needs: (verb, API group, resource).
CONNECTORS = [("list", GROUP, "connectors"), ("watch", GROUP, "connectors")]
SECRETS = [("list", "", "secrets"), ("watch", "", "secrets")]
CLIENT_CALLS = {
    "list_cluster_custom_object": CONNECTORS,  # list, then watch.Watch().stream() on the same call
    "list_namespaced_custom_object": CONNECTORS,
    "get_namespaced_custom_object": [("get", GROUP, "connectors")],
    "patch_namespaced_custom_object_status": [("patch", GROUP, "connectors/status")],
    "list_secret_for_all_namespaces": SECRETS,
    "list_namespaced_secret": SECRETS,
    "create_token_review": [("create", "authentication.k8s.io", "tokenreviews")],
    "create_subject_access_review": [("create", "authorization.k8s.io", "subjectaccessreviews")],
    "read_namespaced_lease": [("get", "coordination.k8s.io", "leases")],
    "create_namespaced_lease": [("create", "coordination.k8s.io", "leases")],
    "replace_namespaced_lease": [("update", "coordination.k8s.io", "leases")],
    "create_namespaced_service": [("create", "", "services")],
    "read_namespaced_service": [("get", "", "services")],
    "patch_namespaced_service": [("patch", "", "services")],
}
# `config render` runs as the workload, with the workload's permissions (examples/workload-rbac.yaml).
WORKLOAD_SIDE = {"connector_store/render_cli.py"}


def client_methods() -> set[str]:
    from kubernetes import client

    names: set[str] = set()
    for name in dir(client):
        if name.endswith("Api") and name != "ApiClient":
            names |= {m for m in dir(getattr(client, name))
                      if re.match(r"(list|read|create|replace|patch|delete|get|connect)_", m)}
    return names


def proxy_api_calls() -> dict[str, list[str]]:
    """Every Kubernetes client API method the proxy's code names, and where."""
    methods = client_methods()
    found: dict[str, list[str]] = {}
    for path in sorted([*REPO.glob("addons/*.py"), *REPO.glob("connector_store/*.py")]):
        rel = str(path.relative_to(REPO))
        if rel in WORKLOAD_SIDE:
            continue
        for name in re.findall(r"\.([a-z_][a-z0-9_]*)\b", path.read_text()):
            if name in methods:
                found.setdefault(name, []).append(rel)
    return found


def role_rules(docs: list[dict], namespace: str, name: str, kind: str) -> list[dict]:
    return one([d for d in docs if kind != "Role" or d["metadata"].get("namespace") == namespace], kind, name)["rules"]


def grants(docs: list[dict], sa: tuple[str, str] = PROXY_SA) -> list[tuple[str, str, str, str, tuple[str, ...]]]:
    """(scope, verb, group, resource, resourceNames) the ServiceAccount gets from the bindings:
    scope is "cluster" or the namespace a RoleBinding grants in."""
    out = []
    for b in docs:
        if b["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        if not any(s["kind"] == "ServiceAccount" and (s.get("namespace"), s["name"]) == sa for s in b["subjects"]):
            continue
        scope = "cluster" if b["kind"] == "ClusterRoleBinding" else b["metadata"]["namespace"]
        ref = b["roleRef"]
        for rule in role_rules(docs, b["metadata"].get("namespace", ""), ref["name"], ref["kind"]):
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        out.append((scope, verb, group, resource, tuple(rule.get("resourceNames") or ())))
    return out


def test_every_api_call_in_the_code_is_known():
    unknown = {m: where for m, where in proxy_api_calls().items() if m not in CLIENT_CALLS}
    assert not unknown, f"API calls not in CLIENT_CALLS (add them, with their verbs, and to the RBAC): {unknown}"


@pytest.mark.parametrize("install", ["", "namespaced"], ids=["cluster-wide", "namespaced"])
def test_rbac_verbs_are_exactly_what_the_code_uses(install):
    docs = build(MANIFESTS / install)
    used = {need for method in proxy_api_calls() for need in CLIENT_CALLS[method]}
    granted = {(verb, group, resource) for _, verb, group, resource, _ in grants(docs)}
    assert "*" not in {v for v, _, _ in granted} | {r for _, _, r in granted} | {g for _, g, _ in granted}
    assert granted == used, f"granted, not used: {sorted(granted - used)}; used, not granted: {sorted(used - granted)}"


def test_lease_access_is_limited_to_the_status_lease():
    assert f'"{LEASE_NAME}"' in (REPO / "addons" / "status.py").read_text()
    docs = build(MANIFESTS)
    leases = [g for g in grants(docs) if g[3] == "leases"]
    assert {(scope, verb, names) for scope, verb, _, _, names in leases} == {
        ("connectors-system", "get", (LEASE_NAME,)),
        ("connectors-system", "update", (LEASE_NAME,)),
        # a create names no object in its URL: RBAC cannot restrict it by name (a rule with
        # resourceNames would never allow it)
        ("connectors-system", "create", ()),
    }


def test_cluster_wide_install_explains_its_cluster_wide_secrets():
    docs = build(MANIFESTS)
    secrets = {(scope, verb) for scope, verb, _, resource, _ in grants(docs) if resource == "secrets"}
    assert secrets == {("cluster", "list"), ("cluster", "watch")}
    text = (MANIFESTS / "cluster-wide.yaml").read_text()
    assert "Why Secrets cluster-wide" in text and "manifests/namespaced/" in text


def test_namespaced_install_reads_only_its_namespaces():
    docs = build(MANIFESTS / "namespaced")
    cluster_wide = {(verb, resource) for scope, verb, _, resource, _ in grants(docs) if scope == "cluster"}
    assert cluster_wide == {("create", "tokenreviews"), ("create", "subjectaccessreviews")}
    [proxy] = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    watched = {a.split("=", 1)[1] for a in proxy["args"] if a.startswith("--namespace=")}
    served = {scope for scope, _, _, resource, _ in grants(docs) if resource == "secrets"}
    assert watched and watched == served, "one RoleBinding per --namespace, and one --namespace per RoleBinding"
    args = proxy["args"]
    assert all(args.index(a) < args.index("--") for a in args if a.startswith("--namespace="))


# ============================================================================ the Deployment


def deployment() -> dict:
    return one(documents(MANIFESTS / "base" / "deployment.yaml"), "Deployment")


def test_deployment_is_hardened_and_probed():
    pod = deployment()["spec"]["template"]["spec"]
    [proxy] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert proxy["securityContext"]["readOnlyRootFilesystem"] is True
    assert proxy["securityContext"]["allowPrivilegeEscalation"] is False
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert proxy["resources"]["requests"] and proxy["resources"]["limits"]


def test_deployment_args_agree_with_its_ports_and_volumes():
    [proxy] = deployment()["spec"]["template"]["spec"]["containers"]
    args = proxy["args"]
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert f"--listen=0.0.0.0:{ports['http']}" in args
    assert f"--forward-listen=0.0.0.0:{ports['forward']}" in args
    # --ca-dir is mitmproxy's confdir: a confdir set after it would replace the Secret's CA
    assert "--ca-dir=/etc/connector-proxy/ca" in args
    assert not [a for a in args if "confdir" in a]
    mounts = {m["mountPath"]: m["name"] for m in proxy["volumeMounts"]}
    assert mounts["/etc/connector-proxy/ca"] == "ca" and mounts["/tmp"] == "tmp"
    assert "--set=token_key_file=/etc/connector-proxy/token-key/key" in args
    assert mounts["/etc/connector-proxy/token-key"] == "token-key"
    volumes = {v["name"]: v for v in deployment()["spec"]["template"]["spec"]["volumes"]}
    assert volumes["token-key"]["secret"]["secretName"] == "connector-proxy-token-key"
    assert volumes["ca"]["secret"]["secretName"] == "connector-proxy-ca"


def test_deployment_drains_and_spreads():
    spec = deployment()["spec"]
    pod = spec["template"]["spec"]
    [proxy] = pod["containers"]
    pre_stop = proxy["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = next(int(a.split("=")[-1]) for a in proxy["args"] if a.startswith("--set=shutdown_grace="))
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + grace
    labels = spec["template"]["metadata"]["labels"]
    keys = set()
    for constraint in pod["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()
        keys.add(constraint["topologyKey"])
    assert "kubernetes.io/hostname" in keys
    pdb = one(documents(MANIFESTS / "base" / "pdb.yaml"), "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] < spec["replicas"]


IMAGE_RE = re.compile(r"^(?P<registry>[a-z0-9.-]+\.[a-z]{2,}|localhost)(:\d+)?/[a-z0-9._/-]+:[A-Za-z0-9._-]+$")


def containers_of(doc: dict) -> list[dict]:
    if doc["kind"] == "TaskRun":
        return doc["spec"]["taskSpec"]["steps"]
    if doc["kind"] not in ("Deployment", "Job", "Pod"):
        return []
    pod = doc["spec"]["template"]["spec"] if doc["kind"] != "Pod" else doc["spec"]
    return [*(pod.get("initContainers") or []), *pod["containers"]]


def test_images_are_fully_qualified():
    for path in all_manifest_files():
        for doc in documents(path):
            for c in containers_of(doc):
                assert IMAGE_RE.match(c["image"]), f"{path.name}: {c['image']} is not registry/repository:tag"


def test_containerfile():
    text = (REPO / "Containerfile").read_text()
    [base] = re.findall(r"^FROM (\S+)", text, re.M)
    assert IMAGE_RE.match(base), base
    assert re.search(r"^EXPOSE 8080 3128$", text, re.M)
    assert "COPY scripts/docker-credential-connector-proxy /usr/local/bin/docker-credential-connector-proxy" in text
    assert re.search(r"^USER 65532:65532$", text, re.M)


# ============================================================================ the examples


def test_sidecar_is_native_so_the_job_completes():
    job = one(example("sidecar.yaml"), "Job")
    pod = job["spec"]["template"]["spec"]
    [sidecar] = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always" and "startupProbe" in sidecar
    assert pod["automountServiceAccountToken"] is False  # only the sidecar gets an API token
    [build] = pod["containers"]
    assert not [m for m in build["volumeMounts"] if "kubernetes.io/serviceaccount" in m["mountPath"]]


def test_buildkit_job_keeps_the_seeds_volumes():
    """The seed mounts docker-config at /root/.docker, buildkitd-config at /etc/buildkit and the
    Dockerfile at /workspace; the example keeps those names and places."""
    job = one(example("buildkit-job.yaml"), "Job")
    [build] = job["spec"]["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in build["volumeMounts"]}
    assert {"docker-config": "/root/.docker", "buildkitd-config": "/etc/buildkit", "dockerfile": "/workspace"}.items() \
        <= mounts.items()


def build_containers_with_tokens():
    for name in ("buildkit-job.yaml", "buildah-job.yaml"):
        job = one(example(name), "Job")
        yield name, job["spec"]["template"]["spec"]


@pytest.mark.parametrize("name,pod", list(build_containers_with_tokens()), ids=lambda x: x if isinstance(x, str) else "")
def test_builds_use_the_credential_helper(name, pod):
    """The build container finds the helper on its PATH and the projected token where the helper reads
    it; the init container writes credHelpers, never a token."""
    [build] = pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in build["volumeMounts"]}
    path = next(e["value"] for e in build["env"] if e["name"] == "PATH").split(":")
    helper_dir = path[0]
    assert mounts[helper_dir] == "connector-bin"
    assert mounts["/var/run/secrets/connector-proxy"] == "proxy-token"
    scripts = " ".join(" ".join([*c.get("command", []), *c.get("args", [])]) for c in pod["initContainers"])
    assert "credHelpers" in scripts and "docker-credential-connector-proxy" in scripts
    assert '"auths"' not in scripts


def test_init_steps_retry_until_the_proxy_answers():
    for path in all_manifest_files():
        for doc in documents(path):
            for c in containers_of(doc):
                script = " ".join([*c.get("command", []), *c.get("args", []), c.get("script", "")])
                script = script.replace("\\\n", " ")  # continuation lines: one command
                for call in re.findall(r"\bcurl [^|;\n]*", script):
                    if "/.connectors/" in script:
                        assert "--retry-connrefused" in call and "--retry-all-errors" in call, f"{path.name}: {call}"
