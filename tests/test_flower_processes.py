"""The Flower processes ``fedgen simulate`` starts: found without an activated venv, and
never left running, not even after a SIGKILL of ``fedgen`` (simulations/flower_engine.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedgen.simulations.flower_engine import (OWNER_FILE, TAG_CHOICE_VAR, TAG_VAR, FlowerRunError, FlowerSimulation,
                                       _write_owner, reap_orphaned_runs, tagged_pids)

from .conftest import REPO


def _programs(tag: str) -> list[str]:
    """The program names (``flower-superexec``, ``raylet``, ...) of the live processes tagged ``tag``."""
    names = []
    for pid in tagged_pids(tag):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        names += [Path(a.decode(errors="replace")).name for a in argv[:2]]
    return names


def _wait_for(predicate, timeout: float, step: float = 0.3) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


@pytest.mark.integration
def test_finding10a_superlink_spawns_superexec_without_the_venv_on_path(monkeypatch):
    """`.venv/bin/fedgen simulate` without activating the venv: flower-superlink spawns
    flower-superexec by name, so the children's PATH must lead to this Python's bin folder."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    sim = FlowerSimulation(num_supernodes=1)
    try:
        sim.start()  # on the old code: "flower-superlink exited at start" (FileNotFoundError: flower-superexec)
        assert _wait_for(lambda: "flower-superexec" in _programs(sim.tag), timeout=20), _programs(sim.tag)
    finally:
        sim.shutdown()
    assert tagged_pids(sim.tag) == []


def test_finding10a_a_missing_flower_executable_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))  # a venv without Flower
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    sim = FlowerSimulation(num_supernodes=1)
    try:
        with pytest.raises(FlowerRunError) as err:
            sim.start()
    finally:
        sim.shutdown()
    message = str(err.value)
    assert "\n" not in message and message.startswith("flower-superlink, flower-superexec")
    assert f"not found next to {tmp_path / 'bin' / 'python'} nor on PATH" in message
    assert sim.superlink is None and not sim.tmp.exists()


def test_finding10b_the_next_start_reaps_a_dead_owners_processes(tmp_path):
    """Runs whose owner died (and whose watcher died too) are reaped when a run starts;
    a live owner's run is left alone."""
    dead_tag, live_tag = f"dead-{os.getpid()}", f"live-{os.getpid()}"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = subprocess.Popen(["sleep", "60"], env={**os.environ, TAG_VAR: dead_tag})
    neighbour = subprocess.Popen(["sleep", "60"], env={**os.environ, TAG_VAR: live_tag})
    try:
        (tmp_path / "fedgen-dead").mkdir()
        (tmp_path / "fedgen-dead" / OWNER_FILE).write_text(f"{dead.pid} 12345 {dead_tag}\n")
        (tmp_path / "fedgen-live").mkdir()
        _write_owner(tmp_path / "fedgen-live", live_tag)  # owned by this (live) process
        assert reap_orphaned_runs(tmp_path) == [dead_tag]
        assert orphan.wait(timeout=10) == -signal.SIGTERM
        assert not (tmp_path / "fedgen-dead").exists()
        assert neighbour.poll() is None and (tmp_path / "fedgen-live").exists()
    finally:
        for proc in (orphan, neighbour):
            proc.kill()
            proc.wait()


@pytest.mark.integration
def test_finding10b_sigkill_of_simulate_leaves_no_flower_or_ray_process(tmp_path):
    """SIGKILL `fedgen simulate` once the run (SuperLink, SuperExec, flwr-simulation, Ray) is
    up: within seconds no process of that run remains."""
    tag = f"sigkill-{os.getpid()}"
    proc = subprocess.Popen([sys.executable, "-m", "fedgen.simulations.cli", "simulate", str(REPO / "scenarios" / "quickstart.yaml"),
                             "--out", str(tmp_path / "run"), "--set", "simulation.engine=flower", "--set", "federation.rounds=40"],
                            cwd=tmp_path,
                            env={**os.environ, TAG_CHOICE_VAR: tag, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        up = _wait_for(lambda: {"flower-superlink", "flower-superexec", "raylet"} <= set(_programs(tag)), timeout=180)
        assert up, f"the run never got its SuperLink, SuperExec and Ray up: {_programs(tag)}"
    finally:
        proc.kill()
        proc.wait()
    try:
        assert _wait_for(lambda: tagged_pids(tag) == [], timeout=30), f"left running: {_programs(tag)}"
    finally:
        for pid in tagged_pids(tag):
            os.kill(pid, signal.SIGKILL)
