"""The fedgen ClientApp (Flower Message API): decode, apply the site's policy, delegate to
``client.task``, reply.

What leaves the site is the update, its ledger, scalar metrics, and one-line messages
that never carry data values: an error at the site is logged there in full and answered
with its kind only (docs/deploy.md, "Threat model").
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedgen.contract.task import ReplyStatus, SimulatedSite, TaskConfig

from .faults import RoundFaults, SimulatedCrash, attack_update, plan_faults
from .policy import PolicyRefusal, SitePolicy
from .site import ledger_lock, ledger_run, load_ledger, load_site_data, save_ledger, site_id
from .task import evaluate_site, round_seed, train_site

log = logging.getLogger(__name__)

SITE_ERROR_CODE = 1  # Flower error code of a reply whose training failed at the site

app = ClientApp()


def _task(msg: Message) -> TaskConfig:
    config = msg.content["config"]
    return TaskConfig.from_json(str(config["fedgen"]), proximal_mu=float(config.get("proximal-mu", 0.0)))


def _simulated(task: TaskConfig, context: Context) -> SimulatedSite | None:
    """The harness's fault plan, honoured only by a simulated node (no ``data-path``)."""
    return task.simulation if "data-path" not in context.node_config else None


@app.train()
def train(msg: Message, context: Context) -> Message:
    task = _task(msg)
    site = site_id(context)
    server_round = int(msg.content["config"]["server-round"])
    simulated = _simulated(task, context)
    faults = plan_faults(simulated.faults, site, server_round) if simulated and simulated.faults else RoundFaults()
    if faults.dropout:
        return _reply(msg, site, {"num-examples": 0, "status": int(ReplyStatus.UNAVAILABLE)},
                      message="dropped out (simulated fault)")
    try:
        reply = _train(msg, context, task, simulated, site, server_round, delay_s=faults.delay_s)
    except PolicyRefusal as refusal:
        log.warning("site %s refuses the task: %s", site, refusal)
        return _reply(msg, site, {"num-examples": 0, "status": int(ReplyStatus.POLICY_REFUSED)},
                      message=str(refusal))
    except Exception as err:  # noqa: BLE001 -- the whole reason stays at the site
        return _error_reply(msg, site, err)
    if faults.crash:
        raise SimulatedCrash(f"site {site} crashed after training (simulated fault)")
    time.sleep(faults.delay_s)
    return reply


def _train(msg: Message, context: Context, task: TaskConfig, simulated: SimulatedSite | None, site: str,
           server_round: int, *, delay_s: float) -> Message:
    run_dir = str(msg.content["config"].get("run-dir", ""))
    policy = SitePolicy.from_node_config(context.node_config)
    with ledger_lock(context, site, run_dir):  # read, check, train, record: one round at a time
        data = load_site_data(context, conditional=task.num_classes is not None, run_dir=run_dir)
        task = replace(task, privacy=policy.apply(task.privacy, num_examples=len(data)))
        ledger = load_ledger(context, site, run_dir)
        if ledger is not None and task.privacy.enabled:
            ledger.set_target_epsilon(task.privacy.target_epsilon)  # this run's target, capped by the site
        model, result, ledger = train_site(
            task, data, msg.content["arrays"].to_torch_state_dict(), site=site,
            server_round=server_round, ledger=ledger, run=ledger_run(context))
        if ledger is not None:
            save_ledger(context, ledger, run_dir)  # before the update leaves the site
    metrics = {
        "num-examples": result.num_examples,
        "status": int(ReplyStatus[result.status.upper()]),
        "dp-steps": result.dp_steps,
        "epsilon": ledger.epsilon if ledger is not None else 0.0,
        "delay-s": delay_s,
    }
    if result.status == "trained" and math.isfinite(result.train_loss):  # a release round has no loss
        metrics["train-loss"] = result.train_loss
    arrays = None
    if result.status == "trained":
        arrays = ArrayRecord(_maybe_attack(simulated, msg, site, server_round, model.state_dict()))
    return _reply(msg, site, metrics, ledger=ledger, message=result.message, arrays=arrays)


def _reply(msg: Message, site: str, metrics: dict, *, ledger=None, message: str = "",
           arrays: ArrayRecord | None = None) -> Message:
    site_rec = ConfigRecord({"id": site, "ledger": ledger.to_json() if ledger else "", "message": message})
    content = RecordDict({"metrics": MetricRecord(metrics), "site": site_rec})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


def _error_reply(msg: Message, site: str, err: Exception) -> Message:
    """An error reply naming the kind of failure only: exception messages may quote the
    site's data (a cell value, a value range), so the full text is logged here, at the site."""
    log.exception("site %s: training failed", site)
    reason = (f"site {site}: {type(err).__name__} at the site; the details are in the site's log "
              "(no data values leave the site)")
    return Message(Error(code=SITE_ERROR_CODE, reason=reason), reply_to=msg)


def _maybe_attack(simulated: SimulatedSite | None, msg: Message, site: str, server_round: int,
                  state: dict) -> dict:
    """Simulation only: a site the scenario made Byzantine corrupts its update."""
    attack = simulated.byzantine if simulated else None
    if attack is None or site not in attack.sites(simulated.num_sites):
        return state
    return attack_update(attack.attack, state, msg.content["arrays"].to_torch_state_dict(), attack.scale,
                         round_seed(attack.seed, site, server_round))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    task = _task(msg)
    try:
        data = load_site_data(context, conditional=task.num_classes is not None,
                              run_dir=str(msg.content["config"].get("run-dir", "")))
        metrics = evaluate_site(task, data, msg.content["arrays"].to_torch_state_dict())
    except Exception as err:  # noqa: BLE001 -- the whole reason stays at the site
        return _error_reply(msg, site_id(context), err)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
