"""DP-FedSGD under secure aggregation with distributed Skellam noise (docs/aggregation.md,
"DP-SGD with distributed noise").

A DP-SGD family whose round is exactly one private step (VAE, flow, diffusion; not a GAN,
whose generator step follows the discriminator's) makes each round one linear statistic:
the sum over a Poisson sample of the site's records of every record's gradient clipped to
``C``. Each site divides the clipped gradients by ``C`` (norm <= 1), rounds them as the
distributed release rounds its vectors (``privacy/skellam.py``), adds its Skellam share and
masks the integer sum; the server decodes the federation's sum and takes the optimizer step.

One round is the Skellam mechanism on a Poisson sample at rate ``q``; its RDP is Zhu &
Wang 2019's bound (``poisson_subsampled_rdp``), composed over the planned rounds by the
ledger. The plan's public parameters are those of :class:`DistributedRelease` with
``dim`` = ``size`` = the private step's parameter count, ``sample_rate`` = ``q`` and
``rounds`` = the federation's rounds.
"""

from __future__ import annotations

import numpy as np
import torch

from fedgen.shared_models import DPSGDTrainable

from .skellam import DistributedRelease, plan_distributed_release


def the_private_step(model: DPSGDTrainable):
    """The family's one step when it is a single private step (a round of DP-FedSGD is
    then one linear statistic: the sum of clipped per-record gradients); else ValueError."""
    steps = model.steps()
    if len(steps) != 1 or not steps[0].private:
        raise ValueError(f"{type(model).__name__} trains by {len(steps)} steps a round, not one private step: "
                         "its round is not one linear statistic, so it cannot take distributed noise")
    return steps[0]


def private_step_parameters(model: DPSGDTrainable) -> list[torch.nn.Parameter]:
    """The parameters one DP-FedSGD gradient covers, in the order of its flat vector (the
    site's sum and the server's optimizer step use the same order)."""
    return [p for p in the_private_step(model).module.parameters() if p.requires_grad]


def sample_rate(batch_size: int, max_records: int) -> float:
    """The public Poisson rate of every site: the expected batch ``batch_size`` at a site
    holding ``max_records`` (the public bound on one site's records), fewer at smaller sites."""
    return min(1.0, batch_size / max_records)


def plan_dp_fedsgd(model: DPSGDTrainable, *, epsilon: float, delta: float, bits: int, num_sites: int,
                   threshold: int, max_records: int, batch_size: int, rounds: int) -> DistributedRelease:
    """The public parameters of ``rounds`` DP-FedSGD rounds spending ``epsilon`` at ``delta``."""
    size = sum(p.numel() for p in private_step_parameters(model))
    return plan_distributed_release(epsilon=epsilon, delta=delta, bits=bits, num_sites=num_sites,
                                    threshold=threshold, max_records=max_records, dim=size, size=size,
                                    sample_rate=sample_rate(batch_size, max_records), rounds=rounds)


def decode_gradient(signed_sum: np.ndarray, plan: DistributedRelease, *, clip_norm: float,
                    expected_batch: float) -> np.ndarray:
    """The noisy mean gradient from the unmasked signed integer sum: divided by the scale
    (units of ``C``), times ``C``, divided by the expected batch ``q N`` (a fixed
    denominator: the sensitivity stays one clipped gradient)."""
    return signed_sum.astype(np.float64) / plan.scale * clip_norm / max(expected_batch, 1e-12)


def noise_std(plan: DistributedRelease, variance: float, *, clip_norm: float, expected_batch: float) -> float:
    """The std per coordinate of the noise on the decoded mean gradient."""
    return float(np.sqrt(variance)) / plan.scale * clip_norm / max(expected_batch, 1e-12)
