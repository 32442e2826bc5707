"""Membership inference attacks on generators, and one way to score them.

Every attack maps candidate records (training members and non-members) to per-record
scores, **higher = more likely a member**, so one function, :func:`attack_metrics`,
evaluates them all: ROC AUC and TPR at low FPR (Carlini et al. 2022, "Membership
Inference Attacks From First Principles": the low-FPR regime is what matters for
privacy), each with a stratified bootstrap confidence interval.

Attacks:

* :func:`gan_leaks` — GAN-Leaks full black-box (Chen, Yu, Zhang & Fritz 2020, CCS, Sec. 5.1):
  only generated samples are seen; a record's reconstruction loss is approximated by its
  squared L2 distance to the nearest generated sample, ``L(x) = min_i ||x - G(z_i)||^2``
  (here optionally the mean over the ``k`` nearest); score ``= -L(x)``.
* :func:`gan_leaks_calibrated` — GAN-Leaks calibrated (ibid., Sec. 5.4): subtract the same
  loss against samples from a reference generator trained on other data (or reference
  data), ``score = -(L(x, G) - L(x, G_ref))``, which removes per-record difficulty.
* :func:`domias` — DOMIAS (van Breugel, Sun, Qian & van der Schaar 2023, AISTATS, Eq. 2):
  ``score = log p_G(x) - log p_R(x)``, the log density ratio of the generator's
  distribution to the reference (population) distribution. Our choices: densities are
  Gaussian KDEs (``scipy.stats.gaussian_kde``; bandwidth by Scott's rule or by K-fold
  held-out likelihood over multiples of it) on a PCA projection fit on the reference data
  (``n_components`` dims, default 5: KDE degrades quickly with dimension, the paper used
  low-dimensional tabular data or a flow density); the log ratio is monotone in the
  paper's ratio and numerically stable.
* :func:`white_box` — LOGAN white-box (Hayes, Melis, Danezis & De Cristofaro 2019, PoPETs:
  discriminator confidence) and the loss-threshold attack (Yeom, Giacomelli, Fredrikson &
  Jha 2018, CSF): the caller computes a per-record model statistic (discriminator output,
  log-likelihood, negative loss) and this function only fixes its direction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.stats import beta as beta_dist, gaussian_kde, hypergeom, mannwhitneyu
from sklearn.decomposition import PCA
from sklearn.model_selection import KFold

from .neighbours import as_matrix, nearest_neighbours
from .results import HALF_IS_PRIVATE, LOWER_IS_PRIVATE, described

DEFAULT_FPR_LEVELS: tuple[float, ...] = (0.01, 0.001)
MIN_CANDIDATES = 100  # members and non-members together; fewer and a verdict is inconclusive
TOP_FRACTION = 0.02  # the pre-declared low-FPR test looks at the top 2 % of all candidates
#: The operating points whose implied ε lower bound tests a DP claim (:func:`dp_claim_test`):
#: "member" for the top 2 % of candidates (low FPR) and for the top half (the median split).
OPERATING_FRACTIONS: tuple[float, ...] = (TOP_FRACTION, 0.5)


# ---------------------------------------------------------------------------------- attacks

def _reconstruction_loss(candidates: np.ndarray, samples: np.ndarray, k: int,
                         chunk_size: int) -> np.ndarray:
    """GAN-Leaks' black-box loss: mean squared L2 distance to the ``k`` nearest samples."""
    distances, _ = nearest_neighbours(candidates, samples, k=k, chunk_size=chunk_size)
    return (distances ** 2).mean(axis=1)


def gan_leaks(candidates: np.ndarray, synthetic: np.ndarray, *, k: int = 1,
              chunk_size: int = 1024) -> np.ndarray:
    """GAN-Leaks full black-box (Chen et al. 2020): ``-min_i ||x - s_i||^2`` per candidate
    (mean over the ``k`` nearest synthetic samples when ``k > 1``)."""
    return -_reconstruction_loss(candidates, synthetic, k, chunk_size)


def gan_leaks_calibrated(candidates: np.ndarray, synthetic: np.ndarray, reference: np.ndarray,
                         *, k: int = 1, chunk_size: int = 1024) -> np.ndarray:
    """GAN-Leaks calibrated (Chen et al. 2020): ``-(L(x, synthetic) - L(x, reference))``;
    ``reference`` holds samples of a reference generator, or reference data, that never
    saw the candidates."""
    return -(_reconstruction_loss(candidates, synthetic, k, chunk_size)
             - _reconstruction_loss(candidates, reference, k, chunk_size))


def _kde(points: np.ndarray, bandwidth: str, n_folds: int, seed: int) -> gaussian_kde:
    """A Gaussian KDE on ``points`` (rows); ``bandwidth`` "scott" or "cv" (K-fold held-out
    log-likelihood over multiples 0.25-2 of Scott's factor)."""
    if bandwidth == "scott":
        return gaussian_kde(points.T, bw_method="scott")
    if bandwidth != "cv":
        raise ValueError(f"DOMIAS bandwidth must be 'scott' or 'cv', got {bandwidth!r}")
    scott = len(points) ** (-1.0 / (points.shape[1] + 4))
    grid = scott * np.array([0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0])
    folds = list(KFold(n_folds, shuffle=True, random_state=seed).split(points))
    score = [np.mean([gaussian_kde(points[fit].T, bw_method=f).logpdf(points[held].T).mean()
                      for fit, held in folds]) for f in grid]
    return gaussian_kde(points.T, bw_method=float(grid[int(np.argmax(score))]))


def domias(candidates: np.ndarray, synthetic: np.ndarray, reference: np.ndarray, *,
           n_components: int = 5, bandwidth: str = "scott", n_folds: int = 3,
           seed: int = 0) -> np.ndarray:
    """DOMIAS (van Breugel et al. 2023, Eq. 2): ``log p_synthetic(x) - log p_reference(x)``,
    both Gaussian KDEs on a PCA projection (fit on ``reference``) to ``n_components`` dims.
    ``reference`` must be data from the population that does not include the candidates."""
    candidates, synthetic, reference = (as_matrix(a, name=n) for a, n in (
        (candidates, "candidates"), (synthetic, "synthetic"), (reference, "reference")))
    dims = min(n_components, reference.shape[1], len(reference) - 1)
    pca = PCA(n_components=dims, random_state=seed).fit(reference)
    project = pca.transform
    p_synthetic = _kde(project(synthetic), bandwidth, n_folds, seed)
    p_reference = _kde(project(reference), bandwidth, n_folds, seed)
    z = project(candidates).T
    return p_synthetic.logpdf(z) - p_reference.logpdf(z)


def white_box(statistic: np.ndarray, *, higher_means_member: bool = True) -> np.ndarray:
    """LOGAN white-box (Hayes et al. 2019) / loss threshold (Yeom et al. 2018): the caller's
    per-record statistic oriented so that higher = more likely member. Pass
    ``higher_means_member=False`` for a loss (members have lower loss)."""
    scores = np.asarray(statistic, dtype=np.float64).reshape(-1)
    if not np.isfinite(scores).all():
        raise ValueError("white-box statistic contains NaN or Inf; check the model statistic")
    return scores if higher_means_member else -scores


# ---------------------------------------------------------------------------------- metrics

def roc_curve(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr)`` from (0, 0) to (1, 1), one per distinct score threshold
    (tied scores move both rates together, so AUC counts ties as one half)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], is_member[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[last_of_run]
    fps = last_of_run + 1 - tps
    return np.r_[0.0, fps / max(fps[-1], 1)], np.r_[0.0, tps / max(tps[-1], 1)]


def _auc_and_tprs(scores: np.ndarray, is_member: np.ndarray,
                  fpr_levels: tuple[float, ...]) -> tuple[float, list[float], np.ndarray, np.ndarray]:
    fpr, tpr = roc_curve(scores, is_member)
    auc = float(np.trapezoid(tpr, fpr))
    # TPR at FPR <= x: the best operating point that does not exceed x (Carlini et al. 2022).
    tprs = [float(tpr[fpr <= x + 1e-12].max()) for x in fpr_levels]
    return auc, tprs, fpr, tpr


@dataclass(frozen=True)
class AttackMetrics:
    """ROC AUC and TPR at fixed FPRs, each with a bootstrap CI, plus the ROC curve."""

    auc: float
    auc_ci: tuple[float, float]
    fpr_levels: tuple[float, ...]
    tpr_at_fpr: tuple[float, ...]
    tpr_at_fpr_ci: tuple[tuple[float, float], ...]
    fpr: np.ndarray
    tpr: np.ndarray
    n_members: int
    n_nonmembers: int
    confidence: float
    n_bootstrap: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        ci = f"{self.confidence:.0%} stratified percentile bootstrap ({self.n_bootstrap} resamples)"
        return {
            "auc": described("roc_auc", self.auc, direction=HALF_IS_PRIVATE,
                             units="probability", ci=self.auc_ci, ci_level=self.confidence,
                             ci_method=ci),
            "tpr_at_fpr": [described(f"tpr_at_{x:g}_fpr", t, direction=LOWER_IS_PRIVATE,
                                     units="fraction of members", fpr=x, ci=c, ci_level=self.confidence,
                                     ci_method=ci,
                                     chance_level=x)
                           for x, t, c in zip(self.fpr_levels, self.tpr_at_fpr, self.tpr_at_fpr_ci)],
            "roc": {"fpr": self.fpr, "tpr": self.tpr},
            "n_members": self.n_members, "n_nonmembers": self.n_nonmembers,
            "fpr_resolution": 1.0 / self.n_nonmembers, "notes": self.notes,
        }


def attack_metrics(scores: np.ndarray, is_member: np.ndarray, *, n_bootstrap: int = 1000,
                   seed: int = 0, confidence: float = 0.95,
                   fpr_levels: tuple[float, ...] = DEFAULT_FPR_LEVELS) -> AttackMetrics:
    """Evaluate membership scores (higher = member) against the truth ``is_member``.

    Confidence intervals: percentile bootstrap, resampling members and non-members
    separately (stratified) so every resample has both classes. TPR at FPR ``x`` is the
    highest TPR among thresholds with FPR <= x; with fewer than ``1/x`` non-members that
    means zero false positives, which the result notes.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    is_member = np.asarray(is_member, dtype=bool).reshape(-1)
    if scores.shape != is_member.shape or not np.isfinite(scores).all():
        raise ValueError(f"need finite scores and membership labels of the same length, got "
                         f"{scores.shape} and {is_member.shape}")
    members, nonmembers = np.flatnonzero(is_member), np.flatnonzero(~is_member)
    if len(members) == 0 or len(nonmembers) == 0:
        raise ValueError("attack_metrics needs at least one member and one non-member")
    auc, tprs, fpr, tpr = _auc_and_tprs(scores, is_member, fpr_levels)
    rng = np.random.default_rng(seed)
    boot = np.empty((n_bootstrap, 1 + len(fpr_levels)))
    for b in range(n_bootstrap):
        idx = np.r_[rng.choice(members, len(members)), rng.choice(nonmembers, len(nonmembers))]
        b_auc, b_tprs, _, _ = _auc_and_tprs(scores[idx], is_member[idx], fpr_levels)
        boot[b] = [b_auc, *b_tprs]
    tail = 100 * (1 - confidence) / 2
    if n_bootstrap:
        lo, hi = np.percentile(boot, [tail, 100 - tail], axis=0)
    else:
        lo = hi = np.full(1 + len(fpr_levels), np.nan)
    notes = [f"TPR at {x:g} FPR: only {len(nonmembers)} non-members, so this is the TPR with "
             "zero false positives" for x in fpr_levels if len(nonmembers) * x < 1]
    return AttackMetrics(auc=auc, auc_ci=(float(lo[0]), float(hi[0])), fpr_levels=tuple(fpr_levels),
                         tpr_at_fpr=tuple(tprs),
                         tpr_at_fpr_ci=tuple((float(a), float(b)) for a, b in zip(lo[1:], hi[1:])),
                         fpr=fpr, tpr=tpr, n_members=len(members), n_nonmembers=len(nonmembers),
                         confidence=confidence, n_bootstrap=n_bootstrap, notes=notes)


# ---------------------------------------------------------------------------------- tests

def membership_tests(scores: np.ndarray, is_member: np.ndarray, *, seed: int = 0,
                     top_fraction: float = TOP_FRACTION) -> dict:
    """The two pre-declared hypothesis tests of one attack, valid whenever members and
    non-members are exchangeable under the null "no leakage" (independent draws from one
    distribution that the generator never distinguished):

    * **AUC** — one-sided Mann-Whitney U test of "members score higher" (the U statistic
      is the AUC times ``n_members * n_nonmembers``);
    * **top** — the low-FPR regime: among the ``k = top_fraction * n`` highest-scored
      candidates (ties broken at random with ``seed``), how many are members; under the
      null that count is hypergeometric. A test that confidently picks out a few members
      fires here even at AUC ~ 0.5.

    The verdict combines them with a Bonferroni correction (report.membership_verdict).
    Bootstrap intervals stay in the report as descriptions: percentile intervals are not
    calibrated tests, and checking AUC and two TPRs against them gave several chances
    at a false warning per attack.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    is_member = np.asarray(is_member, dtype=bool).reshape(-1)
    n, n_in = len(scores), int(is_member.sum())
    auc_p = float(mannwhitneyu(scores[is_member], scores[~is_member], alternative="greater",
                               method="asymptotic").pvalue)
    k = max(1, int(round(top_fraction * n)))
    tie_break = np.random.default_rng(seed).random(n)
    top = np.lexsort((tie_break, -scores))[:k]
    hits = int(is_member[top].sum())
    top_p = float(hypergeom.sf(hits - 1, n, n_in, k))
    return {"auc_p_value": auc_p, "top_k": k, "top_k_members": hits,
            "top_k_members_expected": k * n_in / n, "top_k_p_value": top_p,
            "method": "one-sided Mann-Whitney U (AUC) and hypergeometric tail of members "
                      f"among the top {top_fraction:.0%} (low FPR), Bonferroni-combined"}


def implied_epsilon(tp: int, n_members: int, fp: int, n_nonmembers: int, *, delta: float, beta: float) -> float:
    """The ε lower bound that one operating point of an attack implies, at confidence
    ``1 - beta``: (ε, δ)-DP bounds every test of membership by ``TPR <= e^ε FPR + δ`` and
    ``1 - FPR <= e^ε (1 - TPR) + δ`` (Kairouz, Oh & Viswanath 2015), so with a one-sided
    Clopper-Pearson lower limit on the TPR and upper limit on the FPR (each at ``beta / 2``)
    ``ε >= max(log((TPR_lo - δ) / FPR_hi), log((1 - FPR_hi - δ) / (1 - TPR_lo)))``
    (Jagielski, Ullman & Oprea 2020; Nasr et al. 2021). 0 when neither is positive."""
    b = beta / 2
    tpr_lo = float(beta_dist.ppf(b, tp, n_members - tp + 1)) if tp > 0 else 0.0
    fpr_hi = float(beta_dist.ppf(1 - b, fp + 1, n_nonmembers - fp)) if fp < n_nonmembers else 1.0
    bounds = [0.0]
    if tpr_lo - delta > 0:
        bounds.append(np.log((tpr_lo - delta) / fpr_hi))
    if 1 - fpr_hi - delta > 0 and tpr_lo < 1:
        bounds.append(np.log((1 - fpr_hi - delta) / (1 - tpr_lo)))
    return float(max(bounds))


def dp_claim_test(scores: np.ndarray, is_member: np.ndarray, *, delta: float, level: float, seed: int = 0,
                  fractions: tuple[float, ...] = OPERATING_FRACTIONS) -> dict:
    """What one attack says about a DP claim: at each pre-declared operating point (the
    ``fraction`` highest-scored candidates called members, ties broken at random with
    ``seed``) the ε lower bound it implies (:func:`implied_epsilon`) at ``level / len(fractions)``
    (Bonferroni); the bound is the largest. ``max_attainable``: the bound a perfect attack
    would give with these candidates (every call right), which says how large a claim this
    audit can refute at all.

    The Clopper-Pearson intervals treat candidates as independent trials; a model ties
    them together, so this follows the usual practice of membership-based audits (ibid.)
    rather than a one-run theorem; canaries (Steinke, Nasr & Jagielski 2023) are the
    audit's exact test of a claim."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    is_member = np.asarray(is_member, dtype=bool).reshape(-1)
    n, n_in = len(scores), int(is_member.sum())
    n_out = n - n_in
    beta = level / len(fractions)
    order = np.lexsort((np.random.default_rng(seed).random(n), -scores))
    points, best, top = [], 0.0, 0.0
    for fraction in fractions:
        k = max(1, int(round(fraction * n)))
        tp = int(is_member[order[:k]].sum())
        fp = k - tp
        bound = implied_epsilon(tp, n_in, fp, n_out, delta=delta, beta=beta)
        perfect = implied_epsilon(min(k, n_in), n_in, k - min(k, n_in), n_out, delta=delta, beta=beta)
        points.append({"fraction": fraction, "called_members": k, "tpr": tp / max(n_in, 1),
                       "fpr": fp / max(n_out, 1), "epsilon_lower_bound": bound})
        best, top = max(best, bound), max(top, perfect)
    return {"epsilon_lower_bound": best, "max_attainable": top, "level": level, "delta": delta,
            "operating_points": points,
            "method": "ε implied by TPR <= e^ε FPR + δ and its mirror at each pre-declared operating point, "
                      "one-sided Clopper-Pearson limits, Bonferroni over the points"}
