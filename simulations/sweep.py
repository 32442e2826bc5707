"""``fedgen sweep``: a grid of scenarios, one run directory each, one comparison.

A sweep file names a base scenario, a ``grid`` of dotted scenario keys -> values (their
cartesian product) and optional named ``variants`` crossed with the grid (docs/sweeps.md).
Every combination is validated before the first run starts; each then becomes its own
run directory under the sweep folder, prepared with :func:`~simulations.prepare.write_run_dir`
and run with :func:`~simulations.runner.run_simulation_dir` -- exactly ``fedgen simulate``.

Re-running a sweep skips finished runs (``completed`` / ``budget_exhausted``), resumes a
run that has a checkpoint and restarts one that never committed a round. At the end the
sweep folder gets ``comparison.csv``, ``comparison.md`` and ``privacy_utility.png``.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from rich.console import Console
from rich.markup import escape

from fedgen.client.errors import DataError
from fedgen.privacy.errors import PrivacyError
from fedgen.contract import rundir
from fedgen.shared_models import ModelConfigError, UnknownModelError

from .errors import PartitionError, ScenarioError
from fedgen.contract.scenario import Scenario, _format_error, apply_overrides, read_scenario_file, scenario_from_dict

DONE_REASONS = ("completed", "budget_exhausted")
SUMMARY_METRICS = ("fid_domain", "precision", "recall", "coverage", "tstr_accuracy", "heldout_nll_bits_per_dim")
# Metrics the server reports that are not registered evaluation metrics (no metric_directions entry).
SERVER_METRIC_DIRECTIONS = {"heldout_nll_bits_per_dim": "minimize", "federated_eval_loss": "minimize"}
EPSILON_TARGET_KEYS = ("privacy.target_epsilon", "privacy.site_level.target_epsilon")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
PLOT_FILE = "privacy_utility.png"
# What checking a scenario's data, partition and model can raise (all one-line user errors).
CHECK_ERRORS = (ScenarioError, DataError, PartitionError, PrivacyError, ModelConfigError, UnknownModelError,
                FileNotFoundError)

Action = Literal["new", "resume", "restart", "skip"]
T = TypeVar("T")


# -- the sweep file -----------------------------------------------------------------------

class SweepFile(BaseModel):
    """The schema of a sweep YAML file (unknown keys are rejected)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, pattern=NAME_PATTERN, description="default: the sweep file's stem")
    base: str = Field(..., description="base scenario, relative to the sweep file's folder")
    out: str | None = Field(None, description="sweep folder, relative to the CWD (default runs/sweeps/<name>)")
    metric: str = Field("fid_domain", description="metric plotted against the achieved epsilon")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value for every run")
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("variants")
    @classmethod
    def _variant_names_are_folder_safe(cls, variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name in variants:
            if not re.fullmatch(NAME_PATTERN, name) or "__" in name:
                raise ValueError(f"variant name {name!r}: use letters, digits, '_', '.', '-' (no '__')")
        return variants

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        known = known_metric_directions()
        if metric not in known:
            raise ValueError(f"unknown metric {metric!r}; known: {', '.join(sorted(known))}")
        return metric

    @model_validator(mode="after")
    def _something_to_sweep(self) -> "SweepFile":
        if not self.grid and not self.variants:
            raise ValueError("nothing to sweep: give a `grid` (key: [values]) and/or `variants`")
        for variant, settings in self.variants.items():
            clash = sorted(set(settings) & set(self.grid))
            if clash:
                raise ValueError(f"variants.{variant}: {', '.join(clash)} is also swept by the grid; "
                                 "set it in one place")
        return self


def known_metric_directions() -> dict[str, str]:
    """``{metric: "minimize" | "maximize"}`` for every metric a run's summary can hold."""
    from fedgen.evaluation.suite import metric_directions

    return {**SERVER_METRIC_DIRECTIONS, **metric_directions()}


@dataclass(frozen=True)
class Combination:
    """One point of the sweep: a variant (or none) and one value per grid key."""

    variant: str | None
    grid_values: dict[str, Any]
    overrides: tuple[str, ...]  # ``key=value`` for apply_overrides: the variant's, then the grid's

    @property
    def name(self) -> str:
        return run_name(self.variant, self.grid_values)

    @property
    def series(self) -> str:
        """The plot line this run belongs to: its variant and non-epsilon grid values."""
        parts = [self.variant or ""] + [f"{k}={value_text(v)}" for k, v in self.grid_values.items()
                                        if k not in EPSILON_TARGET_KEYS]
        return ", ".join(p for p in parts if p) or "runs"


@dataclass(frozen=True)
class Sweep:
    """A loaded sweep: where it came from, the base scenario (``set`` applied), its runs."""

    path: Path
    spec: SweepFile
    base: dict[str, Any]
    out_dir: Path
    combinations: list[Combination]

    @property
    def name(self) -> str:
        return self.spec.name or self.path.stem

    def source(self, combination: Combination) -> str:
        """How errors name one combination: ``sweep.yaml: run 'NAME'``."""
        return f"{self.path}: run {combination.name!r}"


def load_sweep(path: str | Path, overrides: list[str] | None = None, out: str | Path | None = None) -> Sweep:
    """Read and check a sweep file: its schema, its base scenario (``set`` and the extra
    ``overrides`` applied) and the names of its combinations. Scenarios are validated
    later, by :func:`plan_sweep`."""
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"{path}: sweep file not found")
    spec = _parse_spec(read_scenario_file(path), source=str(path))
    base_path = path.parent / spec.base
    common = [override(k, v) for k, v in spec.set.items()] + list(overrides or [])
    base = _with_source(f"{path}: base", lambda: read_scenario_file(base_path))
    base.setdefault("name", base_path.stem)
    base = _with_source(str(path), lambda: apply_overrides(base, common))
    out_dir = Path(out or spec.out or Path("runs") / "sweeps" / (spec.name or path.stem)).resolve()  # CWD-relative
    combinations = expand_combinations(spec)
    _check_unique_names(combinations, str(path))
    return Sweep(path=path, spec=spec, base=base, out_dir=out_dir, combinations=combinations)


def _parse_spec(raw: dict[str, Any], source: str) -> SweepFile:
    try:
        return SweepFile.model_validate(raw)
    except ValidationError as err:
        raise ScenarioError(_format_error(err, source)) from None


def _with_source(source: str, build: Callable[[], T]) -> T:
    """``build()``, with a user error's message prefixed by ``source`` (one line)."""
    try:
        return build()
    except CHECK_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise ScenarioError(f"{source}: {message}") from None


# -- combinations and their names -----------------------------------------------------------

def expand_combinations(spec: SweepFile) -> list[Combination]:
    """Every variant (in file order) crossed with the grid's cartesian product (keys in
    file order, the last key varying fastest)."""
    variants: dict[str | None, dict[str, Any]] = dict(spec.variants) or {None: {}}
    keys = list(spec.grid)
    combos = []
    for variant, settings in variants.items():
        for values in itertools.product(*(spec.grid[k] for k in keys)):
            grid_values = dict(zip(keys, values))
            pairs = [*settings.items(), *grid_values.items()]
            combos.append(Combination(variant, grid_values, tuple(override(k, v) for k, v in pairs)))
    return combos


def override(key: str, value: Any) -> str:
    """``key=value`` that :func:`apply_overrides` reads back as exactly ``value``."""
    if isinstance(value, str):  # quoted, or parse_value would read "1e-5" or "10" as a number
        return f"{key}={json.dumps(value)}"
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def value_text(value: Any) -> str:
    """A value as it appears in a run name: ``10``, ``0.1``, ``true``, ``vae``; a list
    ``1,8,8``; a mapping ``family=flow,hidden=64``."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, dict):
        return ",".join(f"{k}={value_text(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(value_text(v) for v in value)
    return str(value)


def run_name(variant: str | None, grid_values: dict[str, Any]) -> str:
    """The folder name of one run: ``vae__privacy.target_epsilon=10__partition.alpha=0.1``
    (characters other than letters, digits and ``_.,=+-`` become ``_``)."""
    parts = ([variant] if variant else []) + [f"{k}={value_text(v)}" for k, v in grid_values.items()]
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", "__".join(parts))


def _check_unique_names(combinations: list[Combination], source: str) -> None:
    seen: set[str] = set()
    for combination in combinations:
        if combination.name in seen:
            raise ScenarioError(f"{source}: two combinations would share the folder {combination.name!r}; "
                                "make the grid values distinct")
        seen.add(combination.name)


# -- planning: validate everything before the first run -------------------------------------

@dataclass(frozen=True)
class PlannedRun:
    combination: Combination
    scenario: Scenario
    run_dir: Path
    action: Action


def scenario_for(sweep: Sweep, combination: Combination) -> Scenario:
    """The validated scenario of one combination (schema only; see :func:`plan_sweep`)."""
    source = sweep.source(combination)
    raw = _with_source(source, lambda: apply_overrides(sweep.base, list(combination.overrides)))
    return scenario_from_dict(raw, source=source)


def plan_sweep(sweep: Sweep) -> list[PlannedRun]:
    """Decide what happens to every combination, validating all of them first: the schema,
    an existing folder's scenario, and -- for every run that will train -- the data,
    partition and model (``fedgen validate``'s checks). Writes nothing."""
    from .prepare import check_scenario

    plans = []
    for combination in sweep.combinations:
        scenario = scenario_for(sweep, combination)
        run_dir = sweep.out_dir / combination.name
        action = run_action(run_dir, scenario, sweep.source(combination))
        if action != "skip":
            _with_source(sweep.source(combination), lambda: check_scenario(scenario))
        plans.append(PlannedRun(combination, scenario, run_dir, action))
    return plans


def run_action(run_dir: Path, scenario: Scenario, source: str) -> Action:
    """``new`` (no folder), ``skip`` (finished), ``resume`` (has a checkpoint) or
    ``restart`` (never committed a round). A folder holding another scenario is an error."""
    if not run_dir.exists():
        return "new"
    if not (run_dir / rundir.SCENARIO).exists():
        raise ScenarioError(f"{source}: {run_dir} exists but is not a fedgen run directory; move it away")
    _check_same_scenario(run_dir, scenario, source)
    if stopped_reason(run_dir) in DONE_REASONS:
        return "skip"
    if (run_dir / rundir.CHECKPOINTS / "latest.pt").exists():
        return "resume"
    return "restart"


def stopped_reason(run_dir: Path) -> str | None:
    path = run_dir / rundir.SUMMARY
    return json.loads(path.read_text()).get("stopped_reason") if path.exists() else None


def _check_same_scenario(run_dir: Path, scenario: Scenario, source: str) -> None:
    on_disk, wanted = _flatten(rundir.read_scenario(run_dir).resolved()), _flatten(scenario.resolved())
    changed = sorted(k for k in on_disk.keys() | wanted.keys() if on_disk.get(k) != wanted.get(k))
    if changed:
        key = changed[0]
        raise ScenarioError(f"{source}: {run_dir} was run with {key}={on_disk.get(key)!r}, the sweep now says "
                            f"{wanted.get(key)!r}; delete that folder or choose another `out`")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# -- running ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepOutcome:
    rows: list[dict[str, Any]]
    failed: list[str]
    table: str
    plot: Path | None


def run_sweep(sweep: Sweep, *, console: Console, verbose: bool = False) -> SweepOutcome:
    """Plan (validate all), run what is not finished, then write the comparison. Ctrl-C
    (``KeyboardInterrupt``) propagates after the current run has stopped cleanly."""
    plans = plan_sweep(sweep)
    from .runner import check_engine

    for plan in plans:  # one line before any run directory is written, not one failure per run
        check_engine(plan.scenario)
    console.print(f"sweep folder: [bold]{escape(str(sweep.out_dir))}[/] ({len(plans)} runs)", highlight=False)
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for index, plan in enumerate(plans, 1):
        prefix = escape(f"[{index}/{len(plans)}] {plan.combination.name}")
        if plan.action == "skip":
            console.print(f"{prefix}: skipped ({stopped_reason(plan.run_dir)})", highlight=False)
            continue
        console.print(f"{prefix}: {'resuming' if plan.action == 'resume' else 'running'}", highlight=False)
        if stopped_reason(execute(plan, console=console, verbose=verbose)) not in DONE_REASONS:
            failed.append(plan.combination.name)
    return write_comparison(sweep, plans, failed)


def execute(plan: PlannedRun, *, console: Console, verbose: bool) -> Path:
    """Prepare (``new`` / ``restart``) and run one combination, as ``fedgen simulate``
    does; a failed run is reported, not raised, so the sweep goes on."""
    from .errors import SimulationRunError
    from .prepare import write_run_dir
    from .runner import run_simulation_dir

    if plan.action == "restart":
        shutil.rmtree(plan.run_dir)
    if plan.action in ("new", "restart"):
        write_run_dir(plan.scenario, plan.run_dir)
    try:
        summary = run_simulation_dir(plan.run_dir, plan.scenario, console=console, verbose=verbose)
        console.print(f"  {summary['stopped_reason']} after {summary['rounds_completed']} rounds, "
                      f"{summary['wall_seconds']:.0f} s", highlight=False)
    except SimulationRunError as err:
        console.print(f"  [red]failed[/]: {escape(str(err))}", highlight=False)
    return plan.run_dir


# -- comparison -------------------------------------------------------------------------------

def write_comparison(sweep: Sweep, plans: list[PlannedRun], failed: list[str]) -> SweepOutcome:
    """``comparison.csv``, ``comparison.md`` and ``privacy_utility.png`` in the sweep folder."""
    metric = sweep.spec.metric
    rows = [comparison_row(p.combination, p.run_dir, metric, with_variant=bool(sweep.spec.variants)) for p in plans]
    columns = comparison_columns(rows)
    write_csv(rows, columns, sweep.out_dir / "comparison.csv")
    table = markdown_table(rows, columns)
    (sweep.out_dir / "comparison.md").write_text(f"# sweep {sweep.name}\n\n{table}\n")
    plot = plot_privacy_utility(rows, [p.combination for p in plans], metric, sweep.out_dir / PLOT_FILE,
                                site_level=_sweeps_site_level_only(sweep))
    return SweepOutcome(rows=rows, failed=failed, table=table, plot=plot)


def summary_keys(metric: str) -> list[str]:
    """The summary values a comparison row holds, ``metric`` among them."""
    metrics = [*SUMMARY_METRICS, *([metric] if metric not in SUMMARY_METRICS else [])]
    return ["epsilon", "site_level_epsilon", *metrics, "rounds_completed", "wall_seconds", "stopped_reason"]


def comparison_row(combination: Combination, run_dir: Path, metric: str, *, with_variant: bool) -> dict[str, Any]:
    """One table row: run name, variant, swept values, then the run's summary values
    (final metrics folded in; ``None`` where the run has none)."""
    from fedgen.evaluation.report import RunRecord

    flat = RunRecord.load(run_dir).flat()
    row: dict[str, Any] = {"run": combination.name}
    if with_variant:
        row["variant"] = combination.variant
    row.update(combination.grid_values)
    row.update({key: flat.get(key) for key in summary_keys(metric)})
    return row


def comparison_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The rows' keys, less the optional ones (site-level epsilon, metrics) no run has."""
    optional = {"site_level_epsilon", *SUMMARY_METRICS, *known_metric_directions()}
    keys = list(rows[0]) if rows else []
    return [k for k in keys if k not in optional or any(row.get(k) is not None for row in rows)]


def write_csv(rows: list[dict[str, Any]], columns: list[str], path: Path) -> Path:
    """Full-precision values (``repr`` of floats), empty cells for missing values."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    return path


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return ""
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# -- the privacy-utility plot --------------------------------------------------------------

def _sweeps_site_level_only(sweep: Sweep) -> bool:
    keys = set(sweep.spec.grid)
    return "privacy.site_level.target_epsilon" in keys and "privacy.target_epsilon" not in keys


def achieved_epsilon(row: dict[str, Any], site_level: bool = False) -> float | None:
    """The run's example-level epsilon, or its site-level one (first choice when
    ``site_level``, fallback otherwise); ``None`` without DP."""
    order = ("site_level_epsilon", "epsilon") if site_level else ("epsilon", "site_level_epsilon")
    return next((row[k] for k in order if row.get(k) is not None), None)


def privacy_utility_series(rows: list[dict[str, Any]], combinations: list[Combination], metric: str,
                           site_level: bool = False) -> tuple[dict[str, list[tuple[float, float]]], dict[str, float]]:
    """(``{series: [(epsilon, metric), ...]}`` sorted by epsilon, ``{series: metric}`` of
    runs without DP). Runs lacking the metric are left out."""
    lines: dict[str, list[tuple[float, float]]] = {}
    no_dp: dict[str, float] = {}
    for row, combination in zip(rows, combinations):
        value, eps = row.get(metric), achieved_epsilon(row, site_level)
        if value is None:
            continue
        if eps is None:
            no_dp[combination.series] = value
        else:
            lines.setdefault(combination.series, []).append((eps, value))
    return {k: sorted(v) for k, v in lines.items()}, no_dp


def plot_privacy_utility(rows: list[dict[str, Any]], combinations: list[Combination], metric: str, path: Path,
                         site_level: bool = False) -> Path | None:
    """``metric`` vs achieved epsilon (log scale), one line per series, runs without DP
    as dashed horizontal lines; ``None`` (no file) when no run reported ``metric``."""
    from matplotlib.ticker import FuncFormatter

    from fedgen.evaluation.plots import _plt, _save

    plt = _plt()

    lines, no_dp = privacy_utility_series(rows, combinations, metric, site_level)
    if not lines and not no_dp:
        path.unlink(missing_ok=True)
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for series, points in lines.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=4, label=series)
    for series, value in no_dp.items():
        ax.axhline(value, linestyle="--", linewidth=1, color="gray", label=f"{series} (no DP)")
    if lines:
        ax.set_xscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel(f"achieved {'site-level ' if site_level else ''}epsilon")
    direction = known_metric_directions().get(metric)
    ax.set_ylabel(metric + {"minimize": " (lower is better)", "maximize": " (higher is better)"}.get(direction, ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)

