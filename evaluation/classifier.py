"""The one small domain classifier of ``evaluation/``.

Both the domain feature extractor (:mod:`evaluation.features`) and the TSTR utility
metric (:mod:`evaluation.tstr`) train this network; it is defined and trained here only.

Architecture (small on purpose: it must train in seconds on one CPU core):

* images ``(C, H, W)``: ``Conv3x3/2 (stride 1 below 16 px) -> GroupNorm -> SiLU -> Conv3x3/2 -> GroupNorm -> SiLU
  -> AvgPool(<=4x4) -> Linear -> SiLU`` (the *features*) ``-> Linear`` (the logits);
* vectors ``(D,)``: ``Linear -> SiLU -> Linear -> SiLU`` (the features) ``-> Linear``.

Inputs are standardised with statistics of the training data (per channel for images,
per column for vectors), kept as buffers so that they travel with the weights. No
BatchNorm: the network's output for one example never depends on the rest of the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ClassifierConfig:
    """Size and training schedule of the small classifier.

    ``epochs`` passes over the data, but never more than ``max_steps`` optimiser steps
    in total: that keeps training time bounded for large synthetic sets (TSTR).
    """

    channels: tuple[int, int] = (32, 64)
    hidden: int = 256
    feature_dim: int = 128
    epochs: int = 10
    max_steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4


#: schedule of the TSTR / TRTR classifiers: more steps, since synthetic sets can be large
TSTR_CONFIG = ClassifierConfig(max_steps=800)


def _group_norm(channels: int, max_groups: int = 8) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, max_groups), channels)


class SmallClassifier(nn.Module):
    """A 2-layer CNN (images) or MLP (vectors) with a ``feature_dim`` penultimate layer."""

    def __init__(self, data_shape: tuple[int, ...], num_classes: int, config: ClassifierConfig) -> None:
        super().__init__()
        self.data_shape = tuple(int(d) for d in data_shape)
        self.num_classes = int(num_classes)
        if len(self.data_shape) == 3:
            c, h, w = self.data_shape
            c1, c2 = config.channels
            # small images (< 16 px) keep their resolution in the first layer
            s1 = 1 if min(h, w) < 16 else 2
            # spatial size after the two convolutions, then pooled to at most 4x4
            ph, pw = min(4, math.ceil(h / (2 * s1))), min(4, math.ceil(w / (2 * s1)))
            self.body: nn.Module = nn.Sequential(
                nn.Conv2d(c, c1, 3, stride=s1, padding=1), _group_norm(c1), nn.SiLU(),
                nn.Conv2d(c1, c2, 3, stride=2, padding=1), _group_norm(c2), nn.SiLU(),
                nn.AdaptiveAvgPool2d((ph, pw)), nn.Flatten(),
                nn.Linear(c2 * ph * pw, config.feature_dim), nn.SiLU(),
            )
            stat_shape: tuple[int, ...] = (c, 1, 1)
        elif len(self.data_shape) == 1:
            (d,) = self.data_shape
            self.body = nn.Sequential(
                nn.Linear(d, config.hidden), nn.SiLU(),
                nn.Linear(config.hidden, config.feature_dim), nn.SiLU(),
            )
            stat_shape = (d,)
        else:
            raise ValueError(
                f"data_shape must be (C, H, W) for images or (D,) for vectors, got {self.data_shape}"
            )
        self.head = nn.Linear(config.feature_dim, self.num_classes)
        self.register_buffer("mean", torch.zeros(stat_shape))
        self.register_buffer("std", torch.ones(stat_shape))

    def set_standardisation(self, x: Tensor) -> None:
        """Standardise inputs with the mean / std of ``x`` (per channel or per column)."""
        dims = (0, 2, 3) if x.dim() == 4 else (0,)
        self.mean.copy_(x.mean(dim=dims).reshape(self.mean.shape))
        self.std.copy_(x.std(dim=dims).clamp_min(1e-6).reshape(self.std.shape))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features ``[B, feature_dim]``."""
        return self.body((x - self.mean) / self.std)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def build_classifier(
    data_shape: tuple[int, ...], num_classes: int, config: ClassifierConfig, *, seed: int
) -> SmallClassifier:
    """A freshly initialised classifier; the initial weights depend only on ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SmallClassifier(data_shape, num_classes, config)


def fit_classifier(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    *,
    config: ClassifierConfig,
    seed: int,
) -> SmallClassifier:
    """Train a :class:`SmallClassifier` on ``(x, y)`` with Adam and cross-entropy.

    Deterministic given ``seed`` (initialisation and minibatch order) on a fixed
    device and thread count. Returns the network in eval mode.
    """
    x = x.detach().float().cpu()
    y = y.detach().long().cpu()
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} examples but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError("cannot train a classifier on an empty set")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], got [{int(y.min())}, {int(y.max())}]")
    model = build_classifier(tuple(x.shape[1:]), num_classes, config, seed=seed)
    model.set_standardisation(x)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n, bs = x.shape[0], min(config.batch_size, x.shape[0])
    steps_per_epoch = math.ceil(n / bs)
    total = min(config.epochs * steps_per_epoch, max(config.max_steps, steps_per_epoch))
    model.train()
    step = 0
    while step < total:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step >= total:
                break
    return model.eval()


@torch.no_grad()
def predict(model: SmallClassifier, x: Tensor, *, batch_size: int = 1024) -> tuple[Tensor, Tensor]:
    """``(features [n, F], logits [n, K])`` of ``x`` in one batched pass."""
    feats, logits = [], []
    for chunk in x.detach().float().split(batch_size):
        f = model.features(chunk.to(model.mean.device))
        feats.append(f.cpu())
        logits.append(model.head(f).cpu())
    if not feats:
        return torch.zeros(0, model.head.in_features), torch.zeros(0, model.num_classes)
    return torch.cat(feats), torch.cat(logits)


def accuracy(model: SmallClassifier, x: Tensor, y: Tensor) -> float:
    """Share of ``x`` whose argmax prediction equals ``y``."""
    _, logits = predict(model, x)
    return float((logits.argmax(dim=1) == y.cpu().long()).float().mean())
