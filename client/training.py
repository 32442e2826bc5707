"""The one local training loop: any model family, with or without DP-SGD.

A round is a release when the model wants one (:meth:`~shared_models.GenerativeModel.wants_release`):
the site's noisy statistic, noised and charged by the Gaussian release (privacy/release.py).
Otherwise each iteration runs the family's :meth:`~shared_models.DPSGDTrainable.steps` in order.
A private step draws its own Poisson batch (Abadi et al. 2016, with the sampling that the
accountant's amplification assumes) and is clipped, noised and charged one accountant
step; a non-private step never sees data. Before a round the site checks its ledger and
takes only the steps its remaining budget affords (docs/architecture.md §3);
only privacy/ writes the ledger (privacy/budget.py, privacy/release.py).

The DP noise and the Poisson sampling come from generators seeded afresh from the OS's
entropy every round (privacy/randomness.py): the server, which knows the scenario seed,
cannot regenerate and subtract them. Only ``privacy.seeded_noise`` -- a simulation opt-in
that a deployed site's policy refuses -- derives them from the round's seed.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from fedgen.contract.task import PrivacyConfig, TrainingConfig
from fedgen.privacy.budget import affordable_dp_sgd_steps, charge_dp_sgd_round, dp_sgd_noise_multiplier
from fedgen.privacy.dp_fedsgd import gradient_method, per_record_gradients, private_step_parameters
from fedgen.privacy.dp_sgd import DPSettings, PrivateStepOptimizer, paused_hooks, poisson_sample
from fedgen.privacy.ledger import SiteLedger
from fedgen.privacy.randomness import dp_generator
from fedgen.privacy.release import GaussianRelease, plan_release, release_sum
from fedgen.privacy.skellam import (DistributedRelease, charge_distributed, noised_integer_sum, round_records,
                                     site_spend)
from fedgen.shared_models import Batch, DPSGDTrainable, GenerativeModel, Releasing
from fedgen.shared_models.warm_start import uniform_batches

from .data import SiteData

if TYPE_CHECKING:
    from fedgen.privacy.audit import dirac


@dataclass
class RoundResult:
    status: str  # "trained" | "budget_exhausted"
    num_examples: int
    iterations: int = 0
    dp_steps: int = 0
    train_loss: float = float("nan")
    losses: dict[str, float] = field(default_factory=dict)
    message: str = ""
    #: a distributed release under secure aggregation: the site's integer sum plus its
    #: Skellam share (int64), which the secagg mod masks; the model state stays home
    release: np.ndarray | None = None


@dataclass(frozen=True)
class _BrokenDP:
    """Tests and benchmarks/audit_power.py only: deliberately broken DP-SGD that the
    white-box audit must catch (the ledger still charges the correct amount)."""

    noise_scale: float = 1.0  # e.g. 0.1: ten times too little noise
    clip: bool = True  # False: per-example gradients unclipped (noise still sigma x C)
    known_noise_seed: int | None = None  # noise from seed + round: regenerable by the auditor


@dataclass(frozen=True)
class _ScaledRelease(GaussianRelease):
    """Tests only (:class:`_BrokenDP`): a release noised at ``scale`` x sigma, charged at sigma."""

    scale: float = 1.0

    def noised(self, statistic_sum: Tensor, generator: torch.Generator) -> Tensor:
        return GaussianRelease(self.noise_multiplier * self.scale).noised(statistic_sum, generator)


def private_parameters(model: DPSGDTrainable) -> list[torch.nn.Parameter]:
    """The trainable parameters of the model's private steps, in step order: the flat
    coordinate space of white-box canaries (privacy/audit/dirac.py)."""
    seen: set[int] = set()
    params = []
    for step in model.steps():
        if step.private and id(step.module) not in seen:
            seen.add(id(step.module))
            params += [p for p in step.module.parameters() if p.requires_grad]
    return params


def new_site_ledger(site: str, privacy: PrivacyConfig) -> SiteLedger:
    return SiteLedger(site=site, accountant=privacy.accountant, delta=privacy.delta,
                      target_epsilon=privacy.target_epsilon, max_grad_norm=privacy.max_grad_norm)


def private_steps_per_iteration(model: DPSGDTrainable) -> int:
    return sum(1 for s in model.steps() if s.private)


def plan_dp_round(model: DPSGDTrainable, n: int, *, training: TrainingConfig, privacy: PrivacyConfig,
                  ledger: SiteLedger) -> int:
    """Calibrate sigma on the site's first DP-SGD round, then return how many iterations
    this round's remaining budget affords (0 = the site must refuse)."""
    per_iteration = private_steps_per_iteration(model)
    # a hybrid's release took its first round; sigma is calibrated to what it left
    rounds = privacy.planned_rounds - int(model.release_epsilon is not None)
    dp_sgd_noise_multiplier(ledger, sample_rate=min(1.0, training.batch_size / n),
                            planned_steps=max(1, rounds) * training.local_steps * per_iteration,
                            target_epsilon=privacy.target_epsilon, delta=privacy.delta, accountant=privacy.accountant)
    return affordable_dp_sgd_steps(ledger, wanted=training.local_steps * per_iteration) // per_iteration


def run_local_round(
    model: GenerativeModel,
    data: SiteData,
    *,
    training: TrainingConfig,
    privacy: PrivacyConfig,
    ledger: SiteLedger | None,
    server_round: int,
    seed: int,
    device: torch.device | str = "cpu",
    run: str | None = None,
    white_box: "dirac.DiracCanaries | None" = None,
    distributed: DistributedRelease | None = None,
    _broken: _BrokenDP | None = None,
) -> RoundResult:
    """Train ``model`` in place on ``data`` for one round; charge ``ledger`` under DP.
    ``white_box``: the site's Dirac canaries of an audit run, added to every DP-SGD step."""
    n = len(data)
    device = torch.device(device)
    model.to(device).train()
    batch_order = torch.Generator().manual_seed(seed)  # non-private minibatch order
    torch.manual_seed(seed)  # model-internal draws (z, t, diffusion noise): not DP randomness
    if privacy.seeded_noise:  # simulation opt-in: sampling and noise from the round's seed
        sampling, noise = batch_order, None  # None: Opacus draws from torch's (seeded) global RNG
    else:  # secret: fresh OS entropy this round (privacy/randomness.py)
        sampling, noise = dp_generator("cpu"), dp_generator(device)
    if _broken is not None and _broken.known_noise_seed is not None:
        noise = torch.Generator(device).manual_seed(_broken.known_noise_seed + server_round)

    if model.wants_release():
        assert isinstance(model, Releasing)
        if distributed is not None:
            return _distributed_release_round(model, data, release=distributed, ledger=ledger,
                                              server_round=server_round, noise_rng=sampling, device=device, run=run)
        return _release_round(model, data, privacy=privacy, ledger=ledger, server_round=server_round,
                              noise_rng=sampling, device=device, run=run, white_box=white_box, _broken=_broken)
    if not isinstance(model, DPSGDTrainable):
        raise TypeError(f"{type(model).__name__} has neither a release to make nor DP-SGD steps to train")
    if distributed is not None:  # DP-FedSGD under secure aggregation with distributed noise
        return distributed_sgd_round(model, data, plan=distributed, clip_norm=privacy.max_grad_norm, ledger=ledger,
                                     server_round=server_round, sampling=sampling, device=device, run=run)
    iterations = training.local_steps
    if privacy.enabled:
        assert ledger is not None, "DP training needs the site's ledger"
        model.check_dp_compatible()
        iterations = plan_dp_round(model, n, training=training, privacy=privacy, ledger=ledger)
        if iterations == 0:
            return RoundResult(status="budget_exhausted", num_examples=n, message=(
                f"site {ledger.site} refuses to train: one more step would exceed its target "
                f"epsilon {ledger.target_epsilon} (spent {ledger.epsilon:.4g})"))

    steps = model.steps()
    q = min(1.0, training.batch_size / n)
    mode = model.grad_sample_mode if privacy.grad_sample_mode == "auto" else privacy.grad_sample_mode
    # One optimizer per distinct step: a family may list the same step several times
    # (e.g. a GAN's discriminator step d_steps_per_g_step times per generator step).
    by_step: dict[int, torch.optim.Optimizer | PrivateStepOptimizer] = {}
    private_opts: list[PrivateStepOptimizer] = []
    sigma, clip = (ledger.noise_multiplier, privacy.max_grad_norm) if privacy.enabled else (0.0, 0.0)
    if _broken is not None:  # same noise std sigma*C, without clipping: sigma' C' = sigma C
        sigma *= _broken.noise_scale
        if not _broken.clip:
            sigma, clip = sigma * clip / 1e9, 1e9
    canary_offset, canary_modules = 0, set()
    for step in steps:
        if id(step) in by_step:
            continue
        opt = torch.optim.Adam(step.module.parameters(), lr=step.lr or training.lr, betas=step.betas)
        if privacy.enabled and step.private:
            opt = PrivateStepOptimizer(step.module, opt, settings=DPSettings(
                noise_multiplier=sigma, max_grad_norm=clip,
                expected_batch_size=q * n, grad_sample_mode=mode), noise_generator=noise)
            if white_box is not None and id(step.module) not in canary_modules:
                canary_modules.add(id(step.module))  # the order of private_parameters()
                params = opt.params
                from fedgen.privacy.audit import dirac  # audit runs only: keeps the audit stack off start-up

                offsets = [canary_offset + o for o in dirac.flat_offsets(params)]
                canary_offset += sum(p.numel() for p in params)
                dirac.attach(opt.optimizer, params, offsets, white_box, sample_rate=q, generator=sampling)
            private_opts.append(opt)
        by_step[id(step)] = opt
    optimizers = [by_step[id(step)] for step in steps]

    anchor = [p.detach().clone() for p in model.parameters()] if training.proximal_mu > 0 else None
    batches = uniform_batches(n, training.batch_size, batch_order)
    sums = {s.name: 0.0 for s in steps}
    counts = {s.name: 0 for s in steps}
    dp_steps = 0
    try:
        for _ in range(iterations):
            for step, opt in zip(steps, optimizers):
                model.zero_grad(set_to_none=True)
                if step.private:
                    idx = poisson_sample(n, q, sampling) if privacy.enabled else next(batches)
                    batch = Batch(x=data.x[idx].to(device),
                                  y=None if data.y is None else data.y[idx].to(device), size=len(idx))
                else:
                    batch = Batch(x=None, y=None, size=training.batch_size)
                others = [o for o in private_opts if o is not opt]
                with paused_hooks(others) if others else nullcontext():
                    # an empty Poisson batch is a noise-only DP step: no forward pass
                    losses = step.loss(batch) if batch.size else torch.zeros(0, device=device)
                    if isinstance(opt, PrivateStepOptimizer):
                        opt.zero_grad()
                        opt.backward(losses)
                        opt.step()
                        dp_steps += 1
                    else:
                        losses.mean().backward()
                        opt.step()
                if batch.size:
                    sums[step.name] += float(losses.detach().sum())
                    counts[step.name] += batch.size
                if anchor is not None:
                    _proximal_update(model, anchor, lr=step.lr or training.lr, mu=training.proximal_mu)
    finally:
        for opt in private_opts:
            opt.close()

    if privacy.enabled:
        charge_dp_sgd_round(ledger, round=server_round, steps=dp_steps, run=run)
    losses_mean = {k: sums[k] / counts[k] for k in sums if counts[k]}
    first = steps[0].name
    return RoundResult(status="trained", num_examples=n, iterations=iterations, dp_steps=dp_steps,
                       train_loss=losses_mean.get(first, float("nan")), losses=losses_mean)


@torch.no_grad()
def _release_round(model: Releasing, data: SiteData, *, privacy: PrivacyConfig, ledger: SiteLedger | None,
                   server_round: int, noise_rng: torch.Generator, device: torch.device,
                   run: str | None, white_box: "dirac.DiracCanaries | None" = None,
                   _broken: _BrokenDP | None = None) -> RoundResult:
    """A release round: the site's sum of unit-norm per-record vectors, under DP noised and
    charged by the Gaussian release (privacy/release.py) at the release's epsilon -- the whole
    budget for a pure release family, which refuses from then on; a hybrid's ``release_epsilon``.
    ``white_box``: an audit run's release canaries (privacy/audit/release_canaries.py), added
    to the sum before the noise."""
    n = len(data)
    release = None
    if privacy.enabled:
        assert ledger is not None, "a DP release needs the site's ledger"
        whole_budget = model.release_epsilon is None
        release = plan_release(ledger, epsilon=privacy.target_epsilon if whole_budget else model.release_epsilon,
                               delta=privacy.delta, accountant=privacy.accountant, whole_budget=whole_budget)
        if release is None:
            return RoundResult(status="budget_exhausted", num_examples=n, message=(
                f"site {ledger.site} refuses to release again: one more release would exceed its target "
                f"epsilon {ledger.target_epsilon} (spent {ledger.epsilon:.4g})"))
    total = model.statistic_sum(data.x.to(device), None if data.y is None else data.y.to(device))
    if white_box is not None:
        from fedgen.privacy.audit.release_canaries import canary_sum  # audit runs only

        total = total + canary_sum(white_box, total)
    if release is not None and _broken is not None:  # test-only: a release with less noise than charged
        release = _ScaledRelease(release.noise_multiplier, scale=_broken.noise_scale)
    if release is not None:
        total = release_sum(total, release, ledger, generator=noise_rng, round=server_round, run=run)
    model.set_release(total / n)
    return RoundResult(status="trained", num_examples=n, iterations=1, dp_steps=int(privacy.enabled))


@torch.no_grad()
def _distributed_release_round(model: Releasing, data: SiteData, *, release: DistributedRelease,
                               ledger: SiteLedger | None, server_round: int, noise_rng: torch.Generator,
                               device: torch.device, run: str | None) -> RoundResult:
    """A release under secure aggregation with distributed noise (privacy/skellam.py): every
    record's vector scaled and conditionally rounded to integers, summed, plus this site's
    Skellam share; charged to the ledger as the Skellam mechanism that protects the site's
    records once at least ``threshold`` shares are in the sum. The model stays as it was."""
    n = len(data)
    if ledger is None:
        raise ValueError("a distributed release needs DP (privacy.enabled) and the site's ledger")
    if release.sample_rate != 1.0:  # its share and budget check would use a q the site does not sample at
        raise ValueError(f"the distributed release's parameters name sample rate {release.sample_rate:g}, but a "
                         "release sums every record (sample rate 1); the site refuses them")
    shape = tuple(model.state_dict()[model.release_buffer].shape)
    if shape[-1] != release.dim or int(np.prod(shape)) != release.size:
        raise ValueError(f"the distributed release is planned for {release.size} values of {release.dim}, "
                         f"the model's release has shape {list(shape)}")
    planned = _distributed_spend(release, ledger, n, refusal="refuses to release again: the distributed release")
    if isinstance(planned, RoundResult):
        return planned
    own, spend = planned
    integer_sum = model.statistic_sum(  # type: ignore[call-arg] -- mmd only (contract/scenario.py)
        data.x.to(device), None if data.y is None else data.y.to(device),
        transform=lambda rows: round_records(rows, release, noise_rng))
    noised = noised_integer_sum(integer_sum, own, noise_rng)
    charge_distributed(ledger, spend, round=server_round, run=run)
    return RoundResult(status="trained", num_examples=n, iterations=1, dp_steps=1, release=noised.ravel())


#: at most this many per-record gradient values (float64) in memory at once in a DP-FedSGD
#: round: the sample is taken in chunks of ``GRADIENT_ROWS_VALUES // parameters`` records
#: (256 MB of rows; the quickstart VAE's whole sample in one chunk, the MNIST flow's 6 a chunk)
GRADIENT_ROWS_VALUES = 2 ** 25


def distributed_sgd_round(model: DPSGDTrainable, data: SiteData, *, plan: DistributedRelease, clip_norm: float,
                          ledger: SiteLedger | None, server_round: int, sampling: torch.Generator,
                          device: torch.device, run: str | None, gradients: str | None = None) -> RoundResult:
    """One round of DP-FedSGD under secure aggregation with distributed noise: exactly one
    private step. The site Poisson-samples its records at the plan's rate, takes every
    sampled record's gradient alone (one forward pass over the sample, then Opacus'
    per-sample gradients, or one backward pass a record for a layer without a grad sampler:
    ``privacy.dp_fedsgd.per_record_gradients``), divides it by the clip norm ``C`` and
    rounds it (``round_records``: projected to norm <= 1, i.e. clipped to ``C``, scaled by
    gamma, conditionally rounded), sums the integers and adds its Skellam
    share (privacy/skellam.py); the sample is taken in chunks that bound the rows in memory
    (:data:`GRADIENT_ROWS_VALUES`). It charges the Poisson-subsampled Skellam mechanism before
    the vector leaves (the secagg mod marks it pending, client/app.py). The model is not
    updated: the server takes the optimizer step on the decoded sum. ``sampling`` (CPU, the
    site's secret generator: OS entropy unless the simulation opted into seeded noise) draws
    the sample, the rounding and the seed of the share. ``gradients``: ``"vectorised"`` or
    ``"loop"`` (benchmarks/dpfedsgd_speed.py); by default the one ``gradient_method`` chooses."""
    n = len(data)
    if ledger is None:
        raise ValueError("DP-FedSGD with distributed noise needs DP (privacy.enabled) and the site's ledger")
    model.check_dp_compatible()
    params = private_step_parameters(model)
    size = sum(p.numel() for p in params)
    if size != plan.dim or size != plan.size:
        raise ValueError(f"the distributed noise is planned for {plan.size} values, the model's private step "
                         f"has {size} parameters")
    if isinstance(planned := _distributed_spend(plan, ledger, n, refusal="refuses to train: one more DP-FedSGD round"),
                  RoundResult):
        return planned  # the site's budget cannot afford the round
    own, spend = planned
    idx = poisson_sample(n, plan.sample_rate, sampling)
    integer_sum = torch.zeros(size, dtype=torch.float64)  # an empty Poisson sample: a noise-only round
    losses = []
    method = gradients or gradient_method(model)
    for chunk in idx.split(max(1, GRADIENT_ROWS_VALUES // size)):  # [records, size] float64 rows at a time
        batch = Batch(x=data.x[chunk].to(device), y=None if data.y is None else data.y[chunk].to(device),
                      size=len(chunk))
        rows, chunk_losses = per_record_gradients(model, batch, method)
        integer_sum += round_records(rows / clip_norm, plan, sampling).sum(dim=0).cpu()
        losses.append(chunk_losses)
    loss = float(torch.cat(losses).mean()) if losses else float("nan")
    noised = noised_integer_sum(integer_sum, own, sampling)
    charge_distributed(ledger, spend, round=server_round, run=run, sample_rate=plan.sample_rate)
    return RoundResult(status="trained", num_examples=n, iterations=1, dp_steps=1,
                       train_loss=loss, release=noised)


def _distributed_spend(plan: DistributedRelease, ledger: SiteLedger, n: int, *,
                       refusal: str) -> tuple[float, dict[str, float]] | RoundResult:
    """The site's Skellam share and spend for a round with distributed noise (a release or
    DP-FedSGD), or the refusal when its budget cannot afford it; a site holding more records
    than the plan's public bound cannot take part (its sum could wrap around)."""
    if n > plan.max_records:
        raise ValueError(f"the site holds {n} records, more than secure_aggregation.max_records "
                         f"{plan.max_records}, which bounds the sum against wrap-around; raise it")
    planned = site_spend(plan, ledger)
    if planned is None:
        return RoundResult(status="budget_exhausted", num_examples=n, message=(
            f"site {ledger.site} {refusal} would exceed its target epsilon {ledger.target_epsilon} "
            f"(spent {ledger.epsilon:.4g})"))
    return planned


@torch.no_grad()
def _proximal_update(model: GenerativeModel, anchor: list[Tensor], *, lr: float, mu: float) -> None:
    """Decoupled FedProx step w <- w - lr * mu * (w - w_global). It uses only the public
    global weights, so under DP it is post-processing (no extra privacy cost)."""
    for p, a in zip(model.parameters(), anchor):
        p.sub_(lr * mu * (p - a))
