"""Shadow federations for LiRA (``fedgen audit RUN_DIR --shadows K``; the attack itself is
:mod:`privacy.audit.shadows`).

Each shadow is a whole federation of the run's own scenario (same model, rounds, sites,
training, privacy settings; without the run's canaries or white-box audit, on the
in-process engine, evaluated only at the end) trained on a random half of LiRA's
candidates -- the run's training records and as many of its held-out records -- split over
the sites in the proportions of the run's own partition. Shadows train in parallel
processes (at most one per CPU core, ``jobs``), in a temporary folder that is removed
afterwards. The statistic is minus the per-record loss of the model's first private step
(``audit_cli.per_example_loss``, one fixed seed, averaged over :data:`STATISTIC_DRAWS` draws of
the loss's own randomness: a VAE's ELBO is noisy) on every candidate.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedgen.client.data import SiteData, load_data
from fedgen.contract import rundir
from fedgen.contract.scenario import Scenario, scenario_from_dict
from fedgen.privacy.audit import shadows
from fedgen.privacy.audit.report import membership_verdict
from fedgen.privacy.ledger import atomic_write

from .errors import AuditError

STATISTIC_SEED = 0
STATISTIC_DRAWS = 32  # the loss is averaged over this many draws (the 250-record benchmark: AUC 0.61 at 4, 0.68 at 32)


def shadow_scenario(scenario: Scenario, index: int) -> Scenario:
    """The run's recipe for shadow ``index``: no canaries, no white-box audit, in-process,
    evaluated once at the end on few samples (the shadow's quality is never read)."""
    d = scenario.resolved()
    d["name"] = f"{scenario.name}-shadow{index}"
    d["privacy"] = {**d["privacy"], "canaries": None, "white_box": None}
    d["simulation"] = {**d["simulation"], "engine": "inprocess", "faults": None, "byzantine": None}
    d["evaluation"] = {**d["evaluation"], "every": 0, "num_samples": 10, "tstr": False, "federated": False}
    return scenario_from_dict(d, source=f"shadow {index} of {scenario.name}")


def split_like(indices: np.ndarray, site_sizes: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    """``indices`` shuffled and cut into len(site_sizes) parts proportional to ``site_sizes``."""
    order = rng.permutation(indices)
    cuts = np.round(np.cumsum(site_sizes)[:-1] / sum(site_sizes) * len(order)).astype(int)
    return [np.sort(p) for p in np.split(order, cuts)]


def _train_shadow(job: dict[str, Any]) -> str:
    """One shadow federation (runs in a worker process): its run directory."""
    torch.set_num_threads(1)
    from rich.console import Console

    from .prepare import write_run_dir
    from .runner import run_simulation_dir

    scenario = scenario_from_dict(job["scenario"], source="shadow")
    run_dir = write_run_dir(scenario, Path(job["dir"]))
    parts = {f"site_{i}": np.asarray(s, dtype=np.int64) for i, s in enumerate(job["sites"])}
    with np.load(run_dir / rundir.PARTITIONS) as z:
        holdout = z["holdout"]
    buffer = io.BytesIO()
    np.savez(buffer, holdout=holdout, **parts)
    atomic_write(run_dir / rundir.PARTITIONS, lambda fh: fh.write(buffer.getvalue()))
    sites = json.loads((run_dir / rundir.SITES).read_text())
    for i, s in enumerate(job["sites"]):
        sites[str(i)]["examples"] = len(s)
    (run_dir / rundir.SITES).write_text(json.dumps(sites, indent=2))
    run_simulation_dir(run_dir, scenario, console=Console(file=io.StringIO()))
    return str(run_dir)


def _minus_loss(model, data: SiteData) -> np.ndarray:
    from .audit_cli import per_example_loss

    return -per_example_loss(model, data.x, data.y if model.conditional else None, seed=STATISTIC_SEED,
                             draws=STATISTIC_DRAWS)


def lira_run_dir(run_dir: Path, k: int, *, seed: int = 0, jobs: int | None = None, n_bootstrap: int = 200,
                 level: float = 0.05, claimed_epsilon: float | None = None,
                 delta: float | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """LiRA on ``run_dir``'s final model with ``k`` shadow federations: the ``audit.json``
    entry ``lira`` and its verdict, its two tests at ``level / 2`` each; under a DP claim
    (``claimed_epsilon`` at ``delta``) the verdict tests the claim at ``level``."""
    from .sampling import load_run_model

    try:
        shadows.check_shadow_count(k)
    except ValueError as err:
        raise AuditError(str(err)) from None
    run_dir = Path(run_dir)
    scenario = rundir.read_scenario(run_dir)
    spec = rundir.DataSpec.read(run_dir)
    with np.load(run_dir / rundir.PARTITIONS) as z:
        site_parts = [z[f"site_{i}"] for i in range(spec.num_sites)]
        holdout_idx = z["holdout"]
    members = np.sort(np.concatenate(site_parts))
    cand = shadows.candidates(len(members), len(holdout_idx), seed=seed)
    pool = np.r_[members[cand.members], holdout_idx[cand.nonmembers]]
    plan = shadows.shadow_plan(len(pool), k, seed=seed)
    rng = np.random.default_rng([seed, 7])
    sizes = [len(s) for s in site_parts]
    model = load_run_model(run_dir)
    data = load_data(spec.format, spec.path, spec.options)
    data = data if model.conditional and data.y is not None else data.without_labels()
    records = data.subset(pool)
    target = _minus_loss(model, records)
    jobs = max(1, min(k, jobs or os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="fedgen-shadows-") as tmp:
        work = [{"scenario": shadow_scenario(scenario, i).resolved(), "dir": str(Path(tmp) / f"shadow{i}"),
                 "sites": [s.tolist() for s in split_like(pool[plan[i]], sizes, rng)]} for i in range(k)]
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            dirs = list(ex.map(_train_shadow, work))
        stats = np.stack([_minus_loss(load_run_model(Path(d)), records) for d in dirs])
    entry = shadows.lira_audit(target, stats, plan, cand.is_member, n_bootstrap=n_bootstrap, seed=seed,
                               dp=None if claimed_epsilon is None else (delta, level))
    entry.update({"candidates": {"members": len(cand.members), "nonmembers": len(cand.nonmembers)},
                  "parallel_jobs": jobs, "significance": level})
    return entry, membership_verdict("LiRA", entry, level=level, claimed_epsilon=claimed_epsilon)
