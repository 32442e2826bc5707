"""The run directory contract (docs/architecture.md §5): file names and the small readers the
server and the clients share. The harness (``simulations/``) writes the inputs."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml

from fedgen.privacy.ledger import atomic_write

if TYPE_CHECKING:
    from .scenario import Scenario

log = logging.getLogger(__name__)

SCENARIO = "scenario.yaml"
METRICS = "metrics.jsonl"
PRIVACY = "privacy.json"
SUMMARY = "summary.json"
REPORT = "report.html"
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
# inputs written by the harness before the run starts
INPUTS = "inputs"
SITE_DATA = "inputs/site_data.json"  # where the sites' data comes from (simulation)
PARTITIONS = "inputs/partitions.npz"  # site_<i> -> indices into the dataset; holdout
CANARIES = "inputs/canaries.npz"  # audit canaries planted by the harness (simulation only)
REFERENCE = "inputs/reference.npz"  # held-out examples (x, y) for server-side evaluation
SITES = "inputs/sites.json"  # per-site facts (examples, feature skew) written by the harness
PUBLIC = "inputs/public.npz"  # a warm start's declared-public set (x, optional y), read by the server
WARM_START = "warm_start.json"  # what the server pretrained on before round 1 (server/warm_start.py)
#: ``checkpoints/latest.pt``'s format tag: tensors and JSON strings only (no pickled objects)
CHECKPOINT_FORMAT = "fedgen-checkpoint/2"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely; the message is one line naming the file."""


@dataclass(frozen=True)
class DataSpec:
    """What the harness recorded about the dataset (no data, only its description)."""

    format: str
    path: str | None
    shape: tuple[int, ...]
    num_classes: int | None  # None when the model is unconditional
    num_sites: int
    # the format's reader options (contract/data_formats.py), so every site re-reads the data
    # exactly as the harness did; run directories written before options existed have none
    options: dict[str, Any] = field(default_factory=dict)
    # tabular data: columns, label column and declared bounds (contract/data_formats.py
    # TableSchema as JSON), so `fedgen sample` writes rows in the original units; else None
    table: dict[str, Any] | None = None

    @classmethod
    def read(cls, run_dir: Path) -> "DataSpec":
        d = json.loads((Path(run_dir) / SITE_DATA).read_text())
        return cls(format=d["format"], path=d["path"], shape=tuple(d["shape"]),
                   num_classes=d["num_classes"], num_sites=int(d["num_sites"]), options=d.get("options") or {},
                   table=d.get("table"))

    def to_json(self) -> str:
        return json.dumps({"format": self.format, "path": self.path, "options": self.options,
                           "shape": list(self.shape), "num_classes": self.num_classes,
                           "num_sites": self.num_sites} | ({"table": self.table} if self.table else {}), indent=2)


def read_scenario(run_dir: Path) -> "Scenario":
    """The run's resolved ``scenario.yaml``, validated again (a hand-edited file fails here,
    with the key named)."""
    from .scenario import scenario_from_dict

    path = Path(run_dir) / SCENARIO
    return scenario_from_dict(yaml.safe_load(path.read_text()) or {}, source=str(path))


def read_public(run_dir: Path) -> dict[str, np.ndarray] | None:
    """The warm start's declared-public set (``inputs/public.npz``: ``x``, optional ``y``,
    ``name``), or ``None``."""
    path = Path(run_dir) / PUBLIC
    if not path.exists():
        return None
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def read_reference(run_dir: Path) -> tuple[np.ndarray, np.ndarray | None] | None:
    path = Path(run_dir) / REFERENCE
    if not path.exists():
        return None
    with np.load(path) as z:
        return z["x"], (z["y"] if "y" in z.files else None)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``. A torn *last* line (a crash mid-append) is skipped
    with a warning -- the checkpoint, not the metrics file, is the commit point, so resume
    rewrites the rows it keeps; a bad line anywhere else is damage, :class:`ValueError`."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise ValueError(f"{path}:{number}: not a JSON row ({err}); the file is damaged") from None
            log.warning("%s: skipping a torn last line %d (a crash mid-append)", path, number)
    return rows


def write_checkpoint(path: Path, *, model: dict[str, torch.Tensor], state: dict[str, Any],
                     strategy: dict[str, dict[str, torch.Tensor]], scenario: dict[str, Any]) -> None:
    """Write ``checkpoints/latest.pt`` atomically (temp file + rename): the model's and
    the strategy's tensors, the run state and the scenario as JSON strings. Nothing is
    pickled, so :func:`read_checkpoint` loads it with ``weights_only=True``."""
    payload = {"format": CHECKPOINT_FORMAT, "model": model, "strategy": strategy, "state": json.dumps(state),
               "scenario": json.dumps(scenario)}
    atomic_write(path, lambda fh: torch.save(payload, fh))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """``{"model", "state", "strategy", "scenario"}`` of a checkpoint from
    :func:`write_checkpoint` (keys it lacks are absent), or ``{"model"}`` of a plain state
    dict (``model-round-*.pt``). Loaded with ``weights_only=True``: a file holding anything
    but tensors and plain containers (a pickled object, which could run code on load) is
    :class:`CheckpointError`, never unpickled."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- torch raises many types; the user needs one line
        raise CheckpointError(f"{path}: unreadable checkpoint: {_NOT_OURS}: {_load_failure(err)}") from None
    if _is_state_dict(ckpt):
        return {"model": ckpt}
    if not (isinstance(ckpt, dict) and _is_state_dict(ckpt.get("model"))):
        raise CheckpointError(f"{path}: unreadable checkpoint: {_NOT_OURS}: no model state dict in it")
    out = {key: ckpt[key] for key in ("model", "strategy") if key in ckpt}
    try:
        out.update({key: json.loads(v) if isinstance(v, str) else v
                    for key in ("state", "scenario") if (v := ckpt.get(key)) is not None})
    except ValueError as err:
        raise CheckpointError(f"{path}: unreadable checkpoint: damaged run state ({err})") from None
    return out


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


_NOT_OURS = "not a fedgen checkpoint or written by an older fedgen"


def _load_failure(err: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one line (torch's own
    message spans lines and suggests ``weights_only=False``, the very thing not to do)."""
    if "Weights only load failed" in str(err):
        return "it holds pickled Python objects, which fedgen never loads (unpickling can run code)"
    first = (str(err).strip().splitlines() or [""])[0][:200]
    return f"{type(err).__name__}: {first}"


@dataclass(frozen=True)
class Canaries:
    """The audit canaries of a run: all ``m`` records, which were included, and where."""

    x: np.ndarray  # [m, *data_shape], float32 in [0, 1]
    y: np.ndarray | None  # [m] int64 labels (conditional data) or None
    included: np.ndarray  # [m] bool: trained on by ``site``
    site: int
    seed: int
    kind: str  # how they were made (docs/audit.md)


@lru_cache(maxsize=8)
def read_canaries(run_dir: str | Path) -> Canaries | None:
    """``<run_dir>/inputs/canaries.npz``, or ``None`` when the run plants no canaries."""
    path = Path(run_dir) / CANARIES
    if not path.exists():
        return None
    with np.load(path) as z:
        return Canaries(x=z["x"], y=z["y"] if "y" in z.files else None, included=z["included"].astype(bool),
                        site=int(z["site"]), seed=int(z["seed"]), kind=str(z["kind"]))
