"""Site-level DP (DP-FedAvg on the server): accounting, noise, clipping, Poisson sampling."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from fedgen.contract import rundir
from fedgen.privacy.accounting import make_accountant
from fedgen.privacy.errors import PrivacyConfigError
from fedgen.privacy.site_level import SiteLevelDP
from fedgen.server.run import FederatedRun
from fedgen.server.site_level import SiteLevelDPStrategy
from fedgen.simulations.hooks import hooks_for

from .conftest import REPO
from .test_updates import GLOBAL, _rec, _reply, _update


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


# -- the strategy wrapper (server/site_level.py) ------------------------------------------------

class ScriptedRandom:
    """An RNG whose ``random()`` plays back ``values``: the draw the wrapper must use."""

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


class Nodes:
    """A grid that only knows which nodes are connected."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return self.node_ids


@pytest.fixture
def in_a_run(monkeypatch):
    """Messages are created inside a ServerApp's run; give them one."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)  # the SuperLink's id for the server
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def wrapper(mech: SiteLevelDP, *, sampling_rng=None, noise_rng=None) -> SiteLevelDPStrategy:
    return SiteLevelDPStrategy(FedAvg(), mech, sampling_rng=sampling_rng or random.Random(0),
                               noise_rng=noise_rng or np.random.default_rng(0))


def test_the_wrapper_poisson_samples_with_the_rng_it_was_given(in_a_run):
    mech = mechanism(sample_rate=0.5)
    strategy = wrapper(mech, sampling_rng=ScriptedRandom([0.9, 0.1, 0.49, 0.5, 0.0]))
    messages = list(strategy.configure_train(4, _rec(GLOBAL), ConfigRecord({"fedgen": "{}"}),
                                             Nodes([14, 10, 11, 13, 12])))
    # sorted nodes 10..14 against the draws 0.9, 0.1, 0.49, 0.5, 0.0 at q = 0.5
    assert [m.metadata.dst_node_id for m in messages] == [11, 12, 14]
    assert all(m.content["config"]["server-round"] == 4 for m in messages)
    assert strategy.sampling_rng.values == []  # one draw per connected site, no other randomness


def test_the_wrapper_releases_what_the_mechanism_releases():
    replies = [_reply("0", 10, _update(0.1, 1)), _reply("1", 11, _update(5.0, 2), num_examples=10**6)]
    strategy = wrapper(mechanism(), noise_rng=np.random.default_rng(7))
    strategy.configure_train(1, _rec(GLOBAL), ConfigRecord(), Nodes([]))
    arrays, _ = strategy.aggregate_train(1, replies)

    expected, info = mechanism().release(GLOBAL, [_update(0.1, 1), _update(5.0, 2)], np.random.default_rng(7))
    for key, value in expected.items():  # the fixed denominator, not the example-weighted mean
        np.testing.assert_array_equal(arrays[key].numpy(), value)
    report = strategy.round_report
    assert (report.sites_clipped, report.site_level_epsilon) == (info["sites_clipped"], info["site_level_epsilon"])
    assert report.site_update_norm_median == pytest.approx(np.median(info["site_update_norms"]))
    assert strategy.mechanism.rounds == 1 and strategy.can_release()


def test_the_wrapper_releases_noise_when_nobody_replied():
    strategy = wrapper(mechanism(), noise_rng=np.random.default_rng(3))
    strategy.configure_train(1, _rec(GLOBAL), ConfigRecord(), Nodes([]))
    arrays, _ = strategy.aggregate_train(1, [])
    expected, _ = mechanism().release(GLOBAL, [], np.random.default_rng(3))
    np.testing.assert_array_equal(arrays["w"].numpy(), expected["w"])
    assert strategy.mechanism.rounds == 1 and strategy.round_report.site_update_norm_median is None


@pytest.fixture(scope="module")
def site_dp_template(tmp_path_factory) -> Path:
    from fedgen.contract.scenario import load_scenario
    from fedgen.simulations.prepare import write_run_dir

    scenario = load_scenario(REPO / "scenarios" / "site-dp-digits.yaml", ["federation.num_sites=4"])
    return write_run_dir(scenario, tmp_path_factory.mktemp("runs") / "site-dp")


@pytest.fixture
def site_dp_run_dir(site_dp_template, tmp_path) -> Path:
    return Path(shutil.copytree(site_dp_template, tmp_path / "run"))


def test_a_run_samples_and_noises_from_os_entropy_unless_a_simulation_seeds_them(site_dp_run_dir):
    deployed = FederatedRun(None, site_dp_run_dir)  # no hooks: seeded noise is not allowed
    assert isinstance(deployed.strategy, SiteLevelDPStrategy) and deployed.site_dp is deployed.strategy
    assert isinstance(deployed.strategy.sampling_rng, random.SystemRandom)
    assert deployed.strategy.noise_rng is deployed.noise_rng
    assert deployed.noise_rng.bit_generator.state != np.random.default_rng(0).bit_generator.state  # not the seed

    simulated = FederatedRun(None, site_dp_run_dir, hooks=hooks_for(site_dp_run_dir))  # opted in
    assert simulated.strategy.sampling_rng is random
    assert simulated.noise_rng.bit_generator.state == np.random.default_rng(0).bit_generator.state


def test_os_entropy_noise_state_never_reaches_a_checkpoint(site_dp_run_dir):
    """The noise generator's state would let whoever reads the checkpoint recompute the
    server's noise and subtract it; only seeded (simulation) noise resumes from it."""
    FederatedRun(None, site_dp_run_dir)._checkpoint(next_round=2, wall=1.0)
    state = json.loads(torch.load(site_dp_run_dir / rundir.CHECKPOINTS / "latest.pt", weights_only=True)["state"])
    assert state["noise_rng_state"] is None


def test_site_level_releases_and_seeded_noise_resume(site_dp_run_dir, in_a_run):
    run = FederatedRun(None, site_dp_run_dir, hooks=hooks_for(site_dp_run_dir))
    run.strategy.configure_train(1, ArrayRecord(run.model.state_dict()), ConfigRecord(), Nodes([1, 2, 3, 4]))
    run.strategy.aggregate_train(1, [])
    run.ledger.site_level = run.site_dp.mechanism.to_dict()
    noise_state = run.noise_rng.bit_generator.state
    run._checkpoint(next_round=2, wall=1.0)

    resumed = FederatedRun(None, site_dp_run_dir, hooks=hooks_for(site_dp_run_dir))
    assert resumed.start_round == 2 and resumed.site_dp.mechanism == run.site_dp.mechanism
    assert resumed.site_dp.mechanism.rounds == 1
    assert resumed.strategy.noise_rng.bit_generator.state == noise_state
