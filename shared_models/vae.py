"""Variational auto-encoder (Kingma & Welling, "Auto-Encoding Variational Bayes", 2014),
optionally class-conditional (Sohn et al., "Learning Structured Output Representation
using Deep Conditional Generative Models", 2015).

Per-example loss is the negative ELBO (Kingma & Welling eq. 3 / 10):
    -ELBO(x) = -E_{q(z|x)}[log p(x|z)] + KL(q(z|x) || N(0, I))
with a Bernoulli decoder for data in [0, 1] and the closed-form Gaussian KL (their
Appendix B). One private step: the whole model sees private data.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import ConvUpsampler, flat_dim, group_norm, is_image_shape, label_planes, mlp, one_hot
from .protocol import Batch, DPSGDTrainable, TrainingStep
from .registry import register_model


class _ConvEncoder(nn.Module):
    """Two stride-2 convolutions (H, W divisible by 4) then a linear head."""

    def __init__(self, channels: int, height: int, width: int, width_mult: int, out: int) -> None:
        super().__init__()
        c1, c2 = width_mult, 2 * width_mult
        self.body = nn.Sequential(
            nn.Conv2d(channels, c1, 4, stride=2, padding=1), group_norm(c1), nn.SiLU(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), group_norm(c2), nn.SiLU(),
            nn.Flatten(),
        )
        self.head = nn.Linear(c2 * (height // 4) * (width // 4), out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


@register_model("vae")
class VAE(DPSGDTrainable):
    """VAE with an MLP (any data shape) or a small conv (images, H and W divisible by 4)
    encoder/decoder.

    Args:
        data_shape: ``(C, H, W)`` for images or ``(D,)`` for vectors; data in [0, 1].
        num_classes: build a conditional VAE (labels concatenated as one-hot inputs).
        architecture: ``"mlp"`` or ``"conv"``.
        latent_dim: size of z.
        hidden: MLP width, or the channel multiplier of the conv variant.
        depth: number of hidden layers of each MLP.
    """

    grad_sample_mode = "bk"  # Book-Keeping: exact per-example clipping at about one backward pass

    def __init__(
        self,
        data_shape: tuple[int, ...],
        num_classes: int | None = None,
        architecture: str = "mlp",
        latent_dim: int = 16,
        hidden: int = 256,
        depth: int = 2,
    ) -> None:
        super().__init__(data_shape, num_classes)
        if architecture not in ("mlp", "conv"):
            raise ValueError(f"VAE architecture must be 'mlp' or 'conv', got {architecture!r}")
        self.architecture = architecture
        self.latent_dim = latent_dim
        k = num_classes or 0
        d = flat_dim(self.data_shape)
        if architecture == "conv":
            if not is_image_shape(self.data_shape) or self.data_shape[1] % 4 or self.data_shape[2] % 4:
                raise ValueError(
                    f"the conv VAE needs images (C, H, W) with H, W divisible by 4, got {self.data_shape}"
                )
            c, h, w = self.data_shape
            self.encoder = _ConvEncoder(c + k, h, w, hidden, 2 * latent_dim)
            self.decoder = ConvUpsampler(latent_dim + k, c, h, w, hidden)
        else:
            self.encoder = mlp([d + k] + [hidden] * depth + [2 * latent_dim])
            self.decoder = mlp([latent_dim + k] + [hidden] * depth + [d])

    # -- networks -------------------------------------------------------------------
    def encode(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        """q(z|x, y) = N(mu, diag(exp(logvar)))."""
        c = one_hot(y, self.num_classes, x.shape[0], x.device)
        if self.architecture == "conv":
            inp = torch.cat([x, label_planes(c, *x.shape[2:])], dim=1)
        else:
            inp = torch.cat([x.flatten(1), c], dim=1)
        mu, logvar = self.encoder(inp).chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)

    def decode_logits(self, z: Tensor, y: Tensor | None) -> Tensor:
        """Bernoulli logits of p(x|z, y), shaped like the data."""
        c = one_hot(y, self.num_classes, z.shape[0], z.device)
        return self.decoder(torch.cat([z, c], dim=1)).view(-1, *self.data_shape)

    # -- protocol -------------------------------------------------------------------
    def negative_elbo(self, x: Tensor, y: Tensor | None) -> Tensor:
        """Per-example -ELBO in nats (Kingma & Welling eq. 10, closed-form KL)."""
        mu, logvar = self.encode(x, y)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # reparameterisation, eq. 4
        logits = self.decode_logits(z, y)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
        return recon + kl

    def steps(self) -> list[TrainingStep]:
        def elbo_loss(batch: Batch) -> Tensor:
            assert batch.x is not None
            return self.negative_elbo(batch.x, batch.y)

        return [TrainingStep(name="elbo", module=self, loss=elbo_loss, private=True)]

    @torch.no_grad()
    def sample(self, n: int, labels: Tensor | None = None) -> Tensor:
        labels = self.check_labels(n, labels)
        z = torch.randn(n, self.latent_dim, device=self.device)
        return torch.sigmoid(self.decode_logits(z, labels))  # decoder mean, in [0, 1]

    @torch.no_grad()
    def log_likelihood(self, x: Tensor, y: Tensor | None = None, num_samples: int = 1) -> Tensor:
        """ELBO (``num_samples=1``) or the importance-weighted bound of Burda et al. 2016
        (eq. 8) -- a lower bound on log p(x) in nats, per example."""
        if num_samples == 1:
            return -self.negative_elbo(x, y)
        mu, logvar = self.encode(x, y)
        std = torch.exp(0.5 * logvar)
        log_w = []
        for _ in range(num_samples):
            eps = torch.randn_like(mu)
            z = mu + eps * std
            logits = self.decode_logits(z, y)
            log_px_z = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
            log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(1)
            log_qz = -0.5 * (eps.pow(2) + math.log(2 * math.pi) + logvar).sum(1)
            log_w.append(log_px_z + log_pz - log_qz)
        return torch.logsumexp(torch.stack(log_w), dim=0) - math.log(num_samples)
