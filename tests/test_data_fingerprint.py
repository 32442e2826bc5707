"""A deployed site's state-dir is bound to the data its ledger covers (issue 23, item 6):
the first round writes ``data_fingerprint.json``; other data under the same state-dir is
refused before anything is trained or charged; the same data under a new (sibling)
state-dir trains with a warning that a fresh budget starts. Through the real ClientApp
(``client.app.train``), as a SuperNode runs it; simulation is untouched.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from fedgen.client.data import load_data
from fedgen.client.data_binding import FINGERPRINT_FILE, DataBindingError, bind_site_data, bind_state_dir
from fedgen.contract.task import TaskConfig

TASK = {"model": {"family": "vae", "hidden": 16, "latent_dim": 2}, "data_shape": [1, 8, 8], "num_classes": None,
        "training": {"local_steps": 1, "batch_size": 16, "lr": 1e-3},
        "privacy": {"enabled": True, "target_epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0,
                    "accountant": "rdp", "grad_sample_mode": "auto", "planned_rounds": 2},
        "seed": 0, "device": "cpu"}


def _round(data: Path, state: Path, server_round: int = 1) -> Message:
    from fedgen.client.app import train

    config = ConfigRecord({"fedgen": json.dumps(TASK), "server-round": server_round, "run-dir": ""})
    meta = Metadata(run_id=42, message_id=f"m{server_round}", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                    group_id=str(server_round), created_at=time.time(), ttl=600.0, message_type=MessageType.TRAIN)
    arrays = ArrayRecord(TaskConfig.from_dict(TASK).build_model().state_dict())
    msg = Message(content=RecordDict({"arrays": arrays, "config": config}), metadata=meta)
    node_config = {"data-path": str(data), "state-dir": str(state), "site-id": "a"}
    return train(msg, Context(run_id=42, node_id=7, node_config=node_config, state=RecordDict(), run_config={}))


@pytest.fixture
def files(tmp_path):
    digits = load_data("digits")
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(a, x=digits.x[:300].numpy())
    np.savez(b, x=digits.x[300:600].numpy())
    return a, b


def test_first_round_writes_the_fingerprint_and_the_same_data_trains_again(tmp_path, files):
    a, _ = files
    state = tmp_path / "sites" / "a"
    assert not _round(a, state).has_error()
    fp = json.loads((state / FINGERPRINT_FILE).read_text())
    assert fp["rows"] == 300 and fp["shape"] == [1, 8, 8] and fp["path"] == str(a) and len(fp["sha256"]) == 64
    assert not _round(a, state, server_round=2).has_error()
    assert len(json.loads((state / "ledger.json").read_text())["history"]) == 2


def test_other_data_under_the_same_state_dir_is_refused_before_training(tmp_path, files, caplog):
    a, b = files
    state = tmp_path / "sites" / "a"
    assert not _round(a, state).has_error()
    ledger_before = (state / "ledger.json").read_text()
    reply = _round(b, state, server_round=2)
    assert reply.has_error() and "DataBindingError" in reply.error.reason
    assert (state / "ledger.json").read_text() == ledger_before  # nothing trained, nothing charged
    with pytest.raises(DataBindingError) as err:
        bind_state_dir(state, load_data("npz", b), path=str(b))
    line = str(err.value)
    assert "\n" not in line and "new state-dir" in line and str(b) in line and "other values" in line


def test_the_same_data_under_a_sibling_state_dir_is_warned(tmp_path, files, caplog):
    a, b = files
    assert not _round(a, tmp_path / "sites" / "a").has_error()
    with caplog.at_level(logging.WARNING, logger="fedgen.client.data_binding"):
        assert not _round(b, tmp_path / "sites" / "other-data").has_error()
        assert not caplog.records  # other data in a new state-dir: nothing to warn about
        assert not _round(a, tmp_path / "sites" / "a-again").has_error()
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "fresh privacy budget" in warned[0] and str(tmp_path / "sites" / "a") in warned[0]
    assert (tmp_path / "sites" / "a-again" / FINGERPRINT_FILE).exists()


def test_simulated_sites_are_not_bound(tmp_path, files):
    data = load_data("npz", files[0])
    assert bind_site_data({"partition-id": 0, "num-partitions": 2}, data) is None
    assert bind_site_data({"data-path": str(files[0])}, data) is None  # no state-dir: refused elsewhere
