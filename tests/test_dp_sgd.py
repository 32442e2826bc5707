"""DP-SGD correctness against slow references: clipped gradients, per-example clipping
bound, accountant steps == Poisson batches, noise scale."""

from __future__ import annotations

import pytest
import torch

import fedgen.privacy.book_keeping as book_keeping
import fedgen.privacy.dp_sgd as dp_sgd
from fedgen.client.training import new_site_ledger, run_local_round
from fedgen.contract.task import PrivacyConfig, TrainingConfig
from fedgen.privacy.dp_sgd import DPSettings, PrivateStepOptimizer, clipped_gradient_reference
from fedgen.shared_models import Batch, build_model

_RANDN_LIKE = torch.randn_like


@pytest.fixture(autouse=True)
def deterministic_vae(monkeypatch, request):
    """The VAE's reparameterisation draws noise; fix it so batched and per-example losses
    agree. This patches ``torch.randn_like`` itself (the VAE module calls it through
    ``torch``), so tests of other families opt out with ``@pytest.mark.real_noise``:
    zeroed draws would make a diffusion model's gradients vanish."""
    if request.node.get_closest_marker("real_noise") is None:
        monkeypatch.setattr(torch, "randn_like", lambda t, **k: torch.zeros_like(t))


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


@pytest.mark.parametrize("mode", ["bk", "ghost", "hooks"])
def test_noise_has_the_calibrated_standard_deviation(digits, mode):
    """With a zero-loss batch the update is pure noise: std must be sigma * C / (qN)."""
    model = build_model("vae", data_shape=digits.shape, num_classes=10, hidden=128)
    step = model.steps()[0]
    sigma, clip, expected_batch = 2.0, 0.5, 10.0
    opt = PrivateStepOptimizer(step.module, torch.optim.SGD(step.module.parameters(), lr=0.0),
                               settings=DPSettings(noise_multiplier=sigma, max_grad_norm=clip,
                                                   expected_batch_size=expected_batch, grad_sample_mode=mode))
    opt.zero_grad()
    opt.backward(step.loss(Batch.of(digits.x[:4], digits.y[:4])) * 0.0)
    opt.step()
    noise = torch.cat([p.grad.flatten() for p in step.module.parameters()])
    assert noise.numel() > 10_000
    assert noise.std().item() == pytest.approx(sigma * clip / expected_batch, rel=0.03)
    opt.close()
    opt.close()


def test_accountant_steps_equal_poisson_batches_taken(digits, monkeypatch):
    calls = []
    real = dp_sgd.poisson_sample

    def counting(n, q, generator):
        idx = real(n, q, generator)
        calls.append(len(idx))
        return idx

    import fedgen.client.training as training
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


@pytest.mark.parametrize("mode", ["bk", "ghost", "hooks"])
def test_empty_poisson_batch_still_adds_noise(digits, mode):
    model = build_model("vae", data_shape=digits.shape, num_classes=10, hidden=16)
    step = model.steps()[0]
    before = [p.detach().clone() for p in model.parameters()]
    opt = PrivateStepOptimizer(step.module, torch.optim.SGD(step.module.parameters(), lr=1.0),
                               settings=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0,
                                                   expected_batch_size=5, grad_sample_mode=mode))
    for n in (0, 4, 0):  # empty, a real batch, empty again
        opt.zero_grad()
        # The training loop runs no forward pass on an empty batch. bk also survives one
        # (the hooks drop what it recorded); Opacus' modes do not, so they are not asked to.
        ran_forward = n > 0 or mode == "bk"
        opt.backward(step.loss(Batch.of(digits.x[:n], digits.y[:n])) if ran_forward else torch.zeros(0))
        opt.step()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    if mode == "bk":
        assert not any(r.outputs for r in opt.gsm.records.values())
    opt.close()
    if mode == "bk":
        assert not any(m._forward_hooks for m in model.modules())


def test_batchnorm_is_refused_with_a_fix(digits):
    from fedgen.privacy.errors import PrivacyConfigError

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    with pytest.raises(PrivacyConfigError, match="GroupNorm"):
        PrivateStepOptimizer(net, torch.optim.SGD(net.parameters(), lr=0.1),
                             settings=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4))


# -- Book-Keeping ("bk", privacy/book_keeping.py) ---------------------------------------


class _Twice(torch.nn.Module):
    """A layer applied twice per example (as a GAN discriminator on real and fake): the
    per-example gradient is the sum of both uses' contributions."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))

    def forward(self, x):
        return (self.net(x) - self.net(x.flip(1) ** 2)).squeeze(1) ** 2


class _Sequence(torch.nn.Module):
    """Linear layers on ``[B, T, d]`` sequences: ghost norm (2T^2 < d_in d_out) and a
    materialised one (``small``: 2T^2 >= d_in d_out)."""

    def __init__(self) -> None:
        super().__init__()
        self.big = torch.nn.Linear(5, 6)
        self.small = torch.nn.Linear(6, 2)

    def forward(self, x):  # x [B, 3, 5]
        return self.small(torch.tanh(self.big(x))).pow(2).sum((1, 2))


class _ConvNet(torch.nn.Module):
    """Conv2d (materialised: T = 64 positions, d_in d_out = 36) + GroupNorm + a stride-4 conv
    and a 1x1 conv (ghost: T = 4) + Linear; string and integer paddings."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 4, 3, padding="same")
        self.norm = torch.nn.GroupNorm(2, 4)
        self.c2 = torch.nn.Conv2d(4, 8, 3, stride=4, padding=1)
        self.c3 = torch.nn.Conv2d(8, 8, 1, padding="valid")
        self.head = torch.nn.Linear(8 * 2 * 2, 1)

    def forward(self, x):  # x [B, 1, 8, 8]
        h = torch.nn.functional.silu(self.norm(self.c1(x)))
        h = self.c3(torch.tanh(self.c2(h)))
        return self.head(torch.tanh(h).flatten(1)).squeeze(1) ** 2


@pytest.mark.parametrize("conv", [
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=1),
    dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1),
    dict(in_channels=2, out_channels=4, kernel_size=(3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 1)),
    dict(in_channels=2, out_channels=4, kernel_size=3, padding="same"),
    dict(in_channels=2, out_channels=4, kernel_size=1),
], ids=["pad1", "stride2", "asymmetric-dilated", "same", "1x1"])
def test_bk_patch_gram_from_pixels_equals_im2col(conv):
    """The ghost norm's patch Gram matrix from the pixel Gram (no unfolding) is the Gram of
    the unfolded patches, across two uses of the layer (cross terms included)."""
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(**conv)
    uses = [torch.randn(3, layer.in_channels, 7, 6) for _ in range(2)]
    patches = torch.cat([book_keeping._unfold(layer, x) for x in uses], dim=1)
    torch.testing.assert_close(book_keeping._patch_gram(layer, uses), patches @ patches.transpose(1, 2),
                               rtol=1e-5, atol=1e-4)


def _bk_case(name):
    torch.manual_seed(0)
    if name == "mlp":
        nn = torch.nn
        net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 1))
        x = torch.randn(8, 6)
        return net, x, lambda xb: net(xb).squeeze(1) ** 2
    if name == "conv":
        net = _ConvNet()
        return net, torch.randn(8, 1, 8, 8), net
    if name == "twice":
        net = _Twice()
        return net, torch.randn(8, 5), net
    net = _Sequence()
    return net, torch.randn(8, 3, 5), net


def _assert_grads_close(got, want, rel=1e-5):
    """Equal up to float32 rounding relative to the gradient's scale (a parameter whose exact
    gradient is 0, e.g. a conv bias before GroupNorm, gets rounding noise of that scale)."""
    scale = max(float(w.abs().max()) for w in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rel, atol=rel * scale)


def _per_example_norms(module, loss_of, n):
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.stack([torch.sqrt(sum((g ** 2).sum() for g in torch.autograd.grad(loss_of(i), params)))
                        for i in range(n)])


@pytest.mark.parametrize("case", ["mlp", "conv", "twice", "sequence"])
def test_bk_clipped_gradients_match_microbatch_reference(case):
    net, x, losses_fn = _bk_case(case)
    n = len(x)
    loss_of = lambda i: losses_fn(x[i:i + 1])[0]  # noqa: E731
    norms = _per_example_norms(net, loss_of, n)
    clip = float(norms.median())
    assert (norms > clip * 1.01).any() and (norms < clip * 0.99).any()  # some clipped, some not
    ref = clipped_gradient_reference(net, loss_of, n, clip)
    opt = PrivateStepOptimizer(net, torch.optim.SGD(net.parameters(), lr=0.0), settings=DPSettings(
        noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=n, grad_sample_mode="bk"))
    opt.zero_grad()
    opt.backward(losses_fn(x))
    torch.testing.assert_close(opt.gsm.per_sample_norms, norms, rtol=1e-5, atol=1e-7)
    opt.step()
    got = [p.grad * n for p in net.parameters()]
    opt.close()
    _assert_grads_close(got, ref)


FAMILIES = {
    "vae-mlp": ("vae", dict(hidden=8)),
    "vae-conv": ("vae", dict(hidden=4, architecture="conv")),
    "flow-mlp": ("flow", dict(hidden=8, coupling_layers=2, blocks=1)),
    "flow-conv": ("flow", dict(hidden=4, coupling_layers=1, blocks=1, architecture="conv")),
    "diffusion-unet-k2": ("diffusion", dict(hidden=4, timesteps=50, noise_multiplicity=2)),
    "diffusion-mlp": ("diffusion", dict(hidden=8, depth=1, timesteps=50, architecture="mlp")),
    "gan-conv": ("gan", dict(hidden=4, latent_dim=4, architecture="conv")),
    "gan-mlp": ("gan", dict(hidden=8, latent_dim=4, architecture="mlp")),
}


def _bk_norms(step, x, y):
    """Per-example gradient norms as bk computes them (unclipped: C = inf)."""
    opt = PrivateStepOptimizer(step.module, torch.optim.SGD(step.module.parameters(), lr=0.0), settings=DPSettings(
        noise_multiplier=0.0, max_grad_norm=float("inf"), expected_batch_size=len(x), grad_sample_mode="bk"))
    opt.backward(step.loss(Batch.of(x, y)))
    norms = opt.gsm.per_sample_norms
    opt.close()
    return norms


@pytest.mark.parametrize("key", list(FAMILIES))
def test_bk_matches_hooks_on_model_families(digits, key, monkeypatch):
    family, cfg = FAMILIES[key]
    if family != "vae":  # diffusion's eps draws must not be zeroed by the VAE fixture
        monkeypatch.setattr(torch, "randn_like", _RANDN_LIKE)  # (per parameter: a marker would cover the VAE too)
    torch.manual_seed(0)
    model = build_model(family, data_shape=(1, 8, 8), num_classes=10, **cfg)
    step = next(s for s in model.steps() if s.private)
    x, y = digits.x[:6], digits.y[:6]
    torch.manual_seed(1)
    norms = _bk_norms(step, x, y)
    clip = float(norms.median())
    assert (norms > clip * 1.01).any() and (norms < clip * 0.99).any()  # some clipped, some not
    results = {}
    for mode in ("hooks", "bk"):
        torch.manual_seed(1)  # the same draws (z, t, eps, dequantisation, label dropout) in both modes
        results[mode] = _summed_clipped(model, step, x, y, mode, clip)
    _assert_grads_close(results["bk"], results["hooks"])


def test_bk_refuses_layers_without_a_rule_by_name():
    from fedgen.privacy.errors import PrivacyConfigError

    model = build_model("gan", data_shape=(1, 8, 8), num_classes=10, hidden=4, latent_dim=4, spectral_norm=True)
    d = model.discriminator
    with pytest.raises(PrivacyConfigError, match="SpectralNormConv2d.*'hooks' or 'ghost'"):
        PrivateStepOptimizer(d, torch.optim.SGD(d.parameters(), lr=0.1), settings=DPSettings(
            noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, grad_sample_mode="bk"))
    tied = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    for net, match in [(torch.nn.Conv2d(4, 4, 3, groups=2), "groups=1"), (tied, "shared between layers")]:
        with pytest.raises(PrivacyConfigError, match=match):
            PrivateStepOptimizer(net, torch.optim.SGD(net.parameters(), lr=0.1), settings=DPSettings(
                noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, grad_sample_mode="bk"))


def test_bk_paused_hooks_record_nothing(digits):
    model = build_model("gan", data_shape=digits.shape, num_classes=10, hidden=4, latent_dim=4, architecture="conv")
    d_step, g_step = model.steps()
    opt = PrivateStepOptimizer(d_step.module, torch.optim.SGD(d_step.module.parameters(), lr=0.0),
                               settings=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0,
                                                   expected_batch_size=4, grad_sample_mode="bk"))
    with dp_sgd.paused_hooks([opt]):
        g_step.loss(Batch(x=None, y=None, size=4)).mean().backward()  # through D, not private
    assert not any(r.outputs for r in opt.gsm.records.values())
    d_step.loss(Batch.of(digits.x[:4], digits.y[:4]))
    assert all(len(r.outputs) == 2 for r in opt.gsm.records.values())  # D ran on real and fake
    opt.close()


@pytest.mark.real_noise
@pytest.mark.parametrize("family", ["gan", "diffusion"])
def test_bk_local_round_trains(digits, family):
    data = digits.subset(range(64))
    privacy = PrivacyConfig(enabled=True, target_epsilon=50.0, delta=1e-5, max_grad_norm=1.0,
                            grad_sample_mode="bk", planned_rounds=1)
    cfg = dict(hidden=4, latent_dim=4) if family == "gan" else dict(hidden=4, timesteps=50, noise_multiplicity=2)
    model = build_model(family, data_shape=data.shape, num_classes=10, **cfg)
    result = run_local_round(model, data, training=TrainingConfig(local_steps=3, batch_size=8, lr=1e-3),
                             privacy=privacy, ledger=new_site_ledger("0", privacy), server_round=1, seed=0)
    assert result.status == "trained" and result.dp_steps == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())
