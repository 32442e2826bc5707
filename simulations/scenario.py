"""The scenario schema: everything a simulation run needs, validated with pydantic.

Unknown keys and wrong types are rejected with the key path (``federation.rounds: ...``).
``resolve_scenario`` fills every default so the run directory's ``scenario.yaml`` says
exactly what ran.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared_models import list_models, model_options

from .errors import ScenarioError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    format: Literal["digits", "mnist", "npz"] = "digits"
    path: str | None = None
    holdout_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    conditional: bool = True  # use labels (class-conditional model) when the data has them

    @model_validator(mode="after")
    def _path_needed(self) -> "DataConfig":
        if self.format != "digits" and not self.path:
            raise ValueError(f"data.path is required for format {self.format!r}")
        return self


class PartitionConfig(_Section):
    name: Literal["iid", "dirichlet", "shards"] = "iid"
    alpha: float = Field(0.5, gt=0.0, description="Dirichlet concentration (label skew)")
    shards_per_site: int = Field(2, ge=1)
    min_examples: int = Field(1, ge=1)


class FederationConfig(_Section):
    num_sites: int = Field(5, ge=1)
    rounds: int = Field(5, ge=1)
    fraction_fit: float = Field(1.0, gt=0.0, le=1.0)
    min_fit_sites: int = Field(1, ge=1)
    strategy: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    proximal_mu: float = Field(0.01, ge=0.0, description="FedProx mu")
    server_lr: float = Field(0.01, gt=0.0, description="FedAdam eta")
    round_timeout_s: float = Field(3600.0, gt=0.0)


class ModelConfig(BaseModel):
    """``family`` plus that family's own options (checked against its builder)."""

    model_config = ConfigDict(extra="allow")
    family: str = "vae"

    @model_validator(mode="after")
    def _known_family_and_options(self) -> "ModelConfig":
        if self.family not in list_models():
            raise ValueError(f"unknown model family {self.family!r}; registered: {', '.join(list_models())}")
        allowed = set(model_options(self.family))
        unknown = sorted(set(self.model_extra or {}) - allowed)
        if unknown:
            raise ValueError(f"option(s) {', '.join(unknown)} not accepted by family {self.family!r}; "
                             f"accepted: {', '.join(sorted(allowed))}")
        return self

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TrainingConfigSection(_Section):
    local_steps: int = Field(20, ge=1, description="training iterations per round")
    batch_size: int = Field(64, ge=1, description="expected batch size (Poisson under DP)")
    lr: float = Field(1e-3, gt=0.0)


class CanaryConfig(_Section):
    """Canaries for the one-run privacy audit (Steinke, Nasr & Jagielski 2023): ``count``
    random-pattern records, each added to site ``site``'s training data with probability
    1/2 drawn from ``seed``; ``fedgen audit RUN_DIR`` scores them (docs/audit.md)."""

    count: int = Field(..., ge=2, description="number of canaries m (each included with prob. 1/2)")
    site: int = Field(0, ge=0, description="the site whose training data receives the canaries")
    seed: int = Field(0, description="seed of the canaries' pixels, labels and inclusion bits")


class PrivacySection(_Section):
    enabled: bool = True
    target_epsilon: float = Field(10.0, gt=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    accountant: Literal["rdp", "prv"] = "rdp"
    grad_sample_mode: Literal["auto", "ghost", "hooks", "functorch"] = "auto"
    canaries: CanaryConfig | None = Field(None, description="plant audit canaries (default: none)")


class EvaluationConfig(_Section):
    every: int = Field(1, ge=0, description="evaluate every N rounds (0 = only at the end)")
    num_samples: int = Field(500, ge=1)
    tstr: bool = Field(False, description="train-synthetic-test-real accuracy after the last round")


class SimulationConfig(_Section):
    engine: Literal["flower"] = "flower"
    client_cpus: float = Field(1.0, gt=0.0)
    client_gpus: float = Field(0.0, ge=0.0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_actors: int | None = Field(None, ge=1, description="cap on concurrent Ray actors")


class DeploymentConfig(_Section):
    """A deployed federation: the server holds no private data, so the data's shape and
    classes are declared here, and evaluation uses a public reference set (if any)."""

    data_shape: list[int] = Field(..., min_length=1, description="shape of one example, e.g. [1, 8, 8]")
    num_classes: int | None = Field(None, ge=2, description="classes of a conditional model; null = unconditional")
    reference: str | None = Field(None, description="public reference .npz (x, optional y) for server-side "
                                  "evaluation; null = no server-side quality metrics")

    @model_validator(mode="after")
    def _positive_shape(self) -> "DeploymentConfig":
        if any(d < 1 for d in self.data_shape):
            raise ValueError(f"data_shape entries must be >= 1, got {self.data_shape}")
        return self


class Scenario(_Section):
    name: str = Field("scenario", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    federation: FederationConfig = FederationConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfigSection = TrainingConfigSection()
    privacy: PrivacySection = PrivacySection()
    evaluation: EvaluationConfig = EvaluationConfig()
    simulation: SimulationConfig = SimulationConfig()
    deployment: DeploymentConfig | None = None  # set for `fedgen prepare` (real SuperNodes)

    def resolved(self) -> dict[str, Any]:
        """Every key with its value, defaults included (what ``scenario.yaml`` records)."""
        d = self.model_dump(mode="json")
        d["model"] = {"family": self.model.family, **self.model.options}
        return d


# -- loading, overrides ---------------------------------------------------------------

def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see scenarios/README or `fedgen validate --help`)"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict):
        msg = f"{msg} (got {first['input']!r})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def parse_value(text: str) -> Any:
    """An override's value, read as YAML (``10`` -> int, ``1e-5`` -> float, ``true`` -> bool)."""
    if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", text.strip()):
        return float(text)  # YAML 1.1 reads 1e-5 as a string
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to a raw scenario dict (returns a new dict)."""
    out = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for item in overrides:
        if "=" not in item:
            raise ScenarioError(f"--set {item!r}: expected key.path=value")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ScenarioError(f"--set {item!r}: empty key")
        node = out
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ScenarioError(f"--set {item!r}: {p} is not a section")
            node = child
        node[parts[-1]] = parse_value(value)
    return out


def read_scenario_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ScenarioError(f"{path}: scenario file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ScenarioError(f"{path}: not valid YAML{where}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: a scenario must be a mapping of sections (data:, federation:, ...)")
    return raw


def load_scenario(path: str | Path, overrides: list[str] | None = None) -> Scenario:
    """Read, override and validate a scenario; errors are one-line :class:`ScenarioError`."""
    raw = apply_overrides(read_scenario_file(path), overrides or [])
    raw.setdefault("name", Path(path).stem)
    return scenario_from_dict(raw, source=str(path))


def scenario_from_dict(raw: dict[str, Any], source: str = "scenario") -> Scenario:
    try:
        return Scenario.model_validate(raw)
    except ValidationError as err:
        raise ScenarioError(_format_error(err, source)) from None
