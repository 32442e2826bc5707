"""Combining release families' noisy class sums on the server (shared_models/release.py):
FedAvg's average by default, the inverse-variance (precision) weighting for mmd; the noise
variance each reports is checked against the empirical variance over noise draws."""

from __future__ import annotations

import pytest
import torch

from fedgen.shared_models.registry import build_model
from fedgen.shared_models.release import precision_weighted_release

W = 0.2  # count weight
COUNTS = torch.tensor([[400.0, 3.0], [5.0, 300.0], [200.0, 200.0]])  # [sites, classes]: label skew
SIGMAS = torch.tensor([4.0, 4.0, 2.0])
FEATURES = 50


def _clean_sums(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of records whose class means are ``mu`` (exactly), with the count feature last."""
    mu = torch.randn(2, FEATURES, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    mu = 0.5 * mu / mu.norm(dim=1, keepdim=True)  # ||u|| <= sqrt(1 - w^2)
    sums = torch.cat([COUNTS.double().unsqueeze(-1) * mu, W * COUNTS.double().unsqueeze(-1)], dim=-1)
    return sums, mu


def _noisy(sums: torch.Tensor, draws: int, seed: int = 1) -> torch.Tensor:
    noise = torch.randn(draws, *sums.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return sums + SIGMAS.double().reshape(1, -1, 1, 1) * noise


def test_without_noise_the_precision_weighting_is_fedavgs_average():
    sums, _ = _clean_sums()
    release, variance = precision_weighted_release(sums, torch.zeros(3), float(COUNTS.sum()), W)
    torch.testing.assert_close(release, (sums.sum(0) / COUNTS.sum()).float())
    assert variance == 0.0


def test_precision_weighting_is_unbiased_and_reports_its_noise_variance():
    sums, mu = _clean_sums()
    total = float(COUNTS.sum())
    share = (COUNTS.sum(0) / total).double()
    draws = _noisy(sums, 2000)
    releases, variances = zip(*(precision_weighted_release(d, SIGMAS, total, W) for d in draws))
    releases = torch.stack(releases).double()
    class_means = releases[..., :-1] / share.reshape(1, -1, 1)
    # unbiased up to the noisy counts in the weights: within 3 % of the class norm
    assert (class_means.mean(0) - mu).norm(dim=1).max() < 0.03 * mu.norm(dim=1).min()
    empirical = (releases[..., :-1] - releases[..., :-1].mean(0)).pow(2).mean().item()
    assert empirical == pytest.approx(sum(variances) / len(variances), rel=0.15)
    fedavg = float((SIGMAS.double() ** 2).sum()) / total ** 2
    assert empirical < 0.6 * fedavg  # the skew here makes FedAvg's average at least 1.7x noisier


def test_mmd_combines_by_precision_unless_told_fedavg():
    sums = _noisy(_clean_sums()[0], 1)[0]
    total = float(COUNTS.sum())
    by_precision = build_model("mmd", data_shape=(1, 8, 8), num_classes=2, architecture="mlp", num_features=FEATURES, count_weight=W)
    variance = by_precision.combine_releases(sums, SIGMAS, total)
    expected, expected_variance = precision_weighted_release(sums, SIGMAS, total, W)
    torch.testing.assert_close(by_precision.embedding, expected)
    assert variance == pytest.approx(expected_variance)

    plain = build_model("mmd", data_shape=(1, 8, 8), num_classes=2, architecture="mlp", num_features=FEATURES, count_weight=W,
                        combine="fedavg")
    variance = plain.combine_releases(sums, SIGMAS, total)
    torch.testing.assert_close(plain.embedding, (sums.sum(0) / total).float())
    assert variance == pytest.approx(float((SIGMAS.double() ** 2).sum()) / total ** 2)
    with pytest.raises(ValueError, match="choose 'precision' or 'fedavg'"):
        build_model("mmd", data_shape=(1, 8, 8), num_classes=2, architecture="mlp", num_features=FEATURES, combine="median")
