"""The fedgen ClientApp (Flower Message API): decode, delegate to ``client.task``, reply."""

from __future__ import annotations

import json
import time
from dataclasses import replace

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .faults import RoundFaults, SimulatedCrash, attack_update, plan_faults
from .site import ledger_run, load_ledger, load_site_data, save_ledger, site_id, site_max_epsilon
from .task import TaskConfig, evaluate_site, round_seed, train_site

STATUS = {"trained": 0, "budget_exhausted": 1, "unavailable": 2}

app = ClientApp()


def _task(msg: Message) -> tuple[TaskConfig, dict]:
    """The round's task, and the raw ``fedgen`` config it came from (simulation-only keys)."""
    config = msg.content["config"]
    raw = json.loads(str(config["fedgen"]))
    return TaskConfig.from_dict(raw, proximal_mu=float(config.get("proximal-mu", 0.0))), raw


def _with_site_cap(task: TaskConfig, context: Context) -> TaskConfig:
    """The site's ``max-epsilon`` (node config) caps the server's target: the site's rule wins."""
    cap = site_max_epsilon(context)
    if cap is None or cap >= task.privacy.target_epsilon:
        return task
    return replace(task, privacy=replace(task.privacy, target_epsilon=cap))


@app.train()
def train(msg: Message, context: Context) -> Message:
    task, raw = _task(msg)
    task = _with_site_cap(task, context)
    site = site_id(context)
    server_round = int(msg.content["config"]["server-round"])
    faults = plan_faults(raw["faults"], site, server_round) if raw.get("faults") else RoundFaults()
    if faults.dropout:
        return _reply(msg, site, {"num-examples": 0, "status": STATUS["unavailable"]},
                      message="dropped out (simulated fault)")
    run_dir = str(msg.content["config"].get("run-dir", ""))
    data = load_site_data(context, conditional=task.num_classes is not None, run_dir=run_dir)
    ledger = load_ledger(context, site, run_dir)
    if ledger is not None and task.privacy.enabled:
        ledger.target_epsilon = task.privacy.target_epsilon  # this run's target, capped by the site
    model, result, ledger = train_site(
        task, data, msg.content["arrays"].to_torch_state_dict(), site=site,
        server_round=server_round, ledger=ledger, run=ledger_run(context))
    if ledger is not None:
        save_ledger(context, ledger, run_dir)  # before the update leaves the site
    if faults.crash:
        raise SimulatedCrash(f"site {site} crashed after training (simulated fault)")
    time.sleep(faults.delay_s)
    metrics = {
        "num-examples": result.num_examples,
        "status": STATUS[result.status],
        "train-loss": result.train_loss if result.status == "trained" else 0.0,
        "dp-steps": result.dp_steps,
        "epsilon": ledger.epsilon if ledger is not None else 0.0,
        "delay-s": faults.delay_s,
    }
    arrays = None
    if result.status == "trained":
        arrays = ArrayRecord(_maybe_attack(raw.get("byzantine"), msg, site, server_round, model.state_dict()))
    return _reply(msg, site, metrics, ledger=ledger, message=result.message, arrays=arrays)


def _reply(msg: Message, site: str, metrics: dict, *, ledger=None, message: str = "",
           arrays: ArrayRecord | None = None) -> Message:
    site_rec = ConfigRecord({"id": site, "ledger": ledger.to_json() if ledger else "", "message": message})
    content = RecordDict({"metrics": MetricRecord(metrics), "site": site_rec})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


def _maybe_attack(attack: dict | None, msg: Message, site: str, server_round: int, state: dict) -> dict:
    """Simulation only: a site the scenario made Byzantine corrupts its update."""
    if not attack or site not in attack["sites"]:
        return state
    seed = round_seed(int(attack["seed"]), site, server_round)
    return attack_update(attack["attack"], state, msg.content["arrays"].to_torch_state_dict(),
                         float(attack["scale"]), seed)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    task, _ = _task(msg)
    data = load_site_data(context, conditional=task.num_classes is not None,
                          run_dir=str(msg.content["config"].get("run-dir", "")))
    metrics = evaluate_site(task, data, msg.content["arrays"].to_torch_state_dict())
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
