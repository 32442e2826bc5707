"""The contract every generative model family implements (docs/architecture.md §2).

:class:`GenerativeModel` is what every family is (data geometry, conditioning, sampling);
how its sites train it is a capability, one mixin each, and a family has one or both:

- :class:`DPSGDTrainable`: the family exposes its training iteration as an ordered list
  of :class:`TrainingStep`. The one local training loop (``client/training.py``) runs
  those steps, with or without differential privacy, without knowing which family it trains.
- :class:`Releasing`: the site publishes one noisy statistic of its data, and the server
  fits the model to the sites' combined releases.

The loop asks :meth:`GenerativeModel.wants_release` which of the two a round is.

Privacy boundary: a step marked ``private=True`` receives a :class:`Batch` of real site
examples and must return one loss per example (the DP-SGD clipping unit). A step marked
``private=False`` receives a batch with ``x is None and y is None``: it literally cannot
see site data, which is what makes its update post-processing (no noise, no charge).
A release's per-record vectors have L2 norm <= 1 (sensitivity 1 of the sum).
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Batch:
    """A minibatch handed to a step's loss.

    ``x`` holds examples in data space and range (images in [0, 1], shape ``[B, *data_shape]``),
    ``y`` integer class labels ``[B]`` for a conditional model. ``size`` is the number of
    examples the loss must return losses for; for a non-private step it is the expected
    batch size and ``x``/``y`` are ``None``.
    """

    x: Tensor | None
    y: Tensor | None
    size: int

    @staticmethod
    def of(x: Tensor, y: Tensor | None = None) -> "Batch":
        return Batch(x=x, y=y, size=int(x.shape[0]))


LossFn = Callable[[Batch], Tensor]


@dataclass(frozen=True)
class TrainingStep:
    """One optimisation step of a training iteration.

    Attributes:
        name: short identifier, e.g. ``"elbo"``, ``"discriminator"``, ``"generator"``.
        module: the sub-module whose parameters this step updates (wrapped by Opacus
            when ``private``); must be ``model`` itself or one of its sub-modules.
        loss: ``loss(batch) -> Tensor[B]``, per-example losses, mean-reduced by the loop.
        private: whether the loss touches private examples. Private steps are clipped,
            noised and charged to the site's privacy ledger.
        lr: learning rate for this step's optimizer; ``None`` takes the training config's.
        betas: Adam betas for this step (GANs commonly use ``(0.5, 0.999)``).
    """

    name: str
    module: nn.Module
    loss: LossFn
    private: bool
    lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)


class GenerativeModel(nn.Module, metaclass=ABCMeta):
    """Base class of all families: the data geometry, the conditioning and sampling.

    A family is trained at the sites by one (or both) of two capabilities, each a mixin
    below that declares what the training loop and the server may ask of it:

    - :class:`DPSGDTrainable`: :meth:`~DPSGDTrainable.steps` run in the one local loop
      (DP-SGD under DP): vae, gan, diffusion, flow.
    - :class:`Releasing`: the site publishes one noisy statistic of its data (one Gaussian
      mechanism, ``privacy/release.py``) and the server fits the model to the aggregate
      (:meth:`server_update`): mmd; any DP-SGD family under a release warm start
      (``warm_start.py``'s :class:`ReleaseWarmStart`) releases in its first round and
      trains by DP-SGD afterwards (a hybrid: both capabilities).

    Subclasses implement :meth:`sample`; families with a tractable likelihood also
    implement :meth:`log_likelihood`.
    """

    def __init__(self, data_shape: tuple[int, ...], num_classes: int | None = None) -> None:
        super().__init__()
        self.data_shape = tuple(int(d) for d in data_shape)
        self.num_classes = num_classes

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @abstractmethod
    @torch.no_grad()
    def sample(self, n: int, labels: Tensor | None = None) -> Tensor:
        """Draw ``n`` samples ``[n, *data_shape]`` in data range; ``labels`` ``[n]`` for
        a conditional model (balanced over classes when omitted)."""

    def log_likelihood(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Per-example log-likelihood (or a lower bound) in nats. Optional."""
        raise NotImplementedError(f"{type(self).__name__} has no likelihood")

    def server_update(self, release_noise_variance: float | None = None) -> dict[str, float]:
        """Post-processing on the server after each aggregation; it sees the aggregated
        model only, never site data. ``release_noise_variance``: after a release round under a
        plain mean, the per-coordinate variance of the Gaussian noise in the combined release
        (:meth:`Releasing.combine_releases`; public: the sites' noise multipliers and counts),
        else ``None``. Returns metrics for ``metrics.jsonl``. Default: none."""
        return {}

    # -- read-only summaries of the capabilities (the server's read path) -------------
    def wants_release(self) -> bool:
        """Whether a site's next round is a release (:class:`Releasing`) rather than
        DP-SGD steps. The training loop and the server ask this; families override it
        through :class:`Releasing`, never by setting a flag."""
        return False

    @property
    def training_mode(self) -> str:
        """``"release"`` when :meth:`wants_release`, else ``"sgd"``: derived, never set."""
        return "release" if self.wants_release() else "sgd"

    @property
    def release_epsilon(self) -> float | None:
        """The share of a site's epsilon a hybrid's release spends before DP-SGD; ``None``
        for every other family (a pure release family spends the whole budget)."""
        return None

    # -- helpers shared by the families -------------------------------------------
    def balanced_labels(self, n: int) -> Tensor | None:
        """Labels 0, 1, ..., K-1, 0, 1, ... for ``n`` samples, or ``None`` if unconditional."""
        if self.num_classes is None:
            return None
        return torch.arange(n, device=self.device) % self.num_classes

    def check_labels(self, n: int, labels: Tensor | None) -> Tensor | None:
        """Validate / default the labels passed to :meth:`sample`."""
        if self.num_classes is None:
            if labels is not None:
                raise ValueError("labels given to an unconditional model (built without num_classes)")
            return None
        if labels is None:
            return self.balanced_labels(n)
        labels = torch.as_tensor(labels, device=self.device).long()
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes - 1}]")
        return labels


class DPSGDTrainable(GenerativeModel):
    """Capability: trained by :meth:`steps` in the one local loop (``client/training.py``),
    clipped, noised and charged per private step under DP (Abadi et al. 2016)."""

    #: Per-example clipping mode that is fastest *and correct* for this family: "bk"
    #: (Book-Keeping, privacy/book_keeping.py) or Opacus' "ghost", "hooks", "functorch";
    #: ``privacy.grad_sample_mode`` may override it.
    grad_sample_mode: str = "bk"

    @abstractmethod
    def steps(self) -> list[TrainingStep]:
        """One training iteration, in order; at least one step is ``private``."""

    def check_dp_compatible(self) -> None:
        """Raise ``ValueError`` (saying why and what to use instead) if this model, as
        configured, cannot be trained with DP-SGD. The training loop calls it when DP is
        on, before the first step. The default accepts every configuration; a family
        overrides it for options whose per-example gradients Opacus cannot compute (e.g.
        the GAN's WGAN-GP gradient penalty)."""

    # -- what a release warm start may release for the family (shared_models/warm_start.py) --
    #: Width of the family's own per-record vector in a release warm start's one release
    #: (:meth:`release_vectors`); 0: the family takes the generator's draws only.
    release_width: int = 0

    def release_vectors(self, x: Tensor) -> Tensor:
        """``[B, release_width]`` per-record vectors of L2 norm <= 1 that a release warm
        start adds to its release (its norm share of the one Gaussian mechanism)."""
        raise NotImplementedError(f"{type(self).__name__} releases nothing of its own (release_width 0)")

    def adopt_release(self, class_means: Tensor) -> None:
        """On the server, after the release round: the federation's noisy per-class means of
        :meth:`release_vectors` (``[classes, release_width]``; post-processing). Default: none."""


class Releasing(GenerativeModel):
    """Capability: a site publishes one noisy statistic of its data.

    Every record contributes a vector of L2 norm <= 1 to :meth:`statistic_sum`, so the sum
    has sensitivity 1 and adding ``N(0, sigma^2 I)`` is one Gaussian mechanism
    (``privacy/release.py``). The site stores its noisy mean with :meth:`set_release`; the
    server reads each site's from :attr:`release_buffer`, combines them
    (:meth:`combine_releases`) and fits the model to the result (:meth:`server_update`).
    """

    #: The name of the buffer :meth:`set_release` fills.
    release_buffer: str

    @abstractmethod
    def statistic_sum(self, x: Tensor, y: Tensor | None) -> Tensor:
        """The sum over records of a per-record vector of L2 norm <= 1."""

    @abstractmethod
    def set_release(self, mean_statistic: Tensor) -> None:
        """Store the site's noisy mean statistic in the model's state."""

    def wants_release(self) -> bool:
        """A pure release family releases every round it is asked: its first release
        spends the whole budget, so the site's ledger refuses every later one. A hybrid
        overrides this: it releases until its release is in the model."""
        return True

    def combine_releases(self, sums: Tensor, noise_multipliers: Tensor, total_examples: float) -> float:
        """On the server: set the federation's statistic from the sites' noisy sums
        ``[K, ...]`` (each site's release times its record count; ``sigma_k`` from its
        ledger) and return the per-coordinate variance of the noise it carries.
        Default: FedAvg's average ``sum_k S~_k / N``, variance ``sum_k sigma_k^2 / N^2``."""
        self.set_release(sums.sum(0) / total_examples)
        return float((noise_multipliers.double() ** 2).sum()) / total_examples ** 2
