"""Denoising diffusion probabilistic model (Ho, Jain & Abbeel, "Denoising Diffusion
Probabilistic Models", NeurIPS 2020) with epsilon-prediction, sampled with DDIM (Song,
Meng & Ermon, "Denoising Diffusion Implicit Models", ICLR 2021).

- Schedules: ``linear`` (Ho et al. §4, beta 1e-4 -> 0.02 at T = 1000, rescaled by 1000/T
  for other T as in Nichol & Dhariwal 2021) and ``cosine`` (Nichol & Dhariwal, "Improved
  DDPM", 2021, eq. 17).
- Loss: L_simple (Ho eq. 14), per example, with data mapped to [-1, 1]; an MLP denoiser
  narrower than the data predicts x0 instead, with the min-SNR-5 weight (``prediction``).
- DP noise multiplicity (Dockhorn et al., "Differentially Private Diffusion Models", TMLR
  2023, eq. 6): example i's loss averages K independent (t, eps) draws. The denoiser is
  called K times on [B]-shaped inputs, so Opacus still sees B examples and each gets one
  clipped gradient (hooks sum the K uses of every layer) at no extra privacy cost.
- Classifier-free guidance (Ho & Salimans 2022): labels are dropped per example with
  probability ``label_dropout`` during training (an all-zero one-hot is the null label);
  sampling mixes eps~ = eps(x, 0) + s (eps(x, y) - eps(x, 0)) with ``guidance_scale`` s
  (their eq. 6 with s = 1 + w).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import (ResBlock, downsample_conv, flat_dim, group_norm, is_image_shape, one_hot,
                     sinusoidal_embedding, upsample_conv, zero_init)
from .protocol import Batch, DPSGDTrainable, TrainingStep
from .registry import register_model


def beta_schedule(kind: str, timesteps: int) -> Tensor:
    """beta_1..beta_T (float64)."""
    if kind == "linear":  # Ho et al. §4: 1e-4 .. 0.02 for T = 1000
        scale = 1000.0 / timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    if kind == "cosine":  # Nichol & Dhariwal eq. (17): alpha_bar(t) = f(t)/f(0), f = cos^2(((t/T + s)/(1 + s)) pi/2)
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)  # beta_t, clipped as in their §3.2
    raise ValueError(f"diffusion schedule must be 'linear' or 'cosine'; got {kind!r}")


class _UNet(nn.Module):
    """Small U-Net (Ronneberger et al. 2015) as in DDPM App. B: ResBlocks with GroupNorm,
    time + class embedding added in every block, stride-2 conv down, Upsample + conv up."""

    def __init__(self, channels: int, base: int, levels: int, emb_dim: int) -> None:
        super().__init__()
        widths = [base * 2**i for i in range(levels)]
        self.inp = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        for i, w in enumerate(widths):
            self.down_blocks.append(ResBlock(widths[max(i - 1, 0)], w, emb_dim))
            if i < levels - 1:
                self.downs.append(downsample_conv(w, w))
        self.mid = ResBlock(widths[-1], widths[-1], emb_dim)
        self.up_blocks = nn.ModuleList()
        self.ups = nn.ModuleList()
        for i in reversed(range(levels)):
            self.up_blocks.append(ResBlock(2 * widths[i], widths[i], emb_dim))  # skip concatenation
            if i > 0:
                self.ups.append(upsample_conv(widths[i], widths[i - 1]))
        self.out_norm = group_norm(widths[0])
        self.out = zero_init(nn.Conv2d(widths[0], channels, 3, padding=1))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.inp(x)
        skips = []
        for i, block in enumerate(self.down_blocks):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downs):
                h = self.downs[i](h)
        h = self.mid(h, emb)
        for i, block in enumerate(self.up_blocks):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if i < len(self.ups):
                h = self.ups[i](h)
        return self.out(F.silu(self.out_norm(h)))


class _MLPDenoiser(nn.Module):
    """Residual MLP for flat data: h += MLP(LayerNorm(h) + emb) per block."""

    def __init__(self, dim: int, hidden: int, depth: int, emb_dim: int) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.emb = nn.ModuleList(nn.Linear(emb_dim, hidden) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(depth))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = zero_init(nn.Linear(hidden, dim))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.inp(x.flatten(1))
        e = F.silu(emb)
        for proj, norm, block in zip(self.emb, self.norms, self.blocks):
            h = h + block(F.silu(norm(h) + proj(e)))
        return self.out(F.silu(self.out_norm(h))).view_as(x)


@register_model("diffusion")
class Diffusion(DPSGDTrainable):
    """DDPM / DDIM with classifier-free guidance and DP noise multiplicity.

    Args:
        data_shape: ``(C, H, W)`` images or ``(D,)`` vectors, data in [0, 1].
        num_classes: conditional model with label dropout for classifier-free guidance.
        architecture: ``"unet"`` (images with H, W divisible by 2^(levels-1)), ``"mlp"``,
            or ``"auto"`` (unet where possible, else mlp).
        timesteps: T of the forward process.
        schedule: ``"linear"`` or ``"cosine"``.
        hidden: U-Net base channels (default 32) or MLP width (default 256).
        levels: U-Net resolutions (each halves H and W).
        depth: residual blocks of the MLP denoiser.
        noise_multiplicity: K (t, eps) draws averaged inside each example's loss (DPDM).
        label_dropout: probability of training a label-free pass (classifier-free guidance).
        guidance_scale: default s of classifier-free guidance at sampling (1 = plain conditional;
            2 gives cleaner digits after short training).
        sample_steps: DDIM steps at sampling.
        ddim_eta: DDIM stochasticity eta (0 = deterministic DDIM, 1 = DDPM-like).
        prediction: what the network outputs: ``"eps"`` (the noise, Ho et al.) or ``"x0"``
            (the clean data; the noise follows as ``(x_t - sqrt(a) x0) / sqrt(1 - a)``),
            trained with the min-SNR-5 weight (Hang et al., "Efficient Diffusion Training via
            Min-SNR Weighting Strategy", ICCV 2023): ``min(SNR(t), 5) ||x0 - x0^||^2``.
            ``"auto"`` (default): ``x0`` for an MLP denoiser narrower than the data, ``eps``
            otherwise. A narrow MLP cannot output the noise: the noise fills every one of the
            data's dimensions and has to pass the ``hidden``-wide layers (MNIST: 784 through
            256 leaves a loss of about 0.69 where 0 is reachable, and chance-level samples),
            while the clean data lie near a low-dimensional set it can.
    """

    grad_sample_mode = "bk"  # the denoiser runs K times per example: Book-Keeping sums its K uses

    def __init__(
        self,
        data_shape: tuple[int, ...],
        num_classes: int | None = None,
        architecture: str = "auto",
        timesteps: int = 1000,
        schedule: str = "cosine",
        hidden: int | None = None,
        levels: int = 2,
        depth: int = 3,
        noise_multiplicity: int = 1,
        label_dropout: float = 0.1,
        guidance_scale: float = 2.0,
        sample_steps: int = 50,
        ddim_eta: float = 0.0,
        prediction: str = "auto",
    ) -> None:
        super().__init__(data_shape, num_classes)
        image = is_image_shape(self.data_shape)
        unet_ok = image and self.data_shape[1] % 2 ** (levels - 1) == 0 and self.data_shape[2] % 2 ** (levels - 1) == 0
        if architecture == "auto":
            architecture = "unet" if unet_ok else "mlp"
        if architecture not in ("unet", "mlp"):
            raise ValueError(f"diffusion architecture must be 'unet', 'mlp' or 'auto'; got {architecture!r}")
        if architecture == "unet" and not unet_ok:
            raise ValueError(f"the U-Net needs images (C, H, W) with H, W divisible by {2 ** (levels - 1)}; "
                             f"got {self.data_shape}")
        if noise_multiplicity < 1:
            raise ValueError(f"noise_multiplicity must be >= 1; got {noise_multiplicity}")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1); got {label_dropout}")
        if not 1 <= sample_steps <= timesteps:
            raise ValueError(f"sample_steps must lie in [1, timesteps={timesteps}]; got {sample_steps}")
        self.architecture = architecture
        self.timesteps = timesteps
        self.noise_multiplicity = noise_multiplicity
        self.label_dropout = label_dropout
        self.guidance_scale = guidance_scale
        self.sample_steps = sample_steps
        self.ddim_eta = ddim_eta
        if prediction not in ("auto", "eps", "x0"):
            raise ValueError(f"diffusion prediction must be 'eps', 'x0' or 'auto'; got {prediction!r}")

        betas = beta_schedule(schedule, timesteps)
        self.register_buffer("alpha_bar", torch.cumprod(1.0 - betas, dim=0).float(), persistent=False)  # Ho eq. (4)

        if architecture == "unet":
            hidden = hidden or 32
            self.emb_dim = 4 * hidden
            self.denoiser: nn.Module = _UNet(self.data_shape[0], hidden, levels, self.emb_dim)
        else:
            hidden = hidden or 256
            self.emb_dim = hidden
            self.denoiser = _MLPDenoiser(flat_dim(self.data_shape), hidden, depth, self.emb_dim)
        if prediction == "auto":
            prediction = "x0" if architecture == "mlp" and hidden < flat_dim(self.data_shape) else "eps"
        self.prediction = prediction
        self.time_dim = hidden
        self.time_mlp = nn.Sequential(nn.Linear(hidden, self.emb_dim), nn.SiLU(), nn.Linear(self.emb_dim, self.emb_dim))
        self.class_emb = nn.Linear(num_classes, self.emb_dim, bias=False) if num_classes else None

    # -- the network ----------------------------------------------------------------
    def eps_model(self, x_t: Tensor, t: Tensor, y_onehot: Tensor | None) -> Tensor:
        """epsilon_theta(x_t, t, y); ``y_onehot`` all-zero (or None) = unconditional."""
        out = self.net(x_t, t, y_onehot)
        if self.prediction == "eps":
            return out
        a_bar = self.alpha_bar[t].view(-1, *([1] * (x_t.dim() - 1)))
        return (x_t - a_bar.sqrt() * out) / (1 - a_bar).sqrt()  # the noise of an x0 prediction

    def net(self, x_t: Tensor, t: Tensor, y_onehot: Tensor | None) -> Tensor:
        """The network's raw output: the noise or the clean data (``prediction``)."""
        emb = self.time_mlp(sinusoidal_embedding(t, self.time_dim))
        if self.class_emb is not None and y_onehot is not None:
            emb = emb + self.class_emb(y_onehot)
        return self.denoiser(x_t, emb)

    # -- training -------------------------------------------------------------------
    def denoising_losses(self, batch: Batch) -> Tensor:
        """Per-example L_simple averaged over K (t, eps) draws (DPDM eq. 6)."""
        assert batch.x is not None
        x0 = batch.x * 2.0 - 1.0  # data to [-1, 1]
        b = x0.shape[0]
        y = one_hot(batch.y, self.num_classes, b, x0.device) if self.conditional else None
        total = torch.zeros(b, device=x0.device)
        for _ in range(self.noise_multiplicity):  # K calls on [B] rows: still B examples for Opacus
            t = torch.randint(0, self.timesteps, (b,), device=x0.device)
            eps = torch.randn_like(x0)
            a_bar = self.alpha_bar[t].view(b, *([1] * (x0.dim() - 1)))
            x_t = a_bar.sqrt() * x0 + (1 - a_bar).sqrt() * eps  # q(x_t | x_0), Ho eq. (4)
            y_k = y
            if y is not None and self.label_dropout > 0:  # per-example label dropout (Ho & Salimans §3.2)
                keep = (torch.rand(b, device=x0.device) >= self.label_dropout).float()
                y_k = y * keep[:, None]
            if self.prediction == "eps":
                total = total + (eps - self.eps_model(x_t, t, y_k)).pow(2).flatten(1).mean(1)  # Ho eq. (14)
            else:  # min-SNR-5 weighted x0 loss (Hang et al. 2023)
                weight = (a_bar / (1 - a_bar)).clamp(max=5.0).view(b)
                total = total + weight * (x0 - self.net(x_t, t, y_k)).pow(2).flatten(1).mean(1)
        return total / self.noise_multiplicity

    def steps(self) -> list[TrainingStep]:
        return [TrainingStep(name="denoise", module=self, loss=self.denoising_losses, private=True)]

    # -- sampling -------------------------------------------------------------------
    def _guided_eps(self, x: Tensor, t: Tensor, y: Tensor | None, scale: float) -> Tensor:
        if y is None:
            return self.eps_model(x, t, None)
        eps_c = self.eps_model(x, t, y)
        if scale == 1.0:
            return eps_c
        eps_u = self.eps_model(x, t, torch.zeros_like(y))
        return eps_u + scale * (eps_c - eps_u)  # Ho & Salimans eq. (6), s = 1 + w

    @torch.no_grad()
    def sample(self, n: int, labels: Tensor | None = None, sample_steps: int | None = None,
               guidance_scale: float | None = None) -> Tensor:
        """DDIM sampling (Song et al. eq. 12) over ``sample_steps`` evenly spaced steps."""
        labels = self.check_labels(n, labels)
        y = one_hot(labels, self.num_classes, n, self.device) if self.conditional else None
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        steps = self.sample_steps if sample_steps is None else sample_steps
        ts = torch.linspace(self.timesteps - 1, 0, steps, device=self.device).round().long()
        x = torch.randn(n, *self.data_shape, device=self.device)
        for i, t in enumerate(ts):
            a_t = self.alpha_bar[t]
            a_prev = self.alpha_bar[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), device=self.device)
            eps = self._guided_eps(x, t.repeat(n), y, scale)
            x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1.0, 1.0)  # predicted x_0, Song eq. (12)
            sigma = self.ddim_eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()  # Song eq. (16)
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()  # eps consistent with the clipped x_0
            x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps  # Song eq. (12)
            if self.ddim_eta > 0 and i + 1 < len(ts):
                x = x + sigma * torch.randn_like(x)
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)
