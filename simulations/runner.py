"""Run a prepared run directory on the scenario's engine (Flower's simulation runtime, or
in-process), with a live per-round display (docs/simulation.md, "Engines")."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedgen.privacy.ledger import atomic_write_text
from fedgen.contract import rundir

from .errors import SimulationRunError
from .flower_engine import FlowerSimulation, check_ray_address, signals_ignored
from .inprocess_engine import InProcessSimulation, resolve_workers
from fedgen.contract.scenario import Scenario


def _describe(row: dict[str, Any]) -> str:
    parts = [f"round {row['round']}", f"ok {row['clients_ok']}/{row['clients_sampled']}"]
    if row.get("train_loss") is not None:
        parts.append(f"loss {row['train_loss']:.3g}")
    if row.get("epsilon") is not None:
        parts.append(f"ε {row['epsilon']:.3f}")
    if row.get("site_level_epsilon") is not None:
        parts.append(f"site ε {row['site_level_epsilon']:.3f}")
    for key in ("fid_domain", "heldout_nll_bits_per_dim"):
        if row.get(key) is not None:
            parts.append(f"{key} {row[key]:.3g}")
    return ", ".join(parts)


class _MetricsWatcher(threading.Thread):
    """Tails metrics.jsonl (written by the ServerApp) into a rich progress bar."""

    def __init__(self, run_dir: Path, progress: Progress, task: int) -> None:
        super().__init__(daemon=True)
        self.path = run_dir / rundir.METRICS
        self.progress, self.task = progress, task
        self.stop = threading.Event()

    def run(self) -> None:
        # Leave SIGINT / SIGTERM to the main thread, so that they interrupt its blocking read
        # of Flower's output instead of landing in this thread's sleep.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        seen = 0
        while not self.stop.wait(0.5):
            rows = rundir.read_metrics(self.path.parent)
            if len(rows) != seen:
                seen = len(rows)
                self.progress.update(self.task, completed=rows[-1]["round"], description=_describe(rows[-1]))


def _mark_stopped(run_dir: Path, reason: str) -> None:
    """Leave a consistent run directory when a run did not finish (summary says why)."""
    if (run_dir / rundir.SUMMARY).exists():
        return
    rows = rundir.read_metrics(run_dir)
    summary = {"rounds_completed": rows[-1]["round"] if rows else 0, "stopped_reason": reason,
               "resumable": (run_dir / rundir.CHECKPOINTS / "latest.pt").exists()}
    atomic_write_text(run_dir / rundir.SUMMARY, json.dumps(summary, indent=2))


STARTING = {"flower": "starting Flower (SuperLink, Ray actors)", "inprocess": "starting (in-process engine)"}


def check_engine(scenario: Scenario) -> None:
    """What the scenario's engine needs from this machine, checked before anything is
    written (one line, :class:`SimulationRunError`): a reachable ``ray_address``; for a
    private Ray with ``client_gpus`` > 0, a CUDA GPU (else Ray would place no site)."""
    sim_cfg = scenario.simulation
    if sim_cfg.engine != "flower":
        return
    if sim_cfg.ray_address is not None:
        check_ray_address(sim_cfg.ray_address)
    elif sim_cfg.client_gpus > 0:
        import torch

        if not torch.cuda.is_available():
            raise SimulationRunError(f"simulation.client_gpus: {sim_cfg.client_gpus:g} of a GPU per site, but this "
                                     "machine has no CUDA GPU, so Ray would place no site; set client_gpus: 0, or "
                                     "ray_address to a cluster with GPUs")


def flower_simulation(scenario: Scenario) -> FlowerSimulation:
    """The ``flower`` engine for ``scenario``: its sites' Ray resources and Ray cluster."""
    sim_cfg = scenario.simulation
    return FlowerSimulation(num_supernodes=scenario.federation.num_sites, client_cpus=sim_cfg.client_cpus,
                            client_gpus=sim_cfg.client_gpus, ray_address=sim_cfg.ray_address)


def _run_engine(run_dir: Path, scenario: Scenario, *, console: Console, verbose: bool) -> None:
    """Run the ServerApp on ``scenario.simulation.engine`` with the run directory as run
    config ``run-dir`` (the ServerApp writes the run directory itself)."""
    run_config = {"run-dir": str(run_dir)}
    sim_cfg = scenario.simulation
    if sim_cfg.engine == "inprocess":
        fed = scenario.federation
        per_round = max(fed.min_fit_sites, int(fed.num_sites * fed.fraction_fit))  # Flower's sample size
        InProcessSimulation(num_supernodes=fed.num_sites, workers=resolve_workers(sim_cfg.workers, per_round)).run(
            run_config, verbose=verbose)
        return
    sim = flower_simulation(scenario)
    on_line = (lambda line: console.print(line.rstrip(), markup=False, highlight=False)) if verbose else None
    try:
        sim.start()
        sim.run(run_config, on_line=on_line)
    finally:
        sim.shutdown()  # before the run directory is marked stopped: no process outlives the run


def run_simulation_dir(run_dir: Path, scenario: Scenario, *, console: Console, verbose: bool = False) -> dict:
    (run_dir / rundir.SUMMARY).unlink(missing_ok=True)  # a resumed run writes a new one
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=False)
    try:
        with progress:
            task = progress.add_task(STARTING[scenario.simulation.engine], total=scenario.federation.rounds)
            watcher = _MetricsWatcher(run_dir, progress, task)
            watcher.start()
            try:
                _run_engine(run_dir, scenario, console=console, verbose=verbose)
            finally:
                watcher.stop.set()
                watcher.join()
    except KeyboardInterrupt:
        with signals_ignored():
            _mark_stopped(run_dir, "interrupted")
        raise
    except SimulationRunError:
        _mark_stopped(run_dir, "failed")
        raise
    summary_path = run_dir / rundir.SUMMARY
    if not summary_path.exists():
        _mark_stopped(run_dir, "failed")
        raise SimulationRunError(f"the ServerApp finished without writing {summary_path}")
    return json.loads(summary_path.read_text())
