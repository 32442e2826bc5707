"""``fedgen audit`` (issue 6): both modes, one-line errors with nothing written, canaries
planted exactly as recorded, and the issue's acceptance on digits -- a memorising run is
caught, the same run under DP at epsilon = 1 is not, and the canary bound never exceeds
the accountant's epsilon.

No Flower: run directories are built with :func:`simulations.prepare.write_run_dir` and
trained at their one site with the client's own code (``client.site.load_site_data``,
``client.task.train_site``), then checkpointed the way ``server/run.py`` does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from fedgen.client.site import load_site_data
from fedgen.contract.rundir import read_canaries
from fedgen.client.task import train_site
from fedgen.privacy.audit import plan_canaries
from fedgen.privacy.ledger import PrivacyLedger
from fedgen.contract import rundir
from fedgen.contract.task import build_global_model, task_from_scenario
from fedgen.simulations import cli
from fedgen.simulations.errors import ScenarioError
from fedgen.simulations.prepare import write_run_dir
from fedgen.simulations.sampling import sample_run
from fedgen.contract.scenario import scenario_from_dict

AUDIT_KEYS = {"schema", "inputs", "settings", "spaces", "white_box", "canaries", "claimed_epsilon",
              "accounting_violation", "verdicts", "source"}


@pytest.fixture(autouse=True, scope="module")
def _feature_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDGEN_CACHE", str(tmp_path_factory.mktemp("fedgen-cache")))
    yield
    mp.undo()


@pytest.fixture
def fedgen(monkeypatch, capsys):
    """``fedgen ARGS`` in-process -> (exit code, stdout, non-empty stderr lines)."""
    def run(*args):
        code = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, [line for line in err.splitlines() if line.strip()]

    return run


def _scenario(name: str, *, n_train: int, dp: bool, steps: int, canaries: dict | None = None,
              num_sites: int = 1, epsilon: float = 1.0):
    return scenario_from_dict({
        "name": name, "seed": 0,
        "data": {"format": "digits", "holdout_fraction": 1 - n_train / 1797},
        "federation": {"num_sites": num_sites, "rounds": 1},
        "model": {"family": "vae", "hidden": 256, "latent_dim": 16},
        "training": {"local_steps": steps, "batch_size": 32, "lr": 2e-3},
        "privacy": {"enabled": dp, "target_epsilon": epsilon, "delta": 1e-5, "canaries": canaries},
    })


def _site_data(run_dir: Path, site: int):
    ctx = Context(run_id=0, node_id=site, node_config={"partition-id": site, "num-partitions": 1},
                  state=RecordDict(), run_config={})
    return load_site_data(ctx, conditional=True, run_dir=str(run_dir))


def make_run(root: Path, name: str, *, n_train: int = 100, dp: bool = False, steps: int = 50,
             canaries: dict | None = None, train: bool = True) -> Path:
    """A run directory whose one site trained one round of ``steps`` iterations; a
    checkpoint as ``server/run.py`` writes it and, under DP, the ledger in privacy.json."""
    scenario = _scenario(name, n_train=n_train, dp=dp, steps=steps, canaries=canaries)
    run_dir = write_run_dir(scenario, root / name)
    if not train:
        return run_dir
    spec = rundir.DataSpec.read(run_dir)
    task = task_from_scenario(scenario, spec)
    initial = build_global_model(scenario, spec).state_dict()
    model, result, ledger = train_site(task, _site_data(run_dir, 0), initial, site="0", server_round=1,
                                       ledger=None)
    assert result.status == "trained"
    (run_dir / rundir.CHECKPOINTS).mkdir()
    torch.save({"model": model.state_dict(), "scenario": scenario.resolved()},
               run_dir / rundir.CHECKPOINTS / "latest.pt")
    if dp:
        privacy = PrivacyLedger(accountant="rdp", delta=1e-5, target_epsilon=scenario.privacy.target_epsilon)
        privacy.update_site(ledger)
        privacy.write(run_dir / rundir.PRIVACY)
    return run_dir


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs"), "small", steps=40,
                    canaries={"count": 20, "site": 0, "seed": 3})


def _read(out: Path) -> dict:
    return json.loads((out / "audit.json").read_text())


# -- the two modes -------------------------------------------------------------------------

def test_run_dir_mode_writes_json_and_html(fedgen, small_run, tmp_path):
    out = tmp_path / "report"
    code, stdout, err = fedgen("audit", small_run, "-n", 300, "--out", out)
    assert code == 0, err
    audit = _read(out)
    assert AUDIT_KEYS <= set(audit)
    assert set(audit["spaces"]) == {"data", "features"}
    for space in audit["spaces"].values():
        assert {"gan_leaks", "gan_leaks_calibrated", "domias"} == set(space["membership"])
        assert {"dcr", "near_copies", "closest_pairs"} <= set(space["memorization"])
    assert list(audit["white_box"]) == ["white_box/elbo loss"]
    assert audit["canaries"]["m"] == 20 and audit["claimed_epsilon"] is None  # no DP in this run
    assert audit["source"]["canaries"]["n_included"] == int(read_canaries(str(small_run)).included.sum())
    assert audit["inputs"]["synthetic"]["shape"] == [300, 1, 8, 8]
    n_train = sum(len(v) for k, v in np.load(small_run / rundir.PARTITIONS).items() if k.startswith("site_"))
    assert audit["inputs"]["train"]["shape"][0] == n_train  # canaries are not members
    html = (out / "audit.html").read_text()
    assert "Closest (synthetic, training) pairs" in html and "<img" in html
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert 3 <= len(lines) <= 5 and lines[0].startswith("memorisation:") and "wrote" in lines[-1]
    assert not list(out.glob(".*.tmp"))


def test_run_dir_mode_default_out(fedgen, small_run):
    shutil.rmtree(small_run / "audit", ignore_errors=True)
    code, _, err = fedgen("audit", small_run, "-n", 100)
    assert code == 0, err
    assert (small_run / "audit" / "audit.json").exists() and (small_run / "audit" / "audit.html").exists()


def _npz(path: Path, x, y=None) -> Path:
    np.savez(path, x=np.asarray(x), **({} if y is None else {"y": np.asarray(y)}))
    return path


@pytest.fixture(scope="module")
def site_files(small_run, tmp_path_factory) -> dict[str, Path]:
    """A site's view: its training data, held-out records and the global model's samples."""
    folder = tmp_path_factory.mktemp("site")
    train = _site_data(small_run, 0)
    reference = rundir.read_reference(small_run)
    samples = sample_run(small_run, n=200, out=folder / "samples.npz")  # what `fedgen sample` writes
    return {"samples": samples, "train": _npz(folder / "train.npz", train.x.numpy(), train.y.numpy()),
            "holdout": _npz(folder / "holdout.npz", *reference),
            "model": small_run / rundir.CHECKPOINTS / "latest.pt"}


@pytest.mark.parametrize("with_model", [True, False])
def test_samples_mode(fedgen, site_files, tmp_path, with_model):
    args = ["--samples", site_files["samples"], "--train", site_files["train"],
            "--holdout", site_files["holdout"], "--out", tmp_path / "a"]
    code, stdout, err = fedgen("audit", *args, *(["--model", site_files["model"]] if with_model else []))
    assert code == 0, err
    audit = _read(tmp_path / "a")
    assert AUDIT_KEYS <= set(audit) and audit["canaries"] is None
    assert bool(audit["white_box"]) == with_model
    assert audit["source"]["mode"] == "files"
    assert "membership inference" in stdout


# -- errors: one line, exit != 0, nothing written ---------------------------------------------

def _error_cases(site_files: dict[str, Path], small_run: Path, tmp: Path) -> dict[str, tuple[list, str]]:
    samples, train, holdout = (str(site_files[k]) for k in ("samples", "train", "holdout"))
    rng = np.random.default_rng(0)
    wrong_shape = _npz(tmp / "wrong.npz", rng.random((300, 1, 7, 7)).astype(np.float32))
    few = _npz(tmp / "few.npz", np.load(holdout)["x"][:60], np.load(holdout)["y"][:60])
    garbage = tmp / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    (tmp / "empty").mkdir()
    untrained = make_run(tmp, "untrained", train=False)
    files = ["--samples", samples, "--train", train]
    return {
        "mismatched shapes": ([*files, "--holdout", wrong_shape], "shape"),
        "too few held-out": ([*files, "--holdout", few], "at least 100"),
        "unreadable checkpoint": ([*files, "--holdout", holdout, "--model", garbage], "unreadable checkpoint"),
        "not a run dir": ([tmp / "empty"], "not a fedgen run directory"),
        "run dir without checkpoint": ([untrained], "no checkpoint"),
        "missing file": ([*files, "--holdout", tmp / "absent.npz"], "absent.npz"),
        "both modes": ([small_run, "--samples", samples], "either RUN_DIR or --samples"),
    }


CASES = ["mismatched shapes", "too few held-out", "unreadable checkpoint", "not a run dir",
         "run dir without checkpoint", "missing file", "both modes"]


@pytest.mark.parametrize("case", CASES)
def test_errors_are_one_line_and_write_nothing(fedgen, site_files, small_run, tmp_path, case):
    args, message = _error_cases(site_files, small_run, tmp_path)[case]
    out = tmp_path / "out"
    code, stdout, err = fedgen("audit", *args, "--out", out)
    assert code != 0
    assert len(err) == 1 and err[0].startswith("fedgen: error:"), err
    assert message in err[0], err[0]
    assert not out.exists()


# -- canaries --------------------------------------------------------------------------------

def test_canaries_recorded_and_in_the_site_data_exactly_when_included(tmp_path):
    canaries = {"count": 12, "site": 1, "seed": 7}
    scenario = _scenario("canaries", n_train=400, dp=True, steps=1, canaries=canaries, num_sites=2)
    run_dir = write_run_dir(scenario, tmp_path / "run")
    recorded = read_canaries(str(run_dir))
    assert recorded.site == 1 and recorded.seed == 7 and recorded.x.shape == (12, 1, 8, 8)
    np.testing.assert_array_equal(recorded.included, plan_canaries(12, 7).included)
    assert 0 < recorded.included.sum() < 12  # the seed gives a mix, so both branches are tested
    assert set(np.unique(recorded.x)) <= {0.0, 1.0} and recorded.y.shape == (12,)
    with np.load(run_dir / rundir.PARTITIONS) as z:
        parts = {i: z[f"site_{i}"] for i in (0, 1)}
    for site in (0, 1):
        data = _site_data(run_dir, site)
        n_part = len(parts[site])
        if site == 0:
            assert len(data) == n_part  # not the canary site: untouched
            continue
        assert len(data) == n_part + recorded.included.sum()
        np.testing.assert_array_equal(data.x[n_part:].numpy(), recorded.x[recorded.included])
        np.testing.assert_array_equal(data.y[n_part:].numpy(), recorded.y[recorded.included])
        excluded = torch.from_numpy(recorded.x[~recorded.included]).flatten(1)
        assert torch.cdist(excluded, data.x.flatten(1)).min() > 0  # no excluded canary trains


@pytest.mark.parametrize("canaries, message", [
    ({"count": 10, "site": 5}, "privacy.canaries.site"),
    ({"count": 10, "sites": 0}, "privacy.canaries.sites: unknown key"),
    ({"count": 1}, "privacy.canaries.count"),
])
def test_bad_canary_options(tmp_path, canaries, message):
    with pytest.raises(ScenarioError, match=message.replace(".", r"\.")):
        write_run_dir(_scenario("bad", n_train=400, dp=False, steps=1, canaries=canaries, num_sites=2),
                      tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_no_canaries_by_default(tmp_path):
    run_dir = write_run_dir(_scenario("plain", n_train=400, dp=False, steps=1), tmp_path / "run")
    assert read_canaries(str(run_dir)) is None
    assert rundir.read_scenario(run_dir).privacy.canaries is None


# -- acceptance (issue 6) ----------------------------------------------------------------------

MEMORISING = dict(n_train=50, steps=800, canaries={"count": 40, "site": 0, "seed": 1})


def _aucs(audit: dict) -> dict[str, float]:
    out = {f"{space}/{name}": m["auc"]["value"] for space, r in audit["spaces"].items()
           for name, m in r["membership"].items()}
    return out | {name: m["auc"]["value"] for name, m in audit["white_box"].items()}


def test_memorising_run_is_caught(fedgen, tmp_path):
    """Non-DP, 50 training digits, ~500 epochs: the generator copies its training set."""
    run_dir = make_run(tmp_path, "memorise", dp=False, **MEMORISING)
    code, _, err = fedgen("audit", run_dir, "-n", 1000)
    assert code == 0, err
    audit = _read(run_dir / "audit")
    aucs = _aucs(audit)
    assert max(aucs.values()) >= 0.8, aucs
    share = audit["spaces"]["data"]["memorization"]["dcr"]["share_closer_to_train"]["value"]
    assert share >= 0.7 and audit["spaces"]["data"]["memorization"]["dcr"]["p_value"]["value"] < 1e-6
    assert audit["canaries"]["epsilon_lower_bound"]["value"] > 0  # canaries are memorised too


def test_same_run_under_dp_is_not(fedgen, tmp_path):
    """The same setup at epsilon = 1: no attack beats AUC 0.6, and the canary bound stays
    below the accountant's epsilon (no accounting violation)."""
    run_dir = make_run(tmp_path, "dp", dp=True, **MEMORISING)
    code, _, err = fedgen("audit", run_dir, "-n", 1000)
    assert code == 0, err
    audit = _read(run_dir / "audit")
    aucs = _aucs(audit)
    assert max(aucs.values()) <= 0.6, aucs
    claimed = audit["claimed_epsilon"]
    assert 0.9 <= claimed <= 1.0
    assert audit["canaries"]["epsilon_lower_bound"]["value"] <= claimed
    assert not audit["accounting_violation"]


def test_a_release_family_is_audited_black_box_only(digits):
    """mmd has no per-example training loss: auditing with its model runs the black-box
    tests and records no white-box statistic, instead of failing on a missing ``steps()``."""
    from fedgen.shared_models import build_model
    from fedgen.simulations.audit_cli import AuditInputs, audit_inputs

    torch.manual_seed(0)
    model = build_model("mmd", data_shape=digits.shape, num_classes=10, architecture="mlp", num_features=200,
                        hidden=16, fit_steps=1)
    train, holdout = digits.subset(np.arange(0, 600)), digits.subset(np.arange(600, 1400))
    synthetic = model.sample(200, torch.arange(200) % 10).detach().numpy()
    result = audit_inputs(AuditInputs(synthetic=synthetic, train=train, holdout=holdout, model=model),
                          features=False)
    assert result["source"]["white_box_statistic"] is None
    assert result["verdicts"] and not any("white-box" in json.dumps(v) for v in result["verdicts"])
