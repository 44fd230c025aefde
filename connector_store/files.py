"""The directory backend: Connector and Secret manifests in a directory of YAML files.

`refresh()` re-reads the directory when any file was added, changed or removed (by comparing
name, size and mtime), so the proxy picks up edits without a restart. It is cheap enough to be
called every second; the proxy's store addon does exactly that.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import yaml

from connector_store.model import Catalog, build_catalog, flatten

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


class DirectoryStore:
    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        self.catalog = Catalog()
        self.synced = False
        self._signature: tuple | None = None
        self._lock = threading.Lock()

    def _files(self) -> list[Path]:
        # Dotfiles are skipped: a ConfigMap volume keeps its real files under `..data/`
        # and exposes them through symlinks, which we follow.
        return sorted(
            p for p in self.directory.iterdir()
            if not p.name.startswith(".") and p.suffix in MANIFEST_SUFFIXES and p.is_file()
        )

    def signature(self) -> tuple:
        """(name, size, mtime) of every manifest file: changes whenever the directory does."""
        sig = []
        for p in self._files():
            st = p.stat()
            sig.append((p.name, st.st_size, st.st_mtime_ns))
        return tuple(sig)

    def refresh(self) -> bool:
        """Reload if the directory changed. Returns True when a new catalog was loaded."""
        with self._lock:
            try:
                signature = self.signature()
            except OSError as e:
                logger.error("connector directory %s unreadable: %s", self.directory, e)
                return False
            if signature == self._signature:
                return False
            docs = []
            read_errors = []
            for path in self._files():
                try:
                    with path.open() as f:
                        docs.extend((path.name, d) for d in flatten(yaml.safe_load_all(f)))
                except (OSError, yaml.YAMLError) as e:
                    read_errors.append(f"{path.name}: cannot read: {e}")
            catalog = build_catalog(docs)
            self.catalog = Catalog(catalog.connectors, tuple(read_errors) + catalog.errors)
            self._signature = signature
            self.synced = True
        self._report()
        return True

    def _report(self) -> None:
        for error in self.catalog.errors:
            logger.error("manifest skipped: %s", error)
        for c in self.catalog.connectors.values():
            if c.usable:
                logger.info("connector %s ready: %s", c.key, c.address)
            else:
                logger.warning("connector %s not usable: %s", c.key, c.problem)
