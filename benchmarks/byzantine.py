"""Byzantine sites vs aggregation rules: two of ten sites send their DP-VAE update
sign-flipped and scaled x10 (scenarios/byzantine-digits.yaml). Each rule runs the same
seeded scenario; the held-out loss (ELBO bits/dim on the held-out split) and domain FID
after the last round are compared with a clean FedAvg run in the same invocation.

    python benchmarks/byzantine.py [--rounds 5]
    python benchmarks/byzantine.py --count-inflation-only

Writes benchmarks/results/byzantine.json. Target (issue 9): a robust rule stays within
10 % of the clean run's held-out loss while plain FedAvg degrades visibly.

Count inflation (issue 17, finding 5) is measured on the server alone, in a second: one
of ten sites sends an arbitrary update and claims 10^9 examples, which FedAvg's
example weighting turns into ~100 % of the aggregate unless ``sort_replies`` bounds the
count (by the site's partition size in simulation). The simulated sites cannot lie about
their counts (simulations/faults.py attacks only the update), so it needs no Flower run.
Writes benchmarks/results/byzantine-count-inflation.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

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


def _reply(site: int, update: dict[str, np.ndarray], count: float) -> Message:
    """A train reply as client/app.py's ``_reply`` builds it, as the SuperLink delivers it."""
    content = RecordDict({"metrics": MetricRecord({"num-examples": count, "status": 0, "train-loss": 1.0}),
                          "site": ConfigRecord({"id": str(site), "ledger": "", "message": ""}),
                          "arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in update.items()})})
    meta = Metadata(run_id=1, message_id=f"m{site}", src_node_id=100 + site, dst_node_id=0, reply_to_message_id="",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    return Message(content=content, metadata=meta)


def count_inflation(num_sites: int = 10, partition: int = 180, claim: float = 1e9) -> dict:
    """FedAvg's aggregate when site 0 sends ``-1`` everywhere and claims ``claim`` examples,
    with and without ``sort_replies``' count check: the aggregate's distance to the honest
    sites' mean and the attacker's share of the example weights."""
    from fedgen.server.strategies import build_strategy
    from fedgen.server.updates import sort_replies

    rng = np.random.default_rng(0)
    shapes = {"w": (64, 32), "b": (32,)}
    global_model = {k: np.zeros(s, dtype=np.float32) for k, s in shapes.items()}
    honest = [{k: (0.1 + 0.01 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
              for _ in range(num_sites - 1)]
    attacker = {k: np.full(s, -1.0, dtype=np.float32) for k, s in shapes.items()}
    replies = [_reply(0, attacker, claim)] + [_reply(i + 1, u, partition) for i, u in enumerate(honest)]
    honest_mean = {k: np.mean([u[k] for u in honest], axis=0) for k in shapes}
    fed = {"fraction_fit": 1.0, "min_fit_sites": 1}

    def distance(ok: list[Message]) -> float:
        arrays, _ = build_strategy("fedavg", fed).aggregate_train(1, ok)
        return float(np.sqrt(sum(np.sum((arrays[k].numpy() - honest_mean[k]) ** 2) for k in shapes)))

    sorted_ = sort_replies(replies, ArrayRecord({k: torch.from_numpy(v) for k, v in global_model.items()}),
                           sent_to=[100 + i for i in range(num_sites)],
                           site_examples={str(i): partition for i in range(num_sites)}, outlier_factor=None)
    attacker_distance = float(np.sqrt(sum(np.sum((attacker[k] - honest_mean[k]) ** 2) for k in shapes)))
    return {"claimed_examples": claim, "partition_size": partition, "sites": num_sites,
            "attacker_to_honest_mean": attacker_distance,
            "before_unchecked": {"aggregate_to_honest_mean": distance(replies),
                                 "attacker_weight": claim / (claim + partition * (num_sites - 1))},
            "after_checked": {"aggregate_to_honest_mean": distance(sorted_.ok), "attacker_weight": 0.0,
                              "rejected": sorted_.failed}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count-inflation-only", action="store_true", help="only the server-side count attack")
    args = parser.parse_args()
    inflation = count_inflation()
    out = ROOT / "benchmarks" / "results" / "byzantine-count-inflation.json"
    out.write_text(json.dumps(inflation, indent=2))
    print(f"count inflation (one of {inflation['sites']} sites claims {inflation['claimed_examples']:.0e} examples): "
          f"aggregate-to-honest-mean distance {inflation['before_unchecked']['aggregate_to_honest_mean']:.3f} "
          f"unchecked (the attacker's own is {inflation['attacker_to_honest_mean']:.3f}), "
          f"{inflation['after_checked']['aggregate_to_honest_mean']:.3g} with the count check -> {out}")
    if args.count_inflation_only:
        return
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
