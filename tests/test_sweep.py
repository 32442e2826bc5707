"""``fedgen sweep``: grid expansion, names, validation, skip/resume decisions and the
comparison without Flower (unit), and one real two-run sweep via the CLI (integration)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from fedgen.contract import rundir
from fedgen.simulations.errors import ScenarioError
from fedgen.simulations.flower_engine import TAG_CHOICE_VAR, FlowerRunError, tagged_pids
from fedgen.contract.scenario import apply_overrides
from fedgen.simulations.sweep import (Combination, SweepFile, expand_combinations, load_sweep, override, plan_sweep,
                               privacy_utility_series, run_action, run_name, run_sweep, scenario_for)

from .conftest import REPO

QUICKSTART = REPO / "scenarios" / "quickstart.yaml"


def write_sweep(folder: Path, **spec) -> Path:
    spec = {"base": str(QUICKSTART), "out": str(folder / "out"), **spec}
    # DP-SGD alone: the quickstart's release warm start spends epsilon 2, over budgets these grids try
    spec["set"] = {"warm_start": None, **spec.get("set", {})}
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def quiet() -> Console:
    return Console(file=open(os.devnull, "w"))


def fake_finished_run(sweep, combination: Combination, **summary) -> Path:
    """A run directory with the combination's scenario and a hand-written summary.json."""
    run_dir = sweep.out_dir / combination.name
    run_dir.mkdir(parents=True)
    (run_dir / rundir.SCENARIO).write_text(yaml.safe_dump(scenario_for(sweep, combination).resolved()))
    (run_dir / rundir.SUMMARY).write_text(json.dumps(summary))
    return run_dir


# -- expansion and names ---------------------------------------------------------------------

def test_variants_cross_the_grid_in_file_order():
    spec = SweepFile(base="b.yaml", grid={"privacy.target_epsilon": [1, 10], "partition.alpha": [0.1, 1.0]},
                     variants={"vae": {}, "flow": {"model": {"family": "flow"}, "training.lr": 0.002}})
    combos = expand_combinations(spec)
    assert [c.name for c in combos] == [
        "vae__privacy.target_epsilon=1__partition.alpha=0.1", "vae__privacy.target_epsilon=1__partition.alpha=1.0",
        "vae__privacy.target_epsilon=10__partition.alpha=0.1", "vae__privacy.target_epsilon=10__partition.alpha=1.0",
        "flow__privacy.target_epsilon=1__partition.alpha=0.1", "flow__privacy.target_epsilon=1__partition.alpha=1.0",
        "flow__privacy.target_epsilon=10__partition.alpha=0.1", "flow__privacy.target_epsilon=10__partition.alpha=1.0"]
    assert combos[5].overrides == ("model={family: flow}", "training.lr=0.002", "privacy.target_epsilon=1",
                                   "partition.alpha=1.0")
    assert combos[5].grid_values == {"privacy.target_epsilon": 1, "partition.alpha": 1.0}
    assert combos[5].series == "flow, partition.alpha=1.0"  # the epsilon target is the x axis, not a line


def test_grid_without_variants_and_names_are_folder_safe():
    spec = SweepFile(base="b.yaml", grid={"data.path": ["a/b c.npz"], "privacy.enabled": [False]})
    combos = expand_combinations(spec)
    assert [c.name for c in combos] == ["data.path=a_b_c.npz__privacy.enabled=false"]
    assert combos[0].variant is None and combos[0].series == "data.path=a/b c.npz, privacy.enabled=false"
    assert run_name("gan", {}) == "gan"
    assert run_name(None, {"privacy.delta": 1e-5, "model": {"family": "flow", "hidden": 64}}) == \
        "privacy.delta=1e-05__model=family=flow,hidden=64"
    assert run_name(None, {"deployment.data_shape": [1, 8, 8]}) == "deployment.data_shape=1,8,8"


@pytest.mark.parametrize("value", [10, 0.5, 1e-5, "10", "1e-5", True, None, "vae", {"family": "flow", "hidden": 64},
                                   [1, 8, 8]])
def test_override_text_reads_back_as_the_same_value(value):
    assert apply_overrides({}, [override("a.b", value)]) == {"a": {"b": value}}


# -- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ({"grdi": {"privacy.target_epsilon": [1]}}, "grdi: unknown key"),
    ({"grid": {"privacy.target_epsilon": 10}}, "grid.privacy.target_epsilon: Input should be a valid list"),
    ({"grid": {"privacy.target_epsilon": []}}, "grid.privacy.target_epsilon: List should have at least 1 item"),
    ({}, "nothing to sweep"),
    ({"grid": {"federation.rounds": [1]}, "variants": {"a": {"federation.rounds": 2}}},
     "variants.a: federation.rounds is also swept by the grid"),
    ({"grid": {"federation.rounds": [1]}, "metric": "fid"}, "metric: unknown metric 'fid'; known: "),
    ({"variants": {"a__b": {}}}, "variant name 'a__b'"),
    ({"grid": {"federation.rounds": [1, "1"]}}, "two combinations would share the folder 'federation.rounds=1'"),
    ({"grid": {"federation.rounds": [1]}, "base": "nope.yaml"}, "base: "),
])
def test_bad_sweep_files_fail_with_one_line_naming_the_key(tmp_path, spec, message):
    path = write_sweep(tmp_path, **spec)
    with pytest.raises(ScenarioError, match=message) as err:
        load_sweep(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_missing_sweep_file(tmp_path):
    with pytest.raises(ScenarioError, match="sweep file not found"):
        load_sweep(tmp_path / "missing.yaml")


def test_base_is_relative_to_the_sweep_file_and_out_to_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "scenarios").mkdir()
    (tmp_path / "scenarios" / "mine.yaml").write_text(QUICKSTART.read_text())
    path = tmp_path / "sweeps" / "s.yaml"
    path.write_text("base: ../scenarios/mine.yaml\ngrid: {federation.rounds: [1]}\nset: {seed: 3}\n")
    monkeypatch.chdir(tmp_path)
    sweep = load_sweep("sweeps/s.yaml", overrides=["training.lr=0.5"])
    assert sweep.out_dir == tmp_path / "runs" / "sweeps" / "s"
    scenario = scenario_for(sweep, sweep.combinations[0])
    assert (scenario.seed, scenario.training.lr, scenario.federation.rounds) == (3, 0.5, 1)
    assert load_sweep("sweeps/s.yaml", out="elsewhere").out_dir == tmp_path / "elsewhere"


def test_bad_value_in_the_seventh_combination_fails_before_any_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("fedgen.simulations.runner.run_simulation_dir", lambda *a, **k: calls.append(a))
    path = write_sweep(tmp_path, grid={"federation.rounds": [1, 2, 3, 4, 5, 6, "seven", 8]})
    with pytest.raises(ScenarioError) as err:
        run_sweep(load_sweep(path), console=quiet())
    assert str(err.value) == (f"{path}: run 'federation.rounds=seven': federation.rounds: Input should be a valid "
                              "integer, unable to parse string as an integer (got 'seven')")
    assert calls == [] and not (tmp_path / "out").exists()


def test_data_problem_in_one_combination_is_found_before_any_run(tmp_path):
    path = write_sweep(tmp_path, variants={"small": {}, "huge": {"federation.num_sites": 2000}})
    with pytest.raises(ScenarioError, match=r"run 'huge': 1438 examples cannot give 2000 sites"):
        plan_sweep(load_sweep(path))


def test_cli_reports_a_bad_combination_in_one_line(tmp_path):
    path = write_sweep(tmp_path, grid={"privacy.target_epsilon": [1, -2]})
    res = subprocess.run([sys.executable, "-m", "fedgen.simulations.cli", "sweep", str(path)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("fedgen: error:")
    assert "run 'privacy.target_epsilon=-2': privacy.target_epsilon: Input should be greater than 0" in lines[0]
    assert "Traceback" not in res.stderr + res.stdout and not (tmp_path / "out").exists()


# -- skip / resume / restart ------------------------------------------------------------------

@pytest.fixture
def one_run_sweep(tmp_path):
    return load_sweep(write_sweep(tmp_path, grid={"privacy.target_epsilon": [5]}))


@pytest.mark.parametrize("summary, checkpoint, action", [
    ({"stopped_reason": "completed"}, True, "skip"),
    ({"stopped_reason": "budget_exhausted"}, False, "skip"),
    ({"stopped_reason": "interrupted"}, True, "resume"),
    ({"stopped_reason": "failed"}, True, "resume"),
    ({"stopped_reason": "interrupted"}, False, "restart"),
    (None, False, "restart"),
])
def test_what_a_rerun_does_with_an_existing_run(one_run_sweep, summary, checkpoint, action):
    combination = one_run_sweep.combinations[0]
    run_dir = fake_finished_run(one_run_sweep, combination, **(summary or {}))
    if summary is None:
        (run_dir / rundir.SUMMARY).unlink()
    if checkpoint:
        (run_dir / rundir.CHECKPOINTS).mkdir()
        (run_dir / rundir.CHECKPOINTS / "latest.pt").write_bytes(b"")
    assert run_action(run_dir, scenario_for(one_run_sweep, combination), "s") == action


def test_a_new_run_and_a_foreign_or_changed_folder(one_run_sweep):
    combination = one_run_sweep.combinations[0]
    scenario = scenario_for(one_run_sweep, combination)
    run_dir = one_run_sweep.out_dir / combination.name
    assert run_action(run_dir, scenario, "s") == "new"
    run_dir.mkdir(parents=True)
    with pytest.raises(ScenarioError, match="exists but is not a fedgen run directory"):
        run_action(run_dir, scenario, "s")
    changed = scenario.resolved()
    changed["federation"]["rounds"] = 99
    (run_dir / rundir.SCENARIO).write_text(yaml.safe_dump(changed))
    with pytest.raises(ScenarioError, match=r"was run with federation.rounds=99, the sweep now says 5"):
        run_action(run_dir, scenario, "s")


# -- the comparison ------------------------------------------------------------------------------

SUMMARIES = {
    "vae__privacy.target_epsilon=1": {"epsilon": 0.98, "metrics": {"fid_domain": 300.5, "precision": 0.5}},
    "vae__privacy.target_epsilon=10": {"epsilon": 9.7, "metrics": {"fid_domain": 120.25, "precision": 0.75}},
    "flow__privacy.target_epsilon=1": {"epsilon": 0.99, "metrics": {"fid_domain": 400.0,
                                                                     "heldout_nll_bits_per_dim": 1.5}},
    "flow__privacy.target_epsilon=10": {"epsilon": 9.9, "metrics": {"fid_domain": 200.0,
                                                                     "heldout_nll_bits_per_dim": 1.25}},
}


@pytest.fixture
def finished_sweep(tmp_path):
    """Four runs that already finished (hand-written summaries): a re-run skips them all."""
    sweep = load_sweep(write_sweep(tmp_path, grid={"privacy.target_epsilon": [1, 10]},
                                   variants={"vae": {}, "flow": {"model": {"family": "flow"}}}))
    for combination in sweep.combinations:
        fake_finished_run(sweep, combination, rounds_completed=3, stopped_reason="completed", model="m",
                          delta=1e-5, site_level_epsilon=None, wall_seconds=12.5, **SUMMARIES[combination.name])
    return sweep


def test_rerun_of_a_finished_sweep_skips_every_run_and_writes_the_comparison(finished_sweep, monkeypatch):
    monkeypatch.setattr("fedgen.simulations.runner.run_simulation_dir", lambda *a, **k: pytest.fail("ran a finished run"))
    outcome = run_sweep(finished_sweep, console=quiet())
    assert outcome.failed == []
    with open(finished_sweep.out_dir / "comparison.csv") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["run", "variant", "privacy.target_epsilon", "epsilon", "fid_domain", "precision",
                              "heldout_nll_bits_per_dim", "rounds_completed", "wall_seconds", "stopped_reason"]
    assert [r["run"] for r in table] == list(SUMMARIES)
    assert table[1] == {"run": "vae__privacy.target_epsilon=10", "variant": "vae", "privacy.target_epsilon": "10",
                        "epsilon": "9.7", "fid_domain": "120.25", "precision": "0.75", "heldout_nll_bits_per_dim": "",
                        "rounds_completed": "3", "wall_seconds": "12.5", "stopped_reason": "completed"}
    assert table[3]["heldout_nll_bits_per_dim"] == "1.25" and table[3]["precision"] == ""
    md = (finished_sweep.out_dir / "comparison.md").read_text()
    assert "| flow__privacy.target_epsilon=1 | flow | 1 | 0.99 | 400 |  | 1.5 | 3 | 12.5 | completed |" in md
    assert outcome.table in md
    assert outcome.plot == finished_sweep.out_dir / "privacy_utility.png" and outcome.plot.stat().st_size > 1000


def test_privacy_utility_series_one_line_per_variant_and_no_dp_baselines():
    combos = [Combination(v, {"privacy.target_epsilon": e}, ()) for v in ("a", "b") for e in (10, 1)]
    combos.append(Combination("nodp", {}, ()))
    rows = [{"epsilon": 9.5, "fid_domain": 100.0}, {"epsilon": 0.9, "fid_domain": 300.0},
            {"epsilon": 9.0, "fid_domain": 150.0}, {"epsilon": 1.0, "fid_domain": None},
            {"epsilon": None, "site_level_epsilon": None, "fid_domain": 50.0}]
    lines, no_dp = privacy_utility_series(rows, combos, "fid_domain")
    assert lines == {"a": [(0.9, 300.0), (9.5, 100.0)], "b": [(9.0, 150.0)]}
    assert no_dp == {"nodp": 50.0}
    site_rows = [{"epsilon": 9.5, "site_level_epsilon": 2.0, "fid_domain": 1.0}]
    assert privacy_utility_series(site_rows, combos[:1], "fid_domain", site_level=True)[0] == {"a": [(2.0, 1.0)]}


# -- running: failures, Ctrl-C ---------------------------------------------------------------------

def fake_runner(outcomes: dict[str, str]):
    """A stand-in for run_simulation_dir: writes the summary the named outcome leaves."""
    def run(run_dir, scenario, **_):
        reason = outcomes[run_dir.name]
        if reason == "ctrl-c":
            raise KeyboardInterrupt
        if reason == "failed":
            (run_dir / rundir.SUMMARY).write_text(json.dumps({"stopped_reason": "failed", "rounds_completed": 0}))
            raise FlowerRunError("the run failed")
        summary = {"stopped_reason": reason, "rounds_completed": 1, "epsilon": 1.0, "wall_seconds": 1.0,
                   "metrics": {"fid_domain": 10.0}}
        (run_dir / rundir.SUMMARY).write_text(json.dumps(summary))
        return summary
    return run


def test_a_failed_run_does_not_stop_the_sweep(tmp_path, monkeypatch):
    sweep = load_sweep(write_sweep(tmp_path, grid={"privacy.target_epsilon": [1, 10]}))
    monkeypatch.setattr("fedgen.simulations.runner.run_simulation_dir", fake_runner(
        {"privacy.target_epsilon=1": "failed", "privacy.target_epsilon=10": "completed"}))
    outcome = run_sweep(sweep, console=quiet())
    assert outcome.failed == ["privacy.target_epsilon=1"]
    assert [r["stopped_reason"] for r in outcome.rows] == ["failed", "completed"]
    assert (sweep.out_dir / "privacy.target_epsilon=10" / rundir.PARTITIONS).exists()  # prepared for real


def test_ctrl_c_stops_the_sweep_before_the_next_run(tmp_path, monkeypatch):
    sweep = load_sweep(write_sweep(tmp_path, grid={"privacy.target_epsilon": [1, 10]}))
    monkeypatch.setattr("fedgen.simulations.runner.run_simulation_dir", fake_runner({"privacy.target_epsilon=1": "ctrl-c"}))
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, console=quiet())
    assert (sweep.out_dir / "privacy.target_epsilon=1").exists()
    assert not (sweep.out_dir / "privacy.target_epsilon=10").exists()
    assert not (sweep.out_dir / "comparison.csv").exists()


# -- a real sweep on Flower ----------------------------------------------------------------------

TAG = f"pytest-sweep-{os.getpid()}"


def fedgen_sweep(path: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedgen.simulations.cli", "sweep", str(path)], cwd=cwd,
                          env={**os.environ, TAG_CHOICE_VAR: TAG}, capture_output=True, text=True, timeout=600)


@pytest.mark.integration
def test_real_2x2_sweep_then_a_rerun_skips_every_run(tmp_path):
    path = write_sweep(tmp_path, name="tiny", grid={"privacy.target_epsilon": [2, 10], "training.lr": [0.01, 0.02]},
                       set={"federation.rounds": 1, "federation.num_sites": 2, "training.local_steps": 5,
                            "evaluation.num_samples": 100})
    res = fedgen_sweep(path, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "out"
    with open(out / "comparison.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["run"] for r in table] == [f"privacy.target_epsilon={e}__training.lr={lr}"
                                         for e in (2, 10) for lr in (0.01, 0.02)]
    for row in table:
        summary = json.loads((out / row["run"] / "summary.json").read_text())
        assert summary["stopped_reason"] == "completed" and summary["rounds_completed"] == 1
        assert (out / row["run"] / "checkpoints" / "latest.pt").exists()
        assert float(row["epsilon"]) == summary["epsilon"] <= float(row["privacy.target_epsilon"])
        for key in ("fid_domain", "precision", "recall", "coverage"):
            assert float(row[key]) == summary["metrics"][key], key
        assert float(row["wall_seconds"]) == summary["wall_seconds"]
    assert (out / "privacy_utility.png").stat().st_size > 1000
    assert "| privacy.target_epsilon=2__training.lr=0.01 |" in res.stdout and (out / "comparison.md").exists()
    assert tagged_pids(TAG) == []

    metrics_before = {r["run"]: (out / r["run"] / "metrics.jsonl").read_text() for r in table}
    again = fedgen_sweep(path, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("skipped (completed)") == 4
    assert {r["run"]: (out / r["run"] / "metrics.jsonl").read_text() for r in table} == metrics_before
    with open(out / "comparison.csv") as fh:
        assert list(csv.DictReader(fh)) == table
    assert tagged_pids(TAG) == []
