"""Perceptual features from a network trained on PUBLIC data: DP-MEPF (Harder, Asadabadi,
Sutherland & Park, "Pre-trained Perceptual Features Improve Differentially Private Image
Generation", TMLR 2023).

A small conv classifier is trained, without DP, on a set the scenario declares public
(``warm_start.public``, e.g. ``digits-28``); the mmd release then adds to every record's
random-Fourier-feature vector the record's activations in this network (:meth:`features`).
The network is the server's: it trains it before round 1 (server/warm_start.py, the public
warm start) from the scenario's seed -- deterministic, the same weights for the same seed --
and ships it in the global model's state. A site never trusts it: the mmd family scales
every record's whole released vector to norm <= 1 at the site, and zeroes a vector that is
not finite (shared_models/mmd.py, :func:`bounded_rows`), so no network the server sends can
raise the release's sensitivity above 1.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn
from torch.nn import functional as F

POOL = 4  # every conv layer's activations are average-pooled to POOL x POOL before release


class PerceptualFeatures(nn.Module):
    """Two conv layers and a hidden linear layer, trained as a classifier on public images.

    ``features(x)``: the activations of the three layers (the conv maps average-pooled to
    ``POOL x POOL``), each block scaled to norm 1 / sqrt(3): a vector of norm 1 (or 0 for
    an input that excites nothing).
    """

    def __init__(self, channels: int, height: int, width: int, num_classes: int, *, width_mult: int = 16,
                 hidden: int = 128) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width_mult, 3, padding=1)
        self.conv2 = nn.Conv2d(width_mult, 2 * width_mult, 3, padding=1)
        self.fc = nn.Linear(2 * width_mult * (height // 4) * (width // 4), hidden)
        self.head = nn.Linear(hidden, num_classes)
        self.dim = (width_mult + 2 * width_mult) * POOL * POOL + hidden

    def _layers(self, x: Tensor) -> list[Tensor]:
        h1 = F.relu(self.conv1(x))
        h2 = F.relu(self.conv2(F.avg_pool2d(h1, 2)))
        h3 = F.relu(self.fc(F.avg_pool2d(h2, 2).flatten(1)))
        return [h1, h2, h3]

    def forward(self, x: Tensor) -> Tensor:  # logits, for training on the public set
        return self.head(self._layers(x)[-1])

    def features(self, x: Tensor) -> Tensor:
        blocks = []
        h1, h2, h3 = self._layers(x)
        for h in (F.adaptive_avg_pool2d(h1, POOL).flatten(1), F.adaptive_avg_pool2d(h2, POOL).flatten(1), h3):
            blocks.append(h / h.norm(dim=1, keepdim=True).clamp_min(1e-12))
        return torch.cat(blocks, dim=1) / math.sqrt(len(blocks))


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random shifts (+-2 px), shrinkings (to 0.6-0.9 of the side) and stroke contrasts of
    public images: digits-28 are 8 x 8 digits blown up to fill the frame, blurrier and
    larger than MNIST's (a 20 x 20 box in 28 x 28)."""
    n = len(x)
    scale = 0.6 + 0.3 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * (8.0 / x.shape[-1])
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    gain = (1.0 + 2.0 * torch.rand(n, 1, 1, 1, generator=generator)).to(x.device)  # sharper strokes
    return ((out - 0.5) * gain + 0.5).clamp(0.0, 1.0) * (out > 0.05)


def train_on_public(net: PerceptualFeatures, x: Tensor, y: Tensor | None, *, steps: int, batch_size: int, lr: float,
                    seed: int) -> dict[str, float]:
    """Train ``net`` in place as a classifier of the public ``(x, y)`` (no DP: public data
    only), deterministically given ``seed``; the global random state is left as it was.
    Returns ``pretrain_loss`` (mean over the last tenth of the steps), ``pretrain_steps``,
    ``pretrain_examples``, ``pretrain_seconds``."""
    if y is None:
        raise ValueError("perceptual features are trained as a classifier: the public set needs labels (y)")
    n = int(x.shape[0])
    if n == 0:
        raise ValueError("the public set is empty")
    t0 = time.time()
    device = next(net.parameters()).device
    x, y = x.float().to(device), y.long().to(device)
    for p in net.parameters():
        p.requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in (net.conv1, net.conv2, net.fc, net.head):
            module.reset_parameters()  # the weights depend on the seed only
        generator = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        tail, losses = max(1, steps // 10), []
        net.train()
        for step in range(steps):
            idx = torch.randint(n, (min(batch_size, n),), generator=generator).to(device)
            loss = F.cross_entropy(net(_augment(x[idx], generator)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step >= steps - tail:
                losses.append(float(loss.detach()))
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return {"pretrain_loss": sum(losses) / len(losses), "pretrain_steps": float(steps),
            "pretrain_examples": float(n), "pretrain_seconds": time.time() - t0}
