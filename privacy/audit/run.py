"""``run_audit``: every applicable audit of one set of generated data, as one JSON-ready dict.

The CLI reads files and calls this; nothing here touches paths. Data roles:

* ``train``: the records the generator was trained on (members);
* ``holdout``: records from the same distribution that no site trained on. It is split
  at random (by ``seed``) in two halves: *non-member candidates* for membership inference,
  and *reference data* for DOMIAS's population density and, when no reference generator's
  samples are given, for calibrated GAN-Leaks. Keeping them disjoint matters: a reference
  density fit on the non-member candidates would make them look like non-members.
  Member candidates are a random subset of ``train`` of the same size (balanced classes).
  The memorisation audit uses the whole ``holdout``.

Spaces: ``data`` (records flattened, e.g. pixels) always; ``features`` when ``features_fn``
is given (the caller's domain features, e.g. from ``evaluation``, which ``privacy`` may not
import). White-box statistics and canaries do not depend on a space.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .canaries import epsilon_lower_bound
from .membership import (attack_metrics, domias, dp_claim_test, membership_tests, gan_leaks, gan_leaks_calibrated,
                         white_box)
from .memorization import memorization_audit
from .neighbours import as_matrix
from .report import VIOLATION, canary_verdict, membership_verdict, memorization_verdicts, violation_levels
from .results import fingerprint, jsonable

SCHEMA = "fedgen.audit/1"

ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class AuditSettings:
    """Knobs of :func:`run_audit`; every value is recorded in ``audit.json``."""

    near_copy_quantile: float = 0.01  # of held-out-to-training nearest distances
    near_copy_scale: float = 0.5  # threshold = scale x that quantile
    n_pairs: int = 16  # closest (synthetic, training) pairs shown
    gan_leaks_k: int = 1  # nearest synthetic samples averaged by GAN-Leaks
    domias_components: int = 5  # PCA dims for DOMIAS' KDEs
    domias_bandwidth: str = "scott"  # "scott" or "cv"
    n_bootstrap: int = 1000
    confidence: float = 0.95  # of bootstrap CIs and of the canary bound
    significance: float = 0.05  # family-wise level of the membership warnings, and of a violation, of one audit
    membership_share: float = 1.0  # of the membership family's level, for these attacks (the rest: LiRA's)
    canary_fraction: float = 0.1  # k+ = k- = round(fraction x m), fixed before looking
    chunk_size: int = 1024  # query rows per nearest-neighbour block


@dataclass(frozen=True)
class WhiteBoxScores:
    """A per-record model statistic for LOGAN / loss-threshold attacks, computed by the
    caller on every row of ``train`` and of ``holdout`` (aligned with them)."""

    name: str  # e.g. "discriminator output", "log-likelihood", "loss"
    train: np.ndarray
    holdout: np.ndarray
    higher_means_member: bool = True  # False for a loss


_ATTACKS = ("gan_leaks", "gan_leaks_calibrated", "domias")  # the black-box attacks of every space


@dataclass(frozen=True)
class _Candidates:
    members: np.ndarray  # rows of train
    nonmembers: np.ndarray  # rows of holdout
    reference: np.ndarray  # rows of holdout, disjoint from nonmembers

    @property
    def is_member(self) -> np.ndarray:
        return np.r_[np.ones(len(self.members), bool), np.zeros(len(self.nonmembers), bool)]


def _split_candidates(n_train: int, n_holdout: int, seed: int) -> _Candidates:
    if n_holdout < 4:
        raise ValueError(f"holdout has {n_holdout} records; the audit needs at least 4 "
                         "(half non-member candidates, half reference data)")
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(n_holdout)
    reference, nonmembers = np.sort(shuffled[: n_holdout // 2]), np.sort(shuffled[n_holdout // 2:])
    members = np.sort(rng.choice(n_train, min(n_train, len(nonmembers)), replace=False))
    return _Candidates(members=members, nonmembers=nonmembers, reference=reference)


def _space_audit(synthetic: np.ndarray, train: np.ndarray, holdout: np.ndarray,
                 reference_synthetic: np.ndarray | None, cand: _Candidates, settings: AuditSettings,
                 seed: int, dp: tuple[float, float] | None = None) -> dict:
    """Memorisation and black-box membership audits in one space (arrays already in it)."""
    mem = memorization_audit(synthetic, train, holdout, seed=seed,
                             near_copy_quantile=settings.near_copy_quantile,
                             near_copy_scale=settings.near_copy_scale, n_pairs=settings.n_pairs,
                             chunk_size=settings.chunk_size)
    candidates = np.concatenate([train[cand.members], holdout[cand.nonmembers]])
    reference_data = holdout[cand.reference]
    calib = reference_synthetic if reference_synthetic is not None else reference_data
    k, chunk = settings.gan_leaks_k, settings.chunk_size
    attacks = {  # the keys are _ATTACKS
        "gan_leaks": ("GAN-Leaks full black-box (Chen et al. 2020)",
                      lambda: gan_leaks(candidates, synthetic, k=k, chunk_size=chunk)),
        "gan_leaks_calibrated": (
            "GAN-Leaks calibrated (Chen et al. 2020), reference "
            + ("generator" if reference_synthetic is not None else "held-out data"),
            lambda: gan_leaks_calibrated(candidates, synthetic, calib, k=k, chunk_size=chunk)),
        "domias": ("DOMIAS (van Breugel et al. 2023)",
                   lambda: domias(candidates, synthetic, reference_data,
                                  n_components=settings.domias_components,
                                  bandwidth=settings.domias_bandwidth, seed=seed)),
    }
    membership = {name: {"attack": title, "score_direction": "higher = more likely member",
                         **_metrics(attack(), cand.is_member, settings, seed, dp)}
                  for name, (title, attack) in attacks.items()}
    return {"memorization": mem.to_dict(), "membership": membership}


def _metrics(scores: np.ndarray, is_member: np.ndarray, settings: AuditSettings, seed: int,
             dp: tuple[float, float] | None = None) -> dict:
    """An attack's metrics and tests; with ``dp = (delta, level)`` (a DP claim) also the ε
    lower bound its operating points imply (membership.dp_claim_test)."""
    out = {**attack_metrics(scores, is_member, n_bootstrap=settings.n_bootstrap, seed=seed,
                            confidence=settings.confidence).to_dict(),
           "test": membership_tests(scores, is_member, seed=seed)}
    if dp is not None:
        out["dp_test"] = dp_claim_test(scores, is_member, delta=dp[0], level=dp[1], seed=seed)
    return out


def _white_box(scores: Sequence[WhiteBoxScores], cand: _Candidates, settings: AuditSettings,
               seed: int, dp: tuple[float, float] | None = None) -> dict:
    out = {}
    for s in scores:
        statistic = np.r_[np.asarray(s.train, float).reshape(-1)[cand.members],
                          np.asarray(s.holdout, float).reshape(-1)[cand.nonmembers]]
        oriented = white_box(statistic, higher_means_member=s.higher_means_member)
        out[f"white_box/{s.name}"] = {
            "attack": f"white-box {s.name} (LOGAN, Hayes et al. 2019; Yeom et al. 2018)",
            "score_direction": "higher = more likely member",
            **_metrics(oriented, cand.is_member, settings, seed, dp)}
    return out


def run_audit(
    synthetic: ArrayLike,
    train: ArrayLike,
    holdout: ArrayLike,
    *,
    reference_synthetic: ArrayLike | None = None,
    white_box_scores: WhiteBoxScores | Sequence[WhiteBoxScores] | None = None,
    canary_scores: ArrayLike | None = None,
    canary_included: ArrayLike | None = None,
    claimed_epsilon: float | None = None,
    delta: float | None = None,
    features_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    seed: int = 0,
    settings: AuditSettings | None = None,
    white_box_canaries: bool = False,
    members_epsilon: float | None = None,
) -> dict:
    """Run every applicable audit and return the JSON-ready ``audit.json`` dict.

    ``synthetic``, ``train``, ``holdout`` (and ``reference_synthetic``, samples of a
    reference generator that never saw ``train``) are arrays with one record per row in
    the data's shape and range. ``canary_scores`` (higher = more likely included) and
    ``canary_included`` (the :func:`plan_canaries` bits) give the one-run eps lower bound
    (Steinke et al. 2023), compared with ``claimed_epsilon`` at ``delta``.
    ``features_fn`` maps a batch of records to feature vectors; the memorisation and
    black-box audits are then repeated in that space.

    Under a claim (``claimed_epsilon``), every test that can flag a *violation* gets a share
    of ``settings.significance`` (report.violation_levels): the record canaries, the white-box
    canaries the caller runs beside this audit (``white_box_canaries``: its level is
    ``settings["violation_levels"]["white_box_canaries"]`` of the result) and the membership
    attacks, whose verdicts then test the claim that covers every member, ``members_epsilon``
    (default ``claimed_epsilon``; with several sites, the largest of their claims)
    (report.membership_verdict). So a mechanism
    that meets its claim is flagged in at most ``significance`` of audits.
    """
    settings = settings or AuditSettings()
    members_epsilon = claimed_epsilon if members_epsilon is None else members_epsilon
    if (canary_scores is None) != (canary_included is None):
        raise ValueError("canary audit needs both canary_scores and canary_included")
    if (canary_scores is not None or members_epsilon is not None) and delta is None:
        raise ValueError("delta is required with canaries or a claimed epsilon: the lower bound "
                         "and the claim are both (epsilon, delta) statements")
    raw = {"synthetic": synthetic, "train": train, "holdout": holdout}
    if reference_synthetic is not None:
        raw["reference_synthetic"] = reference_synthetic
    arrays = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
              for k, v in raw.items()}
    inputs = {name: fingerprint(a) for name, a in arrays.items()}
    cand = _split_candidates(len(arrays["train"]), len(arrays["holdout"]), seed)
    spaces_in = {"data": {k: as_matrix(a, name=k) for k, a in arrays.items()}}
    if features_fn is not None:
        spaces_in["features"] = {k: as_matrix(features_fn(a), name=f"features of {k}")
                                 for k, a in arrays.items()}
    if isinstance(white_box_scores, WhiteBoxScores):
        white_box_scores = [white_box_scores]
    white_box_scores = list(white_box_scores or [])
    # Who can flag a violation shares the family-wise level (report.violation_levels).
    groups = ((["canaries"] if canary_scores is not None and claimed_epsilon is not None else [])
              + (["white_box_canaries"] if white_box_canaries else [])
              + (["membership"] if members_epsilon is not None else []))
    levels = violation_levels(settings.significance, groups) if groups else {}
    # One family of membership tests per audit: Bonferroni over every attack in every space,
    # so the chance of any false membership warning (no claim), or of a false violation
    # (under a claim, its share), is at most the family's level.
    family = levels.get("membership", settings.significance)
    n_attacks = len(_ATTACKS) * len(spaces_in) + len(white_box_scores)
    level = family * settings.membership_share / max(n_attacks, 1)
    dp = None if members_epsilon is None else (delta, level)
    spaces = {space: _space_audit(x["synthetic"], x["train"], x["holdout"],
                                  x.get("reference_synthetic"), cand, settings, seed, dp)
              for space, x in spaces_in.items()}
    white = _white_box(white_box_scores, cand, settings, seed, dp)
    canaries = None
    if canary_scores is not None:
        scores = np.asarray(canary_scores, dtype=float).reshape(-1)
        k = max(1, round(settings.canary_fraction * len(scores)))
        confidence = 1 - levels["canaries"] if "canaries" in levels else settings.confidence
        canaries = epsilon_lower_bound(scores, np.asarray(canary_included, bool), delta=delta,
                                       k_plus=k, k_minus=k, confidence=confidence).to_dict()
        inputs["canary_scores"] = fingerprint(scores)
        inputs["canary_included"] = fingerprint(np.asarray(canary_included, bool))

    verdicts = []
    for space, result in spaces.items():
        verdicts += memorization_verdicts(space, result["memorization"])
        verdicts += [membership_verdict(f"{m['attack']} ({space} space)", m, level=level,
                                        claimed_epsilon=members_epsilon)
                     for m in result["membership"].values()]
    verdicts += [membership_verdict(m["attack"], m, level=level, claimed_epsilon=members_epsilon)
                 for m in white.values()]
    if canaries is not None:
        verdicts.append(canary_verdict(canaries, claimed_epsilon))
    first = arrays["synthetic"]
    return jsonable({
        "schema": SCHEMA,
        "inputs": inputs,
        "settings": {**asdict(settings), "seed": seed, "delta": delta,
                     "claimed_epsilon": claimed_epsilon, "members_epsilon": members_epsilon,
                     "violation_levels": levels, "membership_family_level": family,
                     "membership_attack_level": level,
                     "image_shape": list(first.shape[1:]) if first.ndim >= 3 else None,
                     "spaces": list(spaces),
                     "n_member_candidates": len(cand.members),
                     "n_nonmember_candidates": len(cand.nonmembers),
                     "n_reference_records": len(cand.reference),
                     "calibration_reference": ("reference_synthetic" if reference_synthetic
                                               is not None else "held-out reference half")},
        "spaces": spaces,
        "white_box": white,
        "canaries": canaries,
        "claimed_epsilon": claimed_epsilon,
        "accounting_violation": any(v["level"] == VIOLATION for v in verdicts),
        "verdicts": verdicts,
    })
