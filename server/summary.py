"""The end of a run: ``summary.json`` (what was trained, under which guarantees, how it
ended, the last quality metrics) and ``report.html`` (docs/architecture.md §4).

How it ended is one word, ``status`` (:func:`run_status`):

- ``completed``: every planned round aggregated, no site failed or refused;
- ``completed_with_failures``: every planned round aggregated, but some site failed or
  refused in some round (the ``sites`` table says which, and why);
- ``stopped_early``: the run stopped before ``rounds_planned`` because the budget was spent
  (the sites refused, or the site-level budget ran out);
- ``failed``: no round was aggregated, every sampled site failed, or the run broke off.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedgen.contract import rundir
from fedgen.contract.scenario import Scenario
from fedgen.contract.secagg import THREAT_MODEL
from fedgen.contract.task import example_level
from fedgen.privacy.dp_fedsgd import public_steps
from fedgen.privacy.ledger import PrivacyLedger, atomic_write_text, site_sort_key
from fedgen.privacy.randomness import NOT_A_GUARANTEE
from fedgen.privacy.site_level import SiteLevelDP
from fedgen.shared_models import DPSGDTrainable, GenerativeModel

from .record import jsonable, quality_metrics

log = logging.getLogger(__name__)

STATUSES = ("completed", "completed_with_failures", "stopped_early", "failed")


class RunFailedError(RuntimeError):
    """A deployed run that did not complete cleanly: raised by the ServerApp after
    ``summary.json`` is written, so that Flower records the run as failed (``flwr ls``
    shows ``finished:failed``, the stream shows the line). The message is one line."""


def _aggregated(row: dict[str, Any]) -> bool:
    """Whether a ``metrics.jsonl`` row's round produced a new global model."""
    return bool(row.get("clients_ok")) or row.get("site_level_epsilon") is not None


def run_status(rows: list[dict[str, Any]], *, rounds_planned: int, rounds_completed: int,
               stopped_reason: str) -> str:
    """How the run whose ``metrics.jsonl`` rows are ``rows`` ended (module docstring)."""
    if stopped_reason == "budget_exhausted":
        return "stopped_early"
    if stopped_reason != "completed" or not any(_aggregated(r) for r in rows):
        return "failed"
    if rounds_completed < rounds_planned:
        return "stopped_early"
    if any(r.get("failures") or r.get("clients_refused") for r in rows):
        return "completed_with_failures"
    return "completed"


def site_table(rows: list[dict[str, Any]], ledger: PrivacyLedger | None = None,
               node_sites: dict[int, str] | None = None) -> list[dict[str, Any]]:
    """One entry per site seen in the run: rounds it trained (its update was aggregated),
    rounds it refused for budget, its failures (round and reason), its ledger's epsilon.
    ``node_sites`` (node id -> site id, as the run learnt them) names the site of a failure
    recorded as ``node N`` before that node first named its site."""
    sites: dict[str, dict[str, Any]] = {}
    aliases = {f"node {node}": site for node, site in (node_sites or {}).items()}

    def entry(site: str) -> dict[str, Any]:
        site = aliases.get(site, site)
        return sites.setdefault(site, {"site": site, "rounds_trained": 0, "rounds_refused": 0, "failures": [],
                                       "epsilon": None})

    for row in rows:
        for site in row.get("sites_trained") or []:
            entry(site)["rounds_trained"] += 1
        for site in row.get("sites_refused") or []:
            entry(site)["rounds_refused"] += 1
        for failure in row.get("failures") or []:
            entry(str(failure.get("site")))["failures"].append({"round": row.get("round"),
                                                                "reason": failure.get("reason", "")})
    for site, site_ledger in (ledger.sites if ledger is not None else {}).items():
        entry(site)["epsilon"] = site_ledger.epsilon
    return [sites[s] for s in sorted(sites, key=site_sort_key)]


def failure_line(summary: dict[str, Any], run_dir: Path) -> str:
    """One line naming a run's outcome and where to read it (``RunFailedError``'s message)."""
    failing = [f"{s['site']} ({s['failures'][-1]['reason']})" for s in summary.get("sites", []) if s["failures"]]
    refused = [s["site"] for s in summary.get("sites", []) if s["rounds_refused"]]
    detail = []
    if failing:
        detail.append("failed: " + ", ".join(failing))
    if refused:
        detail.append("refused for budget: " + ", ".join(refused))
    more = f"; {'; '.join(detail)}" if detail else ""
    return (f"fedgen run {summary['status']} ({summary['stopped_reason']}, {summary['rounds_completed']} of "
            f"{summary['rounds_planned']} rounds){more}; see {Path(run_dir) / rundir.SUMMARY} "
            f"or `fedgen status {run_dir}`")


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
        sec = scenario.federation.secure_aggregation
        threshold = sec.threshold if sec is not None else 0
        sums = (f"each site adding a share of the noise under secure aggregation; the server sees only the sum, "
                f"which carries the full noise whenever at least {threshold} sites are in it")
        fedsgd = ("DP-FedSGD with distributed Skellam noise: each round one step on a Poisson sample of every "
                  f"site's records, per-record gradients clipped and rounded to integers, {sums}")
        distributed = sec is not None and sec.noise == "distributed"
        if distributed and isinstance(model, DPSGDTrainable) and (public := public_steps(model)):
            fedsgd += f" (the {' and '.join(s.name for s in public)} step, which sees no data, taken by the server)"
        if model.release_epsilon is not None and distributed:  # a release warm start, then DP-FedSGD
            mechanism = (f"one distributed Skellam release of a per-class statistic, then {fedsgd}; the release and "
                         "the rounds composed in RDP (the Skellam and Poisson-subsampled Skellam mechanisms)")
        elif model.release_epsilon is not None:  # a hybrid: release round, then DP-SGD
            mechanism = "a Gaussian release of per-class sums, then DP-SGD, at every site"
        elif distributed and model.training_mode == "sgd":
            mechanism = f"{fedsgd}; RDP of the Poisson-subsampled Skellam mechanism (Zhu & Wang's bound)"
        elif distributed:
            mechanism = ("one distributed Skellam release of a per-class statistic: every record rounded to "
                         f"integers, {sums} (fewer abort the round: nothing released); RDP of the Skellam mechanism")
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


def write_failed_summary(run_dir: Path, error: BaseException, *, rounds_planned: int | None = None,
                         flower_run_id: int | None = None) -> dict[str, Any]:
    """``summary.json`` for a run the server could not finish (an exception): ``status:
    failed`` and the error in one line, what ``metrics.jsonl`` recorded until then."""
    rows = rundir.read_metrics(run_dir) if (Path(run_dir) / rundir.METRICS).exists() else []
    summary: dict[str, Any] = {
        "status": "failed", "rounds_completed": max((r["round"] for r in rows if _aggregated(r)), default=0),
        "rounds_planned": rounds_planned, "stopped_reason": "failed",
        "error": f"{type(error).__name__}: {error}".splitlines()[0][:400], "sites": site_table(rows)}
    if flower_run_id is not None:
        summary["flower_run_id"] = str(flower_run_id)
    atomic_write_text(Path(run_dir) / rundir.SUMMARY, json.dumps(jsonable(summary), indent=2))
    return summary


def write_summary(run_dir: Path, scenario: Scenario, model: GenerativeModel, privacy: RunPrivacy, *,
                  rounds_completed: int, stopped_reason: str, wall: float,
                  flower_run_id: int | None = None, node_sites: dict[int, str] | None = None) -> dict[str, Any]:
    """Write ``summary.json`` (and ``report.html``) for the run in ``run_dir``; the summary."""
    rows = rundir.read_metrics(run_dir)
    last_metrics = next((m for r in reversed(rows) if (m := quality_metrics(r))), {})
    cfg = scenario.privacy
    rounds_planned = scenario.federation.rounds
    summary = {
        "status": run_status(rows, rounds_planned=rounds_planned, rounds_completed=rounds_completed,
                             stopped_reason=stopped_reason),
        "rounds_completed": rounds_completed,
        "rounds_planned": rounds_planned,
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
        "sites": site_table(rows, privacy.ledger, node_sites),
    }
    if (sec := scenario.federation.secure_aggregation) is not None:
        summary["secure_aggregation"] = {**sec.model_dump(mode="json"), "protocol": "SecAgg+ (Bell et al. 2020)",
                                         "threat_model": THREAT_MODEL,
                                         "rounds_aborted": sum(1 for r in rows if r.get("secure_aggregation", {})
                                                               .get("released") is False)}
    if flower_run_id is not None:
        summary["flower_run_id"] = str(flower_run_id)  # a 64-bit id: a string, as in the site ledgers
    warm = Path(run_dir) / rundir.WARM_START  # server/warm_start.py: what was public, what it cost
    if warm.exists():
        summary["warm_start"] = json.loads(warm.read_text())
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
