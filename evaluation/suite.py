"""The one entry point the server calls each evaluation round.

``evaluate_samples`` embeds the generated samples and the reference with the domain
feature extractor, runs the registered metrics and returns a flat dict of JSON-ready
numbers. The reference embedding is memoised by the extractor (and the TRTR baseline by
:mod:`evaluation.tstr`), so repeated rounds only pay for the new samples.

Privacy note: the reference is held-out real data. Metrics computed on it and reported
(e.g. ``trtr_accuracy``, or any metric in deployment where the reference is private)
are outside the DP-SGD guarantee unless noised and charged; see docs/architecture.md §6.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import Tensor

from .context import EvaluationContext, EvaluationOptions
from .features import DomainFeatureExtractor
from .protocol import Direction, get_metric, registered_metrics

log = logging.getLogger(__name__)


def default_metric_names(*, tstr: bool = False) -> list[str]:
    """Metrics computed by default: all registered ones, the TSTR group only if ``tstr``."""
    return [m.name for m in registered_metrics() if tstr or m.group != "utility"]


def metric_directions() -> dict[str, Direction]:
    """``{metric name: "minimize" | "maximize"}`` for every registered metric."""
    return {m.name: m.direction for m in registered_metrics()}


def metric_units() -> dict[str, str]:
    """``{metric name: units}`` for every registered metric."""
    return {m.name: m.units for m in registered_metrics()}


def evaluate_samples(
    samples: Tensor,
    sample_labels: Tensor | None,
    reference_x: Tensor,
    reference_y: Tensor | None,
    *,
    extractor: DomainFeatureExtractor,
    tstr: bool = False,
    seed: int = 0,
    metrics: Sequence[str] | None = None,
    options: EvaluationOptions | None = None,
) -> dict[str, float]:
    """Quality metrics of generated ``samples`` against the held-out ``reference_x``.

    Args:
        samples: generated samples ``[m, *data_shape]`` in data range.
        sample_labels: the labels ``[m]`` the samples were generated for (conditional
            models), else ``None``.
        reference_x / reference_y: held-out real data and labels (``None`` if unlabelled);
            ``extractor`` should have been fit on exactly this reference.
        extractor: the :class:`DomainFeatureExtractor`.
        tstr: also train the TSTR / TRTR classifiers (seconds; needs both label sets).
        seed: seed of every subsample and classifier.
        metrics: names to compute (default :func:`default_metric_names`); an unknown name
            raises an error listing the registered ones.
        options: metric knobs (:class:`EvaluationOptions`).

    Returns:
        ``{name: value}``: floats, with ``classes_covered`` and ``collapsed`` (0/1) as
        ints. Metrics that do not apply (e.g. ``label_agreement`` without labels,
        ``is_domain`` for an unlabelled reference) are left out. See
        :func:`metric_directions` for which way is better.
    """
    samples = torch.as_tensor(samples).detach().float().cpu()
    reference_x = torch.as_tensor(reference_x).detach().float().cpu()
    if sample_labels is not None:
        sample_labels = torch.as_tensor(sample_labels).detach().long().cpu()
        if sample_labels.shape != (samples.shape[0],):
            raise ValueError(
                f"sample_labels must have shape ({samples.shape[0]},), got {tuple(sample_labels.shape)}"
            )
    if reference_y is not None:
        reference_y = torch.as_tensor(reference_y).detach().long().cpu()
        if reference_y.shape != (reference_x.shape[0],):
            raise ValueError(
                f"reference_y must have shape ({reference_x.shape[0]},), got {tuple(reference_y.shape)}"
            )
    selected = [get_metric(name) for name in (metrics if metrics is not None else default_metric_names(tstr=tstr))]
    ctx = EvaluationContext(
        samples=samples,
        sample_labels=sample_labels,
        reference_x=reference_x,
        reference_y=reference_y,
        extractor=extractor,
        seed=seed,
        options=options or EvaluationOptions(),
    )
    results: dict[str, float] = {}
    for metric in selected:
        value = metric(ctx)
        if value is None:
            log.debug("metric %s does not apply to these inputs", metric.name)
            continue
        results[metric.name] = int(value) if isinstance(value, (bool, int)) else float(value)
    return results
