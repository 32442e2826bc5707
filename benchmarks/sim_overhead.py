"""The simulation engines -- Flower's runtime and the in-process one -- vs a plain Python
loop doing the same federated training (issues 8 and 21): cold start, steady-state seconds
per round and peak memory, measured side by side in one invocation.

    python benchmarks/sim_overhead.py [--rounds 6] [--engines flower inprocess] [--client-cpus 2 1]
                                      [--workers 1 2] [--threads 1] [--set K=V] [--result NAME]

Engine side: ``python -m fedgen.simulations.cli simulate scenarios/quickstart.yaml --out RUN
--set evaluation.every=0 --set federation.rounds=6 --set simulation.device=cpu --set
simulation.engine=E [--set simulation.client_cpus=C]`` (no evaluation before the last round,
whose evaluation time is subtracted, so training and aggregation are compared). The
in-process engine trains the sites one after another in the CLI's process (one run); each
``client_cpus`` gives one Flower run. ``client_cpus=2`` gives one Ray
actor that trains the sites one after another, like the plain loop (the like-for-like
comparison); ``client_cpus=1`` (the quickstart's own setting) gives two actors that train
two sites at a time on the 2 cores. ``--workers 1 2`` runs the in-process engine once per
``simulation.workers`` value and reports the worker pool's speedup (steady round of workers=1
over that of workers=N; target >= 1.7x for 2 workers on 2 cores). Every process runs with OMP_NUM_THREADS=1
(``--threads``): one torch thread per process on both sides.

Plain side: this script in its own process (``--plain RUN``) reads a run directory
prepared as ``fedgen simulate`` prepares it (``simulations.prepare.write_run_dir``, done
beforehand and not timed; its ``inputs/partitions.npz`` is checked equal to the Flower
runs') and the same task configuration, and each round calls ``client.task.train_site``
(the ClientApp's own training call, hence the same ``run_local_round``, model build, DP-SGD
and calibration) for every site in turn, then averages the updates weighted by examples
(FedAvg). The plain loop runs before, between and after the engine runs; each engine run
is compared with the two plain runs around it.

Definitions (times from process launch, ``time.time()`` just before ``Popen``):

- round end: mtime of ``checkpoints/model-round-NNNN.pt`` (Flower) or the loop's clock;
- cold start = the engine's round-1 end - the plain loop's round-1 end: what the engine adds
  before the first round's result exists (Python and torch start-up are paid by both;
  the CLI's run-directory preparation, ``prepare_run_dir_s``, only by Flower);
- steady round = median ``seconds`` of rounds >= 2 (metrics.jsonl; the last round's
  ``eval_seconds`` removed), and the same for the plain loop's rounds;
- steady CPU = median CPU seconds per round, rounds >= 2 (Flower: the whole process tree
  sampled from /proc between consecutive round ends, the evaluating last round left out;
  plain: the loop's own ``process_time``). Less sensitive to other jobs on the machine.

Writes benchmarks/results/<NAME>.json (``--result``, default sim_overhead). Targets: steady
round <= 1.15x the plain loop, cold start <= 5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, environment, load_average, run_sampled, run_sampled_simulation, \
    training_seconds, write_result

SCENARIO = REPO / "scenarios" / "quickstart.yaml"
STEADY_TARGET = 1.15
COLD_TARGET_S = 5.0


# -- the plain loop (runs in its own process: ``--plain RUN_DIR``) --------------------------

def site_datasets(run_dir: Path, conditional: bool) -> dict[str, Any]:
    """Each site's examples, exactly as ``client.site.load_site_data`` selects them."""
    import numpy as np

    from fedgen.client.data import load_data
    from fedgen.contract import rundir

    spec = rundir.DataSpec.read(run_dir)
    full = load_data(spec.format, spec.path, spec.options)
    with np.load(run_dir / rundir.PARTITIONS) as parts:
        sites = {str(i): full.subset(parts[f"site_{i}"]) for i in range(spec.num_sites)}
    return sites if conditional else {k: v.without_labels() for k, v in sites.items()}


def fedavg(updates: list[tuple[dict, int]]) -> dict:
    """Example-weighted mean of state dicts (what Flower's FedAvg computes)."""
    total = sum(n for _, n in updates)
    return {key: sum(state[key].double() * (n / total) for state, n in updates).to(updates[0][0][key].dtype)
            for key in updates[0][0]}


def plain_loop(run_dir: Path, rounds: int) -> dict[str, Any]:
    import torch

    from fedgen.client.task import train_site
    from fedgen.contract import rundir
    from fedgen.contract.task import build_global_model, task_from_scenario

    imported = time.time()
    scenario, spec = rundir.read_scenario(run_dir), rundir.DataSpec.read(run_dir)
    task = task_from_scenario(scenario, spec)
    sites = site_datasets(run_dir, conditional=task.num_classes is not None)
    state = build_global_model(scenario, spec).state_dict()
    ledgers: dict[str, Any] = {}
    rows = []
    for rnd in range(1, rounds + 1):
        start, cpu_start = time.time(), time.process_time()
        updates = []
        for site, data in sites.items():
            model, result, ledgers[site] = train_site(task, data, state, site=site, server_round=rnd,
                                                      ledger=ledgers.get(site))
            if result.status == "trained":
                updates.append((model.state_dict(), result.num_examples))
        trained = time.time()
        state = fedavg(updates) if updates else state
        rows.append({"round": rnd, "seconds": time.time() - start, "aggregate_seconds": time.time() - trained,
                     "cpu_seconds": time.process_time() - cpu_start, "end": time.time(),
                     "clients_ok": len(updates)})
    return {"imports_done": imported, "torch_threads": torch.get_num_threads(), "rounds": rows,
            "epsilon": max(ledger.epsilon for ledger in ledgers.values()) if ledgers else None}


def run_plain(run_dir: Path, rounds: int, work: Path, index: int) -> dict[str, Any]:
    """The plain loop in a fresh process, timed from launch like the Flower runs."""
    out = work / f"plain-{index}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--plain", str(run_dir), "--rounds", str(rounds),
           "--plain-out", str(out)]
    done = run_sampled(cmd, work / f"plain-{index}.log")
    result = json.loads(out.read_text())
    rows = result["rounds"]
    return {"load_before": done.load_before, "load_after": done.load_after, "process_wall_s": round(done.wall_s, 2),
            "imports_done_s": round(result["imports_done"] - done.launched, 2),
            "round_end_s": [round(r["end"] - done.launched, 2) for r in rows],
            "round_seconds": [round(r["seconds"], 3) for r in rows],
            "round_cpu_s": [round(r["cpu_seconds"], 2) for r in rows],
            "aggregate_seconds": [round(r["aggregate_seconds"], 4) for r in rows],
            "clients_ok": [r["clients_ok"] for r in rows], "torch_threads": result["torch_threads"],
            "epsilon": result["epsilon"], **done.sampler.summary()}


# -- comparison ---------------------------------------------------------------------------

def steady(run: dict[str, Any]) -> float:
    """Median seconds of rounds >= 2 without evaluation."""
    seconds = training_seconds(run) if "eval_seconds" in run else run["round_seconds"]
    return statistics.median(seconds[1:])


def compare(run: dict[str, Any], plains: list[dict[str, Any]]) -> dict[str, Any]:
    """One engine run against the plain runs around it."""
    plain_steady = statistics.median(s for p in plains for s in p["round_seconds"][1:])
    plain_cpu = statistics.median(c for p in plains for c in p["round_cpu_s"][1:])
    run_cpu = statistics.median(run["round_cpu_s"][1:-1])  # the last round evaluates
    plain_r1_end = statistics.median(p["round_end_s"][0] for p in plains)
    plain_r1 = statistics.median(p["round_seconds"][0] for p in plains)
    run_steady = steady(run)
    run_r1 = training_seconds(run)[0]
    cold = run["round_end_s"][0] - plain_r1_end
    return {
        "steady_round_s": round(run_steady, 3), "plain_steady_round_s": round(plain_steady, 3),
        "steady_ratio": round(run_steady / plain_steady, 3),
        "steady_overhead_s": round(run_steady - plain_steady, 3),
        "steady_cpu_s": round(run_cpu, 3), "plain_steady_cpu_s": round(plain_cpu, 3),
        "steady_cpu_ratio": round(run_cpu / plain_cpu, 3),
        "round1_end_s": run["round_end_s"][0], "plain_round1_end_s": round(plain_r1_end, 2),
        "cold_start_s": round(cold, 2),
        "cold_start_parts_s": {
            "launch_to_round1_start": round(run["round_end_s"][0] - run["round_seconds"][0], 2),
            "plain_launch_to_round1_start": round(plain_r1_end - plain_r1, 2),
            "round1_minus_plain_round1": round(run_r1 - plain_r1, 2)},
        "steady_target_met": run_steady / plain_steady <= STEADY_TARGET,
        "cold_start_target_met": cold <= COLD_TARGET_S,
    }


IMPORTS = ["torch", "opacus", "ray", "flwr.serverapp", "flwr.simulation", "fedgen.client.app", "fedgen.server.app",
           "fedgen.simulations.cli"]


def import_seconds(modules: list[str]) -> dict[str, float]:
    """Seconds to import each module in a fresh interpreter (interpreter start excluded):
    every Flower process (CLI, SuperLink, SuperExec, flwr-simulation, each Ray actor) pays
    its share of these before it does anything."""
    out = {}
    for module in modules:
        code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
        res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
        out[module] = round(float(res.stdout.strip().splitlines()[-1]), 2)
    return out


def prepare_inputs(run_dir: Path, overrides: list[str]) -> float:
    """Write the run directory the plain loop reads -- what ``fedgen simulate`` writes before
    Flower starts (deterministic by seed, so the Flower runs get the same partition;
    checked) -- and return the seconds that took (imports excluded)."""
    sys.path.insert(0, str(REPO))
    from fedgen.simulations.prepare import write_run_dir
    from fedgen.contract.scenario import load_scenario

    start = time.perf_counter()
    write_run_dir(load_scenario(SCENARIO, overrides), run_dir)
    return time.perf_counter() - start


def same_partitions(a: Path, b: Path) -> bool:
    import numpy as np

    with np.load(a / "inputs" / "partitions.npz") as x, np.load(b / "inputs" / "partitions.npz") as y:
        return sorted(x.files) == sorted(y.files) and all(np.array_equal(x[k], y[k]) for k in x.files)


def engine_runs(engines: list[str], client_cpus: list[float], workers: list[int] | None = None
                ) -> list[tuple[str, list[str]]]:
    """(name, scenario overrides) of each engine run: Flower once per ``client_cpus``, the
    in-process engine once per ``workers`` (default: one run, ``workers`` left at 1)."""
    runs = []
    for engine in engines:
        if engine == "flower":
            runs += [(f"flower client_cpus={cpus:g}", ["simulation.engine=flower", f"simulation.client_cpus={cpus:g}"])
                     for cpus in client_cpus]
        elif workers:
            runs += [(f"{engine} workers={w}", [f"simulation.engine={engine}", f"simulation.workers={w}"])
                     for w in workers]
        else:
            runs.append((engine, [f"simulation.engine={engine}"]))
    return runs


def worker_speedups(comparison: dict[str, Any]) -> dict[str, float]:
    """Steady round of ``inprocess workers=1`` over that of each ``inprocess workers=N``."""
    one = comparison.get("inprocess workers=1")
    return {name: round(one["steady_round_s"] / c["steady_round_s"], 3) for name, c in comparison.items()
            if one and name.startswith("inprocess workers=") and name != "inprocess workers=1"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--engines", nargs="+", choices=["flower", "inprocess"], default=["flower", "inprocess"],
                        help="engines to measure (in this order; Flower once per --client-cpus)")
    parser.add_argument("--client-cpus", type=float, nargs="+", default=[2.0, 1.0],
                        help="simulation.client_cpus of each Flower run (2: one actor; 1: two actors)")
    parser.add_argument("--workers", type=int, nargs="+", metavar="N",
                        help="simulation.workers of each in-process run (e.g. 1 2: the worker pool's speedup)")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of every process (CLI, Ray actors, plain loop); 1 by default: two "
                        "intra-op threads on a busy 2-core machine cost ~10x the CPU of one for this model")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="extra scenario override for every run (the plain loop follows the run dir)")
    parser.add_argument("--result", default="sim_overhead", help="result file name in benchmarks/results/")
    parser.add_argument("--keep", type=Path, help="keep the run directories and logs here")
    parser.add_argument("--plain", type=Path, help=argparse.SUPPRESS)  # internal: run the plain loop
    parser.add_argument("--plain-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        sys.path.insert(0, str(REPO))
        args.plain_out.write_text(json.dumps(plain_loop(args.plain, args.rounds)))
        return

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every process, Ray keeps it
    work = Path(tempfile.mkdtemp(prefix="fedgen-bench-", dir=args.keep))
    base = ["evaluation.every=0", f"federation.rounds={args.rounds}", "simulation.device=cpu",
            "warm_start=null", *args.set]  # DP-SGD from round 1, as the plain loop
    load_start = load_average()
    inputs = work / "inputs-run"
    prepare_s = prepare_inputs(inputs, base)
    # plain, engine, plain, engine, plain: each engine run is compared with the plain runs
    # just before and after it, so a change in the machine's load hits both sides
    plains = [run_plain(inputs, args.rounds, work, 0)]
    print(f"plain loop: round 1 ends at {plains[0]['round_end_s'][0]:.1f} s", flush=True)
    runs, comparison, partitions = {}, {}, {}
    for i, (name, overrides) in enumerate(engine_runs(args.engines, args.client_cpus, args.workers)):
        runs[name] = run_sampled_simulation(SCENARIO, work / f"engine-{i}", [*base, *overrides])
        partitions[name] = same_partitions(inputs, work / f"engine-{i}")
        plains.append(run_plain(inputs, args.rounds, work, i + 1))
        comparison[name] = compare(runs[name], plains[-2:])
        print(f"{name}: round 1 ends at {runs[name]['round_end_s'][0]:.1f} s, steady "
              f"{comparison[name]['steady_round_s']:.2f} s/round vs plain "
              f"{comparison[name]['plain_steady_round_s']:.2f}", flush=True)
    result = {
        "benchmark": "sim_overhead", "scenario": str(SCENARIO.relative_to(REPO)), "rounds": args.rounds,
        "overrides": base, "targets": {"steady_ratio": STEADY_TARGET, "cold_start_s": COLD_TARGET_S},
        "environment": environment(), "load_start": load_start, "load_end": load_average(),
        "comparison": comparison, "worker_speedup": worker_speedups(comparison),
        "same_partitions_as_plain": partitions,
        "prepare_run_dir_s": round(prepare_s, 2), "import_seconds": import_seconds(IMPORTS),
        "engine_runs": runs, "plain_runs": plains,
    }
    path = write_result(args.result, result)
    report(result, path)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def report(result: dict[str, Any], path: Path) -> None:
    print(f"\n{'engine run':24s} {'steady s':>9s} {'plain s':>8s} {'ratio':>6s} {'cpu ratio':>9s} "
          f"{'cold start s':>13s} {'peak RSS MB':>12s}  targets: ratio <= {STEADY_TARGET}, cold <= {COLD_TARGET_S:g} s")
    for name, c in result["comparison"].items():
        run = result["engine_runs"][name]
        print(f"{name:24s} {c['steady_round_s']:9.2f} {c['plain_steady_round_s']:8.2f} {c['steady_ratio']:6.2f} "
              f"{c['steady_cpu_ratio']:9.2f} {c['cold_start_s']:13.1f} {run['peak_rss_mb']:12.0f}  "
              f"ratio {'met' if c['steady_target_met'] else 'MISSED'}, "
              f"cold start {'met' if c['cold_start_target_met'] else 'MISSED'}")
    for name, speedup in result.get("worker_speedup", {}).items():
        print(f"{name}: {speedup:.2f}x the steady round of inprocess workers=1 (target >= 1.7x on 2 cores)")
    plain_rss = max(p["peak_rss_mb"] for p in result["plain_runs"])
    print(f"plain loop peak RSS {plain_rss:.0f} MB; load average {result['load_start']} -> {result['load_end']}; "
          f"-> {path}")


if __name__ == "__main__":
    main()
