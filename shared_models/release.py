"""Combining the sites' noisy class-blocked releases on the server (post-processing).

A release family's site ``k`` publishes, per class ``c``, ``S~_kc = S_kc + N(0, sigma_k^2 I)``:
the sum over its class-``c`` records of a vector ``[u(x), w]`` of norm <= 1 (``u`` the
features, ``w`` the constant count weight), so ``S~_kc[-1] / w`` is its noisy class count
``n~_kc``. The federation wants each class's mean feature ``mu_c``.

FedAvg's average, ``sum_k S~_kc / N``, weights every site alike in every class, so a site
holding 3 images of a class adds as much noise to that class as one holding 500 -- under
label skew most of the noise in a class comes from the sites that hardly hold it. Each
site's class mean ``S~_kc / n_kc`` is an independent estimate of ``mu_c`` with
per-coordinate variance ``sigma_k^2 / n_kc^2 + tau^2 / n_kc`` (release noise plus the
records' own spread, ``tau^2 <= (1 - w^2) / F`` per coordinate since ``||u|| <= sqrt(1 - w^2)``);
the minimum-variance unbiased combination weights them by the inverse variance (Aitken's
generalised least squares; the fixed-effect estimator of meta-analysis). On the sums that
is

    mu^_c = sum_k a_kc S~_kc / sum_k a_kc n_kc,   a_kc = n_kc / (sigma_k^2 + n_kc tau^2),

which is FedAvg's average when no site adds noise (``a_kc`` constant) and, under noise,
leans on the sites that hold the class. Its noise variance per coordinate is
``sum_k a_kc^2 sigma_k^2 / (sum_k a_kc n_kc)^2``; on the MNIST scenario (10 sites,
Dirichlet 0.5) 1.3-3.9 times smaller than FedAvg's, 2.5 on average. The counts in the
weights are the released noisy ones (clipped at 0), so the whole combination is
post-processing of what the sites published: no privacy cost.
"""

from __future__ import annotations

import torch
from torch import Tensor


def precision_weighted_release(sums: Tensor, noise_multipliers: Tensor, total_examples: float,
                               count_weight: float) -> tuple[Tensor, float]:
    """The federation's statistic from the sites' noisy class sums (module docstring).

    Args:
        sums: ``[K, C, F + 1]``, site ``k``'s noisy per-class sums, the count feature last.
        noise_multipliers: ``[K]``, the sigma each site's ledger recorded for the release.
        total_examples: ``N``, the records behind all the sums.
        count_weight: ``w``, the constant feature of every record's vector.

    Returns:
        ``[C, F + 1]`` in the layout of FedAvg's average (``p_c mu_c`` then ``w p_c``, with
        ``p_c`` the noisy class share), and the per-coordinate variance of its feature
        noise, averaged over the ``C x F`` feature coordinates.
    """
    sums = sums.double()
    sigma2 = noise_multipliers.double().reshape(-1, 1) ** 2
    features = sums.shape[-1] - 1
    counts = (sums[..., -1] / count_weight).clamp_min(0.0)  # [K, C], noisy
    record_variance = (1.0 - count_weight ** 2) / features
    weights = counts / (sigma2 + counts * record_variance).clamp_min(torch.finfo(torch.float64).tiny)
    weighted_count = (weights * counts).sum(0).clamp_min(1e-12)  # [C]
    means = (weights.unsqueeze(-1) * sums[..., :-1]).sum(0) / weighted_count.unsqueeze(-1)
    count_feature = sums[..., -1].sum(0) / total_examples  # [C]: w p_c, FedAvg's average of the count feature
    class_share = (count_feature / count_weight).clamp_min(0.0)
    release = torch.cat([class_share.unsqueeze(-1) * means, count_feature.unsqueeze(-1)], -1)
    mean_variance = (weights ** 2 * sigma2).sum(0) / weighted_count ** 2  # [C]
    return release.float(), float((class_share ** 2 * mean_variance).mean())
