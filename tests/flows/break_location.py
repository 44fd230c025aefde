"""A mitmproxy script that breaks the proxy on purpose: Location and Link are no longer rewritten.

Loaded after the proxy's own script (`connector-proxy ... -- -s tests/flows/break_location.py`) by
the test that shows the replay harness catches regressions: `Rewrite` looks `rewrite_url` up in
its module at call time, so replacing the module global is enough.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# `from ... import` binds no module-level `addons`, which mitmproxy would take for this script's addon list.
from addons import rewrite as _rewrite  # noqa: E402


def _unchanged(url: str, *args, **kwargs) -> str:
    return url


_rewrite.rewrite_url = _unchanged
