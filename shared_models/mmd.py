"""Moment matching to a privately released random-feature mean embedding: DP-MERF
(Harder, Adamczewski & Park, "DP-MERF: Differentially Private Mean Embeddings with
Random Features for Practical Privacy-Preserving Data Generation", AISTATS 2021).

A *release* family (:class:`~shared_models.protocol.Releasing` only): a site does not run DP-SGD. It
computes, once, the sum over its records of

    v(x, y) = [sqrt(1 - w^2) phi(x), w] (x) e_y

where ``phi`` are random Fourier features of a Gaussian kernel (Rahimi & Recht 2007,
``phi(x) = [cos(W x), sin(W x)] / sqrt(F)`` with ``W ~ N(0, I / bandwidth^2)``, so
``||phi(x)|| = 1``), ``e_y`` the one-hot label, and the constant feature ``w`` carries
class counts (DP-MERF §3.2, which uses ``w = 1 / sqrt(2)``: half of the squared sensitivity
goes to the counts). Counts need little precision -- they only weight the classes -- so a
smaller ``count_weight`` hands most of the norm to ``phi``, the same as a
``1 / sqrt(2 (1 - w^2))`` times smaller noise on the features for the same release.
Every record's ``v`` has L2 norm exactly 1, so the sum has
sensitivity 1 under add/remove-one and adding ``N(0, sigma^2 I)`` is one Gaussian
mechanism: one accountant step at sampling rate 1 (``privacy/release.py``). The frequencies
``W`` come from a public seed, never from data.

The site stores its noisy mean ``S_k / n_k`` in the ``embedding`` buffer and returns the
model. The server combines the sites' releases into the federation's noisy mean embedding:
FedAvg's example-weighted average ``sum_k S_k / N`` (``combine: fedavg``), or, by default,
each class's site means weighted by their precision (``combine: precision``,
:mod:`shared_models.release`), which keeps the noise of sites that hardly hold a class out
of that class -- on MNIST with label skew 2.5 times less noise, the same as a larger
epsilon for free. It then fits the generator to the result
(:meth:`MMDGenerator.server_update`, eq. 4 of DP-MERF: ``||mu_P~ - mu_Q||^2``), which sees
only the sites' releases: post-processing, no further privacy cost.

How long to fit follows the noise (Morozov's discrepancy principle for noisy inverse
problems). The target is ``e + n`` with ``n`` the average of the sites' Gaussian noise,
whose expected energy ``E||n||^2 = v * classes * F`` the server knows from public
quantities (``v`` per coordinate from the sites' noise multipliers and record counts:
``sum_k sigma_k^2 / N^2`` for FedAvg's average). A generator that matches ``e`` leaves a
residual of about ``E||n||^2``; driving the loss below it fits the noise. The fit
therefore stops once its smoothed loss reaches ``fit_tolerance * E||n||^2`` (MNIST at
epsilon 1 with FedAvg's average, one noise draw: stopped there after 186 steps, TSTR 73.6 % and FID 36, against 70.4 % and FID 46
after 1 000 steps and 61.1 % after 2 000; with the precision weighting the seeded scenario
stops after 377 steps at TSTR 78 %, FID 28). At epsilon 10 the noise energy lies far below
what the generator reaches, so the fit runs all ``fit_steps``.

Perceptual features (DP-MEPF, Harder, Asadabadi, Sutherland & Park, TMLR 2023): with
``perceptual_weight`` ``p > 0`` the vector becomes

    v(x, y) = [sqrt(1 - w^2 - p^2) phi(x), p psi(x), w] (x) e_y

with ``psi`` the unit-norm activations of a small network trained on a declared-PUBLIC set
(:mod:`shared_models.perceptual`; the server trains it before round 1 and ships it in the
model). The site does not trust that network: :func:`bounded_rows` scales every record's
vector to norm <= 1 (and zeroes one that is not finite) before it is summed, so the sum's
sensitivity stays 1 whatever weights arrive, and the release, its accountant, the precision
combine and the distributed (Skellam) path are unchanged.

The same network is a classifier of the public set, so with ``public_filter`` it also
screens the generator's samples (rejection sampling: a sample whose requested class the
public classifier does not recognise is drawn again). That is post-processing of the
release with public data only -- no epsilon -- and it trades diversity for class fidelity,
as discriminator rejection sampling does for GANs (Azadi et al., ICLR 2019) with a
classifier in place of the discriminator.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .layers import ConvUpsampler, flat_dim, is_image_shape, mlp, one_hot
from .perceptual import PerceptualFeatures, train_on_public
from .protocol import Releasing
from .registry import register_model
from .release import precision_weighted_release


_SMOOTHING = 0.95  # of the fit loss's moving average (about the last 20 steps)
_WARMUP_STEPS = 20  # steps before the moving average may stop the fit
FILTER_ROUNDS = 20  # redraws of a sample the public classifier rejects (public_filter)


def screened_draws(draw: Callable[[int, Tensor], Tensor], recognised: Callable[[Tensor, Tensor], Tensor],
                   labels: Tensor) -> Tensor:
    """``draw(len(labels), labels)``, each sample the public classifier does not recognise
    (``recognised(x, labels)`` False) drawn again, up to :data:`FILTER_ROUNDS` times
    (rejection sampling; post-processing: the classifier saw public data only)."""
    x = draw(len(labels), labels)
    pending = torch.nonzero(~recognised(x, labels)).flatten()
    for _ in range(FILTER_ROUNDS):
        if not len(pending):
            break
        again = draw(len(pending), labels[pending])
        x[pending] = again
        pending = pending[~recognised(again, labels[pending])]
    return x


def bounded_rows(rows: Tensor) -> Tensor:
    """Every record's vector scaled to L2 norm <= 1, a non-finite one replaced by zeros: the
    site's own guarantee of sensitivity 1, whatever feature network the server sent."""
    rows64 = rows.double()
    finite = torch.isfinite(rows64).all(dim=1, keepdim=True)
    rows64 = torch.where(finite, rows64, torch.zeros_like(rows64))
    norms = rows64.norm(dim=1, keepdim=True)
    scale = torch.where(torch.isfinite(norms) & (norms > 1.0), 1.0 / norms, torch.ones_like(norms))
    bounded = torch.where(torch.isfinite(norms), rows64 * scale, torch.zeros_like(rows64))
    return bounded.to(rows.dtype)


@register_model("mmd")
class MMDGenerator(Releasing):
    """A generator fitted to a DP random-feature mean embedding (DP-MERF).

    Args:
        data_shape: shape of one example; data in [0, 1].
        num_classes: condition on labels (the embedding is per class).
        architecture: the generator: ``"conv"`` (images with H, W divisible by 4: a DCGAN-shaped
            upsampler, whose smoothness keeps the released noise out of the pixels), ``"mlp"``
            (rows of numeric columns, or any shape), or ``"auto"`` (default): ``conv`` for such
            images, ``mlp`` otherwise (rows: ``data_shape`` of one dimension).
        num_features: F, the number of random Fourier features (F / 2 frequencies), shared
            equally by the ``pool_sizes``.
        bandwidth: the Gaussian kernel's length scale in data space (pixels in [0, 1]).
        pool_sizes: images only: one Gaussian kernel per entry ``p``, on the image average-
            pooled by ``p`` with length scale ``bandwidth / p`` (pooling by ``p`` shrinks
            distances between smooth images about ``p``-fold). The kernel is their mean -- a
            sum of kernels is a kernel -- so ``||phi(x)||`` stays 1 and the release's
            sensitivity is unchanged. Coarse scales match stroke layout with fewer,
            larger-magnitude features, which survive the release noise better.
        latent_dim: size of the generator's noise input.
        hidden: width of the generator's hidden layers.
        fit_steps: generator steps per server update.
        fit_batch: generated samples per generator step.
        fit_lr: the generator's Adam learning rate.
        feature_seed: public seed of the random frequencies (same at every site).
        count_weight: ``w``, the norm share of the class-count feature (see the module docstring).
        fit_tolerance: stop the fit once its smoothed loss is at most this multiple of the
            release's expected noise energy (the discrepancy principle, module docstring);
            ``None`` always runs ``fit_steps``.
        fit_cooldown: ``c``: having reached the noise level at step ``s``, go on for
            ``ceil(c * s)`` more steps with the learning rate falling linearly to 0 (``0``:
            stop there). The cosine schedule spans ``fit_steps``, so a fit the noise stops
            early stops at a high rate. MNIST under secure aggregation at epsilon 1, one
            release: 4 000 steps stopping at the noise level (step 661) 86.9 % TSTR, refitted
            with ``c = 0.25`` 89.1 % (2 000 steps without: 88.8 %; docs/benchmarks.md).
        temperature: default sampling temperature T, ``z ~ N(0, T^2 I)`` (the fit always
            uses T = 1). T < 1 trades diversity for typical samples -- the truncation trick
            of BigGAN (Brock, Donahue & Simonyan 2019) in its simplest form. On MNIST (FedAvg's
            average) at epsilon 1, T = 0.7 took FID from 35-37 to 22-25 and TSTR up 1-3 points; at
            epsilon 10 FID 17 -> 8, but TSTR moved -2.5 to +0.7 points (docs/benchmarks.md).
        fit_unbiased: fit with the unbiased (U-statistic) estimate of the generator's
            embedding norm. The plain batch estimate carries a bias of ``Var(mean phi)``
            that rewards samples crowding together. Breast-cancer rows, no noise, one run:
            synthetic->real logistic regression 0.930 -> 0.947 (the columns' spread stayed
            about 0.7x the real one either way). Off by default: the image figures were
            measured without it.
        combine: how the server combines the sites' releases: ``"precision"`` weights each
            site's class means by their inverse variance (:mod:`shared_models.release`: under
            label skew the noise of sites that hardly hold a class stays out of it);
            ``"fedavg"`` takes FedAvg's plain average.
        perceptual_weight: ``p``, the norm share of the perceptual features (DP-MEPF, module
            docstring; images only); 0 (default) releases random features alone. Needs a
            declared-public set (``warm_start.public``) the server trains the network on;
            ``count_weight^2 + p^2`` must stay below 1.
        public_filter: with perceptual features and classes, keep a sample only when the
            perceptual network -- a classifier trained on the public set alone -- gives its
            requested class a probability >= ``public_filter``; a rejected sample is drawn
            again (rejection sampling, at most ``FILTER_ROUNDS`` times; a slot no draw passes
            keeps its last draw). Post-processing of the DP release with public data only:
            it costs no epsilon. 0 (default): off.
    """

    release_buffer = "embedding"

    def __init__(self, data_shape: tuple[int, ...], num_classes: int | None = None, *, architecture: str = "auto",
                 num_features: int = 4000,
                 bandwidth: float = 5.0, latent_dim: int = 10, hidden: int = 256, fit_steps: int = 2000,
                 fit_batch: int = 500, fit_lr: float = 1e-3, feature_seed: int = 0,
                 pool_sizes: tuple[int, ...] = (1,), count_weight: float = 1 / math.sqrt(2.0),
                 fit_tolerance: float | None = 1.0, fit_cooldown: float = 0.0, temperature: float = 1.0,
                 combine: str = "precision", fit_unbiased: bool = False, perceptual_weight: float = 0.0,
                 public_filter: float = 0.0) -> None:
        super().__init__(data_shape, num_classes)
        pool_sizes = tuple(pool_sizes)
        if not pool_sizes or num_features < 2 * len(pool_sizes) or num_features % (2 * len(pool_sizes)):
            raise ValueError(f"num_features must be a positive multiple of 2 x len(pool_sizes) = {2 * len(pool_sizes)}, "
                             f"got {num_features}")
        if pool_sizes != (1,) and not (is_image_shape(self.data_shape)
                                       and all(p >= 1 and self.data_shape[1] % p == 0 == self.data_shape[2] % p
                                               for p in pool_sizes)):
            raise ValueError(f"pool_sizes {list(pool_sizes)} need images whose H and W each pool size divides, "
                             f"got shape {self.data_shape}; use pool_sizes: [1]")
        if not 0.0 < count_weight < 1.0:
            raise ValueError(f"count_weight must lie in (0, 1), got {count_weight}")
        if not 0.0 <= perceptual_weight < 1.0 or count_weight ** 2 + perceptual_weight ** 2 >= 1.0:
            raise ValueError(f"perceptual_weight must lie in [0, 1) with count_weight^2 + perceptual_weight^2 < 1, "
                             f"got {perceptual_weight} (count_weight {count_weight})")
        if perceptual_weight > 0 and not is_image_shape(self.data_shape):
            raise ValueError(f"perceptual_weight needs images (channels, H, W), got shape {self.data_shape}; "
                             "use perceptual_weight: 0")
        if not 0.0 <= public_filter < 1.0:
            raise ValueError(f"public_filter must lie in [0, 1), got {public_filter}")
        if public_filter > 0 and (perceptual_weight <= 0 or num_classes is None):
            raise ValueError("public_filter: the filter is the perceptual network's classifier, trained on the public "
                             "set; it needs perceptual_weight > 0 and class labels (or set public_filter: 0)")
        if combine not in ("precision", "fedavg"):
            raise ValueError(f"unknown combine {combine!r}; choose 'precision' or 'fedavg'")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if fit_tolerance is not None and fit_tolerance <= 0:
            raise ValueError(f"fit_tolerance must be positive (or null to always run fit_steps), got {fit_tolerance}")
        if not 0.0 <= fit_cooldown < math.inf:
            raise ValueError(f"fit_cooldown must be a finite number >= 0 (0: stop at the noise level), got {fit_cooldown}")
        self.latent_dim, self.fit_steps, self.fit_batch, self.fit_lr = latent_dim, fit_steps, fit_batch, fit_lr
        self.pool_sizes, self.count_weight, self.fit_tolerance = pool_sizes, count_weight, fit_tolerance
        self.fit_cooldown = fit_cooldown
        self.temperature, self.combine, self.fit_unbiased = temperature, combine, fit_unbiased
        self.perceptual_weight, self.public_filter = perceptual_weight, public_filter
        self.dim = flat_dim(self.data_shape)
        classes = num_classes or 1
        gen = torch.Generator().manual_seed(feature_seed)
        for i, p in enumerate(pool_sizes):  # public frequencies, rebuilt from the seed
            freqs = torch.randn(self.dim // (p * p), num_features // (2 * len(pool_sizes)), generator=gen)
            self.register_buffer(f"frequencies_{i}", freqs * p / bandwidth, persistent=False)
        perceptual_dim = 0
        if perceptual_weight > 0:  # trained on public data by the server, shipped in the model's state
            self.perceptual = PerceptualFeatures(*self.data_shape, num_classes=max(classes, 10))
            self.perceptual.requires_grad_(False)
            perceptual_dim = self.perceptual.dim
        self.register_buffer("embedding", torch.zeros(classes, num_features + perceptual_dim + 1))  # the noisy mean
        inputs = latent_dim + (num_classes or 0)
        images = is_image_shape(self.data_shape) and self.data_shape[1] % 4 == 0 and self.data_shape[2] % 4 == 0
        if architecture == "auto":
            architecture = "conv" if images else "mlp"
        self.architecture = architecture
        if architecture == "conv":
            if not images:
                raise ValueError(f"architecture 'conv' needs images with H and W divisible by 4, got {self.data_shape}; "
                                 "use architecture: mlp")
            self.generator = ConvUpsampler(inputs, *self.data_shape, width_mult=hidden // 8)
        elif architecture == "mlp":
            self.generator = mlp([inputs, hidden, 2 * hidden, self.dim], activation=nn.ReLU)
        else:
            raise ValueError(f"unknown architecture {architecture!r}; choose 'auto', 'conv' or 'mlp'")

    # -- the released statistic -------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        """``[sqrt(1 - w^2 - p^2) phi(x), p psi(x), w]``: unit-norm random Fourier features,
        the perceptual features when ``p > 0``, a constant."""
        blocks = []
        for i, p in enumerate(self.pool_sizes):
            xp = x if p == 1 else F.avg_pool2d(x.reshape(len(x), *self.data_shape), p)
            proj = xp.reshape(len(x), -1) @ getattr(self, f"frequencies_{i}")
            # each scale's block has norm 1 / sqrt(#scales): phi has norm 1
            blocks.append(torch.cat([proj.cos(), proj.sin()], dim=1) / math.sqrt(proj.shape[1] * len(self.pool_sizes)))
        p = self.perceptual_weight
        parts = [torch.cat(blocks, dim=1) * math.sqrt(1.0 - self.count_weight ** 2 - p ** 2)]
        if p > 0:
            parts.append(p * self.perceptual.features(x.reshape(len(x), *self.data_shape)))
        parts.append(torch.full((len(x), 1), self.count_weight, device=x.device))
        return torch.cat(parts, dim=1)

    def fit_public_features(self, x: Tensor, y: Tensor | None, *, steps: int, batch_size: int, lr: float,
                            seed: int) -> dict[str, float]:
        """Train the perceptual network on a declared-public set (the server, before round 1)."""
        if self.perceptual_weight <= 0:
            raise ValueError("the mmd model has no perceptual features (perceptual_weight 0) to train")
        return train_on_public(self.perceptual, x.reshape(len(x), *self.data_shape), y, steps=steps,
                               batch_size=batch_size, lr=lr, seed=seed)

    @torch.no_grad()
    def statistic_sum(self, x: Tensor, y: Tensor | None, chunk: int = 1000,
                      transform: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """``sum_i v(x_i, y_i)`` as ``[classes, F + 1]``; each record contributes norm 1.
        ``transform`` maps each record's ``v`` before summing (in float64): the distributed
        release rounds every record's scaled vector to integers (privacy/skellam.py)."""
        total = torch.zeros_like(self.embedding, dtype=torch.float64 if transform else self.embedding.dtype)
        for start in range(0, len(x), chunk):
            xb = x[start:start + chunk].to(self.embedding.device)
            labels = self._class_index(y[start:start + chunk] if y is not None else None, len(xb))
            rows = bounded_rows(self.features(xb))  # the site's own bound: sensitivity 1
            total.index_add_(0, labels, rows if transform is None else transform(rows).to(total.dtype))
        return total

    def set_release(self, mean_embedding: Tensor) -> None:
        self.embedding.copy_(mean_embedding)

    def combine_releases(self, sums: Tensor, noise_multipliers: Tensor, total_examples: float) -> float:
        if self.combine == "fedavg":
            return super().combine_releases(sums, noise_multipliers, total_examples)
        release, noise_variance = precision_weighted_release(sums, noise_multipliers, total_examples,
                                                             self.count_weight)
        self.set_release(release)
        return noise_variance

    def _class_index(self, y: Tensor | None, n: int) -> Tensor:
        if self.num_classes is None or y is None:
            return torch.zeros(n, dtype=torch.long, device=self.embedding.device)
        return y.to(self.embedding.device).long()

    # -- fitting the generator (server side, post-processing) --------------------------
    def class_weights(self) -> Tensor:
        """Class proportions read off the released constant feature (clipped at 0)."""
        counts = (self.embedding[:, -1] / self.count_weight).clamp_min(0.0)
        return counts / counts.sum() if counts.sum() > 0 else torch.full_like(counts, 1.0 / len(counts))

    def mmd_loss(self, n: int) -> Tensor:
        """``||embedding - mu_G||^2`` with ``mu_G[c] = p_c * mean phi(G(z, c))`` (DP-MERF eq. 4)."""
        weights = self.class_weights()
        classes = len(weights)
        labels = torch.arange(n, device=self.embedding.device) % classes
        feats = self.features(self._generate(n, labels if self.num_classes else None))
        per_class = torch.zeros_like(self.embedding).index_add_(0, labels, feats)
        counts = torch.bincount(labels, minlength=classes).clamp_min(1).unsqueeze(1)
        model_embedding = weights.unsqueeze(1) * per_class / counts
        if not self.fit_unbiased:
            return ((self.embedding - model_embedding)[:, :-1] ** 2).sum()
        # ||e_c - p_c mu_c||^2 with ||mu_c||^2 estimated without its own sample's term (a
        # U-statistic): the plain batch estimate adds Var(mean phi) = (const - ||mu_c||^2) / n_c,
        # which rewards samples that crowd together (under-dispersed rows)
        e, s = self.embedding[:, :-1], per_class[:, :-1]
        own = torch.zeros(len(weights), device=e.device).index_add_(0, labels, (feats[:, :-1] ** 2).sum(1))
        n_c = counts.squeeze(1).clamp_min(2)
        mu_sq = ((s ** 2).sum(1) - own) / (n_c * (n_c - 1))
        return ((e ** 2).sum(1) - 2 * weights * (e * s).sum(1) / n_c + weights ** 2 * mu_sq).sum()

    def server_update(self, release_noise_variance: float | None = None) -> dict[str, float]:
        """Fit the generator to the released embedding: at most ``fit_steps`` Adam steps,
        fewer once the fit reaches the release's noise level (module docstring). With
        ``fit_cooldown`` ``c > 0`` the fit, having reached that level at step ``s``, goes on
        for ``ceil(c * s)`` more steps (never past ``fit_steps``) with the learning rate
        falling linearly from where the cosine schedule stood to 0, instead of stopping at a
        rate the schedule had planned for a much longer fit."""
        if not bool(self.embedding.abs().sum() > 0):
            return {}
        noise_energy = (release_noise_variance or 0.0) * self.embedding[:, :-1].numel()
        stop_below = self.fit_tolerance * noise_energy if self.fit_tolerance is not None else 0.0
        opt = torch.optim.Adam(self.generator.parameters(), lr=self.fit_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.fit_steps)
        smoothed, step, end = None, 0, self.fit_steps
        reached: int | None = None  # the step whose smoothed loss first reached the noise level
        peaks: list[float] = []  # each group's rate at that step, where the cooldown starts
        while step < end:
            step += 1
            opt.zero_grad(set_to_none=True)
            loss = self.mmd_loss(self.fit_batch)
            loss.backward()
            opt.step()
            if reached is None:
                sched.step()
            else:  # the cooldown: linear decay to 0 at ``end``
                for group, peak in zip(opt.param_groups, peaks):
                    group["lr"] = peak * (end - step) / (end - reached)
            # an exponential moving average: one batch's loss carries the fit batch's sampling noise
            value = float(loss.detach())
            smoothed = value if smoothed is None else _SMOOTHING * smoothed + (1.0 - _SMOOTHING) * value
            if reached is None and step > _WARMUP_STEPS and smoothed <= stop_below:
                reached, end = step, min(self.fit_steps, step + math.ceil(self.fit_cooldown * step))
                peaks = [group["lr"] for group in opt.param_groups]
        info = {"server_fit_mmd": value, "server_fit_steps": step, "release_noise_energy": noise_energy}
        if reached is not None:
            info["server_fit_noise_reached"] = reached
        return info

    # -- sampling ---------------------------------------------------------------------
    def _generate(self, n: int, labels: Tensor | None, temperature: float = 1.0) -> Tensor:
        z = temperature * torch.randn(n, self.latent_dim, device=self.embedding.device)
        if self.num_classes is not None:
            z = torch.cat([z, one_hot(labels, self.num_classes, n, z.device)], dim=1)
        return torch.sigmoid(self.generator(z)).reshape(n, *self.data_shape)

    @torch.no_grad()
    def sample(self, n: int, labels: Tensor | None = None, temperature: float | None = None) -> Tensor:
        labels = self.check_labels(n, labels)
        temperature = self.temperature if temperature is None else temperature
        if self.public_filter <= 0 or labels is None:
            return self._generate(n, labels, temperature)
        return screened_draws(lambda k, lab: self._generate(k, lab, temperature), self.publicly_recognised, labels)

    @torch.no_grad()
    def publicly_recognised(self, x: Tensor, labels: Tensor) -> Tensor:
        """Whether the public classifier gives each sample's requested class a probability
        of at least ``public_filter``."""
        probs = torch.softmax(self.perceptual(x.reshape(len(x), *self.data_shape)), dim=1)
        return probs[torch.arange(len(x), device=x.device), labels.to(x.device)] >= self.public_filter
