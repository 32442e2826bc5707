"""DP-FedSGD with distributed Skellam noise (docs/aggregation.md): the plan's parameters for the
quickstart VAE (55 376 parameters, 5 sites, threshold 3, 62 bits, max_records 300), how much
looser its accountant is than the exact subsampled Gaussian, and the noise on the summed
gradient against every site adding its full Gaussian noise (noise: local).

    python benchmarks/dpfedsgd_noise.py
"""
import math, sys
from fedgen.privacy.skellam import plan_distributed_release, skellam_epsilon
from fedgen.privacy.accounting import epsilon_of
from opacus.accountants.utils import get_noise_multiplier
D=55376; K=5; t=3; delta=1e-5
for eps, rounds, q in [(10.0, 60, 250/300), (1.0, 60, 250/300), (10.0, 300, 100/300)]:
    p = plan_distributed_release(epsilon=eps, delta=delta, bits=62, num_sites=K, threshold=t, max_records=300, dim=D, size=D, sample_rate=q, rounds=rounds)
    sig_eff = math.sqrt(p.mu)/p.l2
    # exact Gaussian (Opacus RDP) at the same sigma: how much looser our bound is
    g_eps = epsilon_of([(sig_eff, q, rounds)], delta=delta, accountant="rdp")
    sig_loc = get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=q, steps=rounds, accountant="rdp")
    sig_central_gauss = sig_loc  # a central Gaussian at the same epsilon needs the same sigma
    dist_std = math.sqrt(p.mu*K/t)/p.scale   # noise std on the federation's sum, units of C (all 5 survive)
    local_std = math.sqrt(K)*sig_loc        # each site its full sigma
    print(f"eps={eps} rounds={rounds} q={q:.3f}: scale={p.scale:.4g} l2/scale={p.l2/p.scale:.6f} mu={p.mu:.4g} "
          f"sigma_eff(skellam)={sig_eff:.3f} gaussian-eps-at-that-sigma={g_eps:.3f} sigma_local={sig_loc:.3f} "
          f"sum-noise-std: distributed {dist_std:.3f} C vs local {local_std:.3f} C (ratio {local_std/dist_std:.2f})")
