"""How a run ended (issue #23 items 1, 2): ``summary.json``'s ``status`` and per-site table,
a deployed ServerApp that fails when its run did not complete, ``fedgen status``, and
federated evaluation as an explicit scenario choice (``evaluation.federated``).

Fast: the status rules on ``metrics.jsonl`` rows; deployed runs of the real ServerApp and
ClientApp over the in-process grid (sites configured as SuperNodes are: ``data-path``,
``state-dir``), which record every message the server sends.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.run import Run

from fedgen.client import app as client_app
from fedgen.contract.errors import ScenarioError
from fedgen.contract.scenario import scenario_from_dict
from fedgen.server import app as server_app
from fedgen.server.summary import RunFailedError, run_status, site_table
from fedgen.simulations.cli import main as fedgen
from fedgen.simulations.inprocess_engine import InProcessGrid, SimulatedNode, _task_identity
from fedgen.simulations.prepare import write_deployment_run_dir

RUN_ID = 4242


# -- the status rules ---------------------------------------------------------------------

def _row(rnd: int, ok: int, *, failures=(), refused=(), trained=()) -> dict:
    return {"round": rnd, "clients_ok": ok, "clients_refused": len(refused), "failures": list(failures),
            "sites_trained": list(trained), "sites_refused": list(refused) or None}


@pytest.mark.parametrize(("rows", "completed", "reason", "expected"), [
    ([_row(1, 2), _row(2, 2)], 2, "completed", "completed"),
    ([_row(1, 2), _row(2, 1, failures=[{"site": "b", "reason": "error reply: x"}])], 2, "completed",
     "completed_with_failures"),
    ([_row(1, 2), _row(2, 1, refused=["b"])], 2, "completed", "completed_with_failures"),
    ([_row(1, 2), _row(2, 0, refused=["a", "b"])], 1, "budget_exhausted", "stopped_early"),
    ([_row(1, 0, refused=["a", "b"])], 0, "budget_exhausted", "stopped_early"),
    ([_row(1, 0, failures=[{"site": "a", "reason": "r"}, {"site": "b", "reason": "r"}])], 0, "clients_failed",
     "failed"),
    ([_row(1, 0, failures=[{"site": "a", "reason": "r"}]), _row(2, 0)], 2, "completed", "failed"),
    ([_row(1, 2)], 1, "completed", "stopped_early"),
])
def test_run_status_rules(rows, completed, reason, expected):
    assert run_status(rows, rounds_planned=2, rounds_completed=completed, stopped_reason=reason) == expected


def test_site_table_counts_rounds_refusals_and_failures():
    rows = [_row(1, 2, trained=["1", "0"]),
            _row(2, 1, trained=["0"], failures=[{"site": "1", "reason": "error reply: ValueError"}]),
            _row(3, 0, refused=["0"], failures=[{"site": "1", "reason": "no reply before the round timeout"}])]
    table = site_table(rows)
    assert [s["site"] for s in table] == ["0", "1"]
    assert (table[0]["rounds_trained"], table[0]["rounds_refused"], table[0]["failures"]) == (2, 1, [])
    assert table[1]["rounds_trained"] == 1
    assert table[1]["failures"] == [{"round": 2, "reason": "error reply: ValueError"},
                                    {"round": 3, "reason": "no reply before the round timeout"}]
    # a failure recorded before the node first named its site is the site's, once the run knows it
    early = [_row(1, 1, trained=["0"], failures=[{"site": "node 77", "reason": "error reply: Node Unavailable"}]),
             _row(2, 2, trained=["0", "1"])]
    assert [(s["site"], len(s["failures"])) for s in site_table(early)] == [("0", 0), ("1", 0), ("node 77", 1)]
    assert [(s["site"], s["rounds_trained"], len(s["failures"])) for s in site_table(early, node_sites={77: "1"})] \
        == [("0", 2, 0), ("1", 1, 1)]


# -- deployed runs on the in-process grid -------------------------------------------------

class RecordingGrid(InProcessGrid):
    """Flower's Grid contract, delivering in-process, recording each message's type."""

    def __init__(self, nodes) -> None:
        super().__init__(nodes)
        self.sent: list[str] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent += [m.metadata.message_type for m in messages]
        return super().send_and_receive(messages, timeout=timeout)


def _scenario(name: str, *, family: str = "vae", federated: bool | None = None, rounds: int = 2) -> dict:
    model = {"family": "vae", "hidden": 32, "latent_dim": 2} if family == "vae" else {"family": family}
    evaluation = {"every": 1, "num_samples": 16}
    if federated is not None:
        evaluation["federated"] = federated
    return {"name": name, "seed": 0,
            "federation": {"num_sites": 2, "rounds": rounds, "min_fit_sites": 2, "round_timeout_s": 120},
            "model": model, "training": {"local_steps": 2, "batch_size": 32, "lr": 0.002},
            "privacy": {"enabled": True, "target_epsilon": 8.0}, "evaluation": evaluation,
            "simulation": {"device": "cpu"}, "deployment": {"data_shape": [1, 8, 8], "num_classes": None}}


def _sites(tmp: Path, digits, *, broken: bool = False) -> list[dict]:
    sites = []
    for i in range(2):
        path = tmp / f"site{i}.npz"
        np.savez(path, x=digits.x[i * 100:(i + 1) * 100].numpy())
        sites.append({"data-path": str(path), "data-format": "npz", "site-id": f"site{i}",
                      "state-dir": str(tmp / f"state{i}")})
    if broken:  # site 1's file is gone: every train message it gets fails at the site
        sites[1]["data-path"] = str(tmp / "missing.npz")
    return sites


def _deploy(tmp: Path, digits, scenario: dict, *, broken: bool = False, damage=None) -> tuple[Path, RecordingGrid]:
    """Run the real ServerApp on a deployment run directory, its sites SuperNode-configured
    (``damage(run_dir)``: done to the run directory before the run)."""
    run_dir = write_deployment_run_dir(scenario_from_dict(scenario), tmp / scenario["name"])
    if damage is not None:
        damage(run_dir)
    run_config = {"run-dir": str(run_dir)}
    nodes = [SimulatedNode(9000 + i, i, 2, RUN_ID, run_config, client_app.app, node_config=site)  # --node-config
             for i, site in enumerate(_sites(tmp, digits, broken=broken))]
    grid = RecordingGrid(nodes)
    grid.set_run(Run.create_empty(RUN_ID))
    context = Context(run_id=RUN_ID, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                      run_config=run_config)
    with _task_identity(RUN_ID):
        server_app.app(grid=grid, context=context)
    return run_dir, grid


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_a_clean_deployed_run_completes_and_sends_no_evaluate_messages(tmp_path, digits, capsys):
    run_dir, grid = _deploy(tmp_path, digits, _scenario("clean"))
    summary = _summary(run_dir)
    assert summary["status"] == "completed"
    assert (summary["rounds_completed"], summary["rounds_planned"]) == (2, 2)
    assert summary["flower_run_id"] == str(RUN_ID)
    assert [(s["site"], s["rounds_trained"], s["failures"]) for s in summary["sites"]] == \
        [("site0", 2, []), ("site1", 2, [])]
    assert all(s["epsilon"] > 0 for s in summary["sites"])
    # federated evaluation is off by default: no site is ever asked for a loss on its data
    assert grid.sent == [MessageType.TRAIN] * 4
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not any("federated_eval_loss" in r for r in rows)
    assert (run_dir / "samples" / "round-0002.png").exists()  # the server only draws sample grids
    # fedgen status, by directory and by Flower run id: exit 0
    capsys.readouterr()
    assert fedgen(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "completed" in out and "site0" in out and "site1" in out
    assert fedgen(["status", str(RUN_ID), "--runs-root", str(tmp_path)]) == 0


def test_federated_evaluation_when_asked_for(tmp_path, digits):
    run_dir, grid = _deploy(tmp_path, digits, _scenario("fedeval", federated=True, rounds=1))
    assert grid.sent == [MessageType.TRAIN] * 2 + [MessageType.EVALUATE] * 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["federated_eval_sites"] == 2 and rows[-1]["federated_eval_loss"] > 0
    assert _summary(run_dir)["status"] == "completed"


def test_a_failing_site_fails_the_deployed_run(tmp_path, digits, capsys):
    with pytest.raises(RunFailedError) as err:
        _deploy(tmp_path, digits, _scenario("broken"), broken=True)
    run_dir = tmp_path / "broken"
    summary = _summary(run_dir)  # written before the ServerApp fails
    assert summary["status"] == "completed_with_failures"
    assert summary["rounds_completed"] == 2
    # site 1 never replied with its site id: it is named by its node, its reply names the site
    assert [s["site"] for s in summary["sites"]] == ["node 9001", "site0"]
    site1 = summary["sites"][0]
    assert site1["rounds_trained"] == 0 and [f["round"] for f in site1["failures"]] == [1, 2]
    assert all(f["reason"].startswith("error reply: site site1: DataError") for f in site1["failures"])
    message = str(err.value)
    assert "\n" not in message and "completed_with_failures" in message and "node 9001" in message
    assert str(run_dir / "summary.json") in message
    capsys.readouterr()
    assert fedgen(["status", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "completed_with_failures" in out and "node 9001" in out and "DataError" in out


def test_a_refused_deployed_run_is_stopped_early(tmp_path, digits):
    scenario = _scenario("spent")
    _deploy(tmp_path, digits, scenario)  # spends most of the sites' budget of 8
    scenario2 = {**_scenario("spent-again"), "privacy": {"enabled": True, "target_epsilon": 0.01}}
    with pytest.raises(RunFailedError, match="stopped_early"):
        _deploy(tmp_path, digits, scenario2)
    summary = _summary(tmp_path / "spent-again")
    assert (summary["status"], summary["stopped_reason"], summary["rounds_completed"]) == \
        ("stopped_early", "budget_exhausted", 0)
    assert [s["rounds_refused"] for s in summary["sites"]] == [1, 1]


def test_a_run_that_breaks_off_leaves_a_failed_summary(tmp_path, digits, capsys):
    def corrupt_checkpoint(run_dir: Path) -> None:
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        (run_dir / "checkpoints" / "latest.pt").write_bytes(b"not a checkpoint")

    with pytest.raises(Exception) as err:
        _deploy(tmp_path, digits, _scenario("torn"), damage=corrupt_checkpoint)
    assert not isinstance(err.value, RunFailedError)  # the error itself reaches Flower
    summary = _summary(tmp_path / "torn")
    assert (summary["status"], summary["stopped_reason"], summary["rounds_completed"]) == ("failed", "failed", 0)
    assert summary["rounds_planned"] == 2 and summary["flower_run_id"] == str(RUN_ID)
    assert summary["error"].startswith(type(err.value).__name__) and "\n" not in summary["error"]
    capsys.readouterr()
    assert fedgen(["status", str(tmp_path / "torn")]) == 1
    out = capsys.readouterr().out
    assert "failed" in out and f"error: {type(err.value).__name__}" in out


# -- fedgen status: bad input -------------------------------------------------------------

def test_status_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert fedgen(["status", str(tmp_path / "nope")]) == 2
    assert fedgen(["status", str(tmp_path)]) == 2  # a folder, but no run directory
    assert fedgen(["status", "12345", "--runs-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.strip()]) == 3 and "Traceback" not in err


# -- evaluation.federated validation ------------------------------------------------------

def test_federated_evaluation_is_refused_for_a_release_family():
    with pytest.raises(ScenarioError, match="evaluation.federated") as err:
        scenario_from_dict(_scenario("mmd", family="mmd", federated=True), "x.yaml")
    assert "\n" not in str(err.value)
    scenario_from_dict(_scenario("mmd", family="mmd"))  # off: accepted
    assert scenario_from_dict(_scenario("vae", federated=True)).evaluation.federated is True


# -- nothing written outside the configured directories (issue #23 item 6) -----------------

def test_superlink_home_is_under_the_configured_directory(tmp_path):
    from fedgen.simulations.superlink import home_environment

    db = tmp_path / "srv" / "state.db"
    env = home_environment(["--database", str(db), "--port", "9093"], environ={})
    assert env == {"FLWR_HOME": str(tmp_path / "srv" / "flwr-home"),
                   "MPLCONFIGDIR": str(tmp_path / "srv" / "flwr-home" / "matplotlib")}
    assert (tmp_path / "srv" / "flwr-home" / "matplotlib").is_dir()
    assert home_environment([], str(tmp_path / "h"), environ={"FLWR_HOME": "/elsewhere"})["FLWR_HOME"] == \
        str(tmp_path / "h")
    assert home_environment([], environ={"FLWR_HOME": str(tmp_path / "e")})["FLWR_HOME"] == str(tmp_path / "e")


def test_the_fedgen_cli_writes_nothing_to_the_home_folder(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("MPLCONFIGDIR", None)
    env.pop("XDG_CACHE_HOME", None)
    env.pop("XDG_CONFIG_HOME", None)
    for args in (["--help"], ["status", "--help"]):
        done = subprocess.run([sys.executable, "-m", "fedgen.simulations.cli", *args], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    code = ("import sys, fedgen.simulations.cli, fedgen.server.app, fedgen.client.app; "
            "print('matplotlib' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr
    assert list(tmp_path.iterdir()) == []


# -- fedgen simulate: writes its outputs, exits 1 only for a failed run -----------------------

def test_simulate_exits_1_for_a_run_that_aggregated_nothing(tmp_path, capsys):
    from .conftest import REPO

    sets = ["federation.rounds=2", "training.local_steps=2", "evaluation.every=0", "evaluation.num_samples=20",
            "simulation.faults.dropout=1.0"]  # no site is ever reachable: nothing to aggregate
    out = tmp_path / "run"
    code = fedgen(["simulate", str(REPO / "scenarios" / "quickstart.yaml"), "--out", str(out),
                   *[a for s in sets for a in ("--set", s)]])
    summary = _summary(out)
    assert (summary["status"], summary["stopped_reason"], summary["rounds_completed"]) == ("failed", "completed", 2)
    assert code == 1
    assert "the run failed" in capsys.readouterr().err
    assert all(s["rounds_trained"] == 0 and len(s["failures"]) == 2 for s in summary["sites"])
