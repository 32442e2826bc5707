"""HTML reports: ``report.html`` for one run and a side-by-side comparison of several.

Self-contained pages (figures embedded as base64 PNG) built from a run directory's
``summary.json``, ``metrics.jsonl``, ``scenario.yaml`` and sample grids.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .plots import plot_bars, plot_curves, plot_overlaid
from .suite import metric_directions

CURVES = ["train_loss", "epsilon", "site_level_epsilon", "fid_domain", "precision", "recall", "coverage", "heldout_nll_bits_per_dim",
          "federated_eval_loss"]
TABLE_KEYS = ["rounds_completed", "stopped_reason", "epsilon", "delta", "site_level_epsilon", "fid_domain",
              "kid_domain", "precision",
              "recall", "density", "coverage", "classes_covered", "collapsed", "label_agreement", "tstr_accuracy",
              "trtr_accuracy", "heldout_nll_bits_per_dim", "wall_seconds"]
_STYLE = ("body{font-family:sans-serif;max-width:1150px;margin:auto;padding:0 1em}table{border-collapse:collapse}"
          "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}img{max-width:100%}"
          ".note{color:#555;font-size:90%}.warning{background:#fde8e8;border:1px solid #c33;padding:6px}")


@dataclass
class RunRecord:
    """What a report needs from one run directory."""

    path: Path
    summary: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    scenario: str = ""

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def load(cls, run_dir: Path) -> "RunRecord":
        run_dir = Path(run_dir)
        read = lambda name: (run_dir / name).read_text() if (run_dir / name).exists() else ""  # noqa: E731
        rows = [json.loads(line) for line in read("metrics.jsonl").splitlines() if line.strip()]
        return cls(run_dir, json.loads(read("summary.json") or "{}"), rows, read("scenario.yaml"))

    def flat(self) -> dict[str, Any]:
        """Summary values with the final metrics folded in (for tables)."""
        return {**{k: v for k, v in self.summary.items() if k != "metrics"}, **self.summary.get("metrics", {})}


def _img(path: Path | None) -> str:
    if path is None:
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(json.dumps(value) if isinstance(value, (dict, list)) else str(value))


def _cell(flat: dict[str, Any], key: str) -> str:
    """One table cell: the value, and TSTR with its 95 % interval (evaluation/tstr.py) when known."""
    value = flat.get(key, "")
    low, high = flat.get("tstr_ci95_low"), flat.get("tstr_ci95_high")
    if key == "tstr_accuracy" and isinstance(value, float) and isinstance(low, float) and isinstance(high, float):
        return f"{_fmt(value)} (95 % interval {low:.3f}–{high:.3f})"
    return _fmt(value)


def _label(key: str) -> str:
    direction = metric_directions().get(key)
    return key + {"minimize": " (lower is better)", "maximize": " (higher is better)"}.get(direction, "")


def _page(title: str, parts: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>" + "\n".join(parts) + "</body></html>")


def write_run_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html``: summary, final metrics, curves, samples, scenario."""
    run = RunRecord.load(run_dir)
    figures = run.path / "samples"
    parts = [f"<h1>fedgen run: {html.escape(run.name)}</h1>",
             "<p class='note'>Quality scores use fedgen's domain feature extractor (a small classifier "
             "trained on the held-out split), not Inception: compare them across fedgen runs only.</p>"]
    if warm := run.summary.get("warm_start"):  # docs/models.md, "Warm starts"
        release = f"a DP release (epsilon {warm.get('epsilon', warm.get('epsilon_share'))} per site)"
        source = release if warm.get("kind") == "public+release" else warm.get("public_data") or release
        parts.append(f"<p><strong>Warm start:</strong> pretrained before round 1 on {html.escape(str(source))} "
                     f"({warm.get('examples')} examples, {warm.get('steps')} steps); "
                     f"{html.escape(str(warm.get('guarantee', '')))}.</p>")
        if alone := warm.get("public_only"):  # server/warm_start.py: the floor a run's TSTR is read against
            parts.append(f"<p><strong>The public set alone:</strong> TSTR {_fmt(alone.get('tstr_accuracy'))} "
                         f"(the TSTR classifier trained on {alone.get('records')} public records, no private data, "
                         f"tested on the same real half); this run's TSTR is worth its budget only above it.</p>")
    if run.summary.get("warning"):  # e.g. seeded noise: the privacy guarantee does not hold
        parts.append(f"<p class='warning'><strong>Privacy warning:</strong> {html.escape(run.summary['warning'])}</p>")
    for g in run.summary.get("guarantees") or []:  # server/summary.py: which guarantee, against whom
        parts.append(f"<p><strong>Guarantee ({html.escape(str(g.get('unit')))}-level):</strong> "
                     f"epsilon {_fmt(g.get('epsilon'))} at delta {_fmt(g.get('delta'))}; "
                     f"{html.escape(str(g.get('mechanism', '')))}; protects {html.escape(str(g.get('protects', '')))}.</p>")
    if sec := run.summary.get("secure_aggregation"):
        parts.append(f"<p><strong>Secure aggregation</strong> (noise: {html.escape(str(sec.get('noise', 'local')))}, "
                     f"threshold {_fmt(sec.get('threshold'))}). Threat model: "
                     f"{html.escape(str(sec.get('threat_model', '')))}.</p>")
    flat = run.flat()
    rows = "".join(f"<tr><th>{html.escape(_label(k))}</th><td>{_cell(flat, k)}</td></tr>" for k in TABLE_KEYS if k in flat)
    parts.append(f"<h2>Summary</h2><table>{rows}</table>")
    parts.append(f"<h2>Per round</h2>{_img(plot_curves(run.rows, CURVES, figures / 'curves.png'))}")
    grids = sorted(figures.glob("round-*.png"))
    if grids:
        parts.append(f"<h2>Samples after {html.escape(grids[-1].stem.replace('-', ' '))}</h2>"
                     "<p class='note'>For a conditional model, column i holds class i.</p>" + _img(grids[-1]))
    hist = next((r["class_histogram"] for r in reversed(run.rows) if r.get("class_histogram")), None)
    if hist:
        parts.append("<h2>Classes of the samples (domain classifier)</h2>"
                     + _img(plot_bars(hist, figures / "class-histogram.png", xlabel="class", ylabel="samples")))
    if run.scenario:
        parts.append(f"<h2>Scenario</h2><pre>{html.escape(run.scenario)}</pre>")
    out = run.path / "report.html"
    out.write_text(_page(f"fedgen report: {run.name}", parts))
    return out


def write_comparison(run_dirs: list[Path], out_dir: Path) -> Path:
    """Compare runs side by side: ``comparison.html`` (table + overlaid curves) and
    ``comparison.md`` (the table) in ``out_dir``."""
    runs = [RunRecord.load(d) for d in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = [k for k in TABLE_KEYS if any(k in r.flat() for r in runs)]
    head = "".join(f"<th>{html.escape(r.name)}</th>" for r in runs)
    body = "".join(f"<tr><th>{html.escape(_label(k))}</th>" + "".join(f"<td>{_cell(r.flat(), k)}</td>" for r in runs)
                   + "</tr>" for k in keys)
    parts = [f"<h1>fedgen comparison of {len(runs)} runs</h1>", f"<table><tr><th></th>{head}</tr>{body}</table>"]
    for key in CURVES:
        series = {r.name: [(row["round"], row[key]) for row in r.rows if row.get(key) is not None] for r in runs}
        png = plot_overlaid(series, key, out_dir / f"compare-{key}.png")
        if png is not None:
            parts.append(f"<h2>{html.escape(_label(key))}</h2>{_img(png)}")
    md = ["| metric | " + " | ".join(r.name for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    md += [f"| {k} | " + " | ".join(_cell(r.flat(), k) for r in runs) + " |" for k in keys]
    (out_dir / "comparison.md").write_text("\n".join(md) + "\n")
    out = out_dir / "comparison.html"
    out.write_text(_page("fedgen comparison", parts))
    return out
