"""The white-box audit reads what the server received (issue #22): in a white-box audit run
the server keeps the audited site's update of every round (``RUN_DIR/white_box_received/``),
in a normal run it keeps nothing, and ``fedgen audit RUN_DIR`` uses the server's copy.
Runs go through the whole federation (ServerApp and ClientApp on the in-process engine)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from rich.console import Console

from fedgen.contract.scenario import scenario_from_dict
from fedgen.privacy.audit import dirac
from fedgen.simulations.prepare import write_run_dir
from fedgen.simulations.runner import run_simulation_dir

from .test_audit_cli import _feature_cache, fedgen  # noqa: F401 -- fixtures


def simulate(root: Path, name: str, *, white_box: bool, secagg: bool = False) -> Path:
    scenario = scenario_from_dict({
        "name": name, "seed": 0, "data": {"format": "digits", "holdout_fraction": 0.5},
        "federation": {"num_sites": 2, "rounds": 2,
                       "secure_aggregation": {"threshold": 2} if secagg else None},
        "model": {"family": "vae", "hidden": 32, "latent_dim": 4},
        "training": {"local_steps": 10, "batch_size": 20, "lr": 1e-2},
        "privacy": {"enabled": True, "target_epsilon": 1.0, "delta": 1e-5, "grad_sample_mode": "ghost",
                    "white_box": {"canaries": 2000, "site": 0} if white_box else None},
        "evaluation": {"every": 0, "num_samples": 10},
        "simulation": {"engine": "inprocess"},
    })
    run_dir = write_run_dir(scenario, root / name)
    summary = run_simulation_dir(run_dir, scenario, console=Console(file=io.StringIO()))
    assert summary["rounds_completed"] == 2
    return run_dir


def test_server_keeps_the_received_updates_of_a_white_box_run_only(fedgen, tmp_path):
    normal = simulate(tmp_path, "normal", white_box=False)
    assert not (normal / dirac.RECEIVED_DIR).exists()
    assert not list(normal.rglob("round_*.npz")) and not list(normal.rglob(dirac.FILE_NAME))

    run_dir = simulate(tmp_path, "wb", white_box=True)
    received, shapes = dirac.read_updates(run_dir / dirac.RECEIVED_DIR / "0")
    sent, sent_shapes = dirac.read_updates(run_dir / "sites" / "0")
    assert len(received) == len(sent) == 2 and shapes == sent_shapes
    for r, s in zip(received, sent):  # the server's copy is exactly what the site sent
        np.testing.assert_allclose(r, s, rtol=0, atol=1e-6)
    assert not (run_dir / dirac.RECEIVED_DIR / "1").exists()  # only the audited site

    code, out, err = fedgen("audit", run_dir, "-n", 200, "--check-seeds", 0)
    assert code == 0, err
    wb = json.loads((run_dir / "audit" / "audit.json").read_text())["white_box_canaries"]
    assert wb["updates_read_from"].startswith("server") and wb["rounds_read"] == 2 and wb["m"] == 2000
    assert wb["epsilon_lower_bound"]["value"] <= wb["claimed_epsilon"]


def test_under_secure_aggregation_the_server_keeps_nothing_and_the_audit_reads_the_site(fedgen, tmp_path):
    """The server sees only the masked sum: it has no site's update to keep."""
    run_dir = simulate(tmp_path, "wb-secagg", white_box=True, secagg=True)
    assert not (run_dir / dirac.RECEIVED_DIR).exists()
    code, _, err = fedgen("audit", run_dir, "-n", 200, "--check-seeds", 0)
    assert code == 0, err
    wb = json.loads((run_dir / "audit" / "audit.json").read_text())["white_box_canaries"]
    assert wb["updates_read_from"].startswith("site") and wb["rounds_read"] == 2
