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
MIN_DISTORTED_SIDE = 20  # public images smaller than this are not distorted (distort)


def perceptual_dim(width_mult: int = 16, hidden: int = 128) -> int:
    """The length of :meth:`PerceptualFeatures.features`, whatever the image size: the two
    conv blocks pooled to ``POOL x POOL``, and the hidden layer."""
    return (width_mult + 2 * width_mult) * POOL * POOL + hidden


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
        self.dim = perceptual_dim(width_mult, hidden)

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


def _ink_extent(mask: Tensor) -> Tensor:
    """Per image, the number of pixels from the first to the last row (or column) with ink
    along the last axis of ``mask`` ``[n, L]``; 0 for none."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    first = torch.where(mask, positions, mask.shape[-1]).amin(dim=-1)
    last = torch.where(mask, positions, -1).amax(dim=-1)
    return (last - first + 1).clamp_min(0)


def distort(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random distortions of public digit images toward handwriting in MNIST's geometry:
    affine and elastic distortions (Simard, Steinkraus & Platt, ICDAR 2003, §2: a smooth
    random displacement field) and stroke-width changes. Each image's ink is scaled to a
    square box of 16-22 px (MNIST's 20 px +- 10 %, whatever the set's own framing: the
    8 x 8 digits blown up to fill the frame, or printed digits), centred by its mass and
    shifted +-2 px, rotated +-15 degrees, sheared +-0.3, displaced by a smooth field, its
    strokes thickened or thinned (3 x 3 max / min filter) one time in four / seven, and its
    contrast raised. Sizes and shifts are those fractions of the side (16-22 and 2 px of
    28) for any square ``[n, c, s, s]`` batch in [0, 1] of side >= ``MIN_DISTORTED_SIDE``;
    smaller images are returned as they are (an 8 x 8 digit has no room to distort: trained
    on 1 200 of scikit-learn's digits, the network labels 83 % of the other 597 undistorted,
    44-56 % with distortions)."""
    if x.shape[-1] < MIN_DISTORTED_SIDE:
        return x
    n, side = len(x), x.shape[-1]
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731 -- CPU draws: the same on any device
    ink = (x.detach().amax(dim=1) > 0.1).cpu()  # [n, s, s]
    extent = torch.maximum(_ink_extent(ink.any(dim=2)), _ink_extent(ink.any(dim=1))).clamp_min(1).float()
    zoom = side * (16.0 + 6.0 * rand(n)) / 28.0 / extent
    angle = (rand(n) - 0.5) * math.radians(30.0)
    shear = (rand(n) - 0.5) * 0.6
    cos, sin = torch.cos(angle), torch.sin(angle)
    linear = torch.stack([torch.stack([cos, shear * cos - sin], 1), torch.stack([sin, shear * sin + cos], 1)], 1)
    linear = linear / zoom[:, None, None]  # output -> input coordinates: the inverse of the zoom
    mass = x.detach().sum(dim=1).cpu()  # [n, s, s]; centre of mass in affine_grid's coordinates (-1..1)
    coords = (2.0 * torch.arange(side) + 1.0) / side - 1.0
    total = mass.sum(dim=(1, 2)).clamp_min(1e-12)
    centre = torch.stack([(mass.sum(dim=1) * coords).sum(1), (mass.sum(dim=2) * coords).sum(1)], 1) / total[:, None]
    shift = (rand(n, 2) - 0.5) * (8.0 / 28.0)  # +-2 px of 28 (-1..1 spans the side)
    theta = torch.cat([linear, (centre + shift)[:, :, None]], dim=2).to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    field = F.interpolate(torch.randn(n, 2, 7, 7, generator=generator) * 0.04, size=(side, side), mode="bicubic",
                          align_corners=False).permute(0, 2, 3, 1).to(x.device)
    out = F.grid_sample(x, grid + field, align_corners=False, padding_mode="zeros")
    stroke = rand(n)[:, None, None, None].to(x.device)
    thicker, thinner = F.max_pool2d(out, 3, 1, 1), -F.max_pool2d(-out, 3, 1, 1)
    out = torch.where(stroke < 0.25, thicker, torch.where(stroke > 6.0 / 7.0, 0.5 * (out + thinner), out))
    gain = (1.0 + 2.0 * rand(n, 1, 1, 1)).to(x.device)  # sharper strokes
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
            loss = F.cross_entropy(net(distort(x[idx], generator)), y[idx])
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
