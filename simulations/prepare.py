"""Prepare a run directory before any Flower process starts.

Everything that can be wrong with a scenario or its data is found here, *before* the run
directory exists: the directory is assembled under a hidden temporary name and renamed
into place only when complete, so a failed validation leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import yaml

from fedgen.client.data import SiteData, declared_table, load_data
from fedgen.evaluation.features import default_cache_dir
from fedgen.privacy.audit import plan_canaries
from fedgen.privacy.skellam import BitsTooSmall
from fedgen.contract import rundir
from fedgen.contract.data_formats import recorded_options
from fedgen.contract.task import build_global_model, distributed_noise_plan, site_level_mechanism

from .errors import PartitionError, ScenarioError
from .warm_start import public_set
from .partition import CACHE_VERSION, holdout_split, partition, read_cached_split, spread_over_sites, write_cached_split
from fedgen.contract.scenario import Scenario, load_scenario

log = logging.getLogger(__name__)


def load_scenario_data(scenario: Scenario) -> SiteData:
    data = load_data(scenario.data.format, scenario.data.path, scenario.data.options)
    if not scenario.data.conditional or data.y is None:
        data = data.without_labels()
    return data


def split_sites(scenario: Scenario, data: SiteData) -> tuple[list[np.ndarray], np.ndarray]:
    """(per-site indices, held-out indices) into ``data``; validates the partition.

    A split is computed once per (data content, partition settings, number of sites,
    holdout fraction, seed) and kept in the partition cache (:func:`partition_cache_file`),
    so sweeps and repeated runs over the same data skip re-partitioning. A cached entry is
    used only if it holds every index of ``data`` exactly once with every site big enough;
    otherwise it is recomputed and rewritten."""
    p, num_sites = scenario.partition, scenario.federation.num_sites
    key, path = partition_cache_file(scenario, data)
    cached = read_cached_split(path, key=key, num_sites=num_sites, num_examples=len(data),
                               min_examples=p.min_examples)
    if cached is not None:
        log.debug("partition cache hit: %s", path)
        return cached
    train_idx, hold_idx = holdout_split(len(data), scenario.data.holdout_fraction, scenario.seed)
    labels = None if data.y is None else data.y.numpy()[train_idx]
    parts = partition(p.name, labels, len(train_idx), num_sites, seed=scenario.seed,
                      min_examples=p.min_examples, alpha=p.alpha, shards_per_site=p.shards_per_site)
    sites = [train_idx[part] for part in parts]
    write_cached_split(path, sites, hold_idx, key=key)
    return sites, hold_idx


def partition_cache_file(scenario: Scenario, data: SiteData) -> tuple[str, Path]:
    """(key, file) of this scenario's split in the partition cache, ``partitions/`` next to
    the evaluation feature cache (``$FEDGEN_CACHE``, else ``~/.cache/fedgen``). The key
    hashes everything the indices depend on; ``feature_skew`` is left out (it transforms
    the examples, not which site holds them)."""
    settings = {"version": CACHE_VERSION, "numpy": np.__version__, "data": data.fingerprint(), "n": len(data),
                "partition": scenario.partition.model_dump(mode="json", exclude={"feature_skew"}),
                "num_sites": scenario.federation.num_sites, "holdout_fraction": scenario.data.holdout_fraction,
                "seed": scenario.seed}
    key = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=16).hexdigest()
    return key, default_cache_dir().parent / "partitions" / f"{key}.npz"


def site_feature_skew(scenario: Scenario, data: SiteData) -> list[dict[str, object] | None]:
    """Each site's feature-skew transform, as recorded in ``inputs/sites.json`` and applied
    by the site (``client/feature_skew.py``): the parameter of ``partition.feature_skew``
    spread evenly over its range, dealt to the sites by seed. ``None`` per site when the
    scenario has no feature skew; a one-line error when the data are not images."""
    skew, num_sites = scenario.partition.feature_skew, scenario.federation.num_sites
    if skew is None:
        return [None] * num_sites
    if len(data.shape) != 3:
        raise PartitionError(f"partition.feature_skew: {skew.kind} transforms images, but {data.source} holds "
                             f"vectors of shape {data.shape}; remove partition.feature_skew for tabular data")
    low, high = skew.bounds()
    values = spread_over_sites(low, high, num_sites, seed=scenario.seed)
    return [{"kind": skew.kind, skew.parameter: round(float(v), 6)} for v in values]


def check_scenario(scenario: Scenario) -> tuple[SiteData, list[np.ndarray], np.ndarray]:
    """Everything ``fedgen validate`` checks: data readable and valid, partition possible,
    feature skew applicable, model buildable for the data. Trains nothing; writes nothing
    but the partition cache."""
    data = load_scenario_data(scenario)
    sites, holdout = split_sites(scenario, data)
    site_feature_skew(scenario, data)  # feature skew on data that are not images fails here
    spec = _spec(scenario, data)
    model = _build_model(scenario, spec, f"the data ({data.source})")  # a release share is checked by the contract
    try:  # the sum of what the sites add under distributed noise must fit the bit width
        distributed_noise_plan(scenario, model)
    except BitsTooSmall as err:
        raise ScenarioError(f"federation.secure_aggregation.bits: {err}") from None
    check_delta(scenario, max(len(s) for s in sites))
    public_set(scenario, spec.shape, spec.num_classes)  # a warm start's public set must fit the model
    site_level_mechanism(scenario, spec.num_sites)  # a site-level budget that cannot be met fails here
    plant_canaries(scenario, data)  # checks privacy.canaries against the federation
    return data, sites, holdout


def check_delta(scenario: Scenario, largest_site: int) -> None:
    """delta must be below 1/n: at delta >= 1/n a mechanism that publishes one random
    record outright is (0, delta)-DP (Dwork & Roth 2014, §2.3), so the pair promises nothing."""
    delta = scenario.privacy.delta
    if scenario.privacy.enabled and scenario.privacy.unit != "site" and delta >= 1.0 / largest_site:
        raise ScenarioError(f"privacy.delta: {delta:g} is not below 1/n = 1/{largest_site} for the largest site; "
                            "use a delta well below 1/n (e.g. 1e-5)")


CANARY_KIND = "random binary pattern"


def plant_canaries(scenario: Scenario, data: SiteData) -> dict[str, np.ndarray] | None:
    """The audit canaries of ``privacy.canaries`` as the arrays of ``inputs/canaries.npz``,
    or ``None`` when the scenario plants none.

    Each canary is an image (or row) of independent Bernoulli pixels, 0 or 1, with the
    data's mean intensity as the probability, and a uniformly random label when the data
    is labelled: in range and of the data's shape, so the site's validation and the model
    accept it, but unlike any real record and unlike each other, so a model that
    memorises training records memorises these too (the random "secret" canaries of
    Carlini et al. 2019, "The Secret Sharer"). Each is included independently with
    probability 1/2 (:func:`privacy.audit.plan_canaries`, the inclusion bits ``S_i`` of
    Steinke, Nasr & Jagielski 2023); pixels and labels come from a stream of ``seed``
    independent of the bits, so a canary's content says nothing about its inclusion.
    """
    cfg = scenario.privacy.canaries
    if cfg is None:
        return None
    if cfg.site >= scenario.federation.num_sites:
        raise ScenarioError(f"privacy.canaries.site: {cfg.site} is not a site (federation.num_sites is "
                            f"{scenario.federation.num_sites}; sites are 0..{scenario.federation.num_sites - 1})")
    plan = plan_canaries(cfg.count, cfg.seed)
    rng = np.random.default_rng([cfg.seed, 1])  # a stream independent of plan_canaries' bits
    density = float(np.clip(data.x.mean(), 0.05, 0.5))
    arrays = {"x": (rng.random((cfg.count, *data.shape)) < density).astype(np.float32),
              "included": plan.included, "site": np.int64(cfg.site), "seed": np.int64(cfg.seed),
              "kind": np.str_(CANARY_KIND)}
    if data.y is not None:
        arrays["y"] = rng.integers(0, data.num_classes, cfg.count).astype(np.int64)
    return arrays


def _build_model(scenario: Scenario, spec: rundir.DataSpec, what: str):
    """The round-1 model; a family that cannot take the data's shape is one ScenarioError."""
    try:
        return build_global_model(scenario, spec)
    except ValueError as err:
        raise ScenarioError(f"model ({scenario.model.family}) does not fit {what}, shape {list(spec.shape)}: "
                            f"{err}") from None


def _spec(scenario: Scenario, data: SiteData) -> rundir.DataSpec:
    path = str(Path(scenario.data.path).resolve()) if scenario.data.path else None
    table = declared_table(scenario.data.format, scenario.data.options, data)
    return rundir.DataSpec(format=scenario.data.format, path=path, shape=data.shape,
                           num_classes=data.num_classes, num_sites=scenario.federation.num_sites,
                           options=recorded_options(scenario.data.format, scenario.data.options),
                           table=None if table is None else table.model_dump(mode="json"))


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
    with assembling(run_dir) as tmp:
        (tmp / rundir.SCENARIO).write_text(yaml.safe_dump(scenario.resolved(), sort_keys=False))
        (tmp / rundir.SITE_DATA).write_text(_spec(scenario, data).to_json())
        np.savez(tmp / rundir.PARTITIONS, holdout=holdout, **{f"site_{i}": s for i, s in enumerate(sites)})
        ref = data.subset(holdout)
        ref_arrays = {"x": ref.x.numpy()} | ({"y": ref.y.numpy()} if ref.y is not None else {})
        np.savez_compressed(tmp / rundir.REFERENCE, **ref_arrays)
        skews = site_feature_skew(scenario, data)
        (tmp / rundir.SITES).write_text(json.dumps(
            {str(i): {"examples": int(len(s))} | ({"feature_skew": k} if k else {})
             for i, (s, k) in enumerate(zip(sites, skews))}, indent=2))
        canaries = plant_canaries(scenario, data)
        if canaries is not None:
            np.savez(tmp / rundir.CANARIES, **canaries)
        write_public_set(tmp, scenario, data.shape, data.num_classes)
    return run_dir


def prepare_run(scenario_path: Path, out_root: Path, overrides: list[str] | None = None) -> Path:
    scenario = load_scenario(scenario_path, overrides)
    return write_run_dir(scenario, default_run_dir(scenario, out_root))


def write_deployment_run_dir(scenario: Scenario, run_dir: Path) -> Path:
    """The run directory for a deployed federation (the SuperLink's machine): the
    resolved scenario and a data description from the ``deployment`` section. No data
    and no partitions -- the sites hold their own. A public reference set, when the
    scenario names one, is validated and copied for server-side evaluation; without it
    the server only draws sample grids (no quality metrics)."""
    from fedgen.client.data import read_npz

    dep = scenario.deployment
    if dep is None:
        raise ScenarioError("the scenario has no `deployment:` section (data_shape, num_classes, reference); "
                            "`fedgen prepare` needs it because the server never sees the sites' data")
    spec = rundir.DataSpec(format="deployment", path=None, shape=tuple(dep.data_shape), num_classes=dep.num_classes,
                           num_sites=scenario.federation.num_sites,
                           table=None if dep.table is None else dep.table.model_dump(mode="json"))
    _build_model(scenario, spec, "deployment.data_shape")  # the model must build for the declared shape
    public = public_set(scenario, spec.shape, spec.num_classes)
    ref = None
    if dep.reference:
        ref = read_npz(dep.reference)
        if ref.shape != spec.shape:
            raise ScenarioError(f"deployment.reference {dep.reference}: examples have shape {ref.shape}, "
                                f"deployment.data_shape says {spec.shape}")
        if spec.num_classes is None or ref.y is None:
            ref = ref.without_labels()
    run_dir = Path(run_dir).resolve()
    with assembling(run_dir) as tmp:
        (tmp / rundir.SCENARIO).write_text(yaml.safe_dump(scenario.resolved(), sort_keys=False))
        (tmp / rundir.SITE_DATA).write_text(spec.to_json())
        if ref is not None:
            np.savez_compressed(tmp / rundir.REFERENCE, x=ref.x.numpy(),
                                **({"y": ref.y.numpy()} if ref.y is not None else {}))
        if public is not None:
            np.savez_compressed(tmp / rundir.PUBLIC, **public)
    return run_dir


def write_public_set(run_dir: Path, scenario: Scenario, shape: tuple[int, ...], num_classes: int | None) -> None:
    """``inputs/public.npz``: the warm start's declared-public set (simulations/warm_start.py)."""
    public = public_set(scenario, shape, num_classes)
    if public is not None:
        np.savez_compressed(Path(run_dir) / rundir.PUBLIC, **public)


@contextmanager
def assembling(run_dir: Path) -> Iterator[Path]:
    """Build ``run_dir`` under a hidden temporary name (with ``inputs/``) and rename it
    into place only when the block succeeds; on any error nothing is left behind."""
    if run_dir.exists():
        raise FileExistsError(f"{run_dir}: already exists; choose another --out or use --resume")
    tmp = run_dir.with_name(f".{run_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / rundir.INPUTS).mkdir(parents=True)
        yield tmp
        tmp.rename(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
