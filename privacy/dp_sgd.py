"""DP-SGD for one private :class:`~shared_models.TrainingStep`, on Opacus.

Abadi et al., "Deep Learning with Differential Privacy" (2016), Algorithm 1: per-example
gradients are clipped to norm C, summed, Gaussian noise N(0, sigma^2 C^2) is added, and
the sum is divided by the *expected* batch size q*N (Poisson sampling, so the batch size
itself is random and must not be used to normalise).

Per-example gradient norms come from one of four modes:
- ``"ghost"``: Opacus' ghost clipping (Li et al. 2022, §4): norms from activations and
  output gradients, then a second backward of the re-weighted loss.
  Fastest for linear layers; requires each layer to be applied once per example.
- ``"hooks"``: materialised per-sample gradients from module hooks; handles layers that
  are applied several times per example (a GAN discriminator on real and fake, a
  denoiser on K noise draws) by summing their contributions for each example.
- ``"functorch"``: per-sample gradients from ``torch.func`` for layers without a hook rule.
- ``"bk"``: Book-Keeping (Bu et al., ICML 2023; privacy/book_keeping.py): one forward and
  one backward pass for the layers' output gradients only, then ghost norms and the
  clipped sum from the book-kept activations -- about the cost of a non-private step.
  Handles layers applied several times per example; Linear, Conv2d, GroupNorm and
  LayerNorm only (anything else with trainable parameters is refused).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _generate_noise
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.validators import ModuleValidator
from torch import Tensor, nn

from .book_keeping import BookKeeping
from .errors import PrivacyConfigError

GRAD_SAMPLE_MODES = ("ghost", "hooks", "functorch", "bk")


def poisson_sample(n: int, sample_rate: float, generator: torch.Generator) -> Tensor:
    """Indices of a Poisson-subsampled batch: each of ``n`` examples independently with
    probability ``sample_rate`` (the sampling the accountant's amplification assumes)."""
    return torch.nonzero(torch.rand(n, generator=generator) < sample_rate, as_tuple=False).flatten()


def check_privatizable(module: nn.Module) -> None:
    """Refuse modules Opacus cannot privatise (BatchNorm and friends), listing each."""
    errors = ModuleValidator.validate(module, strict=False)
    if errors:
        details = "; ".join(str(e) for e in errors)
        raise PrivacyConfigError(
            f"{type(module).__name__} cannot be trained with DP-SGD: {details}. "
            "Use GroupNorm/LayerNorm instead of BatchNorm."
        )


class _OneBatchClippedSumOptimizer(DPOptimizerFastGradientClipping):
    """Opacus' optimizer for a ``p.grad`` that already holds the clipped sum (ghost, bk),
    without its per-step copies: Opacus deep-copies every ``p.grad`` into ``p.summed_grad``
    (to accumulate several batches) and adds noise out of place. fedgen takes exactly one
    Poisson batch per step, so the sum is aliased and the noise N(0, sigma^2 C^2) is added
    in place -- the same update, one parameter-sized copy less per parameter per step."""

    def accumulate(self) -> None:
        for p in self.params:
            if p.summed_grad is not None:  # a skipped step left a sum behind: add to it
                p.summed_grad.add_(p.grad)
            else:
                p.summed_grad = p.grad

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            p.summed_grad.add_(_generate_noise(std=std, reference=p.summed_grad, generator=self.generator,
                                               secure_mode=self.secure_mode))
            p.grad = p.summed_grad.view_as(p)


@dataclass(frozen=True)
class DPSettings:
    """Per-step DP parameters (keyword-only where they are used)."""

    noise_multiplier: float
    max_grad_norm: float
    expected_batch_size: float
    grad_sample_mode: str = "ghost"


class PrivateStepOptimizer:
    """Clips, noises and applies the gradient of one private step.

    Usage per Poisson batch::

        opt.zero_grad(); opt.backward(per_example_losses); opt.step()

    ``close()`` removes the hooks so the module is plain again (e.g. between rounds).
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, *, settings: DPSettings,
                 noise_generator: torch.Generator | None = None) -> None:
        mode = settings.grad_sample_mode
        if mode not in GRAD_SAMPLE_MODES:
            raise PrivacyConfigError(
                f"unknown grad_sample_mode {mode!r}; choose one of: {', '.join(GRAD_SAMPLE_MODES)}")
        check_privatizable(module)
        self.mode = mode
        self.max_grad_norm = settings.max_grad_norm
        common = dict(noise_multiplier=settings.noise_multiplier, max_grad_norm=settings.max_grad_norm,
                      expected_batch_size=max(1, round(settings.expected_batch_size)),
                      loss_reduction="mean", generator=noise_generator)
        self.gsm: GradSampleModule | BookKeeping
        if mode == "ghost":
            self.gsm = GradSampleModuleFastGradientClipping(
                module, batch_first=True, loss_reduction="mean",
                max_grad_norm=settings.max_grad_norm, use_ghost_clipping=True)
            self.optimizer: DPOptimizer = _OneBatchClippedSumOptimizer(optimizer, **common)
        elif mode == "bk":  # p.grad = the clipped sum, as after ghost clipping: same optimizer
            self.gsm = BookKeeping(module)
            self.optimizer = _OneBatchClippedSumOptimizer(optimizer, **common)
        else:
            self.gsm = GradSampleModule(module, batch_first=True, loss_reduction="mean",
                                        force_functorch=(mode == "functorch"))
            self.optimizer = DPOptimizer(optimizer, **common)
        # Opacus divides by expected_batch_size (int); keep the exact float for the scale.
        self.optimizer.expected_batch_size = settings.expected_batch_size
        self.params = [p for p in module.parameters() if p.requires_grad]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, losses: Tensor) -> None:
        """Per-example clipped gradients of ``losses`` (shape ``[B]``), summed into place."""
        if losses.dim() != 1:
            raise ValueError(f"a private step's loss must be per-example, shape [B]; got {tuple(losses.shape)}")
        if losses.shape[0] == 0:  # empty Poisson batch: the update is noise only
            self._empty_batch()
            return
        if self.mode == "ghost":
            DPTensorFastGradientClipping(self.gsm, self.optimizer, losses, "mean").backward()
        elif self.mode == "bk":
            self.gsm.clip_and_accumulate(losses, self.max_grad_norm)
        else:
            losses.mean().backward()

    def _empty_batch(self) -> None:
        # A forward pass over the empty batch (if the caller ran one) left activations in
        # the hooks that no backward will consume: drop them. That is enough for bk; Opacus'
        # modes still fail on the next batch after such a forward (tests/test_dp_sgd.py), so
        # the training loop never runs one on an empty Poisson batch.
        if self.mode == "bk":
            self.gsm.clear()
        else:
            for module in self.gsm.modules():
                if hasattr(module, "activations"):
                    module.activations = []
        for p in self.params:
            if self.mode in ("ghost", "bk"):
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)

    def step(self) -> None:
        """Noise the clipped sum, scale by 1/(qN) and take the optimizer step."""
        self.optimizer.step()

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.gsm._close()


def clipped_gradient_reference(module: nn.Module, losses_fn, batch_size: int, max_grad_norm: float) -> list[Tensor]:
    """Slow reference for tests: the sum over examples of each example's gradient,
    clipped to ``max_grad_norm``, computed with micro-batches of one.

    ``losses_fn(i)`` must return the scalar loss of example ``i`` alone.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(batch_size):
        grads = torch.autograd.grad(losses_fn(i), params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        factor = min(1.0, max_grad_norm / (float(norm) + 1e-6))
        for t, g in zip(total, grads):
            t += factor * g
    return total


class paused_hooks:
    """Context manager: switch the per-example hooks off for the given private optimizers while a
    non-private step runs (e.g. the GAN generator step back-propagating through D)."""

    def __init__(self, optimizers: list["PrivateStepOptimizer"]) -> None:
        self.optimizers = optimizers

    def __enter__(self) -> None:
        for opt in self.optimizers:
            opt.gsm.disable_hooks()

    def __exit__(self, *exc: object) -> None:
        for opt in self.optimizers:
            opt.gsm.enable_hooks()
