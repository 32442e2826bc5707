"""Privacy accounting: epsilon matches Opacus, calibration never overspends, the
epsilon-reset bug cannot happen, sites refuse once their budget is spent."""

from __future__ import annotations

import pytest

from fedgen.client.training import new_site_ledger, run_local_round
from fedgen.contract.task import PrivacyConfig, TrainingConfig
from fedgen.privacy.accounting import affordable_steps, calibrate_noise_multiplier, epsilon_of, make_accountant
from fedgen.privacy.errors import PrivacyConfigError
from fedgen.shared_models import build_model

HISTORY = [(1.1, 0.05, 40), (1.1, 0.05, 40), (2.0, 0.1, 17), (1.1, 0.05, 3)]


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_epsilon_equals_fresh_opacus_accountant(kind):
    acc = make_accountant(kind)
    for sigma, q, n in HISTORY:  # the way Opacus' optimizer hook would feed it, step by step
        for _ in range(n):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    expected = acc.get_epsilon(delta=1e-5)
    assert epsilon_of(HISTORY, delta=1e-5, accountant=kind) == pytest.approx(expected, rel=1e-2 if kind == "prv" else 1e-9)


def test_empty_history_has_zero_epsilon():
    assert epsilon_of([], delta=1e-5, accountant="rdp") == 0.0


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_calibration_meets_target_without_overspending(kind):
    sigma = calibrate_noise_multiplier(target_epsilon=2.0, delta=1e-5, sample_rate=0.1, steps=200, accountant=kind)
    eps = epsilon_of([(sigma, 0.1, 200)], delta=1e-5, accountant=kind)
    assert 1.9 <= eps <= 2.0


def test_calibration_impossible_target_is_a_clear_error():
    with pytest.raises(PrivacyConfigError, match="raise the target epsilon"):
        calibrate_noise_multiplier(target_epsilon=1e-6, delta=1e-5, sample_rate=1.0, steps=10**6, accountant="rdp")


def test_affordable_steps_is_the_largest_that_fits():
    hist = [(1.5, 0.2, 50)]
    k = affordable_steps(hist, noise_multiplier=1.5, sample_rate=0.2, wanted=10_000, delta=1e-5,
                         target_epsilon=8.0, accountant="rdp")
    assert 0 < k < 10_000
    assert epsilon_of(hist + [(1.5, 0.2, k)], delta=1e-5, accountant="rdp") <= 8.0
    assert epsilon_of(hist + [(1.5, 0.2, k + 1)], delta=1e-5, accountant="rdp") > 8.0


def _site_round(model, data, ledger, privacy, rnd, steps=6):
    return run_local_round(model, data, training=TrainingConfig(local_steps=steps, batch_size=32, lr=1e-3),
                           privacy=privacy, ledger=ledger, server_round=rnd, seed=rnd)


def test_epsilon_composes_across_rounds_no_reset(digits):
    """The epsilon-reset bug (a fresh PrivacyEngine per round): after R rounds the site's
    epsilon must equal ONE accountant over all R rounds' steps, not one round's."""
    data = digits.subset(range(200))
    privacy = PrivacyConfig(enabled=True, target_epsilon=50.0, delta=1e-5, max_grad_norm=1.0, planned_rounds=4)
    ledger = new_site_ledger("0", privacy)
    model = build_model("vae", data_shape=data.shape, num_classes=10, hidden=32)
    eps = []
    for rnd in range(1, 5):
        res = _site_round(model, data, ledger, privacy, rnd)
        assert res.status == "trained" and res.dp_steps == 6
        eps.append(ledger.epsilon)
    assert all(b > a for a, b in zip(eps, eps[1:])), eps
    one_run = make_accountant("rdp")
    for _ in range(4 * 6):
        one_run.step(noise_multiplier=ledger.noise_multiplier, sample_rate=ledger.sample_rate)
    assert ledger.steps == 24
    assert eps[-1] == pytest.approx(one_run.get_epsilon(delta=1e-5), rel=1e-9)
    single_round = epsilon_of([(ledger.noise_multiplier, ledger.sample_rate, 6)], delta=1e-5, accountant="rdp")
    assert eps[-1] > 1.5 * single_round


def test_site_refuses_once_budget_is_spent(digits):
    data = digits.subset(range(100))
    privacy = PrivacyConfig(enabled=True, target_epsilon=1.0, delta=1e-5, max_grad_norm=1.0, planned_rounds=2)
    ledger = new_site_ledger("3", privacy)
    model = build_model("vae", data_shape=data.shape, num_classes=10, hidden=16)
    statuses = [_site_round(model, data, ledger, privacy, r, steps=5).status for r in range(1, 6)]
    assert statuses[:2] == ["trained", "trained"]
    assert statuses[-1] == "budget_exhausted"
    assert ledger.epsilon <= 1.0
    res = _site_round(model, data, ledger, privacy, 9)
    assert res.dp_steps == 0 and "refuses to train" in res.message


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_calibration_after_a_release_composes_to_the_target(kind):
    from fedgen.privacy.accounting import calibrate_after
    release = [(calibrate_noise_multiplier(target_epsilon=4.0, delta=1e-5, sample_rate=1.0, steps=1,
                                           accountant=kind), 1.0, 1)]
    sigma = calibrate_after(release, target_epsilon=10.0, delta=1e-5, sample_rate=0.4, steps=600, accountant=kind)
    assert epsilon_of(release + [(sigma, 0.4, 600)], delta=1e-5, accountant=kind) <= 10.0
    assert epsilon_of(release + [(sigma / 1.02, 0.4, 600)], delta=1e-5, accountant=kind) > 10.0  # tight to ~1 %
    # tighter than splitting the budget (basic composition: 10 - 4 left for DP-SGD)
    split = calibrate_noise_multiplier(target_epsilon=6.0, delta=1e-5, sample_rate=0.4, steps=600, accountant=kind)
    assert sigma < 0.95 * split
    assert calibrate_after([], target_epsilon=10.0, delta=1e-5, sample_rate=0.4, steps=600, accountant=kind) == \
        calibrate_noise_multiplier(target_epsilon=10.0, delta=1e-5, sample_rate=0.4, steps=600, accountant=kind)
    with pytest.raises(PrivacyConfigError, match="already spent"):
        calibrate_after(release, target_epsilon=3.0, delta=1e-5, sample_rate=0.4, steps=600, accountant=kind)


def test_accounting_leaves_the_console_quiet(recwarn):
    """Opacus' PRV numerics and RDP's 'optimal order' notices never reach a user's console;
    the epsilons themselves are what Opacus computes."""
    from fedgen.privacy.skellam import skellam_epsilon

    prv = epsilon_of([(1.1, 1.0, 1)], delta=1e-5, accountant="prv")  # a release (q = 1): numpy's log(0)
    # a variance so small that the smallest Renyi order is the optimum (a calibration's early guesses)
    skellam = skellam_epsilon(mu=0.05 * 2.3e5 ** 2, l1=2.3e5, l2=2.3e5, delta=1e-5)
    calibrate_noise_multiplier.cache_clear()
    calibrate_noise_multiplier(target_epsilon=10.0, delta=1e-5, sample_rate=0.05, steps=200, accountant="prv")
    assert prv > 0 and skellam > 25
    assert [str(w.message) for w in recwarn] == []
