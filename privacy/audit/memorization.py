"""Memorisation audit by distance to closest record (DCR).

For every synthetic sample we measure the Euclidean distance to its nearest training
record and to its nearest held-out record, in whatever feature space the arrays are in
(pixels flattened, or domain features computed by the caller). Three pieces of evidence:

1. **DCR share test.** If the generator did not memorise, a synthetic sample is as likely
   to lie nearer the training set as nearer an equally large held-out set drawn from the
   same distribution: the count of samples closer to training is Binomial(n, 1/2)
   (a sign test). We report the share and the exact one-sided binomial p-value
   (``scipy.stats.binomtest``, alternative "greater"). *Equal sizes matter*: with
   ``n_train`` training and ``n_holdout`` held-out records, the null probability would be
   ``n_train / (n_train + n_holdout)``, not 1/2, so the larger of the two sets is
   subsampled (without replacement, by ``seed``) to the size of the smaller for this test
   only. Ties (equal distances, e.g. duplicate records) are dropped, as in any sign test.
   This follows the DCR comparisons of Platzer & Reutterer (2021, "Holdout-based fidelity
   and privacy assessment of mixed-type synthetic data") and synthcity's DCR metric.
2. **Near-copies.** A sample is flagged when its distance to the nearest training record
   is at most ``tau = scale * Q_q``, where ``Q_q`` is the ``q``-quantile of the distances
   from *held-out* records to their nearest training record: how close genuinely new
   records from the data distribution come to training records. With ``scale = 1`` a
   perfect non-memorising generator has about a fraction ``q`` of its samples flagged;
   ``scale < 1`` (default 0.5) asks for samples markedly closer than that, which in high
   dimension is almost never met by chance. The chance rate is estimated conservatively
   from the held-out records themselves, ``(1 + #{held-out <= tau}) / (n_holdout + 1)``
   (the conformal p-value construction), and the count of flagged samples is tested
   against it (one-sided binomial; approximate, as samples share one training set).
   Flagged samples come with the index of the training record they copy.
3. **Closest pairs.** The ``n_pairs`` (synthetic, training) pairs with the smallest
   distance, for a human to look at.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

from .neighbours import as_matrix, nearest_neighbours
from .results import HALF_IS_PRIVATE, HIGHER_IS_PRIVATE, INFORMATIONAL, LOWER_IS_PRIVATE, described


@dataclass(frozen=True)
class DCRShareTest:
    """Sign test of "closer to training than to held-out" (module docstring, item 1)."""

    distance_to_train: np.ndarray  # to the size-matched training subset, per synthetic sample
    distance_to_holdout: np.ndarray  # to the size-matched held-out subset
    n_reference: int  # size of each of the two size-matched sets
    n_closer_to_train: int
    n_closer_to_holdout: int
    n_ties: int

    @property
    def share_closer_to_train(self) -> float:
        decided = self.n_closer_to_train + self.n_closer_to_holdout
        return self.n_closer_to_train / decided if decided else float("nan")

    @property
    def p_value(self) -> float:
        decided = self.n_closer_to_train + self.n_closer_to_holdout
        if decided == 0:
            return 1.0
        return float(binomtest(self.n_closer_to_train, decided, 0.5, alternative="greater").pvalue)

    def to_dict(self) -> dict:
        return {
            "share_closer_to_train": described(
                "share_closer_to_train", self.share_closer_to_train, direction=HALF_IS_PRIVATE,
                units="fraction of synthetic samples (ties excluded)"),
            "p_value": described(
                "dcr_binomial_p_value", self.p_value, direction=HIGHER_IS_PRIVATE,
                units="probability", test="exact binomial, H0 share = 0.5, alternative greater"),
            "n_closer_to_train": self.n_closer_to_train,
            "n_closer_to_holdout": self.n_closer_to_holdout,
            "n_ties": self.n_ties,
            "n_reference_per_set": self.n_reference,
            "distance_to_train": described(
                "dcr_train", self.distance_to_train, direction=HIGHER_IS_PRIVATE,
                units="Euclidean distance in the audited space"),
            "distance_to_holdout": described(
                "dcr_holdout", self.distance_to_holdout, direction=INFORMATIONAL,
                units="Euclidean distance in the audited space"),
        }


@dataclass(frozen=True)
class NearCopies:
    """Synthetic samples closer to a training record than new records come (item 2)."""

    threshold: float
    quantile: float
    scale: float
    synthetic_index: np.ndarray
    train_index: np.ndarray  # the training record each flagged sample copies
    distance: np.ndarray
    n_synthetic: int
    chance_rate: float  # conservative estimate of P(flag) for a non-memorising sample

    @property
    def expected_by_chance(self) -> float:
        return self.chance_rate * self.n_synthetic

    @property
    def p_value(self) -> float:
        return float(binomtest(len(self.synthetic_index), self.n_synthetic, self.chance_rate,
                               alternative="greater").pvalue)

    def to_dict(self) -> dict:
        return {
            "n_flagged": described("near_copies", len(self.synthetic_index),
                                   direction=LOWER_IS_PRIVATE, units="synthetic samples"),
            "expected_by_chance": described(
                "near_copies_expected_by_chance", self.expected_by_chance,
                direction=INFORMATIONAL, units="synthetic samples"),
            "p_value": described("near_copies_binomial_p_value", self.p_value,
                                 direction=HIGHER_IS_PRIVATE, units="probability"),
            "threshold": described("near_copy_threshold", self.threshold, direction=INFORMATIONAL,
                                   units="Euclidean distance in the audited space",
                                   rule=f"{self.scale:g} × percentile {100 * self.quantile:g} of "
                                        "held-out records' distances to their nearest "
                                        "training record"),
            "chance_rate": self.chance_rate,
            "synthetic_index": self.synthetic_index,
            "train_index": self.train_index,
            "distance": self.distance,
        }


@dataclass(frozen=True)
class ClosestPairs:
    """The closest (synthetic, training) pairs, nearest first (item 3)."""

    synthetic_index: np.ndarray
    train_index: np.ndarray
    distance: np.ndarray

    def to_dict(self) -> dict:
        return {"synthetic_index": self.synthetic_index, "train_index": self.train_index,
                "distance": described("closest_pair_distance", self.distance,
                                      direction=HIGHER_IS_PRIVATE,
                                      units="Euclidean distance in the audited space")}


@dataclass(frozen=True)
class MemorizationResult:
    dcr: DCRShareTest
    near_copies: NearCopies
    closest_pairs: ClosestPairs
    distance_to_train: np.ndarray  # to the full training set, per synthetic sample
    holdout_distance_to_train: np.ndarray  # held-out records to the full training set

    def to_dict(self) -> dict:
        return {"dcr": self.dcr.to_dict(), "near_copies": self.near_copies.to_dict(),
                "closest_pairs": self.closest_pairs.to_dict(),
                "holdout_distance_to_train": described(
                    "holdout_dcr_train", self.holdout_distance_to_train, direction=INFORMATIONAL,
                    units="Euclidean distance in the audited space")}


def size_matched(a: np.ndarray, b: np.ndarray, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``a`` and ``b`` with the larger subsampled without replacement to the smaller's size."""
    rng = np.random.default_rng(seed)
    n = min(len(a), len(b))
    pick = lambda x: x if len(x) == n else x[np.sort(rng.choice(len(x), n, replace=False))]  # noqa: E731
    return pick(a), pick(b)


def dcr_share_test(synthetic: np.ndarray, train: np.ndarray, holdout: np.ndarray, *,
                   seed: int = 0, chunk_size: int = 1024) -> DCRShareTest:
    """Module docstring, item 1: the sign test on size-matched training / held-out sets."""
    train_m, holdout_m = size_matched(as_matrix(train, name="train"),
                                      as_matrix(holdout, name="holdout"), seed=seed)
    d_train = nearest_neighbours(synthetic, train_m, chunk_size=chunk_size)[0][:, 0]
    d_holdout = nearest_neighbours(synthetic, holdout_m, chunk_size=chunk_size)[0][:, 0]
    return DCRShareTest(distance_to_train=d_train, distance_to_holdout=d_holdout,
                        n_reference=len(train_m),
                        n_closer_to_train=int((d_train < d_holdout).sum()),
                        n_closer_to_holdout=int((d_train > d_holdout).sum()),
                        n_ties=int((d_train == d_holdout).sum()))


def near_copies(distance_to_train: np.ndarray, nearest_train: np.ndarray,
                holdout_distance_to_train: np.ndarray, *, quantile: float = 0.01,
                scale: float = 0.5) -> NearCopies:
    """Module docstring, item 2: flag samples with ``distance_to_train <= scale * Q_quantile``
    of the held-out-to-training nearest distances; sorted by distance, nearest first."""
    if not (0.0 <= quantile <= 1.0 and scale > 0):
        raise ValueError(f"near-copy quantile must be in [0, 1] and scale > 0, got {quantile}, {scale}")
    threshold = float(scale * np.quantile(holdout_distance_to_train, quantile))
    flagged = np.flatnonzero(distance_to_train <= threshold)
    flagged = flagged[np.argsort(distance_to_train[flagged], kind="stable")]
    n_below = int((holdout_distance_to_train <= threshold).sum())
    return NearCopies(threshold=threshold, quantile=quantile, scale=scale,
                      synthetic_index=flagged, train_index=nearest_train[flagged],
                      distance=distance_to_train[flagged], n_synthetic=len(distance_to_train),
                      chance_rate=(1 + n_below) / (len(holdout_distance_to_train) + 1))


def closest_pairs(distance_to_train: np.ndarray, nearest_train: np.ndarray, *,
                  n_pairs: int = 16) -> ClosestPairs:
    """Module docstring, item 3: the ``n_pairs`` synthetic samples nearest to a training record."""
    order = np.argsort(distance_to_train, kind="stable")[:n_pairs]
    return ClosestPairs(synthetic_index=order, train_index=nearest_train[order],
                        distance=distance_to_train[order])


def memorization_audit(synthetic: np.ndarray, train: np.ndarray, holdout: np.ndarray, *,
                       seed: int = 0, near_copy_quantile: float = 0.01,
                       near_copy_scale: float = 0.5, n_pairs: int = 16,
                       chunk_size: int = 1024) -> MemorizationResult:
    """All three DCR audits of ``synthetic`` against ``train`` with ``holdout`` as the
    reference for "new data" (module docstring). Arrays: one record per row, any shape
    after the first axis (flattened)."""
    synthetic, train, holdout = (as_matrix(a, name=n) for a, n in
                                 ((synthetic, "synthetic"), (train, "train"), (holdout, "holdout")))
    d_train, i_train = (a[:, 0] for a in nearest_neighbours(synthetic, train, chunk_size=chunk_size))
    d_holdout_train = nearest_neighbours(holdout, train, chunk_size=chunk_size)[0][:, 0]
    return MemorizationResult(
        dcr=dcr_share_test(synthetic, train, holdout, seed=seed, chunk_size=chunk_size),
        near_copies=near_copies(d_train, i_train, d_holdout_train, quantile=near_copy_quantile,
                                scale=near_copy_scale),
        closest_pairs=closest_pairs(d_train, i_train, n_pairs=n_pairs),
        distance_to_train=d_train, holdout_distance_to_train=d_holdout_train)
