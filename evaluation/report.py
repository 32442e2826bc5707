"""``report.html``: one self-contained page per run (config, curves, latest sample grid)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import yaml

from .plots import plot_curves

_CURVES = ["train_loss", "epsilon", "fid_domain", "precision", "recall", "coverage",
           "heldout_nll_bits_per_dim", "tstr_accuracy"]


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(Path(path).name)}" src="data:image/png;base64,{data}">'


def write_run_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()] \
        if (run_dir / "metrics.jsonl").exists() else []
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    scenario = (run_dir / "scenario.yaml").read_text() if (run_dir / "scenario.yaml").exists() else ""
    parts = [f"<h1>fedgen run: {html.escape(run_dir.name)}</h1>"]
    if summary:
        cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v))}</td></tr>"
                        for k, v in summary.items())
        parts.append(f"<h2>Summary</h2><table>{cells}</table>")
    with io.BytesIO():
        curve_png = plot_curves(rows, _CURVES, run_dir / "samples" / "curves.png")
    if curve_png:
        parts.append(f"<h2>Per round</h2>{_img(curve_png)}")
    grids = sorted((run_dir / "samples").glob("round-*.png"))
    if grids:
        parts.append(f"<h2>Samples ({html.escape(grids[-1].stem)})</h2>"
                     "<p>Column i of a conditional model's grid is class i.</p>" + _img(grids[-1]))
    if scenario:
        parts.append(f"<h2>Scenario</h2><pre>{html.escape(scenario)}</pre>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>fedgen report</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
            "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}"
            "img{max-width:100%}</style></head><body>" + "\n".join(parts) + "</body></html>")
    out = run_dir / "report.html"
    out.write_text(page)
    return out
