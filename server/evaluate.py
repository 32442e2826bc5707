"""Server-side evaluation of the global model against the reference (held-out) split."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared_models import GenerativeModel


@torch.no_grad()
def evaluate_global(model: GenerativeModel, reference: tuple[np.ndarray, np.ndarray | None] | None, *,
                    num_samples: int, seed: int, grid_path: Path) -> dict[str, Any]:
    """Sample the model, save a sample grid, and score it against ``reference``."""
    from evaluation.plots import save_sample_grid

    model.eval()
    torch.manual_seed(seed)
    samples = model.sample(num_samples).cpu()
    labels = model.balanced_labels(num_samples)
    save_sample_grid(samples[: min(100, num_samples)], grid_path,
                     nrow=model.num_classes or 10)
    out: dict[str, Any] = {}
    if reference is not None:
        ref_x = torch.from_numpy(reference[0]).float()
        ref_y = None if reference[1] is None or not model.conditional else torch.from_numpy(reference[1]).long()
        try:
            ll = model.log_likelihood(ref_x[:1000], None if ref_y is None else ref_y[:1000])
            dims = math.prod(model.data_shape)
            out["heldout_nll_bits_per_dim"] = float(-ll.mean() / (dims * math.log(2)))
        except NotImplementedError:
            pass
        try:
            from evaluation.suite import evaluate_samples
        except ImportError:  # evaluation metrics not installed in this build
            evaluate_samples = None
        if evaluate_samples is not None:
            out.update(evaluate_samples(samples, None if labels is None else labels.cpu(), ref_x, ref_y))
    model.train()
    return out
