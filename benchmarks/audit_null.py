"""Issue #22: the false-warning rate of the whole ``fedgen audit`` when nothing leaks.

One run is trained (digits, a VAE at one site, no DP: a model that does memorise its own
training records). The audit is then given records the model never saw as *both* roles:
the run's held-out records are split at random into two disjoint halves, one passed as
``--train`` (the "members") and one as ``--holdout``. Every verdict-giving test runs, as
a site runs the command: ``fedgen audit --samples S --train T --holdout H --model CKPT``
(GAN-Leaks, calibrated GAN-Leaks and DOMIAS in the data and feature spaces, the
white-box loss attack, the seed-stability check over the default reference seeds). Any
*warning* or *violation* in an audit is a false one; the family-wise design
(docs/audit.md, "How a membership verdict is decided") promises at most 5 % of audits.

Each repetition draws a new split, new samples (``fedgen sample`` seed) and a new audit
``--seed``.

    OMP_NUM_THREADS=1 python benchmarks/audit_null.py [--audits 40] [--n-train 300] [--steps 300]

Writes benchmarks/results/audit_null.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def trained_run(root: Path, *, n_train: int, steps: int) -> Path:
    """A one-site digits run, trained one round by the client's own code and checkpointed
    as server/run.py does."""
    from flwr.app import Context, RecordDict

    from fedgen.client.site import load_site_data
    from fedgen.client.task import train_site
    from fedgen.contract import rundir
    from fedgen.contract.scenario import scenario_from_dict
    from fedgen.contract.task import build_global_model, task_from_scenario
    from fedgen.simulations.prepare import write_run_dir

    scenario = scenario_from_dict({
        "name": "null", "seed": 0, "data": {"format": "digits", "holdout_fraction": 1 - n_train / 1797},
        "federation": {"num_sites": 1, "rounds": 1}, "model": {"family": "vae", "hidden": 256, "latent_dim": 16},
        "training": {"local_steps": steps, "batch_size": 32, "lr": 2e-3}, "privacy": {"enabled": False}})
    run_dir = write_run_dir(scenario, root / "null")
    spec = rundir.DataSpec.read(run_dir)
    ctx = Context(run_id=0, node_id=0, node_config={"partition-id": 0, "num-partitions": 1}, state=RecordDict(),
                  run_config={})
    model, result, _ = train_site(task_from_scenario(scenario, spec), load_site_data(ctx, conditional=True,
                                                                                     run_dir=str(run_dir)),
                                  build_global_model(scenario, spec).state_dict(), site="0", server_round=1,
                                  ledger=None)
    assert result.status == "trained", result
    (run_dir / rundir.CHECKPOINTS).mkdir()
    torch.save({"model": model.state_dict(), "scenario": scenario.resolved()},
               run_dir / rundir.CHECKPOINTS / "latest.pt")
    return run_dir


def null_audit(run_dir: Path, folder: Path, i: int, *, n_samples: int) -> dict:
    """Audit ``i``: two disjoint random halves of the run's held-out records as train and
    held-out; returns the verdict levels and the time."""
    from fedgen.contract import rundir
    from fedgen.simulations import cli
    from fedgen.simulations.sampling import sample_run

    x, y = rundir.read_reference(run_dir)
    order = np.random.default_rng([i, 22]).permutation(len(x))
    half = len(x) // 2
    for name, rows in (("train", order[:half]), ("holdout", order[half:2 * half])):
        np.savez(folder / f"{name}.npz", x=x[rows], **({} if y is None else {"y": y[rows]}))
    samples = sample_run(run_dir, n=n_samples, out=folder / "samples.npz", seed=i)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = cli.main(["audit", "--samples", str(samples), "--train", str(folder / "train.npz"),
                         "--holdout", str(folder / "holdout.npz"), "--model",
                         str(run_dir / rundir.CHECKPOINTS / "latest.pt"), "--seed", str(i),
                         "--out", str(folder / "audit")])
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"audit {i} exited {code}")
    audit = json.loads((folder / "audit" / "audit.json").read_text())
    levels = {v["topic"] + (" / " + v["text"].split(":")[0] if v["level"] in ("warning", "violation") else ""):
              v["level"] for v in audit["verdicts"]}
    counts = {lvl: sum(v["level"] == lvl for v in audit["verdicts"]) for lvl in
              ("ok", "warning", "violation", "inconclusive", "info")}
    warned = [v["text"] for v in audit["verdicts"] if v["level"] in ("warning", "violation")]
    return {"audit": i, "seconds": round(seconds, 1), "counts": counts, "warned": warned,
            "any_warning": bool(warned), "topics": sorted(levels)}


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--audits", type=int, default=40)
    ap.add_argument("--n-train", type=int, default=300, help="records the run trains on")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "audit_null.json")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from scipy.stats import binomtest

    from fedgen.privacy.ledger import atomic_write_text

    with tempfile.TemporaryDirectory(prefix="fedgen-audit-null-") as tmp:
        os.environ.setdefault("FEDGEN_CACHE", str(Path(tmp) / "cache"))
        run_dir = trained_run(Path(tmp), n_train=args.n_train, steps=args.steps)
        rows = []
        for i in range(args.audits):
            folder = Path(tmp) / f"audit_{i:03d}"
            folder.mkdir()
            rows.append(null_audit(run_dir, folder, i, n_samples=args.samples))
            print(json.dumps(rows[-1]), flush=True)
    warned = sum(r["any_warning"] for r in rows)
    ci = binomtest(warned, len(rows)).proportion_ci(0.95, method="exact")
    result = {"benchmark": "audit_null", "settings": {**{k: v for k, v in vars(args).items() if k != "out"},
                                                     "data": "sklearn digits 8x8 (fedgen digits)",
                                                     "model": "VAE hidden 256 latent 16, no DP",
                                                     "roles": "train and holdout = disjoint random halves of the "
                                                              "run's held-out records"},
              "audits": len(rows), "audits_with_a_warning": warned,
              "false_warning_rate": warned / len(rows), "rate_95ci_exact": [round(ci.low, 4), round(ci.high, 4)],
              "median_seconds_per_audit": float(np.median([r["seconds"] for r in rows])), "rows": rows,
              "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__}
    atomic_write_text(args.out, json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("audits", "audits_with_a_warning", "false_warning_rate",
                                              "rate_95ci_exact", "median_seconds_per_audit")}))
    return result


if __name__ == "__main__":
    main()
