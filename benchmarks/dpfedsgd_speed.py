"""A site's DP-FedSGD round (issue 19): per-record gradients by one backward pass a record
against Opacus' per-sample hooks, measured side by side in one run.

    python benchmarks/dpfedsgd_speed.py [--reps 5] [--baseline main] [--result NAME]

For the quickstart VAE (digits 8x8, hidden 128, latent 8: 55 376 parameters) and the
flow of scenarios/flow-digits.yaml, one site of 287 records Poisson-sampled at
q = 250/300 (the quickstart's DP-FedSGD plan: eps 10, 60 rounds, 5 sites, t = 3, 62 bits,
max_records 300), the same seeded sample every repetition:

- ``round``: the whole ``distributed_sgd_round`` (sample, gradients, rounding, Skellam share,
  ledger) with ``gradients="loop"`` and ``"vectorised"`` (the default, ``gradient_method``);
- ``gradients``: the per-record gradients alone: main's loop (one forward and one backward
  pass a record), ``LOOP`` (one forward pass over the sample, one backward pass a record)
  and ``VECTORISED`` (one forward, one backward with Opacus' per-sample hooks);
- ``rounding``: ``round_records`` of the sample's rows, and ``rounding_main``: the same with
  ``privacy/skellam.py`` as it is at ``--baseline`` (default ``main``; loaded from git), whose
  integers must be identical (the same draws).

Medians of ``--reps`` repetitions, interleaved (the machine is shared: each ratio compares
timings taken under the same load), torch on one thread. Writes
benchmarks/results/<NAME>.json (default dpfedsgd_speed).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, environment, load_average, write_result  # noqa: E402

from fedgen.client.data import SiteData  # noqa: E402
from fedgen.client.training import distributed_sgd_round  # noqa: E402
from fedgen.privacy.dp_fedsgd import (LOOP, VECTORISED, gradient_method, per_record_gradients,  # noqa: E402
                                      plan_dp_fedsgd, private_step_parameters, the_private_step)
from fedgen.privacy.dp_sgd import poisson_sample  # noqa: E402
from fedgen.privacy.ledger import SiteLedger  # noqa: E402
from fedgen.privacy.skellam import round_records  # noqa: E402
from fedgen.shared_models import Batch, build_model  # noqa: E402

FAMILIES = {
    "vae": dict(family="vae", hidden=128, latent_dim=8),
    "flow": dict(family="flow", levels=17, hidden=16, coupling_layers=4, temperature=0.7),
}
N, CLIP = 287, 1.0


def _model(spec: dict):
    torch.manual_seed(0)
    kw = {k: v for k, v in spec.items() if k != "family"}
    return build_model(spec["family"], data_shape=(1, 8, 8), num_classes=10, **kw)


def _mains_loop(model, batch: Batch) -> torch.Tensor:
    """main's per-record gradients: one forward and one backward pass a record."""
    step, params = the_private_step(model), private_step_parameters(model)
    rows = []
    for i in range(batch.size):
        loss = step.loss(Batch(x=batch.x[i:i + 1], y=batch.y[i:i + 1], size=1)).sum()
        rows.append(torch.cat([g.reshape(-1).double() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def _baseline_skellam(rev: str):
    """``privacy/skellam.py`` as it is at git revision ``rev``, imported beside today's."""
    text = subprocess.run(["git", "show", f"{rev}:privacy/skellam.py"], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="dpfedsgd_speed_")) / "skellam_baseline.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("fedgen.privacy._skellam_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, spec: dict, reps: int, baseline) -> dict:
    model = _model(spec)
    g = torch.Generator().manual_seed(1)
    data = SiteData(x=torch.rand(N, 1, 8, 8, generator=g), y=torch.randint(0, 10, (N,), generator=g),
                    num_classes=10, source="benchmark")
    plan = plan_dp_fedsgd(model, epsilon=10.0, delta=1e-5, bits=62, num_sites=5, threshold=3, max_records=300,
                          batch_size=250, rounds=60)
    idx = poisson_sample(N, plan.sample_rate, torch.Generator().manual_seed(2))
    batch = Batch(x=data.x[idx], y=data.y[idx], size=len(idx))
    rows = per_record_gradients(model, batch, VECTORISED)[0]
    ours = round_records(rows / CLIP, plan, torch.Generator().manual_seed(3))
    assert torch.equal(ours, baseline.round_records(rows / CLIP, plan, torch.Generator().manual_seed(3)))

    def round_with(method: str) -> None:
        ledger = SiteLedger(site="0", accountant="rdp", delta=1e-5, target_epsilon=1e9, max_grad_norm=CLIP)
        res = distributed_sgd_round(model, data, plan=plan, clip_norm=CLIP, ledger=ledger, server_round=1,
                                    sampling=torch.Generator().manual_seed(2), device=torch.device("cpu"), run=None,
                                    gradients=method)
        assert res.status == "trained"

    cases = {
        "round_loop": lambda: round_with(LOOP),
        "round_vectorised": lambda: round_with(VECTORISED),
        "gradients_mains_loop": lambda: _mains_loop(model, batch),
        "gradients_loop": lambda: per_record_gradients(model, batch, LOOP),
        "gradients_vectorised": lambda: per_record_gradients(model, batch, VECTORISED),
        "rounding": lambda: round_records(rows / CLIP, plan, torch.Generator().manual_seed(3)),
        "rounding_main": lambda: baseline.round_records(rows / CLIP, plan, torch.Generator().manual_seed(3)),
    }
    for fn in cases.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for k, fn in cases.items():
            times[k].append(_timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "parameters": plan.dim, "sampled_records": len(idx), "method_chosen": gradient_method(model),
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "all_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "ratios": {
            "round_loop_over_vectorised": round(med["round_loop"] / med["round_vectorised"], 2),
            "gradients_mains_loop_over_vectorised": round(med["gradients_mains_loop"] / med["gradients_vectorised"], 2),
            "gradients_loop_over_vectorised": round(med["gradients_loop"] / med["gradients_vectorised"], 2),
            "rounding_main_over_today": round(med["rounding_main"] / med["rounding"], 2),
        },
    }
    print(f"{name}: d={plan.dim}, {len(idx)} records, medians (s): "
          + ", ".join(f"{k} {v:.3f}" for k, v in med.items())
          + "; ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in out["ratios"].items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--baseline", default="main", help="git revision whose round_records is the rounding baseline")
    ap.add_argument("--result", default="dpfedsgd_speed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_before = load_average()
    baseline = _baseline_skellam(args.baseline)
    results = {name: measure(name, FAMILIES[name], args.reps, baseline) for name in args.families}
    path = write_result(args.result, {"environment": environment(), "baseline": args.baseline,
                                      "load_before": load_before,
                                      "load_after": load_average(), "reps": args.reps, "families": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
