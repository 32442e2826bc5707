"""Warm starts on the quickstart VAE (digits, 5 sites, DP-SGD to epsilon 10), seeded.

scikit-learn's 1 797 digits are split in two disjoint parts by a fixed permutation: 600
declared public, 1 197 private (the sites' data and the held-out 20 %). The quickstart
scenario runs on the private part three ways -- no warm start, a public warm start on the
600 public digits, and a DP-release warm start (epsilon_fraction of each site's budget) --
and the evaluation module's label agreement, TSTR (held-out split only) and domain FID
are read from each run's summary.json. Results: benchmarks/results/warm_start_digits.json.

    python benchmarks/warm_start_digits.py [--out DIR] [--only cold,public,release,public-lr0.002]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from sklearn.datasets import load_digits

REPO = Path(__file__).resolve().parent.parent
PUBLIC_COUNT = 600

VARIANTS = {
    "cold": None,
    "public": {"public": {"format": "npz", "path": "PUBLIC"}, "steps": 2000, "batch_size": 128, "lr": 0.001},
    "release": {"release": {"epsilon_fraction": 0.2}, "steps": 2000, "batch_size": 128, "lr": 0.001},
    # the public warm start, fine-tuned at a tenth of the quickstart's DP-SGD learning rate
    "public-lr0.002": {"public": {"format": "npz", "path": "PUBLIC"}, "steps": 2000, "batch_size": 128, "lr": 0.001},
}
#: training overrides per variant (the rest is the quickstart's)
TRAINING = {"public-lr0.002": {"lr": 0.002}}


def pretrain_only(run_dir: Path) -> dict:
    """The public warm start alone, no DP-SGD round: the global model that round 1 sends,
    scored like a run's last round (same reference split, sample count and seed offset)."""
    import shutil
    import tempfile

    from fedgen.contract import rundir
    from fedgen.contract.task import build_global_model
    from fedgen.server.evaluate import GlobalEvaluator
    from fedgen.server.warm_start import public_warm_start

    scenario, spec = rundir.read_scenario(run_dir), rundir.DataSpec.read(run_dir)
    model = build_global_model(scenario, spec)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(run_dir / "inputs", Path(tmp) / "inputs")
        public_warm_start(model, Path(tmp), scenario)
        evaluator = GlobalEvaluator(rundir.read_reference(run_dir), seed=scenario.seed)
        m = evaluator(model, num_samples=scenario.evaluation.num_samples,
                      round_seed=scenario.seed + scenario.federation.rounds,
                      grid_path=run_dir.parent / "public-pretrain-only.png", tstr=True)
    return {"epsilon": 0.0, "label_agreement": m.get("label_agreement"), "tstr_accuracy": m.get("tstr_accuracy"),
            "fid_domain": m.get("fid_domain")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "warm_start_digits")
    parser.add_argument("--only", default=",".join(VARIANTS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    d = load_digits()
    x, y = (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    public, private = order[:PUBLIC_COUNT], order[PUBLIC_COUNT:]
    np.savez(args.out / "public.npz", x=x[public], y=y[public])
    np.savez(args.out / "private.npz", x=x[private], y=y[private])
    base = yaml.safe_load((REPO / "scenarios" / "quickstart.yaml").read_text())
    base["data"] = {"format": "npz", "path": str(args.out / "private.npz"), "holdout_fraction": 0.2}
    base["privacy"]["seeded_noise"] = True
    base["evaluation"] = {"every": 0, "num_samples": 500, "tstr": True}
    results = {}
    for name in args.only.split(","):
        scenario = json.loads(json.dumps(base))
        ws = VARIANTS[name]
        if ws is not None:
            ws = json.loads(json.dumps(ws).replace("PUBLIC", str(args.out / "public.npz")))
            scenario["warm_start"] = ws
        scenario["training"].update(TRAINING.get(name, {}))
        scenario["name"] = f"warm-{name}"
        path = args.out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(scenario))
        run_dir = args.out / name
        t = time.time()
        subprocess.run([sys.executable, "-m", "fedgen.simulations.cli", "simulate", str(path), "--out", str(run_dir)],
                       check=True, cwd=REPO)
        summary = json.loads((run_dir / "summary.json").read_text())
        m = summary["metrics"]
        results[name] = {"seconds": round(time.time() - t, 1), "epsilon": summary["epsilon"],
                         "label_agreement": m.get("label_agreement"), "tstr_accuracy": m.get("tstr_accuracy"),
                         "fid_domain": m.get("fid_domain"), "warm_start": summary.get("warm_start")}
        print(name, json.dumps(results[name]), flush=True)
    if "public" in results:
        results["public-pretrain-only"] = pretrain_only(args.out / "public")
        print("public-pretrain-only", json.dumps(results["public-pretrain-only"]), flush=True)
    out = REPO / "benchmarks" / "results" / "warm_start_digits.json"
    previous = json.loads(out.read_text())["results"] if out.exists() else {}
    out.write_text(json.dumps({"public_examples": PUBLIC_COUNT, "private_examples": len(private),
                               "results": previous | results}, indent=2))


if __name__ == "__main__":
    main()
