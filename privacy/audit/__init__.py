"""Privacy audit of generated data: evidence for a privacy officer deciding whether
synthetic data may leave a site.

* :mod:`.memorization` — distance to closest record: DCR share sign test, near-copies,
  closest pairs;
* :mod:`.membership` — membership inference (GAN-Leaks, calibrated GAN-Leaks, DOMIAS,
  LOGAN / loss-threshold white-box), :func:`attack_metrics` and, under a DP claim, the ε
  an attack implies (:func:`dp_claim_test`);
* :mod:`.canaries` — canary plans and the one-run empirical epsilon lower bound of
  Steinke, Nasr & Jagielski (2023);
* :mod:`.dirac` — white-box Dirac gradient canaries in DP-SGD (a site's audit run) and
  their one-run epsilon lower bound from every round's update;
* :mod:`.shadows` — LiRA, the shadow-model membership attack (``fedgen audit --shadows K``);
* :mod:`.report` — verdicts in words, ``audit.json`` text and the HTML report;
* :func:`run_audit` — all of the above on arrays (the CLI reads files and calls it).
"""

from .canaries import (
    CanaryAudit,
    CanaryPlan,
    count_correct,
    epsilon_from_counts,
    epsilon_lower_bound,
    epsilon_lower_bound_over_grid,
    p_value,
    plan_canaries,
)
from .membership import (
    AttackMetrics,
    attack_metrics,
    domias,
    dp_claim_test,
    gan_leaks,
    gan_leaks_calibrated,
    membership_tests,
    roc_curve,
    white_box,
)
from .memorization import (
    ClosestPairs,
    DCRShareTest,
    MemorizationResult,
    NearCopies,
    closest_pairs,
    dcr_share_test,
    memorization_audit,
    near_copies,
)
from .neighbours import nearest_neighbours
from .report import render_html, to_json
from . import shadows
from .shadows import lira, lira_audit
from .results import fingerprint
from .run import AuditSettings, WhiteBoxScores, run_audit

__all__ = [
    "AttackMetrics",
    "AuditSettings",
    "CanaryAudit",
    "CanaryPlan",
    "ClosestPairs",
    "DCRShareTest",
    "MemorizationResult",
    "NearCopies",
    "WhiteBoxScores",
    "attack_metrics",
    "closest_pairs",
    "count_correct",
    "dcr_share_test",
    "domias",
    "dp_claim_test",
    "epsilon_from_counts",
    "epsilon_lower_bound",
    "epsilon_lower_bound_over_grid",
    "fingerprint",
    "gan_leaks",
    "gan_leaks_calibrated",
    "lira",
    "lira_audit",
    "memorization_audit",
    "membership_tests",
    "near_copies",
    "nearest_neighbours",
    "p_value",
    "plan_canaries",
    "render_html",
    "roc_curve",
    "run_audit",
    "to_json",
    "white_box",
]
