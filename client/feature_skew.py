"""Feature skew: a per-site transform of a simulated site's images.

Feature distribution skew -- the same classes looking different at different sites, e.g.
scanners or cameras -- is one of the non-IID kinds of Kairouz et al. 2021 ("Advances and
Open Problems in Federated Learning", section 3.1). In simulation each site gets its own
parameter of one transform, chosen by the harness and recorded in
``<run-dir>/inputs/sites.json`` (``{"0": {"examples": 287, "feature_skew": {"kind":
"rotation", "degrees": -15.0}}, ...}``); the site applies it when it loads its partition,
so training sees the transformed images. The held-out reference split stays untransformed.

- ``rotation`` by ``degrees`` (counter-clockwise as displayed), bilinear, zeros outside the
  image, as in Rotated MNIST (Ghifary et al. 2015, "Domain Generalization for Object
  Recognition with Multi-task Autoencoders").
- ``contrast`` by ``factor``: ``mean + factor * (x - mean)`` around each image's mean
  intensity, clipped to [0, 1] (the blend of torchvision's ``adjust_contrast``).

Both keep the data's shape and its [0, 1] range.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fedgen.contract.rundir import SITES

from .data import SiteData



def rotate(x: Tensor, degrees: float) -> Tensor:
    """``x`` ([N, C, H, W] in [0, 1]) rotated by ``degrees`` about the image centre.

    ``affine_grid`` maps each output pixel to the input point it samples, in coordinates
    normalised to [-1, 1] on each axis; the off-diagonal terms are scaled by H/W and W/H so
    that a non-square image turns rigidly instead of shearing."""
    n, _, h, w = x.shape
    a = math.radians(degrees)
    cos, sin = math.cos(a), math.sin(a)
    # output pixel (u, v) samples input (cos u - sin v, sin u + cos v): with rows counted
    # downwards that turns the picture counter-clockwise on screen (as torch.rot90 does)
    theta = torch.tensor([[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(n, 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: float) -> Tensor:
    """``x`` ([N, ...] in [0, 1]) with each image's deviations from its own mean intensity
    scaled by ``factor`` (< 1 flatter, > 1 harsher), clipped to [0, 1]."""
    mean = x.flatten(1).mean(1).view(-1, *([1] * (x.dim() - 1)))
    return (mean + factor * (x - mean)).clamp(0.0, 1.0)


def transform_images(x: Tensor, skew: dict[str, Any]) -> Tensor:
    """Apply one site's recorded ``skew`` (``{"kind": ..., <parameter>: value}``) to ``x``."""
    if skew["kind"] == "rotation":
        return rotate(x, float(skew["degrees"]))
    if skew["kind"] == "contrast":
        return adjust_contrast(x, float(skew["factor"]))
    raise ValueError(f"unknown feature skew kind {skew['kind']!r}; known: rotation, contrast")


def with_feature_skew(data: SiteData, skew: dict[str, Any] | None) -> SiteData:
    """``data`` with its images transformed by ``skew`` (unchanged when ``None``)."""
    if skew is None:
        return data
    value = next(v for k, v in skew.items() if k != "kind")
    return SiteData(transform_images(data.x, skew), data.y, data.num_classes,
                    f"{data.source} ({skew['kind']} {value:g})")


def read_site_skew(run_dir: str | Path, site: int) -> dict[str, Any] | None:
    """Site ``site``'s recorded feature skew, or ``None`` (none planned, or an older run)."""
    path = Path(run_dir) / SITES
    if not path.exists():
        return None
    return _sites_json(str(path), path.stat().st_mtime_ns).get(str(site), {}).get("feature_skew")


@lru_cache(maxsize=2)
def _sites_json(path: str, mtime_ns: int) -> dict[str, Any]:
    """``inputs/sites.json``, parsed once per run (10 000 sites: ~0.35 MB, not re-read at every call)."""
    return json.loads(Path(path).read_text())
