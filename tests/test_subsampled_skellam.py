"""The Poisson-subsampled RDP bound for any mechanism (Zhu & Wang 2019, Thm 6;
``privacy/skellam.py``): the accountant a DP-FedSGD round with distributed Skellam noise
needs (docs/aggregation.md, "DP-SGD with distributed noise: what is needed"). Checked on
the one mechanism whose subsampled RDP is known exactly: the Gaussian (Mironov et al. 2019,
integer orders, summed in 60-digit arithmetic)."""

from __future__ import annotations

import mpmath as mp
import numpy as np
import pytest

from fedgen.privacy.skellam import ORDERS, poisson_subsampled_rdp, skellam_rdp


def _exact_subsampled_gaussian(q: float, sigma: float, alpha: int) -> float:
    with mp.workdps(60):
        q_, s = mp.mpf(q), mp.mpf(sigma)
        total = mp.fsum(mp.binomial(alpha, i) * q_ ** i * (1 - q_) ** (alpha - i) * mp.e ** ((i * i - i) / (2 * s * s))
                        for i in range(alpha + 1))
        return float(mp.log(total) / (alpha - 1))


@pytest.mark.parametrize("sigma, q", [(0.8, 0.01), (1.0, 1e-4), (2.0, 0.1), (5.0, 0.5), (20.0, 0.001)])
def test_the_bound_is_never_below_the_exact_subsampled_gaussian_and_exact_at_order_2(sigma, q):
    orders = tuple(range(2, 33))
    bound = poisson_subsampled_rdp(lambda a: a / (2 * sigma ** 2), q, orders)
    exact = np.array([_exact_subsampled_gaussian(q, sigma, a) for a in orders])
    assert (bound >= exact * (1 - 1e-12)).all()
    assert bound[0] == pytest.approx(exact[0], rel=1e-12)  # at order 2 the theorem is an equality
    assert (bound <= orders_rdp(sigma, orders) * (1 + 1e-12)).all()  # never above the unsampled mechanism


def orders_rdp(sigma: float, orders: tuple[int, ...]) -> np.ndarray:
    return np.asarray(orders, dtype=np.float64) / (2 * sigma ** 2)


def test_sampling_everyone_or_no_one():
    skellam = lambda a: skellam_rdp(400.0, 30.0, 10.0, tuple(int(x) for x in a))  # noqa: E731
    assert np.array_equal(poisson_subsampled_rdp(skellam, 1.0), skellam_rdp(400.0, 30.0, 10.0))
    assert not poisson_subsampled_rdp(skellam, 0.0).any()
    sampled = poisson_subsampled_rdp(skellam, 0.01)
    assert (sampled < skellam_rdp(400.0, 30.0, 10.0)).all() and (sampled > 0).all()
    assert np.isfinite(poisson_subsampled_rdp(skellam, 0.01, ORDERS)).all()
    with pytest.raises(ValueError, match="not in"):
        poisson_subsampled_rdp(skellam, 1.5)
