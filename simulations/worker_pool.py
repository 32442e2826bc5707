"""A pool of worker processes that run the ClientApp for the in-process engine
(``simulation.workers``, docs/simulation.md "Engines").

Each worker is a ``spawn``-ed process (never a ``fork`` of a process whose torch threads
exist) that imports the installed ClientApp once and then handles one message at a time:
the message and the node's ``Context`` arrive serialised with Flower's own serde
(``message_to_proto`` / ``context_to_proto``, as Flower's simulation runtime hands them to
its actors), the reply and -- if the call succeeded -- the changed context go back the same
way, with the call's own duration (the round deadline is kept on it).

A worker that dies mid-call (``os._exit``, a segfault, the OOM killer) becomes a
``CLIENT_APP_CRASHED`` reply for that message and is replaced; the round goes on. Workers
ignore SIGINT (Ctrl-C reaches the engine, which ends them in :meth:`WorkerPool.close`) and
exit when the engine's end of their pipe closes, so none outlives the run even after a
SIGKILL of the engine (a worker in a call finishes it first).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

log = logging.getLogger(__name__)


def available_cores() -> int:
    """The cores this process may run on (its affinity mask; ``os.cpu_count`` elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover -- macOS
        return os.cpu_count() or 1


@dataclass(frozen=True)
class CallResult:
    """What a worker sends back for one message: the serialised reply, the serialised
    context after a successful call (``None``: the call failed, its changes are dropped),
    the failure's one-line text and traceback (``None`` when it succeeded), and the call's
    duration in seconds. ``crashed`` is the exit code of a worker that died in the call."""

    reply: bytes = b""
    context: bytes | None = None
    error: str | None = None
    details: str | None = None
    seconds: float = 0.0
    crashed: int | None = None


def _worker_main(conn: Connection, index: int, reference: str, threads: int, log_level: int) -> None:
    """One worker: load the ClientApp, then answer (message, context) pairs until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's to handle
    logging.basicConfig(level=log_level, format=f"worker {index}: %(levelname)s %(name)s: %(message)s")
    logging.getLogger("flwr").setLevel(max(log_level, logging.ERROR if log_level > logging.INFO else log_level))
    import torch

    torch.set_num_threads(threads)
    if torch.cuda.is_available():  # a device-aware pool: worker i on cuda:(i mod GPUs); "cuda" means it
        torch.cuda.set_device(index % torch.cuda.device_count())

    from .inprocess_engine import _load_component, call_client_app, dump_context, dump_message, \
        load_context, load_message

    app = _load_component(reference)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the engine closed its end (or died): stop
            return
        if job is None:
            return
        message_bytes, context_bytes = job
        started = time.monotonic()
        message, context = load_message(message_bytes), load_context(context_bytes)
        reply, error, details = call_client_app(app, message, context)  # type: ignore[arg-type]
        result = CallResult(dump_message(reply), None if error else dump_context(context), error, details,
                            time.monotonic() - started)
        try:
            conn.send(result)
        except (BrokenPipeError, OSError):
            return


class WorkerPool:
    """``workers`` processes running the ClientApp named by ``reference`` (``module:attr``),
    ``threads`` torch threads each."""

    def __init__(self, workers: int, reference: str, *, threads: int, log_level: int = logging.WARNING) -> None:
        if workers < 1:
            raise ValueError(f"a worker pool needs at least one worker, got {workers}")
        self.reference, self.threads, self.log_level = reference, threads, log_level
        self._mp = multiprocessing.get_context("spawn")
        self._slots: list[tuple[Any, Connection]] = []
        self._busy: dict[int, int] = {}  # slot -> index of the job it runs
        try:
            for index in range(workers):
                self._slots.append(self._start(index))
        except BaseException:
            self.close()
            raise

    def _start(self, index: int) -> tuple[Any, Connection]:
        ours, theirs = self._mp.Pipe()
        proc = self._mp.Process(target=_worker_main, name=f"fedgen-worker-{index}", daemon=True,
                                args=(theirs, index, self.reference, self.threads, self.log_level))
        proc.start()
        theirs.close()
        return proc, ours

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc, _ in self._slots]

    def run(self, jobs: list[tuple[bytes, bytes]]) -> list[CallResult]:
        """Run every (message, context) job on the next free worker; the results in job order."""
        results: list[CallResult | None] = [None] * len(jobs)
        pending = deque(range(len(jobs)))
        busy: dict[int, int] = {}  # slot -> job
        self._busy = busy
        while pending or busy:
            for slot in range(len(self._slots)):
                if slot not in busy and pending:
                    job = pending.popleft()
                    try:
                        self._slots[slot][1].send(jobs[job])
                    except (BrokenPipeError, OSError):  # died while idle: replace it, retry the job
                        self._replace(slot)
                        pending.appendleft(job)
                        continue
                    busy[slot] = job
            waiting = {self._slots[s][1]: s for s in busy} | {self._slots[s][0].sentinel: s for s in busy}
            for ready in wait(list(waiting)):
                slot = waiting[ready]
                if slot not in busy:
                    continue  # its pipe and its sentinel were both ready
                proc, conn = self._slots[slot]
                try:
                    if ready is conn or conn.poll():
                        results[busy.pop(slot)] = conn.recv()
                        continue
                except (EOFError, OSError):
                    pass
                proc.join(5)
                results[busy.pop(slot)] = CallResult(crashed=proc.exitcode if proc.exitcode is not None else -1)
                self._replace(slot)
        return [r for r in results if r is not None]

    def _replace(self, slot: int) -> None:
        proc, conn = self._slots[slot]
        conn.close()
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        log.warning("worker %d (pid %s) exited with code %s; starting a new one", slot, proc.pid, proc.exitcode)
        self._slots[slot] = self._start(slot)

    def close(self) -> None:
        """End every worker: an idle one exits when its pipe closes; one still in a call
        (Ctrl-C mid-round) is terminated, then killed if it does not go within 5 s."""
        for slot, (proc, conn) in enumerate(self._slots):
            conn.close()
            if slot in self._busy and proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + 2.0
        for proc, _ in self._slots:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc, _ in self._slots:
            if proc.is_alive():
                proc.terminate()
        for proc, _ in self._slots:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._slots, self._busy = [], {}

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
