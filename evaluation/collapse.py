"""Mode-collapse diagnostics from the domain classifier's view of the samples.

The domain classifier (or, for unlabelled data, the k-means pseudo-classes of the
random-embedding extractor) assigns every generated sample a class. From that:

* ``class_histogram`` — share of generated samples per class;
* ``classes_covered`` — classes holding at least ``min_class_share`` (1 %) of the
  samples;
* ``class_entropy`` — Shannon entropy of the histogram divided by ``log K`` (1 = uniform
  over the K classes, 0 = a single class);
* ``diversity_ratio`` — per class, the mean pairwise feature distance among generated
  samples of that class over the same quantity among real samples of that class
  (intra-class diversity, cf. the intra-class analyses of Odena et al. 2017, "Conditional
  image synthesis with auxiliary classifier GANs"), averaged over the covered classes;
  ~1 for real data, -> 0 when a class collapses onto few modes;
* ``collapsed`` — 1 when the samples cover at most half of the classes the reference
  itself covers, **or** the diversity ratio is below ``diversity_threshold`` (0.5:
  generated classes at most half as spread out as real ones). Both thresholds are
  heuristics; they flag gross collapse, not subtle loss of diversity (see recall and
  coverage for that).

``label_agreement`` (for class-conditional models) is the share of samples the
classifier assigns to the label they were generated for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.distance import pdist

from .context import EvaluationContext
from .protocol import register_metric
from .subsample import subsample


@dataclass(frozen=True)
class CollapseDiagnostics:
    """Result of :func:`collapse_diagnostics`; ``diversity_ratio`` is NaN if undefined."""

    class_histogram: np.ndarray
    classes_covered: int
    reference_classes_covered: int
    class_entropy: float
    diversity_ratio: float
    collapsed: bool
    per_class_diversity_ratio: dict[int, float] = field(default_factory=dict)


def class_histogram(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Share of ``classes`` (ints in ``[0, num_classes)``) falling in each class ``[K]``."""
    counts = np.bincount(np.asarray(classes, np.int64), minlength=num_classes).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def normalized_entropy(histogram: np.ndarray) -> float:
    """``H(p) / log K`` in [0, 1] (0 for K = 1)."""
    p = np.asarray(histogram, np.float64)
    if p.size < 2:
        return 0.0
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(p.size))


def mean_pairwise_distance(features: np.ndarray) -> float:
    """Mean Euclidean distance over all pairs of rows (NaN for fewer than 2 rows)."""
    return float(pdist(features).mean()) if features.shape[0] >= 2 else math.nan


def collapse_diagnostics(
    fake_features: np.ndarray,
    fake_classes: np.ndarray,
    real_features: np.ndarray,
    real_classes: np.ndarray,
    num_classes: int,
    *,
    min_class_share: float = 0.01,
    diversity_threshold: float = 0.5,
    max_per_class: int = 300,
    seed: int = 0,
) -> CollapseDiagnostics:
    """Mode-collapse diagnostics of generated samples (see the module docstring).

    Args:
        fake_features / real_features: domain features ``[m, F]`` / ``[n, F]``.
        fake_classes: class assigned to each generated sample by the domain classifier.
        real_classes: class of each reference sample (its label, or the classifier's).
        num_classes: K.
        max_per_class: per-class diversity uses at most this many samples per side.
    """
    fake_classes, real_classes = np.asarray(fake_classes), np.asarray(real_classes)
    hist = class_histogram(fake_classes, num_classes)
    real_hist = class_histogram(real_classes, num_classes)
    covered = hist >= min_class_share
    reference_covered = int((real_hist >= min_class_share).sum())
    rng = np.random.default_rng(seed)
    ratios: dict[int, float] = {}
    for c in np.flatnonzero(covered & (real_hist > 0)):
        gen = subsample(fake_features[fake_classes == c], max_per_class, rng)
        real = subsample(real_features[real_classes == c], max_per_class, rng)
        ratio = mean_pairwise_distance(gen) / mean_pairwise_distance(real)
        if math.isfinite(ratio):
            ratios[int(c)] = ratio
    diversity = float(np.mean(list(ratios.values()))) if ratios else math.nan
    classes_covered = int(covered.sum())
    collapsed = classes_covered <= reference_covered / 2 or (
        math.isfinite(diversity) and diversity < diversity_threshold
    )
    return CollapseDiagnostics(
        class_histogram=hist,
        classes_covered=classes_covered,
        reference_classes_covered=reference_covered,
        class_entropy=normalized_entropy(hist),
        diversity_ratio=diversity,
        collapsed=bool(collapsed),
        per_class_diversity_ratio=ratios,
    )


def label_agreement(predicted: np.ndarray, requested: np.ndarray) -> float:
    """Share of conditional samples the classifier assigns to their requested label."""
    predicted, requested = np.asarray(predicted), np.asarray(requested)
    if predicted.shape != requested.shape:
        raise ValueError(f"{predicted.shape[0]} predictions for {requested.shape[0]} requested labels")
    return float((predicted == requested).mean())


# -- registered metrics ------------------------------------------------------------------
def diagnostics(ctx: EvaluationContext) -> CollapseDiagnostics:
    """The context's :class:`CollapseDiagnostics` (reference labels when available)."""

    def compute() -> CollapseDiagnostics:
        real_classes = (
            ctx.real.predictions
            if ctx.reference_y is None or not ctx.extractor.has_classifier
            else ctx.reference_y.detach().cpu().numpy()
        )
        o = ctx.options
        return collapse_diagnostics(
            ctx.fake.features, ctx.fake.predictions, ctx.real.features, real_classes,
            ctx.extractor.num_classes,
            min_class_share=o.min_class_share,
            diversity_threshold=o.collapse_diversity_threshold,
            seed=ctx.seed,
        )

    return ctx.cached("collapse", compute)


@register_metric("classes_covered", direction="maximize", units="classes", group="collapse")
def _classes_covered(ctx: EvaluationContext) -> int:
    """Classes (or k-means clusters) holding >= 1 % of the generated samples."""
    return diagnostics(ctx).classes_covered


@register_metric("class_entropy", direction="maximize", units="fraction of log K", group="collapse")
def _class_entropy(ctx: EvaluationContext) -> float:
    """Entropy of the generated class histogram over log K (1 = uniform)."""
    return diagnostics(ctx).class_entropy


@register_metric("diversity_ratio", direction="maximize", units="ratio (1 = as diverse as real)", group="collapse")
def _diversity_ratio(ctx: EvaluationContext) -> float | None:
    """Mean intra-class feature distance, generated over real, averaged over covered classes."""
    value = diagnostics(ctx).diversity_ratio
    return value if math.isfinite(value) else None


@register_metric("collapsed", direction="minimize", units="flag (0/1)", group="collapse")
def _collapsed(ctx: EvaluationContext) -> int:
    """1 when at most half the classes are covered or the diversity ratio is < 0.5."""
    return int(diagnostics(ctx).collapsed)


@register_metric("label_agreement", direction="maximize", units="fraction", group="conditional")
def _label_agreement(ctx: EvaluationContext) -> float | None:
    """Share of class-conditional samples classified as the label they were drawn for."""
    if ctx.sample_labels is None or not ctx.extractor.has_classifier:
        return None
    return label_agreement(ctx.fake.predictions, ctx.sample_labels.detach().cpu().numpy())
