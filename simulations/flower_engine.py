"""Run a prepared run directory on Flower's simulation runtime (flwr 1.42).

The supported path (no deprecated ``run_simulation``): a private ``flower-superlink
--simulation`` on a free loopback port, ``flwr run <app> <connection> --stream`` against it,
and a clean shutdown. Everything we start carries an environment tag, so after the run
(or on Ctrl-C) any process left behind -- superlink, superexec, flwr-simulation, Ray --
is found and ended. See docs/architecture.md §4 for why each setting is there.
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

log = logging.getLogger(__name__)

TAG_VAR = "FEDGEN_PROCESS_TAG"  # set on every process we start
TAG_CHOICE_VAR = "FEDGEN_RUN_TAG"  # optional: lets a caller (e.g. a test) choose the tag
APP_ROOT = Path(__file__).resolve().parent.parent


class FlowerRunError(RuntimeError):
    """The Flower run did not complete; the message says what Flower reported."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """A Flower executable from the same environment as this Python."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


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
    app_dir: Path = APP_ROOT
    tag: str = field(default_factory=lambda: os.environ.get(TAG_CHOICE_VAR) or uuid.uuid4().hex[:12])

    def __post_init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="fedgen-"))
        self.port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if k != TAG_CHOICE_VAR},
            TAG_VAR: self.tag,
            "FLWR_HOME": str(self.tmp / "flwr"),  # outside the app dir (else it is bundled)
            "RAY_TMPDIR": str(self.tmp / "ray"),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1",
        }
        (self.tmp / "ray").mkdir()
        (self.tmp / "flwr").mkdir()
        (self.tmp / "flwr" / "config.toml").write_text(
            '[superlink]\ndefault = "fedgen"\n\n'
            f'[superlink.fedgen]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self.superlink: subprocess.Popen | None = None
        self.run_id: int | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout_s: float = 60.0) -> None:
        log_file = open(self.tmp / "superlink.log", "w")
        self.superlink = subprocess.Popen(
            [_bin("flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.superlink.poll() is not None:
                raise FlowerRunError(f"flower-superlink exited at start: {self._tail('superlink.log')}")
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
        cpus = int(self.client_cpus) if float(self.client_cpus).is_integer() else self.client_cpus
        fed = (f"num-supernodes={self.num_supernodes} client-resources-num-cpus={cpus} "
               f"client-resources-num-gpus={self.client_gpus}")
        cmd = [_bin("flwr"), "run", str(self.app_dir), "fedgen", "--run-config", cfg,
               "--federation-config", fed, "--stream"]
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
                                 f"{self._error_summary()}")

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

    def __enter__(self) -> "FlowerSimulation":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- diagnostics ------------------------------------------------------------------------
    def _tail(self, name: str, n: int = 20) -> str:
        try:
            return " | ".join((self.tmp / name).read_text().strip().splitlines()[-n:])
        except OSError:
            return ""

    def _error_summary(self) -> str:
        text = (self.tmp / "flwr-run.log").read_text() if (self.tmp / "flwr-run.log").exists() else ""
        lines = [l.strip() for l in text.splitlines() if l.strip()]
        errors = [l for l in lines if "Error" in l or "Exception" in l]
        return (errors[-1] if errors else (lines[-1] if lines else "no output"))[:500]
