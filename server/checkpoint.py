"""Checkpoints of a federated run: what to save after each committed round, and how a
restart picks the run up again (docs/architecture.md §4).

A checkpoint is the commit point of a round: the model, the strategy's state and
:class:`RunState` (the ledger, the random states, the wall clock) as tensors and JSON --
never pickled objects (``rundir.read_checkpoint`` loads with ``weights_only``).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedgen.contract import rundir
from fedgen.contract.scenario import Scenario
from fedgen.privacy.ledger import PrivacyLedger, atomic_write_text
from fedgen.shared_models import GenerativeModel

from .dpfedsgd import CHECKPOINT_KEY as SERVER_OPTIMIZER
from .strategies import load_strategy_state, strategy_state


@dataclass
class RunState:
    """What a checkpoint holds besides the model and the strategy: enough to resume the
    run, as JSON (:meth:`to_dict`) -- a checkpoint never holds pickled objects."""

    next_round: int
    ledger: dict[str, Any]
    exhausted_sites: list[str]
    python_random_state: Any  # random.getstate(): (version, 625 ints, gauss_next)
    wall_seconds: float
    noise_rng_state: Any = None  # site-level DP noise generator's bit_generator.state (a dict)

    def to_dict(self) -> dict[str, Any]:
        version, internal, gauss_next = self.python_random_state
        return {**asdict(self), "python_random_state": [version, list(internal), gauss_next]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunState":
        version, internal, gauss_next = d["python_random_state"]
        return cls(next_round=int(d["next_round"]), ledger=d["ledger"], exhausted_sites=list(d["exhausted_sites"]),
                   python_random_state=(version, tuple(internal), gauss_next),
                   wall_seconds=float(d["wall_seconds"]), noise_rng_state=d.get("noise_rng_state"))


def latest_path(run_dir: Path) -> Path:
    return Path(run_dir) / rundir.CHECKPOINTS / "latest.pt"


def save(run_dir: Path, state: RunState, *, model: GenerativeModel, strategy: Any, scenario: Scenario,
         server_optimizer: Any = None) -> None:
    """Commit a round: ``latest.pt`` (what resume reads) and the round's model weights.
    ``server_optimizer``: DP-FedSGD's (server/dpfedsgd.py), kept beside the strategy's arrays."""
    folder = Path(run_dir) / rundir.CHECKPOINTS
    folder.mkdir(exist_ok=True)
    strategy_arrays = strategy_state(strategy)
    if server_optimizer is not None:
        strategy_arrays[SERVER_OPTIMIZER] = server_optimizer.state_tensors()
    rundir.write_checkpoint(latest_path(run_dir), model=model.state_dict(), state=state.to_dict(),
                            strategy=strategy_arrays, scenario=scenario.resolved())
    torch.save(model.state_dict(), folder / f"model-round-{state.next_round - 1:04d}.pt")


def restore(path: Path, *, model: GenerativeModel, strategy: Any,
            noise_rng: np.random.Generator | None, server_optimizer: Any = None) -> tuple[RunState, PrivacyLedger]:
    """Load the checkpoint at ``path`` into ``model``, ``strategy``, Python's ``random``
    and (seeded noise only) ``noise_rng``; its state and ledger. One that does not fit
    the run is a one-line :class:`rundir.CheckpointError`."""
    ckpt = rundir.read_checkpoint(path)  # weights_only: a checkpoint never runs code
    try:
        state = RunState.from_dict(ckpt["state"])
        model.load_state_dict(ckpt["model"])
        ledger = PrivacyLedger.from_dict(state.ledger)
        random.setstate(state.python_random_state)
        if state.noise_rng_state is not None and noise_rng is not None:
            noise_rng.bit_generator.state = state.noise_rng_state
        strategy_arrays = dict(ckpt["strategy"])
        optimizer_state = strategy_arrays.pop(SERVER_OPTIMIZER, None)
        if (optimizer_state is None) != (server_optimizer is None):
            raise ValueError("the server's DP-FedSGD optimizer state and the run's training mode differ")
        if server_optimizer is not None:
            server_optimizer.load_state_tensors(optimizer_state)
        load_strategy_state(strategy, strategy_arrays)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise rundir.CheckpointError(f"{path}: does not fit this run ({type(err).__name__}: {first})") from None
    return state, ledger


def drop_uncommitted_metrics(run_dir: Path, next_round: int) -> None:
    """Resume redoes the rounds after the checkpoint: their rows go."""
    rows = [r for r in rundir.read_metrics(run_dir) if r["round"] < next_round]
    atomic_write_text(Path(run_dir) / rundir.METRICS, "".join(json.dumps(r) + "\n" for r in rows))
