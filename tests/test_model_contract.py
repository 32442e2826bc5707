"""One contract over every registered family (docs/architecture.md §2): the registry picks a new
family up with no change here."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.grad_sample import GradSampleModule

from fedgen.client.training import new_site_ledger, run_local_round
from fedgen.contract.task import PrivacyConfig, TrainingConfig
from fedgen.privacy.release import GaussianRelease
from fedgen.shared_models import (Batch, DPSGDTrainable, GenerativeModel, Releasing, UnknownModelError, build_model,
                                  list_models)

FAMILIES = list_models()
TINY = {"vae": dict(hidden=32), "gan": dict(hidden=32), "flow": dict(hidden=32), "diffusion": dict(hidden=32),
        "mmd": dict(hidden=32, num_features=200, fit_steps=30)}
# A hybrid (both capabilities) is any DP-SGD family under a release warm start
# (warm_start.release, shared_models/warm_start.py); a pure release family releases as built.
WARM = "vae+release"  # the hybrid the release tests run beside the release families
NO_DP = PrivacyConfig(enabled=False, target_epsilon=1.0, delta=1e-5, max_grad_norm=1.0)


def _capabilities(family: str) -> tuple[bool, bool]:
    """(DP-SGD, release) of a family, read off a small instance (a builder may be a function)."""
    model = build_model(family, data_shape=(1, 8, 8), num_classes=10, **TINY.get(family, {}))
    return isinstance(model, DPSGDTrainable), isinstance(model, Releasing)


CAPABILITIES = {f: _capabilities(f) for f in FAMILIES}
# The contract is per capability: DP-SGD families (steps run by the one loop) and release
# families (one noisy statistic per site, fitted on the server); a hybrid is in both.
SGD_FAMILIES = [f for f in FAMILIES if CAPABILITIES[f][0]]
RELEASE_FAMILIES = [f for f in FAMILIES if CAPABILITIES[f][1]]
PURE_RELEASE_FAMILIES = [f for f in RELEASE_FAMILIES if f not in SGD_FAMILIES]


def _build(family: str, digits, conditional=True, **extra) -> GenerativeModel:
    torch.manual_seed(0)
    return build_model(family, data_shape=digits.shape, num_classes=10 if conditional else None,
                       **{**TINY.get(family, {}), **extra})


def _hybrid(family: str, digits) -> GenerativeModel:
    """``family`` under a release warm start at epsilon 1 (a small head, a short fit)."""
    from fedgen.shared_models.warm_start import with_release_warm_start
    return with_release_warm_start(_build(family, digits), release_epsilon=1.0, num_features=200, generator_steps=5,
                                   samples=50, steps=2)


def _releasing(name: str, digits) -> GenerativeModel:
    return _hybrid("vae", digits) if name == WARM else _build(name, digits)


def _fixed_batch_loss(model: GenerativeModel, x, y) -> float:
    step = next(s for s in model.steps() if s.private)
    torch.manual_seed(123)
    with torch.no_grad():
        return float(step.loss(Batch.of(x, y)).mean())


def test_finding20_every_family_declares_its_capabilities_and_has_no_raising_stubs():
    """A family is a DP-SGD family, a release family or both, by its classes; ``steps`` exists
    exactly on DP-SGD families (mmd's raised NotImplementedError)."""
    assert set(SGD_FAMILIES) | set(RELEASE_FAMILIES) == set(FAMILIES)
    assert {"vae", "gan", "flow", "diffusion"} <= set(SGD_FAMILIES) and "mmd" in RELEASE_FAMILIES
    assert PURE_RELEASE_FAMILIES == ["mmd"]
    for family in FAMILIES:
        model = build_model(family, data_shape=(1, 8, 8), num_classes=10, **TINY[family])
        assert hasattr(model, "steps") == isinstance(model, DPSGDTrainable), family
        assert hasattr(model, "statistic_sum") == isinstance(model, Releasing), family


@pytest.mark.parametrize("family", FAMILIES)
def test_finding20_a_round_is_a_release_exactly_while_the_model_wants_one(family, digits):
    """The loop asks ``wants_release()``; ``training_mode`` (the server's read path) is derived from it."""
    plain = _build(family, digits)
    if family in PURE_RELEASE_FAMILIES:
        assert plain.wants_release() and plain.training_mode == "release" and plain.release_epsilon is None
        plain.set_release(torch.ones_like(getattr(plain, plain.release_buffer)))
        assert plain.wants_release()  # every round asks; the ledger refuses a second release
        return
    assert not plain.wants_release() and plain.training_mode == "sgd" and plain.release_epsilon is None
    if family in SGD_FAMILIES:  # under a release warm start, a hybrid: releases until its release is in, then DP-SGD
        hybrid = _hybrid(family, digits)
        assert hybrid.wants_release() and hybrid.training_mode == "release" and hybrid.release_epsilon is not None
        run_local_round(hybrid, digits.subset(range(100)), training=TrainingConfig(local_steps=1, batch_size=32, lr=1e-3),
                        privacy=NO_DP, ledger=None, server_round=1, seed=0)
        assert not hybrid.wants_release() and hybrid.training_mode == "sgd"


def test_registry_lists_all_four_families():
    assert {"vae", "gan", "flow", "diffusion"} <= set(FAMILIES)
    with pytest.raises(UnknownModelError, match="registered families: .*vae"):
        build_model("nope", data_shape=(1, 8, 8))


@pytest.mark.parametrize("family", SGD_FAMILIES)
def test_protocol_shape(family, digits):
    model = _build(family, digits)
    steps = model.steps()
    assert steps and any(s.private for s in steps)
    x, y = digits.x[:6], digits.y[:6]
    for s in steps:
        assert any(s.module is m for m in model.modules())
        losses = s.loss(Batch.of(x, y) if s.private else Batch(None, None, 6))
        assert losses.shape == (6,) and torch.isfinite(losses).all()


@pytest.mark.parametrize("family", SGD_FAMILIES)
def test_trains_without_dp_and_loss_goes_down(family, digits):
    data = digits.subset(range(400))
    model = _build(family, digits)
    x, y = digits.x[1000:1200], digits.y[1000:1200]
    before = _fixed_batch_loss(model, x, y)
    res = run_local_round(model, data, training=TrainingConfig(local_steps=20, batch_size=32, lr=2e-3),
                          privacy=NO_DP, ledger=None, server_round=1, seed=0)
    assert res.status == "trained" and res.iterations == 20 and res.dp_steps == 0
    assert _fixed_batch_loss(model, x, y) < before


@pytest.mark.parametrize("family", SGD_FAMILIES)
def test_trains_20_dp_steps_and_charges_each(family, digits):
    data = digits.subset(range(300))
    model = _build(family, digits)
    privacy = PrivacyConfig(enabled=True, target_epsilon=10.0, delta=1e-5, max_grad_norm=1.0, planned_rounds=1)
    ledger = new_site_ledger("0", privacy)
    res = run_local_round(model, data, training=TrainingConfig(local_steps=20, batch_size=32, lr=1e-3),
                          privacy=privacy, ledger=ledger, server_round=1, seed=0)
    private_per_iter = sum(s.private for s in model.steps())
    assert res.status == "trained" and res.dp_steps == 20 * private_per_iter == ledger.steps
    assert 0 < ledger.epsilon <= 10.0
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("conditional", [True, False])
def test_sample_shape_dtype_range(family, digits, conditional):
    model = _build(family, digits, conditional=conditional).eval()
    labels = torch.tensor([3, 1, 4, 1, 5]) if conditional else None
    x = model.sample(5, labels)
    assert x.shape == (5, *digits.shape) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    if conditional:
        with pytest.raises(ValueError):
            model.sample(3, torch.tensor([0, 1]))
    else:
        with pytest.raises(ValueError):
            model.sample(2, torch.tensor([0, 1]))


@pytest.mark.parametrize("family", SGD_FAMILIES)
def test_state_dict_round_trips(family, digits):
    a, b = _build(family, digits), build_model(family, data_shape=digits.shape, num_classes=10, **TINY[family])
    b.load_state_dict(a.state_dict())
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert _fixed_batch_loss(a, digits.x[:32], digits.y[:32]) == pytest.approx(
        _fixed_batch_loss(b, digits.x[:32], digits.y[:32]), rel=1e-5)


@pytest.mark.parametrize("family", SGD_FAMILIES)
def test_every_private_parameter_gets_a_per_sample_gradient(family, digits):
    model = _build(family, digits)
    for step in (s for s in model.steps() if s.private):
        gsm = GradSampleModule(step.module, batch_first=True, loss_reduction="mean")
        step.loss(Batch.of(digits.x[:5], digits.y[:5])).mean().backward()
        for name, p in step.module.named_parameters():
            if p.requires_grad:
                assert p.grad_sample is not None, f"{family}: {name} has no per-sample gradient"
                assert p.grad_sample.shape[0] == 5, f"{family}: {name} per-sample rows {p.grad_sample.shape[0]}"
        gsm._close()
        model.zero_grad(set_to_none=True)


ITERATIONS = {"vae": 1500, "gan": 1500, "flow": 1500, "diffusion": 600}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_conditional_sampling_honours_labels(family, digits):
    """A classifier trained on real digits recognises the requested class well above chance."""
    from fedgen.evaluation import ClassifierConfig, fit_classifier

    torch.manual_seed(0)
    model = build_model(family, data_shape=digits.shape, num_classes=10)
    run_local_round(model, digits.subset(range(1400)), privacy=NO_DP, ledger=None, server_round=1, seed=0,
                    training=TrainingConfig(local_steps=ITERATIONS.get(family, 1000), batch_size=64, lr=2e-3))
    model.server_update()  # what the server does after aggregating (fits a release family's generator)
    clf = fit_classifier(digits.x[1400:], digits.y[1400:], 10, config=ClassifierConfig(), seed=0)
    labels = torch.arange(200) % 10
    with torch.no_grad():
        x = model.eval().sample(200, labels)
        accuracy = float((clf(x).argmax(1) == labels).float().mean())
    assert accuracy > 0.5, f"{family}: {accuracy:.2f} of samples classified as the requested label"


# -- release families (one noisy statistic per site, fitted on the server) ---------------

@pytest.mark.parametrize("family", [*RELEASE_FAMILIES, WARM])
def test_every_record_contributes_at_most_unit_norm(family, digits):
    model = _releasing(family, digits)
    for i in range(5):  # a one-record sum is that record's contribution: the sensitivity
        one = model.statistic_sum(digits.x[i:i + 1], digits.y[i:i + 1])
        assert 0.0 < float(one.norm()) <= 1.0 + 1e-5
    if family == "mmd":  # DP-MERF's vectors have norm exactly 1
        assert float(model.statistic_sum(digits.x[:1], digits.y[:1]).norm()) == pytest.approx(1.0, abs=1e-5)
    noise = torch.rand(3, *digits.shape)  # any input in range, not only digits
    assert float(model.statistic_sum(noise, torch.tensor([0, 1, 2])).norm(dim=1).max()) <= 1.0 + 1e-5


def test_multiscale_features_keep_unit_norm_and_see_coarse_structure(digits):
    model = _build("mmd", digits, num_features=300, pool_sizes=[1, 2, 4])
    one = model.statistic_sum(digits.x[:1], digits.y[:1])
    assert float(one.norm()) == pytest.approx(1.0, abs=1e-5)  # sensitivity unchanged by the extra scales
    assert model.features(digits.x[:1]).shape == (1, 300 + 1)
    # the 4x4-pooled block depends on the image only through its pooled means
    x = digits.x[:1].clone()
    moved = x.clone()
    moved[..., :4, :4] = x[..., :4, :4].flip(-1)  # same mean in the top-left 4x4 cell
    coarse = slice(200, 300)
    assert torch.allclose(model.features(x)[:, coarse], model.features(moved)[:, coarse], atol=1e-5)
    assert not torch.allclose(model.features(x)[:, :100], model.features(moved)[:, :100], atol=1e-5)
    with pytest.raises(ValueError, match="pool_sizes"):
        _build("mmd", digits, num_features=300, pool_sizes=[3])


@pytest.mark.parametrize("count_weight", [0.1, 0.5, 0.9])
def test_count_weight_moves_norm_between_counts_and_features(digits, count_weight):
    model = _build("mmd", digits, count_weight=count_weight)
    feats = model.features(digits.x[:4])
    assert torch.allclose(feats.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(feats[:, -1], torch.full((4,), count_weight))
    model.set_release(model.statistic_sum(digits.x[:500], digits.y[:500]) / 500)  # noiseless release
    expected = torch.bincount(digits.y[:500], minlength=10).float() / 500
    assert torch.allclose(model.class_weights(), expected, atol=1e-5)


@pytest.mark.parametrize("family", [*RELEASE_FAMILIES, WARM])
def test_release_is_one_gaussian_step_at_the_releases_epsilon(family, digits):
    data = digits.subset(range(300))
    model = _releasing(family, digits)
    privacy = PrivacyConfig(enabled=True, target_epsilon=2.0, delta=1e-5, max_grad_norm=1.0, accountant="prv",
                            planned_rounds=2)
    ledger = new_site_ledger("0", privacy)
    training = TrainingConfig(local_steps=20, batch_size=32, lr=1e-3)
    res = run_local_round(model, data, training=training, privacy=privacy, ledger=ledger, server_round=1, seed=0)
    spent = model.release_epsilon or privacy.target_epsilon  # a hybrid's share, else the whole budget
    sigma = GaussianRelease.calibrated(epsilon=spent, delta=1e-5, accountant="prv").noise_multiplier
    assert res.status == "trained" and res.dp_steps == 1 == ledger.steps
    assert ledger.accountant_history() == [(sigma, 1.0, 1)]
    assert 0.95 * spent <= ledger.epsilon <= spent
    exact = model.statistic_sum(data.x, data.y) / len(data)
    noise = (model.get_buffer(model.release_buffer) - exact) * len(data)  # the noise the site added to its sum
    assert float(noise.std()) == pytest.approx(sigma, rel=0.1)
    again = run_local_round(model, data, training=training, privacy=privacy, ledger=ledger, server_round=2, seed=1)
    if family in PURE_RELEASE_FAMILIES:  # the release spent the budget: the site refuses from then on
        assert (ledger.noise_multiplier, ledger.sample_rate) == (sigma, 1.0)
        assert again.status == "budget_exhausted" and ledger.steps == 1
    else:  # a hybrid trains by DP-SGD on what the release left
        assert again.status == "trained" and again.dp_steps > 0 and ledger.noise_multiplier != sigma
        assert ledger.epsilon <= privacy.target_epsilon


@pytest.mark.parametrize("family", PURE_RELEASE_FAMILIES)
def test_server_fit_moves_the_generator_towards_the_release(family, digits):
    data = digits.subset(range(600))
    model = _build(family, digits, fit_steps=60)
    run_local_round(model, data, training=TrainingConfig(local_steps=1, batch_size=32, lr=1e-3), privacy=NO_DP,
                    ledger=None, server_round=1, seed=0)
    assert torch.allclose(model.embedding, model.statistic_sum(data.x, data.y) / len(data))  # no noise without DP
    torch.manual_seed(0)
    with torch.no_grad():
        before = float(model.mmd_loss(500))
    info = model.server_update()
    torch.manual_seed(0)
    with torch.no_grad():
        assert float(model.mmd_loss(500)) < 0.8 * before and info["server_fit_mmd"] < before


def test_mmd_fit_stops_once_it_reaches_the_release_noise_level(digits):
    from fedgen.shared_models.mmd import _WARMUP_STEPS
    data = digits.subset(range(600))
    model = _build("mmd", digits, fit_steps=60)
    run_local_round(model, data, training=TrainingConfig(local_steps=1, batch_size=32, lr=1e-3), privacy=NO_DP,
                    ledger=None, server_round=1, seed=0)
    # noise energy = variance x classes x features: 1.0 x 10 x 200 is far above any loss here
    loud = model.server_update(release_noise_variance=1.0)
    assert loud["release_noise_energy"] == pytest.approx(10 * 200)
    assert loud["server_fit_steps"] == _WARMUP_STEPS + 1
    assert model.server_update(release_noise_variance=0.0)["server_fit_steps"] == 60  # noiseless: fit fully
    assert model.server_update()["server_fit_steps"] == 60  # noise unknown (e.g. a robust rule): fit fully
    model.fit_tolerance = None  # the rule switched off
    assert model.server_update(release_noise_variance=1.0)["server_fit_steps"] == 60



def test_mmd_fit_cooldown_anneals_past_the_noise_level_and_never_past_fit_steps(digits):
    from fedgen.server.record import ServerUpdate
    from fedgen.shared_models.mmd import _WARMUP_STEPS
    data = digits.subset(range(600))
    fits = {}
    for cooldown, fit_steps in ((0.0, 60), (0.25, 60), (0.25, 200), (1.0, 30)):
        model = _build("mmd", digits, fit_steps=fit_steps, fit_cooldown=cooldown)
        run_local_round(model, data, training=TrainingConfig(local_steps=1, batch_size=32, lr=1e-3), privacy=NO_DP,
                        ledger=None, server_round=1, seed=0)
        torch.manual_seed(0)
        fits[cooldown, fit_steps] = info = model.server_update(release_noise_variance=1.0)  # reached at once
        assert info["server_fit_noise_reached"] == _WARMUP_STEPS + 1
        ServerUpdate(**info, server_update_seconds=0.0)  # the round record takes every field
    assert fits[0.0, 60]["server_fit_steps"] == _WARMUP_STEPS + 1  # no cooldown: stop there
    assert fits[0.25, 60]["server_fit_steps"] == _WARMUP_STEPS + 1 + math.ceil(0.25 * (_WARMUP_STEPS + 1))
    assert fits[0.25, 200]["server_fit_steps"] == fits[0.25, 60]["server_fit_steps"]  # the cosine span does not matter
    assert fits[1.0, 30]["server_fit_steps"] == 30  # capped at fit_steps
    with pytest.raises(ValueError, match="fit_cooldown"):
        _build("mmd", digits, fit_cooldown=-0.5)

def test_mmd_temperature_scales_the_latent_and_zero_spread_gives_one_sample_per_class(digits):
    model = _build("mmd", digits, temperature=0.5)
    labels = torch.arange(20) % 10
    torch.manual_seed(0)
    cold = model.sample(20, labels)  # the default temperature, 0.5
    torch.manual_seed(0)
    assert torch.equal(cold, model.sample(20, labels, temperature=0.5))
    torch.manual_seed(0)
    assert not torch.allclose(cold, model.sample(20, labels, temperature=1.0))
    frozen = model.sample(20, labels, temperature=1e-8)  # z = 0: one image per class
    assert torch.allclose(frozen[:10], frozen[10:], atol=1e-5) and not torch.allclose(frozen[0], frozen[1])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        _build("mmd", digits, temperature=0.0)
