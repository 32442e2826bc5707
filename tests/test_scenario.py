"""Scenario schema: defaults, overrides, and one-line errors with the key path."""

from __future__ import annotations

import pytest

from fedgen.simulations.errors import ScenarioError
from fedgen.contract.scenario import Scenario, apply_overrides, load_scenario, scenario_from_dict

from .conftest import REPO


def test_quickstart_resolves_every_default():
    s = load_scenario(REPO / "scenarios" / "quickstart.yaml")
    r = s.resolved()
    assert r["privacy"]["enabled"] and r["privacy"]["target_epsilon"] == 10.0
    assert r["federation"]["num_sites"] == 5 and r["model"]["family"] == "vae"
    assert set(r) == set(Scenario.model_fields)


def test_overrides_are_typed():
    raw = apply_overrides({"privacy": {"target_epsilon": 10}}, ["privacy.target_epsilon=0.5", "privacy.delta=1e-6",
                                                                 "federation.rounds=50", "privacy.enabled=false"])
    s = scenario_from_dict(raw)
    assert s.privacy.target_epsilon == 0.5 and s.privacy.delta == 1e-6
    assert s.federation.rounds == 50 and s.privacy.enabled is False


@pytest.mark.parametrize("raw, message", [
    ({"federaton": {}}, "federaton: unknown key"),
    ({"federation": {"rounds": "many"}}, "federation.rounds: Input should be a valid integer"),
    ({"partition": {"alpha": 0}}, "partition.alpha: Input should be greater than 0"),
    ({"privacy": {"target_epsilon": -1}}, "privacy.target_epsilon"),
    ({"model": {"family": "transformer"}}, "unknown model family 'transformer'; registered: "),
    ({"model": {"family": "vae", "hiden": 3}}, "hiden not accepted by family 'vae'; accepted: "),
    ({"data": {"format": "npz"}}, "data.path is required"),
])
def test_errors_name_the_key(raw, message):
    with pytest.raises(ScenarioError, match=message) as err:
        scenario_from_dict(raw, source="s.yaml")
    assert str(err.value).startswith("s.yaml: ") and "\n" not in str(err.value)


def test_bad_override_and_bad_file(tmp_path):
    with pytest.raises(ScenarioError, match="expected key.path=value"):
        apply_overrides({}, ["privacy.target_epsilon"])
    with pytest.raises(ScenarioError, match="scenario file not found"):
        load_scenario(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(tmp_path / "bad.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "scenarios").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_scenario_loads_under_its_file_name(path):
    assert load_scenario(path).name == path.stem


def test_every_model_family_has_a_digits_scenario():
    from fedgen.shared_models.registry import list_models
    families = {load_scenario(p).model.family for p in (REPO / "scenarios").glob("*-digits.yaml")}
    families.add(load_scenario(REPO / "scenarios" / "quickstart.yaml").model.family)
    assert families == set(list_models())
