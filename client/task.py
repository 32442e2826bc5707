"""What a site does when the server asks it to train or evaluate (no Flower types in the
training itself: ``client/app.py`` only translates messages)."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any

import torch

from fedgen.contract.task import TaskConfig
from fedgen.privacy.skellam import DistributedRelease
from fedgen.shared_models import DPSGDTrainable, GenerativeModel

from .data import SiteData
from .training import RoundResult, new_site_ledger, private_parameters, run_local_round

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def round_seed(seed: int, site: str, server_round: int) -> int:
    """A per (run seed, site, round) seed, stable across processes."""
    return zlib.crc32(f"{seed}/{site}/{server_round}".encode())


def check_data_matches(task: TaskConfig, data: SiteData) -> None:
    from .errors import DataError

    if tuple(data.shape) != tuple(task.data_shape):
        raise DataError(f"{data.source}: examples have shape {data.shape}, the federation's model expects "
                        f"{tuple(task.data_shape)}")
    if task.num_classes is not None and data.y is not None and data.num_classes > task.num_classes:
        raise DataError(f"{data.source}: labels reach {data.num_classes - 1}, the model knows "
                        f"{task.num_classes} classes")


def train_site(task: TaskConfig, data: SiteData, state_dict: dict[str, torch.Tensor], *, site: str,
               server_round: int, ledger, run: str | None = None, state_dir: Path | None = None,
               distributed: DistributedRelease | None = None) -> tuple[GenerativeModel, RoundResult, Any]:
    """One round at one site: load the global weights, train, return the new ledger.
    In a white-box audit run at this site (``privacy.white_box``), its gradient canaries
    (or, in a release round, its release canaries) live in ``state_dir`` beside the ledger,
    with every update (release) the site sends."""
    check_data_matches(task, data)
    if task.privacy.enabled and ledger is None:
        ledger = new_site_ledger(site, task.privacy)
    model = task.build_model()
    model.load_state_dict(state_dict)
    device = resolve_device(task.device)
    white_box, params, before = None, [], None
    audited = (task.privacy.white_box_canaries and task.privacy.enabled and state_dir is not None
               and site == task.privacy.white_box_site)
    if audited and model.wants_release():  # a release round: canaries in the released sum
        from fedgen.privacy.audit import release_canaries

        buffer = getattr(model, model.release_buffer)
        white_box = release_canaries.load_or_plan(Path(state_dir) / release_canaries.FILE_NAME, buffer.numel(),
                                                  task.privacy.white_box_canaries)
    elif audited and isinstance(model, DPSGDTrainable):  # DP-SGD: gradient (Dirac) canaries
        from fedgen.privacy.audit import dirac

        params = private_parameters(model)
        white_box = dirac.load_or_plan(Path(state_dir) / dirac.FILE_NAME, sum(p.numel() for p in params),
                                       task.privacy.white_box_canaries)
        before = dirac.flat(params)
    result = run_local_round(model, data, training=task.training, privacy=task.privacy, ledger=ledger,
                             server_round=server_round, seed=round_seed(task.seed, site, server_round),
                             device=device, run=run, white_box=white_box, distributed=distributed)
    if white_box is not None and result.status == "trained" and params:
        dirac.record_update(Path(state_dir), server_round, dirac.flat(params) - before, [p.shape for p in params])
    elif white_box is not None and result.status == "trained":  # the raw release and the records' own sum
        n = len(data)
        records = model.statistic_sum(data.x.to(device), None if data.y is None else data.y.to(device))
        release_canaries.record_release(Path(state_dir), server_round,
                                        released=(getattr(model, model.release_buffer) * n).cpu().numpy(),
                                        records_sum=records.cpu().numpy())
    model.to("cpu")
    return model, result, ledger


@torch.no_grad()
def evaluate_site(task: TaskConfig, data: SiteData, state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
    """Federated evaluation: the global model's mean per-example training loss on this
    site's data (a scalar computed on private data, outside the DP-SGD guarantee)."""
    model = task.build_model()
    model.load_state_dict(state_dict)
    if not isinstance(model, DPSGDTrainable):
        raise TypeError(f"the {type(model).__name__} family has no per-example training loss to evaluate at a "
                        "site (it is trained by a release); give the server a reference set to evaluate it")
    model.eval()
    torch.manual_seed(task.seed)
    step = next(s for s in model.steps() if s.private)
    from fedgen.shared_models import Batch

    losses = []
    for start in range(0, len(data), 512):
        x = data.x[start:start + 512]
        y = None if data.y is None else data.y[start:start + 512]
        losses.append(step.loss(Batch.of(x, y)))
    return {"eval-loss": float(torch.cat(losses).mean()), "num-examples": len(data)}
