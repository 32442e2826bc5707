"""Run a prepared run directory on Flower's simulation runtime (flwr 1.42).

The supported path (no deprecated ``run_simulation``): a private ``flower-superlink
--simulation`` on a free loopback port, ``flwr run <app> <connection> --stream`` against it,
and a clean shutdown. Everything we start carries an environment tag, so after the run
(or on Ctrl-C) any process left behind -- superlink, superexec, flwr-simulation, Ray --
is found and ended (docs/simulation.md, "Flower processes"; docs/architecture.md §4 says why
each setting is there).

Even a SIGKILL of ``fedgen`` leaves nothing running: a small watcher process (its own
session, untagged) waits for the owner to die and then ends every process carrying the
run's tag; and each run's temp folder records its owner, so the next start also reaps runs
whose owner and watcher both died (:func:`reap_orphaned_runs`). ``PR_SET_PDEATHSIG`` on
the SuperLink is not enough: its shutdown waits for the orphaned ``flwr run --stream``
connection, and flwr-simulation and Ray outlive it (tried).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SimulationRunError

log = logging.getLogger(__name__)

TAG_VAR = "FEDGEN_PROCESS_TAG"  # set on every process we start
TAG_CHOICE_VAR = "FEDGEN_RUN_TAG"  # optional: lets a caller (e.g. a test) choose the tag
APP_ROOT = Path(__file__).resolve().parent.parent
RUN_DIR_PREFIX = "fedgen-"  # each run's private temp folder: tempfile.gettempdir()/fedgen-XXXX
OWNER_FILE = "owner"  # in that folder: "<pid> <start time> <tag>" of the fedgen process
# Started by us (flower-superlink) or by the SuperLink itself, found on the children's PATH
FLOWER_EXECUTABLES = ("flower-superlink", "flower-superexec", "flwr-simulation", "flwr-serverapp", "flwr")


class FlowerRunError(SimulationRunError):
    """The Flower run did not complete; the message says what Flower reported."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """A Flower executable from the same environment as this Python."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def flower_path() -> str:
    """PATH for Flower's processes: this Python's bin folder first. flower-superlink spawns
    flower-superexec (and that flwr-simulation) by name, so an un-activated venv
    (``.venv/bin/fedgen simulate``) would otherwise find none, or another install's."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def missing_flower_executables(path: str) -> list[str]:
    """The :data:`FLOWER_EXECUTABLES` not found on ``path``."""
    return [name for name in FLOWER_EXECUTABLES if shutil.which(name, path=path) is None]


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a live owner from a reused pid), or None."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _write_owner(folder: Path, tag: str) -> None:
    (folder / OWNER_FILE).write_text(f"{os.getpid()} {_start_time(os.getpid())} {tag}\n")


def _owner_alive(pid: int, started: str) -> bool:
    return _start_time(pid) == started


def watch_owner(pid: int, started: str, tag: str, folder: str) -> None:
    """The watcher's body: once ``pid`` (started at ``started``) is gone, end the run's
    processes and remove its temp folder. Returns at once if the run shut down normally."""
    while _owner_alive(pid, started) and Path(folder).exists():
        time.sleep(0.5)
    if Path(folder).exists():
        kill_tagged(tag)
        shutil.rmtree(folder, ignore_errors=True)


def _start_watcher(folder: Path, tag: str) -> subprocess.Popen:
    """Start :func:`watch_owner` for this process in a detached, untagged Python."""
    code = (f"from simulations.flower_engine import watch_owner; "
            f"watch_owner({os.getpid()}, {_start_time(os.getpid())!r}, {tag!r}, {str(folder)!r})")
    env = {k: v for k, v in os.environ.items() if k not in (TAG_VAR, TAG_CHOICE_VAR)}
    env["PYTHONPATH"] = os.pathsep.join([str(APP_ROOT), env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def reap_orphaned_runs(root: Path | None = None) -> list[str]:
    """End every process of an earlier run whose ``fedgen`` died without cleaning up (e.g.
    SIGKILL), and remove its temp folder; returns the tags reaped. Runs whose owner is alive
    (another ``fedgen simulate``) are left alone."""
    reaped = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{RUN_DIR_PREFIX}*"):
        try:
            pid, started, tag = (folder / OWNER_FILE).read_text().split()
        except (OSError, ValueError):
            continue
        if _owner_alive(int(pid), started):
            continue
        kill_tagged(tag)
        shutil.rmtree(folder, ignore_errors=True)
        reaped.append(tag)
    return reaped


def tagged_pids(tag: str) -> list[int]:
    """PIDs of live processes whose environment carries ``TAG_VAR=tag`` (Linux /proc)."""
    needle = f"{TAG_VAR}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().split(") ", 1)[1][:1]
                if state != "Z":
                    pids.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return pids


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """Raise :class:`FlowerRunError` (one line) unless something answers at the Ray
    cluster's ``host:port``; better than flwr-simulation failing deep inside ``ray.init``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise FlowerRunError(f"simulation.ray_address: no Ray cluster answers at {address} ({reason}); start one "
                             f"with `ray start --head --port PORT` or fix the address") from None


class _Hurry(Exception):
    """A second Ctrl-C / SIGTERM arrived while shutting down: stop being graceful."""


@contextlib.contextmanager
def _signals(handler) -> Iterator[None]:
    """Route SIGINT and SIGTERM to ``handler`` (``signal.SIG_IGN`` or a callable) for the
    block; the main thread only (signal handlers cannot be set elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def signals_ignored() -> contextlib.AbstractContextManager[None]:
    """Ctrl-C and SIGTERM ignored for the block: a run that is already stopping (writing
    how it ended) is not interrupted half-way by a second press."""
    return _signals(signal.SIG_IGN)


def _hurry(signum: int, frame: object) -> None:
    raise _Hurry


def kill_tagged(tag: str, grace_s: float = 5.0) -> int:
    """SIGTERM, then SIGKILL, every process carrying ``tag``; returns how many were found."""
    pids = tagged_pids(tag)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and tagged_pids(tag):
            time.sleep(0.1)
        pids = tagged_pids(tag)
        if not pids:
            break
    return len(pids)


@dataclass
class FlowerSimulation:
    """One private SuperLink in simulation mode, used for one run."""

    num_supernodes: int
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    ray_address: str | None = None  # an existing Ray cluster (host:port); None = a private Ray
    app_dir: Path = APP_ROOT
    tag: str = field(default_factory=lambda: os.environ.get(TAG_CHOICE_VAR) or uuid.uuid4().hex[:12])

    def __post_init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
        self.port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if k != TAG_CHOICE_VAR},
            TAG_VAR: self.tag,
            "PATH": flower_path(),
            "FLWR_HOME": str(self.tmp / "flwr"),  # outside the app dir (else it is bundled)
            "RAY_TMPDIR": str(self.tmp / "ray"),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1",
        }
        # Flower's Ray backend calls ray.init() without an address (its federation config has no
        # field for one), so Ray reads RAY_ADDRESS: set, flwr-simulation joins that cluster as a
        # driver; unset, it starts a private Ray (never one the user's shell happens to name).
        self.env.pop("RAY_ADDRESS", None)
        if self.ray_address is not None:
            self.env["RAY_ADDRESS"] = self.ray_address
        (self.tmp / "ray").mkdir()
        (self.tmp / "flwr").mkdir()
        (self.tmp / "flwr" / "config.toml").write_text(
            '[superlink]\ndefault = "fedgen"\n\n'
            f'[superlink.fedgen]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self.superlink: subprocess.Popen | None = None
        self.watcher: subprocess.Popen | None = None
        self.run_id: int | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout_s: float = 60.0) -> None:
        missing = missing_flower_executables(self.env["PATH"])
        if missing:
            raise FlowerRunError(f"{', '.join(missing)} not found next to {sys.executable} nor on PATH; install "
                                 "fedgen's dependencies (flwr[simulation]) into the environment that runs fedgen")
        if self.ray_address is not None:
            check_ray_address(self.ray_address)
        reap_orphaned_runs(self.tmp.parent)
        _write_owner(self.tmp, self.tag)
        self.watcher = _start_watcher(self.tmp, self.tag)
        log_file = open(self.tmp / "superlink.log", "w")
        self.superlink = subprocess.Popen(
            [shutil.which("flower-superlink", path=self.env["PATH"]), "--insecure", "--simulation",
             "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.superlink.poll() is not None:
                raise FlowerRunError(f"flower-superlink exited at start: {self._error_summary('superlink.log')}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise FlowerRunError(f"flower-superlink did not answer on port {self.port} within {timeout_s:.0f} s")

    def run(self, run_config: dict[str, str | int | float | bool], on_line=None) -> None:
        """``flwr run`` the app; raises :class:`FlowerRunError` unless the run completed."""
        def toml_value(v: object) -> str:
            return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)

        cfg = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        cmd = [_bin("flwr"), "run", str(self.app_dir), "fedgen", "--run-config", cfg,
               "--federation-config", self.federation_config(), "--stream"]
        with open(self.tmp / "flwr-run.log", "w") as out:
            proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, cwd=self.tmp)
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                if self.run_id is None and "run" in line.lower():
                    self._parse_run_id(line)
                if on_line is not None:
                    on_line(line)
            proc.wait()
        status = self.status()
        if proc.returncode != 0 or not status.startswith("finished:completed"):
            raise FlowerRunError(f"Flower run {self.run_id} ended as {status or 'unknown'}: "
                                 f"{self._error_summary('flwr-run.log')}")

    def federation_config(self) -> str:
        """``flwr run --federation-config``: Flower turns it into the Ray backend's client
        resources (``client-resources-num-cpus`` is an integer field in Flower's
        SimulationConfig; a fraction of a GPU is kept as it is)."""
        if not float(self.client_cpus).is_integer():
            raise FlowerRunError(f"simulation.client_cpus: Flower gives each site whole CPUs; use 1, 2, ... "
                                 f"(got {self.client_cpus:g})")
        return (f"num-supernodes={self.num_supernodes} client-resources-num-cpus={int(self.client_cpus)} "
                f"client-resources-num-gpus={float(self.client_gpus)}")

    def _parse_run_id(self, line: str) -> None:
        import re

        m = re.search(r"[Rr]un(?: ID)?[:= ]+(\d{3,})", line)
        if m:
            self.run_id = int(m.group(1))

    def status(self) -> str:
        if self.run_id is None:
            return ""
        res = subprocess.run([_bin("flwr"), "ls", "fedgen", "--run-id", str(self.run_id), "--format", "json"],
                             env=self.env, capture_output=True, text=True, cwd=self.tmp, timeout=60)
        try:
            runs = json.loads(res.stdout).get("runs", [])
            return str(runs[0].get("status", "")) if runs else ""
        except (json.JSONDecodeError, AttributeError):
            return ""

    def stop_run(self) -> None:
        if self.run_id is not None:
            subprocess.run([_bin("flwr"), "stop", str(self.run_id), "fedgen"], env=self.env,
                           capture_output=True, cwd=self.tmp, timeout=60)

    def shutdown(self) -> None:
        """Stop an active run first (else flwr-simulation and Ray are orphaned), then the
        SuperLink, then anything still carrying our tag. A second Ctrl-C (or SIGTERM) during
        the graceful part skips to the last step; the last step itself cannot be interrupted,
        so an impatient user never leaves processes behind."""
        try:
            with _signals(_hurry):
                try:
                    if self.run_id is not None and not self.status().startswith("finished"):
                        self.stop_run()
                except (subprocess.SubprocessError, OSError):
                    pass
                if self.superlink is not None and self.superlink.poll() is None:
                    try:
                        os.killpg(self.superlink.pid, signal.SIGTERM)
                        self.superlink.wait(timeout=10)
                    except (ProcessLookupError, subprocess.TimeoutExpired):
                        pass
        except _Hurry:
            log.info("interrupted again: killing the Flower processes without waiting for them")
        with _signals(signal.SIG_IGN):
            left = kill_tagged(self.tag)
            if left:
                log.warning("%d Flower/Ray processes would not stop", left)
            shutil.rmtree(self.tmp, ignore_errors=True)
            if self.watcher is not None:  # it would see the folder gone and exit; no need to wait
                self.watcher.terminate()
                self.watcher.wait(timeout=10)

    def __enter__(self) -> "FlowerSimulation":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- diagnostics ------------------------------------------------------------------------
    def _error_summary(self, name: str) -> str:
        """The last line of log ``name`` that names an error (one line, not a traceback)."""
        text = (self.tmp / name).read_text(errors="replace") if (self.tmp / name).exists() else ""
        lines = [l.strip() for l in text.splitlines() if l.strip()]
        errors = [l for l in lines if "Error" in l or "Exception" in l]
        return (errors[-1] if errors else (lines[-1] if lines else "no output"))[:500]
