"""The per-family MNIST sweep (issue 18): vae, gan, flow and diffusion at epsilon 10 and 1 on
the `mnist-utility` federation, the `mmd` release alone beside them. Runs nothing: it reads
the summaries already in benchmarks/results/ and draws the table and the plot of
docs/benchmarks.md, "The per-family MNIST sweep".

    # after `fedgen simulate scenarios/gan-mnist.yaml [--set privacy.target_epsilon=1] --out RUN`:
    python benchmarks/family_sweep.py --collect gan 10 RUN   # summary + last grid into place
    python benchmarks/family_sweep.py                        # table (stdout), plot, json

``--collect`` copies RUN/summary.json to benchmarks/results/{family}-mnist-eps{E}-summary.json
and RUN's last per-class grid (row i = class i) to docs/img/{family}-mnist-eps{E}.png (grey,
to keep it small). The plain form writes docs/img/family-sweep-tstr.png (TSTR against epsilon,
one line a family, `mmd` dashed, the 90 % target dotted) and
benchmarks/results/family_sweep.json, and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedgen.privacy.ledger import atomic_write, atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
IMG = ROOT / "docs" / "img"
FAMILIES = ("vae", "gan", "flow", "diffusion")
EPSILONS = (1, 10)
TARGET_TSTR = 0.90
#: the `mmd` release alone on the same federation (docs/benchmarks.md, "Privacy-utility on MNIST")
MMD = {10: RESULTS / "mnist-utility-eps10-summary.json", 1: RESULTS / "mnist-utility-eps1-summary.json"}
#: where the sweep has no full-size run yet: the closest earlier figure, marked in the table and
#: drawn hollow in the plot (docs/benchmarks.md says what each was)
EARLIER = {
    ("vae", 10): ("vae-mnist-eps10-first-summary.json", "first run (00:09, release init before the seed-only fix)"),
    ("flow", 10): ("flow-mnist-eps10-first-summary.json", "first run (00:44, release init before the seed-only fix)"),
    ("diffusion", 10): ("diffusion-mnist-reduced-eps10-summary.json", "reduced (200-step generator fit)"),
    ("gan", 10): ("gan-mnist-reduced-eps10-summary.json", "reduced (200-step generator fit)"),
}
COLUMNS = ("epsilon", "tstr_accuracy", "trtr_accuracy", "fid_domain", "precision", "recall", "label_agreement",
           "wall_seconds")


def summary_path(family: str, epsilon: int) -> Path:
    return RESULTS / f"{family}-mnist-eps{epsilon}-summary.json"


def collect(family: str, epsilon: int, run: Path) -> None:
    """Copy a finished run's summary and last sample grid into place."""
    if not (run / "summary.json").exists():
        raise SystemExit(f"{run}: no summary.json; let the run finish first (or pass its run directory)")
    grids = sorted((run / "samples").glob("round-*.png"))
    if not grids:
        raise SystemExit(f"{run}/samples: no round-*.png grid; the run wrote no samples")
    text = (run / "summary.json").read_text()
    atomic_write_text(summary_path(family, epsilon), text)
    from PIL import Image  # matplotlib's dependency

    grey = Image.open(grids[-1]).convert("L")
    atomic_write(IMG / f"{family}-mnist-eps{epsilon}.png", lambda fh: grey.save(fh, format="PNG", optimize=True))


def row(summary: dict, run: str = "full size") -> dict:
    m = summary.get("metrics", {})
    return {"run": run, "epsilon": summary.get("epsilon"), "wall_seconds": summary.get("wall_seconds"),
            **{k: m.get(k) for k in COLUMNS if k in m}}


def table() -> dict[str, dict[int, dict]]:
    """{name: {epsilon: row}} for every summary present (families, then `mmd`); a family
    without a full-size run at an epsilon gets its :data:`EARLIER` figure, marked."""
    out: dict[str, dict[int, dict]] = {}
    for name in (*FAMILIES, "mmd"):
        rows = {}
        for e in EPSILONS:
            path = MMD.get(e) if name == "mmd" else summary_path(name, e)
            if path is not None and path.exists():
                rows[e] = row(json.loads(path.read_text()))
            elif (name, e) in EARLIER and (RESULTS / EARLIER[name, e][0]).exists():
                rows[e] = row(json.loads((RESULTS / EARLIER[name, e][0]).read_text()), EARLIER[name, e][1])
        if rows:
            out[name] = rows
    return out


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return ""
    if kind in ("tstr_accuracy", "trtr_accuracy"):
        return f"{100 * value:.1f} %"
    if kind == "fid_domain":
        return f"{value:.1f}"
    if kind == "epsilon":
        return f"{value:.2f}"
    if kind == "wall_seconds":
        return f"{value:,.0f} s".replace(",", " ")
    return f"{value:.2f}"


def markdown(rows: dict[str, dict[int, dict]]) -> str:
    head = "| family | run | ε target | ε reached | TSTR | TRTR | domain FID | precision | recall | label agreement | wall |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, by_eps in rows.items():
        for eps in sorted(by_eps, reverse=True):
            r = by_eps[eps]
            cells = [_fmt(r.get(k), k) for k in COLUMNS]
            lines.append(f"| {name} | {r['run']} | {eps} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, dict[int, dict]], path: Path) -> Path | None:
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, by_eps in rows.items():
        pts = sorted((e, 100 * r["tstr_accuracy"], r["run"] == "full size") for e, r in by_eps.items()
                     if r.get("tstr_accuracy") is not None)
        if not pts:
            continue
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name,
                          linestyle="--" if name == "mmd" else "-", color="black" if name == "mmd" else None)
        for e, tstr, full in pts:  # hollow: an earlier or reduced run, not the sweep's
            ax.plot([e], [tstr], marker="o", ms=5, color=line.get_color(),
                    markerfacecolor=line.get_color() if full else "white")
    ax.axhline(100 * TARGET_TSTR, color="grey", linestyle=":", linewidth=1, label="target 90 %")
    ax.set_ylim(0, 100)
    ax.set_xscale("log")
    ax.set_xticks(list(EPSILONS), [str(e) for e in EPSILONS])
    ax.set_xlabel("ε (δ = 1e-5)")
    ax.set_ylabel("TSTR accuracy, %")
    ax.set_title("MNIST, 10 sites, Dirichlet 0.5: TSTR per family (hollow: earlier/reduced run)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()

    def write(fh) -> None:
        fig.savefig(fh, format="png", dpi=90)

    atomic_write(path, write)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--collect", nargs=3, action="append", default=[], metavar=("FAMILY", "EPSILON", "RUN"),
                        help="copy a finished run's summary.json and last grid into place (repeatable)")
    args = parser.parse_args(argv)
    for family, eps, run in args.collect:
        if family not in FAMILIES:
            raise SystemExit(f"--collect: unknown family {family!r}; one of {', '.join(FAMILIES)}")
        if eps not in {str(e) for e in EPSILONS}:
            raise SystemExit(f"--collect: epsilon {eps!r} is not in the sweep; one of {', '.join(map(str, EPSILONS))}")
        collect(family, int(eps), Path(run))
    rows = table()
    plot(rows, IMG / "family-sweep-tstr.png")
    atomic_write_text(RESULTS / "family_sweep.json", json.dumps(
        {name: {str(e): r for e, r in by_eps.items()} for name, by_eps in rows.items()}, indent=2) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # `| head`
        sys.exit(0)
