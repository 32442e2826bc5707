"""The f-DP one-run audit (Mahloujifar, Melis & Chaudhuri 2024; privacy/audit/fdp.py): an
ideal auditor of a mechanism with a known curve never gets a bound above the truth (beyond
its 5 %), and gets much closer than Steinke et al.'s (ε, δ) theorem."""

from __future__ import annotations

import math

import numpy as np

from fedgen.privacy.audit import dirac, fdp


def _ideal_gaussian_counts(rng, mu: float, m: int, fraction: float) -> tuple[int, int]:
    """A perfect auditor of a mu-GDP mechanism: canary scores N(mu * bit, 1), the k highest
    guessed in, the k lowest out."""
    included = rng.random(m) < 0.5
    score = rng.normal(0, 1, m) + mu * included
    k = int(fraction * m)
    return 2 * k, dirac.count_correct(score, included, k_plus=k, k_minus=k)


def test_gdp_bound_of_an_ideal_gaussian_auditor_stays_below_the_true_mu_and_near_it():
    rng = np.random.default_rng(0)
    mu = 1.0  # a Gaussian mechanism with sigma = 1: exactly 1-GDP, eps = 4.4 at delta = 1e-5
    bounds = [fdp.gdp_lower_bound(2000, *_ideal_gaussian_counts(rng, mu, 2000, 0.1), beta=0.05) for _ in range(60)]
    assert max(bounds) <= mu  # never above the truth over 60 seeds
    assert np.median(bounds) > 0.6 * mu  # and close: about 0.75 mu with 2,000 canaries
    assert max(fdp.gdp_epsilon(b, 1e-5) for b in bounds) <= fdp.gdp_epsilon(mu, 1e-5)


def test_the_true_curve_is_rejected_at_most_at_the_test_level():
    """Calibration where the test is tightest: guesses on every canary. A mu-GDP mechanism's
    own mu, and randomized response's own (eps, 0) curve, are rejected in <= 5 % of runs."""
    rng = np.random.default_rng(1)
    mu, m = 1.0, 1000
    rejected = sum(fdp.rejects(fdp.gdp_inverse_blowup(mu), m, *_ideal_gaussian_counts(rng, mu, m, 0.5), 0.05)
                   for _ in range(300))
    assert rejected <= 0.05 * 300
    eps = 1.0  # randomized response: each guess right with probability e^eps / (1 + e^eps), exactly eps-DP
    p = math.exp(eps) / (1 + math.exp(eps))
    rr = sum(fdp.rejects(fdp.epsdelta_inverse_blowup(eps, 1e-5), m, m, int(rng.binomial(m, p)), 0.05)
             for _ in range(600))
    assert rr <= 0.065 * 600  # 5 % plus sampling error (measured 4.1 %)
    assert fdp.rejects(fdp.epsdelta_inverse_blowup(0.5, 1e-5), m, m, int(p * m), 0.05)  # a smaller eps is refuted


def test_the_bounds_grow_with_correct_guesses_and_are_zero_at_chance():
    assert fdp.gdp_lower_bound(1000, 200, 100, beta=0.05) == 0.0
    assert fdp.epsdelta_lower_bound(1000, 200, 100, delta=1e-5, beta=0.05) == 0.0
    mus = [fdp.gdp_lower_bound(1000, 200, v, beta=0.05) for v in (130, 160, 190, 200)]
    assert mus == sorted(mus) and mus[0] > 0
    assert abs(fdp.gdp_epsilon(2.0, 1e-5) - 10.0) < 0.1  # 2-GDP is (10, 1e-5)-DP (Dong, Roth & Su 2022)
    assert abs(fdp.gaussian_mu([2.0, 2.0]) - math.sqrt(0.5)) < 1e-12


def test_a_release_audit_uses_gaussian_dp_and_a_dp_sgd_audit_the_epsilon_delta_curve():
    rng = np.random.default_rng(2)
    included = rng.random(5000) < 0.5
    score = rng.normal(0, 1, 5000) + 1.0 * included
    sgd, release = (dirac.audit(score, included, delta=1e-5, gaussian=g) for g in (False, True))
    assert sgd.basis == "epsilon-delta" and sgd.epsilon_lower_bound == sgd.fdp_epsilon_lower_bound
    assert release.basis == "gdp" and release.epsilon_lower_bound == release.gdp_epsilon_equivalent
    assert release.gdp_epsilon_equivalent == sgd.gdp_epsilon_equivalent
    # both sound (below eps = 4.4 of 1-GDP) and both at least Steinke et al.'s bound on the same guesses
    assert sgd.steinke_epsilon_lower_bound <= sgd.epsilon_lower_bound < release.epsilon_lower_bound <= 4.4
    assert release.to_dict()["bound_basis"] == "gdp"


def test_the_gdp_epsilon_equivalent_is_never_above_the_exact_one():
    """The verdict's bound for a Gaussian release is gdp_epsilon of a rejected mu: rounding
    it up would put it above the true epsilon."""
    for mu in (0.3, 1.0, 2.0, 5.0):
        for delta in (1e-5, 1e-3):
            eps = fdp.gdp_epsilon(mu, delta)
            assert eps > 0 and fdp.gdp_delta(mu, eps) > delta  # mu-GDP is not (eps, delta)-DP
            assert fdp.gdp_delta(mu, eps + 2e-6) <= delta


def test_only_an_unsubsampled_noisy_dp_sgd_history_is_a_gaussian_composition_and_its_claim_covers_the_gdp_curve():
    """dirac.gaussian_composition: every charged entry with steps at sample rate 1 and
    sigma > 0, no Skellam. For such a history every accountant's ε is at least the exact
    ε of sqrt(T)/sigma-GDP, so a Gaussian-DP bound below the truth stays below the claim."""
    from fedgen.privacy.accounting import epsilon_of
    from fedgen.privacy.ledger import RoundSpend

    def spend(q, sigma=5.3, steps=20, **kw):
        return RoundSpend(round=1, steps=steps, noise_multiplier=sigma, sample_rate=q, epsilon=0.0, **kw)

    assert dirac.gaussian_composition([spend(1.0), spend(1.0, sigma=4.0)])
    assert not dirac.gaussian_composition([])
    assert not dirac.gaussian_composition([spend(1.0), spend(0.5)])  # one subsampled round
    assert not dirac.gaussian_composition([spend(1.0, sigma=0.0)])  # no noise
    assert not dirac.gaussian_composition([spend(1.0, skellam={"mu": 1.0, "l1": 1.0, "l2": 1.0})])
    assert dirac.gaussian_composition([spend(1.0), spend(0.1, steps=0)])  # a zero-step entry charges nothing
    for sigma, steps in ((5.3, 100), (40.6, 100), (2.37, 20)):
        exact = fdp.gdp_epsilon(fdp.gaussian_mu([sigma] * steps), 1e-5)
        for accountant in ("rdp", "prv"):
            assert exact <= epsilon_of([(sigma, 1.0, steps)], delta=1e-5, accountant=accountant)
