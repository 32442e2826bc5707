"""Issue 5 acceptance: on real MNIST, a non-DP VAE trained centrally (one site) scores
clearly better than the same model at epsilon = 1, and both better than an untrained one."""

from __future__ import annotations

import pytest
import torch

from fedgen.client.data import read_mnist
from fedgen.client.training import new_site_ledger, run_local_round
from fedgen.contract.task import PrivacyConfig, TrainingConfig
from fedgen.evaluation import DomainFeatureExtractor, evaluate_samples
from fedgen.shared_models import build_model
from fedgen.simulations.partition import holdout_split

pytestmark = pytest.mark.slow


def test_quality_orders_no_dp_then_dp_then_untrained(mnist_dir):
    data = read_mnist(mnist_dir)
    train_idx, hold_idx = holdout_split(len(data), 0.2, seed=0)
    train, ref = data.subset(train_idx[:4000]), data.subset(hold_idx)
    extractor = DomainFeatureExtractor.fit(ref.x, ref.y, seed=0)

    def score(model):
        torch.manual_seed(1)
        labels = torch.arange(2000) % 10
        with torch.no_grad():
            x = model.eval().sample(2000, labels)
        return evaluate_samples(x, labels, ref.x, ref.y, extractor=extractor, tstr=True, seed=0)

    def vae():
        torch.manual_seed(0)
        return build_model("vae", data_shape=train.shape, num_classes=10, hidden=256, latent_dim=16)

    untrained = score(vae())
    no_dp = vae()
    run_local_round(no_dp, train, training=TrainingConfig(local_steps=800, batch_size=128, lr=2e-3),
                    privacy=PrivacyConfig(enabled=False, target_epsilon=1, delta=1e-5, max_grad_norm=1),
                    ledger=None, server_round=1, seed=0)
    no_dp = score(no_dp)
    dp = vae()
    privacy = PrivacyConfig(enabled=True, target_epsilon=1.0, delta=1e-5, max_grad_norm=1.0, planned_rounds=1)
    ledger = new_site_ledger("0", privacy)
    run_local_round(dp, train, training=TrainingConfig(local_steps=100, batch_size=1000, lr=1e-2),
                    privacy=privacy, ledger=ledger, server_round=1, seed=0)
    assert 0 < ledger.epsilon <= 1.0
    dp = score(dp)
    print({k: (untrained[k], dp[k], no_dp[k]) for k in ("fid_domain", "tstr_accuracy", "precision", "coverage")})
    assert no_dp["fid_domain"] < 0.8 * dp["fid_domain"] and dp["fid_domain"] < untrained["fid_domain"]
    assert no_dp["tstr_accuracy"] > dp["tstr_accuracy"] + 0.05 and no_dp["tstr_accuracy"] > untrained["tstr_accuracy"] + 0.3
    assert dp["tstr_accuracy"] >= untrained["tstr_accuracy"] - 0.02
