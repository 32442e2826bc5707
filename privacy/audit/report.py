"""Turn an audit dict (``audit.json``) into verdicts in words and a self-contained HTML page.

Everything here reads the JSON-ready dict that :func:`privacy.audit.run_audit` returns, so a
report can be re-rendered from ``audit.json`` alone. Figures are drawn with matplotlib's
object API (no pyplot state, no backend switch) and embedded as base64 PNGs.
The only extra inputs are the synthetic and training arrays for the grid of closest
pairs: the JSON holds their indices, never training records.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
if TYPE_CHECKING:  # matplotlib is imported only when a figure is drawn (`fedgen --help` writes no cache)
    from matplotlib.figure import Figure

from .membership import MIN_CANDIDATES
from .results import jsonable

OK, WARNING, VIOLATION, INFO, INCONCLUSIVE = "ok", "warning", "violation", "info", "inconclusive"


def to_json(audit: dict) -> str:
    """``audit`` as the text of ``audit.json`` (strict JSON: no NaN)."""
    return json.dumps(jsonable(audit), indent=1, allow_nan=False)


# ---------------------------------------------------------------------------------- verdicts

def _p(p: float) -> str:
    if p == 0:
        return "< 1e-300"
    return f"= {p:.2g}" if p >= 1e-3 else f"= {p:.1e}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _samples(n: int) -> str:
    return f"{n} synthetic sample lies" if n == 1 else f"{n} synthetic samples lie"


def memorization_verdicts(space: str, mem: dict) -> list[dict]:
    """Descriptions (level ``info``) of the DCR share and the near-copy count of one space.

    Distance-to-closest-record statistics are never a verdict of privacy or of leakage
    ("The DCR Delusion", ESORICS 2025; docs/audit.md): a model under strong DP that
    collapses onto a few blurry modes sits "closer to training" with a tiny p-value, and a
    model that leaks membership can keep its samples as far from training records as
    from new ones."""
    dcr, copies = mem["dcr"], mem["near_copies"]
    share, p = dcr["share_closer_to_train"]["value"], dcr["p_value"]["value"]
    dcr_text = (f"Distance to closest record ({space} space, a description, not a verdict): "
                f"{_pct(share)} of samples are closer to training than to held-out data "
                f"(sign test p {_p(p)}; 50 % if samples ignore which records were trained on).")
    n, expected = copies["n_flagged"]["value"], copies["expected_by_chance"]["value"]
    tau, rule = copies["threshold"]["value"], copies["threshold"]["rule"]
    copy_text = (f"Near-copies ({space} space, a description, not a verdict): {_samples(n)} within "
                 f"distance {tau:.3g} of a training record ({rule}); {expected:.2g} expected by "
                 "chance." + (" Inspect the closest pairs." if n else ""))
    return [{"level": INFO, "topic": f"memorization/{space}", "text": text}
            for text in (dcr_text, copy_text)]


#: How the family-wise level of a violation is shared (:func:`violation_levels`): the canary
#: tests, built to test a claim, weigh twice as much as all membership attacks together.
VIOLATION_WEIGHTS = {"canaries": 2.0, "white_box_canaries": 2.0, "membership": 1.0}


def violation_levels(significance: float, groups) -> dict[str, float]:
    """The level of each group of tests that can flag a *violation* in one audit (weighted
    Bonferroni, :data:`VIOLATION_WEIGHTS`): the levels add up to ``significance``, so a
    mechanism that meets its claim is flagged in at most ``significance`` of audits."""
    groups = list(dict.fromkeys(groups))
    total = sum(VIOLATION_WEIGHTS[g] for g in groups)
    return {g: significance * VIOLATION_WEIGHTS[g] / total for g in groups}


def _permitted_tpr(epsilon: float, delta: float, fpr: float) -> float:
    """The largest TPR an (ε, δ)-DP mechanism lets an attack reach at this FPR."""
    return min(1.0, fpr * float(np.exp(min(epsilon, 700.0))) + delta)


def membership_verdict(title: str, metrics: dict, *, level: float = 0.05,
                       claimed_epsilon: float | None = None) -> dict:
    """Verdict on one membership inference attack.

    Without a DP claim: from its two pre-declared tests of "no leakage"
    (membership.membership_tests: AUC and the low-FPR top-k count), each at ``level / 2``
    (Bonferroni); a warning when either finds leakage. The caller divides the audit's
    significance by the number of attacks, so the chance of any false warning on data that
    leaks nothing stays below it.

    Under a DP claim ``claimed_epsilon`` the question is whether the model leaks *more*
    than its guarantee permits: ``metrics["dp_test"]`` (membership.dp_claim_test, run at
    the caller's share of the violation level) gives the ε lower bound the attack's
    operating points imply; above the claim it is a violation, otherwise ok, and the line
    states the measured leakage and what the claim permits.
    Fewer than ``MIN_CANDIDATES`` candidates (members and non-members together): inconclusive."""
    auc = metrics["auc"]
    lo, hi = auc["ci"]
    first = metrics["tpr_at_fpr"][0]
    described_ = (f"Membership inference, {title}: AUC {auc['value']:.3f} "
                  f"({auc['ci_level']:.0%} CI {lo:.3f}-{hi:.3f}; 0.5 is chance), "
                  f"TPR {_pct(first['value'])} at {_pct(first['fpr'])} FPR")
    topic = f"membership/{title}"
    n = metrics["n_members"] + metrics["n_nonmembers"]
    test = metrics.get("test")
    if n < MIN_CANDIDATES or test is None:
        return {"level": INCONCLUSIVE, "topic": topic,
                "text": described_ + f" — inconclusive: {n} candidates, the test needs "
                        f"{MIN_CANDIDATES} (more training or held-out records)."}
    tests = (f"tests: AUC p {_p(test['auc_p_value'])}, {test['top_k_members']} members "
             f"among the top {test['top_k']} candidates ({test['top_k_members_expected']:.3g} expected, "
             f"p {_p(test['top_k_p_value'])})")
    if claimed_epsilon is not None:
        return _membership_under_claim(described_, tests, topic, metrics, claimed_epsilon)
    p = min(test["auc_p_value"], test["top_k_p_value"])
    above = p < level / 2
    text = (described_ + f"; {tests}, significant below {level / 2:.2g} — "
            + ("better than chance: the attack tells training records from new ones."
               if above else "no better than chance."))
    return {"level": WARNING if above else OK, "topic": topic, "text": text}


def _membership_under_claim(described_: str, tests: str, topic: str, metrics: dict, claim: float) -> dict:
    dp = metrics["dp_test"]
    bound, delta = dp["epsilon_lower_bound"], dp["delta"]
    what = (f"the ε lower bound its operating points imply is {bound:.3g} ({100 * (1 - dp['level']):.4g} % "
            f"confidence, δ = {delta:.2g}; at most {dp['max_attainable']:.3g} attainable with these candidates)")
    if bound > claim:
        return {"level": VIOLATION, "topic": topic,
                "text": f"{described_}; {what}: more leakage than the claimed ε = {claim:.3g} permits. The "
                        "privacy accounting or implementation is broken: do not release data from this run."}
    fpr = metrics["tpr_at_fpr"][0]["fpr"]
    permits = _permitted_tpr(claim, delta, fpr)
    return {"level": OK, "topic": topic,
            "text": f"{described_} ({tests}); {what}, within the claimed ε = {claim:.3g}: consistent with the "
                    f"DP guarantee, which permits an attack up to {_pct(permits)} TPR at {_pct(fpr)} FPR. "
                    f"ok means consistent with ε = {claim:.3g}, not that the model does not leak."}


def canary_verdict(canaries: dict, claimed_epsilon: float | None) -> dict:
    """Verdict on the empirical eps lower bound; a violation iff it exceeds the claim."""
    bound = canaries["epsilon_lower_bound"]
    what = (f"empirical ε lower bound {bound['value']:.3g} ({100 * bound['confidence']:g} % confidence, "
            f"δ = {bound['delta']:.2g}; {canaries['n_correct']['value']} of "
            f"{canaries['n_guesses']} canary guesses correct, m = {canaries['m']})")
    if claimed_epsilon is None:
        return {"level": INFO, "topic": "canaries",
                "text": f"The {what}; no claimed ε was given to compare it with."}
    if bound["value"] > claimed_epsilon:
        return {"level": VIOLATION, "topic": "canaries",
                "text": f"The privacy accounting or implementation is broken: the {what} exceeds "
                        f"the claimed ε = {claimed_epsilon:.3g}. Do not release data from this run."}
    from .canaries import epsilon_from_counts

    r = canaries["n_guesses"]
    attainable = epsilon_from_counts(canaries["m"], r, r, delta=bound["delta"], confidence=bound["confidence"])
    if attainable <= claimed_epsilon:
        return {"level": INCONCLUSIVE, "topic": "canaries",
                "text": f"The {what} cannot refute the claimed ε = {claimed_epsilon:.3g}: even every guess "
                        f"right would give only {attainable:.3g}. Use more canaries, or a white-box audit run."}
    return {"level": OK, "topic": "canaries",
            "text": f"The {what} does not exceed the claimed ε = {claimed_epsilon:.3g}: consistent "
                    "with the privacy accounting (an audit can refute a claim, never prove it)."}


# ---------------------------------------------------------------------------------- figures

def _figure(**kwargs: Any) -> Figure:
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _png(fig: Figure) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def roc_figure(curves: dict[str, dict]) -> str:
    """ROC curves (linear and log-log, where low FPR shows) of several attacks; base64 PNG."""
    fig = _figure(figsize=(10, 4.2))
    linear, loglog = fig.subplots(1, 2)
    for key, metrics in curves.items():
        title = metrics.get("attack", key)
        fpr, tpr = np.asarray(metrics["roc"]["fpr"]), np.asarray(metrics["roc"]["tpr"])
        label = f"{title} (AUC {metrics['auc']['value']:.3f})"
        linear.plot(fpr, tpr, label=label)
        loglog.loglog(np.maximum(fpr, 1e-5), np.maximum(tpr, 1e-5), label=label)
    for ax, low in ((linear, 0.0), (loglog, 1e-4)):
        ax.plot([max(low, 1e-5), 1], [max(low, 1e-5), 1], "k:", label="chance")
        ax.set_xlim(low or 0, 1)
        ax.set_ylim(low or 0, 1)
        ax.set_xlabel("false positive rate (non-members flagged)")
        ax.set_ylabel("true positive rate (members flagged)")
    fig.legend(*linear.get_legend_handles_labels(), fontsize=7, loc="upper center",
               bbox_to_anchor=(0.5, 0.0), ncol=2, frameon=False)
    linear.set_title("ROC")
    loglog.set_title("ROC, log-log (low-FPR regime)")
    return _png(fig)


def dcr_figure(mem: dict) -> str:
    """Histograms of synthetic samples' distances to training vs held-out data; base64 PNG."""
    dcr = mem["dcr"]
    d_train = np.asarray(dcr["distance_to_train"]["value"], dtype=float)
    d_holdout = np.asarray(dcr["distance_to_holdout"]["value"], dtype=float)
    fig = _figure(figsize=(6.5, 3.6))
    ax = fig.subplots()
    bins = np.histogram_bin_edges(np.r_[d_train, d_holdout], bins=50)
    ax.hist(d_train, bins=bins, alpha=0.55, label="to nearest training record")
    ax.hist(d_holdout, bins=bins, alpha=0.55, label="to nearest held-out record")
    ax.axvline(mem["near_copies"]["threshold"]["value"], color="crimson", ls="--",
               label="near-copy threshold")
    ax.set_xlabel("distance of a synthetic sample to the nearest record (Euclidean)")
    ax.set_ylabel("synthetic samples")
    ax.set_title("Distance to closest record (size-matched sets)")
    ax.legend(fontsize=7)
    return _png(fig)


def pairs_figure(pairs: dict, synthetic: np.ndarray, train: np.ndarray,
                 image_shape: Iterable[int]) -> str:
    """Closest (synthetic, training) pairs as an image grid: synthetic above, training
    below, distance as the title; base64 PNG."""
    shape = tuple(image_shape)
    s_idx, t_idx, dist = pairs["synthetic_index"], pairs["train_index"], pairs["distance"]["value"]
    fig = _figure(figsize=(1.1 * max(len(s_idx), 1), 2.6))
    axes = np.atleast_2d(fig.subplots(2, max(len(s_idx), 1), squeeze=False))

    shown = np.asarray([*synthetic[list(s_idx)], *train[list(t_idx)]], dtype=float)
    low, span = shown.min(), float(np.ptp(shown)) or 1.0  # one grey scale for all images

    def show(ax: Any, record: np.ndarray) -> None:
        img = (np.asarray(record, dtype=float).reshape(shape) - low) / span
        if img.ndim == 3:  # channels first -> last; one channel -> grey
            img = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
        ax.imshow(np.clip(img, 0, 1), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])

    for col, (s, t, d) in enumerate(zip(s_idx, t_idx, dist)):
        show(axes[0, col], synthetic[s])
        show(axes[1, col], train[t])
        axes[0, col].set_title(f"{d:.3g}", fontsize=7)
    axes[0, 0].set_ylabel("synthetic", fontsize=7)
    axes[1, 0].set_ylabel("training", fontsize=7)
    return _png(fig)


# ---------------------------------------------------------------------------------- HTML

_CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
li.ok{color:#1a7f37} li.warning{color:#b35900} li.info{color:#333} li.inconclusive{color:#666}
li.violation,p.violation{color:#d00000;font-weight:bold}
table{border-collapse:collapse;font-size:0.85em} td,th{border:1px solid #ccc;padding:2px 6px}
.note{color:#666;font-size:0.85em}"""


def _img(png: str, alt: str) -> str:
    return f'<img src="data:image/png;base64,{png}" alt="{html.escape(alt)}">'


def _metric_rows(metrics: dict) -> str:
    title = metrics.get("attack", "")
    auc = metrics["auc"]
    rows = [(auc["name"], auc["value"], auc["ci"], auc["direction"], auc["units"])]
    rows += [(t["name"], t["value"], t["ci"], t["direction"], t["units"]) for t in metrics["tpr_at_fpr"]]
    return "".join(f"<tr><td>{html.escape(title)}</td><td>{n}</td><td>{v:.4g}</td>"
                   f"<td>{c[0]:.4g} – {c[1]:.4g}</td><td>{d}</td><td>{u}</td></tr>"
                   for n, v, c, d, u in rows)


def render_html(audit: dict, *, synthetic: np.ndarray | None = None,
                train: np.ndarray | None = None) -> str:
    """The readable report (``audit.html``) of an audit dict. Pass the ``synthetic`` and
    ``train`` arrays the audit ran on to include the grid of closest pairs (image data
    only); the page then shows training records and must stay where they may be seen."""
    audit = jsonable(audit)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>fedgen privacy audit"
             f"</title><style>{_CSS}</style></head><body><h1>Privacy audit of generated data</h1>"]
    if audit.get("accounting_violation"):
        parts.append("<p class='violation'>The privacy accounting or implementation is broken: "
                     "an empirical ε lower bound exceeds the claimed ε.</p>")
    parts.append("<h2>Verdicts</h2><ul>" + "".join(
        f"<li class='{v['level']}'>{html.escape(v['text'])}</li>" for v in audit["verdicts"])
        + "</ul><p class='note'>Each line is evidence, not a guarantee: an audit can show "
          "leakage, never prove its absence.</p>")
    image_shape = audit["settings"].get("image_shape")
    for space, results in audit["spaces"].items():
        parts.append(f"<h2>{html.escape(space)} space</h2>")
        mem = results["memorization"]
        parts.append(_img(dcr_figure(mem), f"DCR histogram, {space}"))
        curves = dict(results["membership"])
        if space == "data":
            curves.update(audit.get("white_box") or {})
        parts.append("<h3>Membership inference</h3>" + _img(roc_figure(curves), f"ROC, {space}"))
        parts.append("<table><tr><th>attack</th><th>result</th><th>value</th><th>95 % CI</th>"
                     "<th>direction</th><th>units</th></tr>"
                     + "".join(_metric_rows(m) for m in curves.values()) + "</table>")
        if space == "data" and image_shape and synthetic is not None and train is not None:
            parts.append("<h3>Closest (synthetic, training) pairs</h3><p class='note'>Top: "
                         "synthetic sample; bottom: its nearest training record; title: distance. "
                         "This figure shows training records: keep this report at the site.</p>"
                         + _img(pairs_figure(mem["closest_pairs"], np.asarray(synthetic),
                                             np.asarray(train), image_shape), "closest pairs"))
    parts.append("<h2>Inputs (sha256) and settings</h2><table>" + "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(json.dumps(v))}</td></tr>"
        for k, v in {**audit["inputs"], **audit["settings"]}.items()) + "</table>")
    parts.append("<p class='note'>Every number is in audit.json.</p></body></html>")
    return "".join(parts)
