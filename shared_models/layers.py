"""Small building blocks shared by the families. DP-friendly: no BatchNorm anywhere
(per-example gradients require that examples do not interact inside a forward pass),
GroupNorm where a normaliser helps, and no ConvTranspose2d (Opacus has no per-sample
gradient rule for it) -- upsampling is ``Upsample + Conv2d``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mlp(sizes: list[int], activation: type[nn.Module] = nn.SiLU, final_activation: bool = False) -> nn.Sequential:
    """``Linear -> act -> ... -> Linear`` through the given layer sizes."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or final_activation:
            layers.append(activation())
    return nn.Sequential(*layers)


def group_norm(channels: int, max_groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``max_groups`` dividing ``channels``."""
    groups = math.gcd(channels, max_groups)
    return nn.GroupNorm(groups, channels)


def one_hot(y: Tensor | None, num_classes: int | None, n: int, device: torch.device) -> Tensor:
    """One-hot labels ``[n, K]`` (an empty ``[n, 0]`` tensor for an unconditional model)."""
    if num_classes is None:
        return torch.zeros(n, 0, device=device)
    assert y is not None, "a conditional model needs labels"
    return F.one_hot(y.long(), num_classes).float()


def label_planes(y_onehot: Tensor, height: int, width: int) -> Tensor:
    """Broadcast one-hot labels ``[B, K]`` to constant image planes ``[B, K, H, W]``."""
    return y_onehot[:, :, None, None].expand(-1, -1, height, width)


def flat_dim(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))


def is_image_shape(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3


# -- blocks shared by the GAN, flow and diffusion families --------------------------------


def soft_clamp(x: Tensor, bound: float) -> Tensor:
    """Smoothly squash ``x`` into ``(-bound, bound)``: ``bound * tanh(x / bound)``.

    Identity near 0, bounded everywhere, so a noisy DP update can never blow up an
    ``exp`` that follows (flow log-scales)."""
    return bound * torch.tanh(x / bound)


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[B] -> [B, dim]`` of (integer or real) times (Vaswani et al.
    2017, §3.5; the time embedding of DDPM, Ho et al. 2020, §4). A fixed function: no
    parameters."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def upsample_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """x2 nearest upsampling then a 3x3 convolution (the DP-friendly stand-in for
    ConvTranspose2d, which Opacus cannot privatise)."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_channels, out_channels, 3, padding=1))


def downsample_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A stride-2 3x3 convolution halving H and W."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)


class ResBlock(nn.Module):
    """Pre-activation residual block ``GN -> SiLU -> Conv3x3 (+ emb) -> GN -> SiLU -> Conv3x3``
    with a 1x1 skip when the channel count changes (He et al. 2016; the DDPM U-Net block
    with GroupNorm, Ho et al. 2020 App. B). ``emb_dim > 0`` adds a per-channel shift from
    an embedding vector (time and/or class)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int = 0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_channels) if emb_dim > 0 else None
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb is not None:
            assert emb is not None, "this block was built with an embedding"
            h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.skip is None else self.skip(x))


class ConvUpsampler(nn.Module):
    """Vector ``[B, in_features]`` -> image ``[B, C, H, W]`` (H, W divisible by 4): a linear
    map to a ``(2m, H/4, W/4)`` grid, then two ``Upsample + Conv2d`` stages with GroupNorm
    (the DCGAN generator shape, Radford et al. 2016, without BatchNorm / ConvTranspose2d).
    Returns pre-activation outputs."""

    def __init__(self, in_features: int, channels: int, height: int, width: int, width_mult: int) -> None:
        super().__init__()
        c1, c2 = width_mult, 2 * width_mult
        self.grid = (c2, height // 4, width // 4)
        self.fc = nn.Linear(in_features, flat_dim(self.grid))
        self.body = nn.Sequential(
            group_norm(c2), nn.ReLU(),
            upsample_conv(c2, c1), group_norm(c1), nn.ReLU(),
            upsample_conv(c1, channels),
        )

    def forward(self, v: Tensor) -> Tensor:
        return self.body(self.fc(v).view(-1, *self.grid))


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias (a residual branch / coupling starts as identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# -- spectral normalisation that per-example gradients can go through ---------------------


class _SpectralNorm(nn.Module):
    """Spectral normalisation (Miyato et al. 2018, "Spectral Normalization for GANs"):
    the layer uses ``W / sigma(W)`` with ``sigma(W) = u^T W v`` (their eq. 8 and
    Algorithm 1), ``u, v`` estimates of the top singular vectors.

    Why not ``torch.nn.utils.parametrizations.spectral_norm``: Opacus' per-layer hooks
    compute the per-sample gradient of the *normalised* weight and attach it to a tensor
    that is not the trained parameter, and its functorch fallback refuses layers with
    buffers (``u``, ``v``) -- the per-example gradient would be wrong or missing.

    Here the layer is its own module type (so Opacus computes its per-sample gradients
    with ``torch.func`` through the whole ``x -> (W / sigma(W)) x + b`` map, including the
    ``-<G_i, W> u v^T / sigma^2`` term through sigma: exact per example), ``u`` and ``v`` are
    frozen ``nn.Parameter`` s (not buffers, so the functional call sees their current
    values), and the forward is pure: the power iteration that refines ``u, v`` runs only
    when :func:`update_spectral_norms` is called, outside any per-example computation.
    """

    weight: nn.Parameter

    def _init_vectors(self, out_dim: int, in_dim: int, iterations: int = 10) -> None:
        self.u = nn.Parameter(F.normalize(torch.randn(out_dim), dim=0), requires_grad=False)
        self.v = nn.Parameter(F.normalize(torch.randn(in_dim), dim=0), requires_grad=False)
        for _ in range(iterations):
            self.power_iteration()

    def sigma(self) -> Tensor:
        w = self.weight.flatten(1)  # conv kernels as (out, in*k*k) matrices (Miyato §3)
        return torch.dot(self.u, w @ self.v)  # sigma(W) ~ u^T W v, Miyato eq. (8)

    def normalized_weight(self) -> Tensor:
        return self.weight / self.sigma()  # W_SN = W / sigma(W), Miyato eq. (8)

    @torch.no_grad()
    def power_iteration(self) -> None:
        """One power-iteration step (Miyato Algorithm 1): v <- W^T u / |.|, u <- W v / |.|."""
        w = self.weight.flatten(1)
        self.v.copy_(F.normalize(w.t() @ self.u, dim=0, eps=1e-12))
        self.u.copy_(F.normalize(w @ self.v, dim=0, eps=1e-12))


class SpectralNormLinear(_SpectralNorm):
    """``nn.Linear`` with spectral normalisation, per-example-gradient safe (see :class:`_SpectralNorm`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        ref = nn.Linear(in_features, out_features, bias=bias)
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone()) if bias else None
        self._init_vectors(out_features, in_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)


class SpectralNormConv2d(_SpectralNorm):
    """``nn.Conv2d`` with spectral normalisation, per-example-gradient safe (see :class:`_SpectralNorm`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        ref = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone())
        self.stride, self.padding = stride, padding
        self._init_vectors(out_channels, in_channels * kernel_size * kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.normalized_weight(), self.bias, stride=self.stride, padding=self.padding)


def linear(in_features: int, out_features: int, bias: bool = True, spectral: bool = False) -> nn.Module:
    """``nn.Linear``, or its spectrally normalised version."""
    cls = SpectralNormLinear if spectral else nn.Linear
    return cls(in_features, out_features, bias=bias)


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
           spectral: bool = False) -> nn.Module:
    """``nn.Conv2d``, or its spectrally normalised version."""
    if spectral:
        return SpectralNormConv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)


@torch.no_grad()
def update_spectral_norms(module: nn.Module) -> None:
    """Run one power-iteration step in every spectrally normalised layer of ``module``."""
    for m in module.modules():
        if isinstance(m, _SpectralNorm):
            m.power_iteration()
