"""The server's warm start before round 1 (docs/models.md, "Warm starts").

``warm_start.public``: the server pretrains the global model on the set the scenario
declared public -- exactly the arrays the harness wrote to ``inputs/public.npz``
(:func:`public_inputs`), never anything of the sites'. It is charged nothing: the sites'
ledgers and their epsilon are those of a run without it, and the guarantee covers the
sites' private data only (``summary.json`` and the report say so, from ``warm_start.json``).

``warm_start.release``: the model is a release-then-DP-SGD hybrid
(shared_models/warm_start.py, :class:`~fedgen.shared_models.warm_start.ReleaseWarmStart`);
its pretraining runs in :meth:`server_update` after the release round, on samples of the
generator fitted to the sites' combined release (post-processing). This module records it.

Both, when the release's generator has perceptual features
(``warm_start.release.generator.perceptual_weight > 0``): before round 1 the public set
trains the release head's perceptual network only (the model's ``fit_public_features``),
recorded as ``kind: "public"``; after the release round the record becomes one of
``kind: "public+release"``: the release's fields at the top level, the public step's record
whole under ``public`` (and its set's name in ``public_data``), so neither is lost.

The training step itself is :func:`fedgen.shared_models.warm_start.pretrain`: shared_models
is below both server/ and client/ (docs/architecture.md §1), and it runs the family's own
steps, so one mechanism serves every DP-SGD family.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedgen.contract import rundir
from fedgen.contract.scenario import Scenario
from fedgen.privacy.ledger import atomic_write_text
from fedgen.shared_models import GenerativeModel
from fedgen.shared_models.warm_start import pretrain

from .evaluate import GlobalEvaluator

log = logging.getLogger(__name__)

PUBLIC_GUARANTEE = ("the DP guarantee covers the sites' private data only; the public set was used without "
                    "privacy protection and charged nothing")
RELEASE_GUARANTEE = ("pretrained on samples of a generator fitted to the sites' DP release, and handed the family's "
                     "own statistic from the same release where it has one (both post-processing); "
                     "the release and the DP-SGD fine-tuning are both charged in privacy.json")


def public_inputs(run_dir: Path) -> tuple[np.ndarray, np.ndarray | None, str]:
    """What a public warm start trains on: ``(x, y, name)`` of ``inputs/public.npz``."""
    public = rundir.read_public(run_dir)
    if public is None:
        raise FileNotFoundError(f"{Path(run_dir) / rundir.PUBLIC}: the scenario declares warm_start.public but "
                                "the run directory has no public set; prepare the run again")
    return public["x"], public.get("y"), str(public.get("name", "public"))


def public_warm_start(model: GenerativeModel, run_dir: Path, scenario: Scenario,
                      evaluator: GlobalEvaluator | None = None) -> dict[str, Any] | None:
    """Pretrain ``model`` in place on the run's declared-public set (before round 1) and
    write ``warm_start.json``; its record, or ``None`` when the scenario has no public warm start.
    With ``evaluator`` and ``evaluation.tstr``, the record's ``public_only`` is what the public
    set gives alone (:meth:`GlobalEvaluator.public_only`), read beside the run's TSTR."""
    ws = scenario.warm_start
    if ws is None or ws.public is None:
        return None
    x, y, name = public_inputs(run_dir)
    xt, yt = torch.from_numpy(x), None if y is None else torch.from_numpy(y)
    # mmd's perceptual features (DP-MEPF), or a release head's (ReleaseWarmStart), else the family itself
    fit = getattr(model, "fit_public_features", None)
    info = (fit(xt, yt, steps=ws.steps, batch_size=ws.batch_size, lr=ws.lr, seed=scenario.seed) if fit is not None
            else pretrain(model, xt, yt, steps=ws.steps, batch_size=ws.batch_size, lr=ws.lr,  # type: ignore[arg-type]
                          seed=scenario.seed))
    trained = ("the model" if fit is None else "the perceptual feature network of the release's generator"
               if ws.release is not None else "the perceptual feature network of the mmd release")
    record = {"kind": "public", "public_data": name, "trained": trained, "examples": int(x.shape[0]),
              "steps": ws.steps, "loss": info["pretrain_loss"], "seconds": info["pretrain_seconds"],
              "epsilon_charged": 0.0, "guarantee": PUBLIC_GUARANTEE}
    if evaluator is not None and scenario.evaluation.tstr and model.conditional:  # a run with a TSTR to read
        baseline = evaluator.public_only(x, y, num_samples=scenario.evaluation.num_samples)
        if baseline is not None:
            record["public_only"] = baseline
    write_record(run_dir, record)
    log.info("warm start: trained %s on %s (%d examples, %d steps, %.1f s), charged nothing",
             trained, name, record["examples"], ws.steps, record["seconds"])
    return record


def release_record(scenario: Scenario, info: dict[str, float], public: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """``warm_start.json`` for a release warm start, from the model's ``server_update`` info.
    ``public``: the record :func:`public_warm_start` wrote before round 1 (what
    :func:`read_record` finds), kept whole in a ``kind: "public+release"`` record when the
    scenario has both (the public set trained the release generator's perceptual network)."""
    ws = scenario.warm_start
    assert ws is not None and ws.release is not None
    record: dict[str, Any] = {
        "kind": "release", "public_data": None, "epsilon_fraction": ws.release.epsilon_fraction,
        "epsilon": ws.release.epsilon_fraction * scenario.privacy.target_epsilon,
        "examples": int(info.get("pretrain_examples", 0)), "steps": ws.steps,
        "loss": info.get("pretrain_loss"), "seconds": info.get("pretrain_seconds"), "guarantee": RELEASE_GUARANTEE}
    if ws.public is not None and public is not None and public.get("kind") == "public":
        record.update(kind="public+release", public_data=public["public_data"], public=public,
                      **({"public_only": public["public_only"]} if "public_only" in public else {}),
                      guarantee=f"{RELEASE_GUARANTEE}; {public['trained']} was trained on the public set "
                                f"{public['public_data']}: {PUBLIC_GUARANTEE}")
    if ws.release.screen_samples:
        record["samples_screened"] = (
            "the model's samples are screened by the release generator's public classifier (a sample it does not "
            f"recognise as its class at probability {ws.release.generator.get('public_filter')} is drawn again): "
            "post-processing, charged nothing")
    return record


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    atomic_write_text(Path(run_dir) / rundir.WARM_START, json.dumps(record, indent=2))


def read_record(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / rundir.WARM_START
    return json.loads(path.read_text()) if path.exists() else None
