"""DP-FedSGD under secure aggregation with distributed Skellam noise (docs/aggregation.md,
"DP-SGD with distributed noise").

A DP-SGD family whose round is one private step, followed by steps that see no data (VAE,
flow and diffusion: the private step alone; a GAN: the discriminator's private step, then
the generator's, which reads only the discriminator), makes each round one linear statistic:
the sum over a Poisson sample of the site's records of every record's gradient clipped to
``C``. The server takes the private step on the decoded sum and then runs the steps that see
no data itself (:func:`public_steps`; post-processing, server/dpfedsgd.py): for a GAN,
only the discriminator's gradient is privatised (Xie et al. 2018, DPGAN, Alg. 1). Each site
divides the clipped gradients by ``C`` (norm <= 1), rounds them as the distributed release
rounds its vectors (``privacy/skellam.py``), adds its Skellam share and masks the integer
sum; the server decodes the federation's sum and takes the optimizer step.

One round is the Skellam mechanism on a Poisson sample at rate ``q``; its RDP is Zhu &
Wang 2019's bound (``poisson_subsampled_rdp``), composed over the planned rounds by the
ledger. The plan's public parameters are those of :class:`DistributedRelease` with
``dim`` = ``size`` = the private step's parameter count, ``sample_rate`` = ``q`` and
``rounds`` = the federation's rounds.

A site takes its sampled records' gradients in one forward pass over the sample (the
records' losses are independent: no layer mixes records, which the DP-SGD path needs too),
then each record's gradient either by Opacus' per-sample gradient hooks, the machinery of
the DP-SGD path's ``hooks`` mode (``VECTORISED``: one backward pass for the whole sample),
or by one backward pass per record (``LOOP``), the fallback for a private step holding a
layer without an Opacus grad sampler. :func:`gradient_method` chooses once, from the
step's layers; both read the same forward pass, so they consume the same random draws
(a VAE's z, a diffusion model's t and noise) and give the same rows.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from opacus.grad_sample import GradSampleModule
from torch import Tensor

from fedgen.shared_models import Batch, DPSGDTrainable

from .skellam import DistributedRelease, plan_distributed_release


def _round_steps(model: DPSGDTrainable):
    """The family's steps when its round is one private step followed only by steps that see
    no data (a round of DP-FedSGD is then one linear statistic: the sum of clipped
    per-record gradients); else ValueError."""
    steps = model.steps()
    if not steps or not steps[0].private or any(s.private for s in steps[1:]):
        private = sum(1 for s in steps if s.private)
        raise ValueError(f"{type(model).__name__} trains by {private} private step{'' if private == 1 else 's'} a "
                         "round, not one private step first then steps that see no data: its round is not one "
                         "linear statistic, so it cannot take distributed noise"
                         + (" (a GAN: set d_steps_per_g_step: 1)" if private > 1 else ""))
    return steps


def the_private_step(model: DPSGDTrainable):
    """The private step of a round DP-FedSGD can take (:func:`_round_steps`)."""
    return _round_steps(model)[0]


def public_steps(model: DPSGDTrainable):
    """The steps after the private one, which see no data (a GAN's generator step): the
    server runs them after its step on the decoded gradient (post-processing)."""
    return _round_steps(model)[1:]


def private_step_parameters(model: DPSGDTrainable) -> list[torch.nn.Parameter]:
    """The parameters one DP-FedSGD gradient covers, in the order of its flat vector (the
    site's sum and the server's optimizer step use the same order)."""
    return [p for p in the_private_step(model).module.parameters() if p.requires_grad]


#: how a site takes its sampled records' gradients (:func:`gradient_method`)
VECTORISED, LOOP = "vectorised", "loop"


def gradient_method(model: DPSGDTrainable) -> str:
    """``VECTORISED`` when every layer with trainable parameters of the private step has an
    Opacus grad sampler (Linear, Conv, GroupNorm, LayerNorm, ...: the quickstart VAE, the
    flows and the diffusion models), else ``LOOP``."""
    layers = [m for m in the_private_step(model).module.modules()
              if any(p.requires_grad for p in m.parameters(recurse=False))]
    return VECTORISED if all(type(m) in GradSampleModule.GRAD_SAMPLERS for m in layers) else LOOP


def per_record_gradients(model: DPSGDTrainable, batch: Batch, method: str) -> tuple[Tensor, Tensor]:
    """Every record's gradient of the private step's loss, flat in the order of
    :func:`private_step_parameters`, as rows ``[B, d]`` in float64, and the records'
    losses ``[B]``: one forward pass over ``batch``, then Opacus' per-sample gradients
    (``VECTORISED``) or one backward pass a record (``LOOP``). The model's ``.grad`` are
    left as they were (the site does not update its model)."""
    step, params = the_private_step(model), private_step_parameters(model)
    if method == LOOP:
        losses = step.loss(batch)
        rows = torch.stack([_flat(params, torch.autograd.grad(losses[i], params, retain_graph=i + 1 < len(losses),
                                                              allow_unused=True)) for i in range(len(losses))])
        return rows, losses.detach()
    if method != VECTORISED:
        raise ValueError(f"unknown per-record gradient method {method!r}; choose {VECTORISED!r} or {LOOP!r}")
    grads = [p.grad for p in params]
    gsm = GradSampleModule(step.module, batch_first=True, loss_reduction="sum")
    try:
        losses = step.loss(batch)
        with warnings.catch_warnings():  # the data need no gradient: the first layer's hook says so each time
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            losses.sum().backward()
        rows = _flat(params, [getattr(p, "grad_sample", None) for p in params], batch=len(losses))
    finally:
        gsm._close()  # removes the hooks and every p.grad_sample
        for p, g in zip(params, grads):
            p.grad = g
    return rows, losses.detach()


def _flat(params: list[torch.nn.Parameter], grads, batch: int | None = None) -> Tensor:
    """One record's gradients (``batch`` None) or ``batch`` records' per-sample gradients,
    flattened and concatenated in float64; a parameter the loss does not reach gives zeros."""
    lead = () if batch is None else (batch,)
    return torch.cat([(torch.zeros(*lead, p.numel(), dtype=torch.float64, device=p.device) if g is None
                       else g.reshape(*lead, -1).double()) for p, g in zip(params, grads)], dim=-1)


def sample_rate(batch_size: int, max_records: int) -> float:
    """The public Poisson rate of every site: the expected batch ``batch_size`` at a site
    holding ``max_records`` (the public bound on one site's records), fewer at smaller sites."""
    return min(1.0, batch_size / max_records)


def plan_dp_fedsgd(model: DPSGDTrainable, *, epsilon: float, delta: float, bits: int, num_sites: int,
                   threshold: int, max_records: int, batch_size: int, rounds: int,
                   after: DistributedRelease | None = None) -> DistributedRelease:
    """The public parameters of ``rounds`` DP-FedSGD rounds spending ``epsilon`` at ``delta``
    (``after``: a distributed release every site made first, which ``epsilon`` covers too)."""
    size = sum(p.numel() for p in private_step_parameters(model))
    return plan_distributed_release(epsilon=epsilon, delta=delta, bits=bits, num_sites=num_sites,
                                    threshold=threshold, max_records=max_records, dim=size, size=size,
                                    sample_rate=sample_rate(batch_size, max_records), rounds=rounds, prior=after)


def decode_gradient(signed_sum: np.ndarray, plan: DistributedRelease, *, clip_norm: float,
                    expected_batch: float) -> np.ndarray:
    """The noisy mean gradient from the unmasked signed integer sum: divided by the scale
    (units of ``C``), times ``C``, divided by the expected batch ``q N`` (a fixed
    denominator: the sensitivity stays one clipped gradient)."""
    return signed_sum.astype(np.float64) / plan.scale * clip_norm / max(expected_batch, 1e-12)


def noise_std(plan: DistributedRelease, variance: float, *, clip_norm: float, expected_batch: float) -> float:
    """The std per coordinate of the noise on the decoded mean gradient."""
    return float(np.sqrt(variance)) / plan.scale * clip_norm / max(expected_batch, 1e-12)
