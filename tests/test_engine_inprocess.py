"""The in-process engine (``simulation.engine: inprocess``, docs/simulation.md "Engines"):
Flower's ServerApp and ClientApp, messages delivered by direct calls.

Fast: the Grid's message contract on toy apps, a 2-round quickstart at tiny settings, a
ClientApp exception at one site, Ctrl-C and resume. Integration: the same seeded run on
both engines gives the same privacy ledger and losses.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from rich.console import Console

from fedgen.client import app as client_app
from fedgen.contract.scenario import load_scenario
from fedgen.simulations.inprocess_engine import InProcessGrid, SimulatedNode, _task_identity
from fedgen.simulations.prepare import write_run_dir
from fedgen.simulations.runner import run_simulation_dir

from .conftest import REPO
from .test_simulation_flower import QUICK, QUICK_WARM, fedgen, quick_run

QUICKSTART = REPO / "scenarios" / "quickstart.yaml"
INPROCESS = "simulation.engine=inprocess"
RUN_FILES = ("scenario.yaml", "metrics.jsonl", "privacy.json", "summary.json", "report.html", "checkpoints/latest.pt")


# -- the Grid's message contract, on toy apps ---------------------------------------------

def _counting_app(fail_partition: int | None = None) -> ClientApp:
    """A ClientApp that counts its calls in ``context.state`` and replies with the count
    and its node config; it raises at ``fail_partition``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        calls = int(context.state.config_records.get("n", ConfigRecord({"calls": 0}))["calls"]) + 1
        context.state["n"] = ConfigRecord({"calls": calls})
        if context.node_config["partition-id"] == fail_partition:
            raise RuntimeError("boom at the site")
        metrics = MetricRecord({"calls": calls, "partition": int(context.node_config["partition-id"]),
                                "of": int(context.node_config["num-partitions"])})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def _grid(app: ClientApp, n: int = 3, run_id: int = 77) -> InProcessGrid:
    return InProcessGrid(SimulatedNode(1000 + i, i, n, run_id, {"run-dir": "x"}, app) for i in range(n))


def _send(grid: InProcessGrid, run_id: int = 77) -> tuple[list[Message], list[Message]]:
    with _task_identity(run_id):
        messages = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
                    for node in grid.get_node_ids()]
    return messages, list(grid.send_and_receive(messages))


def test_nodes_get_flower_s_node_config_and_keep_their_state_across_rounds():
    grid = _grid(_counting_app())
    _send(grid)
    messages, replies = _send(grid)
    assert [(r.content["metrics"]["partition"], r.content["metrics"]["of"], r.content["metrics"]["calls"])
            for r in replies] == [(0, 3, 2), (1, 3, 2), (2, 3, 2)]
    for sent, reply in zip(messages, replies):  # ids and links as the SuperLink sets them
        assert sent.metadata.run_id == reply.metadata.run_id == 77
        assert sent.metadata.src_node_id == reply.metadata.dst_node_id == SUPERLINK_NODE_ID
        assert reply.metadata.src_node_id == sent.metadata.dst_node_id
        assert reply.metadata.reply_to_message_id == sent.metadata.message_id != ""
        assert reply.metadata.message_id not in ("", sent.metadata.message_id)


def test_a_client_app_exception_is_flower_s_error_reply_and_its_state_change_is_dropped():
    grid = _grid(_counting_app(fail_partition=1))
    _send(grid)
    messages, replies = _send(grid)
    failed = [r for r in replies if r.has_error()]
    assert len(failed) == 1 and failed[0].metadata.reply_to_message_id == messages[1].metadata.message_id
    assert failed[0].error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert failed[0].error.reason.startswith("<class 'flwr.clientapp.client_app.ClientAppException'>:<'")
    assert "boom at the site" in failed[0].error.reason
    assert [r.content["metrics"]["calls"] for r in replies if not r.has_error()] == [2, 2]
    assert "n" not in grid.nodes[1001].context.state.config_records  # Flower drops a failed call's context


def test_a_reply_slower_than_the_round_timeout_is_left_out(monkeypatch):
    import fedgen.simulations.inprocess_engine as engine

    clock = iter([0.0, 1.0, 10.0, 100.0, 200.0, 201.0])  # node 0: 1 s, node 1: 90 s, node 2: 1 s
    monkeypatch.setattr(engine, "_clock", lambda: next(clock))
    grid = _grid(_counting_app())
    with _task_identity(77):
        messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN) for n in grid.get_node_ids()]
    replies = list(grid.send_and_receive(messages, timeout=30.0))
    assert [r.metadata.src_node_id for r in replies] == [1000, 1002]


# -- the quickstart on the in-process engine --------------------------------------------------

def _prepare(tmp_path: Path, *overrides: str) -> tuple[Path, object]:
    scenario = load_scenario(QUICKSTART, [*QUICK, *QUICK_WARM, INPROCESS, *overrides])
    run_dir = tmp_path / "run"
    write_run_dir(scenario, run_dir)
    return run_dir, scenario


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _failing_site_id(monkeypatch, partition: int, on_call: int, error: BaseException) -> None:
    """``site_id`` -- called by the ClientApp before its own error handling -- raises
    ``error`` on the ``on_call``-th call at ``partition`` (call 1 = round 1's training)."""
    real, calls = client_app.site_id, {"n": 0}

    def site_id(context: Context) -> str:
        if context.node_config["partition-id"] == partition:
            calls["n"] += 1
            if calls["n"] == on_call:
                raise error
        return real(context)

    monkeypatch.setattr(client_app, "site_id", site_id)


def test_quickstart_runs_two_rounds_and_writes_the_run_directory(tmp_path):
    out = quick_run(tmp_path, "quickstart", INPROCESS, "federation.rounds=2")  # the CLI, as a user runs it
    for name in RUN_FILES:
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["stopped_reason"] == "completed"
    assert [(r["round"], r["clients_ok"]) for r in _rows(out)] == [(1, 5), (2, 5)]
    privacy = json.loads((out / "privacy.json").read_text())
    assert sorted(privacy["sites"]) == ["0", "1", "2", "3", "4"]
    assert all([h["round"] for h in s["history"]] == [1, 2] for s in privacy["sites"].values())
    assert 0 < summary["epsilon"] <= 10.0
    assert all((out / "sites" / str(i) / "ledger.json").exists() for i in range(5))


def test_a_client_app_exception_fails_its_site_and_the_round_goes_on(tmp_path, monkeypatch):
    run_dir, scenario = _prepare(tmp_path, "federation.rounds=2")
    _failing_site_id(monkeypatch, partition=2, on_call=2, error=RuntimeError("boom"))  # round 2 only
    summary = run_simulation_dir(run_dir, scenario, console=Console(quiet=True))
    first, second = _rows(run_dir)
    assert first["clients_ok"] == 5 and first["failures"] == []
    assert second["clients_ok"] == 4 and second["clients_failed"] == 1
    assert [f["site"] for f in second["failures"]] == ["2"]
    assert second["failures"][0]["reason"] == "boom"  # the server unwraps Flower's error reason
    assert summary["rounds_completed"] == 2 and summary["stopped_reason"] == "completed"


def test_a_server_app_exception_fails_the_run_in_one_line(tmp_path, monkeypatch):
    from fedgen.server import app as server_app
    from fedgen.simulations.errors import SimulationRunError

    class Broken:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise OSError("No space left on device")

    run_dir, scenario = _prepare(tmp_path)
    monkeypatch.setattr(server_app, "FederatedRun", Broken)
    with pytest.raises(SimulationRunError, match=r"the ServerApp raised OSError: No space left on device$"):
        run_simulation_dir(run_dir, scenario, console=Console(quiet=True))
    assert json.loads((run_dir / "summary.json").read_text())["stopped_reason"] == "failed"


def _ledger(run_dir: Path) -> tuple[dict, float]:
    d = json.loads((run_dir / "privacy.json").read_text())
    return ({site: [(h["round"], h["steps"], h["noise_multiplier"], h["sample_rate"]) for h in s["history"]]
             for site, s in d["sites"].items()}, d["epsilon"])


def test_ctrl_c_marks_the_run_interrupted_and_resume_gives_the_uninterrupted_ledger(tmp_path, monkeypatch):
    (tmp_path / "ref").mkdir()
    ref = quick_run(tmp_path / "ref", "quickstart", INPROCESS, "federation.rounds=3")
    run_dir, scenario = _prepare(tmp_path, "federation.rounds=3")
    _failing_site_id(monkeypatch, partition=3, on_call=2, error=KeyboardInterrupt())  # Ctrl-C in round 2
    with pytest.raises(KeyboardInterrupt):
        run_simulation_dir(run_dir, scenario, console=Console(quiet=True))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary == {"rounds_completed": 1, "stopped_reason": "interrupted", "resumable": True}

    monkeypatch.undo()
    res = fedgen("simulate", "--resume", run_dir, cwd=tmp_path)  # the CLI's resume, engine from the run dir
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["round"] for r in _rows(run_dir)] == [1, 2, 3]
    assert json.loads((run_dir / "summary.json").read_text())["stopped_reason"] == "completed"
    assert _ledger(run_dir) == _ledger(ref)


def cli_past_round_1(tmp_path: Path, *overrides: str, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    """``fedgen simulate`` of a 40-round quickstart in-process, returned once round 1 is done."""
    out = tmp_path / "run"
    sets = [a for item in (INPROCESS, "federation.rounds=40", "evaluation.every=0", *QUICK_WARM, *overrides)
            for a in ("--set", item)]
    proc = subprocess.Popen([sys.executable, "-m", "fedgen.simulations.cli", "simulate", str(QUICKSTART),
                             "--out", str(out), *sets], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "model-round-0001.pt").exists():
        time.sleep(0.1)
    if not (out / "checkpoints" / "model-round-0001.pt").exists():
        proc.kill()
        pytest.fail("round 1 never finished")
    return proc, out


def test_sigint_of_the_cli_stops_the_run_as_interrupted(tmp_path):
    """A real Ctrl-C (SIGINT to ``fedgen simulate``) mid-run: exit 130, summary ``interrupted``."""
    proc, out = cli_past_round_1(tmp_path)
    try:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_reason"] == "interrupted" and summary["resumable"] is True
    assert 1 <= summary["rounds_completed"] < 40


# -- the same run on both engines -------------------------------------------------------------

@pytest.mark.integration
def test_inprocess_and_flower_engines_give_the_same_seeded_run(tmp_path):
    seeded = ("privacy.seeded_noise=true", "federation.rounds=2")
    for name in ("flower", "inprocess"):
        (tmp_path / name).mkdir()
    flower = quick_run(tmp_path / "flower", "quickstart", "simulation.engine=flower", *seeded)
    inprocess = quick_run(tmp_path / "inprocess", "quickstart", INPROCESS, *seeded)

    def privacy(run_dir: Path) -> dict:
        d = json.loads((run_dir / "privacy.json").read_text())
        return {"epsilon": d["epsilon"], "sites": {
            site: {"sigma": s["noise_multiplier"], "q": s["sample_rate"], "steps": s["steps"],
                   "history": [(h["round"], h["steps"], h["noise_multiplier"], h["sample_rate"], h["epsilon"])
                               for h in s["history"]]}
            for site, s in d["sites"].items()}}

    assert privacy(inprocess) == privacy(flower)
    losses = [(r["round"], r["train_loss"]) for r in _rows(flower)]
    assert [r["round"] for r in _rows(inprocess)] == [1, 2] == [r for r, _ in losses]
    ours, theirs = [r["train_loss"] for r in _rows(inprocess)], [l for _, l in losses]
    assert [l is None for l in ours] == [l is None for l in theirs] == [True, False]  # round 1: the release
    assert [l for l in ours if l is not None] == pytest.approx([l for l in theirs if l is not None], abs=1e-6, rel=0)


def test_a_plain_install_without_the_app_folder_still_runs(tmp_path):
    """``pip install fedgen`` (not editable) has no pyproject.toml beside the package: the
    engine then runs the installed apps with the run config it is given (found on a GPU
    machine, where ``fedgen simulate`` stopped with "Cannot find pyproject.toml")."""
    from fedgen.simulations.inprocess_engine import INSTALLED_COMPONENTS, InProcessSimulation

    run_dir, scenario = _prepare(tmp_path, "federation.rounds=1")
    engine = InProcessSimulation(num_supernodes=scenario.federation.num_sites, app_dir=tmp_path / "no-app-here")
    assert not engine.has_project and engine.server_app is _component(INSTALLED_COMPONENTS["serverapp"])
    engine.run({"run-dir": str(run_dir)})
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and summary["stopped_reason"] == "completed"


def _component(reference: str) -> object:
    import importlib

    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)
