"""``fedgen audit``: read files, call :func:`privacy.audit.run_audit`, write ``audit.json``
and ``audit.html`` (issue 6; what the numbers mean: ``docs/audit.md``).

Two modes:

* ``fedgen audit RUN_DIR`` audits a simulation run: *members* are the union of the sites'
  training examples (``inputs/partitions.npz`` over the run's dataset; planted canaries
  are scored separately and never counted as members), *non-members* the held-out split,
  *synthetic* data ``-n`` samples of the final global model (class-balanced when it is
  conditional). The white-box statistic, the claimed epsilon (``privacy.json``) and the
  canaries (``inputs/canaries.npz``) come from the run.
* ``fedgen audit --samples S.npz --train T --holdout H [--model CKPT]`` audits any
  generated data against any records, e.g. at a site against the global model: every
  input is local, nothing leaves the machine.

White-box statistic (LOGAN, Hayes et al. 2019; loss threshold, Yeom et al. 2018): the
per-example loss of the model's first *private* training step -- the step whose loss
touches training records, so the one membership can show in. VAE: the negative ELBO;
flow: the negative log-likelihood; diffusion: the denoising loss; GAN: the
discriminator's *pair* loss ``l(D(x_i)) + l'(D(G(z_i)))`` (docs/architecture.md §3), whose fake
term does not depend on the record and only adds noise (averaged over ``draws``). Lower
loss = more likely a member. Computed under ``torch.no_grad()`` in batches.

Errors (mismatched shapes, too few held-out records, an unreadable checkpoint, a folder
that is not a run directory) raise :class:`~simulations.errors.AuditError` (or the
readers' ``DataError`` / ``ScenarioError``), which the CLI prints as one line; outputs
are written only when the whole audit succeeded, each to a temporary name then renamed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fedgen.client.data import SiteData, load_data
from fedgen.contract import rundir
from fedgen.contract.rundir import Canaries, read_canaries
from fedgen.contract.scenario import Scenario, scenario_from_dict
from fedgen.contract.task import build_global_model
from fedgen.privacy.audit import AuditSettings, WhiteBoxScores, dirac, render_html, run_audit, to_json
from fedgen.privacy.ledger import atomic_write_text
from fedgen.shared_models import Batch, DPSGDTrainable, GenerativeModel

from .errors import AuditError
from .sampling import load_run_model

DEFAULT_SAMPLES = 2000
#: Fewest synthetic samples: DOMIAS fits a KDE on their 5-dimensional PCA projection.
MIN_SAMPLES = 10
AUDIT_JSON, AUDIT_HTML = "audit.json", "audit.html"

log = logging.getLogger(__name__)


def min_holdout(settings: AuditSettings) -> int:
    """Fewest held-out records the audit accepts: the near-copy threshold is the
    ``near_copy_quantile`` (1 %) quantile of held-out-to-training distances, which needs
    ``1 / quantile`` = 100 records to exist; half of them are then non-member candidates
    and half DOMIAS' reference data (so TPR at 1 % FPR resolves only from 200)."""
    return max(20, math.ceil(1.0 / settings.near_copy_quantile))


@dataclass
class AuditInputs:
    """Everything one audit reads, already in memory and checked for consistency."""

    synthetic: np.ndarray  # [n, *shape]
    train: SiteData
    holdout: SiteData
    model: GenerativeModel | None = None
    canaries: Canaries | None = None
    claimed_epsilon: float | None = None
    delta: float | None = None
    source: dict[str, Any] = field(default_factory=dict)  # recorded in audit.json
    white_box_dir: Path | None = None  # a white-box audit run's site state (privacy/audit/dirac.py)
    white_box_claim: float | None = None  # that site's epsilon


# -- the white-box statistic ---------------------------------------------------------

def per_example_loss(model: GenerativeModel, x: torch.Tensor, y: torch.Tensor | None, *, seed: int = 0,
                     batch_size: int = 256, draws: int = 4) -> np.ndarray:
    """Per-example loss of ``model``'s first private step on records ``x`` (labels ``y``),
    averaged over ``draws`` evaluations (the losses draw latents, noise or fakes), with
    the same random stream for every call of the same ``seed`` (common random numbers
    for members and non-members)."""
    step = next(s for s in model.steps() if s.private)
    model.eval()
    torch.manual_seed(seed)
    out = []
    for start in range(0, len(x), batch_size):
        batch = Batch.of(x[start:start + batch_size], None if y is None else y[start:start + batch_size])

        def draw() -> torch.Tensor:
            return torch.stack([step.loss(batch) for _ in range(draws)]).mean(0)

        try:
            with torch.no_grad():
                losses = draw()
        except RuntimeError:  # a loss that differentiates inside (WGAN-GP's gradient penalty)
            losses = draw().detach()
        out.append(losses.double().cpu())
    return torch.cat(out).numpy()


def white_box_scores(model: GenerativeModel, train: SiteData, holdout: SiteData, *,
                     seed: int = 0) -> WhiteBoxScores:
    """The white-box statistic (module docstring) on every training and held-out record."""
    step = next(s for s in model.steps() if s.private)
    return WhiteBoxScores(
        name=f"{step.name} loss", higher_means_member=False,
        train=per_example_loss(model, train.x, train.y, seed=seed),
        holdout=per_example_loss(model, holdout.x, holdout.y, seed=seed))


# -- reading the inputs ---------------------------------------------------------------

def _check_model_fits(model: GenerativeModel, *parts: tuple[str, SiteData]) -> None:
    for name, data in parts:
        if data.shape != model.data_shape:
            raise AuditError(f"{name}: records have shape {data.shape} but the model was built for "
                             f"{model.data_shape}")
        if model.conditional and data.y is None:
            raise AuditError(f"{name}: no labels, but the model is class-conditional; give labelled records "
                             "(npz with y) for the white-box statistic")
        if model.conditional and int(data.y.max()) >= model.num_classes:
            raise AuditError(f"{name}: label {int(data.y.max())} out of range for a model of "
                             f"{model.num_classes} classes")


def load_checkpoint_model(path: Path, *, data_shape: tuple[int, ...], num_classes: int | None) -> GenerativeModel:
    """A model from a run directory or a checkpoint file (``checkpoints/latest.pt``, or a
    ``model-round-*.pt`` state dict inside a run directory)."""
    path = Path(path)
    if path.is_dir():
        return load_run_model(path)
    if not path.exists():
        raise AuditError(f"{path}: model checkpoint not found")
    run_dir = path.parent.parent
    try:
        ckpt = rundir.read_checkpoint(path)  # weights_only: loading never runs code
    except rundir.CheckpointError as err:
        raise AuditError(str(err)) from None
    try:
        state, scenario = ckpt["model"], ckpt.get("scenario")
        if scenario is not None:
            scenario = scenario_from_dict(scenario, source=f"{path} (its scenario)")
        elif (run_dir / rundir.SCENARIO).exists():
            scenario = rundir.read_scenario(run_dir)
        if scenario is None:
            raise AuditError(f"{path}: the checkpoint names no scenario and is not inside a run directory; "
                             "give the run directory or its checkpoints/latest.pt")
        spec = (rundir.DataSpec.read(run_dir) if (run_dir / rundir.SITE_DATA).exists() else
                rundir.DataSpec(format="audit", path=None, shape=data_shape, num_sites=1,
                                num_classes=num_classes if scenario.data.conditional else None))
        model = build_global_model(scenario, spec)
        model.load_state_dict(state)
    except AuditError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise AuditError(f"{path}: unreadable checkpoint ({type(err).__name__}: {first})") from None
    return model.eval()


def _run_privacy(run_dir: Path, scenario: Scenario,
                 canaries: Canaries | None) -> tuple[float | None, float | None, str]:
    """(claimed epsilon, delta, where the claim comes from). With canaries the claim is
    the canary site's own epsilon (<= the run's max over sites): the tighter comparison."""
    if not scenario.privacy.enabled:
        return None, scenario.privacy.delta, "no DP in this run: nothing claimed"
    path = run_dir / rundir.PRIVACY
    if not path.exists():
        raise AuditError(f"{run_dir}: DP was on but {rundir.PRIVACY} is missing; the run finished no round")
    try:
        ledger = json.loads(path.read_text())
        site = ledger.get("sites", {}).get(str(canaries.site)) if canaries is not None else None
        if site is not None:
            return float(site["epsilon"]), float(ledger["delta"]), f"privacy.json sites.{canaries.site}.epsilon"
        epsilon = ledger.get("epsilon")
        return (None if epsilon is None else float(epsilon)), float(ledger["delta"]), \
            "privacy.json epsilon (max over sites)"
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise AuditError(f"{path}: unreadable privacy ledger ({type(err).__name__}: {err}); the run directory "
                         "is damaged") from None


def run_dir_inputs(run_dir: Path, *, n_samples: int = DEFAULT_SAMPLES, seed: int = 0) -> AuditInputs:
    """The inputs of ``fedgen audit RUN_DIR`` (module docstring)."""
    run_dir = Path(run_dir)
    if not (run_dir / rundir.SCENARIO).exists() or not (run_dir / rundir.SITE_DATA).exists():
        raise AuditError(f"{run_dir}: not a fedgen run directory (no {rundir.SCENARIO} / {rundir.SITE_DATA}); "
                         "give the folder that `fedgen simulate` created")
    spec = rundir.DataSpec.read(run_dir)
    if spec.path is None and spec.format != "digits":
        raise AuditError(f"{run_dir}: a deployment run directory holds no site data; audit at each site with "
                         "`fedgen audit --samples S.npz --train T --holdout H --model CKPT`")
    scenario = rundir.read_scenario(run_dir)
    canaries = read_canaries(str(run_dir))
    claimed, delta, claim_source = _run_privacy(run_dir, scenario, canaries)  # before the slow part
    model = load_run_model(run_dir)
    data = load_data(spec.format, spec.path, spec.options)
    data = data if model.conditional and data.y is not None else data.without_labels()
    with np.load(run_dir / rundir.PARTITIONS) as z:
        members = np.concatenate([z[f"site_{i}"] for i in range(spec.num_sites)])
        holdout_idx = z["holdout"]
    if len(data) <= max(members.max(initial=0), holdout_idx.max(initial=0)):
        raise AuditError(f"{spec.path or spec.format}: has {len(data)} records, fewer than the run's partition "
                         "indexes; the dataset changed since the run")
    torch.manual_seed(seed)
    with torch.no_grad():
        synthetic = model.sample(n_samples, model.balanced_labels(n_samples)).cpu().numpy()
    return AuditInputs(
        synthetic=synthetic, train=data.subset(np.sort(members)), holdout=data.subset(holdout_idx), model=model,
        canaries=canaries, claimed_epsilon=claimed, delta=delta,
        source={"mode": "run_dir", "run_dir": str(run_dir.resolve()), "model_family": scenario.model.family,
                "members": "union of the sites' training partitions (canaries excluded)",
                "nonmembers": "the run's held-out split", "n_samples": n_samples, "sample_seed": seed,
                "claimed_epsilon_source": claim_source},
        **_white_box_site(run_dir, scenario))


def _white_box_site(run_dir: Path, scenario: Scenario) -> dict[str, Any]:
    """The state folder and claimed epsilon of the run's white-box audit site, if any."""
    if scenario.privacy.white_box is None:
        return {}
    site = str(scenario.privacy.white_box.site)
    try:
        claim = json.loads((run_dir / rundir.PRIVACY).read_text())["sites"][site]["epsilon"]
    except (OSError, ValueError, KeyError, TypeError):
        raise AuditError(f"{run_dir}: privacy.white_box site {site} has no epsilon in {rundir.PRIVACY}; "
                         "the white-box audit run finished no round at that site") from None
    return {"white_box_dir": run_dir / "sites" / site, "white_box_claim": float(claim)}


def file_inputs(samples: Path, train: Path, holdout: Path, *, model: Path | None = None,
                fmt: str = "npz") -> AuditInputs:
    """The inputs of ``fedgen audit --samples S --train T --holdout H [--model CKPT]``."""
    synthetic = load_data("npz", samples)
    train_data, holdout_data = load_data(fmt, train), load_data(fmt, holdout)
    for name, data in (("--train", train_data), ("--holdout", holdout_data)):
        if data.shape != synthetic.shape:
            raise AuditError(f"{name} {data.source}: records have shape {data.shape} but the samples "
                             f"{samples} have {synthetic.shape}; audit data of one shape")
    net = None
    if model is not None:
        labels = [d.y for d in (train_data, holdout_data) if d.y is not None]
        num_classes = int(max(int(y.max()) for y in labels)) + 1 if labels else None
        net = load_checkpoint_model(model, data_shape=synthetic.shape, num_classes=num_classes)
    return AuditInputs(
        synthetic=synthetic.x.numpy(), train=train_data, holdout=holdout_data, model=net,
        source={"mode": "files", "samples": str(samples), "train": str(train), "holdout": str(holdout),
                "format": fmt, "model": None if model is None else str(model)})


# -- the audit -------------------------------------------------------------------------

#: Share of the held-out records that fits the feature extractor (and leaves the audit).
EXTRACTOR_SHARE = 0.25
#: Fewest records to fit the feature extractor on; with fewer, no feature space.
MIN_EXTRACTOR_RECORDS = 50


def split_for_extractor(holdout: SiteData, *, n_min: int, seed: int) -> tuple[SiteData | None, SiteData]:
    """(records to fit the feature extractor on, records left for the audit).

    The extractor must not be fit on records the audit compares: a classifier embeds its
    own training records differently from unseen ones (the very effect membership
    inference on classifiers exploits), so non-member candidates it was fit on would be
    told apart from members by the extractor, not by the generator (measured on a DP
    model at epsilon 1: feature-space AUCs 0.53-0.545 with the extractor fit on the whole
    held-out split, 0.51-0.52 with this split). A random ``EXTRACTOR_SHARE`` of the
    held-out split fits it and is then left out of the audit; ``None`` (no feature
    space) when that would leave fewer than ``n_min`` records or fit on fewer than
    ``MIN_EXTRACTOR_RECORDS``."""
    n_fit = int(len(holdout) * EXTRACTOR_SHARE)
    if n_fit < MIN_EXTRACTOR_RECORDS or len(holdout) - n_fit < n_min:
        return None, holdout
    order = np.random.default_rng([seed, 2]).permutation(len(holdout))
    return holdout.subset(np.sort(order[:n_fit])), holdout.subset(np.sort(order[n_fit:]))


def _features_fn(records: SiteData, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """Domain features from a :class:`~evaluation.features.DomainFeatureExtractor` fit on
    ``records`` (held-out records outside the audit, :func:`split_for_extractor`)."""
    from fedgen.evaluation.features import DomainFeatureExtractor

    extractor = DomainFeatureExtractor.fit(records.x, records.y, seed=seed)
    # a copy: the extractor memoises read-only arrays, which torch.from_numpy warns about
    return lambda a: np.array(extractor.features(torch.as_tensor(np.asarray(a, dtype=np.float32))))


def audit_inputs(inputs: AuditInputs, *, seed: int = 0, settings: AuditSettings | None = None,
                 features: bool = True) -> dict[str, Any]:
    """Check ``inputs`` and run every applicable audit; the ``audit.json`` dict."""
    settings = settings or AuditSettings()
    n_min = min_holdout(settings)
    if len(inputs.holdout) < n_min:
        raise AuditError(f"holdout {inputs.holdout.source}: {len(inputs.holdout)} records; the audit needs at "
                         f"least {n_min} (the near-copy threshold is their {settings.near_copy_quantile:.0%} "
                         "quantile of distances to training; half are non-member candidates, half reference)")
    if len(inputs.synthetic) < MIN_SAMPLES:
        raise AuditError(f"{len(inputs.synthetic)} synthetic samples; the audit needs at least {MIN_SAMPLES}")
    extractor_records, holdout = (split_for_extractor(inputs.holdout, n_min=n_min, seed=seed) if features
                                  else (None, inputs.holdout))
    white, canary_scores, canary_included = None, None, None
    if inputs.model is not None and not isinstance(inputs.model, DPSGDTrainable):
        # a release family (mmd) has no per-example training loss: the white-box statistic
        # and the canary scores are undefined, the black-box tests still run
        log.info("%s has no per-example loss: no white-box scores", type(inputs.model).__name__)
    elif inputs.model is not None:
        _check_model_fits(inputs.model, ("train", inputs.train), ("holdout", holdout))
        white = white_box_scores(inputs.model, inputs.train, holdout, seed=seed)
        if inputs.canaries is not None:
            c = inputs.canaries
            y = None if c.y is None or not inputs.model.conditional else torch.from_numpy(c.y)
            canary_scores = -per_example_loss(inputs.model, torch.from_numpy(c.x), y, seed=seed)
            canary_included = c.included
    try:
        result = run_audit(
            inputs.synthetic, inputs.train.x.numpy(), holdout.x.numpy(), white_box_scores=white,
            canary_scores=canary_scores, canary_included=canary_included,
            claimed_epsilon=inputs.claimed_epsilon, delta=inputs.delta,
            features_fn=None if extractor_records is None else _features_fn(extractor_records, seed),
            seed=seed, settings=settings)
    except ValueError as err:  # privacy.audit validates its arrays (NaN, sizes): the user's inputs
        raise AuditError(str(err)) from None
    if inputs.white_box_dir is not None:
        found = dirac.audit_state_dir(inputs.white_box_dir, claimed_epsilon=inputs.white_box_claim,
                                      delta=inputs.delta, confidence=settings.confidence)
        if found is None:
            raise AuditError(f"{inputs.white_box_dir}: no {dirac.FILE_NAME} or recorded updates; the white-box "
                             "audit site trained no round")
        result["white_box_canaries"], verdict = found
        result["verdicts"].append(verdict)
        result["accounting_violation"] = result["accounting_violation"] or verdict["level"] == "violation"
    result["source"] = {**inputs.source,
                        "feature_extractor": None if extractor_records is None else
                        {"fit_on": f"{len(extractor_records)} random held-out records, left out of the audit",
                         "holdout_records_audited": len(holdout)},
                        "white_box_statistic": None if white is None else
                        f"{white.name} of the model's first private step; lower = more likely member",
                        "canaries": None if inputs.canaries is None else
                        {"m": len(inputs.canaries.included), "site": inputs.canaries.site,
                         "seed": inputs.canaries.seed, "kind": inputs.canaries.kind,
                         "n_included": int(inputs.canaries.included.sum())}}
    return result


def write_audit(out_dir: Path, audit: dict[str, Any], html: str) -> tuple[Path, Path]:
    """Write ``audit.json`` and ``audit.html`` into ``out_dir``, each atomically: a reader
    never sees half a file."""
    out_dir = Path(out_dir)
    for name, text in ((AUDIT_JSON, to_json(audit)), (AUDIT_HTML, html)):
        atomic_write_text(out_dir / name, text)
    return out_dir / AUDIT_JSON, out_dir / AUDIT_HTML


def summary_lines(audit: dict[str, Any]) -> list[str]:
    """The 2-4 line verdict summary printed by ``fedgen audit``."""
    mem = audit["spaces"]["data"]["memorization"]
    dcr, copies = mem["dcr"], mem["near_copies"]
    attacks = {**{f"{m['attack']} [{space}]": m for space, r in audit["spaces"].items()
                  for m in r["membership"].values()},
               **{m["attack"]: m for m in (audit.get("white_box") or {}).values()}}
    best_name, best = max(attacks.items(), key=lambda kv: kv[1]["auc"]["value"])
    levels = [v["level"] for v in audit["verdicts"]]
    lines = [
        f"memorisation: {100 * dcr['share_closer_to_train']['value']:.1f} % of samples closer to training than "
        f"to held-out (p = {dcr['p_value']['value']:.2g}; 50 % = no memorisation), "
        f"{copies['n_flagged']['value']} near-copies",
        f"membership inference: highest AUC {best['auc']['value']:.3f} "
        f"(CI {best['auc']['ci'][0]:.3f}-{best['auc']['ci'][1]:.3f}) by {best_name}",
    ]
    if audit.get("white_box_canaries"):
        wb = audit["white_box_canaries"]
        lines.append(f"white-box canaries: epsilon lower bound {wb['epsilon_lower_bound']['value']:.3g} "
                     f"(at most {wb['max_attainable_bound']:.3g} attainable) vs claimed "
                     + ("none (no DP)" if wb["claimed_epsilon"] is None else f"{wb['claimed_epsilon']:.3g}"))
    if audit.get("canaries"):
        bound = audit["canaries"]["epsilon_lower_bound"]["value"]
        claim = audit.get("claimed_epsilon")
        lines.append(f"canaries: empirical epsilon lower bound {bound:.3g} vs claimed "
                     + ("none (no DP)" if claim is None else f"{claim:.3g}")
                     + (" -- VIOLATION: privacy accounting or implementation broken" if audit["accounting_violation"]
                        else ""))
    lines.append(f"verdicts: {levels.count('violation')} violation(s), {levels.count('warning')} warning(s), "
                 f"{levels.count('ok')} ok, {levels.count('inconclusive')} inconclusive "
                 f"(+ {levels.count('info')} descriptions)")
    return lines


# -- the command ------------------------------------------------------------------------

def cmd_audit(args: argparse.Namespace) -> int:
    """``fedgen audit``: see :func:`add_audit_parser`."""
    if (args.run_dir is None) == (args.samples is None):
        raise AuditError("give either RUN_DIR or --samples S.npz --train T --holdout H")
    if args.run_dir is not None:
        if args.train or args.holdout or args.model:
            raise AuditError("--train/--holdout/--model go with --samples; RUN_DIR supplies its own")
        n = DEFAULT_SAMPLES if args.n is None else args.n
        if n < MIN_SAMPLES:
            raise AuditError(f"-n must be at least {MIN_SAMPLES}, got {n}")
        inputs = run_dir_inputs(Path(args.run_dir), n_samples=n, seed=args.seed)
        out = Path(args.out) if args.out else Path(args.run_dir) / "audit"
    else:
        if not (args.train and args.holdout):
            raise AuditError("--samples needs --train T and --holdout H")
        if args.n is not None:
            raise AuditError("-n draws samples from a run's model; with --samples the file gives them")
        inputs = file_inputs(Path(args.samples), Path(args.train), Path(args.holdout),
                             model=Path(args.model) if args.model else None, fmt=args.format)
        out = Path(args.out) if args.out else Path("audit")
    result = audit_inputs(inputs, seed=args.seed)
    html = render_html(result, synthetic=inputs.synthetic, train=inputs.train.x.numpy())
    json_path, html_path = write_audit(out, result, html)
    for line in summary_lines(result):
        print(line)
    print(f"wrote {json_path} and {html_path} (the report shows training records: keep it at the site)")
    return 0


def add_audit_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    """Register ``fedgen audit`` on the CLI's sub-command parsers."""
    p = subparsers.add_parser(
        "audit", help="privacy audit of generated data: memorisation, membership inference, canaries",
        description="Audit RUN_DIR's final model (members: the sites' training data, non-members: the held-out "
                    "split), or any samples against local records with --samples/--train/--holdout. Writes "
                    "audit.json and audit.html (which shows training records: keep it at the site). "
                    "See docs/audit.md.")
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a run directory from `fedgen simulate`")
    p.add_argument("--samples", metavar="S.npz", help="generated samples (x, in the data's shape and range)")
    p.add_argument("--train", metavar="T", help="the records the generator was trained on (members)")
    p.add_argument("--holdout", metavar="H", help=f"records it never saw (non-members; at least "
                                                  f"{min_holdout(AuditSettings())})")
    p.add_argument("--model", metavar="RUN_DIR_OR_CKPT", help="the generator, for the white-box attack")
    p.add_argument("--format", choices=["npz", "mnist"], default="npz", help="format of T and H (default npz)")
    p.add_argument("-n", type=int, default=None, metavar="N_SAMPLES",
                   help=f"samples drawn from RUN_DIR's model (default {DEFAULT_SAMPLES})")
    p.add_argument("--out", metavar="DIR", help="output folder (default RUN_DIR/audit, or ./audit)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling, splits and bootstrap")
    p.set_defaults(func=cmd_audit)
    return p
