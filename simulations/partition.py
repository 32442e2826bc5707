"""Partitioners: split example indices over simulated sites, deterministically by seed.

- ``iid``: a random permutation cut into near-equal parts.
- ``dirichlet``: label skew; for every class, its examples are split over sites by
  proportions drawn from Dirichlet(alpha) (Hsu, Qi & Brown 2019, "Measuring the Effects of
  Non-Identical Data Distribution for Federated Visual Classification").
- ``shards``: sort by label, cut into ``num_sites * shards_per_site`` shards, deal each site
  ``shards_per_site`` of them (McMahan et al. 2017, "pathological non-IID").
- ``quantity``: quantity skew; site sizes follow proportions drawn from Dirichlet(alpha)
  over the sites, labels IID within each site (Li, Diao, Chen & He 2022, "Federated
  Learning on Non-IID Data Silos: An Experimental Study", quantity-based skew).

Feature skew (per-site input transforms) spreads one parameter over the sites with
:func:`spread_over_sites`; the transforms themselves are the sites' (``client/feature_skew.py``).
A computed split can be kept on disk (:func:`read_cached_split`, :func:`write_cached_split`).
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from fedgen.privacy.ledger import atomic_write

from .errors import PartitionError

log = logging.getLogger(__name__)

Partitioner = Callable[..., list[np.ndarray]]
_PARTITIONERS: dict[str, Partitioner] = {}


def register_partitioner(name: str) -> Callable[[Partitioner], Partitioner]:
    def decorator(fn: Partitioner) -> Partitioner:
        _PARTITIONERS[name] = fn
        return fn
    return decorator


def list_partitioners() -> list[str]:
    return sorted(_PARTITIONERS)


def partition(name: str, labels: np.ndarray | None, num_examples: int, num_sites: int, *, seed: int,
              min_examples: int = 1, **options: float) -> list[np.ndarray]:
    """Split ``range(num_examples)`` over ``num_sites``; every site gets >= ``min_examples``."""
    if name not in _PARTITIONERS:
        raise PartitionError(f"unknown partitioner {name!r}; registered: {', '.join(list_partitioners())}")
    if num_examples < num_sites * min_examples:
        raise PartitionError(f"{num_examples} examples cannot give {num_sites} sites {min_examples} each; "
                             "use fewer sites, more data or a smaller partition.min_examples")
    if name in ("dirichlet", "shards") and labels is None:
        raise PartitionError(f"partitioner {name!r} needs labelled data; use partition.name: iid")
    rng = np.random.default_rng(seed)
    parts = _PARTITIONERS[name](labels=labels, num_examples=num_examples, num_sites=num_sites, rng=rng,
                                min_examples=min_examples, **options)
    sizes = [len(p) for p in parts]
    if min(sizes) < min_examples:
        raise PartitionError(f"partitioner {name!r} left site {int(np.argmin(sizes))} with {min(sizes)} examples "
                             f"(< {min_examples}); raise partition.alpha or use fewer sites")
    return [np.sort(p.astype(np.int64)) for p in parts]


@register_partitioner("iid")
def _iid(*, num_examples: int, num_sites: int, rng: np.random.Generator, **_: object) -> list[np.ndarray]:
    return list(np.array_split(rng.permutation(num_examples), num_sites))


@register_partitioner("dirichlet")
def _dirichlet(*, labels: np.ndarray, num_sites: int, rng: np.random.Generator, alpha: float = 0.5,
               min_examples: int = 1, max_tries: int = 100, **_: object) -> list[np.ndarray]:
    if alpha <= 0:
        raise PartitionError(f"partition.alpha must be > 0, got {alpha}")
    classes = np.unique(labels)
    for _attempt in range(max_tries):  # redraw until every site has min_examples
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_examples:
            return [np.asarray(p) for p in parts]
    raise PartitionError(f"Dirichlet(alpha={alpha}) left a site with < {min_examples} examples in "
                         f"{max_tries} draws; raise partition.alpha or use fewer sites")


@register_partitioner("shards")
def _shards(*, labels: np.ndarray, num_examples: int, num_sites: int, rng: np.random.Generator,
            shards_per_site: int = 2, **_: object) -> list[np.ndarray]:
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, num_sites * int(shards_per_site))
    deal = rng.permutation(len(shards)).reshape(num_sites, int(shards_per_site))
    return [np.concatenate([shards[s] for s in row]) for row in deal]


@register_partitioner("quantity")
def _quantity(*, num_examples: int, num_sites: int, rng: np.random.Generator, alpha: float = 0.5,
              min_examples: int = 1, **_: object) -> list[np.ndarray]:
    """Quantity skew (Li et al. 2022, "quantity skew"): proportions ``q ~ Dir_N(alpha)`` over
    the ``N`` sites, site ``j`` gets a ``q_j`` share of the examples, drawn uniformly at
    random (so labels are IID within a site). Small ``alpha`` gives a few large sites and
    many small ones; large ``alpha`` near-equal sites. Li et al. redraw ``q`` until every
    site is big enough; here each site first gets ``min_examples`` and ``q`` shares out the
    rest, so a feasible ``min_examples`` never fails and the draw is one Dirichlet sample."""
    if alpha <= 0:
        raise PartitionError(f"partition.alpha must be > 0, got {alpha}")
    spare = num_examples - num_sites * min_examples  # >= 0: partition() checked it
    cuts = (np.cumsum(rng.dirichlet(np.full(num_sites, alpha)))[:-1] * spare).astype(int)
    sizes = min_examples + np.diff(np.concatenate([[0], cuts, [spare]]))
    return np.split(rng.permutation(num_examples), np.cumsum(sizes)[:-1])


def spread_over_sites(low: float, high: float, num_sites: int, *, seed: int) -> np.ndarray:
    """One transform parameter per site for feature skew: ``num_sites`` values evenly
    spaced over ``[low, high]`` (the midpoint for a single site), dealt to the sites in a
    seeded random order -- so every run spans the whole range (as the fixed angles of
    Rotated MNIST do, Ghifary et al. 2015) while site ``i`` is not always the extreme."""
    values = np.linspace(low, high, num_sites) if num_sites > 1 else np.array([(low + high) / 2])
    return np.random.default_rng([seed, 4099]).permutation(values)


def holdout_split(num_examples: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): a seeded random split no site trains on."""
    perm = np.random.default_rng([seed, 7919]).permutation(num_examples)
    n_hold = max(1, int(round(fraction * num_examples)))
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


# -- on-disk cache of a computed split ------------------------------------------------------

#: bump when a partitioner (or the holdout split) gives other indices for the same inputs
CACHE_VERSION = 1


def is_valid_split(sites: list[np.ndarray], holdout: np.ndarray, num_examples: int, min_examples: int) -> bool:
    """Whether ``sites`` and ``holdout`` are 1-D integer arrays that together hold every
    index of ``range(num_examples)`` exactly once, every site with >= ``min_examples``."""
    arrays = [*sites, holdout]
    if any(a.ndim != 1 or not np.issubdtype(a.dtype, np.integer) for a in arrays):
        return False
    if len(holdout) == 0 or min(len(s) for s in sites) < min_examples:
        return False
    every = np.sort(np.concatenate(arrays))
    return len(every) == num_examples and np.array_equal(every, np.arange(num_examples))


def read_cached_split(path: Path, *, key: str, num_sites: int, num_examples: int,
                      min_examples: int) -> tuple[list[np.ndarray], np.ndarray] | None:
    """The split cached at ``path``, or ``None`` when there is none or it cannot be
    trusted: unreadable, written for another ``key``, or not a valid split of this data
    (:func:`is_valid_split`). The caller recomputes (and rewrites) on ``None``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            sites, holdout = [z[f"site_{i}"] for i in range(num_sites)], z["holdout"]
    except FileNotFoundError:
        return None
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
        log.warning("partition cache %s unreadable (%s); recomputing", path, err)
        return None
    if not is_valid_split(sites, holdout, num_examples, min_examples):
        log.warning("partition cache %s does not fit the data; recomputing", path)
        return None
    return [s.astype(np.int64) for s in sites], holdout.astype(np.int64)


def write_cached_split(path: Path, sites: list[np.ndarray], holdout: np.ndarray, *, key: str) -> None:
    """Store a split at ``path`` atomically (:func:`~fedgen.privacy.ledger.atomic_write`), so
    a reader never sees half a file. The cache only saves time: a folder that cannot be
    written is logged and skipped."""
    arrays = {"key": np.str_(key), "holdout": holdout, **{f"site_{i}": s for i, s in enumerate(sites)}}
    try:
        atomic_write(path, lambda fh: np.savez(fh, **arrays))
    except OSError as err:
        log.warning("partition cache %s not written (%s)", path, err)
