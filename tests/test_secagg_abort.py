"""An aborted secure-aggregation round charges nothing (issue 19; docs/aggregation.md,
"Aborted rounds"): a site's spend is *pending* while its masked input is out, committed
(``released``) when it answers the unmask stage, withdrawn (``aborted``) when the server
aborts the round before any unmask. Append-only ledger entries; epsilon from a fresh
accountant over the charged entries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from opacus.accountants import RDPAccountant
from rich.console import Console

from fedgen.client import app as client_app
from fedgen.client import secagg as client_secagg
from fedgen.contract import secagg as sa
from fedgen.contract.scenario import load_scenario
from fedgen.privacy.accounting import quiet_opacus
from fedgen.privacy.ledger import ABORTED, PENDING, RELEASED, SiteLedger
from fedgen.server.secagg import SecAggWorkflow
from fedgen.server.updates import ReplyError, read_site_ledger
from fedgen.client.secagg import secagg_mod
from fedgen.simulations.inprocess_engine import InProcessGrid, SimulatedNode, _task_identity
from fedgen.simulations.prepare import write_run_dir
from fedgen.simulations.runner import run_simulation_dir

from .conftest import REPO
from .test_secagg import BITS, DIM, Sites
from .test_simulation_flower import fedgen

DELTA = 1e-5


def _fresh_epsilon(entries: list[tuple[float, float, int]]) -> float:
    """A fresh Opacus RDP accountant over (sigma, q, steps): the recomputation every reader does."""
    acc = RDPAccountant()
    acc.history = [(s, q, n) for s, q, n in entries if n > 0]
    with quiet_opacus():
        return acc.get_epsilon(DELTA) if acc.history else 0.0


def _ledger() -> SiteLedger:
    ledger = SiteLedger(site="3", accountant="rdp", delta=DELTA, target_epsilon=10.0, max_grad_norm=1.0)
    ledger.record_round(round=1, steps=40, noise_multiplier=1.2, sample_rate=0.2)
    return ledger


# -- the ledger ---------------------------------------------------------------------------

def test_a_released_round_is_charged_exactly_as_a_round_without_secure_aggregation():
    plain, masked = _ledger(), _ledger()
    plain.record_round(round=2, steps=40, noise_multiplier=1.2, sample_rate=0.2)
    masked.record_round(round=2, steps=40, noise_multiplier=1.2, sample_rate=0.2)
    assert masked.mark_pending(round=2, run=None) == 1
    pending_eps = masked.epsilon
    masked.resolve(round=2, run=None, outcome=RELEASED)
    expected = _fresh_epsilon([(1.2, 0.2, 40), (1.2, 0.2, 40)])
    assert pending_eps == masked.epsilon == plain.epsilon == pytest.approx(expected, rel=1e-9)
    assert masked.steps == plain.steps == 80
    assert [(h.round, h.steps, h.secagg) for h in masked.history] == [(1, 40, None), (2, 40, PENDING),
                                                                       (2, 0, RELEASED)]


def test_an_aborted_round_stops_counting_and_the_history_only_grows():
    ledger = _ledger()
    before = ledger.epsilon
    ledger.record_round(round=2, steps=40, noise_multiplier=1.2, sample_rate=0.2)
    ledger.mark_pending(round=2, run=None)
    assert ledger.epsilon > before  # pending counts: a site killed now stays charged
    entry = ledger.resolve(round=2, run=None, outcome=ABORTED)
    assert entry is not None and entry.steps == 0 and entry.epsilon == ledger.epsilon
    assert ledger.epsilon == before == pytest.approx(_fresh_epsilon([(1.2, 0.2, 40)]), rel=1e-9)
    assert ledger.steps == 40 and len(ledger.history) == 3  # the spend stays on record, withdrawn
    # resolved once: a second abort or a late release changes nothing
    assert ledger.resolve(round=2, run=None, outcome=RELEASED) is None
    assert ledger.resolve(round=2, run=None, outcome=ABORTED) is None
    assert ledger.epsilon == before and len(ledger.history) == 3
    # nothing pending: nothing to resolve (a plain spend is never withdrawn)
    assert ledger.resolve(round=1, run=None, outcome=ABORTED) is None
    # the round trip through JSON and the server's schema check keep it
    again = read_site_ledger(ledger.to_json(), "3")
    assert [(h.round, h.steps, h.secagg) for h in again.history] == [(1, 40, None), (2, 40, PENDING), (2, 0, ABORTED)]
    assert again.epsilon == before


def test_an_abort_is_per_run_in_a_ledger_that_outlives_runs():
    ledger = SiteLedger(site="3", accountant="rdp", delta=DELTA, target_epsilon=10.0, max_grad_norm=1.0)
    for run in ("7", "8"):
        ledger.record_round(round=1, steps=40, noise_multiplier=1.2, sample_rate=0.2, run=run)
        ledger.mark_pending(round=1, run=run)
    ledger.resolve(round=1, run="8", outcome=ABORTED)
    assert ledger.epsilon == pytest.approx(_fresh_epsilon([(1.2, 0.2, 40)]), rel=1e-9)


@pytest.mark.parametrize("entry, message", [
    ({"secagg": "maybe", "steps": 0}, "secagg is 'maybe', not one of pending, released, aborted"),
    ({"secagg": "aborted", "steps": 40}, "resolves a secure-aggregation round and must take 0 steps"),
])
def test_the_server_checks_the_resolution_entries(entry, message):
    d = _ledger().to_dict()
    d["history"].append({"round": 2, "noise_multiplier": 1.2, "sample_rate": 0.2, "epsilon": 0.0, **entry})
    with pytest.raises(ReplyError, match=message):
        read_site_ledger(json.dumps(d), "3")


# -- the protocol, on real Flower messages ---------------------------------------------------

@pytest.fixture
def in_a_run():
    """Messages are created inside a run (the engine sets Flower's task identity)."""
    with _task_identity(11):
        yield


def _aborted_round(sites: Sites, threshold: int):
    wf = SecAggWorkflow(threshold=threshold, bits=BITS, clip_norm=sites.clip())
    global_arrays = ArrayRecord({"w": Array(np.zeros(DIM))})
    msgs = [Message(content=RecordDict({"arrays": global_arrays, "config": ConfigRecord({"server-round": 1})}),
                    message_type=MessageType.TRAIN, dst_node_id=node) for node in sites.grid.get_node_ids()]
    rnd, _, replies = wf.collect(sites.grid, 1, msgs)
    assert wf.unmask_sum(sites.grid, rnd, [r for r in replies if not r.has_error()], DIM) is None
    return rnd


def test_an_abort_reaches_every_site_sent_the_masked_input_stage_and_erases_its_secrets(in_a_run):
    sites = Sites(6, seed=8, drop={sa.COLLECT: {0, 4}})
    rnd = _aborted_round(sites, threshold=5)
    assert rnd.aborted.startswith("only 4 sites sent a valid masked input")
    assert rnd.abort_acknowledged == 6  # the two that failed at the masked input are alive
    assert rnd.report()["sites_abort_acknowledged"] == 6
    node = rnd.order[0]
    ask = Message(content=RecordDict({sa.RECORD: ConfigRecord({"stage": sa.UNMASK, "active": [0, 1, 2, 3, 4],
                                                               "dropped": []})}),
                  message_type=MessageType.TRAIN, dst_node_id=node)
    reply = next(iter(sites.grid.send_and_receive([ask])))
    assert reply.has_error() and "no secure-aggregation round in progress" in reply.error.reason


def test_a_plain_train_message_cannot_mark_a_spend_pending(in_a_run):
    """Only the secure-aggregation mod may set the pending flag (an abort could then
    withdraw a spend that left the site in the clear): the mod strips it."""
    seen = []
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(msg, context):
        seen.append(dict(msg.content["config"]))
        return Message(content=RecordDict({"arrays": msg.content["arrays"]}), reply_to=msg)

    grid = InProcessGrid([SimulatedNode(9000, 0, 1, 11, {}, app)])
    msg = Message(content=RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(2))}),
                                      "config": ConfigRecord({"server-round": 1, sa.PENDING: True})}),
                  message_type=MessageType.TRAIN, dst_node_id=9000)
    assert not next(iter(grid.send_and_receive([msg]))).has_error()
    assert seen and sa.PENDING not in seen[0]


# -- whole runs: the real ClientApp and ServerApp ----------------------------------------------

#: faults seed 25 drops sites 0 and 2 in round 1 (before training) and none in rounds 2-3:
#: round 1 has 3 masked inputs for a threshold of 4 and aborts after sites 1, 3, 4 trained
ABORTING = ["federation.rounds=3", "federation.secure_aggregation.threshold=4", "simulation.faults.dropout=0.3",
            "simulation.faults.seed=25", "training.local_steps=5", "evaluation.every=0", "evaluation.num_samples=100",
            "warm_start=null", "simulation.engine=inprocess"]


def _spends(run_dir: Path) -> dict:
    d = json.loads((run_dir / "privacy.json").read_text())
    return {site: [(h["round"], h["steps"], h["noise_multiplier"], h["sample_rate"], h.get("secagg"))
                   for h in s["history"]] for site, s in d["sites"].items()}


@pytest.mark.slow
def test_an_aborted_round_moves_no_sites_epsilon_and_a_resumed_run_after_it_matches(tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    res = fedgen("simulate", REPO / "scenarios" / "quickstart.yaml", "--out", ref,
                 *[a for item in ABORTING for a in ("--set", item)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    first = rows[0]["secure_aggregation"]
    assert first["released"] is False and first["sites_abort_acknowledged"] == 5
    assert rows[0]["epsilon"] == 0.0  # sites 1, 3, 4 trained in round 1; none of it counts
    assert [r["secure_aggregation"]["released"] for r in rows[1:]] == [True, True]

    privacy = json.loads((ref / "privacy.json").read_text())
    spends = _spends(ref)
    for site in ("1", "3", "4"):  # trained in the aborted round: pending, then aborted
        assert spends[site][:2] == [(1, 5, *spends[site][0][2:4], PENDING), (1, 0, *spends[site][0][2:4], ABORTED)]
    for site, history in spends.items():
        charged = [(s, q, n) for r, n, s, q, state in history if r > 1 and n > 0]
        assert len(charged) == 2 and all(state in (PENDING, RELEASED) for r, _, _, _, state in history if r > 1)
        fresh = _fresh_epsilon(charged)  # rounds 2 and 3 only, charged exactly as without an abort
        assert privacy["sites"][site]["epsilon"] == pytest.approx(fresh, rel=1e-9)
        assert privacy["sites"][site]["steps"] == 10
        # the site's own ledger says the same as the server's copy
        own = SiteLedger.from_json((ref / "sites" / site / "ledger.json").read_text())
        assert own.epsilon == pytest.approx(fresh, rel=1e-9)
    # equal data sizes, equal spends: a site of the aborted round is where one outside it is
    assert privacy["sites"]["1"]["epsilon"] == privacy["sites"]["0"]["epsilon"]

    # the same run, Ctrl-C in round 2 (after the aborted round 1 was committed), resumed
    scenario = load_scenario(REPO / "scenarios" / "quickstart.yaml", ABORTING)
    run_dir = tmp_path / "resumed"
    write_run_dir(scenario, run_dir)
    real_site_id, calls = client_app.site_id, {"n": 0}

    def site_id(context):
        if context.node_config["partition-id"] == 3:
            calls["n"] += 1
            if calls["n"] == 2:  # call 1: round 1's training, call 2: round 2's
                raise KeyboardInterrupt
        return real_site_id(context)

    monkeypatch.setattr(client_app, "site_id", site_id)
    with pytest.raises(KeyboardInterrupt):
        run_simulation_dir(run_dir, scenario, console=Console(quiet=True))
    assert json.loads((run_dir / "summary.json").read_text())["rounds_completed"] == 1
    monkeypatch.undo()
    res = fedgen("simulate", "--resume", run_dir, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert _spends(run_dir) == spends
    assert json.loads((run_dir / "privacy.json").read_text())["epsilon"] == privacy["epsilon"]


@pytest.mark.slow
def test_a_site_killed_between_its_masked_input_and_the_unmask_stays_charged(tmp_path, monkeypatch):
    """Site 3 sends its masked input, then dies before the unmask stage: the four others
    reveal its seed's shares (threshold 4), so its input is in the released sum without
    its answer -- and its pending spend, never resolved, stays charged."""
    scenario = load_scenario(REPO / "scenarios" / "quickstart.yaml", [
        "federation.rounds=1", "federation.secure_aggregation.threshold=4", "training.local_steps=5",
        "evaluation.every=0", "evaluation.num_samples=100", "warm_start=null", "simulation.engine=inprocess"])
    run_dir = tmp_path / "run"
    write_run_dir(scenario, run_dir)
    real_unmask = client_secagg._unmask

    def unmask(cfg, context):
        if context.node_config["partition-id"] == 3:
            raise RuntimeError("site process killed (test)")
        return real_unmask(cfg, context)

    monkeypatch.setattr(client_secagg, "_unmask", unmask)
    run_simulation_dir(run_dir, scenario, console=Console(quiet=True))
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["secure_aggregation"]
    assert row["released"] is True and row["sites_aggregated"] == 5 and row["dropped_at"] == {"unmask": 1}
    spends = _spends(run_dir)
    sigma_q = spends["3"][0][2:4]
    assert spends["3"] == [(1, 5, *sigma_q, PENDING)]  # never resolved: charged
    assert spends["4"] == [(1, 5, *sigma_q, PENDING), (1, 0, *sigma_q, RELEASED)]
    privacy = json.loads((run_dir / "privacy.json").read_text())
    fresh = _fresh_epsilon([(*sigma_q, 5)])
    assert privacy["sites"]["3"]["epsilon"] == privacy["sites"]["4"]["epsilon"] == pytest.approx(fresh, rel=1e-9)
    assert fresh > 0


def test_only_a_site_that_trusts_the_server_withdraws_on_its_abort():
    """A deployed site cannot verify an abort (a deviating server could have decoded its
    input from the neighbours' shares): it keeps the charge unless its operator sets
    trust-secagg-abort; a simulated node (the researcher's own data) trusts its harness."""
    from fedgen.client.errors import DataError
    from fedgen.client.policy import SitePolicy

    deployed = {"data-path": "/data/site"}
    assert SitePolicy.from_node_config(deployed).trust_secagg_abort is False
    assert SitePolicy.from_node_config({**deployed, "trust-secagg-abort": "true"}).trust_secagg_abort is True
    assert SitePolicy.from_node_config({}).trust_secagg_abort is True
    assert SitePolicy.from_node_config({"trust-secagg-abort": "false"}).trust_secagg_abort is False
    with pytest.raises(DataError, match="trust-secagg-abort='maybe': expected true or false"):
        SitePolicy.from_node_config({**deployed, "trust-secagg-abort": "maybe"})


@pytest.mark.slow
def test_a_site_that_does_not_trust_aborts_stays_charged_for_an_aborted_round(tmp_path, monkeypatch):
    """The aborting round of ABORTING, with site 3's operator not trusting the server's
    abort (node-config trust-secagg-abort=false): its round-1 spend stays pending, i.e.
    charged, while the sites that trust the abort withdraw theirs."""
    scenario = load_scenario(REPO / "scenarios" / "quickstart.yaml", [*ABORTING, "federation.rounds=1"])
    run_dir = tmp_path / "run"
    write_run_dir(scenario, run_dir)
    real_abort = client_secagg._abort

    def abort(cfg, context):
        if context.node_config["partition-id"] == 3:
            context.node_config["trust-secagg-abort"] = "false"
        return real_abort(cfg, context)

    monkeypatch.setattr(client_secagg, "_abort", abort)
    run_simulation_dir(run_dir, scenario, console=Console(quiet=True))
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["secure_aggregation"]
    assert row["released"] is False
    spends = _spends(run_dir)
    sigma_q = spends["3"][0][2:4]
    assert spends["3"] == [(1, 5, *sigma_q, PENDING)]  # not withdrawn: charged
    other = spends["1"][0][2:4]
    assert spends["1"] == [(1, 5, *other, PENDING), (1, 0, *other, ABORTED)]
    privacy = json.loads((run_dir / "privacy.json").read_text())
    fresh = _fresh_epsilon([(*sigma_q, 5)])
    assert privacy["sites"]["3"]["epsilon"] == pytest.approx(fresh, rel=1e-9) and fresh > 0
    assert privacy["sites"]["1"]["epsilon"] == 0.0
