"""The run directory contract (docs/architecture.md §5): file names and the small readers the
server and the clients share. The harness (``simulations/``) writes the inputs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

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
REFERENCE = "inputs/reference.npz"  # held-out examples (x, y) for server-side evaluation


@dataclass(frozen=True)
class DataSpec:
    """What the harness recorded about the dataset (no data, only its description)."""

    format: str
    path: str | None
    shape: tuple[int, ...]
    num_classes: int | None  # None when the model is unconditional
    num_sites: int

    @classmethod
    def read(cls, run_dir: Path) -> "DataSpec":
        d = json.loads((Path(run_dir) / SITE_DATA).read_text())
        return cls(format=d["format"], path=d["path"], shape=tuple(d["shape"]),
                   num_classes=d["num_classes"], num_sites=int(d["num_sites"]))

    def to_json(self) -> str:
        return json.dumps({"format": self.format, "path": self.path, "shape": list(self.shape),
                           "num_classes": self.num_classes, "num_sites": self.num_sites}, indent=2)


def read_scenario(run_dir: Path) -> dict[str, Any]:
    return yaml.safe_load((Path(run_dir) / SCENARIO).read_text())


def read_reference(run_dir: Path) -> tuple[np.ndarray, np.ndarray | None] | None:
    path = Path(run_dir) / REFERENCE
    if not path.exists():
        return None
    with np.load(path) as z:
        return z["x"], (z["y"] if "y" in z.files else None)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
