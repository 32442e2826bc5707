"""Site-level DP (DP-FedAvg on the server): accounting, noise, clipping, Poisson sampling."""

from __future__ import annotations

import random

import numpy as np
import pytest

from fedgen.privacy.accounting import make_accountant
from fedgen.privacy.errors import PrivacyConfigError
from fedgen.privacy.site_level import SiteLevelDP


def mechanism(**kw) -> SiteLevelDP:
    args = dict(clip_norm=0.5, noise_multiplier=1.3, sample_rate=0.3, num_sites=20, delta=1e-4,
                accountant="rdp", target_epsilon=50.0)
    args.update(kw)
    return SiteLevelDP(**args)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_equals_a_fresh_opacus_accountant(accountant):
    mech = mechanism(accountant=accountant)
    global_w = {"w": np.zeros(4, np.float32)}
    rng = np.random.default_rng(0)
    for _ in range(7):
        mech.release(global_w, [global_w], rng)
    fresh = make_accountant(accountant, [(1.3, 0.3, 7)]).get_epsilon(delta=1e-4)
    assert mech.rounds == 7
    assert mech.epsilon == pytest.approx(fresh, rel=0.01)


def test_calibration_meets_the_target_without_overspending():
    mech = SiteLevelDP.calibrated(target_epsilon=4.0, delta=1e-5, clip_norm=1.0, sample_rate=0.5, num_sites=10,
                                  planned_rounds=30, accountant="rdp")
    assert 3.8 <= mech.epsilon_after(30) <= 4.0
    assert mech.rounds == 0 and mech.epsilon == 0.0
    mech.rounds = 30
    assert not mech.can_release()  # a 31st round would overspend


def test_a_given_noise_multiplier_that_overspends_is_refused():
    with pytest.raises(PrivacyConfigError, match="above the target"):
        SiteLevelDP.calibrated(target_epsilon=1.0, delta=1e-5, clip_norm=1.0, sample_rate=1.0, num_sites=10,
                               planned_rounds=10, accountant="rdp", noise_multiplier=0.5)


def test_server_noise_has_the_recorded_standard_deviation():
    mech = mechanism()
    global_w = {"a": np.zeros((50, 20), np.float32), "b": np.zeros(100, np.float32)}
    sites = [global_w] * 4  # zero updates: the aggregate is the noise alone
    draws = []
    for seed in range(200):
        new, _ = mech.release(global_w, sites, np.random.default_rng(seed))
        draws.append(np.concatenate([new["a"].ravel(), new["b"].ravel()]))
    draws = np.stack(draws)
    expected = 1.3 * 0.5 / (0.3 * 20)
    assert mech.noise_std == pytest.approx(expected)
    assert draws.std() == pytest.approx(expected, rel=0.05)
    assert abs(draws.mean()) < 0.05 * expected


def test_each_site_moves_the_sum_by_at_most_the_clip_norm():
    mech = mechanism(noise_multiplier=1e-9)
    global_w = {"w": np.ones(3, np.float32), "steps": np.array(5)}
    far = {"w": np.array([1 + 30.0, 1, 1], np.float32), "steps": np.array(9)}
    near = {"w": np.array([1, 1 + 0.1, 1], np.float32), "steps": np.array(9)}
    new, info = mech.release(global_w, [far, near], np.random.default_rng(0))
    moved = (new["w"] - global_w["w"]) * mech.denominator  # the clipped sum
    np.testing.assert_allclose(moved, [0.5, 0.1, 0.0], atol=1e-5)
    assert info["sites_clipped"] == 1
    assert new["steps"] == 5  # integer buffers are not averaged


def test_poisson_sampling_includes_each_site_independently():
    mech = mechanism(sample_rate=0.25)
    rng = random.Random(0)
    nodes = list(range(40))
    sizes, hits = [], np.zeros(40)
    for _ in range(2000):
        chosen = mech.sample(nodes, rng)
        sizes.append(len(chosen))
        hits[chosen] += 1
    assert np.mean(sizes) == pytest.approx(10, rel=0.03)
    assert np.std(sizes) > 2  # the sample size varies: not "pick k of n"
    assert np.all(np.abs(hits / 2000 - 0.25) < 0.05)


def test_the_ledger_block_round_trips():
    mech = mechanism()
    mech.rounds = 3
    d = mech.to_dict()
    assert d["epsilon"] == pytest.approx(mech.epsilon) and d["noise_std"] == pytest.approx(mech.noise_std)
    assert SiteLevelDP.from_dict(d) == mech
