"""Per-connector policy: which repositories and actions a connector serves, optionally per identity.

Declared in an annotation on the Connector, so the seed's manifests keep their shape and mean "no
restriction" (no annotation, no policy):

    metadata:
      annotations:
        connectors.alauda.io/policy: |
          - repositories: ["base/*"]            # everyone allowed to use the connector may pull base/*
            actions: [pull]
          - namespaces: [team-a]                # ServiceAccounts of namespace team-a ...
            repositories: ["team-a/*"]
            actions: [pull, push]               # ... pull and push team-a/*
          - subjects: ["system:serviceaccount:ops:cleaner"]
            repositories: ["*"]
            actions: [delete, catalog]

Rules add up: a request is allowed when any rule that applies to the caller covers its repository
and action. `repositories` are glob patterns (`*` and `?` match any characters, `/` included) on the
registry's own repository names; `actions` are `pull`, `push`, `delete` and `catalog` (listing
`/v2/_catalog`, filtered to the repositories the caller's rules name); `subjects` are glob patterns
on the caller's identity and `namespaces` name ServiceAccount namespaces; a rule with neither
applies to everyone. Pure: the model parses it, the policy addon enforces it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import yaml

POLICY_ANNOTATION = "connectors.alauda.io/policy"
ACTIONS = ("pull", "push", "delete", "catalog")
MAX_POLICY_LENGTH = 64 * 1024
MAX_RULES = 256


class PolicyError(ValueError):
    """A policy annotation that cannot be understood; the message says where."""


@dataclass(frozen=True)
class Rule:
    number: int  # 1-based, as people count the items of the annotation
    repositories: tuple[str, ...]
    actions: tuple[str, ...]
    subjects: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()

    def applies_to(self, subject: str) -> bool:
        if not self.subjects and not self.namespaces:
            return True
        if any(fnmatch.fnmatchcase(subject, s) for s in self.subjects):
            return True
        parts = subject.split(":")
        return len(parts) == 4 and parts[:2] == ["system", "serviceaccount"] and parts[2] in self.namespaces

    def covers(self, repository: str | None) -> bool:
        if repository is None:
            return True
        return any(fnmatch.fnmatchcase(repository, p) for p in self.repositories)

    def describe(self) -> str:
        who = ", ".join([*self.subjects, *(f"namespace {n}" for n in self.namespaces)]) or "everyone"
        return f"rule {self.number} ({who}: {','.join(self.actions)} on {', '.join(self.repositories)})"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # the rule that allowed it, or why nothing did


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]

    def decide(self, subject: str, repository: str | None, action: str) -> Decision:
        """May `subject` take `action` on `repository` (None: the catalog)?"""
        mine = [r for r in self.rules if r.applies_to(subject)]
        for rule in mine:
            if action in rule.actions and rule.covers(repository):
                return Decision(True, rule.describe())
        what = "list the catalog" if repository is None else f"{action} {repository}"
        near = [r for r in mine if r.covers(repository)]
        if near:
            return Decision(False, f"{subject} may not {what}: {'; '.join(r.describe() for r in near)} "
                                   f"cover(s) the repository but not {action}")
        return Decision(False, f"{subject} may not {what}: no rule of the connector's policy covers it")

    def allowed_actions(self, subject: str, repository: str) -> set[str]:
        return {a for r in self.rules if r.applies_to(subject) and r.covers(repository) for a in r.actions}

    def lists(self, subject: str, repository: str) -> bool:
        """Whether a filtered catalog shows `repository` to `subject` (any rule of theirs names it)."""
        return any(r.applies_to(subject) and r.covers(repository) for r in self.rules)


def parse_policy(text: object) -> Policy:
    """The annotation's value -> Policy; raises only PolicyError (the message names the rule and field)."""
    if not isinstance(text, str):
        raise PolicyError(f"expected a string (YAML), got {type(text).__name__}")
    if len(text) > MAX_POLICY_LENGTH:
        raise PolicyError(f"longer than {MAX_POLICY_LENGTH} characters")
    try:
        doc = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError, ValueError):
        raise PolicyError("not valid YAML") from None
    if not isinstance(doc, list) or not doc:
        raise PolicyError("expected a non-empty list of rules")
    if len(doc) > MAX_RULES:
        raise PolicyError(f"more than {MAX_RULES} rules")
    return Policy(tuple(_rule(i + 1, item) for i, item in enumerate(doc)))


def _rule(number: int, item: object) -> Rule:
    where = f"rule {number}"
    if not isinstance(item, dict):
        raise PolicyError(f"{where}: expected a mapping with repositories and actions")
    unknown = set(item) - {"repositories", "actions", "subjects", "namespaces"}
    if unknown:
        raise PolicyError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    repositories = _strings(item.get("repositories"), f"{where}.repositories", required=True)
    actions = _strings(item.get("actions"), f"{where}.actions", required=True)
    bad = [a for a in actions if a not in ACTIONS]
    if bad:
        raise PolicyError(f"{where}.actions: unknown action(s) {', '.join(bad)} (known: {', '.join(ACTIONS)})")
    return Rule(number, repositories, actions, _strings(item.get("subjects"), f"{where}.subjects"),
                _strings(item.get("namespaces"), f"{where}.namespaces"))


def _strings(value: object, where: str, required: bool = False) -> tuple[str, ...]:
    if value is None:
        if required:
            raise PolicyError(f"{where}: required")
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v and v.isprintable() for v in value):
        raise PolicyError(f"{where}: expected a list of non-empty strings")
    if required and not value:
        raise PolicyError(f"{where}: must not be empty")
    return tuple(value)


def policy_from_annotations(annotations: object) -> Policy | None:
    """The policy in a Connector's annotations, None when it has none; raises PolicyError."""
    if not isinstance(annotations, dict) or POLICY_ANNOTATION not in annotations:
        return None
    return parse_policy(annotations[POLICY_ANNOTATION])


def narrow_scope(scope: str, allowed: Iterable[str]) -> str | None:
    """`repository:x:pull,push` with only the allowed actions; None when none is left."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    keep = [a for a in actions.split(",") if a in set(allowed)]
    return f"{kind}:{name}:{','.join(keep)}" if keep else None
