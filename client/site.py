"""Where a node's data and privacy state live.

- Simulation: the node is ``partition-id`` of ``num-partitions``; its examples are that
  partition of the dataset the harness described in ``<run-dir>/inputs/``. Its state
  directory is ``<run-dir>/sites/<site>/``, so the ledger survives a resumed run (Flower's
  ``context.state`` only lives for one Flower run; we keep a copy there too).
- Canaries (simulation only): when the scenario plants audit canaries, the harness
  writes them to ``<run-dir>/inputs/canaries.npz`` (:func:`read_canaries`); the site they
  belong to appends the *included* ones to its partition, so they are trained on exactly
  like its other examples (DP-SGD clips and accounts them as ordinary records).
- Deployment: the SuperNode's ``--node-config`` names ``data-path`` (and optionally
  ``data-format``, ``site-id``, ``state-dir``); with a ``state-dir`` the ledger is a file
  there, written atomically, so a restarted SuperNode never forgets what it spent.
"""

from __future__ import annotations

import fcntl
import json
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch
from flwr.app import ConfigRecord, Context

from fedgen.contract.data_formats import NODE_CONFIG_KEYS, site_data_config
from fedgen.contract.rundir import Canaries, DataSpec, read_canaries
from fedgen.privacy.ledger import SiteLedger, atomic_write_text

from .data import SiteData, load_data
from .errors import DataError
from .feature_skew import read_site_skew, with_feature_skew

_STATE_KEY = "fedgen"


def _dataset(fmt: str, path: str | None, options: Mapping[str, object] | None = None) -> SiteData:
    # options as canonical JSON: the cache key must be hashable, and list-valued options are not
    return _cached_dataset(fmt, path, json.dumps(dict(options or {}), sort_keys=True))


@lru_cache(maxsize=4)
def _cached_dataset(fmt: str, path: str | None, options_json: str) -> SiteData:
    return load_data(fmt, path, json.loads(options_json))  # cached: Ray actors live for the whole run


#: --node-config keys that configure the site's reader (docs/deploy.md) -> reader option: the
#: options of contract/data_formats.py in kebab-case, the same names a scenario's data.options uses
READER_NODE_KEYS = NODE_CONFIG_KEYS


def _reader_options(node_config: Mapping[str, object]) -> dict[str, object]:
    """The reader options a deployed site's ``--node-config`` sets (load_data checks them
    against the format, naming any its reader does not accept)."""
    return site_data_config(node_config).options


@lru_cache(maxsize=64)
def _partition(partitions_file: str, site: int) -> np.ndarray:
    return _partitions(partitions_file, Path(partitions_file).stat().st_mtime_ns)[f"site_{site}"]


@lru_cache(maxsize=2)
def _partitions(partitions_file: str, mtime_ns: int) -> np.lib.npyio.NpzFile:
    """The open ``partitions.npz``: its zip index (one entry per site) is read once, not at
    every site's call (with 10 000 sites that read took ~0.1 s per call)."""
    return np.load(partitions_file)


def with_canaries(data: SiteData, canaries: Canaries | None, site: int) -> SiteData:
    """``data`` followed by the included canaries when they belong to ``site``."""
    if canaries is None or canaries.site != site or not canaries.included.any():
        return data
    keep = canaries.included
    if canaries.y is None:
        data = data.without_labels()
    y = None if canaries.y is None or data.y is None else torch.cat([data.y, torch.from_numpy(canaries.y[keep])])
    return SiteData(torch.cat([data.x, torch.from_numpy(canaries.x[keep])]), y, data.num_classes,
                    f"{data.source} + {int(keep.sum())} canaries")


def site_id(context: Context) -> str:
    cfg = context.node_config
    if "site-id" in cfg:
        return str(cfg["site-id"])
    if "partition-id" in cfg:
        return str(cfg["partition-id"])
    return str(context.node_id)


def load_site_data(context: Context, *, conditional: bool, run_dir: str = "") -> SiteData:
    cfg = context.node_config
    if "data-path" in cfg:  # deployment
        try:  # the one mapping of node-config keys to a reader (fedgen check-data uses it too)
            site = site_data_config(cfg)
        except ValueError as err:
            raise DataError(str(err)) from None
        data = _dataset(site.format, site.path, site.options)
    else:  # simulation: the dataset the harness described, read with the scenario's options
        run_dir = Path(run_dir or str(context.run_config.get("run-dir", "")))
        spec = DataSpec.read(run_dir)
        full = _dataset(spec.format, spec.path, spec.options)
        idx = _partition(str(run_dir / "inputs" / "partitions.npz"), int(cfg["partition-id"]))
        data = full.subset(idx, source=f"{full.source} [site {cfg['partition-id']}]")
        # feature skew before canaries: the audit scores canaries exactly as recorded
        data = with_feature_skew(data, read_site_skew(run_dir, int(cfg["partition-id"])))
        data = with_canaries(data, read_canaries(str(run_dir)), int(cfg["partition-id"]))
    return data if conditional else data.without_labels()


LEDGER_FILE = "ledger.json"
LOCK_FILE = "ledger.lock"


def simulation_state_dir(run_dir: str | Path, site: str) -> Path:
    return Path(run_dir) / "sites" / str(site)


def _ledger_file(context: Context, site: str, run_dir: str = "") -> Path | None:
    state_dir = context.node_config.get("state-dir")
    if state_dir:
        return Path(str(state_dir)) / LEDGER_FILE
    if "data-path" in context.node_config:  # deployment: the run dir is the server's, not ours
        raise DataError("this SuperNode has data-path but no state-dir in --node-config: a deployed site "
                        "must keep its privacy ledger on disk (add state-dir=\"/path/to/state\")")
    run_dir = run_dir or str(context.run_config.get("run-dir", ""))
    return simulation_state_dir(run_dir, site) / LEDGER_FILE if run_dir else None


def state_dir(context: Context, site: str, run_dir: str = "") -> Path | None:
    """The folder of the site's ledger (and of a white-box audit run's canaries), if on disk."""
    file = _ledger_file(context, site, run_dir)
    return None if file is None else file.parent


def load_ledger(context: Context, site: str, run_dir: str = "") -> SiteLedger | None:
    """The site's ledger: its state file when there is one, else ``context.state``."""
    file = _ledger_file(context, site, run_dir)
    if file is not None and file.exists():
        return SiteLedger.from_json(file.read_text())
    rec = context.state.config_records.get(_STATE_KEY)
    if rec is not None and "site-ledger" in rec:
        return SiteLedger.from_json(str(rec["site-ledger"]))
    return None


@contextmanager
def ledger_lock(context: Context, site: str, run_dir: str = "") -> Iterator[None]:
    """Hold the site's ledger exclusively for one round: read, check the budget, train,
    record the spend and write it, before the update leaves. Two runs sharing a state-dir
    (or a retried message) then see each other's spend: neither can pass the budget check
    on a stale ledger, nor overwrite the other's entry (a read-modify-write race). The
    lock is ``flock`` on ``ledger.lock`` beside the ledger; the OS drops it if the process dies."""
    file = _ledger_file(context, site, run_dir)
    if file is None:  # no file: the ledger lives in this node's context.state alone
        yield
        return
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file.parent / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def save_ledger(context: Context, ledger: SiteLedger, run_dir: str = "") -> None:
    text = ledger.to_json()
    context.state[_STATE_KEY] = ConfigRecord({"site-ledger": text})
    file = _ledger_file(context, ledger.site, run_dir)
    if file is not None:
        atomic_write_text(file, text)


def ledger_run(context: Context) -> str | None:
    """The run to record in a persistent (state-dir) ledger: it outlives Flower runs, and
    each run numbers its rounds from 1. ``None`` in simulation (one run directory)."""
    return str(context.run_id) if context.node_config.get("state-dir") else None
