"""Graceful shutdown: a rollout never cuts a push in half.

mitmdump exits at once on SIGTERM, and uploads in flight die with "use of closed network
connection". Here SIGTERM starts a drain instead:

1. `/readyz` answers 503 at once, and answers on kept-alive connections say `Connection: close`,
   so the Service stops sending new work and clients move to another replica;
2. after `shutdown_delay` seconds (endpoints take a moment to update; the Deployment's `preStop`
   sleep usually covers this, so the default is 0) the listeners stop accepting;
3. requests in flight finish, for up to `shutdown_grace` seconds;
4. then the proxy exits. A second SIGTERM (or SIGINT) exits at once.

The Deployment's `terminationGracePeriodSeconds` must exceed preStop + delay + grace.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from mitmproxy import ctx, http

from addons.gate import fail_closed
from addons.routing import is_reverse

logger = logging.getLogger(__name__)


class GracefulShutdown:
    def __init__(self) -> None:
        self.draining = False
        self._in_flight: set[str] = set()
        self._task: asyncio.Task | None = None

    def load(self, loader):
        loader.add_option("shutdown_grace", int, 60,
                          "On SIGTERM: seconds requests in flight may take to finish before the proxy exits.")
        loader.add_option("shutdown_delay", int, 0,
                          "On SIGTERM: seconds to keep accepting (readyz already failing) before the listeners close.")

    def running(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests driving addons directly)
            pass

    def _on_sigterm(self) -> None:
        if self.draining:
            logger.warning("second SIGTERM: exiting now")
            ctx.master.shutdown()
            return
        self.draining = True
        self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        grace, delay = ctx.options.shutdown_grace, ctx.options.shutdown_delay
        logger.info("SIGTERM: draining (%d request(s) in flight, up to %d s)", len(self._in_flight), grace)
        if delay > 0:
            await asyncio.sleep(delay)
        ctx.options.update(server=False)  # stop accepting; connections already open carry on
        deadline = time.monotonic() + grace
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # bounded by the grace period
        if self._in_flight:
            logger.warning("grace period over: exiting with %d request(s) still in flight", len(self._in_flight))
        else:
            logger.info("drained: exiting")
        ctx.master.shutdown()

    # ---- requests in flight

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._in_flight.add(flow.id)
        if self.draining and not flow.response and flow.request.path == "/readyz" and is_reverse(flow):
            # Before the health addon: a draining replica is not ready, whatever else holds.
            flow.response = http.Response.make(503, b"draining: shutting down\n", {"Content-Type": "text/plain; charset=utf-8"})

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if self.draining and flow.response is not None:
            flow.response.headers["Connection"] = "close"

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        self._in_flight.discard(flow.id)
        if self.draining and flow.response is not None and not flow.response.stream:
            flow.response.headers["Connection"] = "close"

    @fail_closed
    def error(self, flow: http.HTTPFlow) -> None:
        self._in_flight.discard(flow.id)
