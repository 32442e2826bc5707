"""An MLP denoiser narrower than the data predicts the clean data, not the noise
(shared_models/diffusion.py, ``prediction``): the noise fills every dimension and cannot
pass a narrow layer, which left diffusion-mnist's MLP at a loss of 0.69 and chance TSTR."""

from __future__ import annotations

import pytest
import torch

from fedgen.shared_models import build_model
from fedgen.shared_models.layers import one_hot
from fedgen.shared_models.warm_start import pretrain


def _prototypes(n: int = 512, dim: int = 64, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    protos = (torch.rand(classes, dim, generator=g) > 0.7).float()
    y = torch.arange(n) % classes
    return (protos[y] + 0.02 * torch.randn(n, dim, generator=g)).clamp(0, 1), y


@torch.no_grad()
def _noise_error(model, x, y, t_value: int) -> float:
    """Mean squared error of the model's noise prediction at one t (the eps-space loss)."""
    torch.manual_seed(1)
    x0, t = x * 2 - 1, torch.full((len(x),), t_value)
    eps = torch.randn_like(x0)
    a = model.alpha_bar[t].view(-1, 1)
    pred = model.eps_model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, one_hot(y, 4, len(x), x.device))
    return float((pred - eps).pow(2).mean())


def test_a_narrow_mlp_predicts_x0_and_learns_the_noise():
    x, y = _prototypes()
    torch.manual_seed(0)
    model = build_model("diffusion", data_shape=(64,), num_classes=4, architecture="mlp", hidden=16, depth=2,
                        timesteps=100)
    assert model.prediction == "x0"  # auto: 16 < 64
    pretrain(model, x, y, steps=300, batch_size=64, lr=2e-3, seed=0)
    errors = [_noise_error(model, x, y, t) for t in (10, 50, 99)]
    # the eps parameterisation through a 16-wide layer cannot go below ~1 - 16/64 = 0.75 here
    assert max(errors) < 0.3, errors
    s = model.sample(40, torch.arange(40) % 4, sample_steps=20, guidance_scale=1.0)
    protos = torch.stack([x[y == c].mean(0) for c in range(4)])
    nearest = torch.cdist(s, protos).argmin(1)
    assert float((nearest == torch.arange(40) % 4).float().mean()) >= 0.9  # the asked class


def test_prediction_defaults_and_checks():
    assert build_model("diffusion", data_shape=(5,), architecture="mlp", hidden=8).prediction == "eps"
    assert build_model("diffusion", data_shape=(1, 8, 8), architecture="unet", hidden=8).prediction == "eps"
    assert build_model("diffusion", data_shape=(64,), architecture="mlp", hidden=16, prediction="eps").prediction == "eps"
    with pytest.raises(ValueError, match="prediction"):
        build_model("diffusion", data_shape=(5,), prediction="v")
