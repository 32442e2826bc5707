"""The in-process engine's worker pool (``simulation.workers``, docs/simulation.md "Engines"):
ClientApp calls on spawned worker processes, messages and contexts through Flower's serde.

Fast: the Grid's contract on a toy app (``tests/pool_apps.py``) through two workers --
state kept across rounds, Flower's error reply with the call's changes dropped, a worker
that dies mid-call becomes a ``CLIENT_APP_CRASHED`` reply and is replaced, the deadline per
reply; ``workers`` validation; Ctrl-C of the CLI leaves no worker. Integration: the seeded
quickstart gives the same ledger and losses with workers 1 and 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode

from fedgen.contract.errors import ScenarioError
from fedgen.contract.scenario import load_scenario
from fedgen.simulations.inprocess_engine import (InProcessGrid, InProcessSimulation, SimulatedNode, _task_identity,
                                                 resolve_workers)
from fedgen.simulations.worker_pool import WorkerPool

from .conftest import REPO
from .test_engine_inprocess import cli_past_round_1
from .test_simulation_flower import QUICK, fedgen

QUICKSTART = REPO / "scenarios" / "quickstart.yaml"
TOY_APP = "tests.pool_apps:app"


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(2, TOY_APP, threads=1) as workers:
        yield workers


def _grid(pool: WorkerPool, n: int = 4) -> InProcessGrid:
    return InProcessGrid((SimulatedNode(1000 + i, i, n, 77, {"run-dir": "x"}, None) for i in range(n)), pool=pool)


def _send(grid: InProcessGrid, timeout: float | None = None, **config: int | float) -> tuple[list, list]:
    with _task_identity(77):
        messages = [Message(RecordDict({"config": ConfigRecord(dict(config))}), dst_node_id=node,
                            message_type=MessageType.TRAIN) for node in grid.get_node_ids()]
    return messages, list(grid.send_and_receive(messages, timeout=timeout))


def test_two_workers_share_the_sites_and_each_node_keeps_its_state(pool):
    grid = _grid(pool)
    _send(grid)
    messages, replies = _send(grid)
    metrics = [r.content["metrics"] for r in replies]
    assert [(m["partition"], m["of"], m["calls"]) for m in metrics] == [(0, 4, 2), (1, 4, 2), (2, 4, 2), (3, 4, 2)]
    assert {m["pid"] for m in metrics} <= set(pool.pids) and os.getpid() not in {m["pid"] for m in metrics}
    for sent, reply in zip(messages, replies):  # ids and links as the SuperLink sets them, through the serde
        assert sent.metadata.run_id == reply.metadata.run_id == 77
        assert reply.metadata.src_node_id == sent.metadata.dst_node_id
        assert reply.metadata.reply_to_message_id == sent.metadata.message_id != ""
        assert reply.metadata.message_id not in ("", sent.metadata.message_id)


def test_torch_threads_per_worker_are_cores_over_workers():
    with WorkerPool(1, TOY_APP, threads=3) as one:
        _, replies = _send(_grid(one, n=1))
    assert replies[0].content["metrics"]["threads"] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA here: the device-aware pool is checked where "
                    "CUDA exists")
def test_worker_i_uses_cuda_device_i_mod_the_gpus(pool):
    _, replies = _send(_grid(pool))
    index = {pid: i for i, pid in enumerate(pool.pids)}
    for reply in replies:
        metrics = reply.content["metrics"]
        assert metrics["cuda-device"] == index[metrics["pid"]] % torch.cuda.device_count()


def test_ten_thousand_nodes_hold_bytes_not_contexts_and_only_the_called_ones_hold_any():
    """10 000 sites: a node that was never called is its ids; one that was holds its
    context serialised, not a live ``Context``."""
    import tracemalloc

    from .pool_apps import app

    tracemalloc.start()
    grid = InProcessGrid(SimulatedNode(10 + i, i, 10_000, 77, {"run-dir": "x"}, app) for i in range(10_000))
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert size < 5_000_000, f"{size / 1e6:.1f} MB for 10 000 idle nodes"
    with _task_identity(77):
        messages = [Message(RecordDict(), dst_node_id=10 + i, message_type=MessageType.TRAIN)
                    for i in range(0, 10_000, 100)]
    replies = list(grid.send_and_receive(messages))
    assert len(replies) == 100 and not any(r.has_error() for r in replies)
    held = {node.node_id: node._state for node in grid.nodes.values() if node._state is not None}
    assert sorted(held) == [10 + i for i in range(0, 10_000, 100)]
    assert all(isinstance(state, bytes) for state in held.values())
    assert grid.nodes[10].context.state.config_records["n"]["calls"] == 1


def test_an_exception_in_a_worker_is_flower_s_error_reply_and_its_state_change_is_dropped(pool):
    grid = _grid(pool)
    _send(grid)
    messages, replies = _send(grid, **{"raise-at": 1})
    failed = [r for r in replies if r.has_error()]
    assert len(failed) == 1 and failed[0].metadata.reply_to_message_id == messages[1].metadata.message_id
    assert failed[0].error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert failed[0].error.reason.startswith("<class 'flwr.clientapp.client_app.ClientAppException'>:<'")
    assert "boom at the site" in failed[0].error.reason
    assert grid.nodes[1001].context.state.config_records["n"]["calls"] == 1  # round 2's change dropped
    assert grid.nodes[1002].context.state.config_records["n"]["calls"] == 2


def test_a_worker_that_dies_mid_call_is_a_crashed_reply_and_is_replaced(pool):
    grid = _grid(pool)
    before = set(pool.pids)
    messages, replies = _send(grid, **{"exit-at": 2})
    assert [r.has_error() for r in replies] == [False, False, True, False]
    assert replies[2].error.code == ErrorCode.CLIENT_APP_CRASHED
    assert "exited with code 3" in replies[2].error.reason
    assert replies[2].metadata.reply_to_message_id == messages[2].metadata.message_id
    assert len(set(pool.pids) - before) == 1  # one new worker took the dead one's place
    _, replies = _send(grid)  # the pool goes on; the crashed call left no state behind
    assert [r.content["metrics"]["calls"] for r in replies] == [2, 2, 1, 2]


def test_the_deadline_applies_to_each_reply_s_own_duration(pool):
    _, replies = _send(_grid(pool), timeout=1.0, **{"sleep-at": 0, "sleep-s": 1.5})
    assert [r.metadata.src_node_id for r in replies] == [1001, 1002, 1003]


def test_auto_is_one_worker_per_core_capped_by_the_sites_per_round():
    assert resolve_workers("auto", sites_per_round=5, cores=2) == 2
    assert resolve_workers("auto", sites_per_round=1, cores=16) == 1
    assert resolve_workers(3, sites_per_round=1, cores=2) == 3
    assert InProcessSimulation(3).workers == 1  # the default: today's behaviour, no pool


@pytest.mark.parametrize("value, message", [
    ("0", "workers must be a whole number >= 1 or 'auto', got 0"),
    ("many", "workers must be a whole number >= 1 or 'auto', got 'many'"),
    ("1.5", "workers must be a whole number >= 1 or 'auto', got 1.5"),
])
def test_a_bad_workers_value_is_one_line(value, message):
    with pytest.raises(ScenarioError) as err:
        load_scenario(QUICKSTART, [f"simulation.workers={value}"])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_workers_on_the_flower_engine_is_refused_in_one_line(tmp_path):
    res = fedgen("simulate", QUICKSTART, "--out", tmp_path / "run", "--set", "simulation.engine=flower",
                 "--set", "simulation.workers=2", cwd=tmp_path)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "workers: 2 needs engine inprocess" in lines[0], res.stderr
    assert not (tmp_path / "run").exists()


def _pids_with(tag: str) -> list[int]:
    needle = f"POOL_TEST_TAG={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "environ").read_bytes().split(b"\0"):
                if (entry / "stat").read_text().split(") ", 1)[1][:1] != "Z":
                    pids.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return pids


def test_ctrl_c_of_the_cli_with_two_workers_leaves_no_worker(tmp_path):
    tag = uuid.uuid4().hex
    proc, out = cli_past_round_1(tmp_path, "simulation.workers=2", env={**os.environ, "POOL_TEST_TAG": tag})
    try:
        assert len(_pids_with(tag)) >= 3  # the CLI, its two workers (and multiprocessing's resource tracker)
        proc.send_signal(signal.SIGINT)
        for pid in _pids_with(tag):
            if pid != proc.pid:
                os.kill(pid, signal.SIGINT)  # as the terminal sends it to the workers too
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["stopped_reason"] == "interrupted"
    assert _pids_with(tag) == []


@pytest.mark.integration
def test_workers_1_and_2_give_the_same_seeded_run(tmp_path):
    def run(workers: int) -> Path:
        out = tmp_path / f"w{workers}"
        sets = [a for item in (*QUICK, "privacy.seeded_noise=true", "federation.rounds=2", "warm_start=null",
                               f"simulation.workers={workers}") for a in ("--set", item)]
        res = fedgen("simulate", QUICKSTART, "--out", out, *sets, cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        return out

    one, two = run(1), run(2)
    privacy = [json.loads((r / "privacy.json").read_text()) for r in (one, two)]
    assert privacy[0]["epsilon"] == privacy[1]["epsilon"] and privacy[0]["sites"] == privacy[1]["sites"]
    rows = [[json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (one, two)]
    assert [r["round"] for r in rows[0]] == [r["round"] for r in rows[1]] == [1, 2]
    assert [r["train_loss"] for r in rows[1]] == pytest.approx([r["train_loss"] for r in rows[0]], abs=1e-6, rel=0)


def test_the_server_reads_a_site_ledger_file_again_only_once_it_changed(tmp_path):
    """With 10 000 sites the server must not re-read every ``sites/*/ledger.json`` each round."""
    from fedgen.privacy.ledger import SiteLedger
    from fedgen.simulations.hooks import hooks_for
    from fedgen.simulations.prepare import write_run_dir

    run_dir = tmp_path / "run"
    write_run_dir(load_scenario(QUICKSTART, list(QUICK)), run_dir)
    hooks = hooks_for(run_dir)

    def write(site: str, rounds: int) -> None:
        ledger = SiteLedger(site=site, accountant="rdp", delta=1e-5, target_epsilon=10.0, max_grad_norm=1.0)
        for rnd in range(1, rounds + 1):
            ledger.record_round(round=rnd, steps=3, noise_multiplier=1.0, sample_rate=0.1)
        (run_dir / "sites" / site).mkdir(parents=True, exist_ok=True)
        (run_dir / "sites" / site / "ledger.json").write_text(ledger.to_json())

    write("0", 1), write("1", 1)
    assert [led.site for led in hooks.unreported_ledgers()] == ["0", "1"]
    assert hooks.unreported_ledgers() == []  # nothing changed since
    write("1", 2)
    assert [(led.site, len(led.history)) for led in hooks.unreported_ledgers()] == [("1", 2)]


def test_a_site_s_call_reads_the_partition_index_and_sites_json_once_per_run(tmp_path, monkeypatch):
    """10 000 sites: ``partitions.npz`` has 10 000 members and ``sites.json`` 10 000 entries;
    re-opening them at every site's call cost ~0.1 s per call."""
    import numpy as np

    from fedgen.client import feature_skew, site

    np.savez(tmp_path / "partitions.npz", **{f"site_{i}": np.arange(i, i + 2) for i in range(1000)})
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "sites.json").write_text(json.dumps({str(i): {"examples": 2} for i in range(1000)}))
    opened, parsed = [], []
    real_load, real_loads = np.load, json.loads
    monkeypatch.setattr(site.np, "load", lambda *a, **k: opened.append(a) or real_load(*a, **k))
    monkeypatch.setattr(feature_skew.json, "loads", lambda *a, **k: parsed.append(1) or real_loads(*a, **k))
    site._partition.cache_clear(), site._partitions.cache_clear(), feature_skew._sites_json.cache_clear()
    for i in range(0, 1000, 10):
        assert list(site._partition(str(tmp_path / "partitions.npz"), i)) == [i, i + 1]
        assert feature_skew.read_site_skew(tmp_path, i) is None
    assert len(opened) == 1 and len(parsed) == 1


@pytest.mark.slow
def test_ten_thousand_sites_with_dp_run_in_one_process_under_2_gb(tmp_path):
    """Issue #21: 10 000 sites, 1 % per round, DP on, in-process: the run completes and the
    ``fedgen`` process peaks under 2 GB (MNIST's test split replicated three times)."""
    import numpy as np

    from fedgen.client.data import load_data

    mnist = load_data("mnist", REPO / ".." / "shared" / "data" / "mnist")
    x = (np.asarray(mnist.x) * 255).round().astype(np.uint8)
    np.savez(tmp_path / "mnist3.npz", x=np.concatenate([x] * 3), y=np.concatenate([np.asarray(mnist.y)] * 3))
    sets = ["data.format=npz", f"data.path={tmp_path / 'mnist3.npz'}", "federation.num_sites=10000",
            "federation.fraction_fit=0.01", "federation.rounds=2", "partition.min_examples=2", "model.hidden=32",
            "training.local_steps=5", "training.batch_size=4", "evaluation.every=0", "evaluation.num_samples=50",
            "simulation.device=cpu", "warm_start=null"]
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "fedgen.simulations.cli", "simulate", str(QUICKSTART),
                                 "--out", str(tmp_path / "run"), *[a for s in sets for a in ("--set", s)]],
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak RSS
    assert os.waitstatus_to_exitcode(status) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients_ok"]) for r in rows] == [(1, 100), (2, 100)]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epsilon"] <= 10.0
    assert usage.ru_maxrss < 2 * 1024 * 1024, f"peak RSS {usage.ru_maxrss / 1024:.0f} MB"  # KiB on Linux
