"""Robust aggregation around Flower's strategies, norm bounding, and simulated attacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedgen.contract.scenario import FederationConfig
from fedgen.simulations.faults import attack_update
from fedgen.contract.scenario import byzantine_sites
from fedgen.server.aggregation import bound_update_norms, robust_report
from fedgen.server.strategies import build_strategy, list_strategies
from fedgen.server.updates import update_norm

from .test_updates import GLOBAL, _rec, _reply

FED = FederationConfig(**{"fraction_fit": 1.0, "min_fit_sites": 1, "proximal_mu": 0.0, "server_lr": 0.01, "trim_fraction": 0.2,
       "byzantine_sites": 2, "krum_select": 3})


def _round(seed: int = 0, attackers: tuple[int, ...] = (0, 1)):
    """Ten replies: honest updates near +0.1, attackers sign-flipped x10."""
    rng = np.random.default_rng(seed)
    replies = []
    for site in range(10):
        upd = {k: (v + 0.1 + 0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in GLOBAL.items()}
        if site in attackers:
            upd = {k: (GLOBAL[k] - 10 * (u - GLOBAL[k])).astype(np.float32) for k, u in upd.items()}
        replies.append(_reply(str(site), 100 + site, upd))
    return replies


def test_every_robust_strategy_is_registered():
    assert {"fedmedian", "fedtrimmedavg", "krum", "multikrum"} <= set(list_strategies())
    with pytest.raises(ValueError, match="registered: .*fedmedian"):
        build_strategy("median", FED)


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum"])
def test_robust_strategies_ignore_two_sign_flipping_sites(name):
    replies = _round()
    report = robust_report(name, FED, replies)
    arrays, _ = build_strategy(name, FED).aggregate_train(1, replies)
    w = arrays.to_torch_state_dict()
    for key, value in w.items():  # honest mean: +0.1 per coordinate; FedAvg: (8*0.1 - 2*1.0)/10
        assert np.allclose(value.numpy(), GLOBAL[key] + 0.1, atol=0.03), name
    if name in ("krum", "multikrum"):
        assert {"0", "1"} <= set(report["excluded"])
        assert len(report["excluded"]) == (9 if name == "krum" else 7)
    else:
        shares = report["tail_share"]
        assert shares["0"] == 1.0 and shares["1"] == 1.0
        assert max(shares[str(s)] for s in range(2, 10)) < 0.8


def test_plain_fedavg_is_pulled_by_the_attackers():
    arrays, _ = build_strategy("fedavg", FED).aggregate_train(1, _round())
    assert float(arrays.to_torch_state_dict()["b"].mean()) == pytest.approx(-0.12, abs=0.01)


def test_norm_bounding_moves_far_updates_onto_the_ball():
    replies = _round()
    global_arrays = _rec(GLOBAL)
    before = [update_norm(next(iter(m.content.array_records.values())), global_arrays) for m in replies]
    bounded = bound_update_norms(replies, global_arrays, bound=1.0)
    after = [update_norm(next(iter(m.content.array_records.values())), global_arrays) for m in replies]
    assert bounded == ["0", "1"]
    assert after[0] == pytest.approx(1.0, rel=1e-5) and after[1] == pytest.approx(1.0, rel=1e-5)
    assert after[2:] == pytest.approx(before[2:])


def test_attacks_transform_the_update_as_documented():
    w0 = {"w": torch.zeros(3), "n": torch.tensor(4)}
    w = {"w": torch.tensor([1.0, -2.0, 0.5]), "n": torch.tensor(7)}
    flipped = attack_update("sign_flip", w, w0, 10.0, seed=0)
    assert torch.equal(flipped["w"], torch.tensor([-10.0, 20.0, -5.0])) and flipped["n"] == 7
    assert torch.equal(attack_update("scale", w, w0, 3.0, seed=0)["w"], torch.tensor([3.0, -6.0, 1.5]))
    noisy = attack_update("gaussian", {"w": torch.zeros(10_000)}, {"w": torch.zeros(10_000)}, 2.0, seed=1)["w"]
    assert float(noisy.std()) == pytest.approx(2.0, rel=0.05)
    with pytest.raises(ValueError, match="known: gaussian, scale, sign_flip"):
        attack_update("flip", w, w0, 1.0, seed=0)


def test_byzantine_sites_are_seeded():
    sites = byzantine_sites(10, 0.2, seed=3)
    assert len(sites) == 2 and sites == byzantine_sites(10, 0.2, seed=3)
    assert all(0 <= int(s) < 10 for s in sites)
    assert len(byzantine_sites(10, 0.04, seed=3)) == 0


def test_dropped_out_sites_are_left_out_and_the_rest_weighted_by_examples():
    from fedgen.server.updates import sort_replies

    replies = []
    for site, (examples, value) in enumerate([(10, 1.0), (30, 2.0), (60, 4.0)]):
        upd = {k: (v + value).astype(np.float32) for k, v in GLOBAL.items()}
        msg = _reply(str(site), 200 + site, upd)
        msg.content.metric_records["metrics"]["num-examples"] = examples
        replies.append(msg)
    away = _reply("3", 203, None, status=2)  # a site that dropped out this round
    out = sort_replies(replies + [away], _rec(GLOBAL), sent_to=[200, 201, 202, 203])
    assert out.unavailable == ["3"] and len(out.ok) == 3
    arrays, _ = build_strategy("fedavg", FED).aggregate_train(1, out.ok)
    expected = (10 * 1.0 + 30 * 2.0 + 60 * 4.0) / 100
    for value in arrays.to_torch_state_dict().values():
        assert torch.allclose(value, torch.full_like(value, expected))
