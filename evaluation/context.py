"""What one evaluation sees: the samples, the reference data, the extractor, the options.

Metrics receive an :class:`EvaluationContext` and share expensive intermediate results
(embeddings, PRDC neighbourhoods, the TSTR run) through :meth:`EvaluationContext.cached`,
so asking for ``precision`` and ``recall`` computes the distance matrices once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from torch import Tensor

from .classifier import TSTR_CONFIG, ClassifierConfig
from .features import DomainFeatureExtractor, Embedding

T = TypeVar("T")


@dataclass(frozen=True)
class EvaluationOptions:
    """Knobs of the metrics; the defaults are what fedgen reports.

    Attributes:
        prdc_k: nearest neighbours for the PRDC manifolds (Naeem et al. 2020 use 5).
        prdc_max_samples: PRDC and per-class diversity use at most this many samples
            per side (seeded subsample), bounding the O(n^2) distance matrices.
        kid_subsets / kid_subset_size: KID is averaged over this many random subsets
            of this size (Binkowski et al. 2018 use 100 x 1000).
        min_class_share: a class counts as *covered* when at least this share of the
            generated samples is assigned to it.
        collapse_diversity_threshold: ``collapsed`` when the per-class diversity ratio
            (generated / real) falls below this.
        tstr_config: schedule of the TSTR / TRTR classifiers.
        tstr_test_fraction: share of the reference held out as the TSTR/TRTR test set.
    """

    prdc_k: int = 5
    prdc_max_samples: int = 5000
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    min_class_share: float = 0.01
    collapse_diversity_threshold: float = 0.5
    tstr_config: ClassifierConfig = TSTR_CONFIG
    tstr_test_fraction: float = 0.5


@dataclass
class EvaluationContext:
    """Inputs of one evaluation plus a memo of intermediate results."""

    samples: Tensor
    sample_labels: Tensor | None
    reference_x: Tensor
    reference_y: Tensor | None
    extractor: DomainFeatureExtractor
    seed: int = 0
    options: EvaluationOptions = field(default_factory=EvaluationOptions)
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)

    def cached(self, key: str, compute: Callable[[], T]) -> T:
        """``compute()`` once per context, under ``key``."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    @property
    def fake(self) -> Embedding:
        """Embedding of the generated samples."""
        return self.cached("fake", lambda: self.extractor.embed(self.samples))

    @property
    def real(self) -> Embedding:
        """Embedding of the reference data (memoised by the extractor across rounds)."""
        return self.cached("real", lambda: self.extractor.embed(self.reference_x))
