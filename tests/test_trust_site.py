"""The site is sovereign (issue #17): each test is named after the finding it closes and
fails on the code before the fix.

- finding 1: the server, which knows the scenario seed, cannot regenerate a site's DP noise;
- finding 2: the site's node-config policy beats the server's task;
- finding 7: two runs sharing a state-dir serialise on the ledger (no lost spend, no overspend);
- finding 8: error replies carry no data values;
- finding 10: an empty scenario, delta >= 1/n, a decompression bomb, an oversized CSV.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from fedgen.client.data import SiteData
from fedgen.client.errors import DataError
from fedgen.client.policy import PolicyRefusal, SitePolicy
from fedgen.client.task import round_seed
from fedgen.contract.task import ReplyStatus, TaskConfig
from fedgen.client.training import new_site_ledger, run_local_round
from fedgen.contract.task import PrivacyConfig, TrainingConfig
from fedgen.shared_models import build_model

TRAINING = TrainingConfig(local_steps=2, batch_size=32, lr=1e-3)
PRIVACY = PrivacyConfig(enabled=True, target_epsilon=10.0, delta=1e-5, max_grad_norm=1.0, planned_rounds=2)


def _site(digits, n: int = 200) -> SiteData:
    return digits.subset(np.arange(n), source="digits [test site]")


def _mmd(digits):
    torch.manual_seed(0)
    return build_model("mmd", data_shape=digits.shape, num_classes=10, architecture="mlp", num_features=200,
                       hidden=16, fit_steps=1)


# -- finding 1: DP randomness is secret -------------------------------------------------------------

def _released_sum(model, data: SiteData) -> torch.Tensor:
    return getattr(model, model.release_buffer).detach().double() * len(data)


def test_finding1_server_cannot_subtract_a_release_s_noise(digits):
    """The attack of the report: regenerate the release's noise from what the server knows
    (the scenario seed, the site id, the round) and subtract it. Before the fix it recovered
    the private class sums to ~1e-6; now the residual is the full noise."""
    data = _site(digits)
    model = _mmd(digits)
    ledger = new_site_ledger("0", PRIVACY)
    seed = round_seed(0, "0", 1)
    run_local_round(model, data, training=TRAINING, privacy=PRIVACY, ledger=ledger, server_round=1, seed=seed)
    sigma = ledger.history[0].noise_multiplier
    clean = model.statistic_sum(data.x, data.y).double()
    guessed = sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed)).double()
    residual = (_released_sum(model, data) - guessed - clean).norm()
    expected_noise = sigma * clean.numel() ** 0.5
    assert residual > 0.9 * expected_noise * 2 ** 0.5 * 0.9  # two independent noises: sqrt(2) sigma sqrt(d)
    noise = _released_sum(model, data) - clean
    assert float(noise.std()) == pytest.approx(sigma, rel=0.1)  # the noise is still there, at its scale


def test_finding1_dp_sgd_noise_differs_between_identical_rounds(digits):
    """Same weights, data, seed and round: under secret noise two rounds give different models
    (the noise is fresh OS entropy); with the simulation opt-in they are identical."""

    def one_round(privacy: PrivacyConfig) -> torch.Tensor:
        torch.manual_seed(0)
        model = build_model("vae", data_shape=digits.shape, num_classes=10, hidden=32, latent_dim=4)
        run_local_round(model, _site(digits), training=TRAINING, privacy=privacy,
                        ledger=new_site_ledger("0", privacy), server_round=1, seed=123)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert not torch.equal(one_round(PRIVACY), one_round(PRIVACY))
    seeded = replace(PRIVACY, seeded_noise=True)
    assert torch.equal(one_round(seeded), one_round(seeded))


def test_finding1_seeded_noise_is_refused_in_a_deployed_scenario():
    from fedgen.simulations.errors import ScenarioError
    from fedgen.contract.scenario import scenario_from_dict

    with pytest.raises(ScenarioError, match="privacy.seeded_noise"):
        scenario_from_dict({"privacy": {"seeded_noise": True}, "deployment": {"data_shape": [1, 8, 8]}})


# -- finding 2: the site's policy is the law --------------------------------------------------------

DEPLOYED = {"data-path": "/data/site.npz", "state-dir": "/var/lib/fedgen"}


@pytest.mark.parametrize("request_, reason", [
    (replace(PRIVACY, enabled=False), "requires example-level DP"),
    (replace(PRIVACY, delta=0.5), "exceeds the site's max-delta"),
    (replace(PRIVACY, seeded_noise=True), "OS entropy"),
])
def test_finding2_deployed_site_refuses_a_request_for_less_privacy(request_, reason):
    with pytest.raises(PolicyRefusal, match=reason):
        SitePolicy.from_node_config(DEPLOYED).apply(request_, num_examples=1000)


def test_finding2_site_policy_caps_and_fixes_what_it_declares():
    policy = SitePolicy.from_node_config({**DEPLOYED, "max-epsilon": "4", "accountant": "prv", "max-delta": "1e-6"})
    applied = policy.apply(replace(PRIVACY, delta=1e-7), num_examples=1000)
    assert (applied.target_epsilon, applied.accountant, applied.delta) == (4.0, "prv", 1e-7)
    assert policy.apply(replace(PRIVACY, target_epsilon=2.0, delta=1e-7), num_examples=10**6).target_epsilon == 2.0
    with pytest.raises(PolicyRefusal, match="max-delta"):
        policy.apply(PRIVACY, num_examples=1000)  # 1e-5 > the site's 1e-6
    with pytest.raises(PolicyRefusal, match="not below 1/n"):
        SitePolicy.from_node_config(DEPLOYED).apply(PRIVACY, num_examples=10**5)
    # a site that opts out of DP itself may train without it
    assert not SitePolicy.from_node_config({**DEPLOYED, "require-dp": "false"}).apply(
        replace(PRIVACY, enabled=False), num_examples=10).enabled
    for key, value in (("max-delta", "2"), ("require-dp", "maybe"), ("accountant", "gdp"), ("max-epsilon", "-1")):
        with pytest.raises(DataError, match=f"--node-config {key}="):
            SitePolicy.from_node_config({**DEPLOYED, key: value})


def _task_message(task: dict, arrays: ArrayRecord, server_round: int = 1, run_dir: str = "") -> Message:
    config = ConfigRecord({"fedgen": json.dumps(task), "server-round": server_round, "run-dir": run_dir})
    meta = Metadata(run_id=42, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=600.0, message_type=MessageType.TRAIN)
    return Message(content=RecordDict({"arrays": arrays, "config": config}), metadata=meta)  # as a SuperNode gets it


def _deployed_task(**privacy) -> dict:
    return {"model": {"family": "vae", "hidden": 16, "latent_dim": 2}, "data_shape": [1, 8, 8], "num_classes": None,
            "training": {"local_steps": 1, "batch_size": 16, "lr": 1e-3},
            "privacy": {"enabled": True, "target_epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0,
                        "accountant": "rdp", "grad_sample_mode": "auto", "planned_rounds": 1, **privacy},
            "seed": 0, "device": "cpu"}


def _deployed_site(tmp_path: Path, digits, **node) -> Context:
    data = tmp_path / "site.npz"
    np.savez(data, x=digits.x[:300].numpy())
    node_config = {"data-path": str(data), "state-dir": str(tmp_path / "state"), "site-id": "a", **node}
    return Context(run_id=42, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _global_arrays(task: dict) -> ArrayRecord:
    return ArrayRecord(TaskConfig.from_dict(task).build_model().state_dict())


@pytest.mark.parametrize("privacy", [{"enabled": False}, {"delta": 0.5}, {"seeded_noise": True}])
def test_finding2_the_server_cannot_turn_a_deployed_site_s_dp_off(tmp_path, digits, privacy):
    """Through the ClientApp: the task asks for DP off / delta 0.5 / seeded noise; the site
    refuses with a reason the server sees, trains nothing and writes no spend."""
    from fedgen.client.app import train

    task = _deployed_task(**privacy)
    reply = train(_task_message(task, _global_arrays(task)), _deployed_site(tmp_path, digits))
    assert not reply.has_error()
    assert int(reply.content["metrics"]["status"]) == ReplyStatus.POLICY_REFUSED
    assert "arrays" not in reply.content
    assert "policy" in str(reply.content["site"]["message"]) or "max-delta" in str(reply.content["site"]["message"])
    assert not (tmp_path / "state" / "ledger.json").exists()


# -- finding 7: the ledger is locked for the whole round ---------------------------------------------

def test_finding7_overlapping_runs_on_one_state_dir_lose_no_spend(tmp_path, digits, monkeypatch):
    """Two runs' rounds at one site overlap (two threads: the same code path as two
    ClientApp processes, flock locks per open file). The slower round must see the faster
    one's spend: both spends end up in ledger.json and the total stays within the target."""
    import fedgen.client.task as task_module
    from fedgen.client.app import train

    real_train_site = task_module.train_site

    def slow_train_site(*args, **kwargs):  # widen the race window: read ... long training ... write
        time.sleep(0.5)
        return real_train_site(*args, **kwargs)

    monkeypatch.setattr("fedgen.client.app.train_site", slow_train_site)
    task = _deployed_task(target_epsilon=3.0, planned_rounds=2)  # sigma affords both runs' rounds
    task["training"]["local_steps"] = 3
    replies: dict[int, Message] = {}

    contexts = {run_id: _deployed_site(tmp_path, digits) for run_id in (111, 222)}  # the data file, once

    def run(run_id: int) -> None:
        context = contexts[run_id]
        context.run_id = run_id
        replies[run_id] = train(_task_message(task, _global_arrays(task)), context)

    threads = [threading.Thread(target=run, args=(r,)) for r in contexts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(int(r.content["metrics"]["status"]) in (ReplyStatus.TRAINED, ReplyStatus.BUDGET_EXHAUSTED)
               for r in replies.values())
    ledger = json.loads((tmp_path / "state" / "ledger.json").read_text())
    trained = [r for r in replies.values() if int(r.content["metrics"]["status"]) == ReplyStatus.TRAINED]
    assert sorted(h["run"] for h in ledger["history"]) == sorted(
        str(k) for k, r in replies.items() if int(r.content["metrics"]["status"]) == ReplyStatus.TRAINED)
    assert len(ledger["history"]) == len(trained) == 2  # both spends kept (the race lost one)
    assert ledger["epsilon"] <= 3.0 + 1e-9


def test_finding7_ledger_writes_fsync_the_directory(tmp_path, monkeypatch):
    import os

    from fedgen.privacy.ledger import atomic_write_text

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    atomic_write_text(tmp_path / "ledger.json", "{}")
    assert len(synced) == 2  # the file, then its directory (the rename)


# -- finding 8: errors sent to the server carry no data values --------------------------------------

def test_finding8_error_reply_names_the_kind_not_the_values(tmp_path, digits):
    from fedgen.client.app import train

    bad = tmp_path / "site.csv"
    bad.write_text("age,name\n42,John Smith\n")
    task = _deployed_task()
    task["data_shape"] = [2]
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                      node_config={"data-path": str(bad), "state-dir": str(tmp_path / "state"), "site-id": "a"})
    reply = train(_task_message(task, _global_arrays(task)), context)
    assert reply.has_error()
    assert "DataError" in reply.error.reason and "John" not in reply.error.reason and "42" not in reply.error.reason


# -- finding 10: also ---------------------------------------------------------------------------------

def test_finding10_an_empty_scenario_file_is_refused(tmp_path):
    from fedgen.simulations.errors import ScenarioError
    from fedgen.contract.scenario import load_scenario

    for text in ("", "# only a comment\n", "{}\n"):
        (tmp_path / "empty.yaml").write_text(text)
        with pytest.raises(ScenarioError, match="the scenario is empty"):
            load_scenario(tmp_path / "empty.yaml")


def test_finding10_delta_of_0_99_is_refused_by_validate(tmp_path):
    from fedgen.simulations.errors import ScenarioError
    from fedgen.simulations.prepare import check_scenario
    from fedgen.contract.scenario import scenario_from_dict

    with pytest.raises(ScenarioError, match=r"privacy.delta: 0.99 is not below 1/n"):
        check_scenario(scenario_from_dict({"privacy": {"delta": 0.99}}))


def test_finding10_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    from PIL import Image

    from fedgen.client.data import read_image_folder

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("L", (8, 8)).save(folder / "ok.png")
    bomb = folder / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # a few KiB of file, 400 M pixels claimed
    assert bomb.stat().st_size < 2**20
    with pytest.raises(DataError, match="bomb.png: .*(over the limit|decompression bomb)"):
        read_image_folder(folder)


def test_finding10_an_oversized_csv_is_refused_with_a_line(tmp_path, monkeypatch):
    import fedgen.client.data as data_module
    monkeypatch.setattr(data_module, "MAX_CSV_BYTES", 64)
    big = tmp_path / "big.csv"
    big.write_text("a,b\n" + "0.5,0.5\n" * 20)
    with pytest.raises(DataError, match="big.csv: .* over the CSV reader's .* limit; store .* as .npz"):
        data_module.read_csv(big)
