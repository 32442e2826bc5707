"""Cost of per-round evaluation in the quickstart: seconds spent evaluating 2 000 samples
(domain FID/KID, PRDC, collapse, held-out likelihood, sample grid) as a share of the
round's wall time, measured in the same Flower run.

    python benchmarks/eval_cost.py [--samples 2000]

Writes benchmarks/results/eval_cost.json. Target (issue 5): <= 20 % of a round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "fedgen.simulations.cli", "simulate", str(ROOT / "scenarios" / "quickstart.yaml"),
               "--out", str(run), "--set", f"evaluation.num_samples={args.samples}"]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows  # round 1 also fits the feature extractor (once per run, cached on disk)
    shares = [r["eval_seconds"] / r["seconds"] for r in steady]
    result = {"samples": args.samples, "rounds": len(rows),
              "round_seconds": [r["seconds"] for r in rows], "eval_seconds": [r["eval_seconds"] for r in rows],
              "median_eval_share_after_round_1": statistics.median(shares),
              "round_1_eval_share": rows[0]["eval_seconds"] / rows[0]["seconds"], "target_share": 0.20}
    out = ROOT / "benchmarks" / "results" / "eval_cost.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"evaluation of {args.samples} samples: median {100 * result['median_eval_share_after_round_1']:.1f} % "
          f"of a round after round 1 (round 1: {100 * result['round_1_eval_share']:.1f} %, includes fitting the "
          f"feature extractor); target <= 20 %  -> {out}")


if __name__ == "__main__":
    main()
