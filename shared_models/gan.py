"""Generative adversarial network (Goodfellow et al., "Generative Adversarial Nets", 2014)
with DCGAN-style convolutional networks (Radford et al., "Unsupervised Representation
Learning with Deep Convolutional GANs", 2016) or an MLP pair, trained the DP-GAN way.

Two steps per iteration (docs/architecture.md §3):
- **discriminator** (``private=True``): example i's loss pairs real x_i with one fake
  G(z_i), ``l(D(x_i)) + l'(D(G(z_i)))`` -- one clipped gradient per real example; the
  fakes are drawn under ``no_grad`` (for a conditional model with the real label y_i).
- **generator** (``private=False``): sees no data, only D; post-processing, no charge.

The conv D runs twice per example (real and fake), so that architecture uses Opacus
``"hooks"``, which sums a layer's per-sample contributions over both uses (ghost clipping
assumes one use per layer and example). The MLP D takes the pair as one ``[B, 2, D]``
input -- each Linear is applied once per example, to a sequence of two -- so it can use
the faster ghost clipping.

Losses (``loss=``), D side / G side, with d_r = D(x), d_f = D(G(z)):
- ``ns``:     softplus(-d_r) + softplus(d_f) / softplus(-d_f)      Goodfellow eq. (1), §3 non-saturating G
- ``hinge``:  relu(1 - d_r) + relu(1 + d_f) / -d_f                Lim & Ye 2017; Miyato et al. 2018 eq. (17)
- ``lsgan``:  (d_r - 1)^2/2 + d_f^2/2 / (d_f - 1)^2/2             Mao et al. 2017 eq. (2), a=0, b=c=1
- ``wgan``:   d_f - d_r (+ 1e-3 d_r^2 drift) / -d_f               Arjovsky et al. 2017 eq. (3); drift: Karras et al. 2018 §A.1
- ``wgan-gp``: wgan + 10 (|grad_x^ D(x^)| - 1)^2                   Gulrajani et al. 2017 eq. (3) -- not under DP

Lipschitz control for ``wgan``/``hinge``: ``spectral_norm=True`` (Miyato et al. 2018),
implemented so per-example gradients are exact (see ``layers._SpectralNorm``).
Class conditioning: one-hot labels concatenated to z in G, projection discriminator
``D(x, y) = psi(phi(x)) + <E y, phi(x)>`` (Miyato & Koyama 2018, eq. 3).

Mode collapse: minibatch discrimination / minibatch-stddev features make D's output for
one example depend on the others (breaks per-example clipping), and unrolled GANs
(Metz et al. 2017) would need D's loss on *real* data inside the generator step (making
it a second private step, charged). We use the mode-seeking regulariser of Mao et al.
2019 (eq. 3) instead: it lives entirely in the generator step (two fakes with the same
label, rewarded for differing in proportion to their latent distance), so it touches no
data and costs no privacy. ``mode_seeking`` is its weight (0 turns it off).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import ConvUpsampler, conv2d, flat_dim, is_image_shape, linear, mlp, one_hot, update_spectral_norms
from .protocol import Batch, DPSGDTrainable, TrainingStep
from .registry import register_model

GAN_LOSSES = ("ns", "hinge", "lsgan", "wgan", "wgan-gp")
WGAN_DRIFT = 1e-3  # Karras et al. 2018, §A.1: keeps the critic's output near 0


def discriminator_loss(kind: str, d_real: Tensor, d_fake: Tensor) -> Tensor:
    """Per-example discriminator loss l(D(x_i)) + l'(D(G(z_i))) (without a gradient penalty)."""
    if kind == "ns":  # -log sigmoid(d_r) - log(1 - sigmoid(d_f)), Goodfellow eq. (1)
        return F.softplus(-d_real) + F.softplus(d_fake)
    if kind == "hinge":  # Miyato et al. 2018 eq. (17)
        return F.relu(1.0 - d_real) + F.relu(1.0 + d_fake)
    if kind == "lsgan":  # Mao et al. 2017 eq. (2)
        return 0.5 * (d_real - 1.0) ** 2 + 0.5 * d_fake**2
    # wgan / wgan-gp critic: Arjovsky et al. 2017 eq. (3), plus the drift term
    return d_fake - d_real + WGAN_DRIFT * d_real**2


def generator_loss(kind: str, d_fake: Tensor) -> Tensor:
    """Per-sample generator loss."""
    if kind == "ns":  # non-saturating: -log sigmoid(d_f), Goodfellow §3
        return F.softplus(-d_fake)
    if kind == "lsgan":  # Mao et al. 2017 eq. (2)
        return 0.5 * (d_fake - 1.0) ** 2
    return -d_fake  # hinge / wgan / wgan-gp


class _Generator(nn.Module):
    """z (+ one-hot y) -> data in [0, 1] (sigmoid output)."""

    def __init__(self, data_shape: tuple[int, ...], in_features: int, architecture: str, hidden: int, depth: int) -> None:
        super().__init__()
        self.data_shape = data_shape
        if architecture == "conv":
            c, h, w = data_shape
            self.net: nn.Module = ConvUpsampler(in_features, c, h, w, hidden)
        else:
            self.net = mlp([in_features] + [hidden] * depth + [flat_dim(data_shape)], activation=nn.ReLU)

    def forward(self, zc: Tensor) -> Tensor:
        return torch.sigmoid(self.net(zc).view(-1, *self.data_shape))


class _Discriminator(nn.Module):
    """Features phi(x) -> scalar psi(phi(x)) [+ <E y, phi(x)> projection], LeakyReLU(0.2)
    (DCGAN), no normalisation layer (no BatchNorm under DP; spectral norm optional)."""

    def __init__(self, data_shape: tuple[int, ...], num_classes: int | None, architecture: str, hidden: int,
                 depth: int, spectral: bool) -> None:
        super().__init__()
        act = lambda: nn.LeakyReLU(0.2)  # noqa: E731
        self.conv = architecture == "conv"
        self.data_dims = len(data_shape)
        if architecture == "conv":
            c, h, w = data_shape
            c1, c2 = hidden, 2 * hidden
            self.features = nn.Sequential(
                conv2d(c, c1, 4, stride=2, padding=1, spectral=spectral), act(),
                conv2d(c1, c2, 4, stride=2, padding=1, spectral=spectral), act(),
                nn.Flatten(),
            )
            feat = c2 * (h // 4) * (w // 4)
        else:
            sizes = [flat_dim(data_shape)] + [hidden] * depth
            layers: list[nn.Module] = []
            for a, b in zip(sizes[:-1], sizes[1:]):
                layers += [linear(a, b, spectral=spectral), act()]
            self.features = nn.Sequential(*layers)
            feat = hidden
        self.head = linear(feat, 1, spectral=spectral)
        # projection discriminator, Miyato & Koyama 2018 eq. (3): the class embedding E y
        self.embed = linear(num_classes, feat, bias=False, spectral=spectral) if num_classes else None

    def forward(self, x: Tensor, y_onehot: Tensor) -> Tensor:
        """``x``: ``[B, *data_shape]`` -> ``[B]``; the MLP also takes ``[B, P, *data_shape]``
        -> ``[B, P]`` (P inputs per example, e.g. the real/fake pair, in one pass)."""
        if self.conv:
            phi = self.features(x)
        else:
            phi = self.features(x.flatten(start_dim=x.dim() - self.data_dims))
        out = self.head(phi).squeeze(-1)
        if self.embed is not None:
            e = self.embed(y_onehot)
            if phi.dim() == 3:  # one embedding per example, shared by its P inputs
                e = e.unsqueeze(1)
            out = out + (e * phi).sum(-1)
        return out


@register_model("gan")
class GAN(DPSGDTrainable):
    """DP-trainable GAN (see the module docstring for the losses and DP rules).

    Args:
        data_shape: ``(C, H, W)`` images or ``(D,)`` vectors, data in [0, 1].
        num_classes: class-conditional (concatenation in G, projection in D).
        architecture: ``"conv"`` (DCGAN-style; images with H, W divisible by 4), ``"mlp"``,
            or ``"auto"`` (conv where possible, else mlp).
        latent_dim: size of z.
        hidden: MLP width (default 256), or the conv channel multiplier (default 32).
        depth: hidden layers of each MLP.
        loss: one of ``ns``, ``hinge``, ``lsgan``, ``wgan``, ``wgan-gp``.
        spectral_norm: spectrally normalise every D layer (exact per-example gradients).
        d_steps_per_g_step: discriminator steps (each on its own Poisson batch, each one
            accountant step) before each generator step.
        lr_d, lr_g: learning rates of the two steps (TTUR, Heusel et al. 2017).
        betas: Adam betas of both steps (DCGAN: (0.5, 0.999)).
        gp_weight: lambda of the WGAN-GP penalty.
        mode_seeking: weight of the mode-seeking regulariser (Mao et al. 2019), 0 = off.
    """

    #: D is applied twice per example (real, fake) in the conv architecture: Book-Keeping
    #: and Opacus' hooks both sum the two uses per example (ghost clipping refuses a layer
    #: used twice). fedgen's spectral-norm layer has no Book-Keeping rule: hooks (conv) or
    #: ghost (mlp, the pair goes through D in one pass) then (set in __init__).
    grad_sample_mode = "bk"

    def __init__(
        self,
        data_shape: tuple[int, ...],
        num_classes: int | None = None,
        architecture: str = "auto",
        latent_dim: int = 32,
        hidden: int | None = None,
        depth: int = 2,
        loss: str = "ns",
        spectral_norm: bool = False,
        d_steps_per_g_step: int = 1,
        lr_d: float = 2e-4,
        lr_g: float = 2e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        gp_weight: float = 10.0,
        mode_seeking: float = 0.0,
    ) -> None:
        super().__init__(data_shape, num_classes)
        if loss not in GAN_LOSSES:
            raise ValueError(f"GAN loss must be one of {', '.join(GAN_LOSSES)}; got {loss!r}")
        conv_ok = is_image_shape(self.data_shape) and self.data_shape[1] % 4 == 0 and self.data_shape[2] % 4 == 0
        if architecture == "auto":
            architecture = "conv" if conv_ok else "mlp"
        if architecture not in ("mlp", "conv"):
            raise ValueError(f"GAN architecture must be 'mlp', 'conv' or 'auto'; got {architecture!r}")
        if architecture == "conv" and not conv_ok:
            raise ValueError(f"the conv GAN needs images (C, H, W) with H, W divisible by 4; got {self.data_shape}")
        if d_steps_per_g_step < 1:
            raise ValueError(f"d_steps_per_g_step must be >= 1; got {d_steps_per_g_step}")
        self.architecture = architecture
        self.latent_dim = latent_dim
        self.loss_kind = loss
        self.spectral_norm = spectral_norm
        self.d_steps_per_g_step = d_steps_per_g_step
        self.lr_d, self.lr_g = lr_d, lr_g
        self.betas = (float(betas[0]), float(betas[1]))
        self.gp_weight = gp_weight
        self.mode_seeking = mode_seeking
        if hidden is None:
            hidden = 256 if architecture == "mlp" else 32
        k = num_classes or 0
        self.generator = _Generator(self.data_shape, latent_dim + k, architecture, hidden, depth)
        self.discriminator = _Discriminator(self.data_shape, num_classes, architecture, hidden, depth, spectral_norm)
        if spectral_norm:
            self.grad_sample_mode = "ghost" if architecture == "mlp" else "hooks"

    # -- networks -------------------------------------------------------------------
    def generate(self, z: Tensor, y: Tensor | None) -> Tensor:
        return self.generator(torch.cat([z, one_hot(y, self.num_classes, z.shape[0], z.device)], dim=1))

    def discriminate(self, x: Tensor, y: Tensor | None) -> Tensor:
        return self.discriminator(x, one_hot(y, self.num_classes, x.shape[0], x.device))

    def check_dp_compatible(self) -> None:
        if self.loss_kind == "wgan-gp":
            raise ValueError(
                "GAN loss 'wgan-gp' cannot be trained with DP-SGD: its gradient penalty needs "
                "per-sample gradients of a gradient (second order), which Opacus' hooks do not "
                "compute (opacus issue #31), so the per-example clipping would be wrong. Use "
                "loss 'wgan' or 'hinge' with spectral_norm: true for the Lipschitz constraint instead."
            )

    # -- the two steps ------------------------------------------------------------------
    def discriminator_losses(self, batch: Batch) -> Tensor:
        """Per-example D loss: real x_i paired with fake G(z_i) (label y_i), docs/architecture.md §3."""
        assert batch.x is not None, "the discriminator step needs real data"
        x, y = batch.x, batch.y
        z = torch.randn(x.shape[0], self.latent_dim, device=x.device)
        with torch.no_grad():  # fakes are inputs to D here, not something to train
            fake = self.generate(z, y)
        if self.architecture == "mlp":
            # one pass over the [B, 2, ...] real/fake pair: every layer is used once per
            # example (a "sequence" of two), which lets Opacus use ghost clipping
            d_pair = self.discriminate(torch.stack([x, fake], dim=1), y)
            d_real, d_fake = d_pair[:, 0], d_pair[:, 1]
        else:
            d_real, d_fake = self.discriminate(x, y), self.discriminate(fake, y)
        losses = discriminator_loss(self.loss_kind, d_real, d_fake)
        if self.loss_kind == "wgan-gp":  # Gulrajani et al. eq. (3); non-DP only (check_dp_compatible)
            eps = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device)
            x_hat = (eps * x + (1 - eps) * fake).requires_grad_(True)
            (grad,) = torch.autograd.grad(self.discriminate(x_hat, y).sum(), x_hat, create_graph=True)
            losses = losses + self.gp_weight * (grad.flatten(1).norm(dim=1) - 1.0) ** 2
        return losses

    def generator_losses(self, batch: Batch) -> Tensor:
        """Per-sample G loss on ``batch.size`` fresh fakes with uniform labels; never reads data."""
        n = batch.size
        if self.spectral_norm:
            # refine D's singular-vector estimates once per iteration, here where no
            # per-example gradient is taken (the D forward stays a pure function)
            update_spectral_norms(self.discriminator)
        y = torch.randint(0, self.num_classes, (n,), device=self.device) if self.conditional else None
        z = torch.randn(n, self.latent_dim, device=self.device)
        fake = self.generate(z, y)
        losses = generator_loss(self.loss_kind, self.discriminate(fake, y))
        if self.mode_seeking > 0:
            # Mao et al. 2019 eq. (3): maximise |G(z1) - G(z2)| / |z1 - z2| (minimise its inverse)
            z2 = torch.randn(n, self.latent_dim, device=self.device)
            fake2 = self.generate(z2, y)
            ratio = (fake - fake2).abs().flatten(1).mean(1) / (z - z2).abs().mean(1)
            losses = losses + self.mode_seeking / (ratio + 1e-5)
        return losses

    def steps(self) -> list[TrainingStep]:
        d_step = TrainingStep(name="discriminator", module=self.discriminator, loss=self.discriminator_losses,
                              private=True, lr=self.lr_d, betas=self.betas)
        g_step = TrainingStep(name="generator", module=self.generator, loss=self.generator_losses,
                              private=False, lr=self.lr_g, betas=self.betas)
        return [d_step] * self.d_steps_per_g_step + [g_step]

    @torch.no_grad()
    def sample(self, n: int, labels: Tensor | None = None) -> Tensor:
        labels = self.check_labels(n, labels)
        return self.generate(torch.randn(n, self.latent_dim, device=self.device), labels)
