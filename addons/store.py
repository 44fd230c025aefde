"""The connector store addon: owns the backend that knows the connectors and keeps it fresh.

Backends: a directory of YAML (`connectors_dir`, polled for changes) or the cluster
(`connectors_store=kubernetes`: list+watch with the official client).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from mitmproxy import ctx, exceptions

from addons.gate import describe_exception
from connector_store.files import DirectoryStore
from connector_store.model import Catalog, Connector

logger = logging.getLogger(__name__)


class ConnectorStore:
    """`get()` answers from the latest catalog of whichever backend is configured."""

    def __init__(self) -> None:
        self.backend = None  # DirectoryStore | KubeStore
        self._poller: asyncio.Task | None = None
        # Reloads run on a thread of their own: never queued behind upstream or identity calls.
        self._reloader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-reload")

    def load(self, loader):
        loader.add_option("connectors_dir", str, "", "Directory of Connector and Secret manifests (YAML).")
        loader.add_option(
            "connectors_poll_ms", int, 1000, "Milliseconds between checks of connectors_dir for changes."
        )
        loader.add_option(
            "connectors_store", str, "", "'kubernetes' to read Connectors and Secrets from the cluster."
        )
        loader.add_option("kubeconfig", str, "", "kubeconfig file (default: the in-cluster configuration).")
        loader.add_option(
            "connectors_namespaces", str, "", "Comma-separated namespaces to watch (default: all)."
        )

    def configure(self, updated):
        if "connectors_dir" in updated and ctx.options.connectors_dir:
            backend = DirectoryStore(ctx.options.connectors_dir)
            if not backend.directory.is_dir():
                raise exceptions.OptionsError(f"connectors_dir {backend.directory} is not a directory")
            backend.refresh()
            self._replace(backend)
        if updated & {"connectors_store", "kubeconfig", "connectors_namespaces"} and ctx.options.connectors_store:
            if ctx.options.connectors_store != "kubernetes":
                raise exceptions.OptionsError(f"connectors_store: unknown backend {ctx.options.connectors_store!r}")
            from connector_store.kube import KubeStore, api_client

            namespaces = [n.strip() for n in ctx.options.connectors_namespaces.split(",") if n.strip()]
            try:
                api = api_client(ctx.options.kubeconfig or None)
            except Exception as e:
                raise exceptions.OptionsError(f"kubernetes configuration: {e}") from e
            self._replace(KubeStore(api, namespaces).start())

    def _replace(self, backend) -> None:
        old, self.backend = self.backend, backend
        if old is not None and hasattr(old, "stop"):
            old.stop()

    def running(self):
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    def done(self):
        if self._poller:
            self._poller.cancel()
        self._reloader.shutdown(wait=False, cancel_futures=True)
        if self.backend is not None and hasattr(self.backend, "stop"):
            self.backend.stop()

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(ctx.options.connectors_poll_ms / 1000)
            backend = self.backend
            if backend is None:
                continue
            try:
                await loop.run_in_executor(self._reloader, backend.refresh)
            except Exception as e:  # the poll loop outlives any one bad reload
                logger.error("reloading connectors failed: %s", describe_exception(e))

    @property
    def catalog(self) -> Catalog:
        return self.backend.catalog if self.backend else Catalog()

    @property
    def synced(self) -> bool:
        return bool(self.backend and self.backend.synced)

    @property
    def stale_reason(self) -> str | None:
        """Why the catalog may be out of date (the API server is unreachable), or None."""
        if self.backend is not None and getattr(self.backend, "connected", True) is False:
            return getattr(self.backend, "last_error", None) or "connector source unreachable"
        return None

    def get(self, namespace: str, name: str) -> Connector | None:
        return self.catalog.get(namespace, name)
