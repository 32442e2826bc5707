"""A real deployment on loopback: one SuperLink with TLS and SuperNode authentication
(``fedgen superlink``: Fleet API on one port, Control API on another),
SuperNodes started with ``flower-supernode`` (not simulation), each site with its own data
and state directory, and ``flwr run`` against the SuperLink (docs/deploy.md).

One SuperLink serves every check (each Flower start costs seconds); every process is
started with the environment tag of ``simulations.flower_engine`` and the test asserts none
is left afterwards, even when a check fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from fedgen.simulations.flower_engine import APP_ROOT, TAG_VAR, _bin, flower_path, free_port, kill_tagged, tagged_pids

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class LocalDeployment:
    """A SuperLink (TLS + node auth) and SuperNodes on 127.0.0.1, all tagged."""

    def __init__(self, tmp: Path) -> None:
        from fedgen.simulations.certs import write_federation_keys

        self.tmp = tmp
        self.tag = uuid.uuid4().hex[:12]
        self.port = free_port()  # the Fleet API: what SuperNodes (and outsiders) reach
        self.control_port = free_port()  # the Control API: the operator's `flwr` only
        self.keys = write_federation_keys(tmp / "keys", sites=["0", "1", "stranger"])
        flwr_home = tmp / "flwr-home"
        flwr_home.mkdir()
        (flwr_home / "config.toml").write_text(
            '[superlink]\ndefault = "deploy"\n\n'
            f'[superlink.deploy]\naddress = "127.0.0.1:{self.control_port}"\n'
            f'root-certificates = "{self.keys.ca_cert}"\n\n'
            # what an outsider holding ca.crt can try: the public (Fleet) address
            f'[superlink.outsider]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.keys.ca_cert}"\n')
        # PATH: flower-superlink and flower-supernode spawn flower-superexec by name
        self.env = {**os.environ, "PATH": flower_path(), TAG_VAR: self.tag, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.procs: dict[str, subprocess.Popen] = {}

    # -- processes ------------------------------------------------------------------------
    def popen(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def start_superlink(self) -> None:
        k = self.keys
        # as docs/deploy.md §2: Fleet API on --host/--port, Control API on loopback apart
        self.popen("superlink", [
            _bin("fedgen"), "superlink", "--control-address", f"127.0.0.1:{self.control_port}", "--",
            "--ssl-ca-certfile", str(k.ca_cert), "--ssl-certfile", str(k.server_cert),
            "--ssl-keyfile", str(k.server_key), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(self.port)])
        ctx = ssl.create_default_context(cafile=str(k.ca_cert))
        deadline = time.time() + 60
        while time.time() < deadline:
            assert self.procs["superlink"].poll() is None, self.log("superlink")
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{self.port}/health", timeout=1, context=ctx):
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"SuperLink did not answer: {self.log('superlink')}")

    def https_status(self, port: int, path: str) -> int:
        """The HTTP status of an empty POST to ``path`` on ``port`` (TLS verified with ca.crt)."""
        ctx = ssl.create_default_context(cafile=str(self.keys.ca_cert))
        request = urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=b"", method="POST",
                                         headers={"Content-Type": "application/protobuf"})
        try:
            with urllib.request.urlopen(request, timeout=10, context=ctx) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([_bin("flwr"), *args], env=self.env, cwd=self.tmp, capture_output=True, text=True,
                              timeout=timeout)

    def register(self, site: str) -> int:
        res = self.flwr("supernode", "register", str(self.keys.site_public_keys[site]), "deploy", "--format", "json")
        assert res.returncode == 0, res.stdout + res.stderr
        return int(json.loads(res.stdout[res.stdout.index("{"):])["node-id"])

    def online(self) -> int:
        res = self.flwr("supernode", "list", "deploy", "--format", "json")
        nodes = json.loads(res.stdout[res.stdout.index("{"):])["nodes"]
        return sum(n["status"] == "online" for n in nodes)

    def wait_online(self, n: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.online() == n:
                return
            time.sleep(0.5)
        raise AssertionError(f"expected {n} online SuperNodes, have {self.online()}")

    def start_supernode(self, name: str, *, key: str | None, node_config: dict[str, object] | None = None,
                        tls: bool = True, retries: int | None = None) -> subprocess.Popen:
        cmd = [_bin("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port())]
        cmd += ["--root-certificates", str(self.keys.ca_cert)] if tls else ["--insecure"]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(self.keys.site_private_keys[key])]
        if node_config:
            cmd += ["--node-config", " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items())]
        if retries is not None:
            cmd += ["--max-retries", str(retries), "--max-wait-time", "15"]
        return self.popen(name, cmd)

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def start_run(self, run_dir: Path) -> str:
        """``flwr run --stream`` the app against the SuperLink in the background; its name."""
        name = f"flwr-run-{run_dir.name}"
        self.popen(name, [_bin("flwr"), "run", str(APP_ROOT), "deploy", "--run-config", f'run-dir="{run_dir}"',
                          "--stream"])
        return name

    def wait_run(self, name: str, timeout: float = 300) -> tuple[str, str]:
        """Wait for a ``start_run``; returns the Flower run id and its final status."""
        self.procs[name].wait(timeout=timeout)
        self.procs.pop(name)
        m = re.search(r"started run (\d+)", self.log(name))
        assert m, self.log(name)
        ls = self.flwr("ls", "deploy", "--run-id", m.group(1), "--format", "json")
        return m.group(1), json.loads(ls.stdout[ls.stdout.index("{"):])["runs"][0]["status"]

    def run(self, run_dir: Path, timeout: float = 300) -> str:
        """``flwr run`` the app against the SuperLink; returns Flower's final run status."""
        return self.wait_run(self.start_run(run_dir), timeout)[1]

    def stop_sites(self) -> None:
        """SIGTERM every running SuperNode (their sites deactivate) and wait until none is online."""
        for name in [n for n in self.procs if n.startswith("site")]:
            self.stop(name)
        self.wait_online(0, timeout=150)

    def close(self) -> None:
        for name in list(self.procs):
            try:
                self.stop(name)
            except Exception:
                pass
        kill_tagged(self.tag)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    dep = LocalDeployment(tmp_path_factory.mktemp("deploy"))
    try:
        dep.start_superlink()
        yield dep
    finally:
        dep.close()
        left = tagged_pids(dep.tag)
        assert not left, f"processes left behind: {left}"


@pytest.fixture(scope="module")
def registered(deployment) -> dict[str, int]:
    """Sites 0 and 1 registered with the SuperLink ("stranger" never is); their node ids."""
    return {site: deployment.register(site) for site in ("0", "1")}


@pytest.fixture(scope="module")
def sites(deployment, digits):
    """Site 0: an .npz; site 1: a folder of 8x8 PNGs with class sub-folders."""
    from PIL import Image

    tmp = deployment.tmp
    np.savez(tmp / "site0.npz", x=digits.x[:300].numpy(), y=digits.y[:300].numpy())
    for i in range(300, 600):
        folder = tmp / "site1" / str(int(digits.y[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.x[i, 0].numpy() * 255).round().astype(np.uint8)).save(folder / f"{i}.png")
    return {
        "0": {"data-path": str(tmp / "site0.npz"), "data-format": "npz", "site-id": "site0",
              "state-dir": str(tmp / "state0")},
        "1": {"data-path": str(tmp / "site1"), "data-format": "images", "site-id": "site1",
              "state-dir": str(tmp / "state1")},
    }


def _run_dir(tmp: Path, name: str, *, rounds: int, num_sites: int, target_epsilon: float) -> Path:
    from fedgen.simulations.prepare import write_deployment_run_dir
    from fedgen.contract.scenario import scenario_from_dict

    scenario = scenario_from_dict({
        "name": name, "seed": 0,
        "federation": {"num_sites": num_sites, "rounds": rounds, "min_fit_sites": num_sites,
                       "round_timeout_s": 120},
        "model": {"family": "vae", "hidden": 64, "latent_dim": 4},
        "training": {"local_steps": 3, "batch_size": 32, "lr": 0.002},
        "privacy": {"enabled": True, "target_epsilon": target_epsilon},
        "evaluation": {"every": 0, "num_samples": 20},
        "simulation": {"device": "cpu"},
        "deployment": {"data_shape": [1, 8, 8], "num_classes": None}})
    return write_deployment_run_dir(scenario, tmp / name)


def test_unregistered_key_and_plain_http_are_refused(deployment, registered):
    stranger = deployment.start_supernode("stranger", key="stranger", retries=1)
    plain = deployment.start_supernode("plain", key=None, tls=False, retries=1)
    assert stranger.wait(timeout=90) != 0 and plain.wait(timeout=90) != 0
    # the SuperLink refused the key, not the network
    assert "Failed to activate SuperNode" in deployment.log("stranger")
    assert "No SuperNode found with the given public key" in deployment.log("superlink")
    # a plain-HTTP SuperNode never gets an answer from the TLS endpoint: Flower's exit code
    # 305 (the underlying message varies with timing: "Server disconnected without sending
    # a response" on an idle machine, another transport error under load)
    plain_log = deployment.log("plain")
    assert "Exit Code: 305" in plain_log and "could not establish a connection" in plain_log, plain_log[-1500:]
    assert deployment.online() == 0


def test_two_sites_train_with_dp_then_a_restarted_site_keeps_its_history(deployment, registered, sites):
    deployment.start_supernode("site0", key="0", node_config=sites["0"])
    deployment.start_supernode("site1", key="1", node_config=sites["1"])
    deployment.wait_online(2)
    run1 = _run_dir(deployment.tmp, "run1", rounds=2, num_sites=2, target_epsilon=5.0)
    assert deployment.run(run1).startswith("finished:completed"), deployment.log("site0")
    privacy = json.loads((run1 / "privacy.json").read_text())
    assert sorted(privacy["sites"]) == ["site0", "site1"] and privacy["epsilon"] > 0
    for site in privacy["sites"].values():
        assert [h["round"] for h in site["history"]] == [1, 2] and 0 < site["epsilon"] <= 5.0
        assert len({h["run"] for h in site["history"]}) == 1
    on_disk = json.loads((Path(sites["0"]["state-dir"]) / "ledger.json").read_text())
    assert on_disk["history"] == privacy["sites"]["site0"]["history"]  # the site's file is the source
    # no reference set at the server and evaluation.federated off (the default): no site is
    # asked for a loss on its data; the summary says the run completed, site by site
    last = [json.loads(line) for line in (run1 / "metrics.jsonl").read_text().splitlines()][-1]
    assert "federated_eval_sites" not in last and "federated_eval_loss" not in last
    summary = json.loads((run1 / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_planned"] == 2
    assert [(s["site"], s["rounds_trained"], s["failures"]) for s in summary["sites"]] == \
        [("site0", 2, []), ("site1", 2, [])]

    # kill site 0 hard, restart it on the same state dir; a second run continues its ledger
    # (the SuperLink refuses a second activation of a key it still sees online, so wait
    # until the dead node misses its heartbeats: up to 2 x 30 s in flwr 1.42)
    deployment.stop("site0", signal.SIGKILL)
    deployment.wait_online(1, timeout=150)
    deployment.start_supernode("site0", key="0", node_config=sites["0"])
    deployment.wait_online(2)
    run2 = _run_dir(deployment.tmp, "run2", rounds=1, num_sites=2, target_epsilon=8.0)
    assert deployment.run(run2).startswith("finished:completed")
    after = json.loads((run2 / "privacy.json").read_text())["sites"]["site0"]
    assert after["history"][:2] == on_disk["history"]  # nothing forgotten
    assert len(after["history"]) == 3 and after["history"][2]["round"] == 1
    assert after["history"][2]["run"] != after["history"][0]["run"]
    assert after["epsilon"] > on_disk["epsilon"]


def test_a_site_whose_budget_is_spent_refuses(deployment, sites):
    # site 0's ledger (state dir) already holds more than its own cap allows
    spent = json.loads((Path(sites["0"]["state-dir"]) / "ledger.json").read_text())
    assert spent["epsilon"] > 1.0
    deployment.stop_sites()
    deployment.start_supernode("site0", key="0", node_config={**sites["0"], "max-epsilon": 1.0})
    deployment.wait_online(1)
    run3 = _run_dir(deployment.tmp, "run3", rounds=2, num_sites=1, target_epsilon=8.0)
    # a run refused for budget is not a success: Flower shows it failed, the summary says why
    assert deployment.run(run3).startswith("finished:failed")
    summary = json.loads((run3 / "summary.json").read_text())
    rows = [json.loads(line) for line in (run3 / "metrics.jsonl").read_text().splitlines()]
    assert summary["stopped_reason"] == "budget_exhausted" and summary["rounds_completed"] == 0
    assert summary["status"] == "stopped_early" and summary["sites"][0]["rounds_refused"] == 1
    assert rows[0]["clients_refused"] == 1 and rows[0]["clients_ok"] == 0
    after = json.loads((Path(sites["0"]["state-dir"]) / "ledger.json").read_text())
    assert after["history"] == spent["history"]  # not one more step was charged


def test_a_supernode_killed_mid_run_rejoins_and_its_ledger_continues(deployment, registered, sites):
    """Site 0 is SIGKILLed once it has charged round 1 of a 3-round run and restarted with
    the same key, node config and state dir: the run completes, and the site's ledger holds
    every round it trained exactly once, all under this run's id."""
    from fedgen.privacy.accounting import make_accountant

    deployment.stop_sites()  # earlier checks leave SuperNodes with other state dirs running
    config = {k: {**cfg, "state-dir": str(deployment.tmp / f"restart-state{k}")} for k, cfg in sites.items()}
    for k, cfg in config.items():
        deployment.start_supernode(f"site{k}", key=k, node_config=cfg)
    deployment.wait_online(2)
    run_dir = _run_dir(deployment.tmp, "restart", rounds=3, num_sites=2, target_epsilon=8.0)
    flwr_run = deployment.start_run(run_dir)

    ledger_file = Path(config["0"]["state-dir"]) / "ledger.json"
    deadline = time.time() + 300
    while not (ledger_file.exists() and json.loads(ledger_file.read_text())["history"]):
        assert time.time() < deadline and deployment.procs[flwr_run].poll() is None, deployment.log(flwr_run)
        time.sleep(0.1)
    before = json.loads(ledger_file.read_text())["history"]
    assert [h["round"] for h in before] == [1]
    deployment.stop("site0", signal.SIGKILL)
    # The SuperLink refuses the key while it still counts the dead node online, i.e. until
    # it misses its heartbeats (up to 2 x 30 s in flwr 1.42); a round sent to it meanwhile
    # gets Flower's "Node Unavailable" error reply. Then the same key rejoins as the same node.
    deployment.wait_online(1, timeout=150)
    deployment.start_supernode("site0-restarted", key="0", node_config=config["0"])
    deployment.wait_online(2)
    run_id, status = deployment.wait_run(flwr_run, timeout=600)
    # every round aggregated, but one round's update from site 0 never arrived: the run
    # completed with failures, which Flower shows as failed (the summary names the round)
    assert status.startswith("finished:failed"), deployment.log(flwr_run)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed_with_failures" and summary["flower_run_id"] == run_id
    assert [s["site"] for s in summary["sites"] if s["failures"]] == ["site0"]

    ledger = json.loads(ledger_file.read_text())
    rounds = [h["round"] for h in ledger["history"]]
    assert ledger["history"][0] == before[0]  # round 1 as charged before the kill
    assert rounds == sorted(set(rounds)) and rounds[0] == 1 and rounds[-1] == 3  # none twice; 3 after the restart
    assert f"SuperNode ID: {registered['0']}" in deployment.log("site0-restarted")  # the same node again
    assert {h["run"] for h in ledger["history"]} == {run_id}
    fresh = make_accountant(ledger["accountant"], [(h["noise_multiplier"], h["sample_rate"], h["steps"])
                                                   for h in ledger["history"]])
    assert ledger["epsilon"] == pytest.approx(fresh.get_epsilon(delta=ledger["delta"]), rel=1e-9)
    assert ledger["history"][-1]["epsilon"] == pytest.approx(ledger["epsilon"], rel=1e-9)
    server = json.loads((run_dir / "privacy.json").read_text())["sites"]["site0"]
    assert server["history"] == ledger["history"] and server["epsilon"] == ledger["epsilon"]
    assert json.loads((run_dir / "summary.json").read_text())["rounds_completed"] == 3
