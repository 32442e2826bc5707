"""Finding 3: the Control API is bound apart from the Fleet API (docs/deploy.md §2).

flwr 1.42 serves Fleet, Control and Runtime APIs on one port with a no-op Control API
authentication, so whoever holds the public ``ca.crt`` and reaches that port could register
a key of their own and start runs. ``fedgen superlink`` (the documented way to start the
SuperLink) serves only the Fleet API on the public address, everything else on loopback.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from fedgen.simulations.certs import make_auth_key_pair
from fedgen.simulations.flower_engine import APP_ROOT

from .test_deploy import LocalDeployment, deployment  # noqa: F401 -- the fixture: a SuperLink as deploy.md §2 starts it

pytestmark = pytest.mark.integration

CONTROL_AND_RUNTIME = ("/v1/control/register-node", "/v1/control/start-run", "/v1/control/list-nodes",
                       "/v1/runtime/acquire-task", "/v1/fleet/../control/start-run")


def _json(res) -> dict:
    """`flwr ... --format json`'s answer (flwr exits 0 even when it reports an error)."""
    return json.loads(res.stdout[res.stdout.index("{"):])


def _nodes(dep: LocalDeployment) -> list[dict]:
    return _json(dep.flwr("supernode", "list", "deploy", "--format", "json"))["nodes"]


def test_finding3_outsider_with_ca_crt_cannot_register_a_node_nor_start_a_run(deployment):
    dep = deployment
    _, public = make_auth_key_pair(comment="outsider")
    (dep.tmp / "outsider.pub").write_bytes(public)

    # the outsider knows the public (Fleet) address and ca.crt: `[superlink.outsider]` in config.toml
    refused = _json(dep.flwr("supernode", "register", str(dep.tmp / "outsider.pub"), "outsider", "--format", "json"))
    assert refused["success"] is False and "node-id" not in refused, refused
    assert "404 Not Found" in refused["error-message"] and "/v1/control/register-node" in refused["error-message"]
    refused = _json(dep.flwr("run", str(APP_ROOT), "outsider", "--format", "json", timeout=120))
    assert refused["success"] is False and "run-id" not in refused, refused
    assert "404 Not Found" in refused["error-message"], refused
    # whatever the client, the Fleet listener serves no Control or Runtime path
    assert [dep.https_status(dep.port, path) for path in CONTROL_AND_RUNTIME] == [404] * len(CONTROL_AND_RUNTIME)

    # the operator, on the loopback Control address, can
    assert dep.https_status(dep.control_port, "/v1/control/list-nodes") != 404
    assert _nodes(dep) == []
    node_id = dep.register("0")
    assert [int(n["node-id"]) for n in _nodes(dep)] == [node_id]  # only the operator's key
    assert _json(dep.flwr("ls", "deploy", "--format", "json"))["runs"] == []  # the outsider started none

    # and a registered SuperNode still joins through the Fleet address
    dep.start_supernode("site0", key="0")
    dep.wait_online(1)


def test_finding3_the_fleet_listener_admits_fleet_paths_only(monkeypatch):
    from fedgen.simulations.errors import DeployConfigError
    from fedgen.simulations.superlink import is_fleet_path, serve

    assert [is_fleet_path(p) for p in ("/v1/fleet/activate-node", "/v1/fleet/pull-messages", "/health")] == [True] * 3
    blocked = ("/v1/control/register-node", "/v1/control/start-run", "/v1/runtime/acquire-task",
               "/v1/fleet/../control/start-run", "/docs", "/v1/fleet")
    assert [is_fleet_path(p) for p in blocked] == [False] * len(blocked)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # serve() hands flwr's parser its arguments there
    monkeypatch.setenv("PATH", os.environ["PATH"])
    with pytest.raises(DeployConfigError, match="use another port than the Fleet API's --port 9093"):
        serve(["--insecure", "--host", "127.0.0.1", "--port", "9093"], control_address="127.0.0.1:9093")
