"""What the server does to the round's valid updates before and around aggregation.

* :func:`bound_update_norms` -- norm bounding (Sun et al. 2019, "Can You Really Backdoor
  Federated Learning?"): an update ``w_k`` whose distance to the global model exceeds
  ``B`` is moved back to ``w + B (w_k - w) / ||w_k - w||``, so no site can pull the
  average further than ``B`` whatever it sends.
* :func:`robust_report` -- which sites a robust strategy set aside this round: the sites
  Krum / Multi-Krum did not select, and for the coordinate-wise median / trimmed mean the
  share of each site's coordinates that fell in the ``trim_fraction`` tails (an honest site
  lands there about ``2 * trim_fraction`` of the time, an attacker nearly always).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy.multikrum import select_multikrum

from fedgen.contract.scenario import FederationConfig

from .updates import site_info, update_norm


def _arrays(msg: Message) -> ArrayRecord:
    return next(iter(msg.content.array_records.values()))


def site_label(msg: Message) -> str:
    site, _ = site_info(msg)
    return site if site is not None else f"node {msg.metadata.src_node_id}"


def bound_update_norms(replies: list[Message], global_arrays: ArrayRecord, bound: float) -> list[str]:
    """Scale every update farther than ``bound`` from the global model back onto the ball
    (in place); return the sites that were bounded."""
    bounded = []
    for msg in replies:
        arrays = _arrays(msg)
        norm = update_norm(arrays, global_arrays)
        if norm <= bound:
            continue
        scale = bound / norm
        for key, ref in global_arrays.items():
            w, w0 = arrays[key].numpy(), ref.numpy()
            if np.issubdtype(w0.dtype, np.floating):
                arrays[key] = Array((w0 + (w - w0) * scale).astype(w0.dtype))
        bounded.append(site_label(msg))
    return bounded


def _flat(msg: Message) -> np.ndarray:
    arrays = _arrays(msg)
    return np.concatenate([arrays[k].numpy().astype(np.float64).ravel() for k in arrays.keys()])


def robust_report(strategy: str, federation: FederationConfig, replies: list[Message]) -> dict[str, Any]:
    """Which sites the robust ``strategy`` set aside among ``replies`` (call before
    aggregating: Flower's trimmed mean consumes the replies' arrays)."""
    labels = [site_label(m) for m in replies]
    if strategy in ("krum", "multikrum") and replies:
        select = 1 if strategy == "krum" else federation.krum_select
        chosen = select_multikrum([m.content for m in replies], federation.byzantine_sites, select)
        chosen_ids = {id(c) for c in chosen}
        return {"excluded": [label for label, m in zip(labels, replies) if id(m.content) not in chosen_ids]}
    if strategy in ("fedmedian", "fedtrimmedavg") and len(replies) >= 3:
        values = np.stack([_flat(m) for m in replies])
        n = len(replies)
        cut = max(1, int(federation.trim_fraction * n))
        ranks = values.argsort(axis=0).argsort(axis=0)
        extreme = (ranks < cut) | (ranks >= n - cut)
        return {"tail_share": {label: round(float(s), 4) for label, s in zip(labels, extreme.mean(axis=1))}}
    return {}
