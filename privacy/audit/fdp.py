"""The one-run audit of f-DP (Mahloujifar, Melis & Chaudhuri, "Auditing f-Differential
Privacy in One Run", NeurIPS 2024 / arXiv 2410.22235), beside Steinke, Nasr & Jagielski's
(ε, δ) theorem (:mod:`.canaries`).

The guessing game is the same: ``m`` canaries, each included with probability 1/2; the
auditor guesses on ``guesses`` of them (abstains on the rest) and ``correct`` of the
guesses are right. Steinke et al. bound the chance of that many correct guesses under an
(ε, δ) pair; Mahloujifar et al. bound it under a whole trade-off curve ``f`` (the lowest
type II error at each type I error, Dong, Roth & Su 2022), which is much tighter when the
mechanism is close to Gaussian. Their test (:func:`rejects`) runs a recursion backwards
from ``correct`` to 0 that builds the least mass the mechanism would need to give
``correct`` right guesses with probability ≥ ``beta``; if that needs more than the
guesses' share ``guesses / m`` of the canaries, ``f``-DP is rejected at level ``beta``.
Only the inverse of the "blow-up" ``1 - f`` enters.

Two families of curves are tested, each by bisection over its parameter (the test is
monotone in it):

* **Gaussian DP** (:func:`gdp_lower_bound`): the largest ``mu`` such that the mechanism
  is not ``mu``-GDP, at confidence ``1 - beta``. A Gaussian mechanism of sensitivity 1
  and noise sigma is exactly ``1/sigma``-GDP, so for a single Gaussian release (and a
  composition of them: ``mu = sqrt(sum 1/sigma_r^2)``) this refutes the accountant's
  own claim. Its ε-equivalent at δ (:func:`gdp_epsilon`) is what the tables report.
* **The (ε, δ) curve** (:func:`epsdelta_lower_bound`): the largest ε such that the
  mechanism is not (ε, δ)-DP. Sound against any (ε, δ) claim (DP-SGD's accountant).
"""

from __future__ import annotations

import math
from typing import Callable

from scipy.special import ndtr, ndtri

_TOL = 1e-3  # bisection tolerance on mu and on epsilon


def gdp_inverse_blowup(mu: float) -> Callable[[float], float]:
    """The inverse of ``x -> 1 - f(x)`` for ``mu``-GDP: ``Phi(Phi^-1(x) - mu)``."""
    return lambda x: float(ndtr(ndtri(min(max(x, 0.0), 1.0)) - mu))


def epsdelta_inverse_blowup(epsilon: float, delta: float) -> Callable[[float], float]:
    """The inverse of ``x -> 1 - f(x)`` for the (ε, δ)-DP trade-off curve
    ``f(x) = max(0, 1 - δ - e^ε x, e^-ε (1 - δ - x))``."""
    grow, shrink = math.exp(epsilon), math.exp(-epsilon)
    return lambda y: max(0.0, (y - delta) * shrink, 1.0 - delta - grow * (1.0 - y))


def rejects(inverse_blowup: Callable[[float], float], m: int, guesses: int, correct: int, beta: float) -> bool:
    """True when ``correct`` right guesses out of ``guesses`` on ``m`` canaries would have
    probability below ``beta`` under every mechanism with this trade-off curve (Mahloujifar
    et al.'s recursion; the masses only grow, so it stops as soon as they exceed the
    guesses' share)."""
    if not 0 <= correct <= guesses <= m or guesses == 0:
        raise ValueError(f"need 0 <= correct <= guesses <= m and guesses > 0, got {correct}, {guesses}, {m}")
    share = guesses / m
    tau = beta * share
    r, h = tau * correct / guesses, tau * (guesses - correct) / guesses
    for i in range(correct - 1, -1, -1):
        h_next = max(h, inverse_blowup(r))
        r += i / (guesses - i) * (h_next - h)
        h = h_next
        if r + h > share:
            return True
    return r + h > share


def _largest_rejected(test: Callable[[float], bool], cap: float) -> float:
    """The largest parameter rejected by a test that rejects every smaller one; 0 if none."""
    if not test(_TOL):
        return 0.0
    lo, hi = _TOL, 1.0
    while test(hi) and hi < cap:
        lo, hi = hi, min(hi * 2, cap)
    if test(hi):
        return hi
    while hi - lo > _TOL:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if test(mid) else (lo, mid)
    return lo


def gdp_lower_bound(m: int, guesses: int, correct: int, *, beta: float) -> float:
    """The largest ``mu`` for which ``mu``-GDP is rejected at level ``beta`` (0: none)."""
    return _largest_rejected(lambda mu: rejects(gdp_inverse_blowup(mu), m, guesses, correct, beta), cap=64.0)


def epsdelta_lower_bound(m: int, guesses: int, correct: int, *, delta: float, beta: float) -> float:
    """The largest ε for which (ε, δ)-DP is rejected at level ``beta`` (0: none)."""
    return _largest_rejected(lambda eps: rejects(epsdelta_inverse_blowup(eps, delta), m, guesses, correct, beta),
                             cap=64.0)


def gdp_delta(mu: float, epsilon: float) -> float:
    """δ(ε) of ``mu``-GDP (Dong, Roth & Su 2022, Corollary 2.13)."""
    if mu <= 0:
        return 0.0
    return float(ndtr(-epsilon / mu + mu / 2) - math.exp(epsilon) * ndtr(-epsilon / mu - mu / 2))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest ε with ``mu``-GDP ⇒ (ε, δ)-DP: the ε-equivalent of a GDP bound, from
    below (within 1e-6): a lower bound on ``mu`` stays a lower bound on ε."""
    if mu <= 0 or gdp_delta(mu, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gdp_delta(mu, hi) > delta:
        lo, hi = hi, hi * 2
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gdp_delta(mu, mid) > delta else (lo, mid)
    return lo  # gdp_delta(mu, lo) > delta: never above the exact ε-equivalent


def gaussian_mu(noise_multipliers) -> float:
    """The exact GDP parameter of Gaussian releases of sensitivity 1 with these noise
    multipliers, composed: ``sqrt(sum 1 / sigma^2)``."""
    return math.sqrt(sum(1.0 / max(float(s), 1e-12) ** 2 for s in noise_multipliers))
