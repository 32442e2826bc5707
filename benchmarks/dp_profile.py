"""Where a DP-SGD step's time goes, per model family (issue 4): one local round with DP
and one without, each under ``torch.profiler``, compared operator by operator.

    python benchmarks/dp_profile.py [--data digits|mnist] [--batch 64] [--steps 30] [--mode auto]

For each family it reports the wall time per step with and without DP, the time spent
inside torch operators (the rest is Python: the loop, Opacus' hooks and bookkeeping) and
the operators whose self time grew the most with DP. Writes
benchmarks/results/dp_profile-<data>.json; docs/benchmarks.md explains the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from dp_overhead import MNIST, time_round  # the same round, model and settings as the ratio benchmark

from fedgen.client.data import load_data  # noqa: E402  (dp_overhead put the repository on sys.path)
from fedgen.shared_models import build_model, list_models  # noqa: E402

TOP = 8


def op_times(family: str, data, *, dp: bool, mode: str, steps: int, batch: int) -> tuple[float, dict[str, float]]:
    """(wall seconds per step, {operator: self CPU seconds per step}) of one profiled round."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        time_round(family, data, dp=dp, mode=mode, steps=steps, batch=batch)
        wall = (time.perf_counter() - t) / steps
    ops: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        ops[event.key] += event.self_cpu_time_total / 1e6 / steps
    return wall, dict(ops)


def compare(family: str, data, *, mode: str, steps: int, batch: int) -> dict:
    time_round(family, data, dp=True, mode=mode, steps=3, batch=batch)  # warm-up (imports, allocator)
    base_wall, base = op_times(family, data, dp=False, mode="auto", steps=steps, batch=batch)
    dp_wall, dp = op_times(family, data, dp=True, mode=mode, steps=steps, batch=batch)
    growth = sorted(((op, dp.get(op, 0.0) - base.get(op, 0.0)) for op in set(dp) | set(base)),
                    key=lambda kv: kv[1], reverse=True)
    profiled = sum(dp.values())
    return {
        "family": family,
        "mode": build_model(family, data_shape=data.shape, num_classes=data.num_classes).grad_sample_mode
        if mode == "auto" else mode,
        "non_dp_step_ms": 1e3 * base_wall, "dp_step_ms": 1e3 * dp_wall, "ratio": dp_wall / base_wall,
        "operator_ms_non_dp": 1e3 * sum(base.values()), "operator_ms_dp": 1e3 * profiled,
        "top_growth": [{"op": op, "extra_ms": 1e3 * extra, "dp_ms": 1e3 * dp.get(op, 0.0),
                        "non_dp_ms": 1e3 * base.get(op, 0.0)} for op, extra in growth[:TOP]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--mode", default="auto", help="grad_sample_mode for the DP side (auto = family default)")
    parser.add_argument("--families", nargs="*", default=[f for f in list_models() if f != "mmd"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_data("digits") if args.data == "digits" else load_data("mnist", MNIST)
    data = data.subset(range(min(len(data), 2000)))
    rows = []
    for family in args.families:
        row = compare(family, data, mode=args.mode, steps=args.steps, batch=args.batch)
        rows.append(row)
        print(f"{family:10s} {row['mode']:6s} non-DP {row['non_dp_step_ms']:6.1f} ms  DP {row['dp_step_ms']:6.1f} ms "
              f"({row['ratio']:.2f}x; operators {row['operator_ms_non_dp']:.1f} -> {row['operator_ms_dp']:.1f} ms)")
        for g in row["top_growth"][:5]:
            print(f"    +{g['extra_ms']:6.2f} ms  {g['op']}  ({g['non_dp_ms']:.2f} -> {g['dp_ms']:.2f})")
    out = Path(__file__).resolve().parent / "results" / f"dp_profile-{args.data}.json"
    out.write_text(json.dumps({"data": args.data, "batch_size": args.batch, "steps": args.steps,
                               "threads": torch.get_num_threads(), "torch": torch.__version__, "results": rows},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
