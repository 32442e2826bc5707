"""The federated run, driven by the ServerApp: rounds, ledger, checkpoints, budget stop.

Plain Python over Flower's ``Grid``: :class:`FederatedRun` sends train messages built by a
Message-API strategy, sorts and validates the replies, lets the strategy aggregate the
good ones, folds every site's ledger into ``privacy.json``, evaluates, checkpoints, and
stops early when no site can train any more (``stopped_reason: budget_exhausted``).

The round loop reads top to bottom in :meth:`FederatedRun.execute`; around it:
``checkpoint.py`` (commit and resume), ``record.py`` (the ``metrics.jsonl`` row),
``summary.py`` (``summary.json``) and ``hooks.py`` (what a simulation adds: the run never
asks whether it is one; docs/architecture.md §1).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedgen.contract import rundir
from fedgen.contract.task import (build_global_model, distributed_noise_plan, example_level, site_level_mechanism,
                                  task_from_scenario)
from fedgen.privacy.ledger import PrivacyLedger, SiteLedger, site_sort_key
from fedgen.privacy.site_level import SiteLevelDP
from fedgen.shared_models.warm_start import ReleaseWarmStart

from . import checkpoint
from .aggregation import bound_update_norms, robust_report, site_label
from .evaluate import GlobalEvaluator
from .fit_cache import GeneratorFitCache
from .hooks import RunHooks
from .record import RoundRecord, ServerUpdate, short_reason
from .dpfedsgd import ServerOptimizer
from .secagg import SecAggRound, SecAggWorkflow
from .site_level import SiteLevelDPStrategy
from .strategies import ROBUST, build_strategy
from .summary import RunFailedError, RunPrivacy, failure_line, write_summary
from .warm_start import public_warm_start, read_record, release_record, write_record
from .updates import (DEFAULT_MAX_SITE_EXAMPLES, ReplyError, RoundReplies, check_metrics, read_site_ledger, site_info,
                      site_releases, sort_replies, weighted_mean)

log = logging.getLogger(__name__)


class FederatedRun:
    """One run over ``run_dir``; ``hooks``: what the harness adds (default: nothing, a
    deployment's run; ``server/app.py`` passes the simulation's)."""

    def __init__(self, grid: Grid, run_dir: Path, hooks: RunHooks | None = None, *,
                 flower_run_id: int | None = None) -> None:
        self.grid = grid
        self.flower_run_id = flower_run_id
        self.run_dir = Path(run_dir)
        self.hooks = hooks if hooks is not None else RunHooks()
        self.scenario = rundir.read_scenario(self.run_dir)
        self.spec = rundir.DataSpec.read(self.run_dir)
        self.fed = self.scenario.federation
        self.privacy_cfg = self.scenario.privacy
        self.model = build_global_model(self.scenario, self.spec)
        self.evaluator = GlobalEvaluator(rundir.read_reference(self.run_dir), seed=self.scenario.seed)
        self.ledger = PrivacyLedger(accountant=self.privacy_cfg.accountant, delta=self.privacy_cfg.delta,
                                    target_epsilon=self.privacy_cfg.target_epsilon
                                    if example_level(self.scenario) else None,
                                    unit=self.privacy_cfg.unit)
        # Site-level DP's amplification needs a sampling draw and noise nobody can predict:
        # both come from the OS's entropy unless a simulation opted in to seeded noise.
        self.seeded_noise = self.privacy_cfg.seeded_noise and self.hooks.allows_seeded_noise
        self.sampling_rng: Any = random if self.seeded_noise else random.SystemRandom()
        self.noise_rng = np.random.default_rng(self.scenario.seed if self.seeded_noise else None)
        if self.seeded_noise and isinstance(self.model, ReleaseWarmStart):  # only a seeded release can recur
            self.model.fit_cache = GeneratorFitCache()
        self.strategy = self._build_strategy()
        sec = self.fed.secure_aggregation
        #: SecAgg+ (server/secagg.py) when the scenario asks for it: the server sees only sums
        self.secagg = None if sec is None else SecAggWorkflow(
            threshold=sec.threshold, bits=sec.bits, clip_norm=sec.clip_norm, num_neighbours=sec.neighbours,
            timeout=self.fed.round_timeout_s, rng=self.sampling_rng)
        #: noise: distributed -- the public plans of the release and DP-FedSGD rounds (contract/task.py)
        self.noise = distributed_noise_plan(self.scenario, self.model)
        #: DP-FedSGD with distributed noise (server/dpfedsgd.py): the server takes the optimizer step
        self.server_optimizer = (ServerOptimizer(self.model, lr=self.scenario.training.lr,
                                                 batch_size=self.scenario.training.batch_size)
                                 if self.noise is not None and self.noise.sgd is not None else None)
        #: DP-FedAvg (server/site_level.py) when the scenario asks for site-level DP, else None
        self.site_dp = self.strategy if isinstance(self.strategy, SiteLevelDPStrategy) else None
        if self.site_dp is not None:
            self.ledger.site_level = self.site_dp.mechanism.to_dict()
        self.site_examples = self.hooks.site_examples()
        self.exhausted: set[str] = set()
        self.node_sites: dict[int, str] = {}  # learnt from replies; names error and missing replies
        self.start_round = 1
        self.wall_before = 0.0
        random.seed(self.scenario.seed)  # Flower's node sampling uses `random`
        self._maybe_resume()

    def _build_strategy(self) -> Strategy:
        """The scenario's strategy; under site-level DP wrapped in DP-FedAvg, which samples
        and aggregates in its place (server/site_level.py says why)."""
        strategy = build_strategy(self.fed.strategy, self.fed)
        mechanism = site_level_mechanism(self.scenario, self.spec.num_sites)
        if mechanism is None:
            return strategy
        return SiteLevelDPStrategy(strategy, mechanism, sampling_rng=self.sampling_rng, noise_rng=self.noise_rng,
                                   min_sites=self.fed.min_fit_sites, wait_s=self.fed.round_timeout_s)

    # -- checkpoints (server/checkpoint.py) -----------------------------------------------
    @property
    def _ckpt(self) -> Path:
        return checkpoint.latest_path(self.run_dir)

    def _maybe_resume(self) -> None:
        if not self._ckpt.exists():
            return
        state, self.ledger = checkpoint.restore(self._ckpt, model=self.model, strategy=self.strategy,
                                                noise_rng=self.noise_rng if self.seeded_noise else None,
                                                server_optimizer=self.server_optimizer)
        self.exhausted = set(state.exhausted_sites)
        self.start_round = state.next_round
        self.wall_before = state.wall_seconds
        if self.site_dp is not None and self.ledger.site_level:  # the releases so far
            self.site_dp.mechanism = SiteLevelDP.from_dict(self.ledger.site_level)
        try:
            self.hooks.restore_site_ledgers(self.ledger)
        except ReplyError as err:
            raise rundir.CheckpointError(f"{self._ckpt}: {err}") from None
        checkpoint.drop_uncommitted_metrics(self.run_dir, self.start_round)
        log.info("resuming at round %d from %s", self.start_round, self._ckpt)

    def _checkpoint(self, next_round: int, wall: float) -> None:
        state = checkpoint.RunState(next_round=next_round, ledger=self.ledger.to_dict(),
                                    exhausted_sites=sorted(self.exhausted),
                                    python_random_state=random.getstate(), wall_seconds=wall,
                                    # OS-entropy noise stays secret: its generator's state would
                                    # let a checkpoint's reader recompute the noise of every round
                                    noise_rng_state=self.noise_rng.bit_generator.state if self.seeded_noise else None)
        checkpoint.save(self.run_dir, state, model=self.model, strategy=self.strategy, scenario=self.scenario,
                        server_optimizer=self.server_optimizer)

    # -- the run --------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        t_start = time.time() - self.wall_before
        if self.start_round == 1:  # before round 1, never again on resume (docs/models.md, "Warm starts")
            public_warm_start(self.model, self.run_dir, self.scenario, self.evaluator)
        arrays = ArrayRecord(self.model.state_dict())
        config_json = task_from_scenario(self.scenario, self.spec).to_json()
        stopped_reason = "completed"
        rounds_completed = self.start_round - 1
        for rnd in range(self.start_round, self.fed.rounds + 1):
            t_round = time.time()
            if self.site_dp is not None and not self.site_dp.can_release():
                stopped_reason = "budget_exhausted"
                log.info("round %d: the site-level budget is spent; stopping", rnd)
                break
            config = ConfigRecord({"fedgen": config_json, "run-dir": str(self.run_dir)})
            messages = list(self.strategy.configure_train(rnd, arrays, config, self.grid))
            secagg_round, trained = None, messages  # trained: the train messages sent
            if self.secagg is not None:  # stages 1-3; the replies carry masked inputs
                secagg_round, trained, raw = self.secagg.collect(
                    self.grid, rnd, messages, self.noise.for_model(self.model) if self.noise else None)
                replies = self._collect(trained, arrays, raw)
                replies.failed += [(self.node_sites.get(node, f"node {node}"),
                                    f"no answer at the secure-aggregation stage {stage}")
                                   for stage, nodes in secagg_round.dropped.items() for node in nodes]
            else:
                replies = self._collect(messages, arrays)
                self._keep_white_box_updates(rnd, arrays, replies.ok)
            record = self._record(rnd, messages, replies)
            if secagg_round is not None and secagg_round.aborted:  # before any input was sent
                record.secure_aggregation = secagg_round.report()
            if stop := self._early_stop(trained, replies, record):
                stopped_reason = stop
                record.seconds = time.time() - t_round
                self._append_metrics(record)
                break
            if secagg_round is not None:
                arrays = self._aggregate_masked(secagg_round, arrays, replies.ok, record)
            else:
                arrays = self._aggregate(rnd, arrays, replies.ok, record)
            record.sites_trained = sorted(map(site_label, replies.ok), key=site_sort_key)
            rounds_completed = rnd
            every = self.scenario.evaluation.every
            if (every and rnd % every == 0) or rnd == self.fed.rounds:
                self._evaluate_into(record, rnd, arrays)
            record.seconds = time.time() - t_round
            self._append_metrics(record)
            self.ledger.write(self.run_dir / rundir.PRIVACY)
            self._checkpoint(next_round=rnd + 1, wall=time.time() - t_start)
        return self._finish(rounds_completed, stopped_reason, time.time() - t_start)

    def _collect(self, messages: list[Message], arrays: ArrayRecord,
                 replies: list[Message] | None = None) -> RoundReplies:
        """Send the round's messages (unless secure aggregation sent them and got ``replies``);
        the replies, validated and sorted, their ledgers folded in."""
        masked = replies is not None
        if replies is None:
            replies = list(self.grid.send_and_receive(messages, timeout=self.fed.round_timeout_s))
        # Under site-level DP clipping bounds every update; a rejection that depends on
        # the other sites' norms would break that sensitivity bound, so it is off.
        sorted_ = sort_replies(replies, arrays, sent_to=[m.metadata.dst_node_id for m in messages],
                               known_sites=self.node_sites,
                               destinations={m.metadata.message_id: m.metadata.dst_node_id for m in messages},
                               site_examples=self.site_examples, recorded_ledgers=self.ledger.sites,
                               outlier_factor=None if self.site_dp is not None or masked else self.fed.outlier_factor,
                               masked=masked)
        self.node_sites.update(sorted_.site_of)
        for site_ledger in sorted_.ledgers:
            self._update_site_ledger(site_ledger)
        self._fold_unreported_ledgers()
        self.exhausted.update(sorted_.refused)
        return sorted_

    def _keep_white_box_updates(self, rnd: int, sent: ArrayRecord, ok: list[Message]) -> None:
        """In a white-box audit run (``privacy.white_box``) only, and never under secure
        aggregation (this path does not run there): keep the audited site's update (a release
        family: its raw release) as the server received it, before any norm bound or robust
        rule touches it, for the auditor (``RUN_DIR/white_box_received/<site>/``, docs/audit.md)."""
        white_box = self.privacy_cfg.white_box
        if white_box is None or not self.privacy_cfg.enabled:
            return
        from fedgen.privacy.audit import dirac  # audit runs only

        site, releasing = str(white_box.site), self.model.training_mode == "release"
        for msg in ok:
            if site_info(msg)[0] != site:
                continue
            received = next(iter(msg.content.array_records.values()), None)
            if received is not None and releasing:  # the raw release: the buffer's mean times the count
                from fedgen.privacy.audit import release_canaries

                count = float(next(iter(msg.content.metric_records.values()))["num-examples"])
                release_canaries.record_release(self.run_dir / dirac.RECEIVED_DIR / site, rnd,
                                                released=received[self.model.release_buffer].numpy() * count)
            elif received is not None:
                dirac.record_received(self.run_dir, site, rnd, received.to_torch_state_dict(),
                                      sent.to_torch_state_dict(), dirac.private_parameter_names(self.model))

    def _record(self, rnd: int, messages: list[Message], replies: RoundReplies) -> RoundRecord:
        record = RoundRecord(
            round=rnd, clients_sampled=len(messages), clients_ok=len(replies.ok),
            clients_failed=len(replies.failed), clients_refused=len(replies.refused),
            train_loss=weighted_mean(replies.ok, "train-loss"),
            epsilon=self.ledger.epsilon if example_level(self.scenario) else None,
            failures=[{"site": self._label(s, messages), "reason": short_reason(r)} for s, r in replies.failed],
            sites_refused=sorted(replies.refused, key=site_sort_key) or None)
        self.hooks.annotate(record, replies)
        return record

    def _label(self, who: str, messages: list[Message]) -> str:
        """A failure's site id; ``node N`` for a node that never named its site (its first
        reply was an error), so that a node id never reads as a site id."""
        nodes = {str(m.metadata.dst_node_id) for m in messages}
        return f"node {who}" if who in nodes and who not in self.node_sites.values() else who

    def _early_stop(self, messages: list[Message], replies: RoundReplies, record: RoundRecord) -> str | None:
        """Why the run cannot go on after this round's replies (``None``: it can)."""
        if messages and not (replies.ok or replies.refused or replies.unavailable or replies.late):
            # Every sampled site failed (error replies, invalid updates): training cannot
            # progress, and retrying would most likely fail the same way. Stop, say why.
            log.error("round %d: every sampled site failed, e.g. %s", record.round, record.failures[0]["reason"])
            return "clients_failed"
        if not replies.ok and len(self.exhausted) >= self.spec.num_sites:
            log.info("round %d: every site's budget is spent; stopping", record.round)
            return "budget_exhausted"
        return None

    def _fold_unreported_ledgers(self) -> None:
        """A site that spent budget but whose reply never arrived (it crashed or was late)
        may have the spend on record at the site (the hooks find it); fold it into
        ``privacy.json`` now, so the run's ledger never understates what the sites spent."""
        for ledger in self.hooks.unreported_ledgers():
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

    def _aggregate(self, rnd: int, arrays: ArrayRecord, ok: list[Message], record: RoundRecord) -> ArrayRecord:
        """The round's new global model from the valid updates ``ok`` (``record`` gets what
        the server did to them)."""
        if self.site_dp is None:  # (DP-FedAvg releases even when nobody replied: server/site_level.py)
            if not ok:
                return arrays
            self._prepare_updates(ok, arrays, record)
        releasing = self.model.training_mode == "release"  # before loading: a hybrid's mode follows its buffer
        new_arrays, _ = self.strategy.aggregate_train(rnd, ok)
        if new_arrays is None:
            return arrays
        self.model.load_state_dict(new_arrays.to_torch_state_dict())
        if self.site_dp is not None:
            record.site_level = self.site_dp.round_report
            self.ledger.site_level = self.site_dp.mechanism.to_dict()
        # Releases under a plain mean: the family combines them itself and knows the noise
        # that leaves (public: the sites' sums, counts and sigmas). Robust rules, norm bounds
        # and DP-FedAvg reshape the updates, so their aggregate stands as it is.
        elif releasing and self.fed.strategy == "fedavg" and not record.clients_norm_bounded:
            record.release_noise_variance = self.model.combine_releases(
                *site_releases(ok, rnd, self.model.release_buffer))
        return self._server_update(record)

    def _aggregate_masked(self, rnd: SecAggRound, arrays: ArrayRecord, ok: list[Message],
                          record: RoundRecord) -> ArrayRecord:
        """Secure aggregation's stage 4: unmask the sum of the valid masked inputs ``ok``
        (server/secagg.py). An aborted round leaves the global model as it was: nothing
        was decoded, so nothing of the sites' updates was released."""
        released = False
        if rnd.aborted:
            pass
        elif (dist := rnd.plan) is not None:  # distributed noise: the server learns only the noised sum
            if (total := self.secagg.unmask_sum(self.grid, rnd, ok, dist.size)) is not None:
                self.model.load_state_dict(arrays.to_torch_state_dict())
                if dist is self.noise.sgd:  # DP-FedSGD: the decoded sum is a gradient
                    self.server_optimizer.step(self.secagg.gradient_from_sum(
                        rnd, total, ok, clip_norm=self.privacy_cfg.max_grad_norm), seed=self.scenario.seed + rnd.round)
                else:
                    record.release_noise_variance = self.secagg.release_from_sum(rnd, total, self.model)
                released = True
        elif (new_arrays := self.secagg.unmask(self.grid, rnd, ok, arrays)) is not None:
            self.model.load_state_dict(new_arrays.to_torch_state_dict())
            released = True
        record.secure_aggregation = rnd.report()
        self._fold_secagg_ledgers(rnd, record)
        if not released:
            log.warning("round %d: secure aggregation aborted: %s", rnd.round, rnd.aborted)
            ok.clear()  # no site's update went into the model
            return arrays
        return self._server_update(record)

    def _fold_secagg_ledgers(self, rnd: SecAggRound, record: RoundRecord) -> None:
        """The sites' ledgers from the unmask and abort replies: their pending spend of the
        round resolved (released, or aborted and no longer counting). Checked like a train
        reply's ledger; one that fails is left out (the copy on record stays, conservative)."""
        for node, text in rnd.ledgers.items():
            site = self.node_sites.get(node)
            if site is None:
                continue
            try:
                self._update_site_ledger(read_site_ledger(text, site))
            except ReplyError as err:
                log.warning("round %d: ledger of site %s from the secure-aggregation stage left out: %s",
                            rnd.round, site, err)
        if rnd.ledgers and example_level(self.scenario):
            record.epsilon = self.ledger.epsilon

    def _prepare_updates(self, ok: list[Message], arrays: ArrayRecord, record: RoundRecord) -> None:
        """Norm bounding and the robust rules' report, before a plain strategy aggregates.
        Not under site-level DP: there ``privacy.site_level.clip_norm`` bounds every update,
        and the strategy is FedAvg (the scenario refuses robust rules with it)."""
        if self.fed.norm_bound is not None:
            record.clients_norm_bounded = bound_update_norms(ok, arrays, self.fed.norm_bound)
        if self.fed.strategy in ROBUST:
            record.robust = robust_report(self.fed.strategy, self.fed, ok)

    def _server_update(self, record: RoundRecord) -> ArrayRecord:
        """The family's server-side post-processing of the aggregate (e.g. fitting the mmd
        generator to the released embedding); the new global model."""
        t = time.time()
        info = self.model.server_update(release_noise_variance=record.release_noise_variance)
        if "pretrain_steps" in info:  # a release warm start pretrained the family (server/warm_start.py)
            write_record(self.run_dir, release_record(self.scenario, info, read_record(self.run_dir)))
            info = {k: v for k, v in info.items() if not k.startswith("pretrain_")}
        if info:
            record.server_update = ServerUpdate(**info, server_update_seconds=time.time() - t)
        return ArrayRecord(self.model.state_dict())

    def _evaluate_into(self, record: RoundRecord, rnd: int, arrays: ArrayRecord) -> None:
        t_eval = time.time()
        metrics = self._evaluate(rnd, arrays)
        record.class_histogram = metrics.pop("class_histogram", None)
        record.metrics = metrics
        record.eval_seconds = time.time() - t_eval

    def _evaluate(self, rnd: int, arrays: ArrayRecord) -> dict[str, Any]:
        cfg = self.scenario.evaluation
        if self.evaluator.ref_x is None and cfg.federated:  # deployment without a public reference set
            return self._federated_evaluation(rnd, arrays)
        # with a reference: sample, draw a grid and score; without one: only the grid
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

    def _append_metrics(self, record: RoundRecord) -> None:
        with open(self.run_dir / rundir.METRICS, "a") as fh:
            fh.write(record.to_json() + "\n")

    def _finish(self, rounds_completed: int, stopped_reason: str, wall: float) -> dict[str, Any]:
        self.ledger.write(self.run_dir / rundir.PRIVACY)
        privacy = RunPrivacy(ledger=self.ledger, site_dp=self.site_dp.mechanism if self.site_dp else None,
                             seeded_noise=self.seeded_noise)
        summary = write_summary(self.run_dir, self.scenario, self.model, privacy, rounds_completed=rounds_completed,
                                stopped_reason=stopped_reason, wall=wall, flower_run_id=self.flower_run_id,
                                node_sites=self.node_sites)
        if summary["status"] != "completed" and self.hooks.fails_unclean_runs:
            # after summary.json is written: Flower records the run as failed (`flwr ls`)
            raise RunFailedError(failure_line(summary, self.run_dir))
        return summary

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
