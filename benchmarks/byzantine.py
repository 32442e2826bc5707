"""Byzantine sites vs aggregation rules: two of ten sites send their DP-VAE update
sign-flipped and scaled x10 (scenarios/byzantine-digits.yaml). Each rule runs the same
seeded scenario; the held-out loss (ELBO bits/dim on the held-out split) and domain FID
after the last round are compared with a clean FedAvg run in the same invocation.

    python benchmarks/byzantine.py [--rounds 5]

Writes benchmarks/results/byzantine.json. Target (issue 9): a robust rule stays within
10 % of the clean run's held-out loss while plain FedAvg degrades visibly.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import simulate

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "byzantine-digits.yaml"

# name -> --set overrides on top of the scenario
VARIANTS = {
    "clean fedavg": ["simulation.byzantine=null", "federation.strategy=fedavg"],
    "attacked fedavg (no norm check)": ["federation.strategy=fedavg", "federation.outlier_factor=null"],
    "attacked fedavg (default 10x-median norm check)": ["federation.strategy=fedavg"],
    "attacked fedavg + norm bound 20": ["federation.strategy=fedavg", "federation.outlier_factor=null",
                                        "federation.norm_bound=20"],
    "attacked fedmedian": ["federation.strategy=fedmedian", "federation.outlier_factor=null"],
    "attacked fedtrimmedavg (0.2)": ["federation.strategy=fedtrimmedavg", "federation.outlier_factor=null"],
    "attacked multikrum (f=2, m=6)": ["federation.strategy=multikrum", "federation.byzantine_sites=2",
                                      "federation.krum_select=6", "federation.outlier_factor=null"],
}


def run(name: str, overrides: list[str], rounds: int, tmp: Path) -> dict:
    out = tmp / name.replace(" ", "_").replace("(", "").replace(")", "")
    summary = simulate(SCENARIO, out, [f"federation.rounds={rounds}", *overrides], label=name)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"overrides": overrides, "heldout_nll_bits_per_dim": summary["metrics"]["heldout_nll_bits_per_dim"],
            "fid_domain": summary["metrics"]["fid_domain"], "epsilon": summary["epsilon"],
            "rejected_or_set_aside": [r.get("failures") or r.get("robust") or r.get("clients_norm_bounded")
                                      for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in VARIANTS.items():
            results[name] = run(name, overrides, args.rounds, Path(tmp))
            print(f"{name}: held-out {results[name]['heldout_nll_bits_per_dim']:.4f} bits/dim, "
                  f"FID {results[name]['fid_domain']:.0f}", flush=True)
    clean = results["clean fedavg"]["heldout_nll_bits_per_dim"]
    for r in results.values():
        r["heldout_loss_ratio_to_clean"] = r["heldout_nll_bits_per_dim"] / clean
    out = ROOT / "benchmarks" / "results" / "byzantine.json"
    out.write_text(json.dumps({"scenario": str(SCENARIO.relative_to(ROOT)), "rounds": args.rounds,
                               "runs": results, "target_ratio": 1.10}, indent=2))
    print("\nheld-out loss relative to the clean run (target for a robust rule: <= 1.10):")
    for name, r in results.items():
        print(f"  {r['heldout_loss_ratio_to_clean']:6.3f}  {name}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
