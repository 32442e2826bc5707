"""Fréchet distance (FID) and kernel distance (KID) between two feature sets.

Computed on the *domain* features of :mod:`evaluation.features`, hence the registered
names ``fid_domain`` / ``kid_domain``: these are not Inception FID/KID and are not
comparable with published numbers.

* FID — Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a
  local Nash equilibrium", eq. (6): the Fréchet (2-Wasserstein) distance between the
  Gaussians fit to the two feature sets (Dowson & Landau 1982),
  ``d^2 = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2})``.
* KID — Bińkowski et al. 2018, "Demystifying MMD GANs", §4 / eq. (3): the unbiased
  estimator of the squared MMD with the cubic polynomial kernel
  ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets; its std over subsets
  is reported alongside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .context import EvaluationContext
from .protocol import register_metric
from .subsample import subsample


def gaussian_moments(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[d]`` and unbiased covariance ``[d, d]`` of ``features`` ``[n, d]`` (float64)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features of shape [n >= 2, d], got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False, ddof=1).reshape(f.shape[1], f.shape[1])


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr((sigma1 sigma2)^{1/2})`` for PSD ``sigma1``, ``sigma2``.

    ``sigma1 sigma2`` has the same eigenvalues as the symmetric PSD matrix
    ``sigma1^{1/2} sigma2 sigma1^{1/2}``, so the trace of its principal square root is the
    sum of the square roots of those eigenvalues: two symmetric eigendecompositions instead
    of a general (Schur) ``sqrtm`` of a non-symmetric matrix -- exact, and ~100x faster
    for 128-dimensional features. Eigenvalues below 0 are round-off and clipped, which
    also copes with singular covariances (fewer samples than dimensions).
    """
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6).

    The cross term ``tr((sigma1 sigma2)^{1/2})`` comes from :func:`trace_sqrt_product`;
    the result is clipped at 0 (it is a squared distance; negatives are round-off).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"inconsistent shapes: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2)
    return max(float(value), 0.0)


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between two feature sets ``[n, d]`` and ``[m, d]`` (Gaussian fit to each)."""
    return frechet_distance(*gaussian_moments(real), *gaussian_moments(fake))


@dataclass(frozen=True)
class KIDResult:
    """KID estimate: mean and standard deviation of the unbiased MMD^2 over subsets."""

    mean: float
    std: float


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cubic polynomial kernel ``(a b^T / d + 1)^3`` (Bińkowski et al. 2018, §4)."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def kernel_inception_distance(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    max_pool: int = 4000,
    seed: int = 0,
) -> KIDResult:
    """KID between feature sets ``real`` ``[n, d]`` and ``fake`` ``[m, d]``.

    For each of ``num_subsets`` subsets of ``s = min(subset_size, n, m)`` real and ``s``
    generated rows drawn without replacement, the unbiased MMD^2 estimate is

        sum_{i != j} k(x_i, x_j) / (s (s-1)) + sum_{i != j} k(y_i, y_j) / (s (s-1))
        - 2 sum_{i, j} k(x_i, y_j) / s^2.

    The kernel matrices are computed once over a seeded pool of at most ``max_pool``
    rows per side (a uniform subset of a uniform pool is a uniform subset), and the
    subset sums are read off them with 0/1 indicator matrices.
    """
    rng = np.random.default_rng(seed)
    x = subsample(np.asarray(real, np.float64), max_pool, rng)
    y = subsample(np.asarray(fake, np.float64), max_pool, rng)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need feature sets [n, d] and [m, d], got {x.shape} and {y.shape}")
    s = min(subset_size, x.shape[0], y.shape[0])
    if s < 2:
        raise ValueError("KID needs at least 2 samples per side")
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    ix = _indicators(x.shape[0], s, num_subsets, rng)
    iy = _indicators(y.shape[0], s, num_subsets, rng)
    sum_xx = ((ix @ kxx) * ix).sum(axis=1) - ix @ np.diag(kxx)
    sum_yy = ((iy @ kyy) * iy).sum(axis=1) - iy @ np.diag(kyy)
    sum_xy = ((ix @ kxy) * iy).sum(axis=1)
    mmd2 = (sum_xx + sum_yy) / (s * (s - 1)) - 2.0 * sum_xy / (s * s)
    return KIDResult(mean=float(mmd2.mean()), std=float(mmd2.std()))


def _indicators(n: int, s: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``[k, n]`` 0/1 matrix whose rows each select ``s`` of ``n`` items without replacement."""
    rows = np.zeros((k, n))
    for r in range(k):
        rows[r, rng.choice(n, s, replace=False)] = 1.0
    return rows


# -- registered metrics ------------------------------------------------------------------
def _kid(ctx: EvaluationContext) -> KIDResult:
    o = ctx.options
    return ctx.cached(
        "kid",
        lambda: kernel_inception_distance(
            ctx.real.features, ctx.fake.features,
            num_subsets=o.kid_subsets, subset_size=o.kid_subset_size, seed=ctx.seed,
        ),
    )


@register_metric("fid_domain", direction="minimize", units="squared feature distance", group="fidelity")
def _fid_domain(ctx: EvaluationContext) -> float:
    """Domain-feature FID (Heusel et al. 2017) — not Inception FID."""
    return fid_from_features(ctx.real.features, ctx.fake.features)


@register_metric("kid_domain", direction="minimize", units="MMD^2 (cubic kernel)", group="fidelity")
def _kid_domain(ctx: EvaluationContext) -> float:
    """Domain-feature KID (Bińkowski et al. 2018), mean over subsets — not Inception KID."""
    return _kid(ctx).mean


@register_metric("kid_domain_std", direction="minimize", units="MMD^2 (cubic kernel)", group="fidelity")
def _kid_domain_std(ctx: EvaluationContext) -> float:
    """Standard deviation of the domain-feature KID over subsets (its uncertainty)."""
    return _kid(ctx).std
