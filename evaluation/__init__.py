"""Quality metrics for generated samples (pure functions over tensors / arrays).

All feature-based metrics use fedgen's *domain* feature extractor (a small classifier
trained on the held-out reference data), not Inception-v3: hence ``fid_domain``,
``kid_domain``, ``is_domain``. The server calls :func:`evaluate_samples` each round.
"""

# Metric modules register their metrics on import; this order is the report order
# (the package __init__ runs before any submodule import, so it always holds).
from . import fid, prdc, inception_score, collapse, tstr  # noqa: F401, I001
from .classifier import ClassifierConfig, SmallClassifier, fit_classifier
from .collapse import CollapseDiagnostics, collapse_diagnostics, label_agreement
from .context import EvaluationContext, EvaluationOptions
from .features import DomainFeatureExtractor, Embedding, default_cache_dir
from .fid import KIDResult, fid_from_features, frechet_distance, gaussian_moments, kernel_inception_distance
from .inception_score import inception_score
from .prdc import PRDC, compute_prdc
from .protocol import (
    Direction,
    FunctionMetric,
    Metric,
    UnknownMetricError,
    get_metric,
    list_metrics,
    register_metric,
)
from .suite import default_metric_names, evaluate_samples, metric_directions, metric_units
from .tstr import TSTRResult, train_synthetic_test_real

__all__ = [
    "PRDC",
    "ClassifierConfig",
    "CollapseDiagnostics",
    "Direction",
    "DomainFeatureExtractor",
    "Embedding",
    "EvaluationContext",
    "EvaluationOptions",
    "FunctionMetric",
    "KIDResult",
    "Metric",
    "SmallClassifier",
    "TSTRResult",
    "UnknownMetricError",
    "collapse_diagnostics",
    "default_cache_dir",
    "default_metric_names",
    "evaluate_samples",
    "fid_from_features",
    "fit_classifier",
    "frechet_distance",
    "gaussian_moments",
    "get_metric",
    "inception_score",
    "kernel_inception_distance",
    "label_agreement",
    "list_metrics",
    "metric_directions",
    "metric_units",
    "compute_prdc",
    "register_metric",
    "train_synthetic_test_real",
]
