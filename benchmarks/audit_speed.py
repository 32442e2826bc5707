"""Issue 6 target: one audit of 2 000 synthetic samples against 8 000 MNIST training
records finishes in <= 2 minutes here.

MNIST's test split (10 000 images, the one available offline) gives 8 000 "training"
records and 2 000 held-out ones; a small conditional VAE is trained on the 8 000 for a
few hundred steps (not timed) to supply the samples and the white-box statistic. The
timed part is what ``fedgen audit --samples ... --model ...`` does after reading files:
the feature extractor fit (cold cache), white-box losses, every audit, the HTML report
and the atomic writes. Run by path:

    OMP_NUM_THREADS=1 python benchmarks/audit_speed.py [MNIST_DIR]
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
LIMIT_SECONDS = 120.0


def main(mnist_dir: Path) -> dict:
    os.environ["FEDGEN_CACHE"] = tempfile.mkdtemp(prefix="fedgen-cache-")  # cold: the fit is timed
    from fedgen.client.data import load_data
    from fedgen.client.training import run_local_round
    from fedgen.contract.task import PrivacyConfig, TrainingConfig
    from fedgen.privacy.audit import render_html
    from fedgen.shared_models import build_model
    from fedgen.simulations.audit_cli import AuditInputs, audit_inputs, write_audit

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    data = load_data("mnist", mnist_dir)
    train, holdout = data.subset(range(8000)), data.subset(range(8000, 10000))
    model = build_model("vae", data_shape=data.shape, num_classes=10, hidden=256, latent_dim=16)
    run_local_round(model, train, training=TrainingConfig(local_steps=300, batch_size=128, lr=2e-3),
                    privacy=PrivacyConfig(enabled=False, target_epsilon=1.0, delta=1e-5, max_grad_norm=1.0),
                    ledger=None, server_round=1, seed=0)
    torch.manual_seed(0)
    with torch.no_grad():
        synthetic = model.sample(2000, model.balanced_labels(2000)).numpy()

    out = Path(tempfile.mkdtemp(prefix="fedgen-audit-"))
    start = time.perf_counter()
    audit = audit_inputs(AuditInputs(synthetic=synthetic, train=train, holdout=holdout, model=model.eval()))
    write_audit(out, audit, render_html(audit, synthetic=synthetic, train=train.x.numpy()))
    seconds = time.perf_counter() - start
    return {"benchmark": "audit_speed", "seconds": round(seconds, 2), "limit_seconds": LIMIT_SECONDS,
            "within_limit": seconds <= LIMIT_SECONDS, "n_samples": len(synthetic), "n_train": len(train),
            "n_holdout": len(holdout), "spaces": list(audit["spaces"]),
            "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__}


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO.parent / "shared" / "data" / "mnist"
    result = main(folder)
    print(f"audit of {result['n_samples']} samples vs {result['n_train']} records: {result['seconds']:.1f} s "
          f"(limit {LIMIT_SECONDS:.0f} s)")
    target = REPO / "benchmarks" / "results" / "audit_speed.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2) + "\n")
