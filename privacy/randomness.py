"""Where a site's DP randomness comes from: the Gaussian noise and the Poisson sampling.

The Gaussian mechanism hides a record only while its noise is unknown to the observer:
whoever can regenerate the noise subtracts it and reads the clipped gradient sum (or the
released statistic) exactly. The Poisson sample is the secret that privacy amplification
by subsampling rests on (Abadi et al. 2016, §3.1; Balle et al. 2018). So both are drawn
from a generator seeded afresh from the operating system's entropy (:mod:`secrets`) for
every round -- never from the scenario seed, a site id or a round number, all of which
the server knows.

``seed`` is the simulation-only opt-in (``privacy.seeded_noise``): reproducible noise for
experiments, which the run flags as *not* a privacy guarantee to anyone who knows the
seed. A deployed site refuses it (client/policy.py).

Limits (docs/deploy.md, "Threat model"): torch's generators (Mersenne Twister on CPU,
Philox on CUDA) are not cryptographic; what the server sees is noise *added to* a
private sum, never raw generator output, and the 63-bit seed is not guessable, but a
floating-point-exact attack on the noise samples themselves (Mironov 2012) is not ruled out.
"""

from __future__ import annotations

import secrets

import torch

NOT_A_GUARANTEE = "reproducible noise: not a privacy guarantee if the seed is known"


def secret_seed() -> int:
    """63 bits from the OS's entropy source."""
    return secrets.randbits(63)


def dp_generator(device: torch.device | str = "cpu", *, seed: int | None = None) -> torch.Generator:
    """A generator for DP noise or Poisson sampling on ``device``: seeded from OS entropy,
    or from ``seed`` when a simulation opted in to reproducible noise."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(secret_seed() if seed is None else seed)
    return generator
