"""Secure aggregation (SecAgg+ over the Message API; docs/aggregation.md): real Flower
Message objects through the in-process engine's grid and nodes, the real site mod
(``client/secagg.py``) and server workflow (``server/secagg.py``). The sites' "training" is
a ClientApp of this file that returns a chosen update, so the plaintext is known."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from scipy import stats

from fedgen.client.secagg import secagg_mod
from fedgen.contract import secagg as sa
from fedgen.contract.errors import ScenarioError
from fedgen.contract.scenario import scenario_from_dict
from fedgen.server.secagg import SecAggWorkflow
from fedgen.simulations.inprocess_engine import InProcessGrid, SimulatedNode, _task_identity

from .conftest import REPO

DIM = 64
BITS = 32


@pytest.fixture(autouse=True)
def _run_identity():
    """Messages are created inside a run (the engine sets Flower's task identity)."""
    with _task_identity(11):
        yield


def _levels(n: int, bits: int = BITS) -> int:
    return sa.levels(bits, n)


class Sites:
    """``n`` simulated nodes whose update is ``plain[i] - L/2``: the stochastic rounding of
    an integer is the integer, so the server's integer sum can be compared exactly (the
    clip range is ``C = L/2``, the scale ``L / 2C`` is 1)."""

    def __init__(self, n: int, *, bits: int = BITS, seed: int = 0, drop: dict[str, set[int]] | None = None,
                 observe: list | None = None) -> None:
        self.n, self.bits = n, bits
        self.levels = _levels(n, bits)
        rng = np.random.default_rng(seed)
        half = self.levels // 2
        self.plain = rng.integers(half - 1000, half + 1000, size=(n, DIM)).astype(np.int64)
        self.drop = drop or {}  # stage -> partition ids that fail at that stage
        self.observe = observe
        app = ClientApp(mods=[self._faults, secagg_mod])

        @app.train()
        def train(msg: Message, context: Context) -> Message:
            pid = int(context.node_config["partition-id"])
            x = self.plain[pid].astype(np.float64) - self.levels / 2
            trained = msg.content["arrays"]["w"].numpy() + x
            return Message(content=RecordDict({"arrays": ArrayRecord({"w": Array(trained)})}), reply_to=msg)

        self.grid = InProcessGrid(SimulatedNode(5000 + i, i, n, 11, {}, app) for i in range(n))
        self.pid = {5000 + i: i for i in range(n)}

    def _faults(self, msg: Message, context: Context, call_next):
        stage = str(msg.content.config_records[sa.RECORD]["stage"]) if sa.RECORD in msg.content.config_records else ""
        if int(context.node_config["partition-id"]) in self.drop.get(stage, set()):
            raise RuntimeError(f"site dropped at {stage} (test fault)")
        reply = call_next(msg, context)
        if self.observe is not None and sa.MASKED in reply.content.array_records:
            self.observe.append((int(context.node_config["partition-id"]),
                                 reply.content[sa.MASKED][sa.MASKED_KEY].numpy().copy()))
        return reply

    def clip(self) -> float:
        return self.levels / 2

    def round(self, threshold: int, **kw):
        """One secure-aggregation round; (round state, new model or None)."""
        wf = SecAggWorkflow(threshold=threshold, bits=self.bits, clip_norm=self.clip(), **kw)
        global_arrays = ArrayRecord({"w": Array(np.zeros(DIM))})
        msgs = [Message(content=RecordDict({"arrays": global_arrays, "config": ConfigRecord({"server-round": 1})}),
                        message_type=MessageType.TRAIN, dst_node_id=node) for node in self.grid.get_node_ids()]
        rnd, _, replies = wf.collect(self.grid, 1, msgs)
        ok = [r for r in replies if not r.has_error()]
        return rnd, (None if rnd.aborted else wf.unmask(self.grid, rnd, ok, global_arrays))


def _expected_total(sites: Sites, included: list[int]) -> np.ndarray:
    return sites.plain[included].sum(axis=0)


def test_the_aggregate_equals_the_plaintext_integer_sum_exactly():
    sites = Sites(5)
    rnd, new = sites.round(threshold=3)
    assert rnd.aborted is None and rnd.sites_aggregated == 5
    assert np.array_equal(rnd.total.astype(np.int64), _expected_total(sites, list(range(5))))
    mean = (sites.plain.astype(np.float64) - sites.levels / 2).mean(axis=0)
    assert np.allclose(new["w"].numpy(), mean, rtol=0, atol=1e-9)


@pytest.mark.parametrize("n, bits", [(7, 16), (100, 32), (3, 62)])
def test_the_masked_sum_never_wraps_around_even_at_the_top_of_the_range(n, bits):
    """Every site's coordinates at +C (each encodes L, the largest value) plus its masks,
    summed modulo 2^bits: removing the masks gives n * L exactly, below 2^bits by the
    choice of L = floor((2^bits - 1) / n)."""
    L = sa.levels(bits, n)
    assert n * L < 2 ** bits
    rng = np.random.default_rng(0)
    total, masks = np.zeros(DIM, dtype=np.uint64), np.zeros(DIM, dtype=np.uint64)
    for _ in range(n):
        q = sa.quantize(np.full(DIM, 2.5), 2.5, L, rng)
        assert (q == L).all()
        mask = sa.expand_mask(sa.new_seed(), DIM, bits)
        total = sa.add_mod(total, sa.add_mod(q, mask, 1, bits), 1, bits)
        masks = sa.add_mod(masks, mask, 1, bits)
    unmasked = sa.add_mod(total, masks, -1, bits)
    assert (unmasked == n * L).all()
    assert np.allclose(sa.dequantize_sum(unmasked, n, 2.5, L), n * 2.5)


def test_secagg_plus_with_ring_neighbours_gives_the_same_sum():
    sites = Sites(8, seed=3)
    rnd, _ = sites.round(threshold=3, num_neighbours=4)
    assert rnd.aborted is None
    assert np.array_equal(rnd.total.astype(np.int64), _expected_total(sites, list(range(8))))


def test_a_masked_update_is_uniform_and_independent_of_the_plaintext():
    """Site 0's masked input over many rounds, its plaintext chosen at random from two very
    different vectors: the masked words are uniform (chi-square over 16 bins of the top
    bits) and uncorrelated with the plaintext."""
    bits = 16
    observed: list = []
    rng = np.random.default_rng(7)
    chosen = []
    for r in range(60):
        sites = Sites(3, bits=bits, seed=r, observe=observed)
        bit = int(rng.integers(2))
        sites.plain[0] = 0 if bit == 0 else sites.levels  # the two extremes of the encoding
        chosen.append(bit)
        rnd, _ = sites.round(threshold=2)
        assert rnd.aborted is None
    ys = np.array([y for pid, y in observed if pid == 0], dtype=np.float64)  # (rounds, DIM)
    assert ys.shape == (60, DIM)
    top = (ys.astype(np.int64) >> (bits - 4)).ravel()
    counts = np.bincount(top, minlength=16)
    assert stats.chisquare(counts).pvalue > 1e-3
    plain = np.repeat(np.array(chosen, dtype=np.float64)[:, None], DIM, axis=1)
    r = np.corrcoef(plain.ravel(), ys.ravel())[0, 1]
    assert abs(r) < 4 / np.sqrt(ys.size)  # |r| of independent samples: ~ 1/sqrt(N)
    # the unmasked encoding would be perfectly correlated with the plaintext bit
    assert np.corrcoef(plain.ravel(), (plain * 3).ravel())[0, 1] == pytest.approx(1.0)


def test_30_percent_of_sites_dropping_after_sharing_keys_are_recovered():
    sites = Sites(10, seed=1, drop={sa.COLLECT: {2, 5, 7}})
    rnd, new = sites.round(threshold=6)
    assert rnd.aborted is None and rnd.sites_aggregated == 7 and rnd.sites_recovered == 3
    survivors = [i for i in range(10) if i not in (2, 5, 7)]
    assert np.array_equal(rnd.total.astype(np.int64), _expected_total(sites, survivors))
    mean = (sites.plain[survivors].astype(np.float64) - sites.levels / 2).mean(axis=0)
    assert np.allclose(new["w"].numpy(), mean, rtol=0, atol=1e-9)


def test_30_percent_of_sites_dropping_after_sending_their_masked_input_are_recovered():
    sites = Sites(10, seed=2, drop={sa.UNMASK: {0, 4, 9}})
    rnd, _ = sites.round(threshold=6)
    assert rnd.aborted is None and rnd.sites_aggregated == 10
    assert np.array_equal(rnd.total.astype(np.int64), _expected_total(sites, list(range(10))))


def test_fewer_survivors_than_the_threshold_abort_the_round_with_a_reason():
    sites = Sites(10, seed=4, drop={sa.COLLECT: {1, 3, 6}})
    rnd, new = sites.round(threshold=8)
    assert new is None and rnd.total is None
    assert rnd.aborted == ("only 7 sites sent a valid masked input, fewer than the threshold 8; "
                           "round not aggregated")
    assert rnd.report()["released"] is False


def test_a_site_refuses_to_reveal_both_shares_of_one_site():
    sites = Sites(4, seed=5)
    wf = SecAggWorkflow(threshold=2, bits=BITS, clip_norm=sites.clip())
    global_arrays = ArrayRecord({"w": Array(np.zeros(DIM))})
    msgs = [Message(content=RecordDict({"arrays": global_arrays, "config": ConfigRecord({"server-round": 1})}),
                    message_type=MessageType.TRAIN, dst_node_id=n) for n in sites.grid.get_node_ids()]
    rnd, _, replies = wf.collect(sites.grid, 1, msgs)
    node = rnd.order[0]
    bad = Message(content=RecordDict({sa.RECORD: ConfigRecord({"stage": sa.UNMASK, "active": [0, 1, 2],
                                                               "dropped": [1]})}),
                  message_type=MessageType.TRAIN, dst_node_id=node)
    reply = next(iter(sites.grid.send_and_receive([bad])))
    assert reply.has_error() and "both survived and dropped" in reply.error.reason


# -- the scenario keys ------------------------------------------------------------------

@pytest.mark.parametrize("federation, privacy, message", [
    ({"num_sites": 5, "secure_aggregation": {"threshold": 6}}, {},
     "federation: secure_aggregation.threshold: 6 is more than the 5 sites"),
    ({"num_sites": 5, "secure_aggregation": {"threshold": 1}}, {},
     "federation.secure_aggregation.threshold: Input should be greater than or equal to 2"),
    ({"num_sites": 5, "secure_aggregation": {"threshold": 3, "bits": 64}}, {},
     "federation.secure_aggregation.bits: Input should be less than or equal to 62"),
    ({"num_sites": 5, "secure_aggregation": {"threshold": 3, "bits": 8}}, {},
     "federation: secure_aggregation.bits: 8 bits leave fewer than 256 quantisation levels per site for 5 sites"),
    ({"num_sites": 5, "strategy": "krum", "secure_aggregation": {"threshold": 3}}, {},
     "secure_aggregation: the krum rule needs each site's update"),
    ({"num_sites": 5, "secure_aggregation": {"threshold": 3}}, {"unit": "site"},
     "federation.secure_aggregation: site-level DP (privacy.unit: site)"),
])
def test_scenario_keys_are_checked_with_one_line(federation, privacy, message):
    with pytest.raises(ScenarioError) as err:
        scenario_from_dict({"federation": federation, "privacy": privacy}, source="s.yaml")
    text = str(err.value)
    assert message in text and "\n" not in text


@pytest.mark.parametrize("extra", [{"model": {"family": "mmd"}},
                                   {"warm_start": {"release": {"epsilon_fraction": 0.2}}}])
def test_releases_are_refused_under_secure_aggregation(extra):
    """A release is combined per site by its noise precision; a masked sum cannot do that."""
    with pytest.raises(ScenarioError, match="is combined per site by the server"):
        scenario_from_dict({"federation": {"num_sites": 5, "secure_aggregation": {"threshold": 3}}, **extra},
                           source="s.yaml")


# -- a whole run --------------------------------------------------------------------------

def _simulate(tmp_path: Path, *overrides: str) -> Path:
    out = tmp_path / "run"
    sets = [a for item in overrides for a in ("--set", item)]
    res = subprocess.run([sys.executable, "-m", "fedgen.simulations.cli", "simulate",
                          str(REPO / "scenarios" / "quickstart.yaml"), "--out", str(out), *sets,
                          "--set", "warm_start=null"],  # a release cannot be securely aggregated
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["inprocess", "flower"])
def test_quickstart_with_secure_aggregation_learns(tmp_path, engine):
    run = _simulate(tmp_path, f"simulation.engine={engine}", "federation.rounds=3",
                    "federation.secure_aggregation.threshold=3", "evaluation.every=0", "evaluation.num_samples=200")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["secure_aggregation"]["released"] for r in rows] == [True, True, True]
    assert all(r["secure_aggregation"]["sites_aggregated"] == 5 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert "honest-but-curious server" in summary["secure_aggregation"]["threat_model"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


@pytest.mark.slow
def test_a_round_with_fewer_survivors_than_the_threshold_is_not_released(tmp_path):
    """Faults seed 2 crashes sites 1 and 2 in round 1 (after sharing keys) and none in
    round 2: round 1 has 3 masked inputs for a threshold of 4 and aborts; round 2 is
    aggregated."""
    run = _simulate(tmp_path, "federation.rounds=2", "federation.secure_aggregation.threshold=4",
                    "simulation.faults.crash=0.3", "simulation.faults.seed=2", "training.local_steps=5",
                    "evaluation.every=0", "evaluation.num_samples=100")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first, second = rows[0]["secure_aggregation"], rows[1]["secure_aggregation"]
    assert first["released"] is False and first["sites_aggregated"] == 0
    assert first["aborted"] == ("only 3 sites sent a valid masked input, fewer than the threshold 4; "
                                "round not aggregated")
    assert rows[0]["sites_trained"] == []  # no site's update went into the model
    assert second["released"] is True and second["sites_aggregated"] == 5
    summary = json.loads((run / "summary.json").read_text())
    assert summary["secure_aggregation"]["rounds_aborted"] == 1
    # no site is credited with an update in the aborted round: each was aggregated once
    assert {s["site"]: s["rounds_trained"] for s in summary["sites"]} == {str(i): 1 for i in range(5)}


# -- the deployment path: TLS + node authentication on loopback --------------------------

@pytest.mark.slow
@pytest.mark.integration
def test_a_deployed_round_with_secure_aggregation(tmp_path, digits):
    """Two SuperNodes (TLS, registered keys) and a SuperLink on 127.0.0.1 run one round
    with secure aggregation: the site state between the stages lives in the SuperNode."""
    from fedgen.simulations.prepare import write_deployment_run_dir

    from .test_deploy import LocalDeployment

    dep = LocalDeployment(tmp_path)
    try:
        dep.start_superlink()
        for site in ("0", "1"):
            dep.register(site)
            np.savez(tmp_path / f"site{site}.npz", x=digits.x[300 * int(site):300 * int(site) + 300].numpy())
            dep.start_supernode(f"site{site}", key=site,
                                node_config={"data-path": str(tmp_path / f"site{site}.npz"), "data-format": "npz",
                                             "site-id": f"site{site}", "state-dir": str(tmp_path / f"state{site}")})
        dep.wait_online(2)
        scenario = scenario_from_dict({
            "name": "secagg-deploy", "seed": 0,
            "federation": {"num_sites": 2, "rounds": 1, "min_fit_sites": 2, "round_timeout_s": 120,
                           "secure_aggregation": {"threshold": 2}},
            "model": {"family": "vae", "hidden": 64, "latent_dim": 4},
            "training": {"local_steps": 3, "batch_size": 32, "lr": 0.002},
            "privacy": {"enabled": True, "target_epsilon": 5.0},
            "evaluation": {"every": 0, "num_samples": 20},
            "simulation": {"device": "cpu"},
            "deployment": {"data_shape": [1, 8, 8], "num_classes": None}})
        run = write_deployment_run_dir(scenario, tmp_path / "run")
        assert dep.run(run).startswith("finished:completed"), dep.log("site0")[-3000:]
        row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        assert row["secure_aggregation"]["released"] is True and row["secure_aggregation"]["sites_aggregated"] == 2
        assert sorted(row["sites_trained"]) == ["site0", "site1"]
        assert row["train_loss"] is None  # a deployed site under secure aggregation sends only the masked sum
    finally:
        dep.close()
