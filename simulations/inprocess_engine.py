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

Sites train one after another, or on a pool of worker processes (``simulation.workers``,
``worker_pool.py``) that receive each message and context through Flower's serde. The round
deadline is kept on a per-reply clock (as if every site ran in parallel, like Flower with
enough actors): a reply that took longer than ``timeout`` to produce is not returned
(docs/simulation.md, "Engines"). Each node's context is kept serialised between its calls,
so 10 000 sites cost a few bytes each until they are sampled.
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
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from .errors import SimulationRunError
from .flower_engine import APP_ROOT
from .worker_pool import WorkerPool, available_cores

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


# Messages and contexts as bytes, with Flower's own serde (what its runtime sends between processes)
def dump_message(message: Message) -> bytes:
    return message_to_proto(message).SerializeToString()


def load_message(data: bytes) -> Message:
    return message_from_proto(ProtoMessage.FromString(data))


def dump_context(context: Context) -> bytes:
    return context_to_proto(context).SerializeToString()


def load_context(data: bytes) -> Context:
    return context_from_proto(ProtoContext.FromString(data))


def call_client_app(client_app: ClientApp, message: Message,
                    context: Context) -> tuple[Message, str | None, str | None]:
    """Run the ClientApp on ``message`` with ``context`` (changed in place): the reply, and
    for a failure its one-line description and traceback (the reply is then Flower's error
    reply). The same call in this process and in a worker (``worker_pool.py``)."""
    run_config = dict(context.run_config)
    try:
        reply = client_app(message, context)
        if context.run_config != run_config:  # Flower refuses this too (update_context)
            raise ValueError(f"The `run_config` field of the `Context` object cannot be modified "
                             f"(run_id: {context.run_id}).")
    except Exception as err:  # noqa: BLE001 -- as Flower: any ClientApp failure is a reply
        return _error_reply(message, err), f"the ClientApp raised {type(err).__name__}: {err}", traceback.format_exc()
    return reply, None, None


class SimulatedNode:
    """One simulated SuperNode: its id, its partition, and its persistent ``Context`` --
    kept serialised (Flower's serde) between calls, so the sites not sampled in a round are
    a few bytes each, not live objects (10 000 sites, docs/simulation.md "Engines")."""

    __slots__ = ("node_id", "partition_id", "num_partitions", "run_id", "run_config", "client_app", "node_config",
                 "_state")

    def __init__(self, node_id: int, partition_id: int, num_partitions: int, run_id: int,
                 run_config: UserConfig, client_app: ClientApp | None, *,
                 node_config: UserConfig | None = None) -> None:
        self.node_id, self.partition_id, self.num_partitions = node_id, partition_id, num_partitions
        self.run_id, self.run_config, self.client_app = run_id, run_config, client_app
        # a SuperNode's --node-config in place of the simulated partition (tests of deployed runs)
        self.node_config = node_config
        self._state: bytes | None = None  # the serialised Context; None: never called yet

    @property
    def context(self) -> Context:
        """A fresh copy of the node's context (the one the next call starts from)."""
        if self._state is not None:
            return load_context(self._state)
        node_config = self.node_config if self.node_config is not None else {
            PARTITION_ID_KEY: self.partition_id, NUM_PARTITIONS_KEY: self.num_partitions}
        return Context(run_id=self.run_id, node_id=self.node_id, node_config=dict(node_config),
                       state=RecordDict(), run_config=dict(self.run_config))

    def context_bytes(self) -> bytes:
        return self._state if self._state is not None else dump_context(self.context)

    def commit(self, reply: Message, context: bytes | None, error: str | None, details: str | None) -> Message:
        """Keep the context of a successful call (a failed call's changes are dropped, as
        Flower's actor works on a copy that is then lost), log a failure, give the reply an id."""
        if error is None:
            self._state = context
        else:
            log.error("node %d (partition %s): %s", self.node_id, self.partition_id, error)
            log.info("%s", details)  # shown with --verbose
        reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        return reply

    def handle(self, message: Message) -> Message:
        """Run the ClientApp on (a copy of) ``message`` in this process."""
        context = self.context
        reply, error, details = call_client_app(cast(ClientApp, self.client_app), copy.deepcopy(message), context)
        return self.commit(reply, None if error else dump_context(context), error, details)


class InProcessGrid(Grid):
    """A ``Grid`` that delivers each message by calling its node's ClientApp directly."""

    def __init__(self, nodes: Iterable[SimulatedNode], pool: WorkerPool | None = None) -> None:
        self.nodes = {node.node_id: node for node in nodes}
        self.pool = pool  # None: every ClientApp call in this process, one after another
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
        """Give every message an id, run its node's ClientApp (here, or on the worker pool),
        keep the replies produced within ``timeout`` seconds of the call (each reply on its
        own clock)."""
        messages = list(messages)
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self._check_message(message)
        if self.pool is None:
            for message in messages:
                started = _clock()
                reply = self.nodes[message.metadata.dst_node_id].handle(message)
                self._keep(message, reply, _clock() - started, timeout)
        else:
            nodes = [self.nodes[message.metadata.dst_node_id] for message in messages]
            results = self.pool.run([(dump_message(m), node.context_bytes()) for m, node in zip(messages, nodes)])
            for message, node, result in zip(messages, nodes, results):
                if result.crashed is not None:  # the worker died in the call: Flower's "crashed" reply
                    reason = f"the worker process running this site's ClientApp exited with code {result.crashed}"
                    reply = Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason=reason), reply_to=message)
                    node.commit(reply, None, reason, None)
                else:
                    node.commit(reply := load_message(result.reply), result.context, result.error, result.details)
                self._keep(message, reply, result.seconds, timeout)
        return [message.metadata.message_id for message in messages]

    def _keep(self, message: Message, reply: Message, seconds: float, timeout: float | None) -> None:
        if timeout is None or seconds <= timeout:
            self._replies[message.metadata.message_id] = reply

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


def resolve_workers(setting: int | str, sites_per_round: int, cores: int | None = None) -> int:
    """``simulation.workers`` as a number of processes: ``auto`` is one per core, capped by
    the sites trained per round (a worker more would have nothing to do)."""
    if setting == "auto":
        return max(1, min(cores or available_cores(), sites_per_round))
    return int(setting)


class InProcessSimulation:
    """One run of the app in ``app_dir`` (its ``pyproject.toml`` names the ServerApp and the
    ClientApp) on ``num_supernodes`` simulated nodes, in this process; with ``workers`` > 1
    the ClientApp calls run on a pool of that many worker processes (``worker_pool.py``)."""

    def __init__(self, num_supernodes: int, app_dir: Path = APP_ROOT, *, workers: int = 1) -> None:
        self.num_supernodes, self.app_dir, self.workers = num_supernodes, Path(app_dir), workers
        # A checkout (or an editable install) has the app's pyproject.toml; a plain
        # `pip install fedgen` has none: then the installed apps and the given run config.
        self.has_project = (self.app_dir / "pyproject.toml").is_file()
        components = (get_project_config(self.app_dir)["tool"]["flwr"]["app"]["components"] if self.has_project
                      else INSTALLED_COMPONENTS)
        self.server_app = cast(ServerApp, _load_component(components["serverapp"]))
        self.client_app_reference = components["clientapp"]
        self.client_app = cast(ClientApp, _load_component(components["clientapp"]))
        self.run_id = _random_id()

    def nodes(self, run_config: UserConfig) -> list[SimulatedNode]:
        """The simulated nodes, partition ``i`` on the ``i``-th (Flower's ``_register_nodes``);
        each holds its ids and the (shared) run config until its first call."""
        ids: set[int] = set()
        nodes: list[SimulatedNode] = []
        while len(nodes) < self.num_supernodes:
            if (node_id := _random_id()) not in ids and node_id != SUPERLINK_NODE_ID:
                ids.add(node_id)
                nodes.append(SimulatedNode(node_id, len(nodes), self.num_supernodes, self.run_id, run_config,
                                           self.client_app))
        return nodes

    def _pool(self, verbose: bool) -> contextlib.AbstractContextManager[WorkerPool | None]:
        if self.workers <= 1:
            return contextlib.nullcontext()
        threads = max(1, available_cores() // self.workers)
        return WorkerPool(self.workers, self.client_app_reference, threads=threads,
                          log_level=logging.INFO if verbose else logging.WARNING)

    def run(self, run_config: UserConfig, *, verbose: bool = False) -> None:
        """Run the ServerApp to its end; raises :class:`SimulationRunError` if it fails (the
        traceback is logged), ``KeyboardInterrupt`` passes through (no worker outlives it)."""
        fused = get_fused_config_from_dir(self.app_dir, dict(run_config)) if self.has_project else dict(run_config)
        run = Run.create_empty(self.run_id)
        run.override_config = dict(run_config)  # what `flwr run --run-config` records
        context = Context(run_id=self.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                          run_config=dict(fused))
        with _app_logging(verbose), _task_identity(self.run_id), self._pool(verbose) as pool:
            grid = InProcessGrid(self.nodes(fused), pool=pool)
            grid.set_run(run)
            try:
                self.server_app(grid=grid, context=context)
            except Exception as err:  # noqa: BLE001 -- as Flower: the run fails, one line for the user
                log.info("%s", traceback.format_exc())  # shown with --verbose
                raise SimulationRunError(f"in-process run {self.run_id} failed: the ServerApp raised "
                                     f"{type(err).__name__}: {err}"[:500]) from err
