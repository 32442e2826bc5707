"""Where a node's data and privacy state live.

- Simulation: the node is ``partition-id`` of ``num-partitions``; its examples are that
  partition of the dataset the harness described in ``<run-dir>/inputs/``. Its state
  directory is ``<run-dir>/sites/<site>/``, so the ledger survives a resumed run (Flower's
  ``context.state`` only lives for one Flower run; we keep a copy there too).
- Deployment: the SuperNode's ``--node-config`` names ``data-path`` (and optionally
  ``data-format``, ``site-id``, ``state-dir``); with a ``state-dir`` the ledger is a file
  there, written atomically, so a restarted SuperNode never forgets what it spent.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context

from privacy.ledger import SiteLedger, atomic_write_text

from .data import SiteData, load_data

_STATE_KEY = "fedgen"


@lru_cache(maxsize=4)
def _dataset(fmt: str, path: str | None) -> SiteData:
    return load_data(fmt, path)  # cached: Ray actors live for the whole run


@lru_cache(maxsize=64)
def _partition(partitions_file: str, site: int) -> np.ndarray:
    with np.load(partitions_file) as z:
        return z[f"site_{site}"]


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
        path = str(cfg["data-path"])
        fmt = str(cfg.get("data-format") or ("npz" if path.endswith(".npz") else "mnist"))
        data = _dataset(fmt, path)
    else:  # simulation
        run_dir = Path(run_dir or str(context.run_config.get("run-dir", "")))
        spec = json.loads((run_dir / "inputs" / "site_data.json").read_text())
        full = _dataset(spec["format"], spec["path"])
        idx = _partition(str(run_dir / "inputs" / "partitions.npz"), int(cfg["partition-id"]))
        data = full.subset(idx, source=f"{full.source} [site {cfg['partition-id']}]")
    return data if conditional else data.without_labels()


LEDGER_FILE = "ledger.json"


def simulation_state_dir(run_dir: str | Path, site: str) -> Path:
    return Path(run_dir) / "sites" / str(site)


def _ledger_file(context: Context, site: str, run_dir: str = "") -> Path | None:
    state_dir = context.node_config.get("state-dir")
    if state_dir:
        return Path(str(state_dir)) / LEDGER_FILE
    run_dir = run_dir or str(context.run_config.get("run-dir", ""))
    return simulation_state_dir(run_dir, site) / LEDGER_FILE if run_dir else None


def load_ledger(context: Context, site: str, run_dir: str = "") -> SiteLedger | None:
    """The site's ledger: its state file when there is one, else ``context.state``."""
    file = _ledger_file(context, site, run_dir)
    if file is not None and file.exists():
        return SiteLedger.from_json(file.read_text())
    rec = context.state.config_records.get(_STATE_KEY)
    if rec is not None and "site-ledger" in rec:
        return SiteLedger.from_json(str(rec["site-ledger"]))
    return None


def save_ledger(context: Context, ledger: SiteLedger, run_dir: str = "") -> None:
    text = ledger.to_json()
    context.state[_STATE_KEY] = ConfigRecord({"site-ledger": text})
    file = _ledger_file(context, ledger.site, run_dir)
    if file is not None:
        atomic_write_text(file, text)
