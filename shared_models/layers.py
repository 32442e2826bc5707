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
