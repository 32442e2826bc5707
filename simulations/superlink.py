"""``fedgen superlink``: flwr 1.42's SuperLink with its Control API apart from its Fleet API.

flwr 1.42 serves the Fleet, Control and Runtime APIs from one FastAPI app on one port
(``--host``/``--port``; ``--control-api-address`` and ``--fleet-api-address`` are
deprecated and ignored), and the open-source Control API authentication is a no-op plugin:
whoever reaches that port can register a SuperNode key (``flwr supernode register``) or
start a run. This command runs the very same app -- flwr's own argument parsing, lifespan,
SuperExec and state -- on two listeners:

- the **Fleet address** (``--host``/``--port``, public): ``/v1/fleet/*`` and ``/health``
  only, what SuperNodes use; every other path is answered 404;
- the **Control address** (``--control-address``, default ``127.0.0.1:9091``): every API,
  for the operator's ``flwr`` (on that machine, or through an SSH tunnel) and for the
  SuperLink's own SuperExec, which reaches the Runtime API there (docs/deploy.md §2).

It relies on two private helpers of ``flwr.superlink.cli.flower_superlink`` (the package
pins flwr <1.43), so a flwr upgrade must re-check them: tests/test_deploy.py does.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .errors import DeployConfigError

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

DEFAULT_CONTROL_ADDRESS = "127.0.0.1:9091"
FLEET_PREFIX = "/v1/fleet/"
PUBLIC_PATHS = ("/health",)


def is_fleet_path(path: str) -> bool:
    """Whether a request path may be served on the public Fleet listener."""
    if ".." in path.split("/"):  # never let a path climb out of /v1/fleet/
        return False
    return path in PUBLIC_PATHS or path.startswith(FLEET_PREFIX)


class FleetOnlyOnPort:
    """ASGI middleware: a request that arrived on ``fleet_port`` reaches the Fleet API only."""

    def __init__(self, app: ASGIApp, fleet_port: int) -> None:
        self.app = app
        self.fleet_port = fleet_port

    async def __call__(self, scope: Scope, receive, send) -> None:
        local = scope.get("server") or (None, None)
        if scope["type"] == "http" and local[1] == self.fleet_port and not is_fleet_path(scope["path"]):
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
            await send({"type": "http.response.body",
                        "body": b"not found: only the Fleet API is served on this address"})
            return
        await self.app(scope, receive, send)


def parse_host_port(address: str) -> tuple[str, int]:
    """``"127.0.0.1:9091"`` / ``"[::1]:9091"`` -> (host, port); a one-line error otherwise."""
    from flwr.supercore.address import parse_address

    parsed = parse_address(address)
    if not parsed:
        raise DeployConfigError(f"--control-address {address!r}: give HOST:PORT, e.g. {DEFAULT_CONTROL_ADDRESS}")
    host, port, _ = parsed
    return str(host), int(port)


def _bound_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def home_environment(flower_args: list[str], home: str | None = None,
                     environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Where the SuperLink and the processes it starts (SuperExec, ServerApps) may write:
    ``FLWR_HOME`` (Flower's apps, FAB cache, config) and ``MPLCONFIGDIR`` (matplotlib's
    font cache), never the home folder of whoever runs it. ``home`` (``--home``) wins; else
    an ``FLWR_HOME`` already set; else ``flwr-home`` next to ``--database``; else
    ``./flwr-home``. The folders are created (0700)."""
    environ = os.environ if environ is None else environ
    if home is None and environ.get("FLWR_HOME"):
        home = environ["FLWR_HOME"]
    if home is None:
        database = next((flower_args[i + 1] for i, arg in enumerate(flower_args[:-1]) if arg == "--database"), None)
        if database is None:
            database = next((a.split("=", 1)[1] for a in flower_args if a.startswith("--database=")), None)
        base = os.path.dirname(os.path.abspath(database)) if database and database != ":flwr-in-memory:" else "."
        home = os.path.join(base, "flwr-home")
    home = os.path.abspath(home)
    mpl = environ.get("MPLCONFIGDIR") or os.path.join(home, "matplotlib")
    for folder in (home, mpl):
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        except OSError as err:
            raise DeployConfigError(f"--home {home}: cannot create {folder} ({err.strerror}); give a folder "
                                    "this user can write") from None
    return {"FLWR_HOME": home, "MPLCONFIGDIR": mpl}


def serve(flower_args: list[str], control_address: str = DEFAULT_CONTROL_ADDRESS, home: str | None = None) -> None:
    """Run the SuperLink (``flower_args`` as for ``flower-superlink``) with its Fleet API on
    ``--host``/``--port`` and every API on ``control_address``; blocks until SIGINT/SIGTERM.
    Flower's and matplotlib's files go under ``home`` (:func:`home_environment`)."""
    os.environ.update(home_environment(flower_args, home))  # before flwr reads FLWR_HOME
    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.main import create_app

    # the module (flwr.superlink.cli re-exports a function of the same name)
    flwr_superlink = importlib.import_module("flwr.superlink.cli.flower_superlink")

    from .flower_engine import flower_path

    control_host, control_port = parse_host_port(control_address)
    os.environ["PATH"] = flower_path()  # the SuperLink spawns flower-superexec by name (finding 10a)
    sys.argv = ["flower-superlink", *flower_args]  # flwr's parser reads sys.argv
    config = flwr_superlink._parse_superlink_lifespan_config()
    fleet_host, fleet_port = config.host, config.port
    if control_port == fleet_port:
        raise DeployConfigError(f"--control-address {control_address}: use another port than the Fleet API's "
                                  f"--port {fleet_port}")
    # flwr's SuperExec dials config.host:config.port for the Runtime API: the private listener
    config = dataclasses.replace(config, host=control_host, port=control_port)
    app = FleetOnlyOnPort(create_app(config, flwr_superlink.SuperLinkLifespan), fleet_port)
    server = uvicorn.Server(uvicorn.Config(
        app, ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile, access_log=True, workers=1,
        log_config=get_uvicorn_log_config(console_handler.level)))
    print(f"fedgen superlink: Fleet API on {fleet_host}:{fleet_port}, Control and Runtime APIs on "
          f"{control_host}:{control_port} only; FLWR_HOME {os.environ['FLWR_HOME']}", flush=True)
    server.run(sockets=[_bound_socket(fleet_host, fleet_port), _bound_socket(control_host, control_port)])
