"""Inception-Score analogue under the domain classifier.

Salimans et al. 2016, "Improved techniques for training GANs", §4:
``IS = exp( E_x KL( p(y|x) || p(y) ) )`` with ``p(y)`` the mean of ``p(y|x)`` over the
samples. It lies in ``[1, K]``: high when each sample is classified confidently *and* the
classes are used evenly. Computed with fedgen's domain classifier, not Inception-v3, hence
``is_domain``; for the k-means (unlabelled) extractor there are no probabilities and the
metric is not reported.
"""

from __future__ import annotations

import numpy as np

from .context import EvaluationContext
from .protocol import register_metric


def inception_score(probabilities: np.ndarray, *, eps: float = 1e-12) -> float:
    """``exp(E_x KL(p(y|x) || p(y)))`` of class probabilities ``[n, K]`` (rows sum to 1)."""
    p = np.asarray(probabilities, np.float64)
    marginal = p.mean(axis=0, keepdims=True)
    kl = (p * (np.log(p + eps) - np.log(marginal + eps))).sum(axis=1)
    return float(np.exp(kl.mean()))


@register_metric("is_domain", direction="maximize", units="effective classes (1..K)", group="diversity")
def _is_domain(ctx: EvaluationContext) -> float | None:
    """Inception-Score analogue (Salimans et al. 2016) under the domain classifier."""
    probs = ctx.fake.probabilities
    return None if probs is None else inception_score(probs)
