"""DP-FedSGD under secure aggregation with distributed Skellam noise (docs/aggregation.md,
"DP-SGD with distributed noise"): the accountant of a Poisson-subsampled Skellam round in
the ledger, the calibration of mu over the planned rounds and the wrap-around bound for a
rounded clipped gradient."""

from __future__ import annotations

import json
import math

import mpmath as mp
import numpy as np
import pytest
from opacus.accountants.analysis import rdp as rdp_analysis

from fedgen.contract import secagg as sa
from fedgen.privacy import skellam as sk
from fedgen.privacy.ledger import SiteLedger

DELTA = 1e-5


def _zhu_wang_thm6(mu: float, l1: float, l2: float, q: float, alpha: int) -> float:
    """Zhu & Wang 2019, Thm 6, summed directly in 50-digit arithmetic (not in log space),
    fed the Skellam RDP of Agarwal et al. 2021 (Thm 3.5): an independent recomputation."""
    def eps(a: int) -> mp.mpf:
        a = mp.mpf(a)
        return a * l2 * l2 / (2 * mu) + min(((2 * a - 1) * l2 * l2 + 6 * l1) / (4 * mu * mu), 3 * l1 / (2 * mu))

    with mp.workdps(50):
        q_ = mp.mpf(q)
        total = (1 - q_) ** (alpha - 1) * (alpha * q_ - q_ + 1)
        total += mp.binomial(alpha, 2) * q_ ** 2 * (1 - q_) ** (alpha - 2) * mp.e ** eps(2)
        total += 3 * mp.fsum(mp.binomial(alpha, l) * q_ ** l * (1 - q_) ** (alpha - l) * mp.e ** ((l - 1) * eps(l))
                             for l in range(3, alpha + 1))
        return min(float(mp.log(total) / (alpha - 1)), float(eps(alpha)))


def _plan(**kw) -> sk.DistributedRelease:
    args = dict(epsilon=2.0, delta=DELTA, bits=48, num_sites=5, threshold=3, max_records=500, dim=200, size=200,
                sample_rate=0.05, rounds=40)
    return sk.plan_distributed_release(**{**args, **kw})


def test_the_ledger_composes_subsampled_skellam_rounds_as_a_fresh_recomputation():
    """40 DP-FedSGD rounds charged one by one: the ledger's epsilon equals the planned one
    and an independent 50-digit evaluation of Zhu & Wang's bound (within 1 %), and is below
    the target; the same rounds without subsampling cost far more."""
    plan = _plan()
    ledger = SiteLedger(site="0", accountant="prv", delta=DELTA, target_epsilon=2.0, max_grad_norm=1.0)
    spend = {"mu": plan.mu, "l1": plan.l1, "l2": plan.l2}
    for r in range(1, plan.rounds + 1):
        sk.charge_distributed(ledger, spend, round=r, run=None, sample_rate=plan.sample_rate)
    orders = list(range(2, 65))  # a subset of the accountant's orders: never below its epsilon
    fresh_rdp = np.array([_zhu_wang_thm6(plan.mu, plan.l1, plan.l2, plan.sample_rate, a) for a in orders])
    fresh, _ = rdp_analysis.get_privacy_spent(orders=[float(a) for a in orders], rdp=fresh_rdp * plan.rounds,
                                              delta=DELTA)
    assert ledger.epsilon == pytest.approx(fresh, rel=0.01)
    assert ledger.epsilon == pytest.approx(plan.epsilon(DELTA), rel=1e-9)
    assert 0.99 * 2.0 <= ledger.epsilon <= 2.0 * (1 + 1e-9)
    # read back from JSON (what the server's privacy.json holds) it is the same
    assert SiteLedger.from_json(ledger.to_json()).epsilon == pytest.approx(ledger.epsilon, rel=1e-12)
    unsampled = sk.skellam_epsilon(plan.mu, plan.l1, plan.l2, DELTA, 1.0, plan.rounds)
    assert unsampled > 5 * ledger.epsilon


@pytest.mark.parametrize("epsilon, q, rounds", [(1.0, 0.01, 100), (4.0, 0.1, 20), (0.5, 0.02, 10)])
def test_the_calibration_reaches_the_target_and_not_above(epsilon, q, rounds):
    l2 = sk.rounded_l2_bound(3000.0, 500)
    l1 = sk.rounded_l1_bound(l2, 500)
    mu = sk.calibrate_mu(epsilon=epsilon, delta=DELTA, l1=l1, l2=l2, sample_rate=q, steps=rounds)
    assert sk.skellam_epsilon(mu, l1, l2, DELTA, q, rounds) <= epsilon
    assert sk.skellam_epsilon(mu * (1 - 2e-4), l1, l2, DELTA, q, rounds) > epsilon  # the smallest such mu
    # more rounds need more noise; subsampling needs less than sampling everyone
    assert sk.calibrate_mu(epsilon=epsilon, delta=DELTA, l1=l1, l2=l2, sample_rate=q, steps=2 * rounds) > mu
    assert sk.calibrate_mu(epsilon=epsilon, delta=DELTA, l1=l1, l2=l2, sample_rate=1.0, steps=rounds) > mu


def test_the_plan_of_a_rounded_gradient_never_wraps_the_sum_and_twice_its_scale_would():
    """A d-dimensional clipped gradient, Poisson-sampled: at most max_records sampled records
    a site. The worst data sum (every record's whole L2 bound on every coordinate) plus the
    noise of all shares decodes to itself through the modular encoding over 100 draws; at
    twice the planned scale the worst data sum alone leaves the signed range."""
    plan = _plan(bits=30, num_sites=4, threshold=2, max_records=50_000, dim=400, size=400, rounds=30)
    assert plan.fits() and plan.scale >= math.sqrt(plan.dim)
    assert plan.data_bound() + plan.noise_bound() < 2 ** 29
    worst = np.full(plan.size, math.floor(plan.data_bound()), dtype=np.int64)
    rng = np.random.default_rng(7)
    for sign in (1, -1):
        for _ in range(50):
            noisy = sign * worst + sum(sk.skellam_noise((plan.size,), plan.share, rng) for _ in range(plan.num_sites))
            total = sa.encode_signed(noisy, plan.bits)
            assert np.array_equal(sa.decode_signed(total, plan.bits), noisy)
    assert 2 * plan.num_sites * plan.max_records * sk.rounded_l2_bound(2 * plan.scale, plan.dim) >= 2 ** 29
    with pytest.raises(sk.BitsTooSmall, match="raise secure_aggregation.bits to at least"):
        _plan(bits=16, dim=55376, size=55376)


def test_the_quickstart_vae_gradient_fits_62_bits_and_the_parameters_round_trip():
    """The quickstart VAE (55 376 parameters, sqrt(d) ~ 235): 10 sites of <= 200 records at
    62 bits leave room for a scale well above sqrt(d), so rounding adds little to l2."""
    plan = _plan(bits=62, num_sites=10, threshold=6, max_records=200, dim=55376, size=55376, sample_rate=0.16,
                 epsilon=1.0, rounds=20)
    assert plan.scale > 50 * math.sqrt(plan.dim)
    assert plan.l2 < 1.01 * plan.scale
    assert sk.DistributedRelease.from_json(plan.to_json()) == plan
    old = sk.DistributedRelease.from_json(plan.to_json().replace('"rounds": 20', '"x": 0'))
    assert old.rounds == 1  # a release's parameters (no rounds) read as one round


# -- the site's round and the server's decode, through the real SecAgg+ ------------------

import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from fedgen.client.data import SiteData  # noqa: E402
from fedgen.client.secagg import secagg_mod  # noqa: E402
from fedgen.client import training  # noqa: E402
from fedgen.client.training import distributed_sgd_round  # noqa: E402
from fedgen.contract.errors import ScenarioError  # noqa: E402
from fedgen.contract.scenario import scenario_from_dict  # noqa: E402
from fedgen.privacy.dp_fedsgd import private_step_parameters, the_private_step  # noqa: E402
from fedgen.privacy.dp_sgd import poisson_sample  # noqa: E402
from fedgen.server.dpfedsgd import ServerOptimizer  # noqa: E402
from fedgen.server.secagg import SecAggWorkflow  # noqa: E402
from fedgen.shared_models import Batch, build_model  # noqa: E402
from fedgen.simulations.inprocess_engine import InProcessGrid, SimulatedNode, _task_identity  # noqa: E402
from fedgen.contract.scenario import load_scenario  # noqa: E402
from fedgen.server.run import FederatedRun  # noqa: E402
from fedgen.simulations.prepare import write_run_dir  # noqa: E402
from fedgen.simulations.runner import run_simulation_dir  # noqa: E402
from rich.console import Console  # noqa: E402

from .conftest import REPO  # noqa: E402
from .test_simulation_flower import fedgen  # noqa: E402

CLIP = 0.5


def _vae():
    torch.manual_seed(0)
    return build_model("vae", data_shape=(1, 8, 8), num_classes=10, hidden=16, latent_dim=4)


def _site_data(k: int, n: int = 40) -> SiteData:
    g = torch.Generator().manual_seed(100 + k)
    return SiteData(x=torch.rand(n, 1, 8, 8, generator=g), y=torch.randint(0, 10, (n,), generator=g),
                    num_classes=10, source="test")


def _plaintext_clipped_sum(model, data: SiteData, idx, seed: int, chunk: int) -> np.ndarray:
    """The clipped sum by hand: the sample's forward passes, ``chunk`` records at a time (the
    VAE's z drawn as at the site), then one autograd pass per record."""
    step, params = the_private_step(model), private_step_parameters(model)
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    torch.manual_seed(seed)  # the VAE's z draws, chunk after chunk as at the site
    for part in idx.split(chunk):
        losses = step.loss(Batch(x=data.x[part], y=data.y[part], size=len(part)))
        for i in range(len(part)):
            g = torch.cat([gr.reshape(-1).double()
                           for gr in torch.autograd.grad(losses[i], params, retain_graph=True)])
            total += g * min(1.0, CLIP / float(g.norm()))
    return total.numpy()


@pytest.mark.parametrize("chunk", [None, 3])
def test_the_servers_decoded_gradient_is_the_plaintext_clipped_sum_within_the_rounding_bound(monkeypatch, chunk):
    """Three sites run the real DP-FedSGD round (Poisson sample, per-example gradients,
    clipping, conditional rounding, a share of ~zero noise) under the real secagg mod; the
    server unmasks the sum and decodes it: the clipped plaintext sum over the same samples,
    divided by q N, within the rounding's bound (one unit per coordinate and record). With
    ``chunk``, each site takes its sample 3 records at a time (the memory bound on its rows)."""
    model = _vae()
    size = sum(p.numel() for p in private_step_parameters(model))
    if chunk is not None:
        monkeypatch.setattr(training, "GRADIENT_ROWS_VALUES", chunk * size)
    plan = sk.DistributedRelease(scale=2.0 ** 14, dim=size, size=size, mu=1e-9, threshold=2, num_sites=3, bits=62,
                                 max_records=40, sample_rate=0.3, rounds=5)
    datas = [_site_data(k) for k in range(3)]
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        k = int(context.node_config["partition-id"])
        site = _vae()
        torch.manual_seed(1000 + k)  # the VAE's z draws
        ledger = SiteLedger(site=str(k), accountant="rdp", delta=DELTA, target_epsilon=1e30, max_grad_norm=CLIP)
        res = distributed_sgd_round(site, datas[k], plan=sk.DistributedRelease.from_json(
            str(msg.content["config"][sa.DISTRIBUTED])), clip_norm=CLIP, ledger=ledger, server_round=1,
            sampling=torch.Generator().manual_seed(k), device=torch.device("cpu"), run=None)
        assert res.status == "trained" and ledger.history[-1].sample_rate == plan.sample_rate
        return Message(content=RecordDict({"arrays": ArrayRecord({sa.DISTRIBUTED: Array(res.release)}),
                                           "metrics": MetricRecord({"num-examples": len(datas[k])})}),
                       reply_to=msg)

    with _task_identity(11):
        grid = InProcessGrid(SimulatedNode(8000 + i, i, 3, 11, {}, app) for i in range(3))
        wf = SecAggWorkflow(threshold=2, bits=62, clip_norm=1.0)
        arrays = ArrayRecord({"w": Array(np.zeros(3))})
        msgs = [Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                        message_type=MessageType.TRAIN, dst_node_id=node) for node in grid.get_node_ids()]
        rnd, _, replies = wf.collect(grid, 1, msgs, plan)
        ok = [r for r in replies if not r.has_error()]
        assert len(ok) == 3, [r.error.reason for r in replies if r.has_error()]
        total = wf.unmask_sum(grid, rnd, ok, plan.size)
        decoded = wf.gradient_from_sum(rnd, total, ok, clip_norm=CLIP)
    expected_batch = plan.sample_rate * 120
    assert rnd.distributed["expected_batch"] == pytest.approx(expected_batch)
    plain, sampled = np.zeros(size), 0
    for k in range(3):  # the same Poisson samples (the site's generator draws the sample first)
        idx = poisson_sample(40, plan.sample_rate, torch.Generator().manual_seed(k))
        sampled += len(idx)
        plain += _plaintext_clipped_sum(_vae(), datas[k], idx, 1000 + k, chunk or len(idx) or 1)
    plain /= expected_batch
    # per coordinate: each record's rounding moves it by < 1 unit of C / scale
    bound = sampled * CLIP / plan.scale / expected_batch
    err = np.abs(decoded - plain)
    assert err.max() <= bound
    assert np.linalg.norm(plain) > 100 * np.linalg.norm(decoded - plain)  # the signal, far above the error


@pytest.mark.parametrize("family", ["vae", "gan"])
def test_the_server_optimizer_state_round_trips_through_its_checkpoint_tensors(family):
    """Resume: a fresh optimizer loaded with the saved state (a GAN's: the discriminator's
    and the generator's) takes the same next step, the generator's included."""
    a, b = _small(family), _small(family)
    opt_a = ServerOptimizer(a, lr=0.01, batch_size=8)
    size = sum(p.numel() for p in opt_a.params)
    g = np.random.default_rng(0).normal(size=(3, size))
    opt_a.step(g[0], seed=1)
    opt_a.step(g[1], seed=2)
    b.load_state_dict(a.state_dict())
    opt_b = ServerOptimizer(b, lr=0.01, batch_size=8)
    saved = opt_a.state_tensors()
    assert any("/" in k for k in saved) == (family == "gan")
    opt_b.load_state_tensors({k: v.clone() for k, v in saved.items()})
    opt_a.step(g[2], seed=3)
    opt_b.step(g[2], seed=3)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    fresh = _small(family)
    ServerOptimizer(fresh, lr=0.01, batch_size=8).step(g[2], seed=3)  # without the state the step differs
    assert not torch.equal(next(iter(fresh.parameters())), next(iter(a.parameters())))


def test_the_servers_gan_round_steps_the_discriminator_on_the_gradient_then_the_generator_on_no_data():
    """A GAN's DP-FedSGD round at the server: the discriminator takes exactly Adam's step on
    the decoded gradient; the generator step follows (post-processing: the updated
    discriminator, the round's seed) and is the same for the same seed."""
    model, twin = _small("gan"), _small("gan")
    opt = ServerOptimizer(model, lr=0.01, batch_size=8)
    assert [p.data_ptr() for p in opt.params] == [p.data_ptr() for p in model.discriminator.parameters()]
    g = np.random.default_rng(1).normal(size=sum(p.numel() for p in opt.params))
    d_params = list(twin.discriminator.parameters())
    reference = torch.optim.Adam(d_params, lr=model.lr_d, betas=model.betas)
    offset = 0
    for p in d_params:
        p.grad = torch.from_numpy(g[offset:offset + p.numel()]).reshape(p.shape).float()
        offset += p.numel()
    reference.step()
    g_before = [p.detach().clone() for p in model.generator.parameters()]
    opt.step(g, seed=5)
    for pa, pb in zip(model.discriminator.parameters(), d_params):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-7)
    assert all(not torch.equal(a, b) for a, b in zip(model.generator.parameters(), g_before))
    assert all(p.grad is None for p in model.parameters())
    again = _small("gan")
    ServerOptimizer(again, lr=0.01, batch_size=8).step(g, seed=5)
    other = _small("gan")
    ServerOptimizer(other, lr=0.01, batch_size=8).step(g, seed=6)
    for pm, pa, po in zip(model.generator.parameters(), again.generator.parameters(), other.generator.parameters()):
        assert torch.equal(pm, pa)
    assert any(not torch.equal(pm, po) for pm, po in zip(model.generator.parameters(), other.generator.parameters()))


def test_a_round_of_two_private_steps_is_refused_with_the_fix():
    from fedgen.privacy.dp_fedsgd import public_steps

    torch.manual_seed(0)
    gan = build_model("gan", data_shape=(1, 8, 8), num_classes=10, architecture="conv", hidden=8, d_steps_per_g_step=2)
    with pytest.raises(ValueError, match="2 private steps a round.*set d_steps_per_g_step: 1"):
        public_steps(gan)
    assert [s.name for s in public_steps(_small("gan"))] == ["generator"]
    assert public_steps(_vae()) == []


# -- the scenario's checks -----------------------------------------------------------------

_DIST = {"threshold": 3, "noise": "distributed", "bits": 62, "max_records": 400}


@pytest.mark.parametrize("extra, message", [
    ({"model": {"family": "gan", "d_steps_per_g_step": 2}}, "model.d_steps_per_g_step: noise: distributed runs "
     "DP-FedSGD, one private (discriminator) step a round; set model.d_steps_per_g_step: 1 (not 2)"),
    ({"training": {"local_steps": 5}}, "training.local_steps: noise: distributed with vae runs DP-FedSGD, exactly "
     "one private step a round; set training.local_steps: 1 (not 5)"),
    ({"model": {"family": "flow"}, "warm_start": {"release": {"epsilon_fraction": 0.2}}},
     "warm_start.release.family_share: with noise: distributed the release is the generator's embedding alone"),
    ({"privacy": {"enabled": True, "unit": "both"}}, "site-level DP (privacy.unit: both)"),
    ({"privacy": {"enabled": False}}, "noise: distributed needs example-level DP"),
])
def test_dp_fedsgd_scenario_keys_are_checked_with_one_line(extra, message):
    doc = {"federation": {"num_sites": 5, "secure_aggregation": _DIST}, "privacy": {"enabled": True},
           "model": {"family": "vae"}, "training": {"local_steps": 1}, **extra}
    with pytest.raises(ScenarioError) as err:
        scenario_from_dict(doc, source="s.yaml")
    text = str(err.value)
    assert message in text and "\n" not in text


@pytest.mark.parametrize("family", ["vae", "gan", "flow", "diffusion"])
def test_a_one_step_family_is_accepted_with_distributed_noise(family):
    s = scenario_from_dict({"federation": {"num_sites": 5, "secure_aggregation": _DIST}, "model": {"family": family},
                            "training": {"local_steps": 1}, "privacy": {"enabled": True}}, source="s.yaml")
    assert s.federation.secure_aggregation.noise == "distributed"


# -- a whole run: the real ClientApp and ServerApp ----------------------------------------

#: the quickstart VAE (digits, 5 sites of ~287 records) by DP-FedSGD: 3 rounds of one
#: private step, q = 60 / 300, distributed noise under SecAgg+ (threshold 3), seeded
DP_FEDSGD = ["warm_start=null", "training.local_steps=1", "training.batch_size=60", "federation.rounds=3",
             "federation.secure_aggregation.threshold=3", "federation.secure_aggregation.bits=62",
             "federation.secure_aggregation.noise=distributed", "federation.secure_aggregation.max_records=300",
             "evaluation.every=0", "evaluation.num_samples=100", "privacy.seeded_noise=true",
             "simulation.engine=inprocess"]


def _quickstart_rows(out, sets: list[str], *, cwd) -> list[dict]:
    """``fedgen simulate`` of the quickstart with ``sets`` into ``out``: its metrics rows."""
    res = fedgen("simulate", REPO / "scenarios" / "quickstart.yaml", "--out", out,
                 *[a for item in sets for a in ("--set", item)], cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


#: the same federation training the conv GAN: the discriminator's step private, the
#: generator's taken by the server after it (privacy/dp_fedsgd.py)
GAN = ["model.family=gan", "model.hidden=null", "model.latent_dim=32"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["vae", "gan"])
def test_a_dp_fedsgd_run_moves_the_model_charges_the_subsampled_skellam_and_resumes(tmp_path, monkeypatch, family):
    sets = DP_FEDSGD + (GAN if family == "gan" else [])
    ref = tmp_path / "ref"
    rows = _quickstart_rows(ref, sets, cwd=tmp_path)
    assert [r["secure_aggregation"]["released"] for r in rows] == [True] * 3
    noise = rows[-1]["secure_aggregation"]["distributed_noise"]
    assert noise["sample_rate"] == pytest.approx(0.2)
    assert noise["skellam_variance"] == pytest.approx(noise["guaranteed_variance"] * 5 / 3, rel=1e-9)
    # the model moves, and its loss falls
    first, last = (torch.load(ref / "checkpoints" / f"model-round-000{r}.pt") for r in (1, 3))
    if family == "vae":
        assert any(not torch.equal(first[k], last[k]) for k in first)
        assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    else:  # both networks move: the discriminator on the decoded gradient, the generator at the server
        for net in ("discriminator.", "generator."):
            assert all(not torch.equal(first[k], last[k]) for k in first if k.startswith(net)), net
    # every site's epsilon is a fresh recomputation of its ledger (50-digit Zhu & Wang), at most the target
    privacy = json.loads((ref / "privacy.json").read_text())
    assert len(privacy["sites"]) == 5
    for site in privacy["sites"].values():
        spends = [h for h in site["history"] if h["steps"] > 0]
        assert [h["secagg"] for h in site["history"]] == ["pending", "released"] * 3
        assert len({json.dumps(h["skellam"], sort_keys=True) for h in spends}) == 1
        sp, q = spends[0]["skellam"], spends[0]["sample_rate"]
        orders = list(range(2, 65))
        fresh_rdp = np.array([_zhu_wang_thm6(sp["mu"], sp["l1"], sp["l2"], q, a) for a in orders])
        fresh, _ = rdp_analysis.get_privacy_spent(orders=[float(a) for a in orders], rdp=fresh_rdp * 3, delta=DELTA)
        assert site["epsilon"] == pytest.approx(fresh, rel=0.01)
        assert site["epsilon"] <= 10.0 * (1 + 1e-6)
    summary = json.loads((ref / "summary.json").read_text())
    mechanism = summary["guarantees"][0]["mechanism"]
    assert "DP-FedSGD with distributed Skellam noise" in mechanism
    assert ("the generator step, which sees no data, taken by the server" in mechanism) == (family == "gan")

    # the same run, stopped (Ctrl-C) right after round 2's checkpoint, resumed: the same model and ledger
    scenario = load_scenario(REPO / "scenarios" / "quickstart.yaml", sets)
    run_dir = tmp_path / "resumed"
    write_run_dir(scenario, run_dir)
    commit = FederatedRun._checkpoint

    def commit_then_stop(self, next_round: int, wall: float) -> None:
        commit(self, next_round, wall)
        if next_round == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(FederatedRun, "_checkpoint", commit_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_simulation_dir(run_dir, scenario, console=Console(quiet=True))
    monkeypatch.undo()
    assert [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    res = fedgen("simulate", "--resume", run_dir, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = torch.load(run_dir / "checkpoints" / "model-round-0003.pt")
    for k in last:
        assert torch.allclose(resumed[k], last[k], rtol=0, atol=1e-6), k
    again = json.loads((run_dir / "privacy.json").read_text())
    assert again["epsilon"] == pytest.approx(privacy["epsilon"], rel=1e-12)


def test_a_site_refuses_a_sample_rate_outside_0_1():
    from fedgen.client.secagg import _check_distributed

    plan = _plan()
    params = sa.SecAggParams(threshold=plan.threshold, bits=plan.bits, clip_norm=1.0, num_sites=plan.num_sites)
    _check_distributed(plan.to_json(), params)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(sa.SecAggError, match="no valid sample rate"):
            _check_distributed(plan.to_json().replace(f'"sample_rate": {plan.sample_rate}', f'"sample_rate": {bad}'),
                               params)


def test_optimizer_state_of_another_shape_is_refused_at_load_not_in_a_later_step():
    opt = ServerOptimizer(_vae(), lr=0.01, batch_size=8)
    opt.step(np.zeros(sum(p.numel() for p in opt.params)))
    state = opt.state_tensors()
    state["0.exp_avg"] = torch.zeros(3)  # a damaged or foreign checkpoint
    with pytest.raises(ValueError, match="does not fit the model"):
        ServerOptimizer(_vae(), lr=0.01, batch_size=8).load_state_tensors(state)


def test_a_site_refuses_distributed_parameters_with_an_overflowing_count():
    from fedgen.client.secagg import _check_distributed

    params = sa.SecAggParams(threshold=3, bits=62, clip_norm=1.0, num_sites=5)
    text = json.dumps({**json.loads(sk.DistributedRelease(
        scale=4.0, dim=3, size=3, mu=5.0, threshold=3, num_sites=5, bits=62, max_records=10).to_json()),
        "rounds": 1e400})  # JSON's Infinity: int() raises OverflowError, not ValueError
    with pytest.raises(sa.SecAggError, match="malformed distributed-noise parameters"):
        _check_distributed(text, params)


def test_a_later_dp_sgd_run_or_release_counts_the_ledgers_skellam_entries_in_full():
    """A deployed site's ledger outlives runs. After a DP-FedSGD run (Skellam entries at q < 1),
    a local DP-SGD round or a Gaussian release must check its budget against the Skellam
    bound, not the entries' Gaussian-equivalent sigma (which reads 3.4 for an eps of 5 here):
    on main the site trained 200 steps and ended at eps 10.4 against its target 10."""
    from fedgen.privacy.accounting import calibrate_after
    from fedgen.privacy.budget import affordable_dp_sgd_steps, charge_dp_sgd_round, dp_sgd_noise_multiplier
    from fedgen.privacy.release import GaussianRelease

    l2 = sk.rounded_l2_bound(100.0, 1000)
    l1 = sk.rounded_l1_bound(l2, 1000)
    mu = sk.calibrate_mu(epsilon=5.0, delta=DELTA, l1=l1, l2=l2, sample_rate=0.2, steps=20)
    ledger = SiteLedger(site="a", accountant="rdp", delta=DELTA, target_epsilon=10.0, max_grad_norm=1.0)
    for r in range(1, 21):
        sk.charge_distributed(ledger, {"mu": mu, "l1": l1, "l2": l2}, round=r, run="1", sample_rate=0.2)
    assert ledger.epsilon == pytest.approx(5.0, rel=1e-3)
    release = GaussianRelease(noise_multiplier=0.6)  # the Gaussian view: eps 9.36 after it; in full 10.03
    assert not release.affordable(ledger)
    assert GaussianRelease(noise_multiplier=0.7).affordable(ledger)  # 8.92 in full
    # sigma as main calibrated it, from the Gaussian view (1.09: eps 10.4 over 200 steps in full)
    ledger.noise_multiplier = calibrate_after(ledger.accountant_history(), target_epsilon=10.0, delta=DELTA,
                                              sample_rate=0.1, steps=200, accountant="rdp")
    dp_sgd_noise_multiplier(ledger, sample_rate=0.1, planned_steps=200, target_epsilon=10.0, delta=DELTA,
                            accountant="rdp")
    steps = affordable_dp_sgd_steps(ledger, wanted=200)
    charge_dp_sgd_round(ledger, round=1, steps=steps, run="2")
    assert 0 < steps < 200 and 9.5 < ledger.epsilon <= 10.0


def _skellam_history_ledger(accountant: str = "rdp") -> tuple[SiteLedger, dict[str, float]]:
    """A deployed site after a DP-FedSGD run: 20 Skellam rounds at q = 0.2 spending eps 5 of 10."""
    l2 = sk.rounded_l2_bound(100.0, 1000)
    spend = {"mu": 0.0, "l1": sk.rounded_l1_bound(l2, 1000), "l2": l2}
    spend["mu"] = sk.calibrate_mu(epsilon=5.0, delta=DELTA, l1=spend["l1"], l2=l2, sample_rate=0.2, steps=20)
    ledger = SiteLedger(site="a", accountant=accountant, delta=DELTA, target_epsilon=10.0, max_grad_norm=1.0)
    for r in range(1, 21):
        sk.charge_distributed(ledger, spend, round=r, run="1", sample_rate=0.2)
    return ledger, spend


def test_dp_sgd_sigma_after_a_skellam_history_reaches_the_target_by_a_fresh_recomputation():
    """The sigma a site calibrates for 200 DP-SGD steps after 20 DP-FedSGD rounds: a fresh
    recomputation of the true history (50-digit Zhu & Wang for the Skellam rounds, Opacus'
    subsampled Gaussian for the steps, orders 2..64) puts it at the target, not above, and
    1.5 % less noise above it; the site then affords all 200 steps. On main sigma came from
    the Skellam entries' Gaussian-equivalent sigma: 1.09, eps 10.4 in full, and the site
    stopped short of its planned steps."""
    from fedgen.privacy.budget import affordable_dp_sgd_steps, dp_sgd_noise_multiplier

    ledger, spend = _skellam_history_ledger()
    sigma = dp_sgd_noise_multiplier(ledger, sample_rate=0.1, planned_steps=200, target_epsilon=10.0, delta=DELTA,
                                    accountant="rdp")
    orders = list(range(2, 65))
    skellam = 20 * np.array([_zhu_wang_thm6(spend["mu"], spend["l1"], spend["l2"], 0.2, a) for a in orders])

    def fresh(s: float) -> float:
        gauss = rdp_analysis.compute_rdp(q=0.1, noise_multiplier=s, steps=200, orders=[float(a) for a in orders])
        return rdp_analysis.get_privacy_spent(orders=[float(a) for a in orders], rdp=skellam + gauss, delta=DELTA)[0]

    assert fresh(sigma) <= 10.0 * (1 + 1e-3)
    assert fresh(sigma / 1.015) > 10.0
    assert affordable_dp_sgd_steps(ledger, wanted=200) == 200


def test_a_bit_width_too_small_for_the_gradient_is_one_line_before_any_run_directory(tmp_path):
    """The plan needs the model's parameter count, so the scenario alone cannot check it:
    the run's preparation builds the round-1 model and plans before it writes anything."""
    from fedgen.simulations.prepare import prepare_run

    overrides = ["federation.secure_aggregation.threshold=3", "federation.secure_aggregation.noise=distributed",
                 "federation.secure_aggregation.bits=24", "training.local_steps=1", "warm_start=null"]
    with pytest.raises(ScenarioError, match=r"^federation.secure_aggregation.bits: 24 bits cannot hold .* at least \d+$"):
        prepare_run(REPO / "scenarios" / "quickstart.yaml", tmp_path / "runs", overrides)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# -- per-record gradients: Opacus' per-sample hooks against one backward pass a record ------

from fedgen.privacy.dp_fedsgd import LOOP, VECTORISED, gradient_method, per_record_gradients  # noqa: E402


def _small(family: str):
    torch.manual_seed(0)
    if family == "vae":
        return build_model("vae", data_shape=(1, 8, 8), num_classes=10, hidden=16, latent_dim=4)
    if family == "flow":
        return build_model("flow", data_shape=(1, 8, 8), num_classes=10, architecture="conv", hidden=8)
    if family in ("gan", "gan-mlp"):  # conv: D runs twice per record (real, fake); mlp: once, on the pair
        return build_model("gan", data_shape=(1, 8, 8), num_classes=10, architecture=family[4:] or "conv", hidden=8)
    return build_model("diffusion", data_shape=(1, 8, 8), num_classes=10, hidden=8, noise_multiplicity=2)


@pytest.mark.parametrize("family", ["vae", "gan", "gan-mlp", "flow", "diffusion"])
def test_vectorised_per_record_gradients_equal_the_loops_rows_and_round_to_the_same_sum(family):
    """The same sample, the same seed: Opacus' per-sample gradients (one backward pass) equal
    one backward pass a record, row by row (float64, rtol 1e-5), and leave the model's .grad
    alone; rounded with the same generator, the integer sums agree (identical where the
    rows are bit-identical, else within a unit on a handful of the coordinates)."""
    model = _small(family)
    assert gradient_method(model) == VECTORISED
    data = _site_data(0, n=12)
    batch = Batch(x=data.x, y=data.y, size=12)
    out = {}
    for method in (LOOP, VECTORISED):
        torch.manual_seed(7)  # the family's own draws (z; t and noise): the same for both
        out[method] = per_record_gradients(model, batch, method)
    (loop, loop_losses), (vec, vec_losses) = out[LOOP], out[VECTORISED]
    assert loop.dtype == vec.dtype == torch.float64
    assert vec.shape == (12, sum(p.numel() for p in private_step_parameters(model)))
    assert torch.equal(loop_losses, vec_losses)
    assert float(loop.norm(dim=1).min()) > 0
    torch.testing.assert_close(vec, loop, rtol=1e-5, atol=1e-5 * float(loop.abs().max()))
    assert all(p.grad is None for p in model.parameters())  # the site's model is untouched
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    plan = sk.DistributedRelease(scale=2.0 ** 10, dim=vec.shape[1], size=vec.shape[1], mu=1.0, threshold=2,
                                 num_sites=3, bits=62, max_records=40)
    sums = [sk.round_records(rows / CLIP, plan, torch.Generator().manual_seed(3)).sum(0) for rows in (loop, vec)]
    if torch.equal(loop, vec):
        assert torch.equal(sums[0], sums[1])
    differ = (sums[0] - sums[1]).abs()
    assert float(differ.max()) <= 1 and int((differ > 0).sum()) <= 1e-3 * vec.numel()


def test_a_private_step_with_a_layer_opacus_cannot_sample_takes_the_loop():
    """A layer without an Opacus grad sampler (here a bare scale parameter) is not left to a
    guess: the site takes one backward pass a record, and its rows are each record's own."""

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([2.0, -1.0]))

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scaled, self.lin = Scaled(), torch.nn.Linear(2, 1)

        def steps(self):
            from fedgen.shared_models import TrainingStep

            return [TrainingStep(name="l", module=self, loss=lambda b: self.lin(b.x * self.scaled.w).squeeze(1) ** 2,
                                 private=True)]

    model = Tiny()
    assert gradient_method(model) == LOOP
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    rows, losses = per_record_gradients(model, Batch(x=x, y=None, size=2), LOOP)
    for i in range(2):
        model.zero_grad()
        (model.lin(x[i:i + 1] * model.scaled.w).squeeze() ** 2).backward()
        expected = torch.cat([p.grad.reshape(-1).double() for p in model.parameters()])
        torch.testing.assert_close(rows[i], expected)


def _plain_conditional_round(rows: torch.Tensor, bound: float, generator: torch.Generator) -> torch.Tensor:
    """Conditional randomized rounding written plainly (Kairouz et al. 2021, §4.1): round
    up iff u < frac, every row not yet within ``bound`` drawn again, in row order."""
    low = torch.floor(rows)
    out, todo = torch.empty_like(rows), torch.arange(len(rows))
    while len(todo):
        cand = low[todo] + (torch.rand(rows[todo].shape, generator=generator, dtype=torch.float64)
                            < rows[todo] - low[todo])
        ok = cand.norm(dim=1) <= bound
        out[todo[ok]] = cand[ok]
        todo = todo[~ok]
    return out


@pytest.mark.parametrize("bound_slack", [0.0, 1e9])
def test_the_in_place_conditional_rounding_is_the_plain_one_draw_for_draw(bound_slack):
    """The same generator, the same integers as the plain formula, also when rows are drawn
    again (a bound at the rows' own norm rejects many of the first draws)."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(40, 300, generator=g, dtype=torch.float64)
    rows *= 200 / rows.norm(dim=1, keepdim=True)  # every row at norm 200
    bound = 200 + bound_slack
    first = torch.floor(rows) + (torch.rand(rows.shape, generator=torch.Generator().manual_seed(5),
                                            dtype=torch.float64) < rows - torch.floor(rows))
    assert bound_slack > 0 or 5 < int((first.norm(dim=1) > bound).sum()) < 35  # rows are drawn again
    fast = sk.conditional_round(rows, bound, torch.Generator().manual_seed(5))
    assert torch.equal(fast, _plain_conditional_round(rows, bound, torch.Generator().manual_seed(5)))
    assert float(fast.norm(dim=1).max()) <= bound and torch.all(fast == torch.round(fast))
    assert float((fast - rows).abs().max()) < 1
