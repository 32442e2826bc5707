"""Privacy-utility on MNIST, federated (issue 10): `scenarios/mnist-utility.yaml` (10 sites,
Dirichlet 0.5, 8 000 train / 2 000 held out, delta 1e-5) run with `fedgen simulate` at
each requested epsilon; TSTR (10 000 labelled samples, tested on held-out images only),
domain FID, precision and recall are read from the run's summary.json, next to the
central plain-PyTorch baselines of ../shared/BASELINES.md.

    python benchmarks/privacy_utility.py [--epsilons 10 1] [--set key=value ...]
    python benchmarks/privacy_utility.py --from-runs runs/sweeps/privacy-utility-mnist

The second form runs nothing: it reads the ``mmd__privacy.target_epsilon=<E>`` run
directories of a finished ``fedgen sweep sweeps/privacy-utility-mnist.yaml`` (the same
scenario, evaluated once after its one round). Writes
benchmarks/results/privacy_utility.json and the sample grids (one row per class) to
docs/img/mnist-utility-eps<E>.png. Targets: TSTR >= 85 % at epsilon 10, >= 75 % at 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from _common import simulate

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "mnist-utility.yaml"
TARGETS = {10.0: 0.85, 1.0: 0.75}
BASELINES = {10.0: {"dp-vae (ghost)": 0.697, "dp-merf (mlp)": 0.728}, 1.0: {"dp-vae (ghost)": 0.315,
                                                                          "dp-merf (mlp)": 0.719}}


def run(epsilon: float, overrides: list[str], folder: Path) -> dict:
    out = folder / f"eps{epsilon:g}"
    summary = simulate(SCENARIO, out, [f"privacy.target_epsilon={epsilon}", *overrides], label=f"epsilon {epsilon}")
    return result_row(epsilon, out, summary)


def from_run(epsilon: float, run_dir: Path) -> dict:
    if not (run_dir / "summary.json").exists():
        raise SystemExit(f"{run_dir}: no summary.json; run the sweep first")
    return result_row(epsilon, run_dir, json.loads((run_dir / "summary.json").read_text()))


def result_row(epsilon: float, out: Path, summary: dict) -> dict:
    grids = sorted((out / "samples").glob("round-*.png"))
    img = ROOT / "docs" / "img" / f"mnist-utility-eps{epsilon:g}.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(grids[-1], img)
    m = summary["metrics"]
    return {"epsilon_target": epsilon, "epsilon": summary["epsilon"], "delta": summary["delta"],
            "tstr_accuracy": m.get("tstr_accuracy"), "trtr_accuracy": m.get("trtr_accuracy"),
            "fid_domain": m.get("fid_domain"), "precision": m.get("precision"), "recall": m.get("recall"),
            "coverage": m.get("coverage"), "wall_seconds": summary["wall_seconds"],
            "grid": str(img.relative_to(ROOT)), "target_tstr": TARGETS.get(epsilon),
            "central_baselines_tstr": BASELINES.get(epsilon, {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[10.0, 1.0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--from-runs", type=Path, default=None, metavar="SWEEP_DIR",
                        help="read the mmd runs of a finished privacy-utility-mnist sweep instead of running")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for eps in args.epsilons:
            if args.from_runs is not None:
                results.append(from_run(eps, args.from_runs / f"mmd__privacy.target_epsilon={eps:g}"))
            else:
                results.append(run(eps, args.set, Path(tmp)))
            r = results[-1]
            met = "" if r["target_tstr"] is None else (" (target met)" if r["tstr_accuracy"] >= r["target_tstr"]
                                                       else f" (target {r['target_tstr']:.0%} missed)")
            print(f"epsilon {r['epsilon']:.3f}: TSTR {r['tstr_accuracy']:.1%}{met}, TRTR {r['trtr_accuracy']:.1%}, "
                  f"FID {r['fid_domain']:.1f}, precision {r['precision']:.2f}, recall {r['recall']:.2f}, "
                  f"{r['wall_seconds']:.0f} s", flush=True)
    out = ROOT / "benchmarks" / "results" / "privacy_utility.json"
    source = {"from_runs": str(args.from_runs)} if args.from_runs is not None else {}
    out.write_text(json.dumps({"scenario": str(SCENARIO.relative_to(ROOT)), "overrides": args.set, **source,
                               "runs": results}, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
