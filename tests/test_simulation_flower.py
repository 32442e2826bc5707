"""End to end via the CLI: Flower's real simulation runtime (SuperLink + Ray), and the
integration behaviours -- Ctrl-C, faults and stragglers, resume after a kill, site-level
DP -- on both engines (``ENGINES``: the in-process variant in the fast tier, the Flower
variant, 20 s or more each here, marked slow).

Few, longer runs (each Flower start costs ~20 s here): one quickstart run shared by most
assertions, one run at a tight budget, one interrupted run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedgen.privacy.accounting import make_accountant
from fedgen.simulations.flower_engine import TAG_CHOICE_VAR, tagged_pids

from .conftest import REPO

pytestmark = pytest.mark.integration


TAG = f"pytest-{os.getpid()}"  # every Flower process our runs start carries it


def _env():
    return {**os.environ, TAG_CHOICE_VAR: TAG}


def fedgen(*args, cwd, timeout=900):
    return subprocess.run([sys.executable, "-m", "fedgen.simulations.cli", *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


QUICK = ["training.local_steps=5", "evaluation.every=0", "evaluation.num_samples=100"]
# a scenario's release warm start (the quickstart's), kept but short: the generator fit and
# the pretraining cost ~30 s at the scenario's settings
QUICK_WARM = ["warm_start.steps=50", "warm_start.release.generator_steps=50", "warm_start.release.samples=500"]
FLOWER = "simulation.engine=flower"  # these tests are about Flower's runtime; the default engine is in-process
# Behaviours every engine must have: each test taking ``engine`` runs on both.
ENGINES = [pytest.param("inprocess"), pytest.param("flower", marks=pytest.mark.slow)]


def quick_run(tmp_path: Path, scenario: str, *overrides: str) -> Path:
    """A short ``fedgen simulate`` of ``scenarios/<scenario>.yaml`` (5 local steps, no
    evaluation before the end) with ``key=value`` overrides; returns the run directory."""
    out = tmp_path / "run"
    path = REPO / "scenarios" / f"{scenario}.yaml"
    warm = QUICK_WARM if "warm_start" in yaml.safe_load(path.read_text()) else []
    sets = [a for item in (FLOWER, *QUICK, *warm, *overrides) for a in ("--set", item)]
    res = fedgen("simulate", path, "--out", out, *sets, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def fedgen_processes() -> list[int]:
    """Live processes (SuperLink, SuperExec, flwr-simulation, Ray) started by our runs."""
    return tagged_pids(TAG)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("quickstart")
    out = cwd / "run"
    res = fedgen("simulate", REPO / "scenarios" / "quickstart.yaml", "--out", out, "--set", FLOWER, cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_quickstart_writes_the_run_directory(quickstart_run):
    for name in ("scenario.yaml", "metrics.jsonl", "privacy.json", "summary.json", "report.html",
                 "checkpoints/latest.pt"):
        assert (quickstart_run / name).exists(), name
    summary = json.loads((quickstart_run / "summary.json").read_text())
    assert summary["rounds_completed"] >= 3 and summary["stopped_reason"] == "completed"
    assert 0 < summary["epsilon"] <= 10.0 and summary["delta"] == 1e-5
    assert len(list((quickstart_run / "samples").glob("round-*.png"))) == summary["rounds_completed"]
    html = (quickstart_run / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') >= 2
    # the default: secret noise, no warning (finding 1 of issue #17)
    assert summary["seeded_noise"] is False and "warning" not in summary and "Privacy warning" not in html
    assert [g["noise"] for g in summary["guarantees"]] == ["secret: fresh OS entropy every round"]


def test_metrics_epsilon_strictly_increases(quickstart_run):
    rows = [json.loads(l) for l in (quickstart_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, len(rows) + 1))
    eps = [r["epsilon"] for r in rows]
    assert all(b > a for a, b in zip(eps, eps[1:])), eps
    assert all(r["clients_ok"] == 5 and r["clients_failed"] == 0 for r in rows)
    assert all(np.isfinite(r["fid_domain"]) for r in rows)


def test_privacy_ledger_recomputes_with_a_fresh_accountant(quickstart_run):
    ledger = json.loads((quickstart_run / "privacy.json").read_text())
    assert ledger["unit"] == "example" and ledger["accountant"] == "rdp" and ledger["site_level"] is None
    assert set(ledger["sites"]) == {"0", "1", "2", "3", "4"}
    for site in ledger["sites"].values():
        history = site["history"]
        assert [h["round"] for h in history] == list(range(1, len(history) + 1))
        assert site["steps"] == sum(h["steps"] for h in history)
        acc = make_accountant(ledger["accountant"])
        acc.history = [(h["noise_multiplier"], h["sample_rate"], h["steps"]) for h in history]
        assert site["epsilon"] == pytest.approx(acc.get_epsilon(delta=ledger["delta"]), rel=0.01)
        assert site["epsilon"] <= ledger["target_epsilon"]
    assert ledger["epsilon"] == pytest.approx(max(s["epsilon"] for s in ledger["sites"].values()))


def test_sample_command_writes_data_in_range(quickstart_run, tmp_path):
    res = fedgen("sample", quickstart_run, "-n", "30", "--out", tmp_path / "s.npz", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    with np.load(tmp_path / "s.npz") as z:
        assert z["x"].shape == (30, 1, 8, 8) and z["x"].min() >= 0 and z["x"].max() <= 1
        assert np.bincount(z["y"]).tolist() == [3] * 10
    res = fedgen("sample", quickstart_run, "-n", "20", "--labels", "7", "--out", tmp_path / "s.png", cwd=tmp_path)
    assert res.returncode == 0 and (tmp_path / "s.png").stat().st_size > 100


def test_no_flower_or_ray_process_survives(quickstart_run):
    assert fedgen_processes() == []


def test_tight_budget_is_never_overspent(tmp_path):
    out = tmp_path / "run"
    res = fedgen("simulate", REPO / "scenarios" / "quickstart.yaml", "--out", out, "--set", FLOWER,
                 "--set", "privacy.target_epsilon=0.5", "--set", "warm_start=null",  # DP-SGD's budget alone
                 "--set", "federation.rounds=50", "--set", "evaluation.every=25", "--set", "evaluation.num_samples=100",
                 cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["epsilon"] <= 0.5
    eps = [json.loads(l)["epsilon"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(eps) <= 0.5
    assert fedgen_processes() == []


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_stops_every_process(tmp_path, presses, engine):
    """Ctrl-C stops the run and every Flower/Ray process; so does pressing it twice (the
    second press lands in the shutdown, which must still end every process)."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fedgen.simulations.cli", "simulate",
                             str(REPO / "scenarios" / "quickstart.yaml"), "--out", str(out),
                             "--set", f"simulation.engine={engine}", "--set", "federation.rounds=40",
                             *[a for w in QUICK_WARM for a in ("--set", w)]], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        # round 1 recorded and checkpointed (in-process, a Ctrl-C between the two lands in the
        # ServerApp itself and leaves round 1 not resumable)
        checkpoint = out / "checkpoints" / "latest.pt"
        while time.time() < deadline and not ((out / "metrics.jsonl").exists() and checkpoint.exists()):
            time.sleep(0.2)
        assert checkpoint.exists(), "the run never finished a round"
        assert bool(fedgen_processes()) == (engine == "flower"), "Flower processes exactly when on Flower"
        proc.send_signal(signal.SIGINT)
        if presses == 2:
            time.sleep(1.0)
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert fedgen_processes() == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_reason"] == "interrupted" and summary["resumable"] is True


@pytest.mark.parametrize("engine", ENGINES)
def test_resume_after_kill_gives_the_uninterrupted_ledger(tmp_path, engine):
    """SIGKILL the whole process tree mid-run, resume: no DP step is charged twice or
    forgotten, and metrics.jsonl has each round once."""
    scenario = REPO / "scenarios" / "quickstart.yaml"
    common = ["--set", f"simulation.engine={engine}", "--set", "federation.rounds=4", "--set", "training.local_steps=5", "--set", "evaluation.every=0", "--set", "evaluation.num_samples=50", "--set", "warm_start=null"]
    ref = tmp_path / "uninterrupted"
    assert fedgen("simulate", scenario, "--out", ref, *common, cwd=tmp_path).returncode == 0

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fedgen.simulations.cli", "simulate", str(scenario), "--out", str(out),
                             *common], cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "checkpoints" / "model-round-0002.pt").exists():
            time.sleep(0.2)
        assert (out / "checkpoints" / "model-round-0002.pt").exists(), "round 2 never finished"
    finally:
        proc.kill()  # SIGKILL the CLI and every Flower/Ray process it started
        for pid in fedgen_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    assert not (out / "summary.json").exists() or json.loads((out / "summary.json").read_text())["rounds_completed"] < 4

    res = fedgen("simulate", "--resume", out, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rounds = [json.loads(l)["round"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4]

    def ledger(run):
        d = json.loads((run / "privacy.json").read_text())
        return {site: [(h["round"], h["steps"], h["noise_multiplier"], h["sample_rate"]) for h in s["history"]]
                for site, s in d["sites"].items()}, d["epsilon"]

    assert ledger(out) == ledger(ref)
    assert fedgen_processes() == []


@pytest.mark.parametrize("engine", ENGINES)
def test_example_and_site_level_dp_are_both_reported(tmp_path, engine):
    out = quick_run(tmp_path, "site-dp-digits", f"simulation.engine={engine}", "federation.rounds=3")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy_unit"] == "both"
    units = {g["unit"]: g for g in summary["guarantees"]}
    assert set(units) == {"example", "site"}
    assert 0 < units["example"]["epsilon"] <= 10.0 and 0 < units["site"]["epsilon"] <= 10.0
    assert units["site"]["delta"] == 1e-3 and summary["site_level_epsilon"] == units["site"]["epsilon"]
    # the scenario opts in to seeded noise: every guarantee and the report say it is none
    assert summary["seeded_noise"] is True and "not a privacy guarantee" in summary["warning"]
    assert all("not a privacy guarantee" in g["noise"] for g in units.values())
    assert "Privacy warning" in (out / "report.html").read_text()

    block = json.loads((out / "privacy.json").read_text())["site_level"]
    assert block["rounds"] == 3 and block["sample_rate"] == 0.5 and block["num_sites"] == 20
    fresh = make_accountant("rdp", [(block["noise_multiplier"], 0.5, 3)]).get_epsilon(delta=1e-3)
    assert block["epsilon"] == pytest.approx(fresh, rel=0.01)
    assert block["noise_std"] == pytest.approx(block["noise_multiplier"] * 1.0 / (0.5 * 20))

    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    site_eps = [r["site_level_epsilon"] for r in rows]
    assert site_eps == sorted(site_eps) and site_eps[-1] == pytest.approx(block["epsilon"])
    assert all(0 <= r["clients_sampled"] <= 20 for r in rows)
    assert sum(r["clients_sampled"] for r in rows) not in (0, 60)  # Poisson, not "all" or "none"
    assert fedgen_processes() == []


@pytest.mark.parametrize("engine", ENGINES)
def test_simulated_faults_are_seeded_recorded_and_charged(tmp_path, engine):
    from fedgen.contract.scenario import FaultsConfig
    from fedgen.simulations.faults import plan_faults

    faults = {"dropout": 0.3, "crash": 0.2, "straggler": 0.3, "straggler_delay_s": [0.5, 1.5], "seed": 4}
    out = quick_run(tmp_path, "quickstart", f"simulation.engine={engine}", "federation.rounds=3",
                    *[f"simulation.faults.{k}={v}" for k, v in faults.items()])
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    ledger = json.loads((out / "privacy.json").read_text())["sites"]
    trained = {str(s): set() for s in range(5)}
    for row in rows:
        plan = {str(s): plan_faults(FaultsConfig(**faults), str(s), row["round"]) for s in range(5)}
        dropped = sorted(s for s, p in plan.items() if p.dropout)
        crashed = [s for s, p in plan.items() if p.crash]
        delayed = {s: p.delay_s for s, p in plan.items() if p.delay_s and not p.crash}
        assert row["faults"]["dropped_out"] == dropped
        assert len(row["faults"]["errors"]) == len(crashed) and row["faults"]["late"] == []
        assert row["faults"]["delayed_s"] == {s: pytest.approx(d, abs=0.01) for s, d in delayed.items()}
        assert row["clients_ok"] == 5 - len(dropped) - len(crashed)
        for s, p in plan.items():
            if not p.dropout:
                trained[s].add(row["round"])
    # a crashed site spent budget it never released: privacy.json still counts it
    assert {s: {h["round"] for h in v["history"]} for s, v in ledger.items()} == \
        {s: r for s, r in trained.items() if r}
    assert fedgen_processes() == []


@pytest.mark.parametrize("engine, delay_s, timeout_s", [
    # in-process, sites run in turn and the deadline applies to each reply's own duration, so
    # a short delay past a short deadline is the same case -- without sleeping 100 s
    pytest.param("inprocess", 12.0, 8, id="inprocess"),
    # on Flower the deadline runs from the round's start and must cover the actors' start-up
    pytest.param("flower", 100.0, 45, id="flower", marks=pytest.mark.slow)])
def test_a_straggler_past_the_deadline_is_left_out_of_its_round(tmp_path, engine, delay_s, timeout_s):
    from fedgen.contract.scenario import FaultsConfig
    from fedgen.simulations.faults import plan_faults

    faults = {"dropout": 0.0, "crash": 0.0, "straggler": 0.25, "straggler_delay_s": [delay_s, delay_s], "seed": 2}
    plan = {r: [s for s in range(5) if plan_faults(FaultsConfig(**faults), str(s), r).delay_s] for r in (1, 2)}
    assert plan == {1: [4], 2: []}  # site 4 replies delay_s late in round 1 only
    out = quick_run(tmp_path, "quickstart", f"simulation.engine={engine}", "federation.rounds=2",
                    f"federation.round_timeout_s={timeout_s}",
                    *[f"simulation.faults.{k}={v}" for k, v in faults.items()])
    first, second = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert first["clients_ok"] == 4 and len(first["faults"]["late"]) == 1
    assert [f["reason"] for f in first["failures"]] == ["no reply before the round timeout"]
    assert second["clients_ok"] == 5 and second["faults"]["late"] == []
    # the straggler spent budget in round 1 although its update was dropped: still in the ledger
    history = json.loads((out / "privacy.json").read_text())["sites"]["4"]["history"]
    assert [h["round"] for h in history] == [1, 2]
    assert fedgen_processes() == []


def test_mmd_release_round_fits_to_the_known_noise_level(tmp_path, mnist_dir):
    out = quick_run(tmp_path, "mnist-utility", f"data.path={mnist_dir}", "privacy.target_epsilon=1", "model.num_features=400",
                    "model.hidden=32", "model.fit_steps=60", "model.fit_tolerance=30", "model.fit_cooldown=0.25",
                    "evaluation.tstr=false")
    (row,) = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    sites = json.loads((out / "privacy.json").read_text())["sites"]
    assert row["clients_ok"] == len(sites) == 10 and 0.99 <= row["epsilon"] <= 1.0
    sigmas = [s["noise_multiplier"] for s in sites.values()]
    # FedAvg of the 10 noisy means would carry sum_k sigma_k^2 / N^2 per coordinate (N = 8 000
    # training images), over 10 classes x 400 features; weighting each site's class means by
    # their precision keeps the noise of sites that hardly hold a class out of it (label
    # skew: 2.5x less on this partition)
    fedavg_energy = sum(s * s for s in sigmas) / 8000 ** 2 * 10 * 400
    assert 0.25 * fedavg_energy < row["release_noise_energy"] < 0.6 * fedavg_energy
    assert row["release_noise_energy"] == pytest.approx(row["release_noise_variance"] * 10 * 400)
    # with fit_tolerance 30 the fit reaches 30x that energy within the 60 steps, then anneals for a
    # quarter as many steps again (fit_cooldown)
    reached = row["server_fit_noise_reached"]
    assert 20 < reached < row["server_fit_steps"] == min(60, reached + math.ceil(0.25 * reached))
    (guarantee,) = json.loads((out / "summary.json").read_text())["guarantees"]
    assert guarantee["mechanism"].startswith("one Gaussian release")  # not "DP-SGD": no site ran it


def test_flow_hybrid_releases_class_means_then_trains_by_dp_sgd(tmp_path):
    out = quick_run(tmp_path, "flow-digits", "federation.rounds=2", "model.hidden=8", "model.coupling_layers=2",
                    "evaluation.num_samples=100")
    first, second = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    sites = json.loads((out / "privacy.json").read_text())["sites"]
    assert first["clients_ok"] == second["clients_ok"] == len(sites) == 5
    # round 1: one release at q = 1 per site; the server combined them (their noise energy is
    # known); round 2: DP-SGD, and the composed epsilon stays within the target
    assert first["release_noise_variance"] > 0 and "release_noise_variance" not in second
    for site in sites.values():
        release, sgd = site["history"]
        assert release["sample_rate"] == 1.0 and release["steps"] == 1 and sgd["sample_rate"] < 1.0
        assert 4.0 < site["epsilon"] <= 10.0
    (guarantee,) = json.loads((out / "summary.json").read_text())["guarantees"]
    assert "release" in guarantee["mechanism"] and "DP-SGD" in guarantee["mechanism"]
