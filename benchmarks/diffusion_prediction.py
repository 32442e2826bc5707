"""The MLP diffusion model on real MNIST without DP: can it learn at all? (issue 18)

Pretrains ``diffusion`` (``architecture: mlp``, hidden 256, K = 4, as in
``scenarios/diffusion-mnist.yaml``) with the warm start's own step
(``shared_models.warm_start.pretrain``: batch 128, lr 1e-3) on the first 8 000 MNIST
records for ``--steps`` steps -- the best a release generator's draws could give the
family -- samples 500 (50 a class, 50 DDIM steps) at guidance 1 and 2, and scores the
samples' label agreement with a classifier fitted to the same 8 000 records (tested on the
other 2 000). ``--prediction eps`` is the parameterisation before the fix. Prints one JSON
line per guidance scale; results in docs/benchmarks.md ("The per-family MNIST sweep").

    python benchmarks/diffusion_prediction.py --steps 1500 [--prediction eps|x0|auto]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fedgen.client.data import read_mnist
from fedgen.evaluation.classifier import ClassifierConfig, accuracy, fit_classifier
from fedgen.shared_models import build_model
from fedgen.shared_models.warm_start import pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--prediction", default="auto", choices=["auto", "eps", "x0"])
    parser.add_argument("--mnist", default="../shared/data/mnist")
    args = parser.parse_args()
    data = read_mnist(args.mnist)
    x, y = data.x.float(), data.y.long()
    clf = fit_classifier(x[:8000], y[:8000], 10, config=ClassifierConfig(), seed=0)
    print(json.dumps({"classifier_accuracy": accuracy(clf, x[8000:], y[8000:])}), flush=True)
    torch.manual_seed(0)
    model = build_model("diffusion", data_shape=(1, 28, 28), num_classes=10, architecture="mlp",
                        noise_multiplicity=4, prediction=args.prediction)
    t = time.process_time()
    info = pretrain(model, x[:8000], y[:8000], steps=args.steps, batch_size=128, lr=1e-3, seed=0)
    cpu = time.process_time() - t
    model.eval()
    labels = torch.arange(500) % 10
    for scale in (1.0, 2.0):
        s = model.sample(500, labels, guidance_scale=scale)
        print(json.dumps({"prediction": model.prediction, "steps": args.steps, "loss": info["pretrain_loss"],
                          "pretrain_cpu_s": round(cpu, 1), "guidance": scale,
                          "label_agreement": accuracy(clf, s, labels)}), flush=True)


if __name__ == "__main__":
    main()
