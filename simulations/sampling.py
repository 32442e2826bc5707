"""``fedgen sample``: draw from a run's latest global model into .npz, .png or (tabular
data) .csv -- the table's columns in their original units, clamped inside the declared
bounds recorded in ``inputs/site_data.json``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedgen.contract.data_formats import TableSchema
from fedgen.evaluation.plots import rows_by_class, save_sample_grid
from fedgen.evaluation.tabular import to_original_units
from fedgen.privacy.ledger import atomic_write_text
from fedgen.contract import rundir
from fedgen.contract.task import build_global_model

from .errors import ScenarioError


def load_run_model(run_dir: Path):
    run_dir = Path(run_dir)
    ckpt = run_dir / rundir.CHECKPOINTS / "latest.pt"
    if not (run_dir / rundir.SCENARIO).exists():
        raise ScenarioError(f"{run_dir}: not a fedgen run directory (no {rundir.SCENARIO})")
    if not ckpt.exists():
        raise ScenarioError(f"{run_dir}: no checkpoint yet (the run finished no round)")
    try:
        state = rundir.read_checkpoint(ckpt)["model"]  # weights_only: loading never runs code
    except rundir.CheckpointError as err:
        raise ScenarioError(str(err)) from None
    model = build_global_model(rundir.read_scenario(run_dir), rundir.DataSpec.read(run_dir))
    try:
        model.load_state_dict(state)
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise ScenarioError(f"{ckpt}: the checkpoint does not fit the run's model ({type(err).__name__}: "
                            f"{first})") from None
    return model.eval()


def sample_run(run_dir: Path, *, n: int, out: Path, labels: list[int] | None = None, seed: int = 0) -> Path:
    if n < 1:
        raise ScenarioError(f"-n must be >= 1, got {n}")
    if out.suffix not in (".npz", ".png", ".csv"):
        raise ScenarioError(f"{out}: output must end in .npz, .png or .csv")
    model = load_run_model(run_dir)
    table = None
    if out.suffix == ".csv":
        table = run_table(Path(run_dir))
    torch.manual_seed(seed)
    y = None
    if model.conditional:
        y = (torch.tensor(labels)[torch.arange(n) % len(labels)] if labels else model.balanced_labels(n))
        if labels and (min(labels) < 0 or max(labels) >= model.num_classes):
            raise ScenarioError(f"--labels must lie in 0..{model.num_classes - 1}")
    elif labels:
        raise ScenarioError("--labels given, but this run's model is unconditional")
    with torch.no_grad():
        x = model.sample(n, y)
    out.parent.mkdir(parents=True, exist_ok=True)
    if table is not None:
        atomic_write_text(out, table_csv(x.numpy(), None if y is None else y.numpy(), table))
    elif out.suffix == ".npz":
        arrays = {"x": x.numpy()} | ({"y": y.numpy()} if y is not None else {})
        np.savez(out, **arrays)
    else:
        per_row = 10 if y is None else max(1, -(-n // len(y.unique())))  # conditional: one row per class
        save_sample_grid(x if y is None else rows_by_class(x, y, per_row), out, nrow=per_row)
    return out


def run_table(run_dir: Path) -> TableSchema:
    """The run's table schema (columns and declared bounds); a one-line error when the run's
    data are not rows of named columns."""
    spec = rundir.DataSpec.read(run_dir)
    if spec.table is None:
        what = f"examples of shape {list(spec.shape)}"
        raise ScenarioError(f"{run_dir}: --out .csv needs tabular data with declared columns and bounds "
                            f"(data.format csv or breast-cancer, or deployment.table); this run has {what}: "
                            "use --out .npz or .png")
    return TableSchema.model_validate(spec.table)


def table_csv(x: np.ndarray, y: np.ndarray | None, table: TableSchema) -> str:
    """Rows in [0, 1] as CSV text: the table's header, each value mapped back to its column's
    original units with the declared bounds and clamped inside them, and the label column
    (when the model is conditional)."""
    import csv
    import io

    lo, hi = table.bounds()
    values = to_original_units(x, lo, hi)
    label = table.label_column if y is not None else None
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(table.columns) + ([label or "label"] if y is not None else []))
    for i, row in enumerate(values):
        writer.writerow([f"{v:.6g}" for v in row] + ([int(y[i])] if y is not None else []))
    return buf.getvalue()
