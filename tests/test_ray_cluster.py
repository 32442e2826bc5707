"""The ``flower`` engine on an existing Ray cluster (``simulation.ray_address``) and the Ray
resources its sites get (``client_cpus``, fractional ``client_gpus``): docs/simulation.md,
"A Ray cluster". The slow test starts a private two-node cluster on loopback and ends it by
its own process groups and environment tag (never ``ray stop``: other Ray instances on
this machine are not ours)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import torch

from fedgen.contract.errors import ScenarioError
from fedgen.contract.scenario import load_scenario
from fedgen.simulations.flower_engine import (TAG_VAR, FlowerRunError, check_ray_address, free_port, kill_tagged,
                                              tagged_pids)
from fedgen.simulations.runner import flower_simulation

from .conftest import REPO
from .test_simulation_flower import QUICK, fedgen, fedgen_processes

QUICKSTART = REPO / "scenarios" / "quickstart.yaml"
FLOWER = "simulation.engine=flower"


def _flower_sim(*overrides: str):
    sim = flower_simulation(load_scenario(QUICKSTART, [FLOWER, *overrides]))
    shutil.rmtree(sim.tmp)  # the engine's temp folder: nothing is started here
    return sim


# -- the scenario's checks: one line each ----------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["simulation.ray_address=127.0.0.1:6379"],
     "simulation: ray_address: the inprocess engine runs no Ray; set simulation.engine: flower"),
    ([FLOWER, "simulation.ray_address=ray://10.0.0.5:10001"], "simulation.ray_address: give the cluster's address "
     "as host:port"),
    ([FLOWER, "simulation.ray_address=10.0.0.5"], "simulation.ray_address: expected host:port"),
    ([FLOWER, "simulation.ray_address=10.0.0.5:99999"], "simulation.ray_address: expected host:port"),
    ([FLOWER, "simulation.client_cpus=0.5"], "simulation: client_cpus: Flower gives each site's Ray actor whole CPUs"),
])
def test_a_bad_ray_setting_is_refused_in_one_line(overrides, message):
    with pytest.raises(ScenarioError) as err:
        load_scenario(QUICKSTART, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("command, target", [
    ("simulate", QUICKSTART), ("sweep", REPO / "sweeps" / "privacy-utility-digits.yaml")])
def test_an_unreachable_cluster_stops_the_command_in_one_line_before_writing_anything(tmp_path, command, target):
    port = free_port()  # nothing listens there
    res = fedgen(command, target, "--out", tmp_path / "out", "--set", FLOWER,
                 "--set", f"simulation.ray_address=127.0.0.1:{port}", cwd=tmp_path)
    assert res.returncode == 1
    (line,) = [l for l in res.stderr.splitlines() if l.strip()]
    assert line.startswith(f"fedgen: error: simulation.ray_address: no Ray cluster answers at 127.0.0.1:{port}")
    assert not (tmp_path / "out").exists() and fedgen_processes() == []



@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_gpu_share_without_a_gpu_is_refused_before_writing_anything(tmp_path):
    res = fedgen("simulate", QUICKSTART, "--out", tmp_path / "out", "--set", FLOWER,
                 "--set", "simulation.client_gpus=0.5", cwd=tmp_path)
    assert res.returncode == 1
    (line,) = [l for l in res.stderr.splitlines() if l.strip()]
    assert line == ("fedgen: error: simulation.client_gpus: 0.5 of a GPU per site, but this machine has no CUDA "
                    "GPU, so Ray would place no site; set client_gpus: 0, or ray_address to a cluster with GPUs")
    assert not (tmp_path / "out").exists()

# -- what Flower receives ------------------------------------------------------------------

def _backend_config(sim) -> dict:
    """The Ray backend config flwr-simulation builds from ``flwr run --federation-config``
    (Flower 1.42's own parsing: flwr/cli/run/run.py, then flwr/simulation/app.py)."""
    from flwr.common.config import parse_config_args
    from flwr.simulation.app import _run_simulation_settings
    from flwr.supercore.utils import simulation_config_from_json

    parsed = {k.replace("-", "_"): v for k, v in parse_config_args([sim.federation_config()]).items()}
    num_supernodes, backend, config, _, _ = _run_simulation_settings(simulation_config_from_json(parsed))
    return {"num_supernodes": num_supernodes, "backend": backend, **config}


def test_a_fraction_of_a_gpu_reaches_ray_s_client_resources():
    sim = _flower_sim("simulation.client_cpus=2", "simulation.client_gpus=0.25")
    assert _backend_config(sim) == {"num_supernodes": 5, "backend": "ray", "init_args": {},
                                    "client_resources": {"num_cpus": 2, "num_gpus": 0.25}}
    # no init_args: with a cluster, ray.init must not be given num_cpus / num_gpus


def test_ray_address_reaches_flwr_simulation_s_ray_init_and_only_when_set(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:1")  # a stray one in the user's shell
    assert "RAY_ADDRESS" not in _flower_sim().env  # a private Ray, as before
    sim = _flower_sim("simulation.ray_address=127.0.0.1:6380")
    assert sim.env["RAY_ADDRESS"] == "127.0.0.1:6380" and sim.ray_address == "127.0.0.1:6380"


def test_check_ray_address_names_the_address():
    port = free_port()
    with pytest.raises(FlowerRunError, match=rf"^simulation.ray_address: no Ray cluster answers at 127.0.0.1:{port} "):
        check_ray_address(f"127.0.0.1:{port}")


# -- a local two-node cluster ------------------------------------------------------------------

class LocalRayCluster:
    """``ray start --head`` plus ``ray start --address`` on loopback, one CPU each; every
    process carries this cluster's own tag, and each ``ray start`` its own session."""

    def __init__(self) -> None:
        self.tag = f"raycluster-{uuid.uuid4().hex[:10]}"
        self.port = free_port()
        # short: Ray's unix socket paths under it must stay below 108 characters
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update({TAG_VAR: self.tag, "RAY_USAGE_STATS_ENABLED": "0", "PATH": os.pathsep.join(
            [str(Path(sys.executable).parent), os.environ.get("PATH", "")])})
        self.groups: set[int] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _ray_start(self, *args: str) -> None:
        ray = shutil.which("ray", path=self.env["PATH"])
        proc = subprocess.Popen([ray, "start", "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
                                 "--object-store-memory", str(100 * 2**20), "--disable-usage-stats",
                                 "--dashboard-agent-listen-port", str(free_port()), *args],
                                env=self.env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        self.groups.add(proc.pid)  # its own session and process group: everything it starts
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out[-3000:]

    def start(self) -> None:
        self._ray_start("--head", "--port", str(self.port), "--temp-dir", str(self.temp_dir),
                        "--include-dashboard=false", "--ray-client-server-port", str(free_port()))
        self._ray_start("--address", self.address)

    def query(self, code: str) -> object:
        """Run ``code`` (which prints one JSON value) as a driver on this cluster."""
        script = f"import json, ray\nray.init(address={self.address!r}, logging_level='ERROR')\n{code}"
        res = subprocess.run([sys.executable, "-c", script], env=self.env, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout.strip().splitlines()[-1])

    def pids(self) -> list[int]:
        return tagged_pids(self.tag)

    def stop(self) -> None:
        """SIGTERM this cluster's process groups, then SIGTERM/SIGKILL whatever still
        carries its tag (a Ray worker may have started its own group)."""
        for group in self.groups:
            try:
                os.killpg(group, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while time.time() < deadline and self.pids():
            time.sleep(0.2)
        kill_tagged(self.tag)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def ray_cluster():
    cluster = LocalRayCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        assert cluster.pids() == [], "a process of the test's Ray cluster outlived it"


@pytest.mark.slow
@pytest.mark.integration
def test_two_rounds_on_a_local_two_node_ray_cluster(tmp_path, ray_cluster):
    nodes = ray_cluster.query("print(json.dumps(sorted(n['NodeID'] for n in ray.nodes() if n['Alive'])))")
    assert len(nodes) == 2

    out = tmp_path / "run"
    sets = [FLOWER, f"simulation.ray_address={ray_cluster.address}", "simulation.client_cpus=1", *QUICK,
            "federation.rounds=2", "warm_start=null"]
    res = fedgen("simulate", QUICKSTART, "--out", out, *[a for s in sets for a in ("--set", s)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_reason"] == "completed" and summary["rounds_completed"] == 2
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients_ok"]) for r in rows] == [(1, 5), (2, 5)]
    assert fedgen_processes() == []  # the run's own processes (SuperLink, flwr-simulation) are gone

    # the run was a driver of this cluster (not a private Ray): its job is over, and its
    # site actors -- one CPU each, one CPU per node -- ran on both nodes
    jobs = ray_cluster.query(
        "import ray._private.state as s\n"
        "print(json.dumps([[j['JobID'], j['IsDead'], j.get('Entrypoint', '')] for j in s.state.job_table()]))")
    (flower_job,) = [(job, dead) for job, dead, entry in jobs if "flwr-simulation" in entry]
    assert flower_job[1] is True
    actor_nodes = ray_cluster.query(
        "import ray._private.state as s\n"
        f"print(json.dumps(sorted(a['Address']['NodeID'] for a in s.state.actor_table(None).values() "
        f"if a['ActorClassName'] == 'ClientAppActor' and a['JobID'] == {flower_job[0]!r})))")
    assert sorted(set(actor_nodes)) == nodes
    assert ray_cluster.pids()  # the cluster itself outlives the run: fedgen never stops it


# -- GPUs ----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: two Ray actors share one GPU at "
                    "simulation.client_gpus=0.5 (CPU-only here)")
def test_sites_share_a_gpu_at_half_a_gpu_each(tmp_path):
    out = tmp_path / "run"
    sets = [FLOWER, "simulation.client_gpus=0.5", "simulation.device=cuda", *QUICK, "federation.rounds=2",
            "warm_start=null"]
    res = fedgen("simulate", QUICKSTART, "--out", out, *[a for s in sets for a in ("--set", s)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients_ok"]) for r in rows] == [(1, 5), (2, 5)]
    assert fedgen_processes() == []

