"""A site's DP-SGD budget: the operations the local training loop needs on its ledger
(docs/architecture.md §3).

Only ``privacy/`` writes a :class:`~privacy.ledger.SiteLedger`: the loop asks for the
noise multiplier (calibrated on the site's first DP-SGD round), for the steps the rest of
the budget affords, and charges the steps it took; a release is charged by
:mod:`privacy.release`. Epsilon is always recomputed from the ledger's history.
"""

from __future__ import annotations

import logging

from .accounting import calibrate_after
from .ledger import RoundSpend, SiteLedger

log = logging.getLogger(__name__)


def dp_sgd_noise_multiplier(ledger: SiteLedger, *, sample_rate: float, planned_steps: int, target_epsilon: float,
                            delta: float, accountant: str) -> float:
    """The site's DP-SGD sigma at ``sample_rate``, calibrated once, on its first DP-SGD round.

    Calibration composes with what the history already spent (a hybrid's release): sigma is
    the smallest that keeps the history plus ``planned_steps`` steps at (sigma, q) within
    ``target_epsilon`` (:func:`~privacy.accounting.calibrate_after`), the history read as the
    ledger's budget check reads it (a distributed Skellam entry by its own bound, not as its
    Gaussian-equivalent sigma). Later rounds keep that
    sigma; if the site's data changed size, its steps are accounted at the new rate.
    """
    if ledger.noise_multiplier is None:
        composed = (ledger.epsilon, lambda sigma: ledger.epsilon_after(
            steps=planned_steps, noise_multiplier=sigma, sample_rate=sample_rate))
        ledger.noise_multiplier = calibrate_after(
            ledger.accountant_history(), target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate,
            steps=planned_steps, accountant=accountant, composed=composed if ledger.history else None)
        log.info("site %s: sigma=%.4g calibrated for eps=%g, q=%.4g, %d steps", ledger.site,
                 ledger.noise_multiplier, target_epsilon, sample_rate, planned_steps)
    ledger.sample_rate = sample_rate
    return ledger.noise_multiplier


def affordable_dp_sgd_steps(ledger: SiteLedger, *, wanted: int) -> int:
    """How many of ``wanted`` DP-SGD steps at the ledger's (sigma, q) keep the site within its
    target epsilon (0: the site must refuse). Call :func:`dp_sgd_noise_multiplier` first."""
    if ledger.noise_multiplier is None or ledger.sample_rate is None:
        raise ValueError(f"site {ledger.site}: DP-SGD sigma not calibrated yet (call dp_sgd_noise_multiplier)")
    return ledger.affordable_steps(ledger.noise_multiplier, ledger.sample_rate, wanted=wanted)


def charge_dp_sgd_round(ledger: SiteLedger, *, round: int, steps: int, run: str | int | None) -> RoundSpend:
    """Record the DP-SGD steps a round took, at the ledger's (sigma, q)."""
    if ledger.noise_multiplier is None or ledger.sample_rate is None:
        raise ValueError(f"site {ledger.site}: DP-SGD sigma not calibrated yet (call dp_sgd_noise_multiplier)")
    return ledger.record_round(round=round, steps=steps, noise_multiplier=ledger.noise_multiplier,
                               sample_rate=ledger.sample_rate, run=run)
