"""The privacy ledger: what every site spent, round by round (docs/architecture.md, "Run directory").

A :class:`SiteLedger` lives at the site (``context.state`` in simulation, a file in the
site's state directory in deployment) and travels to the server with every reply; the
server's :class:`PrivacyLedger` collects them into ``privacy.json``. Epsilon is never
stored as a source of truth: it is recomputed from the history by a fresh accountant.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

from .accounting import HistoryEntry, epsilon_of, largest_affordable
from .skellam import gaussian_rdp, rdp_epsilon, subsampled_skellam_rdp


#: secure aggregation (docs/aggregation.md, "Aborted rounds"): a spend whose masked input left
#: the site is ``pending`` (it counts); the site appends a zero-step resolution entry of the
#: same run and round when it answers the unmask stage (``released``: it keeps counting) or
#: when the server aborts the round before any unmask (``aborted``: it stops counting)
PENDING, RELEASED, ABORTED = "pending", "released", "aborted"
SECAGG_STATES = (PENDING, RELEASED, ABORTED)


def charged(history: list["RoundSpend"]) -> list["RoundSpend"]:
    """The entries that count towards epsilon: every spend except those of a secure-
    aggregation round that a later ``aborted`` entry resolved (nothing of it was released);
    resolution entries take no steps. Every reader recomputing epsilon starts here."""
    aborted = {(h.run, h.round) for h in history if h.secagg == ABORTED}
    return [h for h in history if not (h.secagg == PENDING and (h.run, h.round) in aborted)]


def skellam_ledger_epsilon(history: list["RoundSpend"], delta: float) -> float:
    """Epsilon of a history holding a distributed Skellam entry: every entry's RDP (the
    Skellam bound -- Poisson-subsampled at the entry's ``sample_rate`` when it is below 1,
    a DP-FedSGD round -- or the subsampled Gaussian's) composed at integer orders and
    converted as ``privacy/accounting.py`` does (module docstring of ``privacy/skellam.py``)."""
    rdp = sum((subsampled_skellam_rdp(float(h.skellam["mu"]), float(h.skellam["l1"]), float(h.skellam["l2"]),
                                      float(h.sample_rate)) * h.steps if h.skellam
               else gaussian_rdp(float(h.noise_multiplier), float(h.sample_rate)) * h.steps)
              for h in charged(history) if h.steps > 0)
    return rdp_epsilon(rdp, delta) if not isinstance(rdp, int) else 0.0


@dataclass
class RoundSpend:
    """DP-SGD steps one site took in one round, at the (sigma, q) it used."""

    round: int
    steps: int
    noise_multiplier: float
    sample_rate: float
    epsilon: float  # the site's cumulative epsilon after this round
    # The Flower run that charged it (deployment: a site's ledger outlives runs, and every
    # run numbers its rounds from 1). A string: Flower's run ids are uint64, beyond JSON's
    # safe integers. None in simulation, where the ledger belongs to one run directory.
    run: str | None = None
    # A distributed Skellam release under secure aggregation (privacy/skellam.py):
    # {"mu": variance protecting the site, "l1": ..., "l2": integer sensitivities}. The entry's
    # noise_multiplier is then its Gaussian equivalent sqrt(mu) / l2, for reading only.
    skellam: dict[str, float] | None = None
    # Secure aggregation only: ``pending`` on a spend whose masked input left the site, or
    # ``released`` / ``aborted`` on the zero-step entry that resolves it (SECAGG_STATES).
    secagg: str | None = None


@dataclass
class SiteLedger:
    """One site's spend under example-level DP."""

    site: str
    accountant: str
    delta: float
    target_epsilon: float
    max_grad_norm: float
    noise_multiplier: float | None = None  # calibrated before the site's first round
    sample_rate: float | None = None
    history: list[RoundSpend] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(h.steps for h in charged(self.history))

    def accountant_history(self) -> list[HistoryEntry]:
        return [(h.noise_multiplier, h.sample_rate, h.steps) for h in charged(self.history)]

    @property
    def epsilon(self) -> float:
        return self._epsilon(self.history)

    def epsilon_after(self, *, steps: int, noise_multiplier: float, sample_rate: float,
                      skellam: dict[str, float] | None = None) -> float:
        """Epsilon once one more spend is added (not recorded): what a site checks before a
        DP-SGD round or a release. Distributed Skellam entries (from another run of the same
        site) count as in :attr:`epsilon`, not as their Gaussian-equivalent ``noise_multiplier``
        (which under-counts them: no l1 term, and the exact subsampled Gaussian bound)."""
        spend = RoundSpend(round=-1, steps=steps, noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                           epsilon=0.0, skellam=skellam)
        return self._epsilon([*self.history, spend])

    def affordable_steps(self, noise_multiplier: float, sample_rate: float, *, wanted: int) -> int:
        """The largest ``k <= wanted`` steps at (sigma, q) that keep the site within its target."""
        return largest_affordable(
            lambda k: self.epsilon_after(steps=k, noise_multiplier=noise_multiplier, sample_rate=sample_rate)
            <= self.target_epsilon, wanted)

    def _epsilon(self, history: list[RoundSpend]) -> float:
        """Epsilon of ``history``'s charged entries: the Skellam-aware RDP composition when any
        is a distributed Skellam entry, else the ledger's accountant."""
        counted = charged(history)
        if any(h.skellam for h in counted):
            return skellam_ledger_epsilon(history, self.delta)
        return epsilon_of([(h.noise_multiplier, h.sample_rate, h.steps) for h in counted],
                          delta=self.delta, accountant=self.accountant)

    def rounds(self, run: str | None = None) -> set[int]:
        """Rounds recorded for ``run`` (``None``: entries without a run, i.e. simulation)."""
        return {h.round for h in self.history if h.run == run}

    def set_target_epsilon(self, target_epsilon: float) -> None:
        """This run's target (the task's, capped by the site's policy): a site's ledger
        outlives runs, and each run may ask for a different budget."""
        self.target_epsilon = target_epsilon

    def record_round(self, *, round: int, steps: int, noise_multiplier: float, sample_rate: float,
                     run: str | int | None = None, skellam: dict[str, float] | None = None) -> RoundSpend:
        """Append one round's spend. A (run, round) is recorded at most once, so a retried
        message can never be charged twice or silently dropped; a later run of the same
        federation starts its rounds at 1 again and adds to the same history (epsilon
        composes over every entry, whatever its run)."""
        run = None if run is None else str(run)
        if round in self.rounds(run):
            where = f"run {run}, round {round}" if run is not None else f"round {round}"
            raise ValueError(f"site {self.site}: {where} is already in the ledger")
        entry = RoundSpend(round=round, steps=steps, noise_multiplier=noise_multiplier,
                           sample_rate=sample_rate, epsilon=0.0, run=run, skellam=skellam)
        self.history.append(entry)
        entry.epsilon = self.epsilon
        return entry

    # -- secure aggregation: pending spends and their resolution (docs/aggregation.md) --
    def mark_pending(self, *, round: int, run: str | int | None) -> int:
        """Mark the spends just recorded for (``run``, ``round``) -- not yet written anywhere
        -- as ``pending``: their masked input is about to leave the site. They count as
        spent until resolved. Returns how many were marked."""
        run = None if run is None else str(run)
        entries = [h for h in self.history if h.run == run and h.round == round and h.steps > 0]
        for h in entries:
            h.secagg = PENDING
        return len(entries)

    def unresolved(self, *, round: int, run: str | int | None) -> list[RoundSpend]:
        run = None if run is None else str(run)
        mine = [h for h in self.history if h.run == run and h.round == round]
        if any(h.secagg in (RELEASED, ABORTED) for h in mine):
            return []
        return [h for h in mine if h.secagg == PENDING]

    def resolve(self, *, round: int, run: str | int | None, outcome: str) -> RoundSpend | None:
        """Append the resolution of (``run``, ``round``)'s pending spends: ``released`` (the
        site answered the unmask stage: they stay charged) or ``aborted`` (the server aborted
        the round before any unmask: they stop counting). Append-only: the spends themselves
        are never changed; ``None`` when nothing is pending for that round."""
        if outcome not in (RELEASED, ABORTED):
            raise ValueError(f"a pending spend resolves as {RELEASED!r} or {ABORTED!r}, not {outcome!r}")
        pending = self.unresolved(round=round, run=run)
        if not pending:
            return None
        last = pending[-1]
        entry = RoundSpend(round=round, steps=0, noise_multiplier=last.noise_multiplier,
                           sample_rate=last.sample_rate, epsilon=0.0, run=last.run, secagg=outcome)
        self.history.append(entry)
        entry.epsilon = self.epsilon
        return entry

    # -- serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "max_grad_norm": self.max_grad_norm,
            "steps": self.steps,
            "epsilon": self.epsilon,
            "target_epsilon": self.target_epsilon,
            "history": [{k: v for k, v in asdict(h).items() if k not in ("run", "skellam", "secagg") or v is not None}
                        for h in self.history],
            # fields needed to rebuild the ledger (not part of the public contract)
            "site": self.site,
            "accountant": self.accountant,
            "delta": self.delta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SiteLedger":
        return cls(
            site=str(d["site"]),
            accountant=d["accountant"],
            delta=float(d["delta"]),
            target_epsilon=float(d["target_epsilon"]),
            max_grad_norm=float(d["max_grad_norm"]),
            noise_multiplier=d.get("noise_multiplier"),
            sample_rate=d.get("sample_rate"),
            history=[RoundSpend(**h) for h in d.get("history", [])],
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SiteLedger":
        return cls.from_dict(json.loads(text))


@dataclass
class PrivacyLedger:
    """The run's ledger as written to ``privacy.json``."""

    accountant: str
    delta: float
    target_epsilon: float | None
    unit: str = "example"
    sites: dict[str, SiteLedger] = field(default_factory=dict)
    site_level: dict[str, Any] | None = None

    def update_site(self, ledger: SiteLedger) -> None:
        """Replace a site's entry with the newer copy it sent (histories only grow)."""
        old = self.sites.get(ledger.site)
        if old is not None and len(old.history) > len(ledger.history):
            raise ValueError(f"site {ledger.site} sent a ledger shorter than the one on record")
        self.sites[ledger.site] = ledger

    @property
    def epsilon(self) -> float:
        """Example-level epsilon of the run: sites hold disjoint data, so the max over sites."""
        return max((s.epsilon for s in self.sites.values()), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        def public(site: SiteLedger) -> dict[str, Any]:
            d = site.to_dict()
            for private_key in ("site", "accountant", "delta"):
                d.pop(private_key)
            return d

        return {
            "unit": self.unit,
            "accountant": self.accountant,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "epsilon": self.epsilon,
            "sites": {k: public(v) for k, v in sorted(self.sites.items(), key=lambda kv: site_sort_key(kv[0]))},
            "site_level": self.site_level,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PrivacyLedger":
        ledger = cls(accountant=d["accountant"], delta=float(d["delta"]),
                     target_epsilon=d.get("target_epsilon"), unit=d.get("unit", "example"),
                     site_level=d.get("site_level"))
        for site, sd in d.get("sites", {}).items():
            ledger.sites[site] = SiteLedger.from_dict(
                {**sd, "site": site, "accountant": ledger.accountant, "delta": ledger.delta})
        return ledger

    def write(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))


def site_sort_key(site: str) -> tuple[int, Any]:
    return (0, int(site)) if site.isdigit() else (1, site)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` atomically, the one way fedgen writes a file a crash must not tear
    (ledgers, checkpoints, caches, audit files): ``write`` fills a temporary file in the same
    folder, which is fsynced and renamed over ``path``; then the folder is fsynced, so the
    rename itself survives a power cut. A reader sees the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write` of ``text`` (UTF-8)."""
    atomic_write(path, lambda fh: fh.write(text.encode()))


def fsync_directory(folder: Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
