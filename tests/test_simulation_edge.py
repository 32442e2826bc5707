"""Simulation at the edge (issue #20): the harness's faults and attacks are a ClientApp mod
(``simulations/faults.py``), the server's simulation-only behaviour sits behind
``RunHooks`` (``server/hooks.py``, ``simulations/hooks.py``), and a round's row of
``metrics.jsonl`` is a typed :class:`RoundRecord` in the same flat format as before."""

from __future__ import annotations

import inspect
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from fedgen.client.reply import site_reply
from fedgen.contract import rundir
from fedgen.contract.scenario import byzantine_sites
from fedgen.contract.task import ReplyStatus
from fedgen.server import run as server_run
from fedgen.server.hooks import RunHooks
from fedgen.server.record import RECORD_KEYS, RoundRecord, ServerUpdate, SiteLevelRound, quality_metrics
from fedgen.server.run import FederatedRun
from fedgen.server.updates import RoundReplies
from fedgen.simulations import faults as faults_module
from fedgen.simulations.faults import SimulatedCrash, simulated_faults_mod
from fedgen.simulations.hooks import SimulatedSites, hooks_for

from .conftest import REPO
from .test_updates import _reply

GLOBAL = {"w": torch.zeros(3, 2), "steps": torch.tensor(4)}
TRAINED = {"w": torch.full((3, 2), 0.5), "steps": torch.tensor(5)}


def _task(faults=None, byzantine=None, num_sites=4) -> str:
    task = {"model": {"family": "vae"}, "data_shape": [1, 8, 8], "num_classes": None,
            "training": {"local_steps": 1, "batch_size": 16, "lr": 1e-3},
            "privacy": {"enabled": False, "target_epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0,
                        "accountant": "rdp", "grad_sample_mode": "auto", "planned_rounds": 1},
            "seed": 0, "device": "cpu"}
    if faults or byzantine:
        task["simulation"] = {"faults": faults, "byzantine": byzantine, "num_sites": num_sites}
    return json.dumps(task)


def _message(task: str, message_type: str = MessageType.TRAIN, server_round: int = 1) -> Message:
    config = ConfigRecord({"fedgen": task, "server-round": server_round})
    meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=600.0, message_type=message_type)
    return Message(content=RecordDict({"arrays": ArrayRecord(GLOBAL), "config": config}), metadata=meta)


def _site(site: str = "1", **node) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": site, **node}, state=RecordDict(),
                   run_config={})


class App:
    """The ClientApp behind the mod: trains ``TRAINED`` and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, msg: Message, context: Context) -> Message:
        self.calls += 1
        return site_reply(msg, "1", {"num-examples": 10, "status": int(ReplyStatus.TRAINED)},
                          arrays=ArrayRecord(TRAINED))


ALWAYS = {"dropout": 1.0, "seed": 0}


def test_a_planned_dropout_is_answered_without_running_the_app():
    app = App()
    reply = simulated_faults_mod(_message(_task(faults=ALWAYS)), _site(), app)
    assert app.calls == 0
    assert int(reply.content["metrics"]["status"]) == ReplyStatus.UNAVAILABLE
    assert int(reply.content["metrics"]["num-examples"]) == 0
    assert reply.content["site"]["message"] == "dropped out (simulated fault)" and "arrays" not in reply.content


@pytest.mark.parametrize("case", ["evaluate", "deployed node", "no plan"])
def test_the_mod_passes_other_messages_through(case):
    app = App()
    msg = _message(_task(faults=ALWAYS) if case != "no plan" else _task(),
                   MessageType.EVALUATE if case == "evaluate" else MessageType.TRAIN)
    context = _site(**({"data-path": "/x.npz"} if case == "deployed node" else {}))
    reply = simulated_faults_mod(msg, context, app)
    assert app.calls == 1 and "delay-s" not in reply.content["metrics"]
    torch.testing.assert_close(reply.content["arrays"].to_torch_state_dict(), TRAINED)


def test_a_planned_crash_happens_after_the_app_trained():
    app = App()
    with pytest.raises(SimulatedCrash, match="site 1 crashed after training"):
        simulated_faults_mod(_message(_task(faults={"crash": 1.0})), _site(), app)
    assert app.calls == 1  # it trained (and would have recorded its spend) before dying


def test_a_straggler_sleeps_and_reports_its_delay(monkeypatch):
    slept = []
    monkeypatch.setattr(faults_module.time, "sleep", slept.append)
    plan = {"straggler": 1.0, "straggler_delay_s": [2.0, 2.0]}
    reply = simulated_faults_mod(_message(_task(faults=plan)), _site(), App())
    assert slept == [2.0] and float(reply.content["metrics"]["delay-s"]) == 2.0


def test_a_byzantine_site_s_update_is_replaced_by_the_attack():
    byzantine = {"fraction": 0.5, "attack": "sign_flip", "scale": 3.0, "seed": 1}
    attacker, honest = byzantine_sites(4, 0.5, 1)[0], next(s for s in "0123" if s not in byzantine_sites(4, 0.5, 1))
    replies = {s: simulated_faults_mod(_message(_task(byzantine=byzantine)), _site(s), App()) for s in (attacker, honest)}
    attacked = replies[attacker].content["arrays"].to_torch_state_dict()
    torch.testing.assert_close(attacked["w"], torch.full((3, 2), -1.5))  # w0 - 3 * (w - w0)
    assert int(attacked["steps"]) == 5  # integer buffers are left alone
    torch.testing.assert_close(replies[honest].content["arrays"].to_torch_state_dict(), TRAINED)


def test_the_client_app_installs_the_mod_and_its_handlers_know_no_simulation():
    from fedgen.client import app

    from fedgen.client.secagg import secagg_mod

    assert app.app._mods == [secagg_mod, simulated_faults_mod]  # secure aggregation outermost (issue #19)
    for handler in (app.train, app._train, app.evaluate):
        assert "simulat" not in inspect.getsource(handler).lower()


# -- the server: hooks --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_template(tmp_path_factory) -> Path:
    from fedgen.contract.scenario import load_scenario
    from fedgen.simulations.prepare import write_run_dir

    scenario = load_scenario(REPO / "scenarios" / "quickstart.yaml",
                             ["privacy.seeded_noise=true", "simulation.byzantine.fraction=0.4",
                              "simulation.faults.dropout=0.1"])
    return write_run_dir(scenario, tmp_path_factory.mktemp("runs") / "quick")


@pytest.fixture
def run_dir(run_template, tmp_path) -> Path:
    return Path(shutil.copytree(run_template, tmp_path / "run"))


def test_the_round_loop_never_asks_whether_it_is_a_simulation():
    source = inspect.getsource(server_run)
    assert "scenario.deployment" not in source and "scenario.simulation" not in source


def test_without_hooks_a_run_is_a_deployment_s(run_dir):
    """The default composes nothing in: the default count bound, OS noise, no reset."""
    run = FederatedRun(None, run_dir)
    assert run.site_examples is None and not run.seeded_noise
    assert isinstance(hooks_for(run_dir), SimulatedSites)
    simulated = FederatedRun(None, run_dir, hooks=hooks_for(run_dir))
    with np.load(run_dir / rundir.PARTITIONS) as z:
        sizes = {str(i): len(z[f"site_{i}"]) for i in range(5)}
    assert simulated.seeded_noise and simulated.site_examples == sizes and min(sizes.values()) > 0


def test_simulation_hooks_write_the_byzantine_and_faults_entries(run_dir):
    hooks = hooks_for(run_dir)
    attackers = sorted(hooks.byzantine)
    honest = next(s for s in "01234" if s not in attackers)
    ok = [_reply(attackers[0], 10, {"w": np.ones(2, np.float32)}), _reply(honest, 11, {"w": np.ones(2, np.float32)})]
    ok[1].content["metrics"]["delay-s"] = 1.234
    replies = RoundReplies(ok=ok, unavailable=["10", "2"], errors=["1"], late=[])
    record = _record()
    hooks.annotate(record, replies)
    row = record.to_dict()
    assert row["byzantine"] == [attackers[0]]
    assert row["faults"] == {"dropped_out": ["2", "10"], "errors": ["1"], "late": [],
                             "delayed_s": {honest: 1.23}}
    plain = _record()
    RunHooks().annotate(plain, replies)
    assert "byzantine" not in plain.to_dict() and "faults" not in plain.to_dict()


def test_a_deployment_never_resets_site_ledgers(run_dir):
    site = run_dir / "sites" / "0"
    site.mkdir(parents=True, exist_ok=True)
    (site / "ledger.json").write_text("{}")
    RunHooks().restore_site_ledgers(FederatedRun(None, run_dir).ledger)
    assert (site / "ledger.json").exists() and RunHooks().unreported_ledgers() == []
    hooks_for(run_dir).restore_site_ledgers(FederatedRun(None, run_dir).ledger)  # nothing committed yet
    assert not (site / "ledger.json").exists()


# -- the round record ---------------------------------------------------------------------------

# The keys of a metrics.jsonl row that are not quality metrics, as server/run.py listed them by
# hand before RoundRecord (the format guard: the schema must name every one of them).
OLD_ROUND_KEYS = {"round", "clients_sampled", "clients_ok", "clients_failed", "clients_refused", "train_loss",
                  "epsilon", "seconds", "failures", "eval_seconds", "class_histogram", "byzantine", "robust",
                  "clients_norm_bounded", "site_level_epsilon", "sites_clipped", "site_update_norm_median",
                  "faults", "server_fit_mmd", "server_fit_steps", "release_noise_variance",
                  "release_noise_energy", "server_update_seconds",
                  "sites_trained", "sites_refused",  # issue #23: the summary's per-site table
                  "secure_aggregation",  # issue #19: the round's SecAgg+ report
                  "server_fit_noise_reached"}  # mmd's fit_cooldown: the step that reached the noise level


def _record(**fields) -> RoundRecord:
    base = dict(round=3, clients_sampled=5, clients_ok=4, clients_failed=1, clients_refused=0,
                train_loss=float("nan"), epsilon=None, failures=[{"site": "2", "reason": "boom"}])
    return RoundRecord(**{**base, **fields})


def test_the_record_schema_names_every_round_key():
    assert RECORD_KEYS == OLD_ROUND_KEYS


def test_a_record_is_written_flat_as_before():
    record = _record(site_level=SiteLevelRound(sites_clipped=2, site_level_epsilon=1.5, site_update_norm_median=None),
                     server_update=ServerUpdate(server_update_seconds=0.5, server_fit_mmd=0.1, server_fit_steps=7),
                     metrics={"fid": 12.0, "precision": 0.5}, class_histogram=[1, 2], eval_seconds=2.0, seconds=3.0)
    row = json.loads(record.to_json())
    assert row == {"round": 3, "clients_sampled": 5, "clients_ok": 4, "clients_failed": 1, "clients_refused": 0,
                   "train_loss": None, "epsilon": None, "failures": [{"site": "2", "reason": "boom"}],
                   "sites_clipped": 2, "site_level_epsilon": 1.5, "site_update_norm_median": None,
                   "server_update_seconds": 0.5, "server_fit_mmd": 0.1, "server_fit_steps": 7,
                   "fid": 12.0, "precision": 0.5, "class_histogram": [1, 2], "eval_seconds": 2.0, "seconds": 3.0}
    assert quality_metrics(row) == {"fid": 12.0, "precision": 0.5}
    assert quality_metrics(_record(seconds=1.0).to_dict()) == {}


def test_a_stopped_round_s_record_has_only_the_core_and_seconds():
    assert set(json.loads(_record(seconds=1.0).to_json())) == {
        "round", "clients_sampled", "clients_ok", "clients_failed", "clients_refused", "train_loss", "epsilon",
        "failures", "seconds"}


def test_the_summary_takes_the_last_evaluated_round_s_metrics(run_dir):
    rows = [_record(round=1, metrics={"fid": 9.0}, seconds=1.0), _record(round=2, seconds=1.0)]
    (run_dir / rundir.METRICS).write_text("".join(r.to_json() + "\n" for r in rows))
    from fedgen.simulations.hooks import hooks_for

    # the simulation's hooks: a deployment's would end a run with failures in RunFailedError
    summary = FederatedRun(None, run_dir, hooks=hooks_for(run_dir))._finish(2, "completed", 1.0)
    assert summary["metrics"] == {"fid": 9.0}
    assert json.loads((run_dir / rundir.SUMMARY).read_text())["metrics"] == {"fid": 9.0}
