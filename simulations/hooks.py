"""The simulation's :class:`~fedgen.server.hooks.RunHooks`: what the server does only
because the sites are the harness's own processes over one run directory.

* each site's count bound is its partition's size (plus its audit canaries);
* a simulated site's ledger file (``sites/<site>/ledger.json``) holds spend whose reply
  never arrived (a crash, a straggler past the timeout): it is folded into ``privacy.json``;
* resume resets those files to the checkpoint's ledger (the round being redone was never
  committed);
* the round's record names the Byzantine sites among the accepted updates and the faults;
* a scenario may ask for seeded DP noise (reproducible studies, no guarantee).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from flwr.app import Message

from fedgen.contract import rundir
from fedgen.contract.rundir import read_canaries
from fedgen.contract.scenario import Scenario
from fedgen.privacy.ledger import PrivacyLedger, SiteLedger, atomic_write_text, site_sort_key
from fedgen.server.aggregation import site_label
from fedgen.server.hooks import RunHooks
from fedgen.server.record import RoundRecord
from fedgen.server.updates import ReplyError, RoundReplies, check_site_id, read_site_ledger

log = logging.getLogger(__name__)


def hooks_for(run_dir: Path) -> RunHooks:
    """The hooks of the run in ``run_dir``: a deployment's (none) or a simulation's."""
    scenario = rundir.read_scenario(Path(run_dir))
    if scenario.deployment is not None:
        return RunHooks()
    return SimulatedSites(run_dir, scenario, rundir.DataSpec.read(Path(run_dir)))


def simulated_site_examples(run_dir: Path, spec: rundir.DataSpec) -> dict[str, int] | None:
    """Each site's largest honest ``num-examples`` (site id -> its partition's size, plus
    the audit canaries planted at it), which bounds what its replies may claim; ``None``
    when the run directory records no partitions."""
    path = Path(run_dir) / rundir.PARTITIONS
    if not path.exists():
        return None
    with np.load(path) as z:
        sizes = {str(i): len(z[f"site_{i}"]) for i in range(spec.num_sites)}
    canaries = read_canaries(str(run_dir))
    if canaries is not None and str(canaries.site) in sizes:
        sizes[str(canaries.site)] += int(canaries.included.sum())
    return sizes


class SimulatedSites(RunHooks):
    allows_seeded_noise = True
    fails_unclean_runs = False  # `fedgen simulate` reads summary.json's status itself

    def __init__(self, run_dir: Path, scenario: Scenario, spec: rundir.DataSpec) -> None:
        self.run_dir = Path(run_dir)
        attack = scenario.simulation.byzantine
        self.byzantine = set(attack.sites(spec.num_sites)) if attack else set()
        self.faults = scenario.simulation.faults is not None
        self._site_examples = simulated_site_examples(self.run_dir, spec)
        self._read: dict[str, tuple[int, int, int]] = {}  # site -> (inode, mtime, size) of its ledger when read

    def site_examples(self) -> dict[str, int] | None:
        return self._site_examples

    def unreported_ledgers(self) -> list[SiteLedger]:
        """The sites' ledger files written since the last call (a file unchanged since it
        was read has nothing new to fold; with 10 000 sites every round would re-read them all)."""
        found = []
        for path in sorted((self.run_dir / "sites").glob("*/ledger.json")):
            try:
                stat = path.stat()
            except OSError:
                continue
            if self._read.get(path.parent.name) == (stamp := (stat.st_ino, stat.st_mtime_ns, stat.st_size)):
                continue
            self._read[path.parent.name] = stamp
            try:  # the file's site must be its folder's: no ledger lands under another site's name
                found.append(read_site_ledger(path.read_text(), path.parent.name))
            except ReplyError as err:
                log.warning("%s: ignored (%s)", path, err)
        return found

    def restore_site_ledgers(self, ledger: PrivacyLedger) -> None:
        """The checkpoint is the commit point. A round the server never committed was never
        aggregated or released, so the sites' ledgers are reset to the committed ones and
        that round is redone: the final ledger equals an uninterrupted run's."""
        paths = {site: self._site_ledger_path(site) for site in ledger.sites}  # all checked before any write
        for site, site_ledger in ledger.sites.items():
            atomic_write_text(paths[site], site_ledger.to_json())
        for folder in (self.run_dir / "sites").glob("*"):
            if folder.name not in ledger.sites:
                (folder / "ledger.json").unlink(missing_ok=True)

    def _site_ledger_path(self, site: str) -> Path:
        """``sites/<site>/ledger.json``, checked to stay inside the run directory (site ids
        come from the sites and from files: never trusted as paths)."""
        sites = (self.run_dir / "sites").resolve()
        path = (sites / check_site_id(site) / "ledger.json").resolve()
        if not path.is_relative_to(sites):
            raise ReplyError(f"site id {site!r} names a path outside {sites}")
        return path

    def annotate(self, record: RoundRecord, replies: RoundReplies) -> None:
        if self.byzantine:
            record.byzantine = sorted(site_label(m) for m in replies.ok if site_label(m) in self.byzantine)
        if self.faults:
            record.faults = {"dropped_out": sorted(replies.unavailable, key=site_sort_key),
                             "errors": sorted(replies.errors, key=site_sort_key),
                             "late": sorted(replies.late, key=site_sort_key),
                             "delayed_s": {site_label(m): round(delay, 2) for m in replies.ok
                                           if (delay := _delay_s(m))}}


def _delay_s(msg: Message) -> float:
    """The straggler delay a simulated site's reply reports (``simulations/faults.py``)."""
    metrics = next(iter(msg.content.metric_records.values()))
    return float(metrics["delay-s"]) if "delay-s" in metrics else 0.0
