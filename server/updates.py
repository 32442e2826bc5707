"""Sorting and validating the replies of a training round.

A reply is *ok* (an update to aggregate), *refused* (the site's budget is spent), or
*failed* (an error reply, a missing reply, or an update that fails validation: NaN/Inf,
wrong keys, shapes or dtypes). Failed and refused replies never reach the strategy.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message

from privacy.ledger import SiteLedger

log = logging.getLogger(__name__)

STATUS_TRAINED = 0
STATUS_BUDGET_EXHAUSTED = 1


@dataclass
class RoundReplies:
    ok: list[Message] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # site ids
    failed: list[tuple[str, str]] = field(default_factory=list)  # (node or site id, reason)
    ledgers: list[SiteLedger] = field(default_factory=list)
    site_of: dict[int, str] = field(default_factory=dict)  # node id -> site id


def site_info(msg: Message) -> tuple[str | None, SiteLedger | None]:
    rec = msg.content.config_records.get("site")
    if rec is None:
        return None, None
    ledger_json = rec.get("ledger")
    return str(rec["id"]), (SiteLedger.from_json(ledger_json) if ledger_json else None)


def check_update(update: ArrayRecord, reference: ArrayRecord) -> str | None:
    """Why ``update`` cannot be aggregated with ``reference``'s layout, or ``None``."""
    if set(update.keys()) != set(reference.keys()):
        return "parameter names differ from the global model's"
    for key, ref in reference.items():
        arr = update[key]
        if tuple(arr.shape) != tuple(ref.shape):
            return f"{key}: shape {tuple(arr.shape)} != {tuple(ref.shape)}"
        if arr.dtype != ref.dtype:
            return f"{key}: dtype {arr.dtype} != {ref.dtype}"
        if not np.all(np.isfinite(arr.numpy())):
            return f"{key}: NaN/Inf values"
    return None


def sort_replies(replies: list[Message], global_arrays: ArrayRecord, sampled: int) -> RoundReplies:
    out = RoundReplies()
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            out.failed.append((str(node), f"error reply: {msg.error.reason}"))
            continue
        site, ledger = site_info(msg)
        label = site or f"node {node}"
        if site is not None:
            out.site_of[node] = site
        if ledger is not None:
            out.ledgers.append(ledger)
        metrics = next(iter(msg.content.metric_records.values()), None)
        if metrics is None:
            out.failed.append((label, "reply without metrics"))
            continue
        if int(metrics.get("status", STATUS_TRAINED)) == STATUS_BUDGET_EXHAUSTED:
            out.refused.append(label)
            continue
        arrays = next(iter(msg.content.array_records.values()), None)
        problem = "reply without model update" if arrays is None else check_update(arrays, global_arrays)
        if problem:
            log.warning("rejected update from %s: %s", label, problem)
            out.failed.append((label, problem))
            continue
        out.ok.append(msg)
    missing = sampled - len(replies)
    out.failed.extend(("?", "no reply before the round timeout") for _ in range(max(0, missing)))
    return out


def weighted_mean(messages: list[Message], key: str) -> float:
    num, den = 0.0, 0.0
    for msg in messages:
        m = next(iter(msg.content.metric_records.values()))
        if key in m:
            w = float(m["num-examples"])
            num += w * float(m[key])
            den += w
    return num / den if den else float("nan")


