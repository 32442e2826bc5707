"""A release warm start whose generator has perceptual features (issue 18; docs/models.md,
"Warm starts"): ``warm_start`` declares both ``public`` and ``release`` with
``release.generator.perceptual_weight > 0``. The public set trains the release head's
perceptual network only (the server, before round 1, charged nothing); the family pretrains
on the release generator's samples; every site's ledger equals that of the same release
without perceptual features; and the site still bounds each record's vector to norm 1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from fedgen.client.data import SiteData
from fedgen.client.task import train_site
from fedgen.contract import rundir
from fedgen.contract.errors import ScenarioError
from fedgen.contract.rundir import DataSpec
from fedgen.contract.scenario import scenario_from_dict
from fedgen.contract.task import build_global_model, task_from_scenario, TaskConfig
from fedgen.server.warm_start import public_warm_start, read_record, release_record, write_record
from fedgen.shared_models import mmd as shared_mmd
from fedgen.shared_models import warm_start as shared_warm_start
from fedgen.shared_models.warm_start import ReleaseWarmStart
from fedgen.simulations.cli import main as fedgen
from fedgen.simulations.prepare import write_public_set
from fedgen.simulations.warm_start import public_set

from .conftest import REPO
from .test_perceptual import _hostile
from .test_warm_start import _quickstart, _rows, _site_ledgers, _simulate, _split_digits, _spy

SPEC = DataSpec(format="digits", path=None, shape=(1, 8, 8), num_classes=10, num_sites=2)
FLOW = {"family": "flow", "levels": 17, "hidden": 16}
RELEASE = {"epsilon_fraction": 0.3, "num_features": 200, "generator_steps": 5, "samples": 50,
           "generator": {"count_weight": 0.2, "hidden": 16}}


def _mepf(perceptual: float = 0.5, public: bool = True, family_share: float = 0.0, **sections) -> dict:
    release = {**RELEASE, "family_share": family_share,
               "generator": {**RELEASE["generator"], **({"perceptual_weight": perceptual} if perceptual else {})}}
    warm = {"release": release, "steps": 5, "batch_size": 64, **({"public": {"format": "digits-28"}} if public else {})}
    raw = _quickstart(model=dict(FLOW), warm_start=warm, **sections)
    raw["federation"].update({"num_sites": 2, "rounds": 2})
    return raw


# -- the contract ---------------------------------------------------------------------------

def test_public_and_release_together_need_perceptual_features():
    ws = scenario_from_dict(_mepf()).warm_start
    assert ws.public.format == "digits-28" and ws.release.generator["perceptual_weight"] == 0.5
    with pytest.raises(ScenarioError) as err:  # both without perceptual features: still one of the two
        scenario_from_dict(_mepf(perceptual=0.0), source="s.yaml")
    assert "warm_start: give exactly one of public" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ScenarioError) as err:  # perceptual features without a public set
        scenario_from_dict(_mepf(public=False), source="s.yaml")
    assert "warm_start.release.generator.perceptual_weight:" in str(err.value)
    assert "warm_start.public" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ScenarioError, match="warm_start: the mmd family is fitted by a release"):
        raw = _mepf()
        raw["model"] = {"family": "mmd", "perceptual_weight": 0.5}
        scenario_from_dict(raw, source="s.yaml")


def test_fedgen_validate_says_what_the_public_set_trains(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_mepf()))
    capsys.readouterr()
    assert fedgen(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "warm start: release of epsilon 3 per site" in out
    assert "public set digits-28 trains the release generator's perceptual features only, charged nothing" in out


def test_flow_mnist_mepf_is_flow_mnist_with_public_perceptual_features():
    mepf = yaml.safe_load((REPO / "scenarios" / "flow-mnist-mepf.yaml").read_text())
    plain = yaml.safe_load((REPO / "scenarios" / "flow-mnist.yaml").read_text())
    scenario = scenario_from_dict(mepf, source="flow-mnist-mepf.yaml")
    assert scenario.warm_start.public.format == "digits-fonts-28"
    assert scenario.warm_start.release.generator["perceptual_weight"] == 0.7
    assert scenario.warm_start.release.generator["public_filter"] == 0.5
    # nothing else differs from flow-mnist.yaml
    mepf["warm_start"].pop("public")
    for key in ("perceptual_weight", "public_filter"):
        mepf["warm_start"]["release"]["generator"].pop(key)
    assert {**mepf, "name": plain["name"]} == plain


def test_flow_mnist_mepf_validates_against_mnist(mnist_dir, capsys):
    capsys.readouterr()
    assert fedgen(["validate", str(REPO / "scenarios" / "flow-mnist-mepf.yaml"),
                   "--set", f"data.path={mnist_dir}"]) == 0
    assert "public set digits-fonts-28 trains the release generator's perceptual features only" in \
        capsys.readouterr().out


def test_the_perceptual_network_gets_the_public_labels_even_for_an_unconditional_model(tmp_path, digits):
    """It is trained as a classifier: an unconditional family's public set keeps its labels,
    and one without labels is refused before the run, with one line naming the key."""
    scenario = scenario_from_dict(_mepf(data={"format": "digits", "conditional": False, "holdout_fraction": 0.2}))
    arrays = public_set(scenario, SPEC.shape, None)
    assert arrays is not None and sorted(set(arrays["y"].tolist())) == list(range(10))
    np.savez(tmp_path / "unlabelled.npz", x=digits.x.numpy()[:50])
    raw = _mepf(data={"format": "digits", "conditional": False, "holdout_fraction": 0.2})
    raw["warm_start"]["public"] = {"format": "npz", "path": str(tmp_path / "unlabelled.npz")}
    with pytest.raises(ScenarioError) as err:
        public_set(scenario_from_dict(raw), SPEC.shape, None)
    assert str(err.value).startswith("warm_start.public: the perceptual features are trained as a classifier")
    assert "\n" not in str(err.value)


# -- the server -----------------------------------------------------------------------------

def test_the_public_set_trains_the_release_heads_network_only_and_both_records_are_kept(tmp_path, digits):
    scenario = scenario_from_dict(_mepf())
    (tmp_path / rundir.INPUTS).mkdir()
    write_public_set(tmp_path, scenario, SPEC.shape, SPEC.num_classes)
    model = build_global_model(scenario, SPEC)
    assert isinstance(model, ReleaseWarmStart)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    public = public_warm_start(model, tmp_path, scenario)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("head.perceptual.") for k in changed)  # the feature network, nothing else
    assert public["kind"] == "public" and public["public_data"].startswith("digits-28")
    assert public["epsilon_charged"] == 0.0
    assert public["trained"] == "the perceptual feature network of the release's generator"
    assert read_record(tmp_path) == public

    # the release round (two sites, noise-free), then the server's fit and pretraining
    x, y = digits.x[:200], digits.y[:200]
    model.combine_releases(torch.stack([model.statistic_sum(x[:90], y[:90]), model.statistic_sum(x[90:], y[90:])]),
                           torch.zeros(2), 200.0)
    info = model.server_update(0.0)
    assert info["pretrain_examples"] == 50 and bool(model.pretrained)
    write_record(tmp_path, release_record(scenario, info, read_record(tmp_path)))
    record = read_record(tmp_path)
    assert record["kind"] == "public+release" and record["public_data"] == public["public_data"]
    assert record["public"] == public  # the public step's record whole
    assert record["epsilon"] == pytest.approx(3.0) and record["examples"] == 50
    assert "perceptual feature network" in record["guarantee"] and "private data only" in record["guarantee"]
    # a release warm start without a public set writes today's record
    assert release_record(scenario_from_dict(_mepf(perceptual=0.0, public=False)), info, None)["kind"] == "release"


# -- privacy --------------------------------------------------------------------------------

def test_perceptual_features_change_no_sites_ledger(digits):
    """The site's real round 1 (the release) with and without the generator's perceptual
    features: the same sigma, the same accountant history, the same epsilon."""
    ledgers = []
    for perceptual in (0.0, 0.5):
        scenario = scenario_from_dict(_mepf(perceptual=perceptual, public=bool(perceptual)))
        task = TaskConfig.from_json(task_from_scenario(scenario, SPEC).to_json())
        model = build_global_model(scenario, SPEC)
        data = SiteData(x=digits.x[:100], y=digits.y[:100], num_classes=10, source="test")
        site, result, ledger = train_site(task, data, model.state_dict(), site="site-0", server_round=1, ledger=None)
        assert result.status == "trained" and bool(site.released)
        ledgers.append(ledger)
    plain, perceptual = ledgers
    assert plain.accountant_history() and perceptual.accountant_history() == plain.accountant_history()
    assert perceptual.noise_multiplier == plain.noise_multiplier
    assert perceptual.epsilon == pytest.approx(plain.epsilon, rel=1e-12)
    assert perceptual.epsilon == pytest.approx(3.0, abs=0.01)  # the release's 0.3 of 10


@pytest.mark.parametrize("how", ["scaled", "huge", "nan", "inf"])
@pytest.mark.parametrize("family_share", [0.0, 0.5])
def test_the_site_bounds_each_records_release_vector_whatever_network_the_server_sends(how, family_share, digits):
    scenario = scenario_from_dict(_mepf(family_share=family_share))
    task = TaskConfig.from_json(task_from_scenario(scenario, SPEC).to_json())
    server = build_global_model(scenario, SPEC)
    state = _hostile(server.state_dict(), how)
    assert any(".perceptual." in k for k in state)
    site = task.build_model()
    site.load_state_dict(state)
    x, y = digits.x[:30], digits.y[:30]
    per_record = torch.stack([site.statistic_sum(x[i:i + 1], y[i:i + 1]).flatten() for i in range(len(x))])
    assert torch.isfinite(per_record).all() and float(per_record.norm(dim=1).max()) <= 1.0 + 1e-5


# -- end to end -------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_federated_run_with_a_perceptual_release_charges_what_one_without_does(tmp_path, digits, monkeypatch):
    """Through fedgen simulate: the perceptual network trains on the public set only, the
    family on the generator's draws only, summary.json and the report keep both records,
    and every site's ledger equals that of the run without perceptual features."""
    private, public = _split_digits(tmp_path, digits)
    data = {"format": "npz", "path": str(private), "holdout_fraction": 0.2}
    features = _spy(monkeypatch, shared_mmd, name="train_on_public")
    family = _spy(monkeypatch, shared_warm_start)
    plain = _simulate(tmp_path, "plain", _mepf(perceptual=0.0, public=False, data=data))
    assert features == [] and len(family) == 1
    raw = _mepf(data=data)
    raw["warm_start"]["public"] = {"format": "npz", "path": str(public)}
    mepf = _simulate(tmp_path, "mepf", raw)
    assert len(features) == 1 and len(family) == 2
    with np.load(public) as z, np.load(private) as p:
        # the network saw exactly the declared-public set, and no private record
        np.testing.assert_array_equal(features[0][0].reshape(len(z["x"]), -1), z["x"].reshape(len(z["x"]), -1))
        np.testing.assert_array_equal(features[0][1], z["y"])
        assert not _rows(features[0][0]) & _rows(p["x"])
        # the family: the release generator's draws, neither private nor public records
        assert family[1][0].shape == (50, 1, 8, 8)
        assert not _rows(family[1][0]) & (_rows(p["x"]) | _rows(z["x"]))

    assert _site_ledgers(mepf) == _site_ledgers(plain)
    summary = json.loads((mepf / "summary.json").read_text())
    record = summary["warm_start"]
    assert record["kind"] == "public+release" and record["public"]["kind"] == "public"
    assert record["public"]["epsilon_charged"] == 0.0 and record["epsilon"] == pytest.approx(3.0)
    assert summary["status"] == "completed" and summary["epsilon"] <= 10.0 + 1e-6
    report = (mepf / "report.html").read_text()
    assert "a DP release (epsilon 3.0 per site)" in report and f"trained on the public set npz {public}" in report
    assert json.loads((plain / "summary.json").read_text())["warm_start"]["kind"] == "release"
