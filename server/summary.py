"""The end of a run: ``summary.json`` (what was trained, under which guarantees, how it
ended, the last quality metrics) and ``report.html`` (docs/architecture.md §4)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedgen.contract import rundir
from fedgen.contract.scenario import Scenario
from fedgen.contract.task import example_level
from fedgen.privacy.ledger import PrivacyLedger, atomic_write_text
from fedgen.privacy.randomness import NOT_A_GUARANTEE
from fedgen.privacy.site_level import SiteLevelDP
from fedgen.shared_models import GenerativeModel

from .record import jsonable, quality_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPrivacy:
    """The run's DP as it ended: the example-level ledger, site-level DP, the noise's source."""

    ledger: PrivacyLedger
    site_dp: SiteLevelDP | None
    seeded_noise: bool


def guarantees(scenario: Scenario, model: GenerativeModel, privacy: RunPrivacy) -> list[dict[str, Any]]:
    """Each DP guarantee of the run in words: what it protects, at which (epsilon, delta)."""
    out = []
    if example_level(scenario):
        if model.release_epsilon is not None:  # a hybrid: release round, then DP-SGD
            mechanism = "a Gaussian release of per-class sums, then DP-SGD, at every site"
        elif model.training_mode == "release":
            mechanism = "one Gaussian release of a per-class statistic at every site"
        else:
            mechanism = "DP-SGD at every site"
        out.append({"unit": "example", "epsilon": privacy.ledger.epsilon, "delta": scenario.privacy.delta,
                    "mechanism": f"{mechanism} (largest epsilon over sites)",
                    "protects": "any single training record at a site"})
    if privacy.site_dp is not None:
        out.append({"unit": "site", "epsilon": privacy.site_dp.epsilon, "delta": privacy.site_dp.delta,
                    "mechanism": "DP-FedAvg on the server (clipped site updates, Gaussian noise, "
                                 "Poisson site sampling)",
                    "protects": "whether any one site took part at all, all of its records together"})
    for guarantee in out:
        guarantee["noise"] = NOT_A_GUARANTEE if privacy.seeded_noise else "secret: fresh OS entropy every round"
    return out


def write_summary(run_dir: Path, scenario: Scenario, model: GenerativeModel, privacy: RunPrivacy, *,
                  rounds_completed: int, stopped_reason: str, wall: float) -> dict[str, Any]:
    """Write ``summary.json`` (and ``report.html``) for the run in ``run_dir``; the summary."""
    rows = rundir.read_metrics(run_dir)
    last_metrics = next((m for r in reversed(rows) if (m := quality_metrics(r))), {})
    cfg = scenario.privacy
    summary = {
        "rounds_completed": rounds_completed,
        "stopped_reason": stopped_reason,
        "model": scenario.model.family,
        "epsilon": privacy.ledger.epsilon if example_level(scenario) else None,
        "delta": cfg.delta if example_level(scenario) else None,
        "privacy_unit": cfg.unit if cfg.enabled else None,
        "site_level_epsilon": privacy.site_dp.epsilon if privacy.site_dp is not None else None,
        "guarantees": guarantees(scenario, model, privacy),
        "seeded_noise": privacy.seeded_noise,
        "metrics": last_metrics,
        "wall_seconds": wall,
    }
    if privacy.seeded_noise and cfg.enabled:
        summary["warning"] = NOT_A_GUARANTEE + " (privacy.seeded_noise: true, seed in scenario.yaml)"
    if stopped_reason == "clients_failed":
        summary["failure"] = rows[-1]["failures"][0]["reason"] if rows and rows[-1]["failures"] else ""
    atomic_write_text(Path(run_dir) / rundir.SUMMARY, json.dumps(jsonable(summary), indent=2))
    try:
        from fedgen.evaluation.report import write_run_report

        write_run_report(Path(run_dir))
    except Exception as err:  # a report must never lose a finished run
        log.warning("report.html not written: %s", err)
    return summary
