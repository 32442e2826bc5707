"""The fedgen ClientApp (Flower Message API): decode, apply the site's policy, delegate to
``client.task``, reply (``client.reply``: what may leave the site).

This module is the client's composition root: it installs the harness's
``simulated_faults_mod`` (``simulations/faults.py``), which makes a *simulated* node (one
without ``data-path``) drop out, crash, straggle or attack as the scenario plans; a
deployed node passes straight through it (docs/architecture.md §1).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedgen.contract import secagg as sa
from fedgen.contract.task import ReplyStatus, TaskConfig
from fedgen.privacy.skellam import DistributedRelease
from fedgen.simulations.faults import simulated_faults_mod

from .data_binding import bind_site_data
from .policy import PolicyRefusal, SitePolicy
from .reply import error_reply, site_reply
from .secagg import secagg_mod
from .site import ledger_lock, ledger_run, load_ledger, load_site_data, save_ledger, site_id, state_dir
from .task import evaluate_site, train_site

log = logging.getLogger(__name__)

# Mods wrap every message handler, train and evaluate alike (Flower's ClientApp(mods=...)).
# secagg_mod first: it answers the key stages itself, and masks the update that the rest
# (faults included, so a simulated attack is masked like an honest update) produced.
app = ClientApp(mods=[secagg_mod, simulated_faults_mod])


def _task(msg: Message) -> TaskConfig:
    config = msg.content["config"]
    return TaskConfig.from_json(str(config["fedgen"]), proximal_mu=float(config.get("proximal-mu", 0.0)))


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = site_id(context)
    try:
        return _train(msg, context, _task(msg), site, int(msg.content["config"]["server-round"]))
    except PolicyRefusal as refusal:
        log.warning("site %s refuses the task: %s", site, refusal)
        return site_reply(msg, site, {"num-examples": 0, "status": int(ReplyStatus.POLICY_REFUSED)},
                          message=str(refusal))
    except Exception as err:  # noqa: BLE001 -- the whole reason stays at the site
        return error_reply(msg, site, err)


def _train(msg: Message, context: Context, task: TaskConfig, site: str, server_round: int) -> Message:
    run_dir = str(msg.content["config"].get("run-dir", ""))
    policy = SitePolicy.from_node_config(context.node_config)
    with ledger_lock(context, site, run_dir):  # read, check, train, record: one round at a time
        data = load_site_data(context, conditional=task.num_classes is not None, run_dir=run_dir)
        task = replace(task, privacy=policy.apply(task.privacy, num_examples=len(data)))
        bind_site_data(context.node_config, data)  # a deployed state-dir's ledger covers one dataset
        ledger = load_ledger(context, site, run_dir)
        if ledger is not None and task.privacy.enabled:
            ledger.set_target_epsilon(task.privacy.target_epsilon)  # this run's target, capped by the site
        distributed = msg.content["config"].get(sa.DISTRIBUTED)  # set by client/secagg.py
        model, result, ledger = train_site(
            task, data, msg.content["arrays"].to_torch_state_dict(), site=site,
            server_round=server_round, ledger=ledger, run=ledger_run(context),
            state_dir=_white_box_state(context, task, site, run_dir),
            distributed=DistributedRelease.from_json(str(distributed)) if distributed else None)
        if ledger is not None and msg.content["config"].get(sa.PENDING):  # set by client/secagg.py
            ledger.mark_pending(round=server_round, run=ledger_run(context))  # until unmask or abort
        if ledger is not None:
            save_ledger(context, ledger, run_dir)  # before the update leaves the site
    metrics = {
        "num-examples": result.num_examples,
        "status": int(ReplyStatus[result.status.upper()]),
        "dp-steps": result.dp_steps,
        "epsilon": ledger.epsilon if ledger is not None else 0.0,
    }
    if (result.status == "trained" and math.isfinite(result.train_loss)  # a release round has no loss
            and not _loss_withheld(msg, context)):
        metrics["train-loss"] = result.train_loss
    arrays = ArrayRecord(model.state_dict()) if result.status == "trained" else None
    if arrays is not None and result.release is not None:  # only the noised integer sum, for masking
        arrays = ArrayRecord({sa.DISTRIBUTED: Array(np.ascontiguousarray(result.release))})
    return site_reply(msg, site, metrics, ledger=ledger, message=result.message, arrays=arrays)


def _loss_withheld(msg: Message, context: Context) -> bool:
    """Under secure aggregation the server is to see only sums (docs/aggregation.md), so a
    deployed site (``data-path`` in its node config) keeps its training loss, a statistic of
    its private data outside ε, to itself; a simulated site reports it to its harness."""
    return bool(msg.content["config"].get(sa.PENDING)) and "data-path" in context.node_config


def _white_box_state(context: Context, task: TaskConfig, site: str, run_dir: str):
    """Where a white-box audit run keeps this site's canaries: only when the scenario asks
    for one and, at a deployed site (``data-path``), only if its operator opted in with
    ``white-box-audit=true`` in --node-config (the canaries disturb its training)."""
    if not task.privacy.white_box_canaries:
        return None
    cfg = context.node_config
    if "data-path" in cfg and str(cfg.get("white-box-audit", "false")).lower() != "true":
        return None
    return state_dir(context, site, run_dir)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    task = _task(msg)
    try:
        data = load_site_data(context, conditional=task.num_classes is not None,
                              run_dir=str(msg.content["config"].get("run-dir", "")))
        metrics = evaluate_site(task, data, msg.content["arrays"].to_torch_state_dict())
    except Exception as err:  # noqa: BLE001 -- the whole reason stays at the site
        return error_reply(msg, site_id(context), err)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
