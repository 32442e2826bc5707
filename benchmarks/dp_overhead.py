"""DP-SGD overhead per model family: time of one local training step with DP vs without,
measured side by side in one process, for every per-example clipping mode (Opacus'
ghost / hooks / functorch and Book-Keeping, privacy/book_keeping.py).

    python benchmarks/dp_overhead.py [--data digits|mnist] [--batch 64] [--steps 30] [--modes bk ghost]

Prints a table and writes benchmarks/results/dp_overhead-<data>[-b<batch>].json. Ratios, not
absolute times, are the result: both sides run interleaved on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedgen.client.data import load_data  # noqa: E402
from fedgen.client.training import new_site_ledger, run_local_round  # noqa: E402
from fedgen.contract.task import PrivacyConfig, TrainingConfig
from fedgen.privacy.dp_sgd import GRAD_SAMPLE_MODES  # noqa: E402
from fedgen.shared_models import build_model, list_models  # noqa: E402

MNIST = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mnist"


def time_round(family: str, data, *, dp: bool, mode: str, steps: int, batch: int) -> float:
    """Seconds per training iteration of one local round (model built outside the clock)."""
    torch.manual_seed(0)
    model = build_model(family, data_shape=data.shape, num_classes=data.num_classes)
    privacy = PrivacyConfig(enabled=dp, target_epsilon=1e6, delta=1e-5, max_grad_norm=1.0,
                            grad_sample_mode=mode, planned_rounds=1)
    ledger = new_site_ledger("0", privacy) if dp else None
    if ledger is not None:  # sigma fixed up front: calibration is a once-per-run cost, not a step cost
        ledger.noise_multiplier, ledger.sample_rate = 1.0, min(1.0, batch / len(data))
    training = TrainingConfig(local_steps=steps, batch_size=batch, lr=1e-3)
    t = time.perf_counter()
    run_local_round(model, data, training=training, privacy=privacy, ledger=ledger, server_round=1, seed=0)
    return (time.perf_counter() - t) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--families", nargs="*", default=None,
                        help="default: every family trained by DP-SGD (release families such as mmd have no DP step)")
    parser.add_argument("--modes", nargs="*", choices=GRAD_SAMPLE_MODES, default=list(GRAD_SAMPLE_MODES))
    parser.add_argument("--result", default=None, help="results file stem (default dp_overhead-<data>[-b<batch>])")
    args = parser.parse_args()
    load_start = [round(v, 2) for v in os.getloadavg()]
    torch.set_num_threads(1)
    data = load_data("digits") if args.data == "digits" else load_data("mnist", MNIST)
    data = data.subset(range(min(len(data), 2000)))
    models = {f: build_model(f, data_shape=data.shape, num_classes=data.num_classes)
              for f in args.families or list_models()}
    families = args.families or [f for f, m in models.items() if m.training_mode == "sgd"]
    results = []
    for family in families:
        default_mode = models[family].grad_sample_mode
        time_round(family, data, dp=False, mode="auto", steps=3, batch=args.batch)  # warm-up
        row = {"family": family, "default_mode": default_mode}
        for mode in ("off", *args.modes):
            samples = []
            for _ in range(args.repeats):  # interleave DP and non-DP so machine noise hits both
                base = time_round(family, data, dp=False, mode="auto", steps=args.steps, batch=args.batch)
                if mode == "off":
                    samples.append((base, base))
                    continue
                try:
                    dp = time_round(family, data, dp=True, mode=mode, steps=args.steps, batch=args.batch)
                except Exception as err:  # a mode may not support a layer: record why
                    row[mode] = {"error": f"{type(err).__name__}: {str(err)[:120]}"}
                    break
                samples.append((base, dp))
            else:
                if mode == "off":
                    row["non_dp_step_s"] = statistics.median(b for b, _ in samples)
                else:
                    row[mode] = {"dp_step_s": statistics.median(d for _, d in samples),
                                 "ratio": statistics.median(d / b for b, d in samples)}
        row["default_ratio"] = row.get(default_mode, {}).get("ratio")
        results.append(row)
        cells = "  ".join(f"{m} {row[m]['ratio']:.2f}x" if "ratio" in row.get(m, {}) else f"{m} n/a"
                          for m in args.modes)
        print(f"{family:10s} non-DP {row['non_dp_step_s'] * 1e3:7.1f} ms/step  {cells}  (default: {default_mode})",
              flush=True)
    stem = args.result or f"dp_overhead-{args.data}" + ("" if args.batch == 64 else f"-b{args.batch}")
    out = Path(__file__).resolve().parent / "results" / f"{stem}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"data": args.data, "shape": list(data.shape), "batch_size": args.batch,
                               "steps": args.steps, "repeats": args.repeats, "torch": torch.__version__,
                               "machine": platform.processor() or platform.machine(),
                               "threads": torch.get_num_threads(), "load_start": load_start,
                               "load_end": [round(v, 2) for v in os.getloadavg()], "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
