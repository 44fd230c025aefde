"""Who is calling: identities and the static token file backend (Kubernetes identities are in kube.py)."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    subject: str
    connectors: tuple[str, ...] = ()  # "ns/name", "ns/*" or "*"; used by the static backend
    kube: Any = field(default=None, compare=False)  # the TokenReview's user, for SubjectAccessReviews


class IdentityBackend(Protocol):
    blocking: bool  # True when answering may wait on the network (run off the event loop)

    def authenticate(self, token: str) -> Identity | None: ...
    def authorize(self, identity: Identity, namespace: str, name: str) -> bool: ...


def token_digest(token: str) -> str:
    """What we key identities by: never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


def may_use(patterns: tuple[str, ...], namespace: str, name: str) -> bool:
    return any(p in ("*", f"{namespace}/*", f"{namespace}/{name}") for p in patterns)


class StaticTokens:
    """Tokens from a YAML file: `tokens: [{token, subject, connectors: ["ns/name" | "ns/*" | "*"]}]`.

    Re-read when the file changes, so tokens can be added without a restart.
    """

    blocking = False

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._by_digest: Mapping[str, Identity] = {}
        self._mtime: int | None = None
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        st = self.path.stat()
        if st.st_mtime_ns == self._mtime:
            return
        with self._lock:
            doc = yaml.safe_load(self.path.read_text()) or {}
            entries = doc.get("tokens") if isinstance(doc, dict) else None
            if not isinstance(entries, list):
                raise ValueError(f"{self.path}: expected a mapping with a 'tokens' list")
            table: dict[str, Identity] = {}
            for i, e in enumerate(entries):
                if not isinstance(e, dict) or not e.get("token") or not e.get("subject"):
                    raise ValueError(f"{self.path}: tokens[{i}] needs 'token' and 'subject'")
                connectors = e.get("connectors") or []
                if not isinstance(connectors, list):
                    raise ValueError(f"{self.path}: tokens[{i}].connectors must be a list")
                table[token_digest(str(e["token"]))] = Identity(str(e["subject"]), tuple(map(str, connectors)))
            self._by_digest = table
            self._mtime = st.st_mtime_ns
        logger.info("client tokens loaded from %s: %d identities", self.path, len(table))

    def authenticate(self, token: str) -> Identity | None:
        try:
            self._load()
        except (OSError, ValueError, yaml.YAMLError) as e:
            logger.error("client token file: %s; keeping the previous tokens", e)
        return self._by_digest.get(token_digest(token))

    def authorize(self, identity: Identity, namespace: str, name: str) -> bool:
        return may_use(identity.connectors, namespace, name)
