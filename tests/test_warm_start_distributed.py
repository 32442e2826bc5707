"""A release warm start under secure aggregation with distributed noise (issue 18): round 1
is the warm start's release, summed as one central Skellam release (privacy/skellam.py);
the rounds after it are DP-FedSGD (privacy/dp_fedsgd.py), planned so that the release and
every round compose to the target (``DistributedRelease.prior``, contract/task.py
``DistributedNoise``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from opacus.accountants.analysis import rdp as rdp_analysis

from fedgen.client.secagg import _check_distributed
from fedgen.contract import secagg as sa
from fedgen.contract.errors import ScenarioError
from fedgen.contract.rundir import DataSpec
from fedgen.contract.scenario import scenario_from_dict
from fedgen.contract.task import build_global_model, distributed_noise_plan
from fedgen.privacy import skellam as sk
from fedgen.privacy.dp_fedsgd import private_step_parameters
from fedgen.privacy.ledger import SiteLedger

from .conftest import REPO
from .test_dpfedsgd import _zhu_wang_thm6
from .test_simulation_flower import fedgen

DELTA = 1e-5
ORDERS = list(range(2, 65))  # a subset of the accountant's orders: never below its epsilon


def _plans(target: float = 10.0, release_epsilon: float = 8.0, rounds: int = 20):
    common = dict(delta=DELTA, bits=48, num_sites=5, threshold=3, max_records=500)
    release = sk.plan_distributed_release(epsilon=release_epsilon, dim=33, size=330, **common)
    sgd = sk.plan_distributed_release(epsilon=target, dim=200, size=200, sample_rate=0.05, rounds=rounds,
                                      prior=release, **common)
    return release, sgd


def _fresh_epsilon(release: dict[str, float], rounds_spend: dict[str, float], sample_rate: float,
                   rounds: int) -> float:
    """A release ``{"mu", "l1", "l2"}`` (the Skellam RDP at q = 1) plus ``rounds`` rounds of
    ``rounds_spend`` subsampled at ``sample_rate``, each RDP evaluated in 50-digit arithmetic
    (tests/test_dpfedsgd.py), composed and converted."""
    rdp = np.array([_zhu_wang_thm6(release["mu"], release["l1"], release["l2"], 1.0, a)
                    + rounds * _zhu_wang_thm6(rounds_spend["mu"], rounds_spend["l1"], rounds_spend["l2"],
                                              sample_rate, a) for a in ORDERS])
    return rdp_analysis.get_privacy_spent(orders=[float(a) for a in ORDERS], rdp=rdp, delta=DELTA)[0]


def _spend(plan: sk.DistributedRelease) -> dict[str, float]:
    return {"mu": plan.mu, "l1": plan.l1, "l2": plan.l2}


def _ledger(target: float) -> SiteLedger:
    return SiteLedger(site="0", accountant="prv", delta=DELTA, target_epsilon=target, max_grad_norm=1.0)


def test_release_and_fine_tuning_compose_to_the_target_as_a_fresh_accountant_fed_the_ledger():
    """A site charged the release and then all 20 planned rounds: its ledger's epsilon is
    the plan's, a fresh 50-digit recomputation of the history (1 %), and at the target but
    not above; the rounds planned without the release would spend 10 on their own, with
    less noise."""
    release, sgd = _plans()
    assert release.epsilon(DELTA) == pytest.approx(8.0, rel=1e-3) and release.epsilon(DELTA) <= 8.0
    ledger = _ledger(10.0)
    own, spend = sk.site_spend(release, ledger)
    sk.charge_distributed(ledger, spend, round=1, run=None)
    for r in range(2, sgd.rounds + 2):
        own, spend = sk.site_spend(sgd, ledger)
        assert own == pytest.approx(sgd.share) and spend["mu"] == pytest.approx(sgd.mu)
        sk.charge_distributed(ledger, spend, round=r, run=None, sample_rate=sgd.sample_rate)
    assert ledger.epsilon == pytest.approx(sgd.epsilon(DELTA), rel=1e-9)
    assert ledger.epsilon == pytest.approx(_fresh_epsilon(_spend(release), _spend(sgd), sgd.sample_rate, sgd.rounds),
                                           rel=0.01)
    assert 0.99 * 10.0 <= ledger.epsilon <= 10.0 * (1 + 1e-9)
    assert sk.site_spend(sgd, ledger) is None  # one more round would pass the target
    alone = sk.plan_distributed_release(epsilon=10.0, delta=DELTA, bits=48, num_sites=5, threshold=3,
                                        max_records=500, dim=200, size=200, sample_rate=0.05, rounds=20)
    # the noise relative to one record's rounded gradient (the scale is set by the sampler's range)
    assert alone.mu / alone.l2 ** 2 < sgd.mu / sgd.l2 ** 2 and alone.prior is None


def test_a_stricter_site_adds_more_noise_after_the_release_and_refuses_when_the_release_took_it_all():
    release, sgd = _plans()
    ledger = _ledger(9.0)  # its policy: 9, below the plan's 10
    sk.charge_distributed(ledger, sk.site_spend(release, ledger)[1], round=1, run=None)
    own, spend = sk.site_spend(sgd, ledger)
    assert own > sgd.share and spend["mu"] > sgd.mu
    for r in range(2, sgd.rounds + 2):
        planned = sk.site_spend(sgd, ledger)
        assert planned is not None, f"round {r}"
        sk.charge_distributed(ledger, planned[1], round=r, run=None, sample_rate=sgd.sample_rate)
    assert 0.98 * 9.0 <= ledger.epsilon <= 9.0 * (1 + 1e-6)

    strict = _ledger(7.5)  # below the release's 8: the release protects it at 7.5, nothing is left
    own, spend = sk.site_spend(release, strict)
    assert own > release.share
    sk.charge_distributed(strict, spend, round=1, run=None)
    assert strict.epsilon <= 7.5 * (1 + 1e-6)
    assert sk.site_spend(sgd, strict) is None


def test_a_plan_with_a_prior_round_trips_and_a_site_refuses_a_malformed_one():
    release, sgd = _plans()
    assert sk.DistributedRelease.from_json(sgd.to_json()) == sgd
    assert sgd.prior == (release.mu, release.l1, release.l2)
    assert "prior" not in json.loads(release.to_json())  # a plan without one reads as before
    params = sa.SecAggParams(threshold=3, bits=48, clip_norm=1.0, num_sites=5)
    _check_distributed(sgd.to_json(), params)  # accepted
    for bad in ([-1.0, 1.0, 1.0], [1.0, 2.0], "x"):
        with pytest.raises(sa.SecAggError, match="malformed distributed-noise parameters"):
            _check_distributed(json.dumps({**json.loads(sgd.to_json()), "prior": bad}), params)


# -- the scenario and the run's plans -------------------------------------------------------

_DIST = {"threshold": 3, "noise": "distributed", "bits": 62, "max_records": 400}


def _scenario(family: str = "vae", **release):
    return scenario_from_dict({"federation": {"num_sites": 5, "rounds": 4, "secure_aggregation": _DIST},
                               "model": {"family": family}, "training": {"local_steps": 1, "batch_size": 80},
                               "privacy": {"enabled": True, "target_epsilon": 10.0},
                               "warm_start": {"release": {"epsilon_fraction": 0.8, **release}}}, source="s.yaml")


@pytest.mark.parametrize("family", ["vae", "flow", "diffusion"])
def test_each_one_step_family_takes_a_release_warm_start_with_distributed_noise(family):
    s = _scenario(family, family_share=0)
    assert s.warm_start.release.epsilon_fraction == 0.8


def test_the_flows_class_means_beside_a_distributed_release_are_refused_with_one_line():
    with pytest.raises(ScenarioError) as err:
        _scenario("flow")  # family_share defaults to 0.5
    text = str(err.value)
    assert "warm_start.release.family_share: with noise: distributed" in text and "family_share: 0" in text
    assert "\n" not in text


SPEC = DataSpec(format="digits", path=None, shape=(1, 8, 8), num_classes=10, num_sites=5)


def test_the_run_plans_the_release_for_round_1_and_dp_fedsgd_after_it():
    scenario = _scenario("vae")
    model = build_global_model(scenario, SPEC)
    noise = distributed_noise_plan(scenario, model)
    release, sgd = noise.release, noise.sgd
    shape = tuple(model.state_dict()[model.release_buffer].shape)
    assert (release.dim, release.size, release.sample_rate, release.rounds) == (shape[-1], int(np.prod(shape)), 1.0, 1)
    assert release.epsilon(DELTA) == pytest.approx(8.0, rel=1e-3)
    size = sum(p.numel() for p in private_step_parameters(model))
    assert (sgd.size, sgd.rounds, sgd.sample_rate) == (size, 3, pytest.approx(80 / 400))
    assert sgd.prior == (release.mu, release.l1, release.l2)
    assert 0.99 * 10.0 <= sgd.epsilon(DELTA) <= 10.0
    assert noise.for_model(model) is release
    model.released.fill_(1.0)  # the server's combine after round 1
    assert noise.for_model(model) is sgd
    # without the warm start: DP-FedSGD alone, over every round, no prior
    cold = scenario.model_copy(update={"warm_start": None})
    plain = distributed_noise_plan(cold, build_global_model(cold, SPEC))
    assert plain.release is None and plain.sgd.rounds == 4 and plain.sgd.prior is None


# -- a whole run: the real ClientApp and ServerApp ----------------------------------------

WARM_DP_FEDSGD = ["training.local_steps=1", "training.batch_size=60", "federation.rounds=3",
                  "federation.secure_aggregation.threshold=3", "federation.secure_aggregation.bits=62",
                  "federation.secure_aggregation.noise=distributed", "federation.secure_aggregation.max_records=300",
                  "warm_start.release.family_share=0", "warm_start.release.epsilon_fraction=0.5",
                  "warm_start.steps=300", "evaluation.every=0", "evaluation.num_samples=100",
                  "privacy.seeded_noise=true", "simulation.engine=inprocess"]


@pytest.mark.slow
def test_a_release_warm_start_then_dp_fedsgd_under_distributed_noise_end_to_end(tmp_path):
    """The quickstart VAE: round 1 the sites' release, summed with distributed noise (the
    server reads its noisy count off the sum and pretrains the VAE on the fitted generator's
    draws); rounds 2-3 DP-FedSGD. Every site's epsilon: the release's share after round 1,
    the target at the end, a fresh recomputation of its ledger's history."""
    out = tmp_path / "run"
    res = fedgen("simulate", REPO / "scenarios" / "quickstart.yaml", "--out", out,
                 *[a for item in WARM_DP_FEDSGD for a in ("--set", item)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["secure_aggregation"]["released"] for r in rows] == [True] * 3
    first = rows[0]["secure_aggregation"]["distributed_noise"]
    assert "noisy_count" in first and "sample_rate" not in first  # the release: a noisy count, everyone in
    assert abs(first["noisy_count"] - 1437) < 200  # the quickstart's 1 437 training records, plus noise
    assert rows[1]["secure_aggregation"]["distributed_noise"]["sample_rate"] == pytest.approx(0.2)
    assert rows[0]["epsilon"] == pytest.approx(5.0, rel=1e-3)
    # the server pretrained after the release, then its optimizer moved the model each round
    models = [torch.load(out / "checkpoints" / f"model-round-000{r}.pt") for r in (1, 2, 3)]
    assert float(models[0]["pretrained"]) == 1.0
    for a, b in zip(models, models[1:]):
        assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("inner."))
    privacy = json.loads((out / "privacy.json").read_text())
    for site in privacy["sites"].values():
        spends = [h for h in site["history"] if h["steps"] > 0]
        assert [h["sample_rate"] for h in spends] == [1.0, pytest.approx(0.2), pytest.approx(0.2)]
        rel, rounds = spends[0]["skellam"], spends[1]["skellam"]
        assert site["epsilon"] == pytest.approx(_fresh_epsilon(rel, rounds, 0.2, 2), rel=0.01)
        assert 0.99 * 10.0 <= site["epsilon"] <= 10.0 * (1 + 1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["guarantees"][0]["mechanism"].startswith(
        "one distributed Skellam release of a per-class statistic, then DP-FedSGD with distributed Skellam noise")
