"""The Gaussian release: one noisy sum of a site's per-record vectors.

A release family (``shared_models.protocol.Releasing``) maps every record to a vector of
L2 norm <= 1 and sums them, so adding or removing one record moves the sum by at most 1
(L2 sensitivity 1). Adding ``N(0, sigma^2 I)`` to the sum is then the Gaussian mechanism
(Dwork & Roth 2014, §3.5.3 and Appendix A), the release of DP-MERF (Harder, Adamczewski &
Park, AISTATS 2021, §3.2). Its privacy loss is that of one DP-SGD step at sampling rate
``q = 1`` with noise multiplier ``sigma`` (the subsampled Gaussian with nothing subsampled),
so the site's accountant composes it with any DP-SGD steps as one more history entry
``(sigma, 1, 1)`` -- the same ledger, the same accountant, no separate bookkeeping.

The noise comes from the caller's generator: at a deployed site the secret one,
seeded afresh from the OS's entropy every round (:mod:`privacy.randomness`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .accounting import calibrate_noise_multiplier
from .ledger import RoundSpend, SiteLedger

RELEASE_SAMPLE_RATE = 1.0  # every record is in the sum: no amplification by subsampling
RELEASE_STEPS = 1  # one mechanism per release


@dataclass(frozen=True)
class GaussianRelease:
    """One Gaussian mechanism on a sensitivity-1 sum, at noise multiplier ``sigma``."""

    noise_multiplier: float

    @classmethod
    def calibrated(cls, *, epsilon: float, delta: float, accountant: str) -> "GaussianRelease":
        """The smallest sigma (to the calibration's 1 % tolerance) whose one step at q = 1
        spends at most ``epsilon`` at ``delta``."""
        return cls(calibrate_noise_multiplier(target_epsilon=epsilon, delta=delta, sample_rate=RELEASE_SAMPLE_RATE,
                                              steps=RELEASE_STEPS, accountant=accountant))

    def affordable(self, ledger: SiteLedger) -> bool:
        """Whether the site's history plus this release stays within its target epsilon."""
        wanted = RELEASE_STEPS
        return ledger.affordable_steps(self.noise_multiplier, RELEASE_SAMPLE_RATE, wanted=wanted) == wanted

    def noised(self, statistic_sum: Tensor, generator: torch.Generator) -> Tensor:
        """``statistic_sum + N(0, sigma^2 I)``. The noise is drawn on ``generator``'s device
        (the CPU for a site's secret generator) and then moved: the same draws on any device."""
        noise = torch.randn(statistic_sum.shape, generator=generator).to(statistic_sum.device)
        return statistic_sum + self.noise_multiplier * noise

    def charge(self, ledger: SiteLedger, *, round: int, run: str | int | None) -> RoundSpend:
        """Record the release in the site's ledger: one step at (sigma, q = 1)."""
        return ledger.record_round(round=round, steps=RELEASE_STEPS, noise_multiplier=self.noise_multiplier,
                                   sample_rate=RELEASE_SAMPLE_RATE, run=run)


def plan_release(ledger: SiteLedger, *, epsilon: float, delta: float, accountant: str,
                 whole_budget: bool) -> GaussianRelease | None:
    """The release a site may make this round, or ``None`` if its budget cannot afford it.

    ``epsilon``: what the release spends -- the whole target for a pure release family
    (``whole_budget``: its sigma is then the ledger's, as DP-SGD's is for the other
    families), a hybrid's share otherwise (its DP-SGD sigma is calibrated later to what the
    release left, :mod:`privacy.budget`).
    """
    release = GaussianRelease.calibrated(epsilon=epsilon, delta=delta, accountant=accountant)
    if whole_budget and ledger.noise_multiplier is None:
        ledger.noise_multiplier, ledger.sample_rate = release.noise_multiplier, RELEASE_SAMPLE_RATE
    return release if release.affordable(ledger) else None


def release_sum(statistic_sum: Tensor, release: GaussianRelease, ledger: SiteLedger, *, generator: torch.Generator,
                round: int, run: str | int | None) -> Tensor:
    """Noise a site's sum with ``release`` and charge it to ``ledger``: what leaves the site."""
    noised = release.noised(statistic_sum, generator)
    release.charge(ledger, round=round, run=run)
    return noised
