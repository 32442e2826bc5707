"""Server-side evaluation of the global model against the reference (held-out) split.

In simulation the reference is the held-out split no site trains on; in deployment it is
a public reference set the operator provides. The domain feature extractor is fitted on
it once per run (and cached on disk by data hash), then every evaluation round samples
the model and scores the samples with :func:`evaluation.evaluate_samples`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedgen.evaluation import DomainFeatureExtractor, evaluate_samples
from fedgen.evaluation.plots import rows_by_class, save_sample_grid
from fedgen.evaluation.tstr import public_only_tstr
from fedgen.shared_models import GenerativeModel


def evaluation_draws(model: GenerativeModel, num_samples: int, round_seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The samples an evaluation round scores: ``num_samples`` draws with balanced labels,
    seeded by ``round_seed`` (the same draws for the same model, round and seed)."""
    torch.manual_seed(round_seed)
    labels = model.balanced_labels(num_samples)
    with torch.no_grad():
        return model.sample(num_samples, labels).cpu(), labels


class GlobalEvaluator:
    def __init__(self, reference: tuple[np.ndarray, np.ndarray | None] | None, *, seed: int) -> None:
        self.seed = seed
        self.ref_x = self.ref_y = None
        self._extractor: DomainFeatureExtractor | None = None
        if reference is not None:
            self.ref_x = torch.from_numpy(reference[0]).float()
            self.ref_y = None if reference[1] is None else torch.from_numpy(reference[1]).long()

    @property
    def extractor(self) -> DomainFeatureExtractor:
        if self._extractor is None:
            self._extractor = DomainFeatureExtractor.fit(self.ref_x, self.ref_y, seed=self.seed)
        return self._extractor

    def __call__(self, model: GenerativeModel, *, num_samples: int, round_seed: int, grid_path: Path,
                 tstr: bool = False) -> dict[str, Any]:
        """Sample the model, save a sample grid, and score the samples."""
        model.eval()
        samples, labels = evaluation_draws(model, num_samples, round_seed)
        if labels is None:
            save_sample_grid(samples[:100], grid_path, nrow=10)
        else:  # one row per class (balanced labels: every class has num_samples // K or more)
            per_class = max(1, min(10, num_samples // model.num_classes))
            save_sample_grid(rows_by_class(samples, labels.cpu(), per_class), grid_path, nrow=per_class)
        out: dict[str, Any] = {}
        if self.ref_x is not None:
            cond_y = self.ref_y if model.conditional else None
            try:
                n = min(1000, len(self.ref_x))
                with torch.no_grad():
                    ll = model.log_likelihood(self.ref_x[:n], None if cond_y is None else cond_y[:n])
                out["heldout_nll_bits_per_dim"] = float(-ll.mean() / (math.prod(model.data_shape) * math.log(2)))
            except NotImplementedError:
                pass
            out.update(evaluate_samples(samples, None if labels is None else labels.cpu(), self.ref_x,
                                        self.ref_y, extractor=self.extractor, tstr=tstr and labels is not None,
                                        seed=self.seed))
            if self.extractor.has_classifier:  # which classes the samples look like (mode collapse)
                predicted = self.extractor.embed(samples).predictions
                out["class_histogram"] = np.bincount(predicted, minlength=self.extractor.num_classes).tolist()
        model.train()
        return out

    def public_only(self, x: np.ndarray, y: np.ndarray | None, *, num_samples: int) -> dict[str, Any] | None:
        """The public set alone on this reference (evaluation/tstr.py, :func:`public_only_tstr`):
        TSTR's classifier trained on ``num_samples`` public records, the figure a run's TSTR is
        read against; ``None`` without labels on both sides."""
        if self.ref_x is None or self.ref_y is None or y is None:
            return None
        result = public_only_tstr(torch.from_numpy(x), torch.from_numpy(y), self.ref_x, self.ref_y, n=num_samples,
                                  seed=self.seed)
        return {"tstr_accuracy": result.tstr_accuracy, "trtr_accuracy": result.trtr_accuracy,
                "records": result.n_synthetic,
                "meaning": "TSTR's classifier trained on the public set alone (no private data), tested on the "
                           "same real half as the run's TSTR"}
