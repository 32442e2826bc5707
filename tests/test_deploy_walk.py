"""docs/deploy.md, walked end to end (issue #23 item 6): every command between the
``<!-- walk: ... -->`` and ``<!-- /walk -->`` markers runs **verbatim** (bash), in the
file's order, with the shell variables of its §0 set to loopback values.

- ``walk: variables``: §0's ``export NAME=...`` lines; the test sets exactly these names;
- ``walk: operator``: run to completion on the operator's side, exit status 0;
- ``walk: operator background``: a long-running process (the SuperLink), kept running;
- ``walk: site background``: run once per site with that site's variables (two SuperNodes
  on CSV files, TLS and node authentication).

The last operator block runs ``flwr run`` and ``fedgen status`` (exit 0 only for a
completed run); the test also checks ``flwr ls`` and ``summary.json``, and that nothing was
written to the home folder (``HOME`` is an empty folder of the test).
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from fedgen.simulations.flower_engine import APP_ROOT, TAG_VAR, _bin, flower_path, free_port, kill_tagged, tagged_pids

from .conftest import REPO

DOC = REPO / "docs" / "deploy.md"
BLOCK = re.compile(r"<!-- walk: (?P<role>[a-z ]+) -->\s*```bash\n(?P<code>.*?)```\s*<!-- /walk -->", re.S)


def walk_blocks(text: str) -> list[tuple[str, str]]:
    """(role, bash code) of every walk block, in the file's order."""
    return [(m["role"].strip(), m["code"]) for m in BLOCK.finditer(text)]


def test_the_walk_blocks_are_well_formed():
    text = DOC.read_text()
    blocks = walk_blocks(text)
    assert text.count("<!-- walk:") == len(blocks) == text.count("<!-- /walk -->")
    assert {role for role, _ in blocks} == {"variables", "operator", "operator background", "site background"}
    assert blocks[0][0] == "variables"


def _csv(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    header = ",".join([f"p{i}" for i in range(x.shape[1])] + ["label"])
    rows = np.concatenate([np.round(x * 16).astype(int), y[:, None]], axis=1)
    np.savetxt(path, rows, fmt="%d", delimiter=",", header=header, comments="")


def _wait(check, what: str, timeout: float, procs: dict) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for name, (proc, log) in procs.items():
            assert proc.poll() is None, f"{name} exited: {log.read_text(errors='replace')[-3000:]}"
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.integration
@pytest.mark.slow
def test_deploy_md_runs_verbatim_on_loopback(tmp_path, digits):
    blocks = walk_blocks(DOC.read_text())
    names = re.findall(r"^export (\w+)=", blocks[0][1], re.M)
    home = tmp_path / "home"  # nothing may land here
    home.mkdir()
    ops = tmp_path / "ops"
    tag = uuid.uuid4().hex[:12]
    operator = {"OPS": str(ops), "FLWR_HOME": str(ops / "flwr-home"), "FEDGEN_APP": str(APP_ROOT),
                "SUPERLINK_HOST": "127.0.0.1", "FLEET_PORT": str(free_port()), "CONTROL_PORT": str(free_port())}
    x, y = digits.x.reshape(len(digits.x), -1).numpy(), digits.y.numpy()
    sites = []
    for i, name in enumerate(("hospital-a", "hospital-b")):
        data = tmp_path / "data" / f"{name}.csv"
        data.parent.mkdir(exist_ok=True)
        _csv(data, x[i * 230:(i + 1) * 230], y[i * 230:(i + 1) * 230])
        sites.append({"SITE_ID": name, "SITE_DATA": str(data), "SITE_STATE": str(tmp_path / "sites" / name),
                      "CA_CRT": str(ops / "keys" / "ca.crt"), "AUTH_KEY": str(ops / "keys" / "sites" / str(i) / "auth.key"),
                      "SUPERNODE_PORT": str(free_port())})
    assert set(names) == set(operator) | set(sites[0]), "§0's variables and the walk's differ"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR", "MPL", "XDG_"))}
    base.update({"HOME": str(home), "PATH": flower_path(), TAG_VAR: tag, "FLWR_DISABLE_UPDATE_CHECK": "1",
                 "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    env = {**base, **operator, **sites[0]}  # the operator's shell (a site's values unused there)
    work = tmp_path / "cwd"
    work.mkdir()
    procs: dict[str, tuple[subprocess.Popen, Path]] = {}
    outputs = []

    def background(name: str, code: str, env: dict) -> None:
        log = tmp_path / f"{name}.log"
        proc = subprocess.Popen(["bash", "-e", "-c", code], env=env, cwd=work, stdout=open(log, "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        procs[name] = (proc, log)

    def online() -> int:
        res = subprocess.run([_bin("flwr"), "supernode", "list", "fedgen", "--format", "json"], env=env, cwd=work,
                             capture_output=True, text=True, timeout=60)
        return sum(n["status"] == "online" for n in json.loads(res.stdout[res.stdout.index("{"):])["nodes"])

    def healthy() -> bool:
        ctx = ssl.create_default_context(cafile=str(ops / "keys" / "ca.crt"))
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{operator['FLEET_PORT']}/health", timeout=1, context=ctx):
                return True
        except OSError:
            return False

    try:
        for role, code in blocks[1:]:
            if role == "operator":
                done = subprocess.run(["bash", "-e", "-c", code], env=env, cwd=work, capture_output=True, text=True,
                                      timeout=600)
                outputs.append(done.stdout + done.stderr)
                assert done.returncode == 0, f"{code}\n--- exit {done.returncode}:\n{outputs[-1][-4000:]}"
            elif role == "operator background":
                background("superlink", code, env)
                _wait(healthy, "the SuperLink", 90, procs)
            elif role == "site background":
                for site in sites:
                    background(site["SITE_ID"], code, {**base, **operator, **site})
                _wait(lambda: online() == len(sites), "both SuperNodes online", 120, procs)
            else:
                raise AssertionError(f"unknown walk role {role!r}")

        run_dir = ops / "runs" / "hospitals-001"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed", summary
        assert (summary["rounds_completed"], summary["rounds_planned"]) == (3, 3)
        assert [(s["site"], s["rounds_trained"]) for s in summary["sites"]] == [("hospital-a", 3), ("hospital-b", 3)]
        assert all(0 < s["epsilon"] <= 8.0 for s in summary["sites"])
        ls = subprocess.run([_bin("flwr"), "ls", "fedgen", "--run-id", summary["flower_run_id"], "--format", "json"],
                            env=env, cwd=work, capture_output=True, text=True, timeout=60)
        assert json.loads(ls.stdout[ls.stdout.index("{"):])["runs"][0]["status"] == "finished:completed"
        assert "completed" in outputs[-1]  # fedgen status's line
        for site in sites:  # each site's Flower folder and ledger under its state directory
            state = Path(site["SITE_STATE"])
            assert (state / "ledger.json").exists() and (state / "flwr-home").is_dir()
        assert (ops / "flwr-home" / "config.toml").exists()
        assert sorted(p.name for p in home.rglob("*")) == [], "written to the home folder"
    finally:
        for proc, _ in procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc, _ in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        kill_tagged(tag)
    assert not tagged_pids(tag)
