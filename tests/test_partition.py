"""Partitioners: deterministic by seed, disjoint, complete, every site non-empty."""

from __future__ import annotations

import numpy as np
import pytest

from fedgen.simulations.errors import PartitionError
from fedgen.simulations.partition import holdout_split, partition

LABELS = np.random.default_rng(0).integers(0, 10, 1000)


@pytest.mark.parametrize("name, opts", [("iid", {}), ("dirichlet", {"alpha": 0.5}), ("shards", {"shards_per_site": 2}),
                                        ("quantity", {"alpha": 0.5})])
def test_partition_is_a_deterministic_cover(name, opts):
    a = partition(name, LABELS, 1000, 10, seed=3, **opts)
    b = partition(name, LABELS, 1000, 10, seed=3, **opts)
    c = partition(name, LABELS, 1000, 10, seed=4, **opts)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))
    allidx = np.concatenate(a)
    assert len(allidx) == 1000 and len(np.unique(allidx)) == 1000
    assert min(len(p) for p in a) >= 1


def test_dirichlet_skews_labels_more_for_small_alpha():
    def skew(alpha):
        parts = partition("dirichlet", LABELS, 1000, 10, seed=0, alpha=alpha)
        return np.mean([np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts])
    assert skew(0.1) > skew(100.0) + 0.2


def test_shards_give_few_classes_per_site():
    parts = partition("shards", np.sort(LABELS), 1000, 10, seed=0, shards_per_site=2)
    assert max(len(np.unique(np.sort(LABELS)[p])) for p in parts) <= 4


def test_errors_say_why():
    with pytest.raises(PartitionError, match="cannot give 20 sites"):
        partition("iid", None, 10, 20, seed=0)
    with pytest.raises(PartitionError, match="alpha must be > 0"):
        partition("dirichlet", LABELS, 1000, 10, seed=0, alpha=0.0)
    with pytest.raises(PartitionError, match="needs labelled data"):
        partition("dirichlet", None, 1000, 10, seed=0)
    with pytest.raises(PartitionError, match="registered: dirichlet, iid, quantity, shards"):
        partition("nope", LABELS, 1000, 10, seed=0)
    with pytest.raises(PartitionError, match="raise partition.alpha"):
        partition("dirichlet", LABELS[:30], 30, 10, seed=0, alpha=0.01, min_examples=3)


def test_holdout_split_is_disjoint_and_seeded():
    tr, ho = holdout_split(100, 0.2, seed=1)
    assert len(ho) == 20 and len(np.intersect1d(tr, ho)) == 0 and len(tr) + len(ho) == 100
    assert np.array_equal(ho, holdout_split(100, 0.2, seed=1)[1])
