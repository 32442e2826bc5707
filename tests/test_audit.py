"""Tests of privacy.audit on scikit-learn's digits (8x8, scaled to [0, 1]).

Power: a memorising generator and planted copies are caught. Sanity: a generator that
never saw the training data is not accused. The one-run canary bound reproduces the
paper's printed values and keeps its confidence on the worst-case mechanism.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import binom
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from fedgen.privacy.audit import (
    AuditSettings,
    WhiteBoxScores,
    attack_metrics,
    count_correct,
    domias,
    epsilon_from_counts,
    epsilon_lower_bound,
    epsilon_lower_bound_over_grid,
    gan_leaks,
    gan_leaks_calibrated,
    memorization_audit,
    nearest_neighbours,
    plan_canaries,
    render_html,
    roc_curve,
    run_audit,
    to_json,
    white_box,
)
from fedgen.privacy.audit.report import canary_verdict

torch.set_num_threads(1)
DELTA = 1e-5


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    """Disjoint train (700) / held-out (500) / independent pool (597) splits."""
    x = load_digits().data / 16.0
    order = np.random.default_rng(0).permutation(len(x))
    return {"train": x[order[:700]], "holdout": x[order[700:1200]], "pool": x[order[1200:]]}


def candidates(d: dict[str, np.ndarray], n: int = 250) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n members, n non-members, and the other held-out records as reference data."""
    x = np.concatenate([d["train"][:n], d["holdout"][:n]])
    is_member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    return x, is_member, d["holdout"][n:]


@pytest.fixture(scope="module")
def memorising(digits) -> np.ndarray:
    """A generator that memorised: training records plus tiny noise."""
    return digits["train"] + np.random.default_rng(1).normal(0, 0.02, digits["train"].shape)


# ------------------------------------------------------------------ nearest neighbours

def test_nearest_neighbours_match_brute_force_and_find_exact_copies(digits):
    q = np.concatenate([digits["pool"][:50], digits["train"][:5]])
    d, i = nearest_neighbours(q, digits["train"], k=3, chunk_size=16)
    brute = np.linalg.norm(q[:, None, :] - digits["train"][None], axis=-1)
    np.testing.assert_allclose(d, np.sort(brute, axis=1)[:, :3], atol=1e-12)
    assert np.all(d[-5:, 0] == 0) and list(i[-5:, 0]) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="features"):
        nearest_neighbours(q, digits["train"][:, :10])


# ------------------------------------------------------------------ memorisation (DCR)

def test_memorising_generator_fails_the_dcr_test(digits, memorising):
    dcr = memorization_audit(memorising, digits["train"], digits["holdout"]).dcr
    assert dcr.share_closer_to_train > 0.75
    assert dcr.p_value < 1e-20
    assert dcr.n_reference == len(digits["holdout"])  # train subsampled to held-out's size


def test_planted_training_images_are_the_exact_near_copy_list(digits):
    rng = np.random.default_rng(2)
    copied = rng.choice(len(digits["train"]), 10, replace=False)
    synthetic = digits["pool"][:300].copy()
    slots = rng.choice(len(synthetic), 10, replace=False)
    synthetic[slots] = digits["train"][copied] + rng.normal(0, 1e-3, (10, 64))
    copies = memorization_audit(synthetic, digits["train"], digits["holdout"]).near_copies
    found = dict(zip(copies.synthetic_index.tolist(), copies.train_index.tolist()))
    assert found == dict(zip(slots.tolist(), copied.tolist()))
    assert copies.p_value < 1e-6 and copies.expected_by_chance < 1


def test_independent_generator_shows_no_memorisation(digits):
    mem = memorization_audit(digits["pool"], digits["train"], digits["holdout"])
    assert 0.42 < mem.dcr.share_closer_to_train < 0.58
    assert mem.dcr.p_value > 0.05
    assert len(mem.near_copies.synthetic_index) <= 2
    pairs = mem.closest_pairs
    assert np.all(np.diff(pairs.distance) >= 0) and len(pairs.distance) == 16


# ------------------------------------------------------------------ membership inference

def test_gan_leaks_catches_a_memorising_generator(digits, memorising):
    x, is_member, reference = candidates(digits)
    assert attack_metrics(gan_leaks(x, memorising), is_member, n_bootstrap=200).auc >= 0.8
    calibrated = gan_leaks_calibrated(x, memorising, reference)
    assert attack_metrics(calibrated, is_member, n_bootstrap=200).auc >= 0.7
    assert attack_metrics(domias(x, memorising, reference, bandwidth="cv"), is_member,
                          n_bootstrap=200).auc > 0.65


def test_attacks_are_at_chance_on_an_independent_generator(digits):
    x, is_member, reference = candidates(digits)
    synthetic = digits["pool"]
    for scores in (gan_leaks(x, synthetic), gan_leaks(x, synthetic, k=5),
                   gan_leaks_calibrated(x, synthetic, reference), domias(x, synthetic, reference)):
        assert 0.4 <= attack_metrics(scores, is_member, n_bootstrap=200).auc <= 0.6


def test_bootstrap_cis_contain_estimates_and_rates_are_probabilities(digits, memorising):
    x, is_member, _ = candidates(digits)
    for synthetic in (memorising, digits["pool"]):
        m = attack_metrics(gan_leaks(x, synthetic), is_member, n_bootstrap=300, seed=3)
        assert m.auc_ci[0] <= m.auc <= m.auc_ci[1]
        for tpr, (lo, hi) in zip(m.tpr_at_fpr, m.tpr_at_fpr_ci):
            assert 0 <= lo <= tpr <= hi <= 1
        assert m.fpr[0] == m.tpr[0] == 0 and m.fpr[-1] == m.tpr[-1] == 1
        assert np.all(np.diff(m.fpr) >= 0) and np.all(np.diff(m.tpr) >= 0)


def test_roc_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(4)
    scores, labels = rng.integers(0, 5, 400).astype(float), rng.random(400) < 0.5
    fpr, tpr = roc_curve(scores, labels)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_white_box_orients_losses():
    loss = np.array([0.1, 2.0, 0.5])
    np.testing.assert_array_equal(white_box(loss, higher_means_member=False), -loss)
    np.testing.assert_array_equal(white_box(loss), loss)
    with pytest.raises(ValueError, match="NaN"):
        white_box(np.array([np.nan]))


# ------------------------------------------------------------------ canaries (Steinke et al.)

@pytest.mark.parametrize("m, r, v, delta, published", [
    (1000, 100, 75, 1e-4, 0.673),  # arXiv:2305.08846 Appendix D's worked example
    (100000, 1510, 1439, 1e-5, 2.675),  # ibid. Sec. 7, printed truncated to 3 decimals
])
def test_bound_reproduces_the_papers_printed_values(m, r, v, delta, published):
    assert epsilon_from_counts(m, r, v, delta=delta, confidence=0.95) == pytest.approx(published, abs=1e-3)


def test_plan_canaries_is_seeded_and_fair():
    a, b = plan_canaries(1000, seed=7), plan_canaries(1000, seed=7)
    np.testing.assert_array_equal(a.included, b.included)
    assert a.seed == 7 and 430 < a.included.sum() < 570
    assert not np.array_equal(a.included, plan_canaries(1000, seed=8).included)


def test_random_scores_give_no_bound_and_perfect_scores_a_large_one():
    random_bounds = []
    for seed in range(5):
        included = plan_canaries(1000, seed).included
        scores = np.random.default_rng(100 + seed).random(1000)
        random_bounds.append(epsilon_lower_bound(scores, included, delta=DELTA, k_plus=100,
                                                 k_minus=100).epsilon_lower_bound)
        perfect = epsilon_lower_bound(included.astype(float), included, delta=DELTA,
                                      k_plus=100, k_minus=100)
        assert perfect.n_correct == 200 and perfect.epsilon_lower_bound > 3.5
    assert max(random_bounds) <= 0.3 and np.median(random_bounds) == 0


@pytest.mark.parametrize("delta", [0.0, DELTA])
def test_bound_never_decreases_with_more_correct_guesses(delta):
    bounds = [epsilon_from_counts(1000, 100, v, delta=delta) for v in range(0, 101)]
    assert np.all(np.diff(bounds) >= 0) and bounds[50] == 0 and bounds[-1] > 3
    included = plan_canaries(200, seed=0).included
    scores = np.where(included, 1.0, 0.0)
    previous = np.inf
    for n_wrong in range(0, 40, 4):  # swap wrong guesses into the top/bottom one pair at a time
        s = scores.copy()
        s[np.flatnonzero(included)[:n_wrong]] = 0.0
        s[np.flatnonzero(~included)[:n_wrong]] = 1.0
        audit = epsilon_lower_bound(s, included, delta=delta, k_plus=20, k_minus=20)
        assert audit.epsilon_lower_bound <= previous
        previous = audit.epsilon_lower_bound


@pytest.mark.parametrize("epsilon", [1.0, 3.0])
def test_bound_holds_on_randomized_response(epsilon):
    """eps-DP randomized response on the inclusion bits is the worst case for the theorem:
    the bound may exceed the true eps with probability at most 1 - confidence."""
    m, k, flip = 1000, 100, 1 / (1 + np.exp(epsilon))
    # exact: P[bound(V) > eps] for V ~ Binomial(2k, e^eps / (1 + e^eps))
    v_over = [v for v in range(2 * k + 1) if epsilon_from_counts(m, 2 * k, v, delta=DELTA) > epsilon]
    assert binom.pmf(v_over, 2 * k, 1 - flip).sum() <= 0.05
    # simulated through scores, over seeds
    exceed = 0
    for seed in range(30):
        included = plan_canaries(m, seed).included
        noisy = included ^ (np.random.default_rng(1000 + seed).random(m) < flip)
        audit = epsilon_lower_bound(noisy.astype(float), included, delta=DELTA, k_plus=k, k_minus=k)
        exceed += audit.epsilon_lower_bound > epsilon
        assert audit.epsilon_lower_bound < epsilon + 1
    assert exceed <= 3


def test_grid_search_pays_a_bonferroni_correction():
    included = plan_canaries(1000, seed=1).included
    scores = included + np.random.default_rng(1).normal(0, 0.8, 1000)
    grid = [(50, 50), (100, 100), (200, 0)]
    best = epsilon_lower_bound_over_grid(scores, included, delta=DELTA, k_grid=grid)
    uncorrected = max(epsilon_lower_bound(scores, included, delta=DELTA, k_plus=a, k_minus=b)
                      .epsilon_lower_bound for a, b in grid)
    assert 0 < best.epsilon_lower_bound < uncorrected and best.grid_size == 3
    single = epsilon_lower_bound_over_grid(scores, included, delta=DELTA, k_grid=[(100, 100)])
    fixed = epsilon_lower_bound(scores, included, delta=DELTA, k_plus=100, k_minus=100)
    assert single.epsilon_lower_bound == fixed.epsilon_lower_bound
    assert count_correct(scores, included, k_plus=100, k_minus=100) == fixed.n_correct


# ------------------------------------------------------------------ run_audit and report

@pytest.fixture(scope="module")
def audits(digits, memorising) -> dict[str, dict]:
    """run_audit on 8x8 images: a memorising generator whose canaries leak (bound ~ 4) vs a
    claimed eps of 1, and an independent one whose canaries do not, vs a claimed eps of 10."""
    images = {k: v.reshape(-1, 8, 8) for k, v in digits.items()}
    included = plan_canaries(1000, seed=0).included
    settings = AuditSettings(n_bootstrap=200)
    common = dict(delta=DELTA, settings=settings, features_fn=lambda z: z.reshape(len(z), -1)[:, ::2])
    leaky = run_audit(memorising.reshape(-1, 8, 8), images["train"], images["holdout"],
                      canary_scores=included.astype(float), canary_included=included,
                      claimed_epsilon=1.0,
                      white_box_scores=WhiteBoxScores("loss", np.zeros(700), np.ones(500), False),
                      **common)
    rng = np.random.default_rng(5)
    clean = run_audit(images["pool"], images["train"], images["holdout"],
                      canary_scores=rng.random(1000), canary_included=included,
                      claimed_epsilon=10.0, **common)
    return {"leaky": leaky, "clean": clean}


def test_audit_json_round_trips_and_names_its_inputs(audits, digits):
    for audit in audits.values():
        assert json.loads(to_json(audit)) == audit
        assert set(audit["inputs"]) >= {"synthetic", "train", "holdout", "canary_scores"}
        assert len(audit["inputs"]["train"]["sha256"]) == 64
        assert set(audit["spaces"]) == {"data", "features"}
        dcr = audit["spaces"]["data"]["memorization"]["dcr"]["share_closer_to_train"]
        assert {"name", "value", "direction", "units"} <= set(dcr)
    assert audits["leaky"]["inputs"]["train"] == audits["clean"]["inputs"]["train"]
    white = audits["leaky"]["white_box"]["white_box/loss"]
    assert white["auc"]["value"] == 1.0  # lower loss on members, oriented as higher = member


@pytest.fixture(scope="module")
def pages(audits, digits, memorising) -> dict[str, str]:
    return {"leaky": render_html(audits["leaky"], synthetic=memorising.reshape(-1, 8, 8),
                                 train=digits["train"].reshape(-1, 8, 8)),
            "clean": render_html(audits["clean"])}


def test_html_states_verdicts_and_embeds_figures(audits, pages):
    leaky, clean = pages["leaky"], pages["clean"]
    assert '<img src="data:image/png;base64,' in leaky and '<img src="data:image/png;base64,' in clean
    # DCR is described, never a verdict (issue #22); membership attacks give the verdicts
    assert "Distance to closest record (data space, a description, not a verdict)" in leaky
    assert "Closest (synthetic, training) pairs" in leaky
    # under its claim of eps = 1 the memorising generator leaks more than the claim permits
    assert "li class='violation'>Membership inference" in leaky
    assert "li class='warning'" not in clean
    for audit, page in ((audits["leaky"], leaky), (audits["clean"], clean)):
        for verdict in audit["verdicts"]:
            assert verdict["text"].split(":")[0] in page


def test_red_warning_iff_lower_bound_exceeds_claimed_epsilon(audits, pages):
    leaky, clean = audits["leaky"], audits["clean"]
    assert leaky["canaries"]["epsilon_lower_bound"]["value"] > 1.0
    assert clean["canaries"]["epsilon_lower_bound"]["value"] <= 10.0
    assert leaky["accounting_violation"] and not clean["accounting_violation"]
    warning = "privacy accounting or implementation is broken"
    assert warning in pages["leaky"] and "class='violation'" in pages["leaky"]
    assert warning not in pages["clean"] and "class='violation'" not in pages["clean"]
    # the same audit with a claim above the bound: no red warning
    claim = leaky["canaries"]["epsilon_lower_bound"]["value"] + 0.5
    assert canary_verdict(leaky["canaries"], claim)["level"] != "violation"


def test_run_audit_refuses_a_claim_without_delta(digits):
    with pytest.raises(ValueError, match="delta"):
        run_audit(digits["pool"], digits["train"], digits["holdout"], claimed_epsilon=1.0)
