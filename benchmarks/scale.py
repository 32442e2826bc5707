"""Many simulated clients on Flower's simulation engine (issue 8): 1 000 sites on MNIST,
5 % sampled per round, a small DP VAE, 3 rounds. Measures the peak memory of the whole
process tree (CLI, SuperLink, SuperExec, flwr-simulation, Ray and its actors; summed RSS
sampled from /proc every 0.2 s, with PSS at the peak) and the seconds per round.

    python benchmarks/scale.py [--sites 1000] [--fraction 0.05] [--rounds 3] [--variants dp no_dp]

which runs ``python -m fedgen.simulations.cli simulate scenarios/quickstart.yaml --out RUN`` with
``data.format=mnist data.path=../shared/data/mnist`` (the 10 000-image MNIST test split
stored there; 2 000 held out, so 8 examples per site), ``partition.min_examples=8``,
``model.hidden=32``, ``training.local_steps=5``, ``training.batch_size=4`` (Poisson q = 0.5
at a site), ``evaluation.every=0 evaluation.num_samples=200`` (evaluation only after the
last round; its seconds are reported apart) and ``simulation.device=cpu``, DP-SGD to
epsilon = 10 as in the quickstart (variant ``dp``). Variant ``no_dp`` adds
``privacy.enabled=false``: the same federation without DP-SGD, which shows Flower's own cost
per client apart from the per-site noise calibration (Opacus' ``get_noise_multiplier``,
seconds of pure Python per site on its first round).

``--engine`` sets ``simulation.engine`` (default: inprocess, the default engine). For more
sites than MNIST's test split can give ``partition.min_examples`` each, ``--replicate K``
writes that split K times into one ``.npz`` (``data.format=npz``) before the runs.
``--plain`` adds, after each run, the plain loop doing the same local work: a process that
trains exactly the sites each round of the run trained (``sites_trained`` of its
``metrics.jsonl``) with the ClientApp's own ``client.task.train_site``, in the same order,
and averages them (FedAvg); its round seconds and peak RSS sit beside the engine's.

    python benchmarks/scale.py --sites 10000 --fraction 0.01 --replicate 3 --variants dp --plain

Writes benchmarks/results/scale.json (``--result``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import statistics
import tempfile
from pathlib import Path

from _common import REPO, environment, load_average, run_sampled, run_sampled_simulation, training_seconds, \
    write_result

SCENARIO = REPO / "scenarios" / "quickstart.yaml"
MNIST = "../shared/data/mnist"  # relative to the repository root, where the CLI runs
VARIANTS = {"dp": [], "no_dp": ["privacy.enabled=false"]}


def overrides(sites: int, fraction: float, rounds: int, extra: list[str], replicated: Path | None = None,
              copies: int = 1) -> list[str]:
    per_site = (10_000 * copies - 2_000 * copies) // sites
    data = ["data.format=npz", f"data.path={replicated}"] if replicated else ["data.format=mnist", f"data.path={MNIST}"]
    return [*data, f"federation.num_sites={sites}",
            f"federation.fraction_fit={fraction:g}", f"federation.rounds={rounds}",
            f"partition.min_examples={max(1, per_site)}", "model.hidden=32", "training.local_steps=5",
            "training.batch_size=4", "evaluation.every=0", "evaluation.num_samples=200", "simulation.device=cpu",
            "warm_start=null",  # DP-SGD from round 1, as the plain loop it is compared with
            *extra]


def replicate_mnist(copies: int, out: Path) -> Path:
    """MNIST's test split ``copies`` times in one ``.npz`` (uint8 images, labels)."""
    import numpy as np

    from fedgen.client.data import load_data

    data = load_data("mnist", REPO / MNIST)
    x = (np.asarray(data.x) * 255).round().astype(np.uint8)
    np.savez(out, x=np.concatenate([x] * copies), y=np.concatenate([np.asarray(data.y)] * copies))
    return out


# -- the plain loop doing the same local work (its own process: ``--plain-run RUN_DIR``) ----

def plain_sampled(run_dir: Path) -> dict:
    """Each round, train the sites the run trained that round, one after another, then FedAvg."""
    import torch

    from fedgen.client.site import load_site_data
    from fedgen.client.task import train_site
    from fedgen.contract import rundir
    from fedgen.contract.task import build_global_model, task_from_scenario
    from flwr.app import Context, RecordDict
    from sim_overhead import fedavg

    scenario, spec = rundir.read_scenario(run_dir), rundir.DataSpec.read(run_dir)
    task = task_from_scenario(scenario, spec)
    state = build_global_model(scenario, spec).state_dict()
    ledgers: dict = {}
    rows = []
    for row in rundir.read_metrics(run_dir):
        start, cpu_start = time.time(), time.process_time()
        updates = []
        for site in row["sites_trained"]:
            context = Context(run_id=0, node_id=0, node_config={"partition-id": int(site), "num-partitions":
                              spec.num_sites}, state=RecordDict(), run_config={"run-dir": str(run_dir)})
            data = load_site_data(context, conditional=task.num_classes is not None, run_dir=str(run_dir))
            model, result, ledgers[site] = train_site(task, data, state, site=site, server_round=row["round"],
                                                      ledger=ledgers.get(site))
            if result.status == "trained":
                updates.append((model.state_dict(), result.num_examples))
        state = fedavg(updates) if updates else state
        rows.append({"round": row["round"], "seconds": time.time() - start, "sites": len(updates),
                     "cpu_seconds": time.process_time() - cpu_start})
    return {"rounds": rows, "torch_threads": torch.get_num_threads()}


def run_plain(run_dir: Path, work: Path) -> dict:
    out = work / f"{run_dir.name}-plain.json"
    done = run_sampled([sys.executable, str(Path(__file__).resolve()), "--plain-run", str(run_dir),
                        "--plain-out", str(out)], work / f"{run_dir.name}-plain.log")
    rows = json.loads(out.read_text())["rounds"]
    return {"round_seconds": [round(r["seconds"], 2) for r in rows], "sites": [r["sites"] for r in rows],
            "round_cpu_s": [round(r["cpu_seconds"], 2) for r in rows],
            "process_wall_s": round(done.wall_s, 2), **done.sampler.summary()}


def summarise(run: dict, sites: int, fraction: float) -> dict:
    train = training_seconds(run)
    sampled = round(sites * fraction)
    return {"sites": sites, "fraction_fit": fraction, "clients_per_round": run["clients_ok"],
            "round_seconds_without_eval": [round(s, 2) for s in train],
            "median_round_s": round(statistics.median(train), 2),
            "median_round_s_after_round_1": round(statistics.median(train[1:]), 2) if len(train) > 1 else None,
            "seconds_per_client_after_round_1": round(statistics.median(train[1:]) / sampled, 3)
            if len(train) > 1 else None,
            "final_eval_s": run["eval_seconds"][-1], "round1_end_s": run["round_end_s"][0],
            "peak_rss_mb": run["peak_rss_mb"], "pss_mb_at_rss_peak": run["pss_mb_at_rss_peak"],
            "peak_processes": run["peak_processes"], "process_wall_s": run["process_wall_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--engine", choices=["inprocess", "flower"], default="inprocess")
    parser.add_argument("--replicate", type=int, default=1, metavar="K", help="MNIST's test split K times (.npz)")
    parser.add_argument("--plain", action="store_true", help="also run the plain loop on each run's sampled sites")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="extra scenario override (repeatable)")
    parser.add_argument("--result", default="scale", help="result file name in benchmarks/results/")
    parser.add_argument("--keep", type=Path, help="keep the run directory and log here")
    parser.add_argument("--plain-run", type=Path, help=argparse.SUPPRESS)  # internal: the plain loop
    parser.add_argument("--plain-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_run:
        sys.path.insert(0, str(REPO))
        args.plain_out.write_text(json.dumps(plain_sampled(args.plain_run)))
        return
    work = Path(tempfile.mkdtemp(prefix="fedgen-scale-", dir=args.keep))
    replicated = replicate_mnist(args.replicate, work / "mnist.npz") if args.replicate > 1 else None
    load_start = load_average()
    runs = {}
    for name in args.variants:
        extra = [f"simulation.engine={args.engine}", *VARIANTS[name], *args.set]
        run = run_sampled_simulation(SCENARIO, work / name, overrides(args.sites, args.fraction, args.rounds, extra,
                                                                      replicated, args.replicate))
        runs[name] = {"summary": summarise(run, args.sites, args.fraction), "run": run}
        if args.plain:
            runs[name]["plain"] = plain = run_plain(work / name, work)
            train = training_seconds(run)
            runs[name]["summary"]["plain_round_s"] = plain["round_seconds"]
            runs[name]["summary"]["plain_peak_rss_mb"] = plain["peak_rss_mb"]
            runs[name]["summary"]["round_ratio_vs_plain"] = [round(e / p, 3) for e, p in
                                                             zip(train, plain["round_seconds"])]
            # CPU seconds per round (engine: its process tree between round ends, so the last
            # round includes the final evaluation): steadier than wall time on a shared machine
            runs[name]["summary"]["round_cpu_s"] = run["round_cpu_s"]
            runs[name]["summary"]["plain_round_cpu_s"] = plain["round_cpu_s"]
            runs[name]["summary"]["cpu_ratio_vs_plain"] = [round(e / p, 3) for e, p in
                                                           zip(run["round_cpu_s"][:-1], plain["round_cpu_s"])]
        report(name, runs[name]["summary"])
    path = write_result(args.result, {"benchmark": "scale", "scenario": str(SCENARIO.relative_to(REPO)),
                                      "engine": args.engine, "replicate": args.replicate,
                                      "environment": environment(), "load_start": load_start,
                                      "load_end": load_average(), "runs": runs})
    print(f"load average {load_start} -> {load_average()}; -> {path}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def report(name: str, s: dict) -> None:
    print(f"{name}: {s['sites']} sites, {s['clients_per_round']} trained per round: rounds "
          f"{s['round_seconds_without_eval']} s without evaluation (final evaluation {s['final_eval_s']:.1f} s), "
          f"round 1 done {s['round1_end_s']:.0f} s after launch; peak RSS {s['peak_rss_mb']:.0f} MB summed over "
          f"{s['peak_processes']} processes (PSS {s['pss_mb_at_rss_peak']:.0f} MB)", flush=True)
    if "plain_round_s" in s:
        print(f"  plain loop, same sites: rounds {s['plain_round_s']} s, peak RSS {s['plain_peak_rss_mb']:.0f} MB; "
              f"engine / plain per round {s['round_ratio_vs_plain']}; CPU s per round {s['round_cpu_s']} vs "
              f"{s['plain_round_cpu_s']} (ratio, last round left out: {s['cpu_ratio_vs_plain']})", flush=True)


if __name__ == "__main__":
    main()
