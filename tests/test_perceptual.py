"""Perceptual features for the mmd release (DP-MEPF; shared_models/perceptual.py): a network
trained by the server on a declared-public set, shipped in the model, never trusted by the
site -- every record's released vector is bounded to norm <= 1 at the site."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ArrayRecord

from fedgen.client.data import SiteData
from fedgen.client.task import train_site
from fedgen.contract.errors import ScenarioError
from fedgen.contract.rundir import DataSpec
from fedgen.contract.scenario import scenario_from_dict
from fedgen.contract.task import build_global_model, task_from_scenario, TaskConfig
from fedgen.shared_models import build_model
from fedgen.shared_models.mmd import bounded_rows
from fedgen.simulations.cli import main as fedgen
from fedgen.simulations.warm_start import digits_28

from .conftest import REPO

MMD = {"family": "mmd", "num_features": 200, "fit_steps": 5, "fit_batch": 50, "hidden": 32, "count_weight": 0.2}
SPEC = DataSpec(format="digits", path=None, shape=(1, 8, 8), num_classes=10, num_sites=2)


def _scenario(perceptual: float = 0.5, **sections) -> dict:
    base = yaml.safe_load((REPO / "scenarios" / "quickstart.yaml").read_text())
    base.pop("warm_start")
    base["federation"].update({"num_sites": 2, "rounds": 1})
    base["model"] = {**MMD, **({"perceptual_weight": perceptual} if perceptual else {})}
    base["evaluation"] = {"every": 0, "num_samples": 100}
    base["privacy"]["seeded_noise"] = True
    if perceptual:
        base["warm_start"] = {"public": {"format": "digits-28"}, "steps": 30, "batch_size": 64}
    base.update(sections)
    return base


def _trained_server_model(seed: int = 0):
    scenario = scenario_from_dict(_scenario())
    model = build_global_model(scenario, SPEC)
    x, y = digits_28((1, 8, 8))
    model.fit_public_features(torch.from_numpy(x), torch.from_numpy(y), steps=30, batch_size=64, lr=1e-3, seed=seed)
    return scenario, model


def _hostile(state: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in state.items()}
    for key in [k for k in state if k.startswith("perceptual.") or ".perceptual." in k]:  # mmd's, a release head's
        if how == "huge":
            state[key] = torch.full_like(state[key], 1e30)
        elif how == "nan":
            state[key] = torch.full_like(state[key], float("nan"))
        elif how == "inf":
            state[key] = torch.where(torch.arange(state[key].numel()).reshape(state[key].shape) % 2 == 0,
                                     torch.full_like(state[key], float("inf")), state[key])
        else:  # scaled: every activation 1e6 times larger
            state[key] = state[key] * 1e3
    return state


@pytest.mark.parametrize("how", ["scaled", "huge", "nan", "inf"])
def test_the_site_bounds_sensitivity_to_1_whatever_network_the_server_sends(how, digits):
    """A site loads a hostile feature network and runs its real release round (no noise, so
    the released sum is exact): adding one record moves the sum by at most 1, and it is finite."""
    scenario, model = _trained_server_model()
    task = TaskConfig.from_json(task_from_scenario(scenario_from_dict(_scenario(privacy={"enabled": False})),
                                                   SPEC).to_json())
    state = _hostile(model.state_dict(), how)
    n = 40
    x, y = digits.x[:n + 1], digits.y[:n + 1]
    sums = []
    for rows in (n, n + 1):
        data = SiteData(x=x[:rows], y=y[:rows], num_classes=10, source="test")
        site_model, result, _ = train_site(task, data, state, site="site-0", server_round=1, ledger=None)
        assert result.status == "trained"
        sums.append(site_model.embedding.double() * rows)
    assert torch.isfinite(sums[0]).all() and torch.isfinite(sums[1]).all()
    assert float((sums[1] - sums[0]).norm()) <= 1.0 + 1e-5
    # each record's vector, directly: norm <= 1 and finite
    site_model = task.build_model()
    site_model.load_state_dict(state)
    per_record = torch.stack([site_model.statistic_sum(x[i:i + 1], y[i:i + 1]).sum(0) for i in range(n)])
    assert torch.isfinite(per_record).all() and float(per_record.norm(dim=1).max()) <= 1.0 + 1e-6


def test_bounded_rows_scales_long_rows_and_zeroes_non_finite_ones():
    rows = torch.tensor([[3.0, 4.0], [0.3, 0.4], [float("nan"), 0.0], [float("inf"), 1.0], [3e38, 3e38]])
    out = bounded_rows(rows)
    expected = torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0], [0.0, 0.0], [math.sqrt(0.5), math.sqrt(0.5)]])
    torch.testing.assert_close(out, expected)


def test_a_trained_network_releases_unit_norm_vectors(digits):
    _, model = _trained_server_model()
    rows = model.features(digits.x[:50])
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(50))
    w, p = 0.2, 0.5  # the norm shares: count, perceptual, the rest random features
    torch.testing.assert_close(rows[:, -1], torch.full((50,), w))
    perceptual = rows[:, 200:-1]
    torch.testing.assert_close(perceptual.norm(dim=1), torch.full((50,), p))


def test_server_and_site_compute_identical_features_from_the_public_seed(digits):
    """The server trains the network from the scenario's seed (deterministic: twice gives the
    same weights), ships it in the model's arrays, and a site's model computes the same features."""
    scenario, server = _trained_server_model(seed=0)
    _, again = _trained_server_model(seed=0)
    _, other = _trained_server_model(seed=1)
    for key, value in server.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    assert not torch.equal(server.perceptual.conv1.weight, other.perceptual.conv1.weight)
    arrays = ArrayRecord(server.state_dict())  # what round 1 sends out
    task = TaskConfig.from_json(task_from_scenario(scenario, SPEC).to_json())
    site = task.build_model()
    site.load_state_dict(arrays.to_torch_state_dict())
    x, y = digits.x[:64], digits.y[:64]
    assert torch.equal(site.features(x), server.features(x))
    assert torch.equal(site.statistic_sum(x, y), server.statistic_sum(x, y))
    # an untrained site model would differ: the features come from the shipped weights
    assert not torch.equal(task.build_model().features(x), server.features(x))


def test_the_release_spends_the_same_epsilon_as_without_perceptual_features(digits):
    """Same target, same sigma, same ledger: the sensitivity is 1 either way."""
    ledgers = []
    for perceptual in (0.0, 0.5):
        scenario = scenario_from_dict(_scenario(perceptual))
        task = TaskConfig.from_json(task_from_scenario(scenario, SPEC).to_json())
        model = build_global_model(scenario, SPEC)
        data = SiteData(x=digits.x[:100], y=digits.y[:100], num_classes=10, source="test")
        _, result, ledger = train_site(task, data, model.state_dict(), site="site-0", server_round=1, ledger=None)
        assert result.status == "trained"
        ledgers.append(ledger)
    plain, perceptual = ledgers
    assert perceptual.noise_multiplier == plain.noise_multiplier
    assert perceptual.epsilon == pytest.approx(plain.epsilon, rel=1e-12)
    assert perceptual.accountant_history() == plain.accountant_history()


@pytest.mark.parametrize("model, warm_start, message", [
    ({"perceptual_weight": 0.5}, None, "model.perceptual_weight: the perceptual features are trained on a "
                                       "declared-public set"),
    ({"perceptual_weight": 0.99}, {"public": {"format": "digits-28"}}, "perceptual_weight must lie in"),
    ({"family": "vae"}, {"release": {"epsilon_fraction": 0.1, "generator": {"perceptual_weight": 0.5}}},
     "warm_start.release.generator.perceptual_weight: a release warm start's generator has no public set"),
])
def test_scenario_refuses_perceptual_features_without_a_public_set(tmp_path, model, warm_start, message):
    raw = _scenario(0.0)
    raw["model"] = {"family": "vae"} if model.get("family") == "vae" else {**raw["model"], **model}
    if warm_start:
        raw["warm_start"] = warm_start
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises((ScenarioError, ValueError), match=message) as err:
        from fedgen.simulations.prepare import check_scenario

        check_scenario(scenario_from_dict(raw, source=str(path)))
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_a_federated_run_trains_the_network_on_the_public_set_only_and_charges_the_same(tmp_path):
    """Through Flower: the public warm start trains the perceptual network, summary.json says
    which data were public, and every site's ledger equals that of the run without it."""
    runs = {}
    for name, perceptual in (("plain", 0.0), ("perceptual", 0.5)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(_scenario(perceptual)))
        runs[name] = tmp_path / "runs" / name
        assert fedgen(["simulate", str(path), "--out", str(runs[name])]) == 0
    sites = {k: json.loads((v / "privacy.json").read_text())["sites"] for k, v in runs.items()}
    assert sites["perceptual"] == sites["plain"]
    summary = json.loads((runs["perceptual"] / "summary.json").read_text())
    record = summary["warm_start"]
    assert record["kind"] == "public" and record["epsilon_charged"] == 0.0
    assert "digits-28" in record["public_data"] and "private data only" in record["guarantee"]
    assert "warm_start" not in json.loads((runs["plain"] / "summary.json").read_text())


# -- the public classifier as a sample filter (public_filter) ---------------------------

@pytest.fixture(scope="module")
def fitted_perceptual_mmd():
    """An mmd model with perceptual features on 8 x 8 digits: the network trained on the
    public digits, the generator fitted for 150 steps to their noiseless embedding."""
    scenario = scenario_from_dict(_scenario(0.5, model={**MMD, "perceptual_weight": 0.5, "fit_steps": 150,
                                                        "fit_batch": 100, "hidden": 64}))
    model = build_global_model(scenario, SPEC)
    x, y = (torch.from_numpy(a) for a in digits_28((1, 8, 8)))
    model.fit_public_features(x, y, steps=200, batch_size=64, lr=1e-3, seed=0)
    counts = torch.bincount(y, minlength=10).double()
    model.set_release((model.statistic_sum(x, y).double() / counts[:, None]).float())
    model.server_update()
    return model


def test_the_public_filter_keeps_samples_the_public_classifier_recognises(fitted_perceptual_mmd):
    model = fitted_perceptual_mmd
    labels = model.balanced_labels(500)
    torch.manual_seed(0)
    plain = model.sample(500, labels)
    model.public_filter = 0.5
    try:
        torch.manual_seed(0)
        filtered = model.sample(500, labels)
        before = float(model.publicly_recognised(plain, labels).float().mean())
        after = float(model.publicly_recognised(filtered, labels).float().mean())
        assert after >= before + 0.15, (before, after)  # measured: 0.17 -> 0.43
        assert filtered.shape == plain.shape and 0.0 <= float(filtered.min()) and float(filtered.max()) <= 1.0
        # the first draw is the unfiltered one: the slots it already passed are kept
        passed = model.publicly_recognised(plain, labels)
        assert torch.equal(filtered[passed], plain[passed])
        model.public_filter = 0.999999  # a level no draw reaches: every slot keeps its last draw
        assert model.sample(50, labels[:50]).shape == (50, 1, 8, 8)
    finally:
        model.public_filter = 0.0


def test_the_public_filter_needs_perceptual_features(tmp_path, capsys):
    raw = _scenario(0.0)
    raw["model"] = {**MMD, "public_filter": 0.5}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert fedgen(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "public_filter: the filter is the perceptual network's classifier" in err and "\n" not in err
