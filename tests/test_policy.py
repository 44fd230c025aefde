"""Unit tests for connector policies (connector_store/policy.py) and the audit record (addons/audit.py)."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from addons.audit import query_keys
from addons.policy import allowed_scopes, filter_catalog
from addons.status import check_connector
from connector_store.model import parse_connector
from connector_store.policy import POLICY_ANNOTATION, PolicyError, narrow_scope, parse_policy

POLICY = parse_policy("""
- repositories: ["base/*"]
  actions: [pull]
- namespaces: [team-a]
  repositories: ["team-a/*"]
  actions: [pull, push]
- subjects: ["system:serviceaccount:ops:*"]
  repositories: ["*"]
  actions: [delete, catalog]
""")
A, B, OPS = "system:serviceaccount:team-a:ci", "system:serviceaccount:team-b:ci", "system:serviceaccount:ops:cleaner"


@pytest.mark.parametrize("subject, repo, action, allowed", [
    (A, "base/x", "pull", True), (B, "base/x", "pull", True), (A, "base/x", "push", False),
    (A, "team-a/app", "push", True), (B, "team-a/app", "pull", False), (A, "team-a/deep/er", "push", True),
    (OPS, "anything/at/all", "delete", True), (OPS, None, "catalog", True), (A, None, "catalog", False),
    ("system:serviceaccount:team-a-evil:x", "team-a/app", "push", False), ("team-a", "team-a/app", "push", False),
])
def test_decisions(subject, repo, action, allowed):
    decision = POLICY.decide(subject, repo, action)
    assert decision.allowed is allowed
    assert ("rule" in decision.reason) if allowed else (subject in decision.reason)


def test_a_denial_names_the_rules_that_cover_the_repository():
    reason = POLICY.decide(A, "base/x", "push").reason
    assert "rule 1" in reason and "but not push" in reason


@pytest.mark.parametrize("text", [
    "", "[]", "{}", "- repositories: [x]", "- actions: [pull]", "- repositories: [x]\n  actions: [fly]",
    "- repositories: x\n  actions: [pull]\n  color: red", "- 5", "[[[[", "- repositories: ['']\n  actions: [pull]",
])
def test_bad_policies_raise_only_policy_error(text):
    with pytest.raises(PolicyError):
        parse_policy(text)


@settings(deadline=None, derandomize=True, database=None)  # reproducible in CI, no timing flakes
@given(st.text(max_size=300))
def test_any_text_parses_or_raises_policy_error(text):
    try:
        parse_policy(text)
    except PolicyError:
        pass


def test_scopes_are_narrowed_to_the_policy():
    assert narrow_scope("repository:x:pull,push", {"pull"}) == "repository:x:pull"
    assert narrow_scope("repository:x:push", set()) is None
    assert allowed_scopes(POLICY, A, ("repository:base/x:pull,push", "repository:team-a/y:pull,push")) == (
        "repository:base/x:pull", "repository:team-a/y:pull,push")
    assert allowed_scopes(None, A, ("repository:z:pull",)) == ("repository:z:pull",)


def test_catalog_filtering():
    body = b'{"repositories": ["base/a", "team-a/b", "team-b/c", 5]}'
    assert filter_catalog(body, POLICY, A) == b'{"repositories": ["base/a", "team-a/b"]}'
    assert filter_catalog(b"not json", POLICY, A) is None


def test_an_unparseable_policy_is_a_connector_problem_shown_in_its_conditions():
    doc = yaml.safe_load("""
apiVersion: connectors.alauda.io/v1alpha1
kind: Connector
metadata: {name: h, annotations: {%s: "- actions: [fly]"}}
spec: {address: "https://r.example.com", connectorClassName: oci}
""" % POLICY_ANNOTATION)
    c = parse_connector(doc, {})
    assert not c.usable and c.reason == "PolicyInvalid"
    ready = check_connector(c, client=None)[-1]
    assert ready.type == "Ready" and ready.status == "False" and ready.reason == "PolicyInvalid"


def test_the_seed_shape_means_no_policy():
    doc = {"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector", "metadata": {"name": "harbor"},
           "spec": {"address": "https://harbor.example.com", "connectorClassName": "oci"}}
    assert parse_connector(doc, {}).policy is None


def test_audit_paths_keep_query_keys_only():
    assert query_keys("/v2/a/blobs/uploads/x?_state=abc.def&digest=sha256:1") == "/v2/a/blobs/uploads/x?_state&digest"
    assert query_keys("/v2/a/tags/list") == "/v2/a/tags/list"
