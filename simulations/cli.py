"""The ``fedgen`` command line. Every command has ``--help``; user errors print one line
(``fedgen: error: ...``) and exit 2, a failed run exits 1, Ctrl-C exits 130."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape as rich_escape
from rich.logging import RichHandler

from fedgen.client.errors import DataError
from fedgen.privacy.errors import PrivacyError
from fedgen.contract import rundir
from fedgen.shared_models import ModelConfigError, UnknownModelError

from .audit_cli import add_audit_parser
from .check_data import add_check_data_parser
from .deploy_cli import add_deploy_parsers
from .errors import AuditError, DeployConfigError, PartitionError, ScenarioError

console = Console(stderr=True)
USER_ERRORS = (ScenarioError, DataError, PartitionError, PrivacyError, ModelConfigError, UnknownModelError,
               FileExistsError, FileNotFoundError, AuditError, DeployConfigError)


class UserError(Exception):
    """A problem the user can fix; printed as one line."""


def _fail(msg: str, code: int = 2) -> int:
    console.print(f"[bold red]fedgen: error:[/] {rich_escape(msg)}", highlight=False, soft_wrap=True)
    return code


# -- simulate -----------------------------------------------------------------------------

def cmd_simulate(args: argparse.Namespace) -> int:
    from .prepare import default_run_dir, write_run_dir
    from .runner import check_engine, run_simulation_dir
    from fedgen.contract.scenario import load_scenario

    if args.resume:
        run_dir = Path(args.resume).resolve()
        if not (run_dir / rundir.SCENARIO).exists():
            raise UserError(f"{run_dir}: not a fedgen run directory (no {rundir.SCENARIO}); give the folder "
                            "that `fedgen simulate` created")
        if args.scenario or args.set:
            raise UserError("--resume continues a run with its own scenario.yaml; drop SCENARIO and --set")
        scenario = rundir.read_scenario(run_dir)
    else:
        if not args.scenario:
            raise UserError("give a SCENARIO.yaml (or --resume RUN_DIR)")
        scenario = load_scenario(args.scenario, args.set)
        run_dir = Path(args.out).resolve() if args.out else default_run_dir(scenario, Path("runs"))
    check_engine(scenario)  # before anything is written
    if not args.resume:
        write_run_dir(scenario, run_dir)
    console.print(f"run directory: [bold]{run_dir}[/]", highlight=False)
    summary = run_simulation_dir(run_dir, scenario, console=console, verbose=args.verbose)
    if summary["stopped_reason"] == "clients_failed":
        return _fail(f"every site failed in round {summary['rounds_completed'] + 1}: {summary.get('failure', '')} "
                     f"(details: {run_dir / rundir.METRICS})", code=1)
    if summary.get("status") == "failed":
        return _fail(f"the run failed ({summary['stopped_reason']}, {summary['rounds_completed']} rounds): "
                     f"see `fedgen status {run_dir}`", code=1)
    guarantees = summary.get("guarantees") or []
    eps_txt = "".join(f", {g['unit']}-level epsilon {g['epsilon']:.3f} (delta {g['delta']:g})"
                      for g in guarantees) or ", no DP"
    console.print(f"[green]done[/]: {summary['rounds_completed']} rounds ({summary['stopped_reason']})"
                  f"{eps_txt}, {summary['wall_seconds']:.0f} s -> {run_dir}", highlight=False)
    return 0


# -- validate -----------------------------------------------------------------------------

def cmd_validate(args: argparse.Namespace) -> int:
    from .prepare import check_scenario
    from fedgen.contract.scenario import load_scenario

    scenario = load_scenario(args.scenario, args.set)
    data, sites, holdout = check_scenario(scenario)
    sizes = [len(s) for s in sites]
    print(f"ok: {args.scenario}: {len(data)} examples of shape {data.shape} "
          f"({'%d classes' % data.num_classes if data.num_classes else 'unlabelled'}), "
          f"{len(sites)} sites of {min(sizes)}-{max(sizes)} examples, {len(holdout)} held out; "
          f"model {scenario.model.family}, {scenario.federation.rounds} rounds, "
          + _privacy_line(scenario) + _warm_start_line(scenario))
    return 0


def _warm_start_line(scenario) -> str:
    """What the warm start does, in the validate line (docs/models.md, "Warm starts")."""
    ws = scenario.warm_start
    if ws is None:
        return ""
    parts = []
    if ws.release is not None:
        parts.append(f"release of epsilon {ws.release.epsilon_fraction * scenario.privacy.target_epsilon:g} per site, "
                     "the model pretrained on its generator's samples")
    if ws.public is not None:
        use = ("trains the release generator's perceptual features only" if ws.release is not None
               else "trains the perceptual features" if scenario.model.family == "mmd" else "pretrains the model")
        parts.append(f"public set {ws.public.path or ws.public.format} {use}, charged nothing")
    return "; warm start: " + "; ".join(parts)


def _privacy_line(scenario) -> str:
    p = scenario.privacy
    if not p.enabled:
        return "no DP"
    parts = []
    if p.unit != "site":
        parts.append(f"example-level DP target epsilon {p.target_epsilon} at delta {p.delta:g}")
    if p.unit != "example":
        s = p.site_level
        parts.append(f"site-level DP target epsilon {s.target_epsilon} at delta {s.delta:g} "
                     f"(q {s.sample_rate:g}, clip {s.clip_norm:g})")
    return "; ".join(parts)


# -- sample -------------------------------------------------------------------------------

def cmd_sample(args: argparse.Namespace) -> int:
    from .sampling import sample_run

    labels = _class_indices(args.labels) if args.labels else None
    out = sample_run(Path(args.run_dir), n=args.n, out=Path(args.out), labels=labels, seed=args.seed)
    print(f"wrote {args.n} samples to {out}")
    return 0


def _class_indices(text: str) -> list[int]:
    """``--labels``' comma-separated class indices (their range is checked against the model)."""
    labels = []
    for part in text.split(","):
        try:
            labels.append(int(part))
        except ValueError:
            raise UserError(f"--labels: {part.strip()!r} is not a class index; give comma-separated integers in "
                            "0..K-1") from None
    return labels


# -- report -------------------------------------------------------------------------------

def cmd_report(args: argparse.Namespace) -> int:
    from fedgen.evaluation.report import write_comparison, write_run_report

    runs = [Path(d) for d in args.run_dirs]
    for run in runs:
        if not (run / rundir.SCENARIO).exists():
            raise UserError(f"{run}: not a fedgen run directory (no {rundir.SCENARIO})")
    if len(runs) == 1 and not args.out:
        print(f"wrote {write_run_report(runs[0])}")
    else:
        out = write_comparison(runs, Path(args.out or "fedgen-comparison"))
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


# -- status -------------------------------------------------------------------------------

STATUS_EXIT = {"completed": 0}  # every other outcome exits 1


def find_run_dir(target: str, runs_root: Path) -> Path:
    """``target``: a run directory, or the Flower run id recorded in the ``summary.json`` of
    one of ``runs_root``'s run directories (:class:`UserError` when it names neither)."""
    path = Path(target)
    if path.is_dir():
        if not (path / rundir.SCENARIO).exists():
            raise UserError(f"{path}: not a fedgen run directory (no {rundir.SCENARIO})")
        return path
    if not target.isdigit():
        raise UserError(f"{target}: no such run directory, and not a Flower run id (digits); give RUN_DIR or RUN_ID")
    if not runs_root.is_dir():
        raise UserError(f"--runs-root {runs_root}: no such folder; give the folder that holds the run directories")
    import json

    for summary in sorted(runs_root.glob(f"*/{rundir.SUMMARY}")):
        try:
            if str(json.loads(summary.read_text()).get("flower_run_id")) == target:
                return summary.parent
        except (OSError, ValueError):
            continue
    raise UserError(f"no run directory under {runs_root} records Flower run {target} (its summary.json is written "
                    "when the run ends); give RUN_DIR, or --runs-root")


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from rich.table import Table

    run_dir = find_run_dir(args.run, Path(args.runs_root))
    path = run_dir / rundir.SUMMARY
    if not path.exists():
        print(f"{run_dir}: no {rundir.SUMMARY} yet: the run is still going, or stopped before it ended "
              f"(see {run_dir / rundir.METRICS})")
        return 1
    try:
        summary = json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{path}: not JSON ({err}); the file is damaged") from None
    reason = summary.get("stopped_reason", "?")
    status = summary.get("status") or ("completed" if reason == "completed" else "failed")
    planned = summary.get("rounds_planned")
    rounds = f"{summary.get('rounds_completed', '?')}{f' of {planned}' if planned is not None else ''} rounds"
    flower = f", Flower run {summary['flower_run_id']}" if summary.get("flower_run_id") else ""
    eps = f", epsilon {summary['epsilon']:.3f}" if isinstance(summary.get("epsilon"), (int, float)) else ""
    out = Console(highlight=False, soft_wrap=True)
    color = "green" if status == "completed" else ("yellow" if status != "failed" else "red")
    out.print(f"{run_dir}: [bold {color}]{status}[/] ({reason}, {rounds}{eps}{flower})")
    if summary.get("error"):
        out.print(f"error: {rich_escape(str(summary['error']))}")
    sites = summary.get("sites") or []
    if sites:
        table = Table("site", "rounds trained", "refused", "failures", "epsilon", box=None, pad_edge=False)
        for site in sites:
            failures = site.get("failures") or []
            last = f" (last, round {failures[-1]['round']}: {failures[-1]['reason']})" if failures else ""
            eps_site = f"{site['epsilon']:.3f}" if isinstance(site.get("epsilon"), (int, float)) else "-"
            table.add_row(rich_escape(str(site["site"])), str(site.get("rounds_trained", 0)),
                          str(site.get("rounds_refused", 0)), rich_escape(f"{len(failures)}{last}"), eps_site)
        out.print(table)
    return STATUS_EXIT.get(status, 1)


# -- sweep --------------------------------------------------------------------------------

def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import load_sweep, run_sweep

    sweep = load_sweep(args.sweep, overrides=args.set, out=args.out)
    try:
        outcome = run_sweep(sweep, console=console, verbose=args.verbose)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: the simulation stopped; run the same `fedgen sweep` again to "
                      "resume (finished runs are skipped)", highlight=False)
        return 130
    print(outcome.table)
    plot = f", {outcome.plot.name}" if outcome.plot else f" (no {sweep.spec.metric} to plot)"
    console.print(f"wrote comparison.csv, comparison.md{plot} -> {sweep.out_dir}", highlight=False)
    if outcome.failed:
        return _fail(f"{len(outcome.failed)} of {len(outcome.rows)} runs did not finish: {', '.join(outcome.failed)} "
                     "(see their metrics.jsonl; run the sweep again to retry them)", code=1)
    return 0


# -- entry point --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedgen", description=(
        "Federated, differentially private training and auditing of generative models."))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("simulate", help="run a scenario on Flower's simulation runtime",
                       description="Run SCENARIO.yaml: many simulated sites on this machine, real Flower.")
    p.add_argument("scenario", nargs="?", help="scenario YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a scenario value, e.g. --set privacy.target_epsilon=1 (repeatable)")
    p.add_argument("--out", help="run directory to create (default runs/<name>-<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("-v", "--verbose", action="store_true", help="stream Flower's log")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("validate", help="check a scenario and its data; trains nothing",
                       description="Validate SCENARIO.yaml: schema, data files, partition, model.")
    p.add_argument("scenario")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("sample", help="draw samples from a run's final model",
                       description="Sample RUN_DIR's latest global model into FILE.npz (x, y) or FILE.png.")
    p.add_argument("run_dir")
    p.add_argument("-n", type=int, default=100, help="number of samples")
    p.add_argument("--out", required=True, help="output .npz or .png")
    p.add_argument("--labels", help="comma-separated class labels, cycled (default: balanced)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("report", help="rebuild a run's report.html, or compare several runs",
                       description="One RUN_DIR: rewrite its report.html. Several: comparison.html + .md in --out.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="folder for the comparison (default ./fedgen-comparison)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sweep", help="run a grid of scenarios and compare them",
                       description="Run every combination of SWEEP.yaml's grid and variants (docs/sweeps.md), "
                       "skipping finished runs, then write comparison.csv/.md and privacy_utility.png.")
    p.add_argument("sweep", metavar="SWEEP.yaml", help="sweep file (docs/sweeps.md)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a scenario value in every run (repeatable)")
    p.add_argument("--out", help="sweep folder (default: the file's `out`, else runs/sweeps/<name>)")
    p.add_argument("-v", "--verbose", action="store_true", help="stream Flower's log")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("status", help="how a run ended, per site (exit 0: completed, 1: not)",
                       description="Print how RUN_DIR's run ended (completed, completed_with_failures, stopped_early, "
                       "failed) and what each site did, from its summary.json. RUN_ID: the Flower run id "
                       "(`flwr ls`), looked up in --runs-root's run directories. Exit 0 for completed, 1 for any "
                       "other outcome, 2 for a bad argument.")
    p.add_argument("run", metavar="RUN_DIR|RUN_ID")
    p.add_argument("--runs-root", default="runs", metavar="DIR",
                   help="folder holding the run directories, to find RUN_ID in (default ./runs)")
    p.set_defaults(func=cmd_status)

    add_audit_parser(sub)
    add_deploy_parsers(sub)
    add_check_data_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, handlers=[RichHandler(console=console, show_path=False)],
                        format="%(message)s")
    args = build_parser().parse_args(argv)
    # Ctrl-C and SIGTERM end a run the same way: Flower and Ray are stopped, nothing is
    # orphaned. SIGINT is set explicitly: a process started with SIGINT ignored (e.g. in
    # the background of a non-interactive shell) would otherwise never see Ctrl-C.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return args.func(args)
    except (UserError, *USER_ERRORS) as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # exiting: a second Ctrl-C changes nothing now
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        console.print("[yellow]interrupted[/]: the simulation stopped; resume with --resume RUN_DIR")
        return 130
    except Exception as err:  # a failed run (not a user error): one line, details in the run dir
        from .errors import SimulationRunError

        if isinstance(err, SimulationRunError):
            return _fail(str(err), code=1)
        raise


if __name__ == "__main__":
    sys.exit(main())
