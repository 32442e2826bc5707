"""Seeded row subsampling, shared by the metrics that bound their O(n^2) cost."""

from __future__ import annotations

import numpy as np


def subsample(a: np.ndarray, size: int, rng: np.random.Generator | int) -> np.ndarray:
    """At most ``size`` rows of ``a``: all of them, or a uniform subset drawn without
    replacement from ``rng`` (a generator, or a seed)."""
    if a.shape[0] <= size:
        return a
    rng = np.random.default_rng(rng) if isinstance(rng, (int, np.integer)) else rng
    return a[rng.choice(a.shape[0], size, replace=False)]
