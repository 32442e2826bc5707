"""The public classifier as a sample filter (the mmd family's ``public_filter``; docs/models.md,
"mmd with perceptual features"), measured side by side on finished runs, with what the
public data give on their own.

    python benchmarks/public_filter.py RUN_DIR [RUN_DIR ...] [--threshold 0.5]
    # -> benchmarks/results/public_filter.json, and a table on stdout

For every run (an mmd run with perceptual features) it loads the final model and scores,
with the run's own evaluation (server/evaluate.py: the same seed, sample count, reference and
metrics as the run's last round), its samples unfiltered and filtered at ``--threshold``:
TSTR, domain FID, precision / recall / coverage, label agreement, and the share of first
draws the public classifier accepts. Beside them, once per reference set, **the public set
alone**: the TSTR classifier trained on as many randomly distorted public images
(``digits-fonts-28`` through the perceptual network's own augmentation) and tested on the
same real half -- what a user gets from the public data without any private data, the
figure the private pipeline has to beat to be worth its budget.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _common import environment, load_average, write_result
from fedgen.contract import rundir
from fedgen.evaluation.tstr import public_only_tstr
from fedgen.server.evaluate import GlobalEvaluator
from fedgen.simulations.sampling import load_run_model
from fedgen.simulations.warm_start import digits_fonts_28

METRICS = ("tstr_accuracy", "fid_domain", "precision", "recall", "coverage", "label_agreement")


def public_alone(reference: tuple[np.ndarray, np.ndarray], n: int, seed: int) -> float:
    """TSTR's classifier trained on ``n`` distorted ``digits-fonts-28`` images, tested on the
    same real-test half as every run's TSTR (evaluation/tstr.py, ``public_only_tstr``: what a
    run that declares this public set records in ``summary.json``)."""
    x, y = digits_fonts_28()
    return public_only_tstr(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(reference[0]).float(),
                            torch.from_numpy(reference[1]).long(), n=n, num_classes=10, seed=seed).tstr_accuracy


def score_run(run_dir: Path, threshold: float) -> dict:
    scenario = rundir.read_scenario(run_dir)
    model = load_run_model(run_dir)
    if getattr(model, "perceptual_weight", 0.0) <= 0:
        sys.exit(f"{run_dir}: not an mmd run with perceptual features (model.perceptual_weight: 0)")
    reference = np.load(run_dir / "inputs" / "reference.npz")
    evaluator = GlobalEvaluator((reference["x"], reference["y"]), seed=scenario.seed)
    num_samples = scenario.evaluation.num_samples
    round_seed = scenario.seed + scenario.federation.rounds  # the run's last evaluation
    row: dict = {"run": str(run_dir), "epsilon": scenario.privacy.target_epsilon,
                 "secure_aggregation": scenario.federation.secure_aggregation is not None,
                 "public_set": scenario.warm_start.public.format if scenario.warm_start else None}
    torch.manual_seed(round_seed)
    labels = model.balanced_labels(num_samples)
    model.public_filter = 0.0
    with torch.no_grad():
        first_draws = model.sample(num_samples, labels)
        model.public_filter = threshold
        row["acceptance"] = float(model.publicly_recognised(first_draws, labels).float().mean())
    for name, level in (("unfiltered", 0.0), ("filtered", threshold)):
        model.public_filter = level
        t0 = time.time()
        metrics = evaluator(model, num_samples=num_samples, round_seed=round_seed,
                            grid_path=run_dir / "samples" / f"public-filter-{name}.png", tstr=True)
        row[name] = {k: metrics.get(k) for k in METRICS} | {"seconds": round(time.time() - t0, 1)}
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--threshold", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [score_run(run, args.threshold) for run in args.runs]
    first = np.load(args.runs[0] / "inputs" / "reference.npz")
    scenario = rundir.read_scenario(args.runs[0])
    public = public_alone((first["x"], first["y"]), scenario.evaluation.num_samples, scenario.seed)
    print(f"public set alone (digits-fonts-28, distorted, {scenario.evaluation.num_samples} images): "
          f"TSTR {public:.1%}")
    print("| run | ε | accepted | TSTR unfiltered → filtered | ratio | FID | precision | recall | label agreement |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        u, f = r["unfiltered"], r["filtered"]
        print(f"| {Path(r['run']).name} | {r['epsilon']:g} | {r['acceptance']:.2f} | {u['tstr_accuracy']:.1%} → "
              f"{f['tstr_accuracy']:.1%} | {f['tstr_accuracy'] / u['tstr_accuracy']:.3f} | {u['fid_domain']:.1f} → "
              f"{f['fid_domain']:.1f} | {u['precision']:.2f} → {f['precision']:.2f} | {u['recall']:.2f} → "
              f"{f['recall']:.2f} | {u['label_agreement']:.2f} → {f['label_agreement']:.2f} |")
    path = write_result("public_filter", {"environment": environment(), "load_average": load_average(),
                                          "threshold": args.threshold, "public_only_tstr": public, "runs": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
