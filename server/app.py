"""The fedgen ServerApp (Flower Message API). Thin: find the run directory, compose the
run (the harness's hooks for a simulated run, none for a deployment), hand off."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedgen.contract import rundir
from fedgen.simulations.hooks import hooks_for

from .run import FederatedRun
from .summary import RunFailedError, write_failed_summary

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
    try:
        FederatedRun(grid, Path(run_dir), hooks=hooks_for(Path(run_dir)), flower_run_id=context.run_id).execute()
    except (RunFailedError, KeyboardInterrupt):
        raise
    except Exception as err:  # the run broke off: say so where operators look, then fail as before
        if (Path(run_dir) / rundir.SCENARIO).exists():
            write_failed_summary(Path(run_dir), err, rounds_planned=_rounds_planned(Path(run_dir)),
                                 flower_run_id=context.run_id)
        raise


def _rounds_planned(run_dir: Path) -> int | None:
    try:
        return rundir.read_scenario(run_dir).federation.rounds
    except Exception:  # noqa: BLE001 -- a damaged scenario.yaml: the error itself is the story
        return None
