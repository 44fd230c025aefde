"""The connector store addon: owns the backend that knows the connectors and keeps it fresh."""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import ctx, exceptions

from connector_store.files import DirectoryStore
from connector_store.model import Catalog, Connector

logger = logging.getLogger(__name__)


class ConnectorStore:
    """Options `connectors_dir` and `connectors_poll_ms`; `get()` answers from the latest catalog."""

    def __init__(self) -> None:
        self.backend: DirectoryStore | None = None
        self._poller: asyncio.Task | None = None

    def load(self, loader):
        loader.add_option("connectors_dir", str, "", "Directory of Connector and Secret manifests (YAML).")
        loader.add_option(
            "connectors_poll_ms", int, 1000, "Milliseconds between checks of connectors_dir for changes."
        )

    def configure(self, updated):
        if "connectors_dir" in updated and ctx.options.connectors_dir:
            backend = DirectoryStore(ctx.options.connectors_dir)
            if not backend.directory.is_dir():
                raise exceptions.OptionsError(f"connectors_dir {backend.directory} is not a directory")
            backend.refresh()
            self.backend = backend

    def running(self):
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    def done(self):
        if self._poller:
            self._poller.cancel()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(ctx.options.connectors_poll_ms / 1000)
            if self.backend:
                await asyncio.to_thread(self.backend.refresh)

    @property
    def catalog(self) -> Catalog:
        return self.backend.catalog if self.backend else Catalog()

    @property
    def synced(self) -> bool:
        return bool(self.backend and self.backend.synced)

    def get(self, namespace: str, name: str) -> Connector | None:
        return self.catalog.get(namespace, name)
