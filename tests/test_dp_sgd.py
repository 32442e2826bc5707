"""DP-SGD correctness against slow references: clipped gradients, per-example clipping
bound, accountant steps == Poisson batches, noise scale."""

from __future__ import annotations

import pytest
import torch

import privacy.dp_sgd as dp_sgd
from client.training import PrivacyConfig, TrainingConfig, new_site_ledger, run_local_round
from privacy.dp_sgd import DPSettings, PrivateStepOptimizer, clipped_gradient_reference
from shared_models import Batch, build_model


@pytest.fixture(autouse=True)
def deterministic_vae(monkeypatch):
    """The VAE's reparameterisation draws noise; fix it so batched and per-example losses agree."""
    import shared_models.vae as vae

    monkeypatch.setattr(vae.torch, "randn_like", lambda t, **k: torch.zeros_like(t))


def _summed_clipped(model, step, x, y, mode, clip):
    opt = PrivateStepOptimizer(step.module, torch.optim.SGD(step.module.parameters(), lr=0.0),
                               settings=DPSettings(noise_multiplier=0.0, max_grad_norm=clip,
                                                   expected_batch_size=len(x), grad_sample_mode=mode))
    opt.zero_grad()
    opt.backward(step.loss(Batch.of(x, y)))
    opt.step()
    grads = [p.grad.detach() * len(x) for p in step.module.parameters()]  # undo 1/(qN)
    opt.close()
    return grads


@pytest.mark.parametrize("architecture", ["mlp", "conv"])
@pytest.mark.parametrize("mode", ["ghost", "hooks", "functorch"])
def test_clipped_gradients_match_microbatch_reference(digits, architecture, mode):
    torch.manual_seed(0)
    model = build_model("vae", data_shape=digits.shape, num_classes=10, hidden=8, architecture=architecture)
    step = model.steps()[0]
    x, y = digits.x[:7], digits.y[:7]
    ref = clipped_gradient_reference(model, lambda i: step.loss(Batch.of(x[i:i + 1], y[i:i + 1]))[0], 7, 0.3)
    got = _summed_clipped(model, step, x, y, mode, 0.3)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_per_example_contribution_is_bounded_by_clip_norm(digits):
    model = build_model("vae", data_shape=digits.shape, num_classes=10, hidden=16)
    step = model.steps()[0]
    clip = 0.05  # far below the raw per-example gradient norms
    for i in range(5):
        g = _summed_clipped(model, step, digits.x[i:i + 1], digits.y[i:i + 1], "ghost", clip)
        norm = torch.sqrt(sum((t ** 2).sum() for t in g))
        assert norm <= clip * (1 + 1e-4)
        assert norm >= clip * 0.99  # it was clipped, not zeroed


def test_noise_has_the_calibrated_standard_deviation(digits):
    """With a zero-loss batch the update is pure noise: std must be sigma * C / (qN)."""
    model = build_model("vae", data_shape=digits.shape, num_classes=10, hidden=128)
    step = model.steps()[0]
    sigma, clip, expected_batch = 2.0, 0.5, 10.0
    opt = PrivateStepOptimizer(step.module, torch.optim.SGD(step.module.parameters(), lr=0.0),
                               settings=DPSettings(noise_multiplier=sigma, max_grad_norm=clip,
                                                   expected_batch_size=expected_batch, grad_sample_mode="ghost"))
    opt.zero_grad()
    opt.backward(step.loss(Batch.of(digits.x[:4], digits.y[:4])) * 0.0)
    opt.step()
    noise = torch.cat([p.grad.flatten() for p in step.module.parameters()])
    assert noise.numel() > 10_000
    assert noise.std().item() == pytest.approx(sigma * clip / expected_batch, rel=0.03)
    opt.close()


def test_accountant_steps_equal_poisson_batches_taken(digits, monkeypatch):
    calls = []
    real = dp_sgd.poisson_sample

    def counting(n, q, generator):
        idx = real(n, q, generator)
        calls.append(len(idx))
        return idx

    import client.training as training

    monkeypatch.setattr(training, "poisson_sample", counting)
    data = digits.subset(range(120))
    privacy = PrivacyConfig(enabled=True, target_epsilon=20.0, delta=1e-5, max_grad_norm=1.0, planned_rounds=2)
    ledger = new_site_ledger("0", privacy)
    model = build_model("vae", data_shape=data.shape, num_classes=10, hidden=16)
    for rnd in (1, 2):
        run_local_round(model, data, training=TrainingConfig(local_steps=9, batch_size=16, lr=1e-3),
                        privacy=privacy, ledger=ledger, server_round=rnd, seed=rnd)
    assert len(calls) == 18 == ledger.steps
    assert ledger.sample_rate == pytest.approx(16 / 120)
    # Poisson: batch sizes vary around q*N
    assert len(set(calls)) > 1 and abs(sum(calls) / len(calls) - 16) < 6


def test_empty_poisson_batch_still_adds_noise(digits):
    model = build_model("vae", data_shape=digits.shape, num_classes=10, hidden=16)
    step = model.steps()[0]
    before = [p.detach().clone() for p in model.parameters()]
    opt = PrivateStepOptimizer(step.module, torch.optim.SGD(step.module.parameters(), lr=1.0),
                               settings=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0,
                                                   expected_batch_size=5, grad_sample_mode="ghost"))
    opt.zero_grad()
    opt.backward(step.loss(Batch.of(digits.x[:0], digits.y[:0])))
    opt.step()
    opt.close()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_batchnorm_is_refused_with_a_fix(digits):
    from privacy.errors import PrivacyConfigError

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    with pytest.raises(PrivacyConfigError, match="GroupNorm"):
        PrivateStepOptimizer(net, torch.optim.SGD(net.parameters(), lr=0.1),
                             settings=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4))
