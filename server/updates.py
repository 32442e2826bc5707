"""Sorting and validating the replies of a training round.

A reply is *ok* (an update to aggregate), *refused* (the site's budget is spent),
*unavailable* (the site could not take part this round), or *failed* (an error reply, a
missing reply, or an update that fails validation: NaN/Inf, wrong keys, shapes or dtypes,
or an update norm far beyond the round's others). Only ok replies reach the strategy; the
round continues with them.

The norm check (:func:`norm_outliers`): with at least ``OUTLIER_MIN_REPLIES`` valid
updates, one whose distance to the global model, ``||w_k - w||_2``, exceeds
``OUTLIER_FACTOR`` times the median of the round's distances is rejected. The median is
robust to a minority of bad replies; with fewer replies there is no reference to compare
against, so nothing is rejected on norm alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from privacy.ledger import SiteLedger

log = logging.getLogger(__name__)

STATUS_TRAINED = 0
STATUS_BUDGET_EXHAUSTED = 1
STATUS_UNAVAILABLE = 2
OUTLIER_FACTOR = 10.0
OUTLIER_MIN_REPLIES = 3


@dataclass
class RoundReplies:
    ok: list[Message] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # site ids
    unavailable: list[str] = field(default_factory=list)  # site ids
    failed: list[tuple[str, str]] = field(default_factory=list)  # (node or site id, reason)
    errors: list[str] = field(default_factory=list)  # sites (or nodes) that sent an error reply
    late: list[str] = field(default_factory=list)  # sites (or nodes) with no reply by the timeout
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


def update_norm(update: ArrayRecord, reference: ArrayRecord) -> float:
    """``||update - reference||_2`` over every parameter (float64)."""
    total = 0.0
    for key, ref in reference.items():
        diff = update[key].numpy().astype(np.float64) - ref.numpy().astype(np.float64)
        total += float(np.sum(diff * diff))
    return float(np.sqrt(total))


def norm_outliers(norms: list[float], *, factor: float | None = OUTLIER_FACTOR,
                  min_replies: int = OUTLIER_MIN_REPLIES) -> list[int]:
    """Indices of norms above ``factor`` x the median (none with fewer than ``min_replies``,
    none when ``factor`` is ``None``)."""
    if factor is None or len(norms) < min_replies:
        return []
    median = float(np.median(norms))
    return [i for i, n in enumerate(norms) if n > factor * median and n > 0.0]


def sort_replies(replies: list[Message], global_arrays: ArrayRecord, sent_to: list[int], *,
                 known_sites: dict[int, str] | None = None, destinations: dict[str, int] | None = None,
                 outlier_factor: float | None = OUTLIER_FACTOR,
                 outlier_min_replies: int = OUTLIER_MIN_REPLIES) -> RoundReplies:
    """Sort the replies to the train messages sent to the nodes ``sent_to``; ``known_sites``
    (node id -> site id, from earlier rounds) names the sites of error and missing replies.

    ``destinations`` maps each sent message's id to its node: an error reply the SuperLink
    writes itself (e.g. "node unavailable" after a SuperNode died) comes *from* the
    SuperLink, so it is attributed to the node the message was sent to."""
    known_sites, destinations = known_sites or {}, destinations or {}
    out = RoundReplies()
    who: list[tuple[str, int]] = []  # (site label, node id) of each ok reply
    norms: list[float] = []
    replied: set[int] = set()
    for msg in replies:
        node = destinations.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        replied.add(node)
        if msg.has_error():
            label = known_sites.get(node, str(node))
            out.failed.append((label, f"error reply: {msg.error.reason}"))
            out.errors.append(label)
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
        status = int(metrics.get("status", STATUS_TRAINED))
        if status == STATUS_BUDGET_EXHAUSTED:
            out.refused.append(label)
            continue
        if status == STATUS_UNAVAILABLE:
            out.unavailable.append(label)
            out.failed.append((label, str(msg.content.config_records["site"].get("message", "unavailable"))))
            continue
        arrays = next(iter(msg.content.array_records.values()), None)
        problem = "reply without model update" if arrays is None else check_update(arrays, global_arrays)
        if problem:
            log.warning("rejected update from %s (node %s): %s", label, node, problem)
            out.failed.append((label, problem))
            continue
        out.ok.append(msg)
        who.append((label, node))
        norms.append(update_norm(arrays, global_arrays))
    outliers = set(norm_outliers(norms, factor=outlier_factor, min_replies=outlier_min_replies))
    if outliers:
        median = float(np.median(norms))
        for i in sorted(outliers):
            problem = (f"update norm {norms[i]:.4g} is more than {outlier_factor:g}x the round's median "
                       f"{median:.4g}")
            log.warning("rejected update from %s (node %s): %s", who[i][0], who[i][1], problem)
            out.failed.append((who[i][0], problem))
        out.ok = [m for i, m in enumerate(out.ok) if i not in outliers]
    for node in sent_to:
        if node not in replied:
            label = known_sites.get(node, f"node {node}")
            out.late.append(label)
            out.failed.append((label, "no reply before the round timeout"))
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


def site_releases(ok: list[Message], server_round: int, buffer: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The replies' releases for a release family's :meth:`combine_releases`: each site's
    noisy sum ``S_k + n_k`` (its ``buffer`` holds the mean, ``(S_k + n_k) / N_k``) as
    ``[K, ...]``, the noise multiplier its ledger recorded for ``server_round`` (0 without
    DP) as ``[K]``, and the total record count ``N``. Every term is public: what the sites
    sent and their ledgers."""
    sums, sigmas, total_examples = [], [], 0.0
    for msg in ok:
        count = float(next(iter(msg.content.metric_records.values()))["num-examples"])
        arrays = next(iter(msg.content.array_records.values()))
        sums.append(torch.from_numpy(np.asarray(arrays[buffer].numpy(), dtype=np.float64)) * count)
        _, ledger = site_info(msg)
        spends = [h for h in (ledger.history if ledger else []) if h.round == server_round]
        sigmas.append(spends[-1].noise_multiplier if spends else 0.0)
        total_examples += count
    return torch.stack(sums), torch.tensor(sigmas, dtype=torch.float64), total_examples
