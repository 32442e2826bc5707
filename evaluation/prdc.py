"""Precision, recall, density and coverage of generated samples in feature space.

* precision / recall — Kynkäänniemi et al. 2019, "Improved precision and recall metric
  for assessing generative models", eqs. (1)–(3): the real (generated) manifold is the
  union of balls around each real (generated) feature with radius its distance to the
  k-th nearest neighbour of the same set; precision is the share of generated samples
  inside the real manifold, recall the share of real samples inside the generated one.
* density / coverage — Naeem et al. 2020, "Reliable fidelity and diversity metrics for
  generative models", eqs. (3)–(4): density counts how many real balls contain each
  generated sample, ``(1 / kM) sum_j sum_i 1[Y_j in B(X_i, NND_k(X_i))]``; coverage is
  the share of real balls that contain at least one generated sample.

Comparisons are strict (``<``), as in the authors' ``prdc`` package, which this module
reproduces (tested against it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .context import EvaluationContext
from .protocol import register_metric
from .subsample import subsample


@dataclass(frozen=True)
class PRDC:
    precision: float
    recall: float
    density: float
    coverage: float


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances ``[n, m]`` between rows of ``a`` and ``b`` (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


def knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Distance of each row to its k-th nearest *other* row (index k: index 0 is itself)."""
    d = pairwise_distances(features, features)
    return np.partition(d, k, axis=1)[:, k]


def compute_prdc(real: np.ndarray, fake: np.ndarray, *, k: int = 5) -> PRDC:
    """Precision, recall, density, coverage of ``fake`` ``[m, d]`` against ``real`` ``[n, d]``."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"PRDC with k={k} needs more than {k} samples per side, got {real.shape[0]} / {fake.shape[0]}")
    real_radii = knn_radii(real, k)  # [n]
    fake_radii = knn_radii(fake, k)  # [m]
    d = pairwise_distances(real, fake)  # [n, m]
    in_real_ball = d < real_radii[:, None]  # generated j inside the ball of real i
    return PRDC(
        precision=float(in_real_ball.any(axis=0).mean()),
        recall=float((d < fake_radii[None, :]).any(axis=1).mean()),
        density=float(in_real_ball.sum(axis=0).mean() / k),
        coverage=float((d.min(axis=1) < real_radii).mean()),
    )


# -- registered metrics ------------------------------------------------------------------
def _prdc(ctx: EvaluationContext) -> PRDC:
    cap = ctx.options.prdc_max_samples
    return ctx.cached(
        "prdc",
        lambda: compute_prdc(
            subsample(ctx.real.features, cap, ctx.seed),
            subsample(ctx.fake.features, cap, ctx.seed + 1),
            k=ctx.options.prdc_k,
        ),
    )


@register_metric("precision", direction="maximize", units="fraction", group="fidelity")
def _precision(ctx: EvaluationContext) -> float:
    """Share of generated samples inside the real k-NN manifold (Kynkäänniemi et al. 2019)."""
    return _prdc(ctx).precision


@register_metric("recall", direction="maximize", units="fraction", group="diversity")
def _recall(ctx: EvaluationContext) -> float:
    """Share of real samples inside the generated k-NN manifold (Kynkäänniemi et al. 2019)."""
    return _prdc(ctx).recall


@register_metric("density", direction="maximize", units="mean real balls per sample / k", group="fidelity")
def _density(ctx: EvaluationContext) -> float:
    """Mean number of real k-NN balls holding a generated sample, over k (Naeem et al. 2020); ~1 for real data."""
    return _prdc(ctx).density


@register_metric("coverage", direction="maximize", units="fraction", group="diversity")
def _coverage(ctx: EvaluationContext) -> float:
    """Share of real k-NN balls that contain a generated sample (Naeem et al. 2020)."""
    return _prdc(ctx).coverage
