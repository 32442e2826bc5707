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

Nothing a reply carries is trusted before it is checked (:func:`check_reply`): the site
id (a strict pattern, bound to the first node that used it), the metrics (known keys,
finite numbers, a known status, an example count that is a positive integer within what
the server knows the site can hold), the ledger (:func:`read_site_ledger`), and every
array's payload against its declared shape and dtype before it is decoded. A reply that
fails any check is *failed* for its site, with the reason; the round goes on without it.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from fedgen.contract.secagg import MASKED
from fedgen.contract.task import METRIC_KEYS, ReplyStatus
from fedgen.privacy import site_id
from fedgen.privacy.accounting import ACCOUNTANTS
from fedgen.privacy.errors import SiteIdError
from fedgen.privacy.ledger import PENDING, SECAGG_STATES, SiteLedger

log = logging.getLogger(__name__)

OUTLIER_FACTOR = 10.0
OUTLIER_MIN_REPLIES = 3
STATUSES = tuple(int(status) for status in ReplyStatus)
#: Largest example count a deployed site may claim (the server cannot know its data); in
#: simulation each site's partition size bounds it (``sort_replies``' ``site_examples``).
DEFAULT_MAX_SITE_EXAMPLES = 10**7


class ReplyError(ValueError):
    """A reply the server cannot use; the message is the one-line reason."""


def check_site_id(text: Any) -> str:
    """``text`` if it is a valid site id (:func:`privacy.site_id.is_valid_site_id`), else
    :class:`ReplyError`. Site ids name files in the run directory (``sites/<id>/ledger.json``)
    and keys of ``privacy.json``, so nothing path-like passes."""
    try:
        return site_id.check_site_id(text)
    except SiteIdError as err:
        raise ReplyError(str(err).replace("site name", "site id")) from None


def _finite_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ReplyError(f"{what} is {value!r}, not a finite number")
    return float(value)


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise ReplyError(reason)


def read_site_ledger(text: str, site: str | None = None) -> SiteLedger:
    """A site's ledger from the JSON it sent, checked against the ledger's schema before
    :meth:`SiteLedger.from_dict` sees it (:class:`ReplyError` with the reason otherwise):
    the ledger's site is ``site`` (a site cannot write another's entry), the accountant
    known, ``0 < delta < 1``, and every history entry has a positive round, non-negative
    integer steps, ``noise_multiplier > 0``, ``0 < sample_rate <= 1``, finite numbers."""
    try:
        d = json.loads(text)
    except (TypeError, ValueError) as err:
        raise ReplyError(f"ledger is not JSON ({err})") from None
    _require(isinstance(d, dict), "ledger is not a JSON object")
    _require(isinstance(d.get("history", []), list), "ledger history is not a list")
    ledger_site = check_site_id(d.get("site"))
    _require(site is None or ledger_site == site, f"ledger is site {ledger_site!r}'s, sent by site {site!r}")
    _require(d.get("accountant") in ACCOUNTANTS, f"ledger accountant {d.get('accountant')!r} is not one of "
                                                  f"{', '.join(ACCOUNTANTS)}")
    delta = _finite_number(d.get("delta"), "ledger delta")
    _require(0.0 < delta < 1.0, f"ledger delta {delta} is not in (0, 1)")
    for key in ("target_epsilon", "max_grad_norm"):
        _require(_finite_number(d.get(key), f"ledger {key}") >= 0.0, f"ledger {key} is negative")
    for key in ("noise_multiplier", "sample_rate"):
        if d.get(key) is not None:
            _finite_number(d[key], f"ledger {key}")
    for i, h in enumerate(d.get("history", [])):
        where = f"ledger history[{i}]"
        _require(isinstance(h, dict) and set(h) <= {"round", "steps", "noise_multiplier", "sample_rate", "epsilon",
                                                    "run", "skellam", "secagg"}, f"{where} has unknown fields")
        _require(h.get("secagg") is None or h["secagg"] in SECAGG_STATES,
                 f"{where}.secagg is {h.get('secagg')!r}, not one of {', '.join(SECAGG_STATES)}")
        _require(h.get("secagg") in (None, PENDING) or h.get("steps") == 0,
                 f"{where} resolves a secure-aggregation round and must take 0 steps")
        for key in ("round", "steps"):
            _require(type(h.get(key)) is int and h[key] >= (1 if key == "round" else 0),
                     f"{where}.{key} is {h.get(key)!r}, not a {'positive' if key == 'round' else 'non-negative'} "
                     "integer")
        _require(_finite_number(h.get("noise_multiplier"), f"{where}.noise_multiplier") > 0.0,
                 f"{where}.noise_multiplier must be > 0")
        rate = _finite_number(h.get("sample_rate"), f"{where}.sample_rate")
        _require(0.0 < rate <= 1.0, f"{where}.sample_rate {rate} is not in (0, 1]")
        _finite_number(h.get("epsilon", 0.0), f"{where}.epsilon")
        _require(h.get("run") is None or isinstance(h["run"], str), f"{where}.run is not a string")
        if h.get("skellam") is not None:  # a distributed release (privacy/skellam.py)
            sk = h["skellam"]
            _require(isinstance(sk, dict) and set(sk) == {"mu", "l1", "l2"}
                     and all(_finite_number(sk[k], f"{where}.skellam.{k}") > 0.0 for k in sk),
                     f"{where}.skellam must be {{mu, l1, l2}}, each > 0")
    try:
        return SiteLedger.from_dict(d)
    except (KeyError, TypeError, ValueError) as err:
        raise ReplyError(f"ledger does not fit the schema ({type(err).__name__}: {err})") from None


def check_metrics(metrics: Mapping[str, Any], *, max_examples: int) -> tuple[int, int]:
    """(status, example count) of a train reply's metric record, or :class:`ReplyError`.
    Every key is known and every value a finite number; the status a known code; the count
    an integer in ``[0, max_examples]``, and above 0 for a trained update (FedAvg and the
    release combination weight by it, so an inflated or NaN count would set the aggregate)."""
    unknown = sorted(set(metrics) - METRIC_KEYS)
    _require(not unknown, f"unknown metric keys {unknown}")
    values = {key: _finite_number(value, f"metric {key}") for key, value in metrics.items()}
    status = values.get("status", ReplyStatus.TRAINED)
    _require(status in STATUSES, f"status {status:g} is not one of {list(STATUSES)}")
    _require("num-examples" in values, "reply without num-examples")
    count = values["num-examples"]
    _require(count.is_integer(), f"num-examples {count:g} is not an integer")
    _require(0 <= count <= max_examples, f"num-examples {count:g} is outside [0, {max_examples}], the most "
                                         "this site can hold")
    _require(count > 0 or status != ReplyStatus.TRAINED, "num-examples is 0 for a trained update")
    return int(status), int(count)


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def check_payloads(update: ArrayRecord) -> None:
    """Every array's payload is a NumPy ``.npy`` buffer whose header and body match the
    array's declared shape and dtype (:class:`ReplyError` otherwise), checked *before*
    anything decodes it: a payload that disagrees would otherwise decode to an array of
    another size or fail inside the aggregation."""
    for key, arr in update.items():
        _require(arr.stype == "numpy.ndarray", f"{key}: payload type {arr.stype!r} is not numpy.ndarray")
        try:
            dtype = np.dtype(arr.dtype)
            buf = io.BytesIO(arr.data)
            read_header = _NPY_HEADER_READERS[np.lib.format.read_magic(buf)]
            shape, _, header_dtype = read_header(buf)
        except Exception as err:  # noqa: BLE001 -- any malformed header is the site's fault
            raise ReplyError(f"{key}: unreadable array payload ({type(err).__name__})") from None
        declared = tuple(arr.shape)
        _require(not dtype.hasobject and not header_dtype.hasobject, f"{key}: object arrays are not accepted")
        _require(tuple(shape) == declared and header_dtype == dtype,
                 f"{key}: payload holds {header_dtype} {tuple(shape)}, declared {dtype} {declared}")
        body = len(arr.data) - buf.tell()
        expected = math.prod(declared) * dtype.itemsize
        _require(body == expected, f"{key}: payload has {body} bytes, declared shape x itemsize is {expected}")


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
    """(site id, ledger) of a reply that :func:`sort_replies` has already validated."""
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


def bind_site(node: int, site: str, node_sites: Mapping[int, str]) -> None:
    """Site ids are not authenticated by Flower: the first (node, site id) pair the server
    sees binds them for the run. A node claiming another site id, or a site id claimed by
    a second node, is :class:`ReplyError` (it would mix two sites' ledgers and counts)."""
    bound = node_sites.get(node)
    _require(bound is None or bound == site, f"node {node} is bound to site id {bound}, but claimed {site}")
    other = next((n for n, s in node_sites.items() if s == site and n != node), None)
    _require(other is None, f"site id {site} is already bound to node {other}")


def check_identity(msg: Message, node: int, *, node_sites: Mapping[int, str],
                   max_examples: Mapping[str, int] | None = None) -> str:
    """The site id a reply from ``node`` claims, once valid and bound to ``node``
    (:func:`bind_site`), or :class:`ReplyError`. ``max_examples`` (simulation: site id ->
    largest count) also limits the ids to the run's sites (there, partition-id is the id)."""
    rec = msg.content.config_records.get("site")
    _require(rec is not None and "id" in rec, "reply without a site record")
    site = check_site_id(rec["id"])
    _require(max_examples is None or site in max_examples, f"site id {site} is not one of this run's sites")
    bind_site(node, site, node_sites)
    return site


def check_ledger(msg: Message, site: str, recorded: SiteLedger | None = None) -> SiteLedger | None:
    """The ledger ``site`` sent (:func:`read_site_ledger`; ``None`` without DP), or
    :class:`ReplyError`; ``recorded`` is its ledger on record, which the new one may only
    extend (histories only grow; a shorter one would erase spent budget)."""
    text = msg.content.config_records["site"].get("ledger")
    ledger = read_site_ledger(text, site) if text else None
    _require(ledger is None or recorded is None or len(ledger.history) >= len(recorded.history),
             "ledger is shorter than the one on record")
    return ledger


def check_content(msg: Message, global_arrays: ArrayRecord, *, max_examples: int, masked: bool = False) -> int:
    """The status of a train reply once its metrics and update are checked (module
    docstring), or :class:`ReplyError`; a ``masked`` update (secure aggregation) is checked
    by server/secagg.py when it is unmasked."""
    metrics = next(iter(msg.content.metric_records.values()), None)
    _require(metrics is not None, "reply without metrics")
    status, _ = check_metrics(metrics, max_examples=max_examples)
    if status == ReplyStatus.TRAINED and masked:
        _require(MASKED in msg.content.array_records, "reply without masked input")
    elif status == ReplyStatus.TRAINED:
        arrays = next(iter(msg.content.array_records.values()), None)
        _require(arrays is not None, "reply without model update")
        check_payloads(arrays)
        problem = check_update(arrays, global_arrays)
        _require(problem is None, str(problem))
    return status


def sort_replies(replies: list[Message], global_arrays: ArrayRecord, sent_to: list[int], *,
                 known_sites: dict[int, str] | None = None, destinations: dict[str, int] | None = None,
                 site_examples: Mapping[str, int] | None = None,
                 recorded_ledgers: Mapping[str, SiteLedger] | None = None,
                 outlier_factor: float | None = OUTLIER_FACTOR,
                 outlier_min_replies: int = OUTLIER_MIN_REPLIES, masked: bool = False) -> RoundReplies:
    """Sort the replies to the train messages sent to the nodes ``sent_to``; ``known_sites``
    (node id -> site id, from earlier rounds) names the sites of error and missing replies
    and binds each node to its site id (:func:`bind_site`).

    ``destinations`` maps each sent message's id to its node: an error reply the SuperLink
    writes itself (e.g. "node unavailable" after a SuperNode died) comes *from* the
    SuperLink, so it is attributed to the node the message was sent to.

    ``site_examples`` (simulation: site id -> partition size + canaries) bounds each
    site's ``num-examples`` and names the run's sites; without it (deployment) a count is
    bounded by ``DEFAULT_MAX_SITE_EXAMPLES``. ``recorded_ledgers`` are the ledgers on
    record (``PrivacyLedger.sites``): a reply whose ledger is shorter is rejected. Under
    secure aggregation (``masked``) the updates are masked: no norms, no outliers."""
    known_sites, destinations = known_sites or {}, destinations or {}
    out = RoundReplies()
    bound = dict(known_sites)  # grows with this round's replies: two nodes cannot share a site id
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
        label = bound.get(node, f"node {node}")
        try:
            label = site = check_identity(msg, node, node_sites=bound, max_examples=site_examples)
            bound[node] = out.site_of[node] = site
            ledger = check_ledger(msg, site, (recorded_ledgers or {}).get(site))
            if ledger is not None:  # the spend happened even if the update is rejected below
                out.ledgers.append(ledger)
            status = check_content(msg, global_arrays,
                                   max_examples=(site_examples or {}).get(site, DEFAULT_MAX_SITE_EXAMPLES),
                                   masked=masked)
        except ReplyError as err:
            log.warning("rejected reply from %s (node %s): %s", label, node, err)
            out.failed.append((label, str(err)))
            continue
        if status == ReplyStatus.BUDGET_EXHAUSTED:
            out.refused.append(site)
            continue
        if status == ReplyStatus.UNAVAILABLE:
            out.unavailable.append(site)
            out.failed.append((site, str(msg.content.config_records["site"].get("message", "unavailable"))))
            continue
        if status == ReplyStatus.POLICY_REFUSED:
            reason = str(msg.content.config_records["site"].get("message", ""))[:400]
            log.warning("site %s refused the task under its policy: %s", site, reason)
            out.failed.append((site, f"refused by the site's policy: {reason}"))
            continue
        out.ok.append(msg)
        if masked:
            continue
        who.append((site, node))
        norms.append(update_norm(next(iter(msg.content.array_records.values())), global_arrays))
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
