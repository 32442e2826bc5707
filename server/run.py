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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedgen.privacy.ledger import PrivacyLedger, SiteLedger, atomic_write_text, site_sort_key
from fedgen.privacy.randomness import NOT_A_GUARANTEE
from fedgen.privacy.site_level import SiteLevelDP
from fedgen.contract import rundir
from fedgen.contract.rundir import read_canaries
from fedgen.contract.scenario import Scenario
from fedgen.contract.task import build_global_model, example_level, site_level_mechanism, task_from_scenario
from fedgen.shared_models import GenerativeModel

from .aggregation import bound_update_norms, robust_report, site_label
from .evaluate import GlobalEvaluator
from .strategies import ROBUST, build_strategy, load_strategy_state, strategy_state
from .updates import (DEFAULT_MAX_SITE_EXAMPLES, ReplyError, check_metrics, check_site_id, read_site_ledger,
                      site_releases, sort_replies, weighted_mean)

log = logging.getLogger(__name__)


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


def simulated_site_examples(run_dir: Path, spec: rundir.DataSpec) -> dict[str, int] | None:
    """Simulation: each site's largest honest ``num-examples`` (site id -> its partition's
    size, plus the audit canaries planted at it), which bounds what its replies may claim;
    ``None`` when the run directory records no partitions."""
    path = Path(run_dir) / rundir.PARTITIONS
    if not path.exists():
        return None
    with np.load(path) as z:
        sizes = {str(i): len(z[f"site_{i}"]) for i in range(spec.num_sites)}
    canaries = read_canaries(str(run_dir))
    if canaries is not None and str(canaries.site) in sizes:
        sizes[str(canaries.site)] += int(canaries.included.sum())
    return sizes


class FederatedRun:
    def __init__(self, grid: Grid, run_dir: Path) -> None:
        self.grid = grid
        self.run_dir = Path(run_dir)
        self.scenario = rundir.read_scenario(self.run_dir)
        self.spec = rundir.DataSpec.read(self.run_dir)
        self.fed = self.scenario.federation
        self.privacy_cfg = self.scenario.privacy
        self.model = build_global_model(self.scenario, self.spec)
        self.strategy = build_strategy(self.fed.strategy, self.fed)
        self.evaluator = GlobalEvaluator(rundir.read_reference(self.run_dir), seed=self.scenario.seed)
        self.ledger = PrivacyLedger(accountant=self.privacy_cfg.accountant, delta=self.privacy_cfg.delta,
                                    target_epsilon=self.privacy_cfg.target_epsilon
                                    if example_level(self.scenario) else None,
                                    unit=self.privacy_cfg.unit)
        self.site_dp = self._site_level_mechanism()
        deployed = self.scenario.deployment is not None
        # Site-level DP's amplification needs a sampling draw and noise nobody can predict:
        # both come from the OS's entropy unless a simulation opted in to seeded noise.
        self.seeded_noise = self.privacy_cfg.seeded_noise and not deployed
        self.sampling_rng: Any = random if self.seeded_noise else random.SystemRandom()
        self.noise_rng = np.random.default_rng(self.scenario.seed if self.seeded_noise else None)
        attack = self.scenario.simulation.byzantine
        self.byzantine = set(attack.sites(self.spec.num_sites)) if attack and not deployed else set()
        self.site_examples = None if deployed else simulated_site_examples(self.run_dir, self.spec)
        self.exhausted: set[str] = set()
        self.node_sites: dict[int, str] = {}  # learnt from replies; names error and missing replies
        self.start_round = 1
        self.wall_before = 0.0
        random.seed(self.scenario.seed)  # Flower's node sampling uses `random`
        self._maybe_resume()

    def _site_level_mechanism(self) -> SiteLevelDP | None:
        mech = site_level_mechanism(self.scenario, self.spec.num_sites)
        if mech is not None:
            self.ledger.site_level = mech.to_dict()
        return mech

    # -- checkpoints --------------------------------------------------------------------
    @property
    def _ckpt(self) -> Path:
        return self.run_dir / rundir.CHECKPOINTS / "latest.pt"

    def _maybe_resume(self) -> None:
        if not self._ckpt.exists():
            return
        ckpt = rundir.read_checkpoint(self._ckpt)  # weights_only: a checkpoint never runs code
        try:
            state = RunState.from_dict(ckpt["state"])
            self.model.load_state_dict(ckpt["model"])
            self.ledger = PrivacyLedger.from_dict(state.ledger)
            random.setstate(state.python_random_state)
            if state.noise_rng_state is not None and self.seeded_noise:
                self.noise_rng.bit_generator.state = state.noise_rng_state
            load_strategy_state(self.strategy, ckpt["strategy"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise rundir.CheckpointError(f"{self._ckpt}: does not fit this run ({type(err).__name__}: {first})") \
                from None
        self.exhausted = set(state.exhausted_sites)
        self.start_round = state.next_round
        self.wall_before = state.wall_seconds
        if self.site_dp is not None and self.ledger.site_level:
            self.site_dp = SiteLevelDP.from_dict(self.ledger.site_level)
        self._restore_site_ledgers()
        self._drop_uncommitted_metrics()
        log.info("resuming at round %d from %s", self.start_round, self._ckpt)

    def _drop_uncommitted_metrics(self) -> None:
        rows = [r for r in rundir.read_metrics(self.run_dir) if r["round"] < self.start_round]
        atomic_write_text(self.run_dir / rundir.METRICS, "".join(json.dumps(r) + "\n" for r in rows))

    def _site_ledger_path(self, site: str) -> Path:
        """``sites/<site>/ledger.json`` of a simulated site, checked to stay inside the run
        directory (site ids come from the sites and from files: never trusted as paths)."""
        sites = (self.run_dir / "sites").resolve()
        path = (sites / check_site_id(site) / "ledger.json").resolve()
        if not path.is_relative_to(sites):
            raise ReplyError(f"site id {site!r} names a path outside {sites}")
        return path

    def _restore_site_ledgers(self) -> None:
        """Simulation resume: the checkpoint is the commit point. A round the server never
        committed was never aggregated or released, so the simulated sites' ledgers are
        reset to the committed ones and that round is redone -- the final ledger equals an
        uninterrupted run's. (Deployed sites keep their own ledgers and are never reset.)"""
        try:
            paths = {site: self._site_ledger_path(site) for site in self.ledger.sites}
        except ReplyError as err:
            raise rundir.CheckpointError(f"{self._ckpt}: {err}") from None
        for site, ledger in self.ledger.sites.items():
            atomic_write_text(paths[site], ledger.to_json())
        for folder in (self.run_dir / "sites").glob("*"):
            if folder.name not in self.ledger.sites:
                (folder / "ledger.json").unlink(missing_ok=True)

    def _checkpoint(self, next_round: int, wall: float) -> None:
        folder = self.run_dir / rundir.CHECKPOINTS
        folder.mkdir(exist_ok=True)
        state = RunState(next_round=next_round, ledger=self.ledger.to_dict(),
                         exhausted_sites=sorted(self.exhausted),
                         python_random_state=random.getstate(), wall_seconds=wall,
                         noise_rng_state=self.noise_rng.bit_generator.state)
        rundir.write_checkpoint(self._ckpt, model=self.model.state_dict(), state=state.to_dict(),
                                strategy=strategy_state(self.strategy), scenario=self.scenario.resolved())
        torch.save(self.model.state_dict(), folder / f"model-round-{next_round - 1:04d}.pt")

    # -- the run --------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        t_start = time.time() - self.wall_before
        arrays = ArrayRecord(self.model.state_dict())
        config_json = task_from_scenario(self.scenario, self.spec).to_json()
        stopped_reason = "completed"
        rounds_completed = self.start_round - 1
        rounds = self.fed.rounds
        for rnd in range(self.start_round, rounds + 1):
            t_round = time.time()
            if self.site_dp is not None and not self.site_dp.can_release():
                stopped_reason = "budget_exhausted"
                log.info("round %d: the site-level budget is spent; stopping", rnd)
                break
            config = ConfigRecord({"fedgen": config_json, "run-dir": str(self.run_dir)})
            messages = (self._poisson_sample(rnd, arrays, config) if self.site_dp is not None
                        else list(self.strategy.configure_train(rnd, arrays, config, self.grid)))
            replies = list(self.grid.send_and_receive(messages, timeout=self.fed.round_timeout_s))
            # Under site-level DP clipping bounds every update; a rejection that depends on
            # the other sites' norms would break that sensitivity bound, so it is off.
            sorted_ = sort_replies(replies, arrays, sent_to=[m.metadata.dst_node_id for m in messages],
                                   known_sites=self.node_sites,
                                   destinations={m.metadata.message_id: m.metadata.dst_node_id for m in messages},
                                   site_examples=self.site_examples, recorded_ledgers=self.ledger.sites,
                                   outlier_factor=None if self.site_dp else self.fed.outlier_factor)
            self.node_sites.update(sorted_.site_of)
            for site_ledger in sorted_.ledgers:
                self._update_site_ledger(site_ledger)
            self._sync_simulated_site_ledgers()
            self.exhausted.update(sorted_.refused)
            row: dict[str, Any] = {
                "round": rnd,
                "clients_sampled": len(messages),
                "clients_ok": len(sorted_.ok),
                "clients_failed": len(sorted_.failed),
                "clients_refused": len(sorted_.refused),
                "train_loss": weighted_mean(sorted_.ok, "train-loss"),
                "epsilon": self.ledger.epsilon if example_level(self.scenario) else None,
                "failures": [{"site": s, "reason": short_reason(r)} for s, r in sorted_.failed],
            }
            if self.byzantine:
                row["byzantine"] = sorted(site_label(m) for m in sorted_.ok if site_label(m) in self.byzantine)
            if self.scenario.simulation.faults:
                row["faults"] = {"dropped_out": sorted(sorted_.unavailable, key=site_sort_key),
                                 "errors": sorted(sorted_.errors, key=site_sort_key),
                                 "late": sorted(sorted_.late, key=site_sort_key),
                                 "delayed_s": {site_label(m): round(float(_metric(m, "delay-s")), 2)
                                               for m in sorted_.ok if _metric(m, "delay-s")}}
            if messages and not (sorted_.ok or sorted_.refused or sorted_.unavailable or sorted_.late):
                # Every sampled site failed (error replies, invalid updates): training cannot
                # progress, and retrying would most likely fail the same way. Stop, say why.
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
            arrays = self._aggregate(rnd, arrays, sorted_.ok, row)
            rounds_completed = rnd
            every = self.scenario.evaluation.every
            if (every and rnd % every == 0) or rnd == rounds:
                t_eval = time.time()
                row.update(self._evaluate(rnd, arrays))
                row["eval_seconds"] = time.time() - t_eval
            row["seconds"] = time.time() - t_round
            self._append_metrics(row)
            self.ledger.write(self.run_dir / rundir.PRIVACY)
            self._checkpoint(next_round=rnd + 1, wall=time.time() - t_start)
        return self._finish(rounds_completed, stopped_reason, time.time() - t_start)

    def _sync_simulated_site_ledgers(self) -> None:
        """Simulation: a site that spent budget but whose reply never arrived (it crashed or
        was late) has the spend in its own ledger file; fold it into ``privacy.json`` now,
        so the run's ledger never understates what the sites spent."""
        if self.scenario.deployment is not None:
            return
        for path in sorted((self.run_dir / "sites").glob("*/ledger.json")):
            try:  # the file's site must be its folder's: no ledger lands under another site's name
                ledger = read_site_ledger(path.read_text(), path.parent.name)
            except ReplyError as err:
                log.warning("%s: ignored (%s)", path, err)
                continue
            known = self.ledger.sites.get(ledger.site)
            if known is None or len(ledger.history) > len(known.history):
                self._update_site_ledger(ledger)

    def _update_site_ledger(self, ledger: SiteLedger) -> None:
        """Fold a site's ledger into ``privacy.json``; one that would shrink the record
        (``sort_replies`` rejects such replies already) is logged, never fatal."""
        try:
            self.ledger.update_site(ledger)
        except ValueError as err:
            log.warning("ledger of site %s not recorded: %s", ledger.site, err)

    def _poisson_sample(self, rnd: int, arrays: ArrayRecord, config: ConfigRecord) -> list[Message]:
        """Site-level DP's sampling: every connected site independently with probability q."""
        deadline = time.time() + self.fed.round_timeout_s
        while len(nodes := list(self.grid.get_node_ids())) < self.fed.min_fit_sites and time.time() < deadline:
            log.info("waiting for sites: %d connected, %d required", len(nodes), self.fed.min_fit_sites)
            time.sleep(1.0)
        config["server-round"] = rnd
        content = RecordDict({"arrays": arrays, "config": config})
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
                for node in self.site_dp.sample(nodes, self.sampling_rng)]

    def _aggregate(self, rnd: int, arrays: ArrayRecord, ok: list[Message], row: dict[str, Any]) -> ArrayRecord:
        """The round's new global model from the valid updates ``ok`` (``row`` gets what
        the server did to them)."""
        if self.site_dp is not None:  # DP-FedAvg: a noised release even when nobody replied
            new, info = self.site_dp.release(
                {k: v.numpy() for k, v in arrays.items()},
                [{k: v.numpy() for k, v in next(iter(m.content.array_records.values())).items()} for m in ok],
                self.noise_rng)
            self.ledger.site_level = self.site_dp.to_dict()
            norms = info.pop("site_update_norms")
            row.update(info, site_update_norm_median=float(np.median(norms)) if norms else None)
            self.model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in new.items()})
            return self._server_update(row)
        if not ok:
            return arrays
        releasing = self.model.training_mode == "release"  # before loading: a hybrid's mode follows its buffer
        if self.fed.norm_bound is not None:
            row["clients_norm_bounded"] = bound_update_norms(ok, arrays, self.fed.norm_bound)
        if self.fed.strategy in ROBUST:
            row["robust"] = robust_report(self.fed.strategy, self.fed, ok)
        new_arrays, _ = self.strategy.aggregate_train(rnd, ok)
        if new_arrays is None:
            return arrays
        self.model.load_state_dict(new_arrays.to_torch_state_dict())
        # Releases under a plain mean: the family combines them itself and knows the noise
        # that leaves (public: the sites' sums, counts and sigmas). Robust rules and norm
        # bounds reshape the updates, so their aggregate stands as it is.
        noise = None
        if releasing and self.fed.strategy == "fedavg" and not row.get("clients_norm_bounded"):
            noise = self.model.combine_releases(*site_releases(ok, rnd, self.model.release_buffer))
            row["release_noise_variance"] = noise
        return self._server_update(row, release_noise_variance=noise)

    def _server_update(self, row: dict[str, Any], release_noise_variance: float | None = None) -> ArrayRecord:
        """The family's server-side post-processing of the aggregate (e.g. fitting the mmd
        generator to the released embedding); the new global model."""
        t = time.time()
        info = self.model.server_update(release_noise_variance=release_noise_variance)
        if info:
            row.update(info, server_update_seconds=time.time() - t)
        return ArrayRecord(self.model.state_dict())

    def _evaluate(self, rnd: int, arrays: ArrayRecord) -> dict[str, Any]:
        cfg = self.scenario.evaluation
        if self.evaluator.ref_x is None:  # deployment without a public reference set
            return self._federated_evaluation(rnd, arrays)
        return self.evaluator(self.model, num_samples=cfg.num_samples, round_seed=self.scenario.seed + rnd,
                              grid_path=self.run_dir / rundir.SAMPLES / f"round-{rnd:04d}.png",
                              tstr=cfg.tstr and rnd == self.fed.rounds)

    def _federated_evaluation(self, rnd: int, arrays: ArrayRecord) -> dict[str, Any]:
        """Each site scores the global model on its own data and returns scalars only; the
        server averages them weighted by examples (outside the DP-SGD guarantee)."""
        config = ConfigRecord({"fedgen": task_from_scenario(self.scenario, self.spec).to_json(), "server-round": rnd})
        messages = [Message(content=RecordDict({"arrays": arrays, "config": config}),
                            message_type=MessageType.EVALUATE, dst_node_id=node)
                    for node in self.grid.get_node_ids()]
        replies = [r for r in self.grid.send_and_receive(messages, timeout=self.fed.round_timeout_s)
                   if not r.has_error() and _valid_eval_metrics(r)]
        return {"federated_eval_loss": weighted_mean(replies, "eval-loss"), "federated_eval_sites": len(replies)}

    def _guarantees(self) -> list[dict[str, Any]]:
        """Each DP guarantee of the run in words: what it protects, at which (epsilon, delta)."""
        out = []
        if example_level(self.scenario):
            if self.model.release_epsilon is not None:  # a hybrid: release round, then DP-SGD
                mechanism = "a Gaussian release of per-class sums, then DP-SGD, at every site"
            elif self.model.training_mode == "release":
                mechanism = "one Gaussian release of a per-class statistic at every site"
            else:
                mechanism = "DP-SGD at every site"
            out.append({"unit": "example", "epsilon": self.ledger.epsilon, "delta": self.privacy_cfg.delta,
                        "mechanism": f"{mechanism} (largest epsilon over sites)",
                        "protects": "any single training record at a site"})
        if self.site_dp is not None:
            out.append({"unit": "site", "epsilon": self.site_dp.epsilon, "delta": self.site_dp.delta,
                        "mechanism": "DP-FedAvg on the server (clipped site updates, Gaussian noise, "
                                     "Poisson site sampling)",
                        "protects": "whether any one site took part at all, all of its records together"})
        for guarantee in out:
            guarantee["noise"] = NOT_A_GUARANTEE if self.seeded_noise else "secret: fresh OS entropy every round"
        return out

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
            "model": self.scenario.model.family,
            "epsilon": self.ledger.epsilon if example_level(self.scenario) else None,
            "delta": self.privacy_cfg.delta if example_level(self.scenario) else None,
            "privacy_unit": self.privacy_cfg.unit if self.privacy_cfg.enabled else None,
            "site_level_epsilon": self.site_dp.epsilon if self.site_dp is not None else None,
            "guarantees": self._guarantees(),
            "seeded_noise": self.seeded_noise,
            "metrics": {k: v for k, v in last_eval.items() if k not in _ROUND_KEYS},
            "wall_seconds": wall,
        }
        if self.seeded_noise and self.privacy_cfg.enabled:
            summary["warning"] = NOT_A_GUARANTEE + " (privacy.seeded_noise: true, seed in scenario.yaml)"
        if stopped_reason == "clients_failed":
            summary["failure"] = rows[-1]["failures"][0]["reason"] if rows and rows[-1]["failures"] else ""
        atomic_write_text(self.run_dir / rundir.SUMMARY, json.dumps(_jsonable(summary), indent=2))
        try:
            from fedgen.evaluation.report import write_run_report

            write_run_report(self.run_dir)
        except Exception as err:  # a report must never lose a finished run
            log.warning("report.html not written: %s", err)
        return summary


def _metric(msg: Message, key: str, default: float = 0.0) -> float:
    metrics = next(iter(msg.content.metric_records.values()))
    return float(metrics[key]) if key in metrics else default


def _valid_eval_metrics(msg: Message) -> bool:
    """Whether an evaluate reply's metrics can be averaged (known keys, finite numbers, a
    bounded count); a bad one is left out with a warning, like a bad train reply."""
    try:
        check_metrics(next(iter(msg.content.metric_records.values()), {}),
                      max_examples=DEFAULT_MAX_SITE_EXAMPLES)
    except ReplyError as err:
        log.warning("evaluate reply from node %s left out: %s", msg.metadata.src_node_id, err)
        return False
    return True


def short_reason(reason: str) -> str:
    """The informative line of a (possibly Ray-wrapped, multi-line) error reply."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    messages = [line.split("Message:", 1)[1].strip() for line in lines if "Message:" in line]
    text = messages[-1] if messages else (lines[-1] if lines else reason)
    return text.rstrip("'>")[:400]


_ROUND_KEYS = {"round", "clients_sampled", "clients_ok", "clients_failed", "clients_refused", "train_loss",
               "epsilon", "seconds", "failures", "eval_seconds", "class_histogram", "byzantine", "robust",
               "clients_norm_bounded", "site_level_epsilon", "sites_clipped", "site_update_norm_median", "faults",
               "server_fit_mmd", "server_fit_steps", "release_noise_variance", "release_noise_energy",
               "server_update_seconds"}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:  # NaN -> null (JSON has no NaN)
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return obj
