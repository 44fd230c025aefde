"""The directory backend: Connector and Secret manifests in a directory of YAML files.

`refresh()` re-reads the directory when any file was added, changed or removed (by comparing
name, size and mtime), so the proxy picks up edits without a restart. It is cheap enough to be
called every second; the proxy's store addon does exactly that.

A file that cannot be read or parsed (YAML syntax, invalid UTF-8, a recursive alias, a `kind: List`
whose items are no list) becomes one entry in `catalog.errors`, logged; every other file still loads.
`parse_manifests` is the whole per-file parser: bytes in, manifests out, ManifestError and nothing else.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from connector_store.model import Catalog, ManifestError, build_catalog, flatten

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


def _yaml_problem(e: yaml.YAMLError) -> str:
    """What is wrong and where, without the snippet of the file PyYAML quotes (it may be a password line)."""
    if isinstance(e, yaml.reader.ReaderError):
        if e.encoding != "unicode":  # a decoding error (PyYAML's own str() mistakes it for a character)
            return f"not valid {e.encoding} text (byte {e.position})"
        return f"unacceptable character #x{e.character:04x} (character {e.position})"
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        what = e.problem or e.context or "invalid YAML"
        return f"{what} (line {mark.line + 1}, column {mark.column + 1})" if mark else what
    return type(e).__name__


def parse_manifests(data: bytes) -> list[Mapping[str, Any]]:
    """The manifests in one file's bytes (YAML or JSON, several documents, `kind: List` expanded).

    Raises ManifestError and nothing else, whatever the bytes are.
    """
    try:
        # bytes, not str: PyYAML decodes UTF-8 (or UTF-16 with a BOM) itself and reports invalid
        # text as a ReaderError instead of a UnicodeDecodeError from the file object.
        docs = list(yaml.safe_load_all(data))
    except yaml.YAMLError as e:
        raise ManifestError(f"invalid YAML: {_yaml_problem(e)}") from None
    except RecursionError:  # "[[[[...": PyYAML's composer and constructor recurse per level
        raise ManifestError("invalid YAML: nested too deeply") from None
    except ValueError as e:  # PyYAML's constructors: `2024-13-01` (a date), a 5000-digit int
        raise ManifestError(f"invalid YAML: a value cannot be converted: {str(e)[:100]}") from None
    except Exception as e:  # noqa: BLE001 - PyYAML's own bugs: `!!float ''` is an IndexError
        raise ManifestError(f"invalid YAML: the parser failed ({type(e).__name__})") from None
    return list(flatten(docs))


class DirectoryStore:
    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        self.catalog = Catalog()
        self.synced = False
        self._signature: tuple | None = None
        # file name -> ((size, mtime), manifests, problem): what was parsed, reused until it changes
        self._parsed: dict[str, tuple[tuple, list, str | None]] = {}
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
        """Reload if the directory changed. Returns True when a new catalog was loaded.

        Only files added or changed since the last reload are read and parsed again (a directory
        of 5,000 connectors does not re-parse 5,000 files for one edit), and only what changed is
        logged.
        """
        with self._lock:
            try:
                signature = self.signature()
            except OSError as e:
                logger.error("connector directory %s unreadable: %s", self.directory, e)
                return False
            if signature == self._signature:
                return False
            parsed: dict[str, tuple[tuple, list, str | None]] = {}
            for name, size, mtime in signature:
                cached = self._parsed.get(name)
                if cached is not None and cached[0] == (size, mtime):
                    parsed[name] = cached
                    continue
                try:
                    docs = parse_manifests((self.directory / name).read_bytes())
                    parsed[name] = ((size, mtime), docs, None)
                except (OSError, ManifestError) as e:
                    parsed[name] = ((size, mtime), [], f"{name}: cannot read: {e}")
            docs = [(name, d) for name, (_, file_docs, _) in parsed.items() for d in file_docs]
            read_errors = tuple(err for _, _, err in parsed.values() if err)
            catalog = build_catalog(docs)
            before = self.catalog
            self.catalog = Catalog(catalog.connectors, read_errors + catalog.errors)
            self._parsed = parsed
            self._signature = signature
            self.synced = True
        self._report(before)
        return True

    def _report(self, before: Catalog) -> None:
        """Log what changed: new problems, connectors added, changed or removed."""
        known = set(before.errors)
        for error in self.catalog.errors:
            if error not in known:
                logger.warning("manifest skipped: %s", error)
        for key, c in self.catalog.connectors.items():
            if before.connectors.get(key) == c:
                continue
            if c.usable:
                logger.info("connector %s ready: %s", c.key, c.address)
            else:
                logger.warning("connector %s not usable: %s", c.key, c.problem)
        for key in before.connectors.keys() - self.catalog.connectors.keys():
            logger.info("connector %s removed", key)
