"""Family-specific tests for the GAN, flow and diffusion models (the cross-family contract
lives in test_model_contract.py).

The DP tests compare Opacus' clipped, summed per-example gradients (noise 0, SGD lr 0,
``grad * expected_batch_size``) with the slow micro-batch-of-one reference. The losses draw
randomness (z, t, eps, dequantisation noise, label dropout); :class:`RandomReplay` records
the draws of the batched call and hands row i of each to example i's micro-batch, so both
sides see identical randomness.
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch

from fedgen.privacy.dp_sgd import DPSettings, PrivateStepOptimizer, clipped_gradient_reference
from fedgen.shared_models import Batch, build_model
from fedgen.shared_models.diffusion import beta_schedule
from fedgen.shared_models.layers import SpectralNormConv2d, SpectralNormLinear

torch.set_num_threads(1)
# Opacus' hooks on a first layer whose input needs no gradient: harmless
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

B = 6
MAX_GRAD_NORM = 0.5


class RandomReplay:
    """Record the tensors ``torch.randn/rand/randint/*_like`` return inside a batched loss
    call, then replay them: row ``i`` of each draw for example ``i``'s micro-batch of one, or
    the whole draw again for a second batched call."""

    NAMES = ("randn", "rand", "randint", "randn_like", "rand_like")

    def __init__(self) -> None:
        self.draws: list[torch.Tensor] = []

    @contextlib.contextmanager
    def _patched(self, make):
        originals = {name: getattr(torch, name) for name in self.NAMES}
        try:
            for name, fn in originals.items():
                setattr(torch, name, make(fn))
            yield
        finally:
            for name, fn in originals.items():
                setattr(torch, name, fn)

    def record(self):
        self.draws = []

        def make(fn):
            def draw(*args, **kwargs):
                out = fn(*args, **kwargs)
                self.draws.append(out)
                return out
            return draw

        return self._patched(make)

    def replay(self, row: int | None = None):
        """Replay the recorded draws: the whole tensors (``row=None``) or one row of each."""
        recorded = iter(self.draws)

        def make(fn):
            def draw(*args, **kwargs):
                fresh, old = fn(*args, **kwargs), next(recorded)
                if row is None:
                    assert fresh.shape == old.shape
                    return old.clone()
                assert fresh.shape[0] == 1 and fresh.shape[1:] == old.shape[1:], (fresh.shape, old.shape)
                return old[row:row + 1].clone()
            return draw

        return self._patched(make)


def private_step(model):
    (step,) = [s for s in model.steps() if s.private][:1]
    return step


def make_batch(shape, num_classes, n=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g) if num_classes else None
    return x, y


def reference_gradient(model, x, y, replay: RandomReplay):
    """Micro-batches of one: each example's gradient clipped, then summed."""
    model = copy.deepcopy(model)
    step = private_step(model)
    with replay.record():
        losses = step.loss(Batch.of(x, y))

    def loss_of(i):
        with replay.replay(i):
            return step.loss(Batch.of(x[i:i + 1], None if y is None else y[i:i + 1]))[0]

    return losses, clipped_gradient_reference(step.module, loss_of, x.shape[0], MAX_GRAD_NORM)


def dp_gradient(model, x, y, replay: RandomReplay, mode: str):
    """Opacus' clipped per-example gradient sum; also the per-sample gradient row counts."""
    model = copy.deepcopy(model)
    step = private_step(model)
    n = x.shape[0]
    opt = PrivateStepOptimizer(step.module, torch.optim.SGD(step.module.parameters(), lr=0.0), settings=DPSettings(
        noise_multiplier=0.0, max_grad_norm=MAX_GRAD_NORM, expected_batch_size=n, grad_sample_mode=mode))
    opt.zero_grad()
    with replay.replay():
        losses = step.loss(Batch.of(x, y))
    opt.backward(losses)
    params = [p for p in step.module.parameters() if p.requires_grad]
    rows = {p.grad_sample.shape[0] for p in params if getattr(p, "grad_sample", None) is not None}
    opt.step()
    grads = [p.grad.detach().clone() * n for p in params]
    opt.close()
    return grads, rows


TINY = {
    "gan-conv": ("gan", (1, 8, 8), 3, dict(architecture="conv", hidden=4, latent_dim=4)),
    "gan-conv-sn-hinge": ("gan", (1, 8, 8), None, dict(architecture="conv", hidden=4, latent_dim=4,
                                                       spectral_norm=True, loss="hinge")),
    "gan-mlp-lsgan": ("gan", (5,), 3, dict(hidden=8, latent_dim=4, loss="lsgan")),
    "gan-mlp-sn-wgan": ("gan", (5,), 3, dict(hidden=8, latent_dim=4, spectral_norm=True, loss="wgan")),
    "flow-conv": ("flow", (1, 8, 8), 3, dict(architecture="conv", hidden=4, blocks=1, coupling_layers=2)),
    "flow-mlp": ("flow", (5,), 3, dict(hidden=8, blocks=1, coupling_layers=4)),
    "diffusion-unet-k4": ("diffusion", (1, 8, 8), 3, dict(hidden=4, noise_multiplicity=4, timesteps=50)),
    "diffusion-mlp": ("diffusion", (5,), 3, dict(hidden=8, depth=1, timesteps=50, label_dropout=0.5)),
    "diffusion-mlp-k4": ("diffusion", (5,), 3, dict(hidden=8, depth=1, timesteps=50, noise_multiplicity=4,
                                                    label_dropout=0.5)),
}


def tiny(key, **over):
    name, shape, k, cfg = TINY[key]
    torch.manual_seed(0)
    return build_model(name, data_shape=shape, num_classes=k, **{**cfg, **over}), shape, k


@pytest.mark.parametrize("key", list(TINY))
def test_dp_clipped_gradient_matches_micro_batch_reference(key):
    model, shape, k = tiny(key)
    x, y = make_batch(shape, k)
    replay = RandomReplay()
    losses, ref = reference_gradient(model, x, y, replay)
    assert losses.shape == (B,)
    results = {}
    for mode in dict.fromkeys([model.grad_sample_mode, "hooks"]):
        grads, rows = dp_gradient(model, x, y, replay, mode)
        if mode == "hooks":  # one per-sample gradient row per example, however often a layer ran
            assert rows == {B}, f"{mode}: per-sample rows {rows}"
        for g, r in zip(grads, ref):
            assert torch.allclose(g, r, atol=1e-5), f"{mode}: max diff {(g - r).abs().max():.2e}"
        results[mode] = grads
    for grads in results.values():
        for g, h in zip(grads, results["hooks"]):
            assert torch.allclose(g, h, atol=1e-5)


def test_reference_would_catch_examples_that_interact():
    """Sanity check of the harness: a loss that mixes examples fails the comparison."""
    model, shape, k = tiny("flow-mlp")
    step = private_step(model)
    x, y = make_batch(shape, k)

    def mixed(batch):  # inputs shifted towards the batch mean (BatchNorm-like): not per-example
        return step.loss(Batch.of(0.5 * batch.x + 0.5 * batch.x.mean(0, keepdim=True), batch.y))

    ref_replay = RandomReplay()
    with ref_replay.record():
        mixed(Batch.of(x, y))
    def loss_of(i):
        with ref_replay.replay(i):
            return mixed(Batch.of(x[i:i + 1], y[i:i + 1]))[0]
    ref = clipped_gradient_reference(step.module, loss_of, B, MAX_GRAD_NORM)
    opt = PrivateStepOptimizer(step.module, torch.optim.SGD(step.module.parameters(), lr=0.0), settings=DPSettings(
        noise_multiplier=0.0, max_grad_norm=MAX_GRAD_NORM, expected_batch_size=B, grad_sample_mode="hooks"))
    opt.zero_grad()
    with ref_replay.replay():
        opt.backward(mixed(Batch.of(x, y)))
    opt.step()
    dp = [p.grad * B for p in step.module.parameters()]
    opt.close()
    assert not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(dp, ref))


# -- GAN -------------------------------------------------------------------------------


def test_gan_steps_ttur_and_privacy_flags():
    model = build_model("gan", data_shape=(5,), num_classes=None, hidden=8, d_steps_per_g_step=3, lr_d=4e-4, lr_g=1e-4)
    steps = model.steps()
    assert [s.name for s in steps] == ["discriminator"] * 3 + ["generator"]
    assert [s.private for s in steps] == [True, True, True, False]
    assert steps[0].module is model.discriminator and steps[-1].module is model.generator
    assert (steps[0].lr, steps[-1].lr) == (4e-4, 1e-4)
    assert steps[0].betas == steps[-1].betas == (0.5, 0.999)


@pytest.mark.parametrize("loss", ["ns", "hinge", "lsgan", "wgan", "wgan-gp"])
def test_gan_losses_per_example_and_generator_never_sees_data(loss):
    model, shape, k = tiny("gan-conv", loss=loss, mode_seeking=1.0)
    x, y = make_batch(shape, k)
    d_step, g_step = model.steps()
    d = d_step.loss(Batch.of(x, y))
    g = g_step.loss(Batch(x=None, y=None, size=7))
    assert d.shape == (B,) and g.shape == (7,)
    assert torch.isfinite(d).all() and torch.isfinite(g).all()
    (d.mean() + g.mean()).backward()  # wgan-gp's penalty is differentiable without DP
    assert all(p.grad is not None for p in model.generator.parameters())


def test_wgan_gp_refused_under_dp_with_a_reason():
    model, _, _ = tiny("gan-conv", loss="wgan-gp")
    with pytest.raises(ValueError, match="spectral_norm") as err:
        model.check_dp_compatible()
    assert "#31" in str(err.value) and "second order" in str(err.value)
    for key in ("gan-conv", "gan-mlp-sn-wgan", "flow-mlp", "diffusion-mlp"):
        tiny(key)[0].check_dp_compatible()  # every other configuration is fine


def test_spectral_norm_estimates_top_singular_value():
    torch.manual_seed(0)
    for layer in (SpectralNormLinear(7, 5), SpectralNormConv2d(3, 4, 3, padding=1)):
        for _ in range(50):
            layer.power_iteration()
        true = torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2)
        assert torch.isclose(layer.sigma().detach(), true, rtol=1e-3)
        assert torch.isclose(torch.linalg.matrix_norm(layer.normalized_weight().detach().flatten(1), ord=2),
                             torch.tensor(1.0), rtol=1e-3)
        assert not layer.u.requires_grad and list(layer.buffers()) == []


# -- flow ------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["flow-conv", "flow-mlp"])
def test_flow_is_invertible_and_likelihood_finite(key):
    model, shape, k = tiny(key)
    with torch.no_grad():  # perturb the zero-initialised output layers: a non-trivial bijection
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, y = make_batch(shape, k)
    x = x.clamp(0.01, 0.99)
    z, logdet = model.to_latent(x, y)
    assert z.shape == x.shape and logdet.shape == (B,)
    assert torch.allclose(model.from_latent(z, y), x, atol=1e-4)
    ll = model.log_likelihood(x, y)
    assert ll.shape == (B,) and torch.isfinite(ll).all()
    d = math.prod(shape)
    bpd = -ll / (d * math.log(2))
    assert torch.isfinite(bpd).all()


def test_flow_discrete_probabilities_sum_to_at_most_one():
    """log_likelihood is the dequantisation bound on log P(discrete x): summed over every
    point of a 3-level grid in 2-D, exp(E_u ll) <= E_u p / L^D integrates to <= 1 (Jensen),
    and the bound is not loose by the bin volume (which a missing -D log L would give)."""
    torch.manual_seed(0)
    model = build_model("flow", data_shape=(2,), levels=3, coupling_layers=4, hidden=16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    grid = torch.cartesian_prod(torch.arange(3.0), torch.arange(3.0)) / 2  # the 9 points of {0, .5, 1}^2
    ll = torch.stack([model.log_likelihood(grid) for _ in range(2000)]).mean(0)
    total = float(ll.exp().sum())
    assert 0.3 < total <= 1.0


def test_flow_prior_starts_standard_normal_and_temperature_scales_it():
    """The learned class-conditional base (Glow) is N(0, I) at initialisation; once it has
    moved, sampling at temperature -> 0 returns the flow's image of the class mean."""
    torch.manual_seed(0)
    model = build_model("flow", data_shape=(6,), num_classes=3, coupling_layers=2, hidden=8)
    z, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    cond = torch.nn.functional.one_hot(y, 3).float()
    standard = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    assert torch.allclose(model.prior.log_prob(z, cond), standard, atol=1e-5)
    with torch.no_grad():
        model.prior.net.weight.normal_()
    mu, _ = model.prior(cond)
    assert not torch.allclose(mu[0], mu[1])
    x = model.sample(5, y, temperature=1e-6)
    assert torch.allclose(x, model.from_latent(mu, y).clamp(0.0, 1.0), atol=1e-4)
    with pytest.raises(ValueError, match="temperature"):
        build_model("flow", data_shape=(6,), temperature=0.0)


def test_flow_log_likelihood_jacobian_matches_autograd():
    """log|det dz/dx| from the couplings + logit equals the autograd Jacobian's."""
    model, shape, k = tiny("flow-mlp")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.rand(*shape).clamp(0.05, 0.95)
    y = torch.tensor([1])
    jac = torch.autograd.functional.jacobian(lambda v: model.to_latent(v[None], y)[0][0], x)
    _, logdet = model.to_latent(x[None], y)
    assert torch.isclose(logdet[0], torch.linalg.slogdet(jac)[1], atol=1e-4)


def test_flow_survives_100_noisy_dp_steps():
    model, shape, k = tiny("flow-conv")
    step = private_step(model)
    opt = PrivateStepOptimizer(step.module, torch.optim.Adam(step.module.parameters(), lr=1e-2), settings=DPSettings(
        noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, grad_sample_mode=model.grad_sample_mode))
    for i in range(100):
        x, y = make_batch(shape, k, n=4, seed=i)
        opt.zero_grad()
        losses = step.loss(Batch.of(x, y))
        assert torch.isfinite(losses).all()
        opt.backward(losses)
        opt.step()
    opt.close()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    x, y = make_batch(shape, k)
    assert torch.isfinite(model.log_likelihood(x, y)).all()
    assert torch.isfinite(model.sample(8, temperature=1.0)).all()


# -- diffusion -------------------------------------------------------------------------


def test_diffusion_noise_multiplicity_keeps_one_row_per_example():
    x, y = make_batch((1, 8, 8), 3)
    for k_draws in (1, 4):
        model, _, _ = tiny("diffusion-unet-k4", noise_multiplicity=k_draws)
        replay = RandomReplay()
        with replay.record():
            private_step(model).loss(Batch.of(x, y))
        # K (t, eps, label-dropout) draws, each of B rows -- never B*K rows
        assert len(replay.draws) == 3 * k_draws and {d.shape[0] for d in replay.draws} == {B}
        _, rows = dp_gradient(model, x, y, replay, "hooks")
        assert rows == {B}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_diffusion_schedules(schedule):
    betas = beta_schedule(schedule, 100)
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert betas.shape == (100,) and (betas > 0).all() and (betas < 1).all()
    assert (alpha_bar[1:] < alpha_bar[:-1]).all() and alpha_bar[0] > 0.99 and alpha_bar[-1] < 0.05


def test_diffusion_label_dropout_is_per_example():
    model, shape, k = tiny("diffusion-mlp", label_dropout=0.5)
    seen = []
    model.eps_model = lambda x_t, t, y: (seen.append(y), torch.zeros_like(x_t))[1]
    x, y = make_batch(shape, k, n=64)
    private_step(model).loss(Batch.of(x, y))
    dropped = seen[0].sum(1) == 0
    assert 0 < int(dropped.sum()) < 64  # some rows lost their label, others kept it


# -- sampling --------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["gan-conv", "gan-mlp-lsgan", "flow-conv", "flow-mlp", "diffusion-unet-k4", "diffusion-mlp"])
def test_sample_shape_range_dtype_and_labels(key):
    model, shape, k = tiny(key, **({"sample_steps": 4} if key.startswith("diffusion") else {}))
    s = model.sample(5)
    assert s.shape == (5, *shape) and s.dtype == torch.float32
    assert torch.isfinite(s).all() and s.min() >= 0 and s.max() <= 1
    labels = torch.tensor([0, 2, 1, 1, 0])
    assert model.sample(5, labels=labels).shape == (5, *shape)
    with pytest.raises(ValueError):
        model.sample(5, labels=torch.tensor([0, 1]))


def test_sampling_options():
    flow, shape, _ = tiny("flow-mlp")
    assert flow.sample(3, temperature=0.5).shape == (3, *shape)
    diff, shape, _ = tiny("diffusion-mlp", ddim_eta=1.0)
    for scale in (1.0, 3.0):
        s = diff.sample(3, labels=torch.tensor([0, 1, 2]), sample_steps=3, guidance_scale=scale)
        assert s.shape == (3, *shape) and s.min() >= 0 and s.max() <= 1
    uncond = build_model("diffusion", data_shape=(1, 8, 8), hidden=4, timesteps=20, sample_steps=2, schedule="linear")
    assert uncond.sample(2).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("name", ["gan", "flow", "diffusion"])
def test_mnist_shape_builds(name):
    model = build_model(name, data_shape=(1, 28, 28), num_classes=10, hidden=4)
    x, y = make_batch((1, 28, 28), 10, n=2)
    assert private_step(model).loss(Batch.of(x, y)).shape == (2,)


def test_bad_options_explain_themselves():
    with pytest.raises(ValueError, match="loss"):
        build_model("gan", data_shape=(5,), loss="nope")
    with pytest.raises(ValueError, match="divisible by 4"):
        build_model("gan", data_shape=(1, 6, 6), architecture="conv")
    with pytest.raises(ValueError, match="schedule"):
        build_model("diffusion", data_shape=(5,), schedule="quadratic")
    with pytest.raises(ValueError, match="noise_multiplicity"):
        build_model("diffusion", data_shape=(5,), noise_multiplicity=0)


def test_flow_release_warm_start_releases_once_then_trains_by_dp_sgd_within_the_target(digits):
    """The flow's old hybrid (base_release_epsilon) is the shared warm_start.release: one
    Gaussian release at its share, then DP-SGD with sigma composed to the target."""
    from fedgen.client.training import new_site_ledger, run_local_round
    from fedgen.contract.task import PrivacyConfig, TrainingConfig
    from fedgen.privacy.accounting import calibrate_after, calibrate_noise_multiplier, epsilon_of
    from fedgen.shared_models.warm_start import with_release_warm_start
    data = digits.subset(range(400))
    training = TrainingConfig(local_steps=5, batch_size=64, lr=1e-3)

    torch.manual_seed(0)
    model = with_release_warm_start(build_model("flow", data_shape=digits.shape, num_classes=10, levels=17, hidden=16),
                                    release_epsilon=1.0, num_features=200, generator_steps=5, samples=50, steps=2)
    assert model.wants_release() and model.release_epsilon == 1.0
    privacy = PrivacyConfig(enabled=True, target_epsilon=3.0, delta=1e-5, max_grad_norm=1.0, accountant="prv",
                            planned_rounds=3)
    ledger = new_site_ledger("0", privacy)
    first = run_local_round(model, data, training=training, privacy=privacy, ledger=ledger, server_round=1, seed=0)
    sigma_release = calibrate_noise_multiplier(target_epsilon=1.0, delta=1e-5, sample_rate=1.0, steps=1, accountant="prv")
    assert first.status == "trained" and ledger.accountant_history() == [(sigma_release, 1.0, 1)]
    assert ledger.noise_multiplier is None and ledger.epsilon <= 1.0  # the DP-SGD sigma is not set by the release
    assert not model.wants_release()
    for rnd in (2, 3):
        res = run_local_round(model, data, training=training, privacy=privacy, ledger=ledger, server_round=rnd, seed=rnd)
        assert res.status == "trained" and res.dp_steps == 5
    q = 64 / len(data)
    assert ledger.noise_multiplier == calibrate_after([(sigma_release, 1.0, 1)], target_epsilon=3.0, delta=1e-5,
                                                      sample_rate=q, steps=2 * 5, accountant="prv")
    assert ledger.epsilon == pytest.approx(epsilon_of(ledger.accountant_history(), delta=1e-5, accountant="prv"))
    assert 2.9 <= ledger.epsilon <= 3.0  # the release and the 10 DP-SGD steps compose to the target


def test_flow_base_release_epsilon_is_refused_with_the_warm_start_that_replaces_it():
    from fedgen.contract.scenario import ScenarioError, scenario_from_dict
    with pytest.raises(ScenarioError) as err:
        scenario_from_dict({"model": {"family": "flow", "levels": 17, "base_release_epsilon": 4.0}}, source="s.yaml")
    text = str(err.value)
    assert "\n" not in text and "model: base_release_epsilon: the flow's release became the warm start" in text
    assert "warm_start: {release: {epsilon_fraction: F}} with F = 4 / privacy.target_epsilon" in text
    with pytest.raises(TypeError):
        build_model("flow", data_shape=(1, 8, 8), base_release_epsilon=4.0)
