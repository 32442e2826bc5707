"""Distributed DP under secure aggregation (issue 19; privacy/skellam.py, docs/aggregation.md):
the Skellam accountant against a direct evaluation, the noise shares' sum, conditional
rounding, wrap-around, the exact integer sum through the real SecAgg+ mod and workflow,
the scenario keys, and (slow) a whole mmd run whose ledgers are recomputed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from scipy import stats

from fedgen.client.secagg import secagg_mod
from fedgen.contract import secagg as sa
from fedgen.contract.errors import ScenarioError
from fedgen.contract.scenario import scenario_from_dict
from fedgen.privacy import skellam as sk
from fedgen.privacy.ledger import SiteLedger
from fedgen.server.secagg import SecAggWorkflow
from fedgen.shared_models import build_model
from fedgen.simulations.inprocess_engine import InProcessGrid, SimulatedNode, _task_identity

from .conftest import REPO

DELTA = 1e-5


@pytest.fixture(autouse=True)
def _run_identity():
    with _task_identity(11):
        yield


# -- the accountant ---------------------------------------------------------------------

def _exact_renyi(mu: float, shift: int, alpha: float) -> float:
    """D_alpha(Sk(mu) + shift || Sk(mu)) by direct summation of the pmf (scipy's Skellam)."""
    half = int(40 * math.sqrt(mu)) + 10 * abs(shift) + 50
    k = np.arange(-half, half + 1)
    dist = stats.skellam(mu / 2, mu / 2)
    logp, logq = dist.logpmf(k - shift), dist.logpmf(k)
    with np.errstate(invalid="ignore"):
        terms = alpha * logp + (1 - alpha) * logq
    keep = np.isfinite(logp) & np.isfinite(logq)  # beyond, scipy's pmf underflows (mass < 1e-300)
    return float(np.logaddexp.reduce(terms[keep]) / (alpha - 1))


@pytest.mark.parametrize("mu, shift", [(20.0, 1), (200.0, 1), (200.0, 3), (2000.0, 5)])
def test_the_skellam_rdp_bounds_the_exact_divergence_and_is_tight_for_large_mu(mu, shift):
    """One coordinate shifted by ``shift`` (l1 = l2 = shift): Theorem 3.5 of Agarwal et al.
    2021 bounds the exact Renyi divergence in both directions, and within 15 % once the
    variance is large beside the shift (the Gaussian regime it approaches)."""
    orders = (2, 5, 10, 30)
    bound = sk.skellam_rdp(mu, shift, shift, orders)
    for a, b in zip(orders, bound):
        exact = max(_exact_renyi(mu, shift, a), _exact_renyi(mu, -shift, a))
        assert exact <= b * (1 + 1e-9)
        if mu / shift ** 2 >= 80 and a <= 10:
            assert b <= 1.15 * exact
        assert b >= a * shift ** 2 / (2 * mu)  # never below the Gaussian of the same variance


def test_calibrated_variance_spends_the_target_and_the_ledger_recomputes_it():
    l2 = sk.rounded_l2_bound(1000.0, 4001)
    l1 = sk.rounded_l1_bound(l2, 4001)
    for target in (1.0, 10.0):
        mu = sk.calibrate_mu(epsilon=target, delta=DELTA, l1=l1, l2=l2)
        assert 0.995 * target <= sk.skellam_epsilon(mu, l1, l2, DELTA) <= target
        assert sk.skellam_epsilon(mu * 0.98, l1, l2, DELTA) > target  # the smallest such mu
        ledger = SiteLedger(site="0", accountant="prv", delta=DELTA, target_epsilon=target, max_grad_norm=1.0)
        ledger.record_round(round=1, steps=1, noise_multiplier=math.sqrt(mu) / l2, sample_rate=1.0,
                            skellam={"mu": mu, "l1": l1, "l2": l2})
        again = SiteLedger.from_json(ledger.to_json())  # what travels and what privacy.json holds
        fresh = _fresh_epsilon(mu, l1, l2, DELTA)
        assert again.epsilon == pytest.approx(fresh, rel=0.01)
        assert again.history[0].epsilon == pytest.approx(fresh, rel=0.01)


def _fresh_epsilon(mu: float, l1: float, l2: float, delta: float) -> float:
    """An independent recomputation: the theorem's RDP at every integer order 2..1024 and
    the conversion of Balle et al. 2020 (Opacus' ``get_privacy_spent``), written out."""
    best = math.inf
    for a in range(2, 1025):
        rdp = a * l2 ** 2 / (2 * mu) + min(((2 * a - 1) * l2 ** 2 + 6 * l1) / (4 * mu ** 2), 3 * l1 / (2 * mu))
        best = min(best, rdp + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1))
    return best


# -- the noise shares ---------------------------------------------------------------------

@pytest.mark.parametrize("survivors", [7, 10])
def test_the_summed_noise_shares_have_the_planned_std(survivors):
    """Ten sites each add Sk(mu / 7); whatever number s >= 7 of them is in the sum, it is
    Sk(mu s / 7): its empirical std over many independent draws within 5 % of sqrt(mu s / 7)."""
    rel = sk.DistributedRelease(scale=100.0, dim=16, size=2000, mu=5000.0, threshold=7, num_sites=10, bits=40,
                                max_records=10)
    rng = np.random.default_rng(2026)
    draws = sum(sk.skellam_noise((50, rel.size), rel.share, rng) for _ in range(survivors))
    planned = math.sqrt(rel.mu * survivors / rel.threshold)
    assert draws.std() == pytest.approx(planned, rel=0.05)
    assert abs(draws.mean()) < 4 * planned / math.sqrt(draws.size)
    assert draws.dtype == np.int64


def test_conditional_rounding_is_unbiased_integer_and_bounded():
    """Rows of norm gamma = 6 in 64 coordinates: rounding adds ~sqrt(64/4) = 4 to the norm
    sometimes, so the bound bites and rows are redrawn; every row ends integer, within the
    bound, and the mean over draws is the scaled row."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 64, generator=gen, dtype=torch.float64)
    x = 6.0 * x / x.norm(dim=1, keepdim=True)
    bound = sk.rounded_l2_bound(6.0, 64)
    draws = torch.stack([sk.conditional_round(x, bound, gen) for _ in range(200)])
    assert torch.equal(draws, draws.round())
    assert float(draws.norm(dim=2).max()) <= bound
    assert float((draws.mean(0) - x).abs().mean()) < 0.05  # 200 draws of a Bernoulli: ~0.5/sqrt(200) each
    assert float((draws - x).abs().max()) < 1.0


def test_the_mmd_release_rounds_every_record():
    model = build_model("mmd", data_shape=(1, 8, 8), num_classes=3, architecture="mlp", num_features=64)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(50, 1, 8, 8, generator=gen), torch.arange(50) % 3
    bound = sk.rounded_l2_bound(1000.0, 65)
    total = model.statistic_sum(x, y, transform=lambda rows: sk.conditional_round(rows.double() * 1000.0, bound, gen))
    assert total.dtype == torch.float64 and torch.equal(total, total.round())
    exact = model.statistic_sum(x, y).double() * 1000.0
    assert float((total - exact).abs().max()) <= 50  # 50 records, each off by < 1 per coordinate


# -- wrap-around ------------------------------------------------------------------------

def test_the_planned_scale_never_wraps_the_sum_and_twice_it_would():
    """Bits 20, 5 sites x 20 records: the worst data sum (every record's whole bound on one
    coordinate) plus the noise of all five shares, over 200 draws, decodes to itself; at
    twice the planned scale the worst data sum alone leaves the signed range."""
    rel = sk.plan_distributed_release(epsilon=1.0, delta=DELTA, bits=20, num_sites=5, threshold=3, max_records=20,
                                      dim=65, size=195)
    assert rel.data_bound() + rel.noise_bound() < 2 ** 19
    worst = np.full(rel.size, math.floor(rel.data_bound()), dtype=np.int64)
    rng = np.random.default_rng(5)
    for sign in (1, -1):
        for _ in range(100):
            noisy = sign * worst + sum(sk.skellam_noise((rel.size,), rel.share, rng) for _ in range(5))
            total = np.zeros(rel.size, dtype=np.uint64)
            for part in np.array_split(noisy, 1):  # through the modular encoding
                total = sa.add_mod(total, sa.encode_signed(part, rel.bits), 1, rel.bits)
            assert np.array_equal(sa.decode_signed(total, rel.bits), noisy)
    double = 2 * rel.num_sites * rel.max_records * sk.rounded_l2_bound(2 * rel.scale, rel.dim)
    assert double >= 2 ** 19  # the bits are used: the scale is within 2x of the largest that fits
    with pytest.raises(sk.BitsTooSmall, match="raise secure_aggregation.bits to at least"):
        sk.plan_distributed_release(epsilon=1.0, delta=DELTA, bits=9, num_sites=5, threshold=3, max_records=20,
                                    dim=65, size=195)


# -- the exact sum through SecAgg+ --------------------------------------------------------

class ReleasingSites:
    """``n`` nodes whose training returns a known noised integer release (plaintext plus a
    known Skellam share, negative values included) under the real secagg mod."""

    def __init__(self, n: int, rel: sk.DistributedRelease, *, drop: dict[str, set[int]] | None = None) -> None:
        rng = np.random.default_rng(n)
        self.plain = rng.integers(-5000, 5000, size=(n, rel.size)).astype(np.int64)
        self.noise = np.stack([sk.skellam_noise((rel.size,), rel.share, rng) for _ in range(n)])
        self.seen: list[str] = []
        self.drop = drop or {}
        app = ClientApp(mods=[self._faults, secagg_mod])

        @app.train()
        def train(msg: Message, context: Context) -> Message:
            pid = int(context.node_config["partition-id"])
            self.seen.append(str(msg.content["config"][sa.DISTRIBUTED]))
            out = self.plain[pid] + self.noise[pid]
            return Message(content=RecordDict({"arrays": ArrayRecord({sa.DISTRIBUTED: Array(out)})}), reply_to=msg)

        self.grid = InProcessGrid(SimulatedNode(7000 + i, i, n, 11, {}, app) for i in range(n))

    def _faults(self, msg: Message, context: Context, call_next):
        stage = str(msg.content.config_records[sa.RECORD]["stage"]) if sa.RECORD in msg.content.config_records else ""
        if int(context.node_config["partition-id"]) in self.drop.get(stage, set()):
            raise RuntimeError(f"site dropped at {stage} (test fault)")
        return call_next(msg, context)

    def round(self, rel: sk.DistributedRelease):
        wf = SecAggWorkflow(threshold=rel.threshold, bits=rel.bits, clip_norm=1.0)
        arrays = ArrayRecord({"w": Array(np.zeros(3))})
        msgs = [Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                        message_type=MessageType.TRAIN, dst_node_id=node) for node in self.grid.get_node_ids()]
        rnd, _, replies = wf.collect(self.grid, 1, msgs, rel)
        ok = [r for r in replies if not r.has_error()]
        total = None if rnd.aborted else wf.unmask_sum(self.grid, rnd, ok, rel.size)
        return rnd, total


def _release(n: int, threshold: int) -> sk.DistributedRelease:
    return sk.plan_distributed_release(epsilon=2.0, delta=DELTA, bits=40, num_sites=n, threshold=threshold,
                                       max_records=100, dim=33, size=99)


def test_the_unmasked_aggregate_is_the_integer_sum_plus_the_noise_exactly():
    rel = _release(5, 3)
    sites = ReleasingSites(5, rel)
    rnd, total = sites.round(rel)
    assert rnd.aborted is None and rnd.sites_aggregated == 5
    assert np.array_equal(sa.decode_signed(total, rel.bits), (sites.plain + sites.noise).sum(0))
    assert len(sites.seen) == 5 and all(sk.DistributedRelease.from_json(s) == rel for s in sites.seen)


def test_30_percent_dropping_after_sharing_keys_still_gives_the_exact_sum():
    rel = _release(10, 7)
    sites = ReleasingSites(10, rel, drop={sa.COLLECT: {1, 4, 8}})
    rnd, total = sites.round(rel)
    assert rnd.aborted is None and rnd.sites_aggregated == 7 and rnd.sites_recovered == 3
    kept = [i for i in range(10) if i not in (1, 4, 8)]
    assert np.array_equal(sa.decode_signed(total, rel.bits), (sites.plain + sites.noise)[kept].sum(0))


def test_fewer_survivors_than_the_threshold_release_nothing():
    rel = _release(10, 8)
    sites = ReleasingSites(10, rel, drop={sa.COLLECT: {0, 2, 9}})
    rnd, total = sites.round(rel)
    assert total is None and rnd.total is None and rnd.report()["released"] is False
    assert "fewer than the threshold 8" in rnd.aborted


def test_a_site_refuses_parameters_that_could_wrap_around():
    rel = _release(5, 3)
    bad = sk.DistributedRelease(**{**json.loads(rel.to_json()), "scale": rel.scale * 1e5})
    assert not bad.fits()
    sites = ReleasingSites(5, rel)
    wf = SecAggWorkflow(threshold=3, bits=rel.bits, clip_norm=1.0)
    arrays = ArrayRecord({"w": Array(np.zeros(3))})
    msgs = [Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                    message_type=MessageType.TRAIN, dst_node_id=node) for node in sites.grid.get_node_ids()]
    _, _, replies = wf.collect(sites.grid, 1, msgs, bad)
    assert replies and all(r.has_error() for r in replies) and not sites.seen  # nothing left any site


def test_a_server_cannot_ask_for_an_unmasked_distributed_release():
    """A plain train message (no secure-aggregation stage) that names the distributed
    release in its config: the mod strips it, so the training never makes a release that
    carries only a share of the noise outside a masked sum."""
    rel = _release(3, 2)
    sites = ReleasingSites(3, rel)
    node = sites.grid.get_node_ids()[0]
    msg = Message(content=RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(3))}),
                                      "config": ConfigRecord({"server-round": 1, sa.DISTRIBUTED: rel.to_json()})}),
                  message_type=MessageType.TRAIN, dst_node_id=node)
    (reply,) = sites.grid.send_and_receive([msg])
    assert reply.has_error() and not sites.seen  # the test training found no release to make


# -- the scenario keys ------------------------------------------------------------------

_DIST = {"threshold": 3, "noise": "distributed", "bits": 48}


@pytest.mark.parametrize("extra, message", [
    ({"model": {"family": "gan"}}, "training.local_steps: noise: distributed with gan runs DP-FedSGD, exactly one "
     "private step a round; set training.local_steps: 1 (not 20)"),
    ({"model": {"family": "mmd"}, "privacy": {"enabled": False}}, "noise: distributed needs example-level DP"),
    ({"model": {"family": "mmd"}, "federation": {"num_sites": 5, "secure_aggregation": {**_DIST, "bits": 24}}},
     "federation.secure_aggregation.bits: 24 bits cannot hold the sum of 5 sites x 100000 records"),
    ({"model": {"family": "mmd"}, "federation": {"num_sites": 5, "secure_aggregation": {**_DIST, "noise": "central"}}},
     "federation.secure_aggregation.noise: Input should be 'local' or 'distributed'"),
    ({"model": {"family": "mmd"}, "privacy": {"enabled": True, "white_box": {"canaries": 64}}},
     "privacy.white_box: the release-canary audit tests a Gaussian release with noise: local"),
    ({"model": {"family": "mmd"}, "warm_start": {"public": {"format": "digits-28"}}},
     "warm_start: the mmd family is fitted by a release, not by training steps"),
    ({"model": {"family": "mmd", "perceptual_weight": 0.5},
      "warm_start": {"public": {"format": "digits-28"}, "release": {"epsilon_fraction": 0.5}}},
     "warm_start: give exactly one"),
])
def test_distributed_noise_keys_are_checked_with_one_line(extra, message):
    doc = {"federation": {"num_sites": 5, "secure_aggregation": _DIST}, "privacy": {"enabled": True}, **extra}
    with pytest.raises(ScenarioError) as err:
        scenario_from_dict(doc, source="s.yaml")
    text = str(err.value)
    assert message in text and "\n" not in text


def test_the_mmd_release_is_accepted_with_distributed_noise():
    s = scenario_from_dict({"federation": {"num_sites": 5, "secure_aggregation": _DIST},
                            "model": {"family": "mmd"}, "privacy": {"enabled": True}}, source="s.yaml")
    assert s.federation.secure_aggregation.noise == "distributed"


def test_the_mmd_release_with_perceptual_features_is_accepted_with_distributed_noise():
    """Its public set trains the feature network only (charged nothing); the site still
    bounds every record's vector to norm 1, so the distributed plan is unchanged."""
    s = scenario_from_dict({"federation": {"num_sites": 5, "secure_aggregation": _DIST},
                            "model": {"family": "mmd", "perceptual_weight": 0.5}, "privacy": {"enabled": True},
                            "warm_start": {"public": {"format": "digits-fonts-28"}}}, source="s.yaml")
    assert s.warm_start.public.format == "digits-fonts-28"


# -- a whole run --------------------------------------------------------------------------

@pytest.mark.slow
def test_an_mmd_run_with_distributed_noise_releases_the_sum_and_charges_the_skellam_epsilon(tmp_path):
    """mmd-digits (5 sites) under SecAgg+ with distributed noise, threshold 3, in-process
    engine: the round is released from the sum, every site's ledger holds one Skellam entry
    whose epsilon a fresh recomputation matches within 1 % (and meets the target), and the
    summary states the guarantee and the threat model."""
    out = tmp_path / "run"
    sets = ["federation.secure_aggregation.threshold=3", "federation.secure_aggregation.noise=distributed",
            "federation.secure_aggregation.bits=48", "model.fit_steps=30", "evaluation.num_samples=100",
            "privacy.target_epsilon=2"]
    res = subprocess.run([sys.executable, "-m", "fedgen.simulations.cli", "simulate",
                          str(REPO / "scenarios" / "mmd-digits.yaml"), "--out", str(out),
                          *[a for s in sets for a in ("--set", s)]],
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    sec = row["secure_aggregation"]
    assert sec["released"] is True and sec["sites_aggregated"] == 5
    noise = sec["distributed_noise"]
    assert noise["skellam_variance"] == pytest.approx(noise["guaranteed_variance"] * 5 / 3, rel=1e-9)
    privacy = json.loads((out / "privacy.json").read_text())
    sites = privacy["sites"]
    assert len(sites) == 5
    for site in sites.values():
        spend_entry, resolution = site["history"]  # the pending spend, then its unmask resolution
        assert resolution["secagg"] == "released" and resolution["steps"] == 0
        assert spend_entry["secagg"] == "pending"
        spend = spend_entry["skellam"]
        assert spend["mu"] == pytest.approx(noise["guaranteed_variance"], rel=1e-12)
        fresh = _fresh_epsilon(spend["mu"], spend["l1"], spend["l2"], DELTA)
        assert site["epsilon"] == pytest.approx(fresh, rel=0.01)
        assert fresh <= 2.0 * 1.001
    summary = json.loads((out / "summary.json").read_text())
    (guarantee,) = summary["guarantees"]
    assert "distributed Skellam release" in guarantee["mechanism"]
    assert "noise: distributed" in summary["secure_aggregation"]["threat_model"]
    assert summary["secure_aggregation"]["noise"] == "distributed"
    assert summary["epsilon"] == pytest.approx(fresh, rel=0.01)
    report = (out / "report.html").read_text()
    assert "distributed Skellam release" in report and "honest-but-curious server" in report


def test_a_site_with_a_stricter_policy_adds_a_larger_share_and_is_charged_its_own_target():
    rel = sk.plan_distributed_release(epsilon=4.0, delta=DELTA, bits=48, num_sites=10, threshold=7,
                                      max_records=1000, dim=65, size=650)
    relaxed = SiteLedger(site="a", accountant="rdp", delta=DELTA, target_epsilon=4.0, max_grad_norm=1.0)
    strict = SiteLedger(site="b", accountant="rdp", delta=DELTA, target_epsilon=2.0, max_grad_norm=1.0)
    own_a, spend_a = sk.site_spend(rel, relaxed)
    own_b, spend_b = sk.site_spend(rel, strict)
    assert own_a == pytest.approx(rel.mu / 7) and spend_a["mu"] == pytest.approx(rel.mu)
    assert own_b > own_a  # with t - 1 others at mu / t, its own share brings the sum to its target
    assert spend_b["mu"] == pytest.approx(own_b + rel.mu / 7 * 6)
    for ledger, spend, target in ((relaxed, spend_a, 4.0), (strict, spend_b, 2.0)):
        sk.charge_distributed(ledger, spend, round=1, run=None)
        assert 0.99 * target <= ledger.epsilon <= target * (1 + 1e-6)
        assert sk.site_spend(rel, ledger) is None  # its budget is spent: a second release is refused
    far = SiteLedger(site="c", accountant="rdp", delta=DELTA, target_epsilon=0.5, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="align the site's policy"):
        sk.site_spend(rel, far)


def test_records_a_hair_above_norm_one_are_still_rounded_at_a_large_scale():
    """float32 features may have norm 1 + 1e-7; at gamma ~ 1e9 that alone is far beyond the
    rounding bound's slack, so rows are projected to norm 1 first (in float64)."""
    rel = sk.DistributedRelease(scale=2.0 ** 30, dim=65, size=65, mu=1e9, threshold=3, num_sites=5, bits=62,
                                max_records=10)
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(20, 65, generator=gen)
    rows = (rows / rows.norm(dim=1, keepdim=True) * (1 + 1e-6)).float()
    out = sk.round_records(rows, rel, gen)
    assert float(out.norm(dim=1).max()) <= rel.l2 and torch.equal(out, out.round())
    with pytest.raises(RuntimeError, match="still above the bound"):
        sk.conditional_round(rows.double() * rel.scale, rel.l2, gen)


@pytest.mark.parametrize("epsilon", [0.1, 1.0, 10.0])
def test_the_planned_shares_stay_in_the_exact_range_of_the_poisson_sampler(epsilon):
    """At 48 bits the bits alone would allow gamma ~ 1e9 and Poisson rates ~ 1e18, where
    float64 draws land on a grid (the noise's low bits would be constant): the plan caps
    the rate, and at the cap the draws are still every integer (odd and even alike)."""
    rel = sk.plan_distributed_release(epsilon=epsilon, delta=DELTA, bits=48, num_sites=10, threshold=7,
                                      max_records=10000, dim=4001, size=40010)
    assert rel.share / 2 <= sk.MAX_POISSON_RATE and rel.fits()
    assert rel.l2 / rel.scale < 1.001  # the rounding still costs nothing
    draws = sk.skellam_noise((20000,), 2 * sk.MAX_POISSON_RATE, np.random.default_rng(0))
    assert {int(v) for v in np.unique(draws % 4)} == {0, 1, 2, 3}
    big = sk.skellam_noise((20000,), 20 * sk.MAX_POISSON_RATE, np.random.default_rng(1))  # drawn in 10 parts
    assert big.std() == pytest.approx(math.sqrt(20 * sk.MAX_POISSON_RATE), rel=0.03)
    assert {int(v) for v in np.unique(big % 4)} == {0, 1, 2, 3}


def test_a_release_refuses_parameters_that_claim_a_sample_rate_below_one():
    """A distributed release sums every record (q = 1) and is charged at q = 1. A server whose
    parameters claim q < 1 would have the site size its share and check its budget by the
    subsampled bound (a tiny mu), then charge the true q = 1 spend: far above its max-epsilon.
    The site refuses such parameters before anything leaves and spends nothing."""
    from fedgen.client.data import SiteData
    from fedgen.client.training import _distributed_release_round

    model = build_model("mmd", data_shape=(1, 8, 8), num_classes=3, architecture="mlp", num_features=64)
    shape = tuple(model.state_dict()[model.release_buffer].shape)
    lying = sk.plan_distributed_release(epsilon=4.0, delta=DELTA, bits=48, num_sites=5, threshold=3,
                                        max_records=100, dim=shape[-1], size=int(np.prod(shape)), sample_rate=0.01)
    gen = torch.Generator().manual_seed(2)
    data = SiteData(x=torch.rand(40, 1, 8, 8, generator=gen), y=torch.arange(40) % 3, num_classes=3, source="test")
    ledger = SiteLedger(site="a", accountant="rdp", delta=DELTA, target_epsilon=4.0, max_grad_norm=1.0)
    try:
        _distributed_release_round(model, data, release=lying, ledger=ledger, server_round=1,
                                   noise_rng=torch.Generator().manual_seed(3), device=torch.device("cpu"), run=None)
    except ValueError as err:
        assert "sample rate" in str(err)
    assert ledger.epsilon <= 4.0 * (1 + 1e-6)  # on main: the round went through and charged eps >> 4
    assert not ledger.history  # refused: nothing charged, nothing released
