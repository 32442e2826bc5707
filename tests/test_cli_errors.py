"""Bad input: one line naming the problem, exit != 0, no traceback, no run directory."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml

from .conftest import REPO


def fedgen(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fedgen.simulations.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _scenario(tmp_path, **sections):
    base = yaml.safe_load((REPO / "scenarios" / "quickstart.yaml").read_text())
    for key, value in sections.items():
        another_family = key == "model" and value.get("family", base["model"]["family"]) != base["model"]["family"]
        if isinstance(value, dict) and isinstance(base.get(key), dict) and not another_family:
            base[key].update(value)
        else:
            base[key] = value
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def _nan_npz(tmp_path):
    x = np.random.default_rng(0).random((50, 8, 8)).astype(np.float32)
    x[7, 3, 3] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(50) % 10)
    return tmp_path / "nan.npz"


CASES = {
    "unknown key": (dict(federaton={"rounds": 2}), "federaton: unknown key"),
    "wrong type": (dict(federation={"rounds": "two"}), "federation.rounds: Input should be a valid integer"),
    "missing data file": (dict(data={"format": "npz", "path": "/nonexistent/site.npz"}), "site.npz: file not found"),
    "alpha <= 0": (dict(partition={"name": "dirichlet", "alpha": 0}), "partition.alpha: Input should be greater than 0"),
    "release share not a fraction": (dict(warm_start={"release": {"epsilon_fraction": 1.0}}),
                                     "warm_start.release.epsilon_fraction: must lie in (0, 1)"),
    "flow's old release key": (dict(model={"family": "flow", "levels": 17, "base_release_epsilon": 4.0}),
                               "model: base_release_epsilon: the flow's release became the warm start"),
}


@pytest.mark.parametrize("command", ["validate", "simulate"])
@pytest.mark.parametrize("case", [*CASES, "nan data"])
def test_bad_scenarios_fail_cleanly(tmp_path, command, case):
    if case == "nan data":
        sections, message = dict(data={"format": "npz", "path": str(_nan_npz(tmp_path))}), "NaN/Inf"
    else:
        sections, message = CASES[case]
    res = fedgen(command, _scenario(tmp_path, **sections), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, res.stderr
    assert message in lines[0] and lines[0].startswith("fedgen: error:")
    assert "Traceback" not in res.stderr + res.stdout
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_validate_ok_reports_the_plan(tmp_path):
    res = fedgen("validate", REPO / "scenarios" / "quickstart.yaml", "--set", "federation.num_sites=3", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "3 sites" in res.stdout and "DP target epsilon 10" in res.stdout and "1797 examples" in res.stdout


def test_help_for_every_command(tmp_path):
    for cmd in ("simulate", "validate", "sample"):
        res = fedgen(cmd, "--help", cwd=tmp_path)
        assert res.returncode == 0 and "usage: fedgen " + cmd in res.stdout


def test_sample_on_a_non_run_dir(tmp_path):
    res = fedgen("sample", tmp_path, "-n", "4", "--out", tmp_path / "x.npz", cwd=tmp_path)
    assert res.returncode == 2 and "not a fedgen run directory" in res.stderr


def test_finding10_sample_labels_that_are_not_integers(tmp_path):
    res = fedgen("sample", tmp_path, "-n", "4", "--out", tmp_path / "x.npz", "--labels", "1,a", cwd=tmp_path)
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "--labels: 'a' is not a class index; give comma-separated integers in 0..K-1" in lines[0]


def test_finding10_audit_of_a_run_with_a_corrupted_privacy_json(tmp_path):
    from fedgen.contract import rundir
    from fedgen.simulations.prepare import write_run_dir
    from fedgen.contract.scenario import load_scenario

    import torch

    from fedgen.contract.task import build_global_model

    scenario = load_scenario(REPO / "scenarios" / "quickstart.yaml")
    run_dir = write_run_dir(scenario, tmp_path / "run")
    (run_dir / rundir.CHECKPOINTS).mkdir()  # a finished round's model, so the audit gets as far as the ledger
    model = build_global_model(scenario, rundir.DataSpec.read(run_dir))
    torch.save({"model": model.state_dict()}, run_dir / rundir.CHECKPOINTS / "latest.pt")
    (run_dir / rundir.PRIVACY).write_text('{"delta": 1e-5, "sites": {')
    res = fedgen("audit", run_dir, "-n", "10", cwd=tmp_path)
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "privacy.json: unreadable privacy ledger (JSONDecodeError" in lines[0] and "Traceback" not in res.stderr
