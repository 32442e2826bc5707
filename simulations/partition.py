"""Partitioners: split example indices over simulated sites, deterministically by seed.

- ``iid``: a random permutation cut into near-equal parts.
- ``dirichlet``: label skew; for every class, its examples are split over sites by
  proportions drawn from Dirichlet(alpha) (Hsu, Qi & Brown 2019, "Measuring the Effects of
  Non-Identical Data Distribution for Federated Visual Classification").
- ``shards``: sort by label, cut into ``num_sites * shards_per_site`` shards, deal each site
  ``shards_per_site`` of them (McMahan et al. 2017, "pathological non-IID").
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .errors import PartitionError

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
                             "use fewer sites or more data")
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


def holdout_split(num_examples: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): a seeded random split no site trains on."""
    perm = np.random.default_rng([seed, 7919]).permutation(num_examples)
    n_hold = max(1, int(round(fraction * num_examples)))
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])
