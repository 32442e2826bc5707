"""How much noise the mmd release carries on the MNIST federation, local vs distributed (issue 19).

    python benchmarks/distributed_noise.py RUN_DIR [--epsilons 1 10] [--result NAME]

``RUN_DIR``: any run directory of ``scenarios/mnist-utility.yaml`` or
``mnist-utility-secagg.yaml`` (the same seed and partition): its ``inputs/partitions.npz``
gives every site's class counts. For each epsilon, the per-coordinate noise variance of
the released mean embedding (features), computed from public quantities only:

- ``noise: local``, FedAvg's average: every site's sigma (PRV, its whole epsilon), ``sum_k sigma^2 / N^2``;
- ``noise: local``, the precision-weighted combination (``shared_models/release.py``, the
  scenario's default), from the true class counts;
- ``noise: distributed`` (``privacy/skellam.py``): the planned Skellam variance over the
  scale squared, with all 10 sites' shares in the sum (``mu * 10 / 7``) and with exactly
  the threshold's 7.

Also each as the sigma of one central Gaussian release of the whole federation's sum with
the same noise (``sqrt(variance) * N``). Writes benchmarks/results/<NAME>.json
(default distributed_noise).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from fedgen.client.data import read_mnist
from fedgen.contract.scenario import load_scenario
from fedgen.privacy.accounting import calibrate_noise_multiplier
from fedgen.privacy.skellam import plan_distributed_release
from fedgen.shared_models.release import precision_weighted_release

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 10.0])
    ap.add_argument("--result", default="distributed_noise")
    args = ap.parse_args()
    scenario = load_scenario(REPO / "scenarios" / "mnist-utility-secagg.yaml")
    sec, model, privacy = scenario.federation.secure_aggregation, scenario.model.options, scenario.privacy
    site_data = json.loads((args.run_dir / "inputs" / "site_data.json").read_text())
    labels = read_mnist(site_data["path"]).y.numpy()
    parts = np.load(args.run_dir / "inputs" / "partitions.npz")
    sites = scenario.federation.num_sites
    counts = np.stack([np.bincount(labels[parts[f"site_{k}"]], minlength=10) for k in range(sites)]).astype(float)
    n, w, features = counts.sum(), float(model["count_weight"]), int(model["num_features"])
    rows = []
    for eps in args.epsilons:
        sigma = calibrate_noise_multiplier(target_epsilon=eps, delta=privacy.delta, sample_rate=1.0, steps=1,
                                           accountant=privacy.accountant)
        sums = torch.zeros(sites, 10, features + 1, dtype=torch.float64)
        sums[..., -1] = torch.tensor(counts) * w
        _, precision = precision_weighted_release(sums, torch.full((sites,), sigma), n, w)
        rel = plan_distributed_release(epsilon=eps, delta=privacy.delta, bits=sec.bits, num_sites=sites,
                                       threshold=sec.threshold, max_records=sec.max_records, dim=features + 1,
                                       size=10 * (features + 1))
        variances = {"local_fedavg": sites * sigma ** 2 / n ** 2, "local_precision": precision,
                     "distributed_all_sites": rel.share * sites / rel.scale ** 2 / n ** 2,
                     "distributed_threshold_sites": rel.mu / rel.scale ** 2 / n ** 2}
        row = {"epsilon": eps, "local_sigma": sigma, "scale": rel.scale, "skellam_mu": rel.mu,
               "skellam_sigma_equivalent": math.sqrt(rel.mu) / rel.l2, "epsilon_distributed": rel.epsilon(privacy.delta),
               "variance": variances, "central_sigma": {k: math.sqrt(v) * n for k, v in variances.items()},
               "precision_over_distributed": precision / variances["distributed_all_sites"]}
        rows.append(row)
        print(f"eps {eps:g}: central-equivalent sigma  fedavg {row['central_sigma']['local_fedavg']:.2f}  "
              f"precision {row['central_sigma']['local_precision']:.2f}  distributed (10 sites) "
              f"{row['central_sigma']['distributed_all_sites']:.2f}  (7 sites) "
              f"{row['central_sigma']['distributed_threshold_sites']:.2f}; variance precision / distributed "
              f"{row['precision_over_distributed']:.2f}x")
    out = REPO / "benchmarks" / "results" / f"{args.result}.json"
    out.write_text(json.dumps({"records": int(n), "site_sizes": counts.sum(1).astype(int).tolist(), "rows": rows},
                              indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
