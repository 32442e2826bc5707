"""``fedgen audit``: read files, call :func:`privacy.audit.run_audit`, write ``audit.json``
and ``audit.html`` (issue 6; what the numbers mean: ``docs/audit.md``).

Two modes:

* ``fedgen audit RUN_DIR`` audits a simulation run: *members* are the union of the sites'
  training examples (``inputs/partitions.npz`` over the run's dataset; planted canaries
  are scored separately and never counted as members), *non-members* the held-out split,
  *synthetic* data ``-n`` samples of the final global model (class-balanced when it is
  conditional). The white-box statistic, the claimed epsilon (``privacy.json``) and the
  canaries (``inputs/canaries.npz``) come from the run. ``--shadows K`` adds LiRA with K
  shadow federations of the run's scenario (simulations/audit_shadows.py); a white-box
  audit run's bound reads the updates (or raw releases) the server kept when it kept them.
* ``fedgen audit --samples S.npz --train T --holdout H [--model CKPT]`` audits any
  generated data against any records, e.g. at a site against the global model: every
  input is local, nothing leaves the machine. At a deployed site ``--node-config`` (the
  SuperNode's own) replaces ``--train``: the site's ``data-path`` is read through the
  SuperNode's reader (``client.site.load_site_data``: CSV with its scaling, image
  folders, ...) and so are ``--holdout`` and a non-npz ``--samples``; ``--ledger`` /
  ``--state-dir`` give the site's claimed epsilon (docs/audit.md "Auditing at a site").

Verdicts only where the sample sizes support them (:func:`settle_verdicts`): a
membership verdict on fewer than ``MIN_MEMBERSHIP_CANDIDATES`` candidates per side, a
memorisation verdict whose share test decided nothing (training and held-out data
alike), and any verdict whose level changes under the reference seeds
``0..check_seeds-1`` are ``inconclusive``, with the reason.

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
from fedgen.client.data_binding import DataFingerprint, read_fingerprint
from fedgen.client.errors import DataError
from fedgen.client.site import LEDGER_FILE, load_site_data
from fedgen.contract import rundir
from fedgen.contract.rundir import Canaries, read_canaries
from fedgen.contract.scenario import Scenario, scenario_from_dict
from fedgen.contract.task import build_global_model
from fedgen.privacy.audit import (AuditSettings, WhiteBoxScores, dirac, release_canaries, render_html, run_audit,
                                  to_json)
from fedgen.privacy.ledger import RoundSpend, SiteLedger, atomic_write_text, charged
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
    members_epsilon: float | None = None  # the claim that covers every member (default: claimed_epsilon)
    source: dict[str, Any] = field(default_factory=dict)  # recorded in audit.json
    white_box_dir: Path | None = None  # a white-box audit run's site state (privacy/audit/dirac.py)
    white_box_claim: float | None = None  # that site's epsilon
    white_box_received: Path | None = None  # the server's copy of that site's updates, if it kept one
    white_box_gaussian: bool = False  # that site's DP-SGD ran at sample rate 1: exactly Gaussian (dirac)


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
                 canaries: Canaries | None) -> tuple[float | None, float | None, str, float | None]:
    """(claimed epsilon, delta, where the claim comes from, the claim that covers every
    member). With canaries the claim is the canary site's own epsilon (<= the run's max
    over sites): the tighter comparison. A membership attack tests the sites' records
    together, so under several sites' claims it tests the largest (the max over sites)."""
    if not scenario.privacy.enabled:
        return None, scenario.privacy.delta, "no DP in this run: nothing claimed", None
    path = run_dir / rundir.PRIVACY
    if not path.exists():
        raise AuditError(f"{run_dir}: DP was on but {rundir.PRIVACY} is missing; the run finished no round")
    try:
        ledger = json.loads(path.read_text())
        site = ledger.get("sites", {}).get(str(canaries.site)) if canaries is not None else None
        epsilon = None if ledger.get("epsilon") is None else float(ledger["epsilon"])
        if site is not None:
            claimed = float(site["epsilon"])
            return (claimed, float(ledger["delta"]), f"privacy.json sites.{canaries.site}.epsilon",
                    claimed if epsilon is None else max(claimed, epsilon))
        return epsilon, float(ledger["delta"]), "privacy.json epsilon (max over sites)", epsilon
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
    claimed, delta, claim_source, members_epsilon = _run_privacy(run_dir, scenario, canaries)  # before the slow part
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
        members_epsilon=members_epsilon,
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
        entry = json.loads((run_dir / rundir.PRIVACY).read_text())["sites"][site]
        claim = entry["epsilon"]
        history = [RoundSpend(**h) for h in entry.get("history", [])]
    except (OSError, ValueError, KeyError, TypeError):
        raise AuditError(f"{run_dir}: privacy.white_box site {site} has no epsilon in {rundir.PRIVACY}; "
                         "the white-box audit run finished no round at that site") from None
    return {"white_box_dir": run_dir / "sites" / site, "white_box_claim": float(claim),
            "white_box_received": run_dir / dirac.RECEIVED_DIR / site,
            "white_box_gaussian": dirac.gaussian_composition(history)}


#: file suffix -> format, for --train/--holdout given without --format or --node-config
_SUFFIX_FORMATS = {".npz": "npz", ".csv": "csv", ".gz": "mnist"}


def guess_format(path: Path) -> str:
    """The reader for ``path`` when no ``--format`` is given: by suffix (``.npz``, ``.csv``),
    a folder of IDX files is ``mnist``, any other folder ``images``."""
    path = Path(path)
    if path.is_dir():
        return "mnist" if any("idx" in p.name for p in path.iterdir() if p.is_file()) else "images"
    return _SUFFIX_FORMATS.get(path.suffix.lower(), "mnist" if "idx" in path.name else "npz")


def parse_node_config(text: str) -> dict[str, Any]:
    """A SuperNode's ``--node-config`` string (``key=value`` pairs, values as TOML:
    ``data-path="/data/a.csv" feature-min=0``), parsed the way Flower parses it."""
    from flwr.common.config import parse_config_args

    try:
        config = dict(parse_config_args([text]))
    except Exception as err:  # noqa: BLE001 -- Flower raises ValueError or a TOML error
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AuditError(f"--node-config {text!r}: not key=value pairs as flower-supernode takes them ({first}); "
                         "e.g. --node-config 'data-path=\"site.csv\" label-column=\"target\"'") from None
    if not str(config.get("data-path", "")).strip():
        raise AuditError("--node-config has no data-path: give the SuperNode's node config, whose data-path is "
                         "the site's training data")
    return config


def _site_reader(node_config: dict[str, Any], path: Path) -> SiteData:
    """``path`` read exactly as the SuperNode reads its ``data-path`` (client.site)."""
    from flwr.app import Context, RecordDict

    config = {**node_config, "data-path": str(path)}
    context = Context(run_id=0, node_id=0, node_config=config, state=RecordDict(), run_config={})
    return load_site_data(context, conditional=True)


def _read_records(path: Path, *, what: str, fmt: str | None, node_config: dict[str, Any] | None) -> SiteData:
    """Training / held-out records: through the site's reader with ``node_config``, else
    with ``fmt`` (by default guessed from the file name)."""
    path = Path(path)
    if node_config is not None:
        return _site_reader(node_config if fmt is None else {**node_config, "data-format": fmt}, path)
    fmt = fmt or guess_format(path)
    if fmt == "npz" and path.suffix.lower() == ".csv":
        raise AuditError(f"{what} {path}: a CSV file read as npz; give --format csv, or the site's reader "
                         "options with --node-config 'data-path=\"T.csv\" label-column=... feature-min=... "
                         "feature-max=...'")
    try:
        return load_data(fmt, path)
    except DataError as err:
        if fmt != "csv":
            raise
        raise AuditError(f"{what}: {err}; a CSV needs the site's reader options: --node-config "
                         "'data-path=\"T.csv\" label-column=... feature-min=... feature-max=...'") from None


def _read_samples(path: Path, *, node_config: dict[str, Any] | None) -> SiteData:
    """Generated samples: ``.npz`` as it is, anything else (``fedgen sample --out s.csv``,
    in the data's original units) through the site's reader, so they are scaled like
    its records; a sample file without the label column is read unlabelled."""
    path = Path(path)
    if node_config is None or path.suffix.lower() == ".npz":
        if path.suffix.lower() == ".csv":
            raise AuditError(f"--samples {path}: CSV samples are read with the site's reader options: add "
                             "--node-config 'data-path=\"T.csv\" label-column=... feature-min=... feature-max=...'")
        return load_data("npz", path)
    try:
        return _site_reader(node_config, path)
    except DataError as err:
        if "label column" not in str(err) or "label-column" not in node_config:
            raise
        return _site_reader({k: v for k, v in node_config.items() if k != "label-column"}, path)


def site_claim(ledger_path: Path, site: str | None) -> tuple[float, float, str, str]:
    """(claimed epsilon, delta, where it comes from, site) from a site's ``ledger.json``
    (its state-dir) or a run's ``privacy.json`` (then ``site`` picks the entry). The site
    ledger's epsilon composes every round its data was ever trained on, across runs: the
    claim that covers the records audited here."""
    ledger_path = Path(ledger_path)
    if not ledger_path.is_file():
        raise AuditError(f"--ledger {ledger_path}: file not found; give the site's state-dir/{LEDGER_FILE} "
                         "(written by its SuperNode's first DP round) or the run's privacy.json")
    try:
        data = json.loads(ledger_path.read_text())
        if "sites" in data:  # a run's privacy.json: one entry per site
            if site is None:
                raise AuditError(f"--ledger {ledger_path} is a run's privacy.json with sites "
                                 f"{', '.join(data['sites']) or 'none'}: name one with --site ID")
            if site not in data["sites"]:
                raise AuditError(f"--ledger {ledger_path}: no site {site!r} (sites: "
                                 f"{', '.join(data['sites']) or 'none'})")
            entry = data["sites"][site]
            return (float(entry["epsilon"]), float(data["delta"]), f"{ledger_path} sites.{site}.epsilon "
                    "(this run only)", site)
        ledger = SiteLedger.from_dict(data)
    except AuditError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise AuditError(f"--ledger {ledger_path}: not a site ledger or privacy.json ({type(err).__name__}: "
                         f"{err})") from None
    if site is not None and ledger.site != site:
        raise AuditError(f"--ledger {ledger_path} is site {ledger.site!r}'s ledger, not {site!r}'s; give "
                         "the ledger in this site's state-dir")
    if not ledger.history:
        raise AuditError(f"--ledger {ledger_path}: no DP round recorded yet, so nothing is claimed")
    # (run, round) pairs that count: an aborted secure-aggregation round and resolution entries do not
    charged_rounds = {(h.run, h.round) for h in charged(ledger.history) if h.steps > 0}
    return (ledger.epsilon, ledger.delta, f"{ledger_path} epsilon (site {ledger.site}, composed over "
            f"{len(charged_rounds)} rounds of {len({run for run, _ in charged_rounds})} run(s))", ledger.site)


def file_inputs(samples: Path, train: Path | None, holdout: Path, *, model: Path | None = None,
                fmt: str | None = None, node_config: dict[str, Any] | None = None,
                ledger: Path | None = None, state_dir: Path | None = None,
                site: str | None = None) -> AuditInputs:
    """The inputs of ``fedgen audit --samples S (--train T | --node-config C) --holdout H
    [--model CKPT] [--ledger L | --state-dir D] [--site ID]``."""
    if train is None and node_config is None:
        raise AuditError("--samples needs --train T or the site's --node-config (its data-path)")
    if train is not None and node_config is not None:
        raise AuditError("--node-config names the training data (data-path): drop --train")
    if node_config is not None:
        site = site if site is not None else (None if "site-id" not in node_config else str(node_config["site-id"]))
        if ledger is None and state_dir is None and node_config.get("state-dir"):
            state_dir = Path(str(node_config["state-dir"]))
        train = Path(str(node_config["data-path"]))
    if ledger is not None and state_dir is not None:
        raise AuditError("give --ledger or --state-dir, not both")
    if state_dir is not None:
        ledger = Path(state_dir) / LEDGER_FILE
    synthetic = _read_samples(Path(samples), node_config=node_config)
    train_data = _read_records(Path(train), what="--train", fmt=fmt, node_config=node_config)
    holdout_data = _read_records(Path(holdout), what="--holdout", fmt=fmt, node_config=node_config)
    for name, data in (("--train", train_data), ("--holdout", holdout_data)):
        if data.shape != synthetic.shape:
            raise AuditError(f"{name} {data.source}: records have shape {data.shape} but the samples "
                             f"{samples} have {synthetic.shape}; audit data of one shape")
    fingerprint = None
    if state_dir is not None:
        bound = read_fingerprint(state_dir)
        if bound is not None and not bound.same_data(DataFingerprint.of(train_data)):
            raise AuditError(f"the training data {train_data.source} is not the data state-dir {state_dir} is "
                             f"bound to ({bound.describe()}): audit the data-path (and reader options) the "
                             "SuperNode trained on")
        fingerprint = None if bound is None else "training data matches the state-dir's data_fingerprint.json"
    claimed, delta, claim_source = None, None, "none given (--ledger or --state-dir)"
    if ledger is not None:
        claimed, delta, claim_source, site = site_claim(Path(ledger), site)
    net = None
    if model is not None:
        labels = [d.y for d in (train_data, holdout_data) if d.y is not None]
        num_classes = int(max(int(y.max()) for y in labels)) + 1 if labels else None
        net = load_checkpoint_model(model, data_shape=synthetic.shape, num_classes=num_classes)
    return AuditInputs(
        synthetic=synthetic.x.numpy(), train=train_data, holdout=holdout_data, model=net,
        claimed_epsilon=claimed, delta=delta,
        source={"mode": "site" if node_config is not None else "files", "samples": str(samples),
                "train": str(train), "holdout": str(holdout),
                "format": "node-config" if node_config is not None and fmt is None else fmt or guess_format(train),
                "node_config_keys": None if node_config is None else sorted(node_config),
                "site": site, "model": None if model is None else str(model),
                "claimed_epsilon_source": claim_source, "data_fingerprint": fingerprint})


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


#: Fewest member and non-member candidates (each) for a membership verdict: with fewer,
#: the AUC's bootstrap interval is wide enough (about +-0.1 at 50 per side) that whether it
#: clears 0.5 depends on the random split (issue 23: verdicts flipped with --seed at 100
#: held-out records, i.e. 50 candidates per side).
MIN_MEMBERSHIP_CANDIDATES = 100
#: Reference seeds a verdict must hold under (besides --seed) to be ok or warning.
DEFAULT_CHECK_SEEDS = 3
INCONCLUSIVE = "inconclusive"
_DECIDED = ("ok", "warning")


def _inconclusive(verdict: dict[str, Any], reason: str) -> None:
    verdict.update(level=INCONCLUSIVE, text=f"Inconclusive: {reason}. The test read: {verdict['text']}",
                   reason=reason)


def _size_gate(audit: dict[str, Any]) -> None:
    """An "ok" membership verdict on too few candidates becomes inconclusive (in place):
    the tests are calibrated at any size (privacy/audit/membership.py: pre-declared,
    Bonferroni), so a warning on few candidates is evidence, but an ok there only says the
    test had no power. The distance-to-closest-record tests need no gate: they are
    descriptions (``info``)."""
    n_members = audit["settings"]["n_member_candidates"]
    n_nonmembers = audit["settings"]["n_nonmember_candidates"]
    for v in audit["verdicts"]:
        if v["level"] == "ok" and v["topic"].startswith("membership/") \
                and min(n_members, n_nonmembers) < MIN_MEMBERSHIP_CANDIDATES:
            _inconclusive(v, f"{n_members} member and {n_nonmembers} non-member candidates; an ok membership "
                             f"verdict needs at least {MIN_MEMBERSHIP_CANDIDATES} of each (half the audited held-out "
                             f"records are non-member candidates: give at least {2 * MIN_MEMBERSHIP_CANDIDATES} "
                             "held-out records, more when a feature space is fit on a quarter of them)")


def settle_verdicts(audit: dict[str, Any], checks: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """``audit``'s verdicts, each kept ok / warning only if the sample sizes support it
    (:func:`_size_gate`) and it has the same level in every audit of ``checks`` (the same
    inputs under the reference seeds); otherwise inconclusive, with the levels seen. As
    every ``--seed`` is checked against the same reference seeds, two seeds can differ
    only by one of them being inconclusive, never ok against warning."""
    for result in (audit, *checks.values()):
        _size_gate(result)
    for i, v in enumerate(audit["verdicts"]):
        if v["level"] not in _DECIDED:
            continue
        levels = {seed: r["verdicts"][i]["level"] for seed, r in checks.items()
                  if i < len(r["verdicts"]) and r["verdicts"][i]["topic"] == v["topic"]}
        if any(level != v["level"] for level in levels.values()):
            by_level = {lvl: [s for s, l_ in levels.items() if l_ == lvl] for lvl in sorted(set(levels.values()))}
            seen = "; ".join(f"{lvl} under seed(s) {', '.join(map(str, seeds))}" for lvl, seeds in by_level.items())
            _inconclusive(v, f"the verdict depends on the random split ({v['level']} under this seed, {seen}); "
                             "more held-out records would settle it")
    audit["settings"]["verdict_check_seeds"] = sorted(checks)
    audit["settings"]["min_membership_candidates"] = MIN_MEMBERSHIP_CANDIDATES
    audit["accounting_violation"] = any(v["level"] == "violation" for v in audit["verdicts"])
    return audit


def audit_inputs(inputs: AuditInputs, *, seed: int = 0, settings: AuditSettings | None = None,
                 features: bool = True, check_seeds: int = DEFAULT_CHECK_SEEDS) -> dict[str, Any]:
    """Check ``inputs`` and run every applicable audit; the ``audit.json`` dict, its
    verdicts settled (:func:`settle_verdicts`) against the same audit under seeds
    ``0..check_seeds-1`` (``check_seeds=0``: sample-size rules only)."""
    settings = settings or AuditSettings()
    stats = _statistics(inputs, seed=seed, settings=settings, features=features)  # once: the costly part
    audit = _audit_with(inputs, stats, seed=seed, settings=settings)
    checks = {s: _audit_with(inputs, stats, seed=s, settings=settings) for s in range(check_seeds) if s != seed}
    if 0 < check_seeds and seed < check_seeds:
        checks[seed] = audit
    return settle_verdicts(audit, checks)


#: Seed of what defines the statistics (the feature extractor's split and fit, the
#: white-box loss draws): fixed, so every --seed and every reference seed of
#: :func:`settle_verdicts` tests the same statistics, and only the tests' own randomness
#: (candidate split, size-matched subsample, bootstrap) varies with the seed.
STATISTIC_SEED = 0


@dataclass
class _Statistics:
    """What one audit computes before its seeded tests; shared by the reference seeds."""

    holdout: SiteData  # the held-out records the audit compares (the extractor's share removed)
    extractor_records: SiteData | None
    features_fn: Callable[[np.ndarray], np.ndarray] | None
    white: WhiteBoxScores | None = None
    canary_scores: np.ndarray | None = None
    canary_included: np.ndarray | None = None


def _statistics(inputs: AuditInputs, *, seed: int, settings: AuditSettings, features: bool) -> _Statistics:
    n_min = min_holdout(settings)
    if len(inputs.holdout) < n_min:
        raise AuditError(f"holdout {inputs.holdout.source}: {len(inputs.holdout)} records; the audit needs at "
                         f"least {n_min} (the near-copy threshold is their {settings.near_copy_quantile:.0%} "
                         "quantile of distances to training; half are non-member candidates, half reference)")
    if len(inputs.synthetic) < MIN_SAMPLES:
        raise AuditError(f"{len(inputs.synthetic)} synthetic samples; the audit needs at least {MIN_SAMPLES}")
    extractor_records, holdout = (split_for_extractor(inputs.holdout, n_min=n_min, seed=STATISTIC_SEED)
                                  if features else (None, inputs.holdout))
    stats = _Statistics(holdout=holdout, extractor_records=extractor_records,
                        features_fn=None if extractor_records is None else
                        _features_fn(extractor_records, STATISTIC_SEED))
    if inputs.model is not None and not isinstance(inputs.model, DPSGDTrainable):
        # a release family (mmd) has no per-example training loss: the white-box statistic
        # and the canary scores are undefined, the black-box tests still run
        log.info("%s has no per-example loss: no white-box scores", type(inputs.model).__name__)
    elif inputs.model is not None:
        _check_model_fits(inputs.model, ("train", inputs.train), ("holdout", holdout))
        stats.white = white_box_scores(inputs.model, inputs.train, holdout, seed=STATISTIC_SEED)
        if inputs.canaries is not None:
            c = inputs.canaries
            y = None if c.y is None or not inputs.model.conditional else torch.from_numpy(c.y)
            stats.canary_scores = -per_example_loss(inputs.model, torch.from_numpy(c.x), y, seed=seed)
            stats.canary_included = c.included
    return stats


def _audit_with(inputs: AuditInputs, stats: _Statistics, *, seed: int, settings: AuditSettings) -> dict[str, Any]:
    """The seeded tests on precomputed statistics: the ``audit.json`` dict, verdicts unsettled."""
    holdout, white, extractor_records = stats.holdout, stats.white, stats.extractor_records
    try:
        result = run_audit(
            inputs.synthetic, inputs.train.x.numpy(), holdout.x.numpy(), white_box_scores=white,
            canary_scores=stats.canary_scores, canary_included=stats.canary_included,
            claimed_epsilon=inputs.claimed_epsilon, delta=inputs.delta, features_fn=stats.features_fn,
            seed=seed, settings=settings, members_epsilon=inputs.members_epsilon,
            white_box_canaries=inputs.white_box_dir is not None and inputs.white_box_claim is not None)
    except ValueError as err:  # privacy.audit validates its arrays (NaN, sizes): the user's inputs
        raise AuditError(str(err)) from None
    if inputs.white_box_dir is not None:
        # under a claim its share of the violation level (run_audit: report.violation_levels)
        share = result["settings"]["violation_levels"].get("white_box_canaries")
        confidence = settings.confidence if share is None else 1 - share
        found = dirac.audit_state_dir(inputs.white_box_dir, claimed_epsilon=inputs.white_box_claim,
                                      delta=inputs.delta, confidence=confidence,
                                      received_dir=inputs.white_box_received,
                                      gaussian=inputs.white_box_gaussian)
        if found is None:  # a release family's audit run
            found = release_canaries.audit_site(inputs.white_box_dir, claimed_epsilon=inputs.white_box_claim,
                                                delta=inputs.delta, confidence=confidence,
                                                received_dir=inputs.white_box_received)
        if found is None:
            raise AuditError(f"{inputs.white_box_dir}: no {dirac.FILE_NAME} or recorded updates; the white-box "
                             "audit site trained no round")
        result["white_box_canaries"], verdict = found
        result["verdicts"].append(verdict)
        result["accounting_violation"] = result["accounting_violation"] or verdict["level"] == "violation"
    result["source"] = {**inputs.source,
                        "feature_extractor": None if extractor_records is None else
                        {"fit_on": f"{len(extractor_records)} random held-out records (seed {STATISTIC_SEED}), "
                                   "left out of the audit",
                         "holdout_records_audited": len(holdout)},
                        "white_box_statistic": None if white is None else
                        f"{white.name} of the model's first private step; lower = more likely member",
                        "canaries": None if inputs.canaries is None else
                        {"m": len(inputs.canaries.included), "site": inputs.canaries.site,
                         "seed": inputs.canaries.seed, "kind": inputs.canaries.kind,
                         "n_included": int(inputs.canaries.included.sum())}}
    return result


def _audit_once(inputs: AuditInputs, *, seed: int = 0, settings: AuditSettings | None = None,
                features: bool = True) -> dict[str, Any]:
    """One audit of ``inputs`` under ``seed``: the ``audit.json`` dict, verdicts unsettled."""
    settings = settings or AuditSettings()
    return _audit_with(inputs, _statistics(inputs, seed=seed, settings=settings, features=features),
                       seed=seed, settings=settings)


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
    share = dcr["share_closer_to_train"]["value"]
    lines = [
        ("memorisation: no sample is closer to training than to held-out or the reverse (every distance tied: "
         "are training and held-out the same records?)" if share is None else
         f"memorisation: {100 * share:.1f} % of samples closer to training than "
         f"to held-out (p = {dcr['p_value']['value']:.2g}; 50 % = no memorisation)")
        + f", {copies['n_flagged']['value']} near-copies",
        f"membership inference: highest AUC {best['auc']['value']:.3f} "
        f"(CI {best['auc']['ci'][0]:.3f}-{best['auc']['ci'][1]:.3f}) by {best_name}",
    ]
    if audit.get("lira"):
        lira = audit["lira"]
        lines.append(f"LiRA ({lira['shadows']} shadow federations): AUC {lira['auc']['value']:.3f}, TPR "
                     + " / ".join(f"{100 * t['value']:.1f} %" for t in lira["tpr_at_fpr"])
                     + " at " + " / ".join(f"{100 * t['fpr']:g} %" for t in lira["tpr_at_fpr"]) + " FPR")
    if audit.get("white_box_canaries"):
        wb = audit["white_box_canaries"]
        steinke = wb.get("steinke_epsilon_lower_bound", {}).get("value")
        lines.append(f"white-box canaries: epsilon lower bound {wb['epsilon_lower_bound']['value']:.3g} "
                     f"(at most {wb['max_attainable_bound']:.3g} attainable"
                     + ("" if steinke is None else f"; Steinke et al. {steinke:.3g}") + ") vs claimed "
                     + ("none (no DP)" if wb["claimed_epsilon"] is None else f"{wb['claimed_epsilon']:.3g}"))
    if audit.get("canaries"):
        bound = audit["canaries"]["epsilon_lower_bound"]["value"]
        claim = audit.get("claimed_epsilon")
        lines.append(f"canaries: empirical epsilon lower bound {bound:.3g} vs claimed "
                     + ("none (no DP)" if claim is None else f"{claim:.3g}")
                     + (" -- VIOLATION: privacy accounting or implementation broken" if audit["accounting_violation"]
                        else ""))
    if audit.get("claimed_epsilon") is not None and not audit.get("canaries"):
        lines.append(f"claimed epsilon {audit['claimed_epsilon']:.3g} at delta {audit['settings']['delta']:.2g} "
                     f"({(audit.get('source') or {}).get('claimed_epsilon_source', 'given')})")
    lines.append(f"verdicts: {levels.count('violation')} violation(s), {levels.count('warning')} warning(s), "
                 f"{levels.count('ok')} ok, {levels.count(INCONCLUSIVE)} inconclusive "
                 f"(+ {levels.count('info')} descriptions)")
    return lines


# -- the command ------------------------------------------------------------------------

def cmd_audit(args: argparse.Namespace) -> int:
    """``fedgen audit``: see :func:`add_audit_parser`."""
    if (args.run_dir is None) == (args.samples is None):
        raise AuditError("give either RUN_DIR or --samples S --holdout H with --train T or the site's --node-config")
    if args.check_seeds < 0:
        raise AuditError(f"--check-seeds must be 0 or more, got {args.check_seeds}")
    if args.run_dir is not None:
        site_args = [name for name, value in (("--train", args.train), ("--holdout", args.holdout),
                                              ("--model", args.model), ("--node-config", args.node_config),
                                              ("--ledger", args.ledger), ("--state-dir", args.state_dir),
                                              ("--site", args.site), ("--format", args.format)) if value]
        if site_args:
            raise AuditError(f"{', '.join(site_args)}: only with --samples (a site's audit); RUN_DIR supplies "
                             "its own data, model and claim")
        if args.shadows:
            from fedgen.privacy.audit.shadows import check_shadow_count

            try:
                check_shadow_count(args.shadows)  # before any slow part
            except ValueError as err:
                raise AuditError(str(err)) from None
        n = DEFAULT_SAMPLES if args.n is None else args.n
        if n < MIN_SAMPLES:
            raise AuditError(f"-n must be at least {MIN_SAMPLES}, got {n}")
        inputs = run_dir_inputs(Path(args.run_dir), n_samples=n, seed=args.seed)
        out = Path(args.out) if args.out else Path(args.run_dir) / "audit"
    else:
        if not args.holdout or not (args.train or args.node_config):
            raise AuditError("--samples needs --holdout H and the training data: --train T, or the site's "
                             "--node-config (its data-path)")
        if args.n is not None:
            raise AuditError("-n draws samples from a run's model; with --samples the file gives them")
        if args.shadows:
            raise AuditError("--shadows trains shadow federations of a run's scenario: only with RUN_DIR")
        inputs = file_inputs(Path(args.samples), Path(args.train) if args.train else None, Path(args.holdout),
                             model=Path(args.model) if args.model else None, fmt=args.format,
                             node_config=parse_node_config(args.node_config) if args.node_config else None,
                             ledger=Path(args.ledger) if args.ledger else None,
                             state_dir=Path(args.state_dir) if args.state_dir else None, site=args.site)
        out = Path(args.out) if args.out else Path("audit")
    # With LiRA the audit's membership tests share the membership family's level with it
    # (Bonferroni): half for run_audit's attacks, half for LiRA, so a leak-free run still warns
    # <= 5 % of the time, and under a DP claim the violation level stays sound.
    settings = AuditSettings(membership_share=0.5) if args.shadows else AuditSettings()
    result = audit_inputs(inputs, seed=args.seed, check_seeds=args.check_seeds, settings=settings)
    if args.shadows:
        from .audit_shadows import lira_run_dir

        claim = result["settings"]["members_epsilon"]
        result["lira"], verdict = lira_run_dir(
            Path(args.run_dir), args.shadows, seed=args.seed,
            level=result["settings"]["membership_family_level"] * (1 - settings.membership_share),
            claimed_epsilon=claim, delta=result["settings"]["delta"])
        result["verdicts"].append(verdict)
        result["accounting_violation"] = result["accounting_violation"] or verdict["level"] == "violation"
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
    p.add_argument("--samples", metavar="S", help="generated samples: .npz (x, in the data's shape and [0, 1] "
                                                  "range), or with --node-config a CSV in the data's units "
                                                  "(`fedgen sample --out s.csv`)")
    p.add_argument("--train", metavar="T", help="the records the generator was trained on (members)")
    p.add_argument("--holdout", metavar="H", help=f"records it never saw (non-members; at least "
                                                  f"{min_holdout(AuditSettings())})")
    p.add_argument("--model", metavar="RUN_DIR_OR_CKPT", help="the generator, for the white-box attack")
    p.add_argument("--format", choices=["csv", "images", "mnist", "npz"], default=None,
                   help="format of T and H (default: by file name: .npz, .csv; a folder of IDX files is mnist, "
                        "another folder images)")
    p.add_argument("--node-config", metavar="CONFIG",
                   help="at a deployed site, instead of --train: the SuperNode's --node-config "
                        "('data-path=\"site.csv\" label-column=\"y\" feature-min=0 feature-max=10 ...'); its "
                        "data-path is the training data, and it, --holdout and CSV samples are read with its "
                        "reader options (docs/audit.md \"Auditing at a site\")")
    p.add_argument("--ledger", metavar="LEDGER_JSON",
                   help="the site's state-dir/ledger.json (or the run's privacy.json with --site): the claimed "
                        "epsilon the report compares with")
    p.add_argument("--state-dir", metavar="DIR", help="the site's state-dir: its ledger.json, and a check that "
                                                      "the training data is the data it is bound to "
                                                      "(default: the node config's state-dir)")
    p.add_argument("--site", metavar="ID", help="the site whose claim to read (default: the node config's site-id)")
    p.add_argument("--check-seeds", type=int, default=DEFAULT_CHECK_SEEDS, metavar="K",
                   help="a verdict stays ok or warning only if the audit under seeds 0..K-1 agrees, else it is "
                        f"inconclusive (default {DEFAULT_CHECK_SEEDS}; 0: no check)")
    p.add_argument("-n", type=int, default=None, metavar="N_SAMPLES",
                   help=f"samples drawn from RUN_DIR's model (default {DEFAULT_SAMPLES})")
    p.add_argument("--shadows", type=int, default=0, metavar="K",
                   help="LiRA (RUN_DIR only): train K shadow federations of the run's scenario on random halves "
                        "of its training and held-out records, in parallel (2 <= K <= 16; default 0: no LiRA)")
    p.add_argument("--out", metavar="DIR", help="output folder (default RUN_DIR/audit, or ./audit)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling (RUN_DIR), the candidate split, the size-matched subsample and the "
                        "bootstrap; the feature space and the white-box losses use a fixed seed")
    p.set_defaults(func=cmd_audit)
    return p
