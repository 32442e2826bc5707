"""Prepare a run directory before any Flower process starts.

Everything that can be wrong with a scenario or its data is found here, *before* the run
directory exists: the directory is assembled under a hidden temporary name and renamed
into place only when complete, so a failed validation leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import yaml

from client.data import SiteData, load_data
from server import rundir
from server.run import build_global_model

from .partition import holdout_split, partition
from .scenario import Scenario, load_scenario


def load_scenario_data(scenario: Scenario) -> SiteData:
    data = load_data(scenario.data.format, scenario.data.path)
    if not scenario.data.conditional or data.y is None:
        data = data.without_labels()
    return data


def split_sites(scenario: Scenario, data: SiteData) -> tuple[list[np.ndarray], np.ndarray]:
    """(per-site indices, held-out indices) into ``data``; validates the partition."""
    train_idx, hold_idx = holdout_split(len(data), scenario.data.holdout_fraction, scenario.seed)
    labels = None if data.y is None else data.y.numpy()[train_idx]
    p = scenario.partition
    parts = partition(p.name, labels, len(train_idx), scenario.federation.num_sites, seed=scenario.seed,
                      min_examples=p.min_examples, alpha=p.alpha, shards_per_site=p.shards_per_site)
    return [train_idx[part] for part in parts], hold_idx


def check_scenario(scenario: Scenario) -> tuple[SiteData, list[np.ndarray], np.ndarray]:
    """Everything ``fedgen validate`` checks: data readable and valid, partition possible,
    model buildable for the data. Trains nothing, writes nothing."""
    data = load_scenario_data(scenario)
    sites, holdout = split_sites(scenario, data)
    spec = _spec(scenario, data)
    build_global_model(scenario.resolved(), spec)
    return data, sites, holdout


def _spec(scenario: Scenario, data: SiteData) -> rundir.DataSpec:
    path = str(Path(scenario.data.path).resolve()) if scenario.data.path else None
    return rundir.DataSpec(format=scenario.data.format, path=path, shape=data.shape,
                           num_classes=data.num_classes, num_sites=scenario.federation.num_sites)


def default_run_dir(scenario: Scenario, out_root: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(out_root) / f"{scenario.name}-{stamp}"
    candidate, k = base, 1
    while candidate.exists():
        k += 1
        candidate = base.with_name(f"{base.name}-{k}")
    return candidate


def write_run_dir(scenario: Scenario, run_dir: Path) -> Path:
    """Validate, then create ``run_dir`` atomically with the resolved scenario and inputs."""
    data, sites, holdout = check_scenario(scenario)
    run_dir = Path(run_dir).resolve()
    if run_dir.exists():
        raise FileExistsError(f"{run_dir}: already exists; choose another --out or use --resume")
    tmp = run_dir.with_name(f".{run_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / rundir.INPUTS).mkdir(parents=True)
        (tmp / rundir.SCENARIO).write_text(yaml.safe_dump(scenario.resolved(), sort_keys=False))
        (tmp / rundir.SITE_DATA).write_text(_spec(scenario, data).to_json())
        np.savez(tmp / rundir.PARTITIONS, holdout=holdout, **{f"site_{i}": s for i, s in enumerate(sites)})
        ref = data.subset(holdout)
        ref_arrays = {"x": ref.x.numpy()} | ({"y": ref.y.numpy()} if ref.y is not None else {})
        np.savez_compressed(tmp / rundir.REFERENCE, **ref_arrays)
        (tmp / "inputs" / "sites.json").write_text(json.dumps(
            {str(i): {"examples": int(len(s))} for i, s in enumerate(sites)}, indent=2))
        tmp.rename(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir


def prepare_run(scenario_path: Path, out_root: Path, overrides: list[str] | None = None) -> Path:
    scenario = load_scenario(scenario_path, overrides)
    return write_run_dir(scenario, default_run_dir(scenario, out_root))
