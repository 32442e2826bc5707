"""Utility of synthetic data: Train on Synthetic, Test on Real (TSTR), with TRTR alongside.

Esteban, Hyland & Rätsch 2017, "Real-valued (medical) time series generation with
recurrent conditional GANs", §3.2: train a classifier on labelled synthetic samples and
report its accuracy on real data; the same classifier trained on real data (TRTR) is the
ceiling to compare against. The classifier is the small CNN / MLP of
:mod:`evaluation.classifier` (the one the domain feature extractor uses).

Splitting: the held-out reference set is the only real data the evaluator has. It is
split once, stratified by label and seeded, into a *real-train* part (``1 -
test_fraction``) and a *real-test* part (``test_fraction``, default half). TSTR trains
on all synthetic samples and TRTR on real-train; **both are tested on the same
real-test part**, so the two accuracies are directly comparable. TRTR depends only on
the reference, the schedule and the seed, so it is memoised per process.

Both numbers are plain accuracies; TRTR trains on only half the reference, so it is
a conservative ceiling. ``tstr_ci95_low`` / ``tstr_ci95_high`` bound TSTR by the Wilson score
interval of a binomial proportion (Wilson 1927; Brown, Cai & DasGupta 2001 recommend it
over the normal approximation) over the real-test records: the spread that testing on a
finite set alone puts on the figure (the classifier's and the sampler's seeds add to it).
On MNIST's 1 000 real-test images an accuracy of 0.920 has the interval [0.902, 0.935].

When a run declares a public set (``warm_start.public``), :func:`public_only_tstr` gives the
floor beside that ceiling: the same classifier trained on the public data alone (as many
records, images distorted as the perceptual network is trained on them), tested on the same
real-test half -- what a user gets without any private data, the figure the private
pipeline has to beat to be worth its budget.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fedgen.shared_models.layers import is_image_shape
from fedgen.shared_models.perceptual import distort

from .classifier import TSTR_CONFIG, ClassifierConfig, accuracy, fit_classifier
from .context import EvaluationContext
from .features import content_hash
from .protocol import register_metric

_TRTR_MEMO: OrderedDict[str, float] = OrderedDict()


@dataclass(frozen=True)
class TSTRResult:
    tstr_accuracy: float
    trtr_accuracy: float
    n_synthetic: int
    n_real_train: int
    n_real_test: int
    #: the same TSTR classifier's accuracy on the real-train half, which TSTR never tests on: a
    #: validation figure for choosing post-processing settings (benchmarks/sampler_selection.py)
    #: without looking at the reported one
    validation_accuracy: float | None = None

    def tstr_interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """The Wilson score interval of ``tstr_accuracy`` over the ``n_real_test`` records."""
        return wilson_interval(round(self.tstr_accuracy * self.n_real_test), self.n_real_test, confidence)


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (``successes`` of ``trials``)."""
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def split_reference(labels: Tensor, *, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded split of reference indices into (real-train, real-test), stratified by label
    when every class has at least two examples."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    y = labels.detach().cpu().numpy()
    idx = np.arange(len(y))
    try:
        train, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y)
    except ValueError:  # a class with a single example, or fewer test slots than classes
        train, test = train_test_split(idx, test_size=test_fraction, random_state=seed)
    return torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(test))


def train_synthetic_test_real(
    synthetic_x: Tensor,
    synthetic_y: Tensor,
    real_x: Tensor,
    real_y: Tensor,
    *,
    num_classes: int | None = None,
    config: ClassifierConfig | None = None,
    test_fraction: float = 0.5,
    seed: int = 0,
) -> TSTRResult:
    """TSTR and TRTR accuracies (see the module docstring for the split).

    Args:
        synthetic_x / synthetic_y: generated samples ``[m, *data_shape]`` and the labels
            they were generated for ``[m]``.
        real_x / real_y: the held-out reference set and its labels.
        num_classes: K; default ``max(label) + 1`` over both label sets.
        config: classifier size and schedule (default ``TSTR_CONFIG``: at most 800 steps).
    """
    config = config or TSTR_CONFIG
    sx, sy = synthetic_x.detach().float().cpu(), synthetic_y.detach().long().cpu()
    rx, ry = real_x.detach().float().cpu(), real_y.detach().long().cpu()
    if tuple(sx.shape[1:]) != tuple(rx.shape[1:]):
        raise ValueError(f"synthetic shape {tuple(sx.shape[1:])} != real shape {tuple(rx.shape[1:])}")
    k = num_classes or int(max(sy.max(), ry.max())) + 1
    train, test = split_reference(ry, test_fraction=test_fraction, seed=seed)
    tstr_model = fit_classifier(sx, sy, k, config=config, seed=seed)
    tstr = accuracy(tstr_model, rx[test], ry[test])
    validation = accuracy(tstr_model, rx[train], ry[train])

    key = content_hash(rx, ry, extra=json.dumps([dataclasses.asdict(config), k, test_fraction, seed]))
    if key not in _TRTR_MEMO:
        trtr_model = fit_classifier(rx[train], ry[train], k, config=config, seed=seed)
        _TRTR_MEMO[key] = accuracy(trtr_model, rx[test], ry[test])
        while len(_TRTR_MEMO) > 8:
            _TRTR_MEMO.popitem(last=False)
    return TSTRResult(
        tstr_accuracy=tstr,
        trtr_accuracy=_TRTR_MEMO[key],
        n_synthetic=int(sx.shape[0]),
        n_real_train=int(train.numel()),
        n_real_test=int(test.numel()),
        validation_accuracy=validation,
    )


def public_only_tstr(
    public_x: Tensor,
    public_y: Tensor,
    real_x: Tensor,
    real_y: Tensor,
    *,
    n: int,
    num_classes: int | None = None,
    config: ClassifierConfig | None = None,
    test_fraction: float = 0.5,
    seed: int = 0,
) -> TSTRResult:
    """TSTR with a public set in place of the synthetic samples: ``n`` records drawn from
    ``public_x / public_y`` with replacement (seeded), square images of side >=
    ``MIN_DISTORTED_SIDE`` distorted by :func:`~fedgen.shared_models.perceptual.distort` (the
    augmentation the public network trains with; smaller images and vectors as they are),
    tested on the same real-test half as :func:`train_synthetic_test_real`."""
    px, py = public_x.detach().float().cpu(), public_y.detach().long().cpu()
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(px), (n,), generator=generator)
    records = px[idx]
    shape = tuple(records.shape[1:])
    if is_image_shape(shape) and shape[1] == shape[2]:
        records = distort(records, generator)
    return train_synthetic_test_real(records, py[idx], real_x, real_y, num_classes=num_classes, config=config,
                                     test_fraction=test_fraction, seed=seed)


# -- registered metrics ------------------------------------------------------------------
def _tstr(ctx: EvaluationContext) -> TSTRResult | None:
    if ctx.sample_labels is None or ctx.reference_y is None:
        return None
    return ctx.cached(
        "tstr",
        lambda: train_synthetic_test_real(
            ctx.samples, ctx.sample_labels, ctx.reference_x, ctx.reference_y,
            num_classes=ctx.extractor.num_classes if ctx.extractor.has_classifier else None,
            config=ctx.options.tstr_config,
            test_fraction=ctx.options.tstr_test_fraction,
            seed=ctx.seed,
        ),
    )


@register_metric("tstr_accuracy", direction="maximize", units="accuracy", group="utility")
def _tstr_accuracy(ctx: EvaluationContext) -> float | None:
    """Accuracy on real test data of a classifier trained on labelled synthetic samples."""
    result = _tstr(ctx)
    return None if result is None else result.tstr_accuracy


@register_metric("tstr_ci95_low", direction="maximize", units="accuracy", group="utility")
def _tstr_ci95_low(ctx: EvaluationContext) -> float | None:
    """Lower end of TSTR's 95 % Wilson interval over the real-test records (module docstring)."""
    result = _tstr(ctx)
    return None if result is None else result.tstr_interval()[0]


@register_metric("tstr_ci95_high", direction="maximize", units="accuracy", group="utility")
def _tstr_ci95_high(ctx: EvaluationContext) -> float | None:
    """Upper end of TSTR's 95 % Wilson interval over the real-test records (module docstring)."""
    result = _tstr(ctx)
    return None if result is None else result.tstr_interval()[1]


@register_metric("trtr_accuracy", direction="maximize", units="accuracy", group="utility")
def _trtr_accuracy(ctx: EvaluationContext) -> float | None:
    """Accuracy on the same real test data of the classifier trained on real reference-train."""
    result = _tstr(ctx)
    return None if result is None else result.trtr_accuracy
