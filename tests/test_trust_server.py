"""The server trusts nothing it loads or receives (issue 17, findings 4, 5, 6, 9a, 10):
checkpoints load with ``weights_only=True``, every reply is validated before use (a bad
one fails its site only), site ids are checked and bound to their node, paths built
from site ids stay inside the run directory, a torn metrics line does not break resume."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedgen.contract.scenario import FederationConfig
from fedgen.privacy.ledger import SiteLedger
from fedgen.contract import rundir
from fedgen.server.run import FederatedRun
from fedgen.server.strategies import build_strategy
from fedgen.server.updates import DEFAULT_MAX_SITE_EXAMPLES, ReplyError, check_site_id, site_releases, sort_replies
from fedgen.simulations import cli
from fedgen.simulations.hooks import hooks_for

from .conftest import REPO
from .test_updates import GLOBAL, _rec, _reply, _update

MARKER = "pwned.txt"
FED = FederationConfig(**{"fraction_fit": 1.0, "min_fit_sites": 1, "proximal_mu": 0.0, "server_lr": 0.01, "trim_fraction": 0.2,
       "byzantine_sites": 2, "krum_select": 3})


class Payload:
    """A pickle that creates a file when it is unpickled: loading it runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _evil_checkpoint(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": Payload(path.parent / MARKER), "state": Payload(path.parent / MARKER)}, path)
    return path


@pytest.fixture(scope="module")
def run_template(tmp_path_factory) -> Path:
    """A simulation run directory as `fedgen simulate` writes it (quickstart, FedAdam, seeded noise)."""
    from fedgen.simulations.prepare import write_run_dir
    from fedgen.contract.scenario import load_scenario

    scenario = load_scenario(REPO / "scenarios" / "quickstart.yaml",
                             ["federation.strategy=fedadam", "privacy.seeded_noise=true"])  # noise state resumes
    return write_run_dir(scenario, tmp_path_factory.mktemp("runs") / "quick")


def _simulated_run(run_dir: Path) -> FederatedRun:
    """The server's run over a simulation run directory, composed as ``server/app.py`` does."""
    return FederatedRun(None, run_dir, hooks=hooks_for(run_dir))


@pytest.fixture
def run_dir(run_template, tmp_path) -> Path:
    return Path(shutil.copytree(run_template, tmp_path / "run"))


@pytest.fixture
def fedgen(capsys):
    """``fedgen ARGS`` in-process -> (exit code, non-empty stderr lines)."""
    def run(*args):
        code = cli.main([str(a) for a in args])
        return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]

    return run


# -- finding 4: loading a checkpoint runs no code ------------------------------------------

def _assert_one_line_refusal(code: int, err: list[str], path: Path) -> None:
    assert code == 2 and len(err) == 1, err
    assert "not a fedgen checkpoint or written by an older fedgen" in err[0] and str(path) in err[0]


def test_finding4_malicious_checkpoint_runs_no_code_in_audit(fedgen, tmp_path):
    x = np.random.default_rng(0).random((40, 8, 8)).astype(np.float32)
    for name in ("s", "t", "h"):
        np.savez(tmp_path / f"{name}.npz", x=x, y=np.arange(40) % 10)
    evil = _evil_checkpoint(tmp_path / "evil" / "evil.pt")
    code, err = fedgen("audit", "--samples", tmp_path / "s.npz", "--train", tmp_path / "t.npz",
                       "--holdout", tmp_path / "h.npz", "--model", evil, "--out", tmp_path / "out")
    assert not (evil.parent / MARKER).exists()
    _assert_one_line_refusal(code, err, evil)


def test_finding4_malicious_checkpoint_runs_no_code_in_sample(fedgen, run_dir, tmp_path):
    evil = _evil_checkpoint(run_dir / rundir.CHECKPOINTS / "latest.pt")
    code, err = fedgen("sample", run_dir, "-n", "4", "--out", tmp_path / "x.npz")
    assert not (evil.parent / MARKER).exists() and not (tmp_path / "x.npz").exists()
    _assert_one_line_refusal(code, err, evil)


def test_finding4_malicious_checkpoint_runs_no_code_on_resume(run_dir):
    evil = _evil_checkpoint(run_dir / rundir.CHECKPOINTS / "latest.pt")
    try:
        _simulated_run(run_dir)
        error = None
    except Exception as err:  # noqa: BLE001 -- which one is asserted below, after the marker
        error = err
    assert not (evil.parent / MARKER).exists()
    assert isinstance(error, rundir.CheckpointError)
    assert "\n" not in str(error) and str(evil) in str(error) and "older fedgen" in str(error)


def test_finding4_checkpoint_holds_only_tensors_and_json_and_resumes(run_dir):
    run = _simulated_run(run_dir)
    run.strategy.m_t = {k: np.full(v.shape, 0.5, dtype=np.float32) for k, v in run.model.state_dict().items()}
    run.strategy.v_t = {k: np.full(v.shape, 0.25, dtype=np.float32) for k, v in run.model.state_dict().items()}
    run.exhausted = {"3"}
    random.random()
    run.noise_rng.standard_normal(5)
    py_state, np_state = random.getstate(), run.noise_rng.bit_generator.state
    run._checkpoint(next_round=3, wall=12.5)

    raw = torch.load(run_dir / rundir.CHECKPOINTS / "latest.pt", weights_only=True)  # no pickled objects
    assert raw["format"] == rundir.CHECKPOINT_FORMAT and json.loads(raw["state"])["next_round"] == 3

    random.seed(123)
    resumed = _simulated_run(run_dir)
    assert (resumed.start_round, resumed.wall_before, resumed.exhausted) == (3, 12.5, {"3"})
    assert random.getstate() == py_state and resumed.noise_rng.bit_generator.state == np_state
    assert type(resumed.strategy).__name__ == "FedAdam"
    for key, value in run.strategy.m_t.items():
        np.testing.assert_array_equal(resumed.strategy.m_t[key], value)
        np.testing.assert_array_equal(resumed.strategy.v_t[key], run.strategy.v_t[key])
    for key, value in run.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value)


# -- finding 5: site-reported counts are bounded ---------------------------------------------

def _honest_round(count: int = 10) -> list:
    return [_reply(str(i), 10 + i, _update(0.1, i), num_examples=count) for i in range(3)]


@pytest.mark.parametrize("claim", [1e9, float("nan"), float("inf"), 10.5, 0])
def test_finding5_an_inflated_or_non_finite_count_is_rejected_for_its_site(claim):
    attacker = _update(5.0, 99)
    replies = [*_honest_round(), _reply("3", 13, attacker, num_examples=claim)]
    bounds = {str(i): 100 for i in range(4)}  # simulation: partition sizes
    out = sort_replies(replies, _rec(GLOBAL), sent_to=[10, 11, 12, 13], site_examples=bounds, outlier_factor=None)
    assert [m.metadata.src_node_id for m in out.ok] == [10, 11, 12]
    assert "num-examples" in dict(out.failed)["3"]
    arrays, _ = build_strategy("fedavg", FED).aggregate_train(1, out.ok)
    honest_mean = np.mean([_update(0.1, i)["w"] for i in range(3)], axis=0)
    np.testing.assert_allclose(arrays["w"].numpy(), honest_mean, rtol=1e-5)  # not the attacker's value
    assert site_releases(out.ok, 1, "w")[2] == 30


def test_finding5_deployment_bounds_counts_by_a_default():
    replies = [*_honest_round(), _reply("big", 13, _update(0.1, 3), num_examples=DEFAULT_MAX_SITE_EXAMPLES + 1)]
    out = sort_replies(replies, _rec(GLOBAL), sent_to=[10, 11, 12, 13])
    assert len(out.ok) == 3 and "big" in dict(out.failed)


def test_finding5_simulation_bounds_each_site_by_its_partition(run_dir):
    from fedgen.contract.rundir import read_canaries

    run = _simulated_run(run_dir)
    with np.load(run_dir / rundir.PARTITIONS) as z:
        sizes = {str(i): len(z[f"site_{i}"]) for i in range(5)}
    canaries = read_canaries(str(run_dir))
    assert canaries is None and run.site_examples == sizes


# -- finding 6: one malformed reply fails only its own site ------------------------------------

def _ledger(site: str, rounds: int = 1, **entry) -> str:
    led = SiteLedger(site=site, accountant="rdp", delta=1e-5, target_epsilon=10.0, max_grad_norm=1.0)
    for rnd in range(1, rounds + 1):
        led.record_round(round=rnd, steps=3, noise_multiplier=1.0, sample_rate=0.1)
    d = led.to_dict()
    d["history"][-1].update(entry)
    return json.dumps(d)


def _lying_payload() -> ArrayRecord:
    """``w`` declared float32 (3, 2) but its payload holds 4 float32 values."""
    rec = _rec(_update(0.1, 7))
    bytes_of = _rec({"w": np.zeros((2, 2), dtype=np.float32)})["w"].data
    rec["w"] = Array(dtype="float32", shape=(3, 2), stype="numpy.ndarray", data=bytes_of)
    return rec


def _malformed(case: str):
    bad = _reply("bad", 19, _update(0.1, 9))
    metrics = bad.content.metric_records["metrics"]
    site = bad.content.config_records["site"]
    if case == "ledger not json":
        site["ledger"] = "{not json"
    elif case == "ledger zero noise":
        site["ledger"] = _ledger("bad", noise_multiplier=0.0)
    elif case == "ledger negative steps":
        site["ledger"] = _ledger("bad", steps=-1)
    elif case == "ledger sample rate above 1":
        site["ledger"] = _ledger("bad", sample_rate=1.5)
    elif case == "ledger of another site":
        site["ledger"] = _ledger("0")
    elif case == "ledger shorter than on record":
        site["ledger"] = _ledger("bad", rounds=1)
    elif case == "negative count":
        metrics["num-examples"] = -5
    elif case == "extra metric key":
        metrics["gradient-norm"] = 1.0
    elif case == "unknown status":
        metrics["status"] = 7
    elif case == "payload disagrees with shape":
        bad.content["arrays"] = _lying_payload()
    return bad


MALFORMED = ["ledger not json", "ledger zero noise", "ledger negative steps", "ledger sample rate above 1",
             "ledger of another site", "ledger shorter than on record", "negative count", "extra metric key",
             "unknown status", "payload disagrees with shape"]


@pytest.mark.parametrize("case", MALFORMED)
def test_finding6_a_malformed_reply_fails_only_its_site(case, caplog):
    recorded = {"bad": SiteLedger.from_json(_ledger("bad", rounds=2))}
    with caplog.at_level(logging.WARNING, logger="fedgen.server.updates"):
        out = sort_replies([*_honest_round(), _malformed(case)], _rec(GLOBAL), sent_to=[10, 11, 12, 19],
                           recorded_ledgers=recorded)
    assert [m.metadata.src_node_id for m in out.ok] == [10, 11, 12]
    assert [site for site, _ in out.failed] == ["bad"]
    assert "rejected reply from bad (node 19)" in caplog.text
    assert all(led.site != "bad" for led in out.ledgers)  # a rejected ledger is never recorded


def test_finding6_payload_check_names_the_array():
    out = sort_replies([_malformed("payload disagrees with shape")], _rec(GLOBAL), sent_to=[19])
    assert out.failed == [("bad", "w: payload holds float32 (2, 2), declared float32 (3, 2)")]


def test_finding6_a_shorter_ledger_never_aborts_the_run(run_dir, caplog):
    run = _simulated_run(run_dir)
    run._update_site_ledger(SiteLedger.from_json(_ledger("0", rounds=2)))
    with caplog.at_level(logging.WARNING, logger="fedgen.server.run"):
        run._update_site_ledger(SiteLedger.from_json(_ledger("0", rounds=1)))
    assert len(run.ledger.sites["0"].history) == 2 and "not recorded" in caplog.text


# -- finding 9a: site ids are checked and bound to their node ---------------------------------

@pytest.mark.parametrize("site", ["../../outside/x", "", ".hidden", "a..b", "a/b", "x" * 65, "é"])
def test_finding9a_a_bad_site_id_is_rejected(site):
    with pytest.raises(ReplyError, match="is not allowed"):
        check_site_id(site)
    out = sort_replies([*_honest_round(), _reply(site, 19, _update(0.1, 9))], _rec(GLOBAL), sent_to=[10, 11, 12, 19])
    assert len(out.ok) == 3 and out.failed[0][0] == "node 19" and "is not allowed" in out.failed[0][1]
    assert 19 not in out.site_of


def test_finding9a_a_site_id_is_bound_to_the_first_node_that_used_it():
    known = {10: "0", 11: "1", 12: "2"}
    other_id = _reply("5", 10, _update(0.1, 4))  # node 10 was site 0
    stolen_id = _reply("1", 20, _update(0.1, 5))  # site 1 is node 11's
    out = sort_replies([*_honest_round()[1:], other_id, stolen_id], _rec(GLOBAL), sent_to=[10, 11, 12, 20],
                       known_sites=known)
    assert [m.metadata.src_node_id for m in out.ok] == [11, 12]
    assert ("0", "node 10 is bound to site id 0, but claimed 5") in out.failed
    assert ("node 20", "site id 1 is already bound to node 11") in out.failed
    twice = sort_replies([_reply("7", 30, _update(0.1, 0)), _reply("7", 31, _update(0.1, 1))], _rec(GLOBAL),
                         sent_to=[30, 31])  # two new nodes, one id, in one round
    assert len(twice.ok) == 1 and twice.failed == [("node 31", "site id 7 is already bound to node 30")]


def test_finding9a_simulation_accepts_only_the_runs_partition_ids():
    out = sort_replies([_reply("9", 10, _update(0.1, 0))], _rec(GLOBAL), sent_to=[10],
                       site_examples={"0": 10, "1": 10})
    assert out.failed == [("node 10", "site id 9 is not one of this run's sites")]


def test_finding9a_resume_never_writes_a_ledger_outside_the_run_dir(run_dir):
    run = _simulated_run(run_dir)
    run._checkpoint(next_round=2, wall=1.0)
    ckpt = rundir.read_checkpoint(run._ckpt)
    ckpt["state"]["ledger"]["sites"]["../../outside/x"] = json.loads(_ledger("0"))
    rundir.write_checkpoint(run._ckpt, model=ckpt["model"], state=ckpt["state"], strategy=ckpt["strategy"],
                            scenario=ckpt["scenario"])
    with pytest.raises(rundir.CheckpointError, match="is not allowed"):
        _simulated_run(run_dir)
    assert not (run_dir.parent / "outside").exists()


def test_finding9a_a_site_ledger_file_cannot_claim_another_site(run_dir, caplog):
    run = _simulated_run(run_dir)
    (run_dir / "sites" / "0").mkdir(parents=True, exist_ok=True)
    (run_dir / "sites" / "0" / "ledger.json").write_text(_ledger("../../outside/x"))
    (run_dir / "sites" / "1").mkdir(parents=True, exist_ok=True)
    (run_dir / "sites" / "1" / "ledger.json").write_text(_ledger("1"))
    with caplog.at_level(logging.WARNING, logger="fedgen.simulations.hooks"):
        run._fold_unreported_ledgers()
    assert set(run.ledger.sites) == {"1"} and "ignored" in caplog.text


# -- finding 10: a torn metrics line ----------------------------------------------------------

def test_finding10_a_torn_last_metrics_line_is_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / rundir.METRICS
    path.write_text('{"round": 1}\n{"round": 2}\n{"round": 3, "clients_')
    with caplog.at_level(logging.WARNING, logger="fedgen.contract.rundir"):
        assert rundir.read_metrics(tmp_path) == [{"round": 1}, {"round": 2}]
    assert "torn last line 3" in caplog.text
    path.write_text('{"round": 1}\n{"rou\n{"round": 3}\n')  # damage before the end is not a torn append
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON row"):
        rundir.read_metrics(tmp_path)


def test_finding10_resume_survives_a_torn_metrics_line(run_dir):
    run = _simulated_run(run_dir)
    run._checkpoint(next_round=2, wall=1.0)
    (run_dir / rundir.METRICS).write_text('{"round": 1}\n{"round": 2, "train_lo')
    resumed = _simulated_run(run_dir)
    assert resumed.start_round == 2 and rundir.read_metrics(run_dir) == [{"round": 1}]
