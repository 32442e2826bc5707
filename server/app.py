"""The fedgen ServerApp (Flower Message API). Thin: find the run directory, compose the
run (the harness's hooks for a simulated run, none for a deployment), hand off."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedgen.simulations.hooks import hooks_for

from .run import FederatedRun

app = ServerApp()


def _app_root() -> Path:
    return Path(__file__).resolve().parent.parent


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO)
    run_dir = str(context.run_config.get("run-dir", "") or "")
    if not run_dir:
        # Plain `flwr run .`: prepare a run directory from the scenario in run config.
        # (The one place the server reaches into the harness: the app entry point is the
        # composition root; fedgen simulate prepares the directory itself.)
        from fedgen.simulations.prepare import prepare_run

        scenario = Path(str(context.run_config.get("scenario", "scenarios/quickstart.yaml")))
        if not scenario.is_absolute():
            scenario = _app_root() / scenario
        run_dir = str(prepare_run(scenario, out_root=_app_root() / "runs"))
        context.run_config["run-dir"] = run_dir
    FederatedRun(grid, Path(run_dir), hooks=hooks_for(Path(run_dir)), flower_run_id=context.run_id).execute()
