"""Privacy accounting for DP-SGD with Poisson subsampling, on Opacus' accountants.

The accountant *history* ``[(noise_multiplier, sample_rate, steps), ...]`` is the whole
state: epsilon is always recomputed from it by a fresh Opacus accountant, so a history
saved in ``context.state`` or on disk can never drift from what Opacus would report.
"""

from __future__ import annotations

import contextlib
import warnings
from functools import lru_cache
from typing import Callable, Iterable, Iterator

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

from .errors import PrivacyConfigError

ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}

HistoryEntry = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


@contextlib.contextmanager
def quiet_opacus() -> Iterator[None]:
    """Opacus' accountants without their console noise: the PRV's numpy divide-by-zero in a
    masked-out branch, and RDP's "optimal order is the smallest/largest alpha" (the bound
    is then valid but loose -- never an underestimate). Epsilons are unchanged."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"opacus\.accountants")
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        yield


def make_accountant(kind: str, history: Iterable[HistoryEntry] = ()) -> IAccountant:
    """A fresh Opacus accountant of ``kind`` ("rdp" or "prv") holding ``history``."""
    try:
        accountant = ACCOUNTANTS[kind]()
    except KeyError:
        raise PrivacyConfigError(
            f"unknown accountant {kind!r}; choose one of: {', '.join(ACCOUNTANTS)}"
        ) from None
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    return accountant


def merge_history(history: Iterable[HistoryEntry]) -> list[HistoryEntry]:
    """Group entries by (sigma, q), summing steps: the composition is the same (the
    accountants compose identical mechanisms by step count) and it is much cheaper."""
    merged: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        if int(n) > 0:
            key = (float(s), float(q))
            merged[key] = merged.get(key, 0) + int(n)
    return [(s, q, n) for (s, q), n in merged.items()]


@lru_cache(maxsize=256)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step at Opacus' default orders
    (Mironov et al. 2019, "Renyi DP of the Sampled Gaussian Mechanism")."""
    return np.asarray(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier,
                                               steps=1, orders=RDPAccountant.DEFAULT_ALPHAS))


def _rdp_epsilon(entries: list[HistoryEntry], delta: float) -> float:
    # RDP composes additively over steps; this is what RDPAccountant.get_epsilon computes.
    rdp = sum(_rdp_per_step(s, q) * n for s, q, n in entries)
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def epsilon_of(history: Iterable[HistoryEntry], *, delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of the composition of every step in ``history`` (0 if empty).

    Equal to ``make_accountant(accountant, history).get_epsilon(delta)`` (tested); the RDP
    path reuses per-step RDP curves so budget checks inside a round stay cheap.
    """
    entries = merge_history(history)
    if not entries:
        return 0.0
    with quiet_opacus():
        if accountant == "rdp":
            return _rdp_epsilon(entries, delta)
        return float(make_accountant(accountant, entries).get_epsilon(delta=delta))


@lru_cache(maxsize=256)
def calibrate_noise_multiplier(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The smallest sigma (to Opacus' 1 % tolerance) with epsilon(sigma, q, steps) <= target.

    Uses ``opacus.accountants.utils.get_noise_multiplier``; the result is then checked,
    since a budget must never be overspent by a tolerance. A pure function of its
    arguments, memoised per process: many simulated sites with the same settings (and a
    site's later rounds) reuse one calibration instead of seconds of search each.
    """
    if not (0.0 < sample_rate <= 1.0):
        raise PrivacyConfigError(f"sample rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise PrivacyConfigError(f"planned DP-SGD steps must be >= 1, got {steps}")
    try:
        with quiet_opacus():
            sigma = float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                    epsilon_tolerance=0.01,
                )
            )
    except ValueError as err:
        raise PrivacyConfigError(
            f"no noise multiplier reaches epsilon={target_epsilon} at delta={delta} with "
            f"sample rate {sample_rate:.4g} over {steps} steps ({err}); raise the target "
            "epsilon or lower the rounds / local steps"
        ) from None
    # get_noise_multiplier stops within tolerance *below* the target; make sure.
    while epsilon_of([(sigma, sample_rate, steps)], delta=delta, accountant=accountant) > target_epsilon:
        sigma *= 1.01
    return sigma


def affordable_steps(
    history: list[HistoryEntry],
    *,
    noise_multiplier: float,
    sample_rate: float,
    wanted: int,
    delta: float,
    target_epsilon: float,
    accountant: str,
) -> int:
    """The largest ``k <= wanted`` such that adding ``k`` steps at (sigma, q) to ``history``
    keeps epsilon <= ``target_epsilon``."""
    return largest_affordable(
        lambda k: epsilon_of(history + [(noise_multiplier, sample_rate, k)], delta=delta,
                             accountant=accountant) <= target_epsilon, wanted)


def largest_affordable(fits: Callable[[int], bool], wanted: int) -> int:
    """The largest ``k <= wanted`` with ``fits(k)`` (0 if none), by binary search: ``fits``
    is monotone (epsilon grows with the number of steps)."""
    if wanted <= 0 or not fits(1):
        return 0
    if fits(wanted):
        return wanted
    lo, hi = 1, wanted  # fits(lo) and not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def calibrate_after(
    history: list[HistoryEntry], *, target_epsilon: float, delta: float, sample_rate: float, steps: int,
    accountant: str, tolerance: float = 0.01,
    composed: tuple[float, Callable[[float], float]] | None = None,
) -> float:
    """The smallest sigma (to ``tolerance``, relative) such that ``history`` followed by
    ``steps`` steps at (sigma, q) stays within ``target_epsilon``, composed by the
    accountant. Bisection between the sigma that ignores ``history`` (too small) and the
    one calibrated to what basic composition leaves (``target - epsilon(history)``:
    enough, since the composed epsilon never exceeds the sum).

    ``composed = (spent, epsilon_with)``: the history's epsilon and ``epsilon_with(sigma)``,
    the epsilon of the history followed by those steps, read by the caller -- a site passes
    its ledger's (``SiteLedger.epsilon`` and ``epsilon_after``, which count distributed
    Skellam entries in full, not as their Gaussian-equivalent sigma), so the sigma it picks
    is composed by the same reader as its budget check; ``history`` is then not read."""
    if composed is None:
        if not history:
            return calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate,
                                              steps=steps, accountant=accountant)

        def epsilon_with(sigma: float) -> float:
            return epsilon_of(history + [(sigma, sample_rate, steps)], delta=delta, accountant=accountant)

        spent = epsilon_of(history, delta=delta, accountant=accountant)
    else:
        spent, epsilon_with = composed
    if spent >= target_epsilon:
        raise PrivacyConfigError(f"epsilon {spent:.4g} is already spent of the target {target_epsilon}; "
                                 "nothing is left to calibrate DP-SGD for")

    def fits(sigma: float) -> bool:
        return epsilon_with(sigma) <= target_epsilon

    lo = calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate,
                                    steps=steps, accountant=accountant)
    hi = calibrate_noise_multiplier(target_epsilon=target_epsilon - spent, delta=delta, sample_rate=sample_rate,
                                    steps=steps, accountant=accountant)
    while not fits(hi):  # basic composition guarantees it; guard against the accountants' rounding
        lo, hi = hi, hi * 1.1
    while hi / lo > 1.0 + tolerance:
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi
