"""A deployed run with a failing site is a failed run where operators look (issue #23
item 1): the ServerApp ends with RunFailedError, ``flwr ls`` shows ``finished:failed``, the
stream shows the outcome line, ``summary.json`` says ``completed_with_failures`` and names
the site and rounds, and ``fedgen status RUN_ID`` exits 1.

Loopback, as tests/test_deploy.py: TLS, SuperNode authentication, two SuperNodes on CSV
files (site 1's file disappears before the run).
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from fedgen.simulations.flower_engine import _bin, tagged_pids

from .test_deploy import LocalDeployment

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _csv(path, x: np.ndarray, y: np.ndarray) -> None:
    header = ",".join([f"p{i}" for i in range(x.shape[1])] + ["label"])
    rows = np.concatenate([np.round(x * 16).astype(int), y[:, None]], axis=1)
    np.savetxt(path, rows, fmt="%d", delimiter=",", header=header, comments="")


def test_a_failing_site_makes_the_deployed_run_fail(tmp_path, digits):
    from fedgen.contract.scenario import scenario_from_dict
    from fedgen.simulations.prepare import write_deployment_run_dir

    dep = LocalDeployment(tmp_path)
    try:
        dep.start_superlink()
        for site in ("0", "1"):
            dep.register(site)
        x, y = digits.x.reshape(len(digits.x), -1).numpy(), digits.y.numpy()
        config = {}
        for i in range(2):
            _csv(tmp_path / f"site{i}.csv", x[i * 230:(i + 1) * 230], y[i * 230:(i + 1) * 230])
            config[str(i)] = {"site-id": f"site{i}", "data-path": str(tmp_path / f"site{i}.csv"),
                              "label-column": "label", "feature-min": 0, "feature-max": 16,
                              "state-dir": str(tmp_path / f"state{i}")}
        config["1"]["data-path"] = str(tmp_path / "gone.csv")  # site 1's data is not there
        for i in ("0", "1"):
            dep.start_supernode(f"site{i}", key=i, node_config=config[i])
        dep.wait_online(2)
        scenario = scenario_from_dict({
            "name": "failing", "seed": 0,
            "federation": {"num_sites": 2, "rounds": 2, "min_fit_sites": 2, "round_timeout_s": 120},
            "model": {"family": "vae", "hidden": 32, "latent_dim": 2},
            "training": {"local_steps": 2, "batch_size": 32, "lr": 0.002},
            "privacy": {"enabled": True, "target_epsilon": 8.0},
            "evaluation": {"every": 0, "num_samples": 20}, "simulation": {"device": "cpu"},
            "deployment": {"data_shape": [64], "num_classes": 10}})
        run_dir = write_deployment_run_dir(scenario, tmp_path / "runs" / "failing")
        name = dep.start_run(run_dir)
        run_id, status = dep.wait_run(name, timeout=400)

        assert status.startswith("finished:failed"), dep.log(name)
        stream = dep.log(name)
        assert "completed_with_failures" in stream and "RunFailedError" in stream
        summary = json.loads((run_dir / "summary.json").read_text())
        assert (summary["status"], summary["rounds_completed"], summary["rounds_planned"]) == \
            ("completed_with_failures", 2, 2)
        assert summary["flower_run_id"] == run_id
        by_site = {s["site"]: s for s in summary["sites"]}
        assert by_site["site0"]["rounds_trained"] == 2 and by_site["site0"]["failures"] == []
        failing = [s for s in summary["sites"] if s["failures"]]
        assert len(failing) == 1 and failing[0]["rounds_trained"] == 0
        assert [f["round"] for f in failing[0]["failures"]] == [1, 2]
        assert "DataError" in failing[0]["failures"][0]["reason"]
        # the details stay at the site: the reason names the kind of error only
        assert "gone.csv" not in json.dumps(summary)

        status_cli = subprocess.run([_bin("fedgen"), "status", run_id, "--runs-root", str(tmp_path / "runs")],
                                    capture_output=True, text=True, timeout=120)
        assert status_cli.returncode == 1, status_cli.stderr
        assert "completed_with_failures" in status_cli.stdout and "DataError" in status_cli.stdout
    finally:
        dep.close()
        assert not tagged_pids(dep.tag)
