"""DP-FedSGD under secure aggregation with distributed Skellam noise (docs/aggregation.md,
"DP-SGD with distributed noise"): the accountant of a Poisson-subsampled Skellam round in
the ledger, the calibration of mu over the planned rounds and the wrap-around bound for a
rounded clipped gradient."""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
from opacus.accountants.analysis import rdp as rdp_analysis

from fedgen.contract import secagg as sa
from fedgen.privacy import skellam as sk
from fedgen.privacy.ledger import SiteLedger

DELTA = 1e-5


def _zhu_wang_thm6(mu: float, l1: float, l2: float, q: float, alpha: int) -> float:
    """Zhu & Wang 2019, Thm 6, summed directly in 50-digit arithmetic (not in log space),
    fed the Skellam RDP of Agarwal et al. 2021 (Thm 3.5): an independent recomputation."""
    def eps(a: int) -> mp.mpf:
        a = mp.mpf(a)
        return a * l2 * l2 / (2 * mu) + min(((2 * a - 1) * l2 * l2 + 6 * l1) / (4 * mu * mu), 3 * l1 / (2 * mu))

    with mp.workdps(50):
        q_ = mp.mpf(q)
        total = (1 - q_) ** (alpha - 1) * (alpha * q_ - q_ + 1)
        total += mp.binomial(alpha, 2) * q_ ** 2 * (1 - q_) ** (alpha - 2) * mp.e ** eps(2)
        total += 3 * mp.fsum(mp.binomial(alpha, l) * q_ ** l * (1 - q_) ** (alpha - l) * mp.e ** ((l - 1) * eps(l))
                             for l in range(3, alpha + 1))
        return min(float(mp.log(total) / (alpha - 1)), float(eps(alpha)))


def _plan(**kw) -> sk.DistributedRelease:
    args = dict(epsilon=2.0, delta=DELTA, bits=48, num_sites=5, threshold=3, max_records=500, dim=200, size=200,
                sample_rate=0.05, rounds=40)
    return sk.plan_distributed_release(**{**args, **kw})


def test_the_ledger_composes_subsampled_skellam_rounds_as_a_fresh_recomputation():
    """40 DP-FedSGD rounds charged one by one: the ledger's epsilon equals the planned one
    and an independent 50-digit evaluation of Zhu & Wang's bound (within 1 %), and is below
    the target; the same rounds without subsampling cost far more."""
    plan = _plan()
    ledger = SiteLedger(site="0", accountant="prv", delta=DELTA, target_epsilon=2.0, max_grad_norm=1.0)
    spend = {"mu": plan.mu, "l1": plan.l1, "l2": plan.l2}
    for r in range(1, plan.rounds + 1):
        sk.charge_distributed(ledger, spend, round=r, run=None, sample_rate=plan.sample_rate)
    orders = list(range(2, 65))  # a subset of the accountant's orders: never below its epsilon
    fresh_rdp = np.array([_zhu_wang_thm6(plan.mu, plan.l1, plan.l2, plan.sample_rate, a) for a in orders])
    fresh, _ = rdp_analysis.get_privacy_spent(orders=[float(a) for a in orders], rdp=fresh_rdp * plan.rounds,
                                              delta=DELTA)
    assert ledger.epsilon == pytest.approx(fresh, rel=0.01)
    assert ledger.epsilon == pytest.approx(plan.epsilon(DELTA), rel=1e-9)
    assert 0.99 * 2.0 <= ledger.epsilon <= 2.0 * (1 + 1e-9)
    # read back from JSON (what the server's privacy.json holds) it is the same
    assert SiteLedger.from_json(ledger.to_json()).epsilon == pytest.approx(ledger.epsilon, rel=1e-12)
    unsampled = sk.skellam_epsilon(plan.mu, plan.l1, plan.l2, DELTA, 1.0, plan.rounds)
    assert unsampled > 5 * ledger.epsilon


@pytest.mark.parametrize("epsilon, q, rounds", [(1.0, 0.01, 100), (4.0, 0.1, 20), (0.5, 0.02, 10)])
def test_the_calibration_reaches_the_target_and_not_above(epsilon, q, rounds):
    l2 = sk.rounded_l2_bound(3000.0, 500)
    l1 = sk.rounded_l1_bound(l2, 500)
    mu = sk.calibrate_mu(epsilon=epsilon, delta=DELTA, l1=l1, l2=l2, sample_rate=q, steps=rounds)
    assert sk.skellam_epsilon(mu, l1, l2, DELTA, q, rounds) <= epsilon
    assert sk.skellam_epsilon(mu * (1 - 2e-4), l1, l2, DELTA, q, rounds) > epsilon  # the smallest such mu
    # more rounds need more noise; subsampling needs less than sampling everyone
    assert sk.calibrate_mu(epsilon=epsilon, delta=DELTA, l1=l1, l2=l2, sample_rate=q, steps=2 * rounds) > mu
    assert sk.calibrate_mu(epsilon=epsilon, delta=DELTA, l1=l1, l2=l2, sample_rate=1.0, steps=rounds) > mu


def test_the_plan_of_a_rounded_gradient_never_wraps_the_sum_and_twice_its_scale_would():
    """A d-dimensional clipped gradient, Poisson-sampled: at most max_records sampled records
    a site. The worst data sum (every record's whole L2 bound on every coordinate) plus the
    noise of all shares decodes to itself through the modular encoding over 100 draws; at
    twice the planned scale the worst data sum alone leaves the signed range."""
    plan = _plan(bits=30, num_sites=4, threshold=2, max_records=50_000, dim=400, size=400, rounds=30)
    assert plan.fits() and plan.scale >= math.sqrt(plan.dim)
    assert plan.data_bound() + plan.noise_bound() < 2 ** 29
    worst = np.full(plan.size, math.floor(plan.data_bound()), dtype=np.int64)
    rng = np.random.default_rng(7)
    for sign in (1, -1):
        for _ in range(50):
            noisy = sign * worst + sum(sk.skellam_noise((plan.size,), plan.share, rng) for _ in range(plan.num_sites))
            total = sa.encode_signed(noisy, plan.bits)
            assert np.array_equal(sa.decode_signed(total, plan.bits), noisy)
    assert 2 * plan.num_sites * plan.max_records * sk.rounded_l2_bound(2 * plan.scale, plan.dim) >= 2 ** 29
    with pytest.raises(sk.BitsTooSmall, match="raise secure_aggregation.bits to at least"):
        _plan(bits=16, dim=55376, size=55376)


def test_the_quickstart_vae_gradient_fits_62_bits_and_the_parameters_round_trip():
    """The quickstart VAE (55 376 parameters, sqrt(d) ~ 235): 10 sites of <= 200 records at
    62 bits leave room for a scale well above sqrt(d), so rounding adds little to l2."""
    plan = _plan(bits=62, num_sites=10, threshold=6, max_records=200, dim=55376, size=55376, sample_rate=0.16,
                 epsilon=1.0, rounds=20)
    assert plan.scale > 50 * math.sqrt(plan.dim)
    assert plan.l2 < 1.01 * plan.scale
    assert sk.DistributedRelease.from_json(plan.to_json()) == plan
    old = sk.DistributedRelease.from_json(plan.to_json().replace('"rounds": 20', '"x": 0'))
    assert old.rounds == 1  # a release's parameters (no rounds) read as one round
