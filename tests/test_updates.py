"""Server-side update validation on hand-made replies: NaN, wrong shape, wrong dtype and
an outlier norm are rejected (logged with the node and site), and the round continues."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from fedgen.privacy.ledger import SiteLedger
from fedgen.server.updates import norm_outliers, site_releases, sort_replies, update_norm

def _rec(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})


GLOBAL = {"w": np.zeros((3, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}


def _reply(site: str, node: int, arrays: dict[str, np.ndarray] | None, status: int = 0, *, num_examples: int = 10,
           ledger: str = "") -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": num_examples, "status": status, "train-loss": 1.0}),
                          "site": ConfigRecord({"id": site, "ledger": ledger, "message": ""})})
    if arrays is not None:
        content["arrays"] = _rec(arrays)
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    return Message(content=content, metadata=meta)  # a reply as the SuperLink delivers it


def _update(scale: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in GLOBAL.items()}


@pytest.fixture
def global_arrays() -> ArrayRecord:
    return _rec(GLOBAL)


def test_node_id_is_set_on_hand_made_replies():
    assert _reply("a", 123, None).metadata.src_node_id == 123


def test_bad_replies_are_rejected_and_the_round_continues(global_arrays, caplog):
    nan = _update(0.1, 9)
    nan["w"][0, 0] = np.nan
    wrong_shape = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
    wrong_dtype = {"w": np.zeros((3, 2), dtype=np.float64), "b": np.zeros(2, dtype=np.float32)}
    replies = [_reply("good0", 10, _update(0.1, 0)), _reply("good1", 11, _update(0.1, 1)),
               _reply("good2", 12, _update(0.1, 2)), _reply("outlier", 13, _update(50.0, 3)),
               _reply("nan", 14, nan), _reply("shape", 15, wrong_shape), _reply("dtype", 16, wrong_dtype),
               _reply("spent", 17, None, status=1)]
    with caplog.at_level(logging.WARNING, logger="fedgen.server.updates"):
        out = sort_replies(replies, global_arrays, sent_to=list(range(10, 19)), known_sites={18: "silent"})
    assert [m.metadata.src_node_id for m in out.ok] == [10, 11, 12]
    reasons = dict(out.failed[:-1])
    assert "NaN/Inf" in reasons["nan"]
    assert "shape (2, 3) != (3, 2)" in reasons["shape"]
    assert "dtype float64 != float32" in reasons["dtype"]
    assert "more than 10x the round's median" in reasons["outlier"]
    assert out.failed[-1] == ("silent", "no reply before the round timeout") and out.late == ["silent"]
    assert out.refused == ["spent"]
    log = caplog.text
    assert "outlier (node 13)" in log and "nan (node 14)" in log and "shape (node 15)" in log


def test_norm_check_needs_three_replies(global_arrays):
    two = [_reply("a", 1, _update(0.1, 0)), _reply("b", 2, _update(50.0, 1))]
    assert len(sort_replies(two, global_arrays, sent_to=[1, 2]).ok) == 2  # no reference to compare against


def test_unavailable_and_error_replies_are_named_by_site(global_arrays):
    away = _reply("away", 3, None, status=2)
    away.content.config_records["site"]["message"] = "dropped out (simulated fault)"
    out = sort_replies([away, _reply("ok", 5, _update(0.1, 0))], global_arrays, sent_to=[3, 4, 5],
                       known_sites={4: "four"})
    assert out.unavailable == ["away"] and ("away", "dropped out (simulated fault)") in out.failed
    assert out.late == ["four"] and [m.metadata.src_node_id for m in out.ok] == [5]


def test_norm_helpers(global_arrays):
    upd = _rec({"w": np.full((3, 2), 1.0, dtype=np.float32), "b": np.full(2, 1.0, dtype=np.float32)})
    assert update_norm(upd, global_arrays) == pytest.approx(np.sqrt(8))
    assert norm_outliers([1.0, 1.2, 0.9, 30.0]) == [3]
    assert norm_outliers([1.0, 1.2, 9.0]) == []  # under 10x the median
    assert norm_outliers([0.0, 0.0, 0.0]) == []
    assert norm_outliers([1.0, 50.0]) == []


def test_an_error_written_by_the_superlink_is_blamed_on_the_node_that_was_asked(global_arrays):
    from flwr.app import Error

    dead = Message(Error(code=0, reason="Node Unavailable"), reply_to=_reply("x", 7, None))
    dead.metadata.__dict__["_src_node_id"] = 1  # the SuperLink writes this reply itself
    dead.metadata.__dict__["_reply_to_message_id"] = "sent-to-7"
    out = sort_replies([dead, _reply("ok", 8, _update(0.1, 0))], global_arrays, sent_to=[7, 8],
                       known_sites={7: "seven"}, destinations={"sent-to-7": 7, "sent-to-8": 8})
    assert out.errors == ["seven"] and out.late == []
    assert out.failed == [("seven", "error reply: Node Unavailable")]


def test_site_releases_reads_each_sites_sum_and_the_sigma_its_ledger_recorded_for_the_round():
    def ledger(site: str, sigmas: dict[int, float]) -> str:
        led = SiteLedger(site=site, accountant="rdp", delta=1e-5, target_epsilon=100.0, max_grad_norm=1.0)
        for rnd, sigma in sigmas.items():
            led.record_round(round=rnd, steps=1, noise_multiplier=sigma, sample_rate=1.0)
        return led.to_json()

    means = [_update(1.0, seed) for seed in range(3)]
    replies = [_reply("a", 1, means[0], num_examples=100, ledger=ledger("a", {1: 2.0})),
               _reply("b", 2, means[1], num_examples=300, ledger=ledger("b", {1: 3.0, 2: 50.0})),
               _reply("c", 3, means[2], num_examples=100)]  # no DP: counts, adds no noise
    sums, sigmas, total = site_releases(replies, 1, "w")
    assert total == 500
    assert sigmas.tolist() == [2.0, 3.0, 0.0]
    np.testing.assert_allclose(sums.numpy(), np.stack([m["w"] * n for m, n in zip(means, (100, 300, 100))]), rtol=1e-6)
    assert site_releases(replies, 2, "w")[1].tolist() == [0.0, 50.0, 0.0]  # the round's own spend




def test_finding2_a_policy_refusal_reaches_the_server_with_its_reason():
    """A site that refuses the task under its own policy (issue #17, finding 2) is a failure
    of that site with the site's reason; the other sites' updates still count."""
    from fedgen.contract.task import ReplyStatus

    refusal = _reply("hospital", 3, None, status=ReplyStatus.POLICY_REFUSED, num_examples=0)
    refusal.content["site"]["message"] = "the task's delta 0.5 exceeds the site's max-delta 1e-05"
    out = sort_replies([refusal, _reply("ok", 4, _update(0.1, 0))], _rec(GLOBAL), sent_to=[3, 4])
    assert [m.content["site"]["id"] for m in out.ok] == ["ok"]
    assert out.failed == [("hospital", "refused by the site's policy: the task's delta 0.5 exceeds the site's "
                                       "max-delta 1e-05")]
