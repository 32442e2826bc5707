"""A deployed site's state directory is bound to the data its ledger covers.

The ledger in ``state-dir/ledger.json`` composes ε over every round the site's data was
ever trained on (docs/deploy.md §5). That promise holds only while one state directory
means one dataset: pointed at other data, the old spend would be charged to records it
never touched; the same data under a *new* state directory starts a fresh budget, and
the site's ``max-epsilon`` no longer caps its lifetime spend.

So on the first training round a deployed site writes ``data_fingerprint.json`` into its
state directory (atomically): the SHA-256 of the loaded feature array (and, separately,
of its labels), the row count, the record shape, the path and the format. Later:

* **different data under the same state directory** is refused before anything is
  trained or charged: one line naming what differs and the fix (a new state directory
  for new data);
* **the same data under a new state directory** (a sibling in the same parent folder
  already holds a fingerprint with the same hash) is trained, with a warning in the
  site's log that the new state directory starts a fresh budget for the same records.

The hash is of the arrays as the site's reader returns them (after its scaling), so
the same file read with other ``feature-min``/``feature-max`` counts as other data: the
records the model saw differ. Labels are compared only when both runs read them (a
class-conditional run reads labels, an unconditional one does not).

Simulation is not affected: its site ledgers live in the run directory, one run each.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fedgen.privacy.ledger import atomic_write_text

from .data import SiteData
from .errors import DataError

FINGERPRINT_FILE = "data_fingerprint.json"
SCHEMA = "fedgen.data_fingerprint/1"

log = logging.getLogger(__name__)


class DataBindingError(DataError):
    """The data a site loads is not the data its state directory's ledger covers."""


def _sha256(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{array.dtype.str}{list(array.shape)}".encode())
    h.update(array.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class DataFingerprint:
    """What identifies a site's loaded data (module docstring)."""

    sha256: str  # of x: float32 [rows, *shape] as the reader returned it
    rows: int
    shape: tuple[int, ...]
    labels_sha256: str | None = None  # of y, when the data was read with labels
    path: str | None = None
    format: str | None = None

    @classmethod
    def of(cls, data: SiteData, *, path: str | None = None, fmt: str | None = None) -> "DataFingerprint":
        return cls(sha256=_sha256(data.x.numpy()), rows=len(data), shape=tuple(data.shape),
                   labels_sha256=None if data.y is None else _sha256(data.y.numpy()),
                   path=path, format=fmt)

    def same_data(self, other: "DataFingerprint") -> bool:
        """Same records: equal feature hash, and equal labels when both have labels."""
        labels_differ = (self.labels_sha256 is not None and other.labels_sha256 is not None
                         and self.labels_sha256 != other.labels_sha256)
        return self.sha256 == other.sha256 and not labels_differ

    def describe(self) -> str:
        where = f"{self.path} " if self.path else ""
        return f"{where}({self.rows} rows of shape {list(self.shape)}, sha256 {self.sha256[:12]})"

    def to_json(self) -> str:
        return json.dumps({"schema": SCHEMA, **asdict(self), "shape": list(self.shape)}, indent=1)

    @classmethod
    def read(cls, file: Path) -> "DataFingerprint":
        try:
            d: dict[str, Any] = json.loads(Path(file).read_text())
            return cls(sha256=str(d["sha256"]), rows=int(d["rows"]), shape=tuple(int(s) for s in d["shape"]),
                       labels_sha256=d.get("labels_sha256"), path=d.get("path"), format=d.get("format"))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataBindingError(f"{file}: unreadable data fingerprint ({type(err).__name__}: {err}); "
                                   "restore it from a backup of the state directory") from None


def read_fingerprint(state_dir: str | Path) -> DataFingerprint | None:
    """The fingerprint bound to ``state_dir``; ``None`` when the site never trained there."""
    file = Path(state_dir) / FINGERPRINT_FILE
    return DataFingerprint.read(file) if file.exists() else None


def siblings_with(state_dir: Path, fingerprint: DataFingerprint) -> list[Path]:
    """Other state directories in ``state_dir``'s parent bound to the same data."""
    parent = state_dir.resolve().parent
    try:
        candidates = sorted(p for p in parent.iterdir() if p.is_dir() and p.resolve() != state_dir.resolve())
    except OSError:
        return []
    found = []
    for folder in candidates:
        file = folder / FINGERPRINT_FILE
        if not file.is_file():
            continue
        try:
            if DataFingerprint.read(file).same_data(fingerprint):
                found.append(folder)
        except DataBindingError:
            continue  # a damaged sibling is that state directory's problem, not this one's
    return found


def bind_state_dir(state_dir: str | Path, data: SiteData, *, path: str | None = None,
                   fmt: str | None = None) -> DataFingerprint:
    """Check ``data`` against ``state_dir``'s fingerprint, or write it there on first use
    (module docstring). Raises :class:`DataBindingError` (one line) for other data."""
    state_dir = Path(state_dir)
    current = DataFingerprint.of(data, path=path, fmt=fmt)
    bound = read_fingerprint(state_dir)
    if bound is not None:
        if not bound.same_data(current):
            what = ("the labels differ" if bound.sha256 == current.sha256 else
                    f"{bound.rows} rows before, {current.rows} now" if bound.rows != current.rows else
                    f"record shape {list(bound.shape)} before, {list(current.shape)} now"
                    if bound.shape != current.shape else "the same row count, other values")
            raise DataBindingError(
                f"state-dir {state_dir} holds the privacy ledger of other data: it was bound to "
                f"{bound.describe()}, this site now loads {current.describe()} ({what}); a ledger covers one "
                "dataset: give new data a new state-dir, or point data-path (and its reader options) back "
                "at the data this ledger covers")
        return bound
    twins = siblings_with(state_dir, current)
    if twins:
        log.warning("state-dir %s is new, but the same data %s is already bound to %s: a new state-dir starts "
                    "a fresh privacy budget for the same records, so ε no longer composes over their whole "
                    "history; keep using %s (its ledger.json) unless starting over is intended",
                    state_dir, current.describe(), ", ".join(str(t) for t in twins), twins[0])
    state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(state_dir / FINGERPRINT_FILE, current.to_json())
    return current


def bind_site_data(node_config: Mapping[str, object], data: SiteData) -> DataFingerprint | None:
    """:func:`bind_state_dir` for a deployed site (``data-path`` and ``state-dir`` in its
    ``--node-config``); ``None`` in simulation, whose ledgers belong to one run directory."""
    state_dir = node_config.get("state-dir")
    if "data-path" not in node_config or not state_dir:
        return None
    fmt = node_config.get("data-format")
    return bind_state_dir(Path(str(state_dir)), data, path=str(node_config["data-path"]),
                          fmt=None if fmt is None else str(fmt))
