"""Hypothesis settings profiles for the security suite; HYPOTHESIS_PROFILE picks one (default "ci").

- ci: a bounded, reproducible run (same examples every time, no example database written into the
  work tree), a few seconds per property.
- fuzz: what `scripts/fuzz` runs: random every time, no health checks (batches are large on
  purpose), generated inputs only (the explicit @examples are the ci run's job; some are slow on
  purpose, and scripts/fuzz calls each property many times); scripts/fuzz sets max_examples itself.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

settings.register_profile(
    "ci",
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz",
    max_examples=10_000,
    deadline=None,
    derandomize=False,
    database=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
    phases=(Phase.generate, Phase.target, Phase.shrink),
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
