"""Non-private pretraining of any DP-SGD family: the warm start's training step.

A warm start trains the global model on the server before round 1, on data that carry no
privacy cost: a dataset the scenario declares public, or samples of a generator fitted to
the sites' DP release (post-processing). It runs the family's own
:meth:`~shared_models.DPSGDTrainable.steps` -- the same steps the sites' DP-SGD loop runs,
without clipping or noise -- so one mechanism serves vae, gan, flow and diffusion alike.

It lives here, in pure torch, because the server runs it and ``server/`` may not import
``client/`` (docs/architecture.md §1: shared_models is below both). The sites' loop
(``client/training.py``) stays the one loop that touches private data; this function is
handed only the arrays it trains on, so a test can assert that no site data reach it.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterator

import torch
from torch import Tensor

from .mmd import screened_draws
from .protocol import Batch, DPSGDTrainable, Releasing, TrainingStep
from .registry import build_model
from .release import precision_weighted_release


def uniform_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Shuffled minibatches of indices without replacement, epoch after epoch: non-DP
    training (this pretraining, and a site's rounds without DP in client/training.py)."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield perm[start:start + batch_size]


def pretrain(model: DPSGDTrainable, x: Tensor, y: Tensor | None, *, steps: int, batch_size: int, lr: float,
             seed: int) -> dict[str, float]:
    """Train ``model`` in place for ``steps`` iterations of its own steps on ``(x, y)``,
    without DP (public or post-processed data only). Returns ``pretrain_loss`` (the first
    step's mean loss over the last tenth of the iterations), ``pretrain_steps``,
    ``pretrain_examples`` and ``pretrain_seconds``."""
    if not isinstance(model, DPSGDTrainable):
        raise TypeError(f"{type(model).__name__} is not trained by steps; a warm start pretrains DP-SGD families")
    n = int(x.shape[0])
    if n == 0:
        raise ValueError("a warm start needs at least one example")
    if model.conditional and y is None:
        raise ValueError("the model is class-conditional but the warm-start data have no labels")
    device = model.device
    t0 = time.time()
    model.train()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # model-internal draws (z, t, noise)
    train_steps = model.steps()
    optimizers = {}
    for step in train_steps:
        if id(step) not in optimizers:
            optimizers[id(step)] = torch.optim.Adam(step.module.parameters(), lr=step.lr or lr, betas=step.betas)
    batches = uniform_batches(n, min(batch_size, n), generator)
    first = train_steps[0].name
    tail = max(1, math.ceil(steps / 10))
    tail_sum, tail_count = 0.0, 0
    for it in range(steps):
        for step in train_steps:
            model.zero_grad(set_to_none=True)
            if step.private:  # the step that would see site data sees the warm-start data
                idx = next(batches)
                batch = Batch(x=x[idx].to(device), y=None if y is None or not model.conditional
                              else y[idx].to(device), size=len(idx))
            else:
                batch = Batch(x=None, y=None, size=min(batch_size, n))
            losses = step.loss(batch)
            losses.mean().backward()
            optimizers[id(step)].step()
            if step.name == first and it >= steps - tail:
                tail_sum += float(losses.detach().sum())
                tail_count += int(losses.shape[0])
    model.zero_grad(set_to_none=True)
    return {"pretrain_loss": tail_sum / max(1, tail_count), "pretrain_steps": float(steps),
            "pretrain_examples": float(n), "pretrain_seconds": time.time() - t0}


class ReleaseWarmStart(DPSGDTrainable, Releasing):
    """A DP-SGD family warm-started from one DP release: any family, one mechanism.

    Round 1 is one release, noised and charged ``release_epsilon`` by privacy/release.py at
    each site and combined by precision at the server: the
    :class:`~shared_models.mmd.MMDGenerator`'s mean embedding of random features and, when
    the wrapped family has a statistic of its own (``release_width`` > 0, e.g. the flow's
    per-class pixel means), that statistic beside it in the same release. Each record's
    vector is ``[a u_head, b u_family, a w]`` with ``a^2 + b^2 = 1`` (``b^2`` =
    ``family_share``; 0 releases the head's embedding alone), so its norm stays <= 1: one Gaussian mechanism of sensitivity 1, one
    ledger entry. Under secure aggregation with ``noise: distributed`` the head's embedding
    alone (``family_share`` 0) is released instead as the central Skellam release of the
    sites' integer sums (privacy/skellam.py; contract/task.py plans it, :meth:`statistic_sum`
    takes the sites' rounding), and the fine-tuning is DP-FedSGD planned after it. The
    server then hands the family its noisy class means
    (:meth:`~shared_models.DPSGDTrainable.adopt_release`), fits the release's generator and
    pretrains the wrapped family on ``samples`` of its draws (:func:`pretrain`;
    post-processing: it never sees a record). From round 2 the sites fine-tune the wrapped
    family by DP-SGD, sigma calibrated so the release plus the planned steps compose to the
    target (privacy.accounting.calibrate_after, through ``release_epsilon``). Sampling,
    likelihood and training steps are the wrapped family's.
    """

    release_buffer = "head.embedding"  # "joint" when the family releases a statistic of its own
    #: set by the server (server/fit_cache.py): ``fit(head, noise_variance, seed)`` in place of the head's own fit
    fit_cache = None

    def __init__(self, inner: DPSGDTrainable, head: Releasing, *, release_epsilon: float, steps: int,
                 batch_size: int, lr: float, samples: int, seed: int = 0, family_share: float = 0.5,
                 screen_samples: bool = False) -> None:
        super().__init__(inner.data_shape, inner.num_classes)
        if release_epsilon <= 0:
            raise ValueError(f"release_epsilon must be > 0, got {release_epsilon}")
        if not 0.0 <= family_share < 1.0:
            raise ValueError(f"family_share must lie in [0, 1), got {family_share}")
        width = int(inner.release_width) if family_share > 0 else 0
        self.inner, self.head = inner, head
        self.epsilon, self.pretrain_steps, self.pretrain_batch = release_epsilon, steps, batch_size
        self.pretrain_lr, self.pretrain_samples, self.seed = lr, samples, seed
        self.family_share = family_share if width else 0.0
        if screen_samples and not (getattr(head, "public_filter", 0.0) > 0 and inner.num_classes is not None):
            raise ValueError("screen_samples: the screen is the release generator's public classifier; it needs the "
                             "generator's public_filter > 0 (with perceptual features) and class labels")
        self.screen_samples = screen_samples
        self.register_buffer("released", torch.zeros(()))  # 1 once the combined release is in
        self.register_buffer("pretrained", torch.zeros(()))  # 1 once the inner model is warm
        if width:  # the site's noisy mean of [a u_head, b u_family, a w], per class
            classes, head_width = head.state_dict()[head.release_buffer].shape
            self.register_buffer("joint", torch.zeros(classes, head_width + width))
            self.release_buffer = "joint"
        self.grad_sample_mode = inner.grad_sample_mode

    # -- the release (Releasing) --------------------------------------------------------
    @property
    def release_epsilon(self) -> float:  # type: ignore[override]
        return self.epsilon

    @property
    def _scales(self) -> tuple[float, float]:
        """``(a, b)``: the head's and the family's norm factors, ``a^2 + b^2 = 1``."""
        return math.sqrt(1.0 - self.family_share), math.sqrt(self.family_share)

    def wants_release(self) -> bool:
        return not bool(self.released)

    @property
    def count_weight(self) -> float:
        """The norm share of the class-count column in the released rows (the head's, times
        ``a`` in the joint rows): a distributed release reads its noisy count off it."""
        return self._scales[0] * float(getattr(self.head, "count_weight"))

    @torch.no_grad()
    def statistic_sum(self, x: Tensor, y: Tensor | None,
                      transform: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """The release's sum over ``(x, y)``; ``transform`` maps each record's row before
        summing (the distributed release's integer rounding, privacy/skellam.py): the head's
        embedding alone only (``family_share`` 0, as contract/scenario.py requires)."""
        if transform is not None:
            if self.family_share:
                raise ValueError("a distributed release takes the head's embedding alone (family_share 0)")
            return self.head.statistic_sum(x, y, transform=transform)  # type: ignore[call-arg]
        head = self.head.statistic_sum(x, y)
        if not self.family_share:
            return head
        a, b = self._scales
        x = x.to(head.device)
        rows = y.long().to(head.device) if self.conditional and y is not None else \
            torch.zeros(len(x), dtype=torch.long, device=head.device)
        own = torch.zeros(len(head), self.inner.release_width, device=head.device)
        own.index_add_(0, rows, b * self.inner.release_vectors(x).to(own.dtype))
        return torch.cat([a * head[:, :-1], own, a * head[:, -1:]], dim=1)

    def set_release(self, mean_statistic: Tensor) -> None:
        if self.family_share:
            self.joint.copy_(mean_statistic)
        else:
            self.head.set_release(mean_statistic)
        self.released.fill_(1.0)

    def combine_releases(self, sums: Tensor, noise_multipliers: Tensor, total_examples: float) -> float:
        """The head combines the release (its own way: by precision, or FedAvg's mean); with a
        family statistic, the joint rows are combined the same way and the returned noise
        variance is the head's part's (divided by ``a^2``, as :meth:`server_update` unpacks it)."""
        if not self.family_share:
            variance = self.head.combine_releases(sums, noise_multipliers, total_examples)
            self.released.fill_(1.0)
            return variance
        a, _ = self._scales
        if getattr(self.head, "combine", "precision") == "precision":
            release, variance = precision_weighted_release(sums, noise_multipliers, total_examples,
                                                           self.count_weight)
            self.set_release(release)
        else:  # the protocol's default: FedAvg's average, into the joint rows
            variance = Releasing.combine_releases(self, sums, noise_multipliers, total_examples)
        return variance / (a * a)

    def _unpack_release(self) -> None:
        """Split the combined joint release: the head's embedding (its own layout, ``/ a``)
        and the family's noisy class means (``/ b``, divided by the class share)."""
        a, b = self._scales
        joint, head_width = self.joint, self.joint.shape[1] - self.inner.release_width
        self.head.set_release(torch.cat([joint[:, :head_width - 1], joint[:, -1:]], dim=1) / a)
        share = (joint[:, -1] / self.count_weight).clamp_min(1e-6)
        self.inner.adopt_release(joint[:, head_width - 1:-1] / b / share.unsqueeze(1))

    def server_update(self, release_noise_variance: float | None = None) -> dict[str, float]:
        """After the release round: hand the family its part of the release, fit the
        release's generator, pretrain the wrapped family on its samples (once); afterwards
        the wrapped family's own post-processing."""
        if not bool(self.released) or bool(self.pretrained):
            return self.inner.server_update(release_noise_variance)
        if self.family_share:
            self._unpack_release()
        torch.manual_seed(self.seed)  # the fit's draws: the same on every engine, whatever ran before in the process
        info = dict(self.head.server_update(release_noise_variance) if self.fit_cache is None
                    else self.fit_cache.fit(self.head, release_noise_variance, self.seed))
        x, y = self.generator_samples()
        info.update(pretrain(self.inner, x, y, steps=self.pretrain_steps, batch_size=self.pretrain_batch,
                             lr=self.pretrain_lr, seed=self.seed))
        self.pretrained.fill_(1.0)
        return info

    def fit_public_features(self, x: Tensor, y: Tensor | None, *, steps: int, batch_size: int, lr: float,
                            seed: int) -> dict[str, float]:
        """A public warm start beside the release (``warm_start.public`` with the generator's
        ``perceptual_weight > 0``): the declared-public set trains the release head's
        perceptual network only (DP-MEPF; the server, before round 1). The wrapped family is
        not trained on it: it pretrains on the generator's samples after the release."""
        fit = self.head.fit_public_features  # type: ignore[attr-defined]
        return fit(x, y, steps=steps, batch_size=batch_size, lr=lr, seed=seed)

    @torch.no_grad()
    def generator_samples(self) -> tuple[Tensor, Tensor | None]:
        """What the wrapped family is pretrained on: draws of the release's generator only."""
        torch.manual_seed(self.seed)
        labels = self.head.balanced_labels(self.pretrain_samples)
        return self.head.sample(self.pretrain_samples, labels).detach(), labels

    # -- the wrapped family (DPSGDTrainable) --------------------------------------------
    def steps(self) -> list[TrainingStep]:
        return self.inner.steps()

    def check_dp_compatible(self) -> None:
        self.inner.check_dp_compatible()

    @torch.no_grad()
    def sample(self, n: int, labels: Tensor | None = None) -> Tensor:
        """The wrapped family's samples; with ``screen_samples``, each one the release
        generator's public classifier does not recognise as its class (at the generator's
        ``public_filter``) drawn again, as the mmd family screens its own (post-processing:
        the classifier saw the declared-public set only)."""
        if not self.screen_samples:
            return self.inner.sample(n, labels)
        return screened_draws(self.inner.sample, self.head.publicly_recognised,  # type: ignore[attr-defined]
                              self.check_labels(n, labels))

    def log_likelihood(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return self.inner.log_likelihood(x, y)


def with_release_warm_start(inner: DPSGDTrainable, *, release_epsilon: float, num_features: int = 2000,
                            generator_steps: int = 1500, samples: int = 10000, steps: int = 500,
                            batch_size: int = 128, lr: float = 1e-3, seed: int = 0, family_share: float = 0.5,
                            screen_samples: bool = False, **generator: object) -> ReleaseWarmStart:
    """``inner`` wrapped for a release warm start (``warm_start.release``): an mmd release
    head on the same data (conv generator for images whose sides 4 divides, else MLP;
    ``generator``: its further options), the family inside. ``release_epsilon``: what the
    release spends (absolute; the scenario's fraction times its target). The sites and the
    server build the same wrapped model from the scenario (contract/task.py)."""

    shape = inner.data_shape
    conv = len(shape) == 3 and shape[1] % 4 == 0 and shape[2] % 4 == 0
    with torch.random.fork_rng(devices=[]):  # the head's init from the seed alone, whatever the family:
        torch.manual_seed(seed)  # every family's run fits the same generator (server/fit_cache.py shares it)
        head = build_model("mmd", data_shape=shape, num_classes=inner.num_classes,
                           architecture="conv" if conv else "mlp", num_features=num_features,
                           fit_steps=generator_steps, feature_seed=seed, **generator)
    return ReleaseWarmStart(inner, head, release_epsilon=release_epsilon, steps=steps,  # type: ignore[arg-type]
                            batch_size=batch_size, lr=lr, samples=samples, seed=seed, family_share=family_share,
                            screen_samples=screen_samples)
