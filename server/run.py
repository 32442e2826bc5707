"""The federated run, driven by the ServerApp: rounds, ledger, checkpoints, budget stop.

Plain Python over Flower's ``Grid``: :class:`FederatedRun` sends train messages built by a
Message-API strategy, sorts and validates the replies, lets the strategy aggregate the
good ones, folds every site's ledger into ``privacy.json``, evaluates, checkpoints, and
stops early when no site can train any more (``stopped_reason: budget_exhausted``).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from privacy.ledger import PrivacyLedger, atomic_write_text
from shared_models import GenerativeModel, build_model

from . import rundir
from .evaluate import GlobalEvaluator
from .strategies import build_strategy
from .updates import sort_replies, weighted_mean

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """What a checkpoint holds besides the model: enough to resume the run."""

    next_round: int
    ledger: dict[str, Any]
    exhausted_sites: list[str]
    python_random_state: Any
    wall_seconds: float


def task_config(scenario: dict[str, Any], spec: rundir.DataSpec) -> str:
    """The JSON the sites receive each round: how to build and train the model."""
    return json.dumps({
        "model": scenario["model"],
        "data_shape": list(spec.shape),
        "num_classes": spec.num_classes,
        "training": scenario["training"],
        "privacy": {**scenario["privacy"], "planned_rounds": scenario["federation"]["rounds"]},
        "seed": scenario["seed"],
        "device": scenario["simulation"]["device"],
    })


def build_global_model(scenario: dict[str, Any], spec: rundir.DataSpec) -> GenerativeModel:
    options = {k: v for k, v in scenario["model"].items() if k != "family"}
    torch.manual_seed(scenario["seed"])
    return build_model(scenario["model"]["family"], data_shape=spec.shape, num_classes=spec.num_classes,
                       **options)


class FederatedRun:
    def __init__(self, grid: Grid, run_dir: Path) -> None:
        self.grid = grid
        self.run_dir = Path(run_dir)
        self.scenario = rundir.read_scenario(self.run_dir)
        self.spec = rundir.DataSpec.read(self.run_dir)
        self.fed = self.scenario["federation"]
        self.privacy_cfg = self.scenario["privacy"]
        self.model = build_global_model(self.scenario, self.spec)
        self.strategy = build_strategy(self.fed["strategy"], self.fed)
        self.evaluator = GlobalEvaluator(rundir.read_reference(self.run_dir), seed=self.scenario["seed"])
        self.ledger = PrivacyLedger(accountant=self.privacy_cfg["accountant"], delta=self.privacy_cfg["delta"],
                                    target_epsilon=self.privacy_cfg["target_epsilon"]
                                    if self.privacy_cfg["enabled"] else None)
        self.exhausted: set[str] = set()
        self.start_round = 1
        self.wall_before = 0.0
        random.seed(self.scenario["seed"])  # Flower's node sampling uses `random`
        self._maybe_resume()

    # -- checkpoints --------------------------------------------------------------------
    @property
    def _ckpt(self) -> Path:
        return self.run_dir / rundir.CHECKPOINTS / "latest.pt"

    def _maybe_resume(self) -> None:
        if not self._ckpt.exists():
            return
        ckpt = torch.load(self._ckpt, weights_only=False)
        state: RunState = ckpt["state"]
        self.model.load_state_dict(ckpt["model"])
        self.ledger = PrivacyLedger.from_dict(state.ledger)
        self.exhausted = set(state.exhausted_sites)
        self.start_round = state.next_round
        self.wall_before = state.wall_seconds
        random.setstate(state.python_random_state)
        if "strategy" in ckpt:
            self.strategy = ckpt["strategy"]
        self._restore_site_ledgers()
        self._drop_uncommitted_metrics()
        log.info("resuming at round %d from %s", self.start_round, self._ckpt)

    def _drop_uncommitted_metrics(self) -> None:
        rows = [r for r in rundir.read_metrics(self.run_dir) if r["round"] < self.start_round]
        atomic_write_text(self.run_dir / rundir.METRICS, "".join(json.dumps(r) + "\n" for r in rows))

    def _restore_site_ledgers(self) -> None:
        """Simulation resume: the checkpoint is the commit point. A round the server never
        committed was never aggregated or released, so the simulated sites' ledgers are
        reset to the committed ones and that round is redone -- the final ledger equals an
        uninterrupted run's. (Deployed sites keep their own ledgers and are never reset.)"""
        for site, ledger in self.ledger.sites.items():
            atomic_write_text(self.run_dir / "sites" / site / "ledger.json", ledger.to_json())
        for folder in (self.run_dir / "sites").glob("*"):
            if folder.name not in self.ledger.sites:
                (folder / "ledger.json").unlink(missing_ok=True)

    def _checkpoint(self, next_round: int, wall: float) -> None:
        folder = self.run_dir / rundir.CHECKPOINTS
        folder.mkdir(exist_ok=True)
        state = RunState(next_round=next_round, ledger=self.ledger.to_dict(),
                         exhausted_sites=sorted(self.exhausted),
                         python_random_state=random.getstate(), wall_seconds=wall)
        tmp = folder / ".latest.pt.tmp"
        torch.save({"model": self.model.state_dict(), "state": state, "strategy": self.strategy,
                    "scenario": self.scenario}, tmp)
        tmp.replace(self._ckpt)
        torch.save(self.model.state_dict(), folder / f"model-round-{next_round - 1:04d}.pt")

    # -- the run --------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        t_start = time.time() - self.wall_before
        arrays = ArrayRecord(self.model.state_dict())
        config_json = task_config(self.scenario, self.spec)
        stopped_reason = "completed"
        rounds_completed = self.start_round - 1
        rounds = self.fed["rounds"]
        for rnd in range(self.start_round, rounds + 1):
            t_round = time.time()
            messages = list(self.strategy.configure_train(
                rnd, arrays, ConfigRecord({"fedgen": config_json, "run-dir": str(self.run_dir)}), self.grid))
            replies = list(self.grid.send_and_receive(messages, timeout=self.fed["round_timeout_s"]))
            sorted_ = sort_replies(replies, arrays, sampled=len(messages))
            for site_ledger in sorted_.ledgers:
                self.ledger.update_site(site_ledger)
            self.exhausted.update(sorted_.refused)
            if sorted_.ok:
                new_arrays, _ = self.strategy.aggregate_train(rnd, sorted_.ok)
                if new_arrays is not None:
                    arrays = new_arrays
                    self.model.load_state_dict(arrays.to_torch_state_dict())
            row: dict[str, Any] = {
                "round": rnd,
                "clients_sampled": len(messages),
                "clients_ok": len(sorted_.ok),
                "clients_failed": len(sorted_.failed),
                "clients_refused": len(sorted_.refused),
                "train_loss": weighted_mean(sorted_.ok, "train-loss"),
                "epsilon": self.ledger.epsilon if self.privacy_cfg["enabled"] else None,
                "failures": [{"site": s, "reason": short_reason(r)} for s, r in sorted_.failed],
            }
            if messages and not sorted_.ok and not sorted_.refused:
                # Every sampled site failed: training cannot progress, and retrying the same
                # round would most likely fail the same way. Stop and say why.
                stopped_reason = "clients_failed"
                row["seconds"] = time.time() - t_round
                self._append_metrics(row)
                log.error("round %d: every sampled site failed, e.g. %s", rnd, row["failures"][0]["reason"])
                break
            if not sorted_.ok and len(self.exhausted) >= self.spec.num_sites:
                stopped_reason = "budget_exhausted"
                row["seconds"] = time.time() - t_round
                self._append_metrics(row)
                log.info("round %d: every site's budget is spent; stopping", rnd)
                break
            rounds_completed = rnd
            every = self.scenario["evaluation"]["every"]
            if (every and rnd % every == 0) or rnd == rounds:
                t_eval = time.time()
                row.update(self._evaluate(rnd, arrays))
                row["eval_seconds"] = time.time() - t_eval
            row["seconds"] = time.time() - t_round
            self._append_metrics(row)
            self.ledger.write(self.run_dir / rundir.PRIVACY)
            self._checkpoint(next_round=rnd + 1, wall=time.time() - t_start)
        return self._finish(rounds_completed, stopped_reason, time.time() - t_start)

    def _evaluate(self, rnd: int, arrays: ArrayRecord) -> dict[str, Any]:
        cfg = self.scenario["evaluation"]
        if self.evaluator.ref_x is None:  # deployment without a public reference set
            return self._federated_evaluation(rnd, arrays)
        return self.evaluator(self.model, num_samples=cfg["num_samples"], round_seed=self.scenario["seed"] + rnd,
                              grid_path=self.run_dir / rundir.SAMPLES / f"round-{rnd:04d}.png",
                              tstr=cfg["tstr"] and rnd == self.fed["rounds"])

    def _federated_evaluation(self, rnd: int, arrays: ArrayRecord) -> dict[str, Any]:
        """Each site scores the global model on its own data and returns scalars only; the
        server averages them weighted by examples (outside the DP-SGD guarantee)."""
        config = ConfigRecord({"fedgen": task_config(self.scenario, self.spec), "server-round": rnd})
        messages = [Message(content=RecordDict({"arrays": arrays, "config": config}),
                            message_type=MessageType.EVALUATE, dst_node_id=node)
                    for node in self.grid.get_node_ids()]
        replies = [r for r in self.grid.send_and_receive(messages, timeout=self.fed["round_timeout_s"])
                   if not r.has_error()]
        return {"federated_eval_loss": weighted_mean(replies, "eval-loss"), "federated_eval_sites": len(replies)}

    def _append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.run_dir / rundir.METRICS, "a") as fh:
            fh.write(json.dumps(_jsonable(row)) + "\n")

    def _finish(self, rounds_completed: int, stopped_reason: str, wall: float) -> dict[str, Any]:
        self.ledger.write(self.run_dir / rundir.PRIVACY)
        rows = rundir.read_metrics(self.run_dir)
        last_eval = next((r for r in reversed(rows) if any(k not in _ROUND_KEYS for k in r)), {})
        summary = {
            "rounds_completed": rounds_completed,
            "stopped_reason": stopped_reason,
            "model": self.scenario["model"]["family"],
            "epsilon": self.ledger.epsilon if self.privacy_cfg["enabled"] else None,
            "delta": self.privacy_cfg["delta"] if self.privacy_cfg["enabled"] else None,
            "privacy_unit": "example" if self.privacy_cfg["enabled"] else None,
            "metrics": {k: v for k, v in last_eval.items() if k not in _ROUND_KEYS},
            "wall_seconds": wall,
        }
        if stopped_reason == "clients_failed":
            summary["failure"] = rows[-1]["failures"][0]["reason"] if rows and rows[-1]["failures"] else ""
        atomic_write_text(self.run_dir / rundir.SUMMARY, json.dumps(_jsonable(summary), indent=2))
        try:
            from evaluation.report import write_run_report

            write_run_report(self.run_dir)
        except Exception as err:  # a report must never lose a finished run
            log.warning("report.html not written: %s", err)
        return summary


def short_reason(reason: str) -> str:
    """The informative line of a (possibly Ray-wrapped, multi-line) error reply."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    messages = [line.split("Message:", 1)[1].strip() for line in lines if "Message:" in line]
    text = messages[-1] if messages else (lines[-1] if lines else reason)
    return text.rstrip("'>")[:400]


_ROUND_KEYS = {"round", "clients_sampled", "clients_ok", "clients_failed", "clients_refused", "train_loss",
               "epsilon", "seconds", "failures", "eval_seconds", "class_histogram"}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:  # NaN -> null (JSON has no NaN)
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return obj
