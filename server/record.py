"""One row of ``metrics.jsonl``, typed: :class:`RoundRecord` (docs/architecture.md §4).

A row is flat JSON, as it has always been: the sub-records (``site_level``,
``server_update``) and the quality ``metrics`` are written inline. Which keys of a row are
quality metrics is therefore derived from the schema (:func:`quality_metrics`): every key
that is not a field of the record.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any


@dataclass
class SiteLevelRound:
    """DP-FedAvg's round (``privacy/site_level.py``): clipping and the budget spent so far."""

    sites_clipped: int
    site_level_epsilon: float
    site_update_norm_median: float | None  # None: no site was sampled

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ServerUpdate:
    """The family's post-processing of the aggregate (``GenerativeModel.server_update``;
    the fit fields are the mmd family's)."""

    server_update_seconds: float
    server_fit_mmd: float | None = None
    server_fit_steps: int | None = None
    server_fit_noise_reached: int | None = None  # the step that reached the noise level (then the cooldown)
    release_noise_energy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class RoundRecord:
    """What happened in one round. Fields without a default are in every row; the others
    only when the round had them (``None``: not written)."""

    round: int
    clients_sampled: int
    clients_ok: int
    clients_failed: int
    clients_refused: int
    train_loss: float | None
    epsilon: float | None  # example-level, largest over sites; None without example-level DP
    failures: list[dict[str, str]]
    sites_trained: list[str] | None = None  # the sites whose update was aggregated (summary's site table)
    sites_refused: list[str] | None = None  # the sites that refused for budget
    byzantine: list[str] | None = None  # simulation: the accepted updates that were attacks
    faults: dict[str, Any] | None = None  # simulation: dropped out, errors, late, delays
    site_level: SiteLevelRound | None = None
    clients_norm_bounded: list[str] | None = None
    robust: dict[str, Any] | None = None
    secure_aggregation: dict[str, Any] | None = None  # server/secagg.py's round report
    release_noise_variance: float | None = None
    server_update: ServerUpdate | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # quality metrics of an evaluated round
    class_histogram: list[int] | None = None
    eval_seconds: float | None = None
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The row as written: sub-records and quality metrics inline, unset fields left out."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _INLINE:
                out.update(_inline(value))
            elif f.default is MISSING or value is not None:
                out[f.name] = value
        return out

    def to_json(self) -> str:
        """One ``metrics.jsonl`` line (without the newline); NaN is written as null."""
        return json.dumps(jsonable(self.to_dict()))


_INLINE = {"site_level", "server_update", "metrics"}  # written into the row itself


def _inline(value: SiteLevelRound | ServerUpdate | dict[str, Any] | None) -> dict[str, Any]:
    if value is None or isinstance(value, dict):
        return value or {}
    return value.to_dict()


def _record_keys() -> frozenset[str]:
    keys = {f.name for f in fields(RoundRecord)} - _INLINE
    return frozenset(keys | {f.name for group in (SiteLevelRound, ServerUpdate) for f in fields(group)})


RECORD_KEYS = _record_keys()  # every key a row may hold besides its quality metrics


def quality_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """The quality metrics of a ``metrics.jsonl`` row (empty for a round not evaluated)."""
    return {k: v for k, v in row.items() if k not in RECORD_KEYS}


def short_reason(reason: str) -> str:
    """The informative line of a (possibly Ray-wrapped, multi-line) error reply."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    messages = [line.split("Message:", 1)[1].strip() for line in lines if "Message:" in line]
    text = messages[-1] if messages else (lines[-1] if lines else reason)
    return text.rstrip("'>")[:400]


def jsonable(obj: Any) -> Any:
    """``obj`` with NaN as ``None`` (JSON has no NaN)."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [jsonable(v) for v in obj]
    return obj
