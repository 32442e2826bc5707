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

Writes benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from _common import REPO, environment, load_average, run_sampled_simulation, training_seconds, write_result

SCENARIO = REPO / "scenarios" / "quickstart.yaml"
MNIST = "../shared/data/mnist"  # relative to the repository root, where the CLI runs
VARIANTS = {"dp": [], "no_dp": ["privacy.enabled=false"]}


def overrides(sites: int, fraction: float, rounds: int, extra: list[str]) -> list[str]:
    per_site = (10_000 - 2_000) // sites
    return ["data.format=mnist", f"data.path={MNIST}", f"federation.num_sites={sites}",
            f"federation.fraction_fit={fraction:g}", f"federation.rounds={rounds}",
            f"partition.min_examples={max(1, per_site)}", "model.hidden=32", "training.local_steps=5",
            "training.batch_size=4", "evaluation.every=0", "evaluation.num_samples=200", "simulation.device=cpu",
            *extra]


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
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="extra scenario override (repeatable)")
    parser.add_argument("--keep", type=Path, help="keep the run directory and log here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedgen-scale-", dir=args.keep))
    load_start = load_average()
    runs = {}
    for name in args.variants:
        run = run_sampled_simulation(SCENARIO, work / name,
                             overrides(args.sites, args.fraction, args.rounds, [*VARIANTS[name], *args.set]))
        runs[name] = {"summary": summarise(run, args.sites, args.fraction), "run": run}
        report(name, runs[name]["summary"])
    path = write_result("scale", {"benchmark": "scale", "scenario": str(SCENARIO.relative_to(REPO)),
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


if __name__ == "__main__":
    main()
