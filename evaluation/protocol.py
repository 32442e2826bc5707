"""Metrics that describe themselves, and the registry that finds them by name.

Following synthcity, every metric carries its ``name``, its ``direction`` (is lower or
higher better) and its ``units``, so reports and sweeps rank and plot any metric without
special cases. A metric is called with an :class:`~evaluation.context.EvaluationContext`
(samples, reference data, extractor, seed; expensive intermediate results such as
embeddings or the PRDC neighbourhoods are shared between metrics through the context)
and returns a float, or ``None`` when it does not apply (e.g. ``label_agreement`` for an
unconditional model).

A new metric is one decorated function::

    @register_metric("fid_domain", direction="minimize", units="squared feature distance")
    def _fid(ctx: EvaluationContext) -> float: ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from .context import EvaluationContext

Direction = Literal["minimize", "maximize"]

#: metric groups; ``"utility"`` (TSTR) trains classifiers and is off unless asked for
Group = Literal["fidelity", "diversity", "collapse", "conditional", "utility"]


@runtime_checkable
class Metric(Protocol):
    """What every metric exposes."""

    name: str
    direction: Direction
    units: str

    def __call__(self, context: "EvaluationContext") -> float | None: ...


@dataclass(frozen=True)
class FunctionMetric:
    """A :class:`Metric` backed by a function of the evaluation context."""

    name: str
    direction: Direction
    units: str
    group: Group
    description: str
    fn: Callable[["EvaluationContext"], float | None]

    def __call__(self, context: "EvaluationContext") -> float | None:
        return self.fn(context)


class UnknownMetricError(KeyError):
    """Raised for a metric name that is not registered; the message lists the options."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


_METRICS: dict[str, FunctionMetric] = {}


def register_metric(
    name: str, *, direction: Direction, units: str, group: Group, description: str = ""
) -> Callable[[Callable[["EvaluationContext"], float | None]], FunctionMetric]:
    """Decorator registering ``fn(context) -> float | None`` as the metric ``name``.

    The decorated name is bound to the :class:`FunctionMetric` (itself callable).
    """
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction must be 'minimize' or 'maximize', got {direction!r}")

    def decorator(fn: Callable[["EvaluationContext"], float | None]) -> FunctionMetric:
        if name in _METRICS:
            raise ValueError(f"metric {name!r} is already registered")
        doc = description or (fn.__doc__ or "").strip().split("\n")[0]
        metric = FunctionMetric(name, direction, units, group, doc, fn)
        _METRICS[name] = metric
        return metric

    return decorator


def registered_metrics() -> list[FunctionMetric]:
    """All registered metrics in registration order (the order reports show them in)."""
    return list(_METRICS.values())


def list_metrics() -> list[str]:
    """Names of all registered metrics, sorted."""
    return sorted(_METRICS)


def get_metric(name: str) -> FunctionMetric:
    """The registered metric ``name``; an unknown name raises :class:`UnknownMetricError`."""
    try:
        return _METRICS[name]
    except KeyError:
        raise UnknownMetricError(
            f"unknown metric {name!r}; registered metrics: {', '.join(list_metrics())}"
        ) from None
