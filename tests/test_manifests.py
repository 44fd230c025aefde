"""Every manifest validates offline against the Kubernetes schemas; the CRD accepts the seed's Connector."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "manifests"
K8S_VERSION = "1.30.0"


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_manifest_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.rglob("*.yaml") if p.name != "kustomization.yaml")


def crd_schema() -> dict:
    [crd] = documents(MANIFESTS / "crd.yaml")
    [version] = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


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


def test_kustomization_lists_existing_files():
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (MANIFESTS / resource).is_file(), resource


def test_crd_accepts_the_seed_connector_and_rejects_nonsense():
    seed = [d for d in documents(MANIFESTS / "examples" / "seed" / "harbor.yaml") if d["kind"] == "Connector"][0]
    jsonschema.validate(seed, crd_schema())
    broken = {**seed, "spec": {k: v for k, v in seed["spec"].items() if k != "address"}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, crd_schema())


def test_crd_has_status_subresource_and_printer_columns():
    [crd] = documents(MANIFESTS / "crd.yaml")
    [version] = crd["spec"]["versions"]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"].upper() for c in version["additionalPrinterColumns"]]
    assert columns == ["CLASS", "ADDRESS", "READY", "REASON", "AGE"]


def test_deployment_is_hardened_and_probed():
    deployment = next(d for d in documents(MANIFESTS / "deployment.yaml") if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [proxy] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert proxy["securityContext"]["readOnlyRootFilesystem"] is True
    assert proxy["securityContext"]["allowPrivilegeEscalation"] is False
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert proxy["resources"]["requests"] and proxy["resources"]["limits"]


def test_cluster_role_is_least_privilege():
    role = next(d for d in documents(MANIFESTS / "rbac.yaml") if d["kind"] == "ClusterRole")
    verbs = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert verbs[("", "secrets")] == {"get", "list", "watch"}
    assert verbs[("connectors.alauda.io", "connectors/status")] <= {"get", "patch", "update"}
    assert all("*" not in v and "delete" not in v for v in verbs.values())
