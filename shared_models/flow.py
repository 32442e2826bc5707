"""RealNVP normalizing flow (Dinh, Sohl-Dickstein & Bengio, "Density estimation using
Real NVP", ICLR 2017), optionally class-conditional (one-hot labels fed to every
coupling network).

Data pipeline (RealNVP §4.1), for data x in [0, 1] on a grid of L levels (L = 256 for
8-bit images, 17 for scikit-learn's digits, whose pixels are 0..16):
    uniform dequantisation   x~ = ((L - 1) x + u) / L,  u ~ U[0, 1)^D
    logit pre-processing     h = logit(alpha + (1 - 2 alpha) x~)
    flow                     z = f(h),  z ~ p(z | y), a learned Gaussian (below)
Change of variables (RealNVP eq. 3): log p(x~) = log N(z; 0, I) + log|det dz/dh| + log|det dh/dx~|,
a density on [0, 1]^D whose bins have width 1/L. Dequantising on the data's own grid matters:
with 256 bins on 17-level data the flow spends its capacity on spikes at the 17 values
(and reports negative bits/dim). ``log_likelihood`` returns log p(x~) - D log L, the
dequantisation lower bound on the log-probability of the discrete x (Theis, van den Oord
& Bethge 2016, eq. 11), so bits/dim = -log_likelihood / (D ln 2) is the usual discrete figure.

Affine coupling layer (RealNVP eqs. 7-9) with a binary mask b:
    y = b * x + (1 - b) * (x * exp(s(b * x)) + t(b * x)),   log|det| = sum (1 - b) * s
with checkerboard masks at full resolution and channel masks after a squeeze (§3.4, §3.6)
for images, alternating masks for vectors. The log-scale is soft-clamped,
s = bound * tanh(s_raw / bound), so a noisy DP update can never make exp(s) explode, and
the last layer of each coupling network starts at zero (the flow starts as identity).

The base distribution is learned (Glow, Kingma & Dhariwal 2018, §5 and their
class-conditional prior): p(z | y) = N(mu_y, diag(exp(2 s_y))) from one zero-initialised
Linear layer of the one-hot label. Under DP it helps: a class's mean is a strong,
low-dimensional gradient signal, which survives the noise sooner than the coupling
networks learn to use the label (measured: docs/benchmarks.md). Under a release warm start
(shared_models/warm_start.py) the flow's share of the one release is its per-class pixel
means (:meth:`RealNVP.release_vectors`); their noisy federation means, in logit space, are
added to the learned means (``base_mean``, :meth:`RealNVP.adopt_release`).

Every parameter lives in Linear / Conv2d / GroupNorm layers (no free ``nn.Parameter``),
each used once per example, so every clipping mode is correct; see ``grad_sample_mode``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .layers import ResBlock, flat_dim, group_norm, is_image_shape, label_planes, mlp, one_hot, soft_clamp, zero_init
from .protocol import Batch, DPSGDTrainable, TrainingStep
from .registry import register_model


def squeeze2x2(x: Tensor) -> Tensor:
    """(C, H, W) -> (4C, H/2, W/2), RealNVP §3.6."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze2x2(x: Tensor) -> Tensor:
    """Inverse of :func:`squeeze2x2`."""
    b, c4, h, w = x.shape
    c = c4 // 4
    return x.view(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h, 2 * w)


class _ConvCouplingNet(nn.Module):
    """(b * x, b, label planes) -> raw (s, t): a small ResNet with GroupNorm (RealNVP uses
    ResNets with batch norm, which DP forbids)."""

    def __init__(self, channels: int, cond_channels: int, hidden: int, blocks: int) -> None:
        super().__init__()
        self.inp = nn.Conv2d(2 * channels + cond_channels, hidden, 3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(hidden, hidden) for _ in range(blocks))
        self.norm = group_norm(hidden)
        self.out = zero_init(nn.Conv2d(hidden, 2 * channels, 3, padding=1))

    def forward(self, x_masked: Tensor, mask: Tensor, cond: Tensor) -> Tensor:
        planes = label_planes(cond, *x_masked.shape[2:])
        h = self.inp(torch.cat([x_masked, mask.expand_as(x_masked), planes], dim=1))
        for block in self.blocks:
            h = block(h)
        return self.out(torch.nn.functional.silu(self.norm(h)))


class _MLPCouplingNet(nn.Module):
    """(b * x, y) -> raw (s, t) for flat vectors."""

    def __init__(self, dim: int, cond_dim: int, hidden: int, depth: int) -> None:
        super().__init__()
        self.net = mlp([dim + cond_dim] + [hidden] * depth + [2 * dim])
        zero_init(self.net[-1])

    def forward(self, x_masked: Tensor, mask: Tensor, cond: Tensor) -> Tensor:
        return self.net(torch.cat([x_masked, cond], dim=1))




class _GaussianPrior(nn.Module):
    """Learned diagonal Gaussian base p(z | y) = N(mu_y, diag(exp(2 s_y))) (Glow §5): a
    Linear layer of the one-hot label (of a constant 1 when unconditional), zero at
    start, so the flow starts with the standard normal base of RealNVP."""

    def __init__(self, dim: int, cond_dim: int, scale_bound: float) -> None:
        super().__init__()
        self.net = zero_init(nn.Linear(max(cond_dim, 1), 2 * dim))
        self.scale_bound = scale_bound

    def forward(self, cond: Tensor, base: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(mu, log-scale s), each ``[B, D]``; ``base`` ``[classes, D]``: released class
        means the learned mean is added to (zeros until a release warm start hands them over)."""
        inputs = cond if cond.shape[1] else torch.ones(len(cond), 1, device=cond.device)
        mu, s = self.net(inputs).chunk(2, dim=1)
        return mu if base is None else mu + inputs @ base, soft_clamp(s, self.scale_bound)

    def log_prob(self, z: Tensor, cond: Tensor, base: Tensor | None = None) -> Tensor:
        mu, s = self(cond, base)
        u = (z.flatten(1) - mu) * torch.exp(-s)
        return (-0.5 * (u.pow(2) + math.log(2 * math.pi)) - s).sum(1)

    def sample(self, cond: Tensor, shape: tuple[int, ...], temperature: float,
               base: Tensor | None = None) -> Tensor:
        mu, s = self(cond, base)
        return (mu + torch.exp(s) * temperature * torch.randn_like(mu)).view(-1, *shape)


class _AffineCoupling(nn.Module):
    """RealNVP affine coupling (eqs. 7-9) with a fixed binary mask (1 = passed through)."""

    def __init__(self, mask: Tensor, net: nn.Module, scale_bound: float) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.net = net
        self.scale_bound = scale_bound

    def _scale_shift(self, x_masked: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.net(x_masked, self.mask, cond).chunk(2, dim=1)
        free = 1.0 - self.mask
        return soft_clamp(s, self.scale_bound) * free, t * free

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self._scale_shift(x * self.mask, cond)
        y = x * torch.exp(s) + t  # eq. (9): identity where mask = 1 (s = t = 0 there)
        return y, s.flatten(1).sum(1)  # log|det J| = sum_j s_j, eq. (6)

    def inverse(self, y: Tensor, cond: Tensor) -> Tensor:
        s, t = self._scale_shift(y * self.mask, cond)  # y * b == x * b
        return (y - t) * torch.exp(-s)  # eq. (8)


def checkerboard(height: int, width: int, parity: int) -> Tensor:
    i, j = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return ((i + j) % 2 == parity).float().view(1, 1, height, width)


def channel_mask(channels: int, first_half: bool) -> Tensor:
    m = (torch.arange(channels) < channels // 2).float()
    return (m if first_half else 1.0 - m).view(1, channels, 1, 1)


def vector_mask(dim: int, k: int) -> Tensor:
    """Alternating masks for vectors: even/odd indices, then first/second half, ..."""
    idx = torch.arange(dim)
    m = (idx % 2 == 0) if (k // 2) % 2 == 0 else (idx < dim // 2)
    m = m.float()
    return m if k % 2 == 0 else 1.0 - m


@register_model("flow")
class RealNVP(DPSGDTrainable):
    """RealNVP flow with exact log-likelihood, trained by DP-SGD (a warm start from a DP
    release, ``warm_start.release``, wraps it like any DP-SGD family: shared_models/warm_start.py).

    Args:
        data_shape: ``(C, H, W)`` images or ``(D,)`` vectors (D >= 2), data in [0, 1].
        num_classes: conditional flow (one-hot labels into every coupling network).
        architecture: ``"conv"`` (images: checkerboard couplings, then, when H and W are
            even, channel couplings after a squeeze), ``"mlp"`` (any shape, flattened,
            alternating masks) or ``"auto"`` (conv for images of more than 256 values,
            mlp for vectors and small images such as 8x8 digits).
        coupling_layers: couplings per stage (conv: per resolution; mlp: in total).
        hidden: channels (conv, default 32) or width (mlp, default 128) of coupling networks.
        blocks: residual blocks per conv coupling net / hidden layers per MLP coupling net.
        alpha: logit pre-processing constant (RealNVP §4.1).
        scale_bound: soft clamp of the coupling log-scales, |s| < scale_bound.
        dequantize: add uniform noise on the data's grid (set False for continuous data).
        levels: L, the number of values a pixel / feature takes (256 for 8-bit images, 17
            for scikit-learn's digits); sets the dequantisation bin width 1 / L.
        temperature: default sampling temperature T, z ~ N(mu_y, T^2 diag(exp(2 s_y)));
            T < 1 trades diversity for cleaner samples (Glow §5 shows T = 0.7).
    """

    grad_sample_mode = "bk"  # Book-Keeping (privacy/book_keeping.py): the fastest exact mode for both architectures

    def __init__(
        self,
        data_shape: tuple[int, ...],
        num_classes: int | None = None,
        architecture: str = "auto",
        coupling_layers: int | None = None,
        hidden: int | None = None,
        blocks: int = 2,
        alpha: float = 0.05,
        scale_bound: float = 2.0,
        dequantize: bool = True,
        levels: int = 256,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(data_shape, num_classes)
        image = is_image_shape(self.data_shape)
        if architecture == "auto":  # small images (8x8 digits) learn faster with MLP couplings
            architecture = "conv" if image and flat_dim(self.data_shape) > 256 else "mlp"
        if architecture not in ("mlp", "conv"):
            raise ValueError(f"flow architecture must be 'mlp', 'conv' or 'auto'; got {architecture!r}")
        if architecture == "conv" and not image:
            raise ValueError(f"the conv flow needs images (C, H, W); got {self.data_shape}")
        if flat_dim(self.data_shape) < 2:
            raise ValueError("a coupling flow needs at least 2 dimensions")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        if levels < 2:
            raise ValueError(f"levels must be >= 2 (values a pixel takes); got {levels}")
        if not 0.0 < alpha < 0.5:
            raise ValueError(f"alpha must lie in (0, 0.5); got {alpha}")
        self.architecture = architecture
        self.alpha = alpha
        self.dequantize = dequantize
        self.levels = levels
        self.temperature = temperature
        k = num_classes or 0
        self.prior = _GaussianPrior(flat_dim(self.data_shape), k, scale_bound)
        # released class means in the flow's latent space (zeros: none; adopt_release)
        self.register_buffer("base_mean", torch.zeros(max(k, 1), flat_dim(self.data_shape)))
        self.release_width = flat_dim(self.data_shape)
        self.stage1 = nn.ModuleList()  # at data resolution
        self.stage2 = nn.ModuleList()  # after a 2x2 squeeze (conv only)
        if architecture == "conv":
            c, h, w = self.data_shape
            hidden = hidden or 32
            n = coupling_layers or 4
            for i in range(n):
                self.stage1.append(_AffineCoupling(checkerboard(h, w, i % 2), _ConvCouplingNet(c, k, hidden, blocks), scale_bound))
            if h % 2 == 0 and w % 2 == 0:
                for i in range(n):
                    self.stage2.append(_AffineCoupling(channel_mask(4 * c, i % 2 == 0),
                                                       _ConvCouplingNet(4 * c, k, hidden, blocks), scale_bound))
        else:
            d = flat_dim(self.data_shape)
            hidden = hidden or 128
            for i in range(coupling_layers or 8):
                self.stage1.append(_AffineCoupling(vector_mask(d, i), _MLPCouplingNet(d, k, hidden, blocks), scale_bound))

    # -- bijection ------------------------------------------------------------------
    def _shape_for_flow(self, x: Tensor) -> Tensor:
        return x if self.architecture == "conv" else x.flatten(1)

    def to_latent(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Continuous data x in [0, 1] -> (z, log|det dz/dx|) per example (no dequantisation)."""
        a = self.alpha
        p = a + (1 - 2 * a) * x  # RealNVP §4.1
        h = torch.log(p) - torch.log1p(-p)  # logit
        logdet = (math.log(1 - 2 * a) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)
        cond = one_hot(y, self.num_classes, x.shape[0], x.device)
        h = self._shape_for_flow(h)
        for layer in self.stage1:
            h, ld = layer(h, cond)
            logdet = logdet + ld
        if len(self.stage2):
            h = squeeze2x2(h)
            for layer in self.stage2:
                h, ld = layer(h, cond)
                logdet = logdet + ld
            h = unsqueeze2x2(h)
        return h.view(-1, *self.data_shape), logdet

    def from_latent(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """Inverse of :meth:`to_latent`: z -> x in (0, 1) (not clamped)."""
        cond = one_hot(y, self.num_classes, z.shape[0], z.device)
        h = self._shape_for_flow(z)
        if len(self.stage2):
            h = squeeze2x2(h)
            for layer in reversed(self.stage2):
                h = layer.inverse(h, cond)
            h = unsqueeze2x2(h)
        for layer in reversed(self.stage1):
            h = layer.inverse(h, cond)
        a = self.alpha
        return ((torch.sigmoid(h) - a) / (1 - 2 * a)).view(-1, *self.data_shape)

    def _dequantize(self, x: Tensor) -> Tensor:
        if not self.dequantize:
            return x
        return (x * (self.levels - 1) + torch.rand_like(x)) / self.levels  # uniform dequantisation (RealNVP §4.1)

    # -- what a release warm start releases for the flow: its class means ------------
    def release_vectors(self, x: Tensor) -> Tensor:
        """``(x - 1/2) / (sqrt(D) / 2)``: L2 norm <= 1 for x in [0, 1]^D."""
        return (x.flatten(1) - 0.5) / (math.sqrt(self.release_width) / 2)

    @torch.no_grad()
    def adopt_release(self, class_means: Tensor) -> None:
        """The federation's noisy class means of :meth:`release_vectors`, mapped like the
        data (mid-bin dequantisation, logit), become the base's means: a class's mean is a
        low-dimensional, strong signal that DP-SGD on a few hundred records a site recovers
        only from epsilon ~ 40 (docs/benchmarks.md)."""
        x = (class_means * (math.sqrt(self.release_width) / 2) + 0.5).clamp(0.0, 1.0)
        if self.dequantize:
            x = (x * (self.levels - 1) + 0.5) / self.levels
        p = self.alpha + (1 - 2 * self.alpha) * x
        self.base_mean.copy_((torch.log(p) - torch.log1p(-p)).reshape(self.base_mean.shape))

    def _log_density(self, x: Tensor, y: Tensor | None) -> Tensor:
        z, logdet = self.to_latent(self._dequantize(x), y)
        log_pz = self.prior.log_prob(z, one_hot(y, self.num_classes, x.shape[0], x.device), self.base_mean)
        return log_pz + logdet  # change of variables, RealNVP eq. (3)

    # -- protocol -------------------------------------------------------------------
    @torch.no_grad()
    def log_likelihood(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Log-probability of the discrete data in nats per example: the dequantisation
        bound log p(x~) - D log L with one draw of u (exact density when ``dequantize`` is
        off, then without the bin term); bits/dim = -ll / (D ln 2)."""
        bins = flat_dim(self.data_shape) * math.log(self.levels) if self.dequantize else 0.0
        return self._log_density(x, y) - bins

    def steps(self) -> list[TrainingStep]:
        d = flat_dim(self.data_shape)

        def nll_loss(batch: Batch) -> Tensor:
            assert batch.x is not None
            return -self._log_density(batch.x, batch.y) / d  # nats per dimension

        return [TrainingStep(name="nll", module=self, loss=nll_loss, private=True)]

    @torch.no_grad()
    def sample(self, n: int, labels: Tensor | None = None, temperature: float | None = None) -> Tensor:
        labels = self.check_labels(n, labels)
        temperature = self.temperature if temperature is None else temperature
        z = self.prior.sample(one_hot(labels, self.num_classes, n, self.device), self.data_shape, temperature,
                              self.base_mean)
        return self.from_latent(z, labels).clamp(0.0, 1.0)
