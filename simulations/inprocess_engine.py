"""Run a prepared run directory in this process: Flower's own ServerApp and ClientApp, their
messages delivered by direct calls (``simulation.engine: inprocess``).

No SuperLink, SuperExec, flwr-simulation or Ray: :class:`InProcessGrid` is a
``flwr.serverapp.Grid`` whose ``send_and_receive`` hands each message to the ClientApp of its
destination node and returns the replies as soon as the last one exists -- no polling, no
process start-up. What the ClientApp sees is what Flower's simulation runtime gives it
(flwr 1.42, ``flwr/server/superlink/fleet/vce/vce_api.py``):

- each node has a random node id and a persistent ``Context`` with ``node_config``
  ``{"partition-id": i, "num-partitions": n}``, the app's run config fused with the same
  overrides the Flower engine passes (``--run-config``), and a ``state`` kept across rounds;
- a ClientApp exception becomes an error reply with ``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``
  and Flower's reason text, and the context changes of that call are dropped (Flower's
  actor works on a copy that is then lost);
- messages get ids and ``reply_to`` links as the in-memory SuperLink gives them, the
  ClientApp receives a copy of each message (Flower serialises it), and
  ``TaskIdentity`` names this run and the SuperLink node, so ``Message(...)`` built by the
  ServerApp carries the run id.

Sites train one after another. The round deadline is kept on a per-reply clock (as if
every site ran in parallel, like Flower with enough actors): a reply that took longer than
``timeout`` to produce is not returned (docs/simulation.md, "Engines").
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import secrets
import time
import traceback
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import cast

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.common.config import get_fused_config_from_dir, get_project_config
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY, SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from .errors import SimulationRunError
from .flower_engine import APP_ROOT

log = logging.getLogger(__name__)

UserConfig = dict[str, str | int | float | bool]
_clock = time.monotonic  # a reply's own duration is measured on it (a test replaces it)


def _random_id() -> int:
    """A 63-bit id, as Flower draws run and node ids; never from ``random``, whose state the
    ServerApp seeds and checkpoints."""
    return secrets.randbits(63) or 1


#: The Flower components of the installed package (pyproject.toml's [tool.flwr.app.components]).
INSTALLED_COMPONENTS = {"serverapp": "fedgen.server.app:app", "clientapp": "fedgen.client.app:app"}


def _load_component(reference: str) -> object:
    """The object ``module:attribute`` names (``[tool.flwr.app.components]``). Imported from
    the installed package rather than with Flower's ``load_app``, which puts the app folder
    first on ``sys.path`` -- in this process that would let the repository's folders
    (``client``, ``privacy``, ...) shadow installed modules of the same name."""
    module, _, attribute = reference.partition(":")
    obj: object = importlib.import_module(module)
    for name in attribute.split("."):
        obj = getattr(obj, name)
    return obj


def _error_reply(message: Message, err: Exception) -> Message:
    """The reply Flower's simulation runtime makes of a ClientApp exception (``worker`` in
    ``vce_api.py``: the actor re-raises it as a ``ClientAppException``)."""
    wrapped = err if isinstance(err, ClientAppException) else ClientAppException(str(err))
    reason = str(type(wrapped)) + ":<'" + str(wrapped) + "'>"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


class SimulatedNode:
    """One simulated SuperNode: its id, its persistent ``Context``, and the ClientApp."""

    def __init__(self, node_id: int, partition_id: int, num_partitions: int, run_id: int,
                 run_config: UserConfig, client_app: ClientApp) -> None:
        self.node_id, self.client_app = node_id, client_app
        self.run_config = dict(run_config)
        self.context = Context(run_id=run_id, node_id=node_id,
                               node_config={PARTITION_ID_KEY: partition_id, NUM_PARTITIONS_KEY: num_partitions},
                               state=RecordDict(), run_config=dict(run_config))

    def handle(self, message: Message) -> Message:
        """Run the ClientApp on (a copy of) ``message``; an exception becomes an error reply."""
        context = copy.deepcopy(self.context)  # committed only if the call succeeds
        try:
            reply = self.client_app(copy.deepcopy(message), context)
            if context.run_config != self.run_config:  # Flower refuses this too (update_context)
                raise ValueError(f"The `run_config` field of the `Context` object cannot be modified "
                                 f"(run_id: {context.run_id}).")
        except Exception as err:  # noqa: BLE001 -- as Flower: any ClientApp failure is a reply
            log.error("node %d (partition %s): the ClientApp raised %s: %s", self.node_id,
                      self.context.node_config[PARTITION_ID_KEY], type(err).__name__, err)
            log.info("%s", traceback.format_exc())  # shown with --verbose
            reply = _error_reply(message, err)
        else:
            self.context = context
        reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        return reply


class InProcessGrid(Grid):
    """A ``Grid`` that delivers each message by calling its node's ClientApp directly."""

    def __init__(self, nodes: Iterable[SimulatedNode]) -> None:
        self.nodes = {node.node_id: node for node in nodes}
        self._run: Run | None = None
        self._replies: dict[str, Message] = {}  # message id -> reply not yet pulled

    def set_run(self, run: Run) -> None:
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run

    @property
    def run(self) -> Run:
        return Run(**vars(cast(Run, self._run)))

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def _check_message(self, message: Message) -> None:
        """The in-memory SuperLink's checks (``InMemoryGrid._check_message``) plus a known node."""
        meta = message.metadata
        if not (meta.message_id and not meta.reply_to_message_id and meta.ttl > 0 and not meta.delivered_at):
            raise ValueError(f"Invalid message: {message}")
        if meta.dst_node_id not in self.nodes:
            raise ValueError(f"Invalid message: no node {meta.dst_node_id} in this simulation")

    def _deliver(self, messages: Iterable[Message], timeout: float | None) -> list[str]:
        """Give every message an id, run its node's ClientApp, keep the replies produced
        within ``timeout`` seconds of the call (each reply on its own clock)."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self._check_message(message)
            ids.append(message.metadata.message_id)
            started = _clock()
            reply = self.nodes[message.metadata.dst_node_id].handle(message)
            if timeout is None or _clock() - started <= timeout:
                self._replies[message.metadata.message_id] = reply
        return ids

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._deliver(messages, timeout=None)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = self._deliver(messages, timeout)
        replies = self.pull_messages(ids)
        self._replies.clear()  # a late reply never arrives later either
        return replies


@contextlib.contextmanager
def _task_identity(run_id: int) -> Iterator[None]:
    """Name this run and the SuperLink node as the sender of the ServerApp's messages, as
    ``flwr-serverapp`` does (``Message(...)`` reads ``TaskIdentity``); restored after."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@contextlib.contextmanager
def _app_logging(verbose: bool) -> Iterator[None]:
    """The apps' logs: all of them with ``--verbose`` (as the Flower engine streams its
    processes' output), else fedgen's warnings and errors and Flower's errors (Flower's
    warnings, e.g. that the strategy skips federated evaluation, are not the user's to act
    on). The ServerApp's ``logging.basicConfig(INFO)`` changes nothing once the CLI has
    configured logging; Flower's ``flwr`` logger has its own console handler, so it does not
    propagate too."""
    root, flwr_logger = logging.getLogger(), logging.getLogger("flwr")
    saved = root.level, flwr_logger.level, flwr_logger.propagate
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    flwr_logger.setLevel(logging.INFO if verbose else logging.ERROR)
    flwr_logger.propagate = False
    try:
        yield
    finally:
        root.setLevel(saved[0])
        flwr_logger.setLevel(saved[1])
        flwr_logger.propagate = saved[2]


class InProcessSimulation:
    """One run of the app in ``app_dir`` (its ``pyproject.toml`` names the ServerApp and the
    ClientApp) on ``num_supernodes`` simulated nodes, in this process."""

    def __init__(self, num_supernodes: int, app_dir: Path = APP_ROOT) -> None:
        self.num_supernodes, self.app_dir = num_supernodes, Path(app_dir)
        # A checkout (or an editable install) has the app's pyproject.toml; a plain
        # `pip install fedgen` has none: then the installed apps and the given run config.
        self.has_project = (self.app_dir / "pyproject.toml").is_file()
        components = (get_project_config(self.app_dir)["tool"]["flwr"]["app"]["components"] if self.has_project
                      else INSTALLED_COMPONENTS)
        self.server_app = cast(ServerApp, _load_component(components["serverapp"]))
        self.client_app = cast(ClientApp, _load_component(components["clientapp"]))
        self.run_id = _random_id()

    def nodes(self, run_config: UserConfig) -> list[SimulatedNode]:
        """The simulated nodes, partition ``i`` on the ``i``-th (Flower's ``_register_nodes``)."""
        ids: list[int] = []
        while len(ids) < self.num_supernodes:
            if (node_id := _random_id()) not in ids and node_id != SUPERLINK_NODE_ID:
                ids.append(node_id)
        return [SimulatedNode(node_id, i, self.num_supernodes, self.run_id, run_config, self.client_app)
                for i, node_id in enumerate(ids)]

    def run(self, run_config: UserConfig, *, verbose: bool = False) -> None:
        """Run the ServerApp to its end; raises :class:`SimulationRunError` if it fails (the
        traceback is logged), ``KeyboardInterrupt`` passes through."""
        fused = get_fused_config_from_dir(self.app_dir, dict(run_config)) if self.has_project else dict(run_config)
        grid = InProcessGrid(self.nodes(fused))
        run = Run.create_empty(self.run_id)
        run.override_config = dict(run_config)  # what `flwr run --run-config` records
        grid.set_run(run)
        context = Context(run_id=self.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                          run_config=dict(fused))
        with _app_logging(verbose), _task_identity(self.run_id):
            try:
                self.server_app(grid=grid, context=context)
            except Exception as err:  # noqa: BLE001 -- as Flower: the run fails, one line for the user
                log.info("%s", traceback.format_exc())  # shown with --verbose
                raise SimulationRunError(f"in-process run {self.run_id} failed: the ServerApp raised "
                                     f"{type(err).__name__}: {err}"[:500]) from err
