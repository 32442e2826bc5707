"""Canaries and the one-run empirical epsilon lower bound of Steinke, Nasr & Jagielski
(2023), "Privacy Auditing with One (1) Training Run" (NeurIPS 2023, arXiv:2305.08846).

Protocol. ``m`` canaries are each included in the training data independently with
probability 1/2 (:func:`plan_canaries`; the seed is recorded). After training, the auditor
scores every canary (higher = more likely included), guesses "included" for the ``k+``
highest scores and "excluded" for the ``k-`` lowest, and abstains on the rest. With
``r = k+ + k-`` guesses of which ``v`` are correct, the paper's main theorem in its
approximate-DP form (Section 5; Appendix D gives the code) says: if training is
(eps, delta)-DP with respect to the canaries then, writing
``f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v]``,

    P[V >= v]  <=  f(v) + 2 m delta * max_{i = 1..v} (f(v - i) - f(v)) / i .

The right-hand side is the p-value of observing ``v`` correct guesses under the null
"the algorithm is (eps, delta)-DP"; with ``delta = 0`` it is the pure-DP bound ``f(v)``
(randomized response with ``e^eps`` odds is the worst case). The empirical lower bound at
confidence ``1 - beta`` is the largest eps whose p-value is below ``beta``: every smaller
eps is rejected. :func:`p_value` and :func:`epsilon_lower_bound` implement the paper's
Appendix D procedures (``p_value_DP_audit`` and ``get_eps_audit``) exactly, the inner sum
vectorised and the bisection run to 1e-6 in eps.

Choosing ``k+``/``k-``. The theorem holds for guesses fixed before looking at the
canaries' membership, so by default ``k+`` and ``k-`` are fixed in advance (the paper
does this). Choosing them after seeing how many guesses were right invalidates the
stated confidence; :func:`epsilon_lower_bound_over_grid` does it soundly with a
Bonferroni correction: each of the ``G`` grid points is tested at level ``beta / G`` and
the largest bound kept (a union bound over the grid keeps the overall level ``beta``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.stats import binom

from .results import INFORMATIONAL, LOWER_IS_PRIVATE, described

_EPS_TOLERANCE = 1e-6


@dataclass(frozen=True)
class CanaryPlan:
    """Which of ``m`` canaries are included in training, drawn with ``seed``."""

    m: int
    seed: int
    included: np.ndarray  # bool, shape (m,)

    def to_dict(self) -> dict:
        return {"m": self.m, "seed": self.seed, "included": self.included}


def plan_canaries(m: int, seed: int) -> CanaryPlan:
    """Include each of ``m`` canaries independently with probability 1/2 (the paper's
    ``S_i``), reproducibly from ``seed``."""
    if m < 1:
        raise ValueError(f"need at least one canary, got m={m}")
    included = np.random.default_rng(seed).random(m) < 0.5
    return CanaryPlan(m=m, seed=seed, included=included)


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of at least ``v`` correct guesses out of ``r`` (``m`` canaries) under
    (epsilon, delta)-DP: the theorem's right-hand side (module docstring); Appendix D's
    ``p_value_DP_audit``."""
    if not (0 <= v <= r <= m and epsilon >= 0 and 0 <= delta <= 1):
        raise ValueError(f"need 0 <= v <= r <= m, epsilon >= 0, 0 <= delta <= 1; got "
                         f"m={m}, r={r}, v={v}, epsilon={epsilon}, delta={delta}")
    q = 1.0 / (1.0 + np.exp(-epsilon))  # accuracy of eps-DP randomized response
    tail = float(binom.sf(v - 1, r, q))  # f(v) = P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    i = np.arange(1, v + 1)
    # f(v - i) - f(v) = P[v - i <= Binomial(r, q) < v], cumulated over i = 1..v
    window = np.cumsum(binom.pmf(v - i, r, q))
    alpha = max(float(np.max(window / i)), 0.0)
    return min(tail + alpha * delta * 2 * m, 1.0)


def epsilon_from_counts(m: int, r: int, v: int, *, delta: float,
                        confidence: float = 0.95) -> float:
    """Largest eps rejected at level ``1 - confidence`` given ``v`` correct of ``r``
    guesses on ``m`` canaries (Appendix D's ``get_eps_audit``); 0 when none is."""
    beta = 1.0 - confidence
    if not 0 < beta < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:  # bracket: p-value grows with eps
        lo, hi = hi, hi * 2
    while hi - lo > _EPS_TOLERANCE:
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class CanaryAudit:
    """An empirical eps lower bound and the guessing game it came from."""

    epsilon_lower_bound: float
    m: int
    k_plus: int
    k_minus: int
    n_correct: int
    delta: float
    confidence: float
    grid_size: int = 1  # > 1: k+/k- chosen over a grid, Bonferroni-corrected

    @property
    def n_guesses(self) -> int:
        return self.k_plus + self.k_minus

    def to_dict(self) -> dict:
        return {
            "epsilon_lower_bound": described(
                "empirical_epsilon_lower_bound", self.epsilon_lower_bound,
                direction=LOWER_IS_PRIVATE, units="epsilon (nats)",
                method="Steinke, Nasr & Jagielski 2023, one training run",
                confidence=self.confidence, delta=self.delta),
            "m": self.m, "k_plus": self.k_plus, "k_minus": self.k_minus,
            "n_guesses": self.n_guesses,
            "n_correct": described("canary_correct_guesses", self.n_correct,
                                   direction=LOWER_IS_PRIVATE, units="guesses"),
            "guess_accuracy": described("canary_guess_accuracy",
                                        self.n_correct / max(self.n_guesses, 1),
                                        direction=INFORMATIONAL,
                                        units="fraction of guesses; 0.5 is chance"),
            "grid_size": self.grid_size,
        }


def count_correct(scores: np.ndarray, included: np.ndarray, *, k_plus: int,
                  k_minus: int) -> int:
    """Correct guesses when the ``k_plus`` highest scores are guessed "included" and the
    ``k_minus`` lowest "excluded". Ties are broken by canary index (public and independent
    of inclusion, so the guesses remain a function of the output alone)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    included = np.asarray(included, dtype=bool).reshape(-1)
    m = len(scores)
    if included.shape != scores.shape or not np.isfinite(scores).all():
        raise ValueError(f"need finite scores and inclusion bits of the same length, got "
                         f"{scores.shape} and {included.shape}")
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(f"need k_plus, k_minus >= 0 and k_plus + k_minus <= m={m}, "
                         f"got {k_plus}, {k_minus}")
    order = np.argsort(-scores, kind="stable")  # highest first
    guessed_in, guessed_out = order[:k_plus], order[m - k_minus:]
    return int(included[guessed_in].sum() + (~included[guessed_out]).sum())


def epsilon_lower_bound(scores: np.ndarray, included: np.ndarray, *, delta: float,
                        k_plus: int, k_minus: int, confidence: float = 0.95) -> CanaryAudit:
    """The one-run empirical eps lower bound (module docstring) with ``k_plus``/``k_minus``
    fixed in advance: with probability >= ``confidence`` over the canaries' inclusion,
    an (eps, delta)-DP training run has eps >= the returned bound."""
    v = count_correct(scores, included, k_plus=k_plus, k_minus=k_minus)
    m = len(np.asarray(scores).reshape(-1))
    bound = epsilon_from_counts(m, k_plus + k_minus, v, delta=delta, confidence=confidence)
    return CanaryAudit(epsilon_lower_bound=bound, m=m, k_plus=k_plus, k_minus=k_minus,
                       n_correct=v, delta=delta, confidence=confidence)


def epsilon_lower_bound_over_grid(scores: np.ndarray, included: np.ndarray, *, delta: float,
                                  k_grid: Sequence[tuple[int, int]],
                                  confidence: float = 0.95) -> CanaryAudit:
    """The best bound over a grid of ``(k_plus, k_minus)`` choices, each computed at level
    ``(1 - confidence) / len(k_grid)`` (Bonferroni), so the result keeps ``confidence``
    although ``k`` was chosen after seeing the data."""
    if not k_grid:
        raise ValueError("k_grid is empty; give at least one (k_plus, k_minus) pair")
    level = 1.0 - (1.0 - confidence) / len(k_grid)
    best = max((epsilon_lower_bound(scores, included, delta=delta, k_plus=kp, k_minus=km,
                                    confidence=level) for kp, km in k_grid),
               key=lambda audit: audit.epsilon_lower_bound)
    return CanaryAudit(epsilon_lower_bound=best.epsilon_lower_bound, m=best.m, k_plus=best.k_plus,
                       k_minus=best.k_minus, n_correct=best.n_correct, delta=delta,
                       confidence=confidence, grid_size=len(k_grid))
