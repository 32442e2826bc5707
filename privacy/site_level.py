"""Site-level differential privacy: DP-FedAvg on the server (McMahan et al. 2018).

Example-level DP-SGD (``privacy.dp_sgd``) hides any one record of a site. Site-level DP
hides whether a *whole site* took part, all its records together. It is the server's job:

1. **Sampling.** Each round every connected site is included independently with
   probability ``q`` (Poisson sampling). The amplification-by-subsampling bound the
   accountant uses holds for this sampling only -- not for "pick k of n" -- and only while
   the draw stays secret from the adversary (the server must use a private RNG).
2. **Clipping.** Each sampled site's update ``Delta_k = w_k - w`` is scaled to L2 norm at
   most ``C`` (McMahan et al., Algorithm 1, ``ClipFn``).
3. **Noise, fixed denominator.** The new model is
   ``w + (sum_k clip(Delta_k) + N(0, sigma^2 C^2 I)) / (q N)``, the *fixed-denominator*
   estimator ``f~_f`` of McMahan et al. (Sec. 3, uniform weights, ``W = q N``): adding or
   removing one site moves the sum by at most ``C``, so the release is a Gaussian
   mechanism with noise multiplier ``sigma`` relative to its sensitivity. Dividing by the
   number of sites that *happened* to reply would leak that number; weighting by example
   counts would make the sensitivity depend on private data -- neither is done here.

Each round is one step of the subsampled Gaussian mechanism at ``(sigma, q)``; the
accountant composes ``rounds`` of them (the same Opacus RDP / PRV accountants that account
DP-SGD, with sites in place of examples), and ``sigma`` is calibrated before round 1 from
the target epsilon and the planned rounds.

A site that is sampled but fails or refuses contributes a zero update: the estimator
stays the same function of the data, so the guarantee is unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

from .accounting import calibrate_noise_multiplier, epsilon_of
from .errors import PrivacyConfigError


@dataclass
class SiteLevelDP:
    """The server-side mechanism and its accountant state (one entry per noised round)."""

    clip_norm: float
    noise_multiplier: float
    sample_rate: float
    num_sites: int
    delta: float
    accountant: str
    target_epsilon: float
    rounds: int = 0  # noised releases so far

    @classmethod
    def calibrated(cls, *, target_epsilon: float, delta: float, clip_norm: float, sample_rate: float,
                   num_sites: int, planned_rounds: int, accountant: str,
                   noise_multiplier: float | None = None) -> "SiteLevelDP":
        """Calibrate sigma so that ``planned_rounds`` releases cost at most ``target_epsilon``
        (or take the given ``noise_multiplier`` and check that it fits the budget)."""
        if noise_multiplier is None:
            noise_multiplier = calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta,
                                                          sample_rate=sample_rate, steps=planned_rounds,
                                                          accountant=accountant)
        mech = cls(clip_norm=clip_norm, noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                   num_sites=num_sites, delta=delta, accountant=accountant, target_epsilon=target_epsilon)
        planned = mech.epsilon_after(planned_rounds)
        if planned > target_epsilon:
            raise PrivacyConfigError(
                f"site-level noise multiplier {noise_multiplier:g} gives epsilon {planned:.3g} after "
                f"{planned_rounds} rounds, above the target {target_epsilon:g}; raise the noise multiplier "
                "or leave it unset to calibrate it")
        return mech

    # -- accounting ---------------------------------------------------------------------
    def epsilon_after(self, rounds: int) -> float:
        if rounds <= 0:
            return 0.0
        return epsilon_of([(self.noise_multiplier, self.sample_rate, rounds)], delta=self.delta,
                          accountant=self.accountant)

    @property
    def epsilon(self) -> float:
        return self.epsilon_after(self.rounds)

    def can_release(self) -> bool:
        """Whether one more round stays within the target epsilon."""
        return self.epsilon_after(self.rounds + 1) <= self.target_epsilon * (1 + 1e-9)

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on each coordinate of the averaged update."""
        return self.noise_multiplier * self.clip_norm / self.denominator

    @property
    def denominator(self) -> float:
        return self.sample_rate * self.num_sites

    # -- the mechanism --------------------------------------------------------------------
    def sample(self, node_ids: list[int], rng: Any) -> list[int]:
        """Poisson sampling: each node independently with probability ``q``.

        ``rng`` is anything with ``random() -> [0, 1)`` (``random.Random``,
        ``random.SystemRandom``, ...)."""
        return [node for node in sorted(node_ids) if rng.random() < self.sample_rate]

    def clip(self, delta: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        """``delta`` scaled to L2 norm <= C (all arrays as one vector) and its original norm."""
        norm = float(np.sqrt(sum(float(np.sum(np.square(d, dtype=np.float64))) for d in delta.values())))
        scale = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
        return {k: d * scale for k, d in delta.items()}, norm

    def release(self, global_weights: Mapping[str, np.ndarray], site_weights: list[Mapping[str, np.ndarray]],
                rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """One noised round: the new global weights and what happened (norms, clipped count).

        Only floating-point arrays are updated (integer buffers are kept as they are)."""
        keys = [k for k, w in global_weights.items() if np.issubdtype(np.asarray(w).dtype, np.floating)]
        total = {k: np.zeros(np.shape(global_weights[k]), dtype=np.float64) for k in keys}
        norms = []
        for weights in site_weights:
            clipped, norm = self.clip({k: np.asarray(weights[k], np.float64) - np.asarray(global_weights[k], np.float64)
                                       for k in keys})
            norms.append(norm)
            for k in keys:
                total[k] += clipped[k]
        sigma_c = self.noise_multiplier * self.clip_norm
        new = dict(global_weights)
        for k in keys:
            noisy_mean = (total[k] + rng.normal(0.0, sigma_c, size=total[k].shape)) / self.denominator
            ref = np.asarray(global_weights[k])
            new[k] = (ref.astype(np.float64) + noisy_mean).astype(ref.dtype)
        self.rounds += 1
        return new, {"site_update_norms": norms,
                     "sites_clipped": sum(n > self.clip_norm for n in norms),
                     "site_level_epsilon": self.epsilon}

    # -- the ledger's site_level block --------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "epsilon": self.epsilon, "noise_std": self.noise_std}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SiteLevelDP":
        fields = {k: d[k] for k in ("clip_norm", "noise_multiplier", "sample_rate", "num_sites", "delta",
                                    "accountant", "target_epsilon", "rounds")}
        return cls(**fields)
