"""A test-only mitmproxy script: makes one of the proxy's own hooks raise, to prove the proxy fails closed.

`SABOTAGE=hook:<addon class>.<hook>` replaces that hook of our addon (bypassing its fail_closed
wrapper: only the gate at the end of the chain can stop the flow then);
`GET /__sabotage__` arms it. `SABOTAGE=inner:<module>.<function>` makes a function the hooks call raise (the hook's own
fail_closed wrapper must turn it into a refusal). The exception message carries a marker that
must never reach a client or the log.
"""

from __future__ import annotations

import importlib
import os

from mitmproxy import ctx

MARKER = "SABOTAGE-SECRET-MARKER"


def _boom(*args, **kwargs):
    raise RuntimeError(MARKER)


async def _aboom(*args, **kwargs):
    raise RuntimeError(MARKER)


class Sabotage:
    """Armed by `GET /__sabotage__` (after start-up: mitmdump exits on errors logged while starting)."""

    def requestheaders(self, flow):
        if flow.request.path == "/__sabotage__":
            self.arm()
            from mitmproxy import http
            flow.response = http.Response.make(200, b"armed")

    def arm(self):
        spec = os.environ.get("SABOTAGE", "")
        kind, _, target = spec.partition(":")
        if kind == "inner":
            module, _, func = target.rpartition(".")
            setattr(importlib.import_module(module), func, _boom)
        elif kind == "hook":
            cls, _, hook = target.partition(".")
            for addon in _walk(ctx.master.addons.chain):
                if type(addon).__name__ == cls:
                    import inspect
                    setattr(addon, hook, _aboom if inspect.iscoroutinefunction(getattr(addon, hook)) else _boom)


def _walk(chain):
    for a in chain:
        yield a
        yield from _walk(getattr(a, "addons", []) or [])


addons = [Sabotage()]
