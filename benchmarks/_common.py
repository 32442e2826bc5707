"""Helpers shared by the Flower-run benchmarks (sim_overhead.py, scale.py).

Imported by path from a script in this folder (``from _common import ...``): never an
installed package (Opacus already ships a top-level ``benchmarks``; docs/architecture.md §1).

- :func:`run_sampled_simulation` launches ``python -m fedgen.simulations.cli simulate ...`` and, while it
  runs, samples the whole process tree every ``interval`` seconds (the CLI, its
  descendants, and anything carrying the run's process tag: SuperLink, SuperExec,
  flwr-simulation, Ray) from /proc: summed RSS (and PSS at the peak), process count, CPU
  seconds per kind of process over time, and when each kind of Flower or Ray process was
  first seen. Round end times come from the mtimes of the per-round checkpoints, which the
  ServerApp writes right after each ``metrics.jsonl`` row. :func:`run_sampled` does the
  same for any command (the plain loop of sim_overhead.py).
- :func:`environment`, :func:`load_average`, :func:`write_result`: what every result
  file records about the machine and the load around the measurement.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
TAG_CHOICE_VAR = "FEDGEN_RUN_TAG"  # simulations/flower_engine.py: lets a caller choose the process tag
TAG_VAR = "FEDGEN_PROCESS_TAG"
PAGE = os.sysconf("SC_PAGE_SIZE")

# process kinds whose first appearance marks a phase of a Flower run (regex on the command line)
KINDS = {
    "flower-superlink": r"flower-superlink",
    "flower-superexec": r"flower-superexec",
    "flwr-simulation": r"flwr-simulation",
    "ray gcs_server": r"gcs_server",
    "ray raylet": r"raylet/raylet",
    "ray ClientAppActor": r"^ray::ClientAppActor",
}


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def environment() -> dict[str, Any]:
    """Machine, versions and date of a measurement."""
    import flwr
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu_cores": os.cpu_count(),
            "git_head": commit.stdout.strip() or None,
            "machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
            "flwr": flwr.__version__, "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS")}


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


# -- the process tree ---------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, int, float] | None:
    """(ppid, rss bytes, cpu seconds used) of a live, non-zombie process, else None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[21]) * PAGE, (int(fields[11]) + int(fields[12])) / TICK


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def process_label(cmd: str) -> str:
    """A short name for a process of a Flower run, from its command line."""
    for kind, pattern in KINDS.items():
        if re.search(pattern, cmd):
            return kind
    if "fedgen.simulations.cli" in cmd:
        return "fedgen CLI"
    if re.search(r"/flwr run ", cmd):
        return "flwr run"
    words = cmd.split()
    if words and words[0].startswith("ray::"):
        return words[0]
    script = next((Path(w).name for w in words if w.endswith(".py")), None)
    return script or (Path(words[0]).name if words else "?")


def _tagged(pid: int, needle: bytes) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def process_tree(root: int, tag: str | None = None) -> dict[int, tuple[int, float]]:
    """pid -> (RSS bytes, cpu seconds) for ``root``, its descendants and every process carrying ``tag``
    (Flower's processes are started in new sessions; the tag finds any that detach)."""
    stats = {pid: s for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()) if (s := _stat(pid))}
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_) in stats.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in stats and pid not in tree:
            tree.add(pid)
            todo.extend(children.get(pid, []))
    if tag is not None:
        needle = f"{TAG_VAR}={tag}".encode()
        tree |= {pid for pid in stats if pid not in tree and pid != os.getpid() and _tagged(pid, needle)}
    return {pid: stats[pid][1:] for pid in tree}


@dataclass
class TreeSampler:
    """Peak summed RSS / PSS of a process tree, its cumulative CPU seconds over time (a
    process that exits keeps its last reading), and when each process kind first appeared."""

    root: int
    tag: str | None
    started: float  # time.time() at launch: first-seen times are relative to it
    peak_rss: int = 0
    peak_pss: int = 0
    peak_processes: int = 0
    samples: int = 0
    first_seen: dict[str, float] = field(default_factory=dict)
    cpu_series: list[tuple[float, dict[str, float]]] = field(default_factory=list)  # (s, cpu s by kind)
    _cpu: dict[int, float] = field(default_factory=dict)
    _label: dict[int, str] = field(default_factory=dict)

    def sample(self) -> None:
        tree = process_tree(self.root, self.tag)
        now = time.time() - self.started
        for pid in tree:
            if self._label.get(pid) not in KINDS:  # Ray workers retitle themselves: look again
                label = process_label(_cmdline(pid))
                if label != "?" or pid not in self._label:  # an exiting process has no command line
                    self._label[pid] = label
            label = self._label[pid]
            if label in KINDS and label not in self.first_seen:
                self.first_seen[label] = round(now, 2)
        self._cpu.update({pid: cpu for pid, (_, cpu) in tree.items()})
        self.cpu_series.append((now, self.cpu_by_label()))
        self.samples += 1
        self.peak_processes = max(self.peak_processes, len(tree))
        total = sum(rss for rss, _ in tree.values())
        if total > self.peak_rss:
            self.peak_rss, self.peak_pss = total, sum(_pss(pid) for pid in tree)

    def cpu_at(self, t: float) -> dict[str, float]:
        """Cumulative CPU seconds per kind of process at the last sample before ``t`` s
        after launch (samples are ``interval`` apart)."""
        before = [by_label for when, by_label in self.cpu_series if when <= t]
        return before[-1] if before else {}

    def cpu_between(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds per kind of process spent between ``t0`` and ``t1``, largest first."""
        start, end = self.cpu_at(t0), self.cpu_at(t1)
        spent = {label: cpu - start.get(label, 0.0) for label, cpu in end.items()}
        return {k: round(v, 2) for k, v in sorted(spent.items(), key=lambda kv: -kv[1]) if round(v, 2)}

    def summary(self) -> dict[str, Any]:
        return {"peak_rss_mb": round(self.peak_rss / 2**20, 1),
                "pss_mb_at_rss_peak": round(self.peak_pss / 2**20, 1),
                "peak_processes": self.peak_processes, "samples": self.samples,
                "cpu_s_total": round(sum(self._cpu.values()), 1),
                "first_seen_s": dict(sorted(self.first_seen.items(), key=lambda kv: kv[1])),
                "cpu_s_by_process": self.cpu_by_label()}

    def cpu_by_label(self) -> dict[str, float]:
        """CPU seconds per kind of process (Ray actors summed), largest first."""
        out: dict[str, float] = {}
        for pid, cpu in self._cpu.items():
            out[self._label.get(pid, "?")] = out.get(self._label.get(pid, "?"), 0.0) + cpu
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


# -- one fedgen simulate run --------------------------------------------------------------

def simulate_command(scenario: Path, out: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "fedgen.simulations.cli", "simulate", str(scenario), "--out", str(out),
            *[a for o in overrides for a in ("--set", o)]]


def simulate(scenario: Path, out: Path, overrides: list[str], *, label: str) -> dict[str, Any]:
    """Run ``fedgen simulate`` to completion (from the repository root) and return the
    run's summary.json; a failed run stops the benchmark with Flower's last words."""
    res = subprocess.run(simulate_command(scenario, out, overrides), cwd=Path(__file__).resolve().parent.parent,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{label}: fedgen simulate failed:\n{res.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text())


def round_end_times(run_dir: Path, rounds: int) -> list[float]:
    """time.time() at the end of each round: the ServerApp writes ``model-round-NNNN.pt``
    right after the round's ``metrics.jsonl`` row (and ``privacy.json``, ``latest.pt``)."""
    folder = run_dir / "checkpoints"
    return [(folder / f"model-round-{r:04d}.pt").stat().st_mtime for r in range(1, rounds + 1)]


@dataclass
class Finished:
    """A command run to completion under a :class:`TreeSampler`."""

    launched: float  # time.time() just before the launch
    wall_s: float
    sampler: TreeSampler
    load_before: list[float]
    load_after: list[float]


def run_sampled(cmd: list[str], log: Path, *, env: dict[str, str] | None = None, tag: str | None = None,
                interval: float = 0.2, timeout_s: float = 3600.0) -> Finished:
    """Run ``cmd`` (cwd: the repository) to completion, sampling its process tree every
    ``interval`` s; stdout and stderr go to ``log``. Exits with the log's tail on failure."""
    load_before = load_average()
    launched = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid, tag, launched)
        while proc.poll() is None:
            sampler.sample()
            if time.time() - launched > timeout_s:
                proc.terminate()
                proc.wait(60)
                raise SystemExit(f"{cmd[2:4]} ran past {timeout_s:.0f} s; log: {log}")
            time.sleep(interval)
    wall = time.time() - launched
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:5])} ... failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
    return Finished(launched, wall, sampler, load_before, load_average())


def run_sampled_simulation(scenario: Path, out: Path, overrides: list[str], *, interval: float = 0.2,
                   timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run ``fedgen simulate`` to completion while sampling its process tree; return the
    timings (relative to launch), the per-round rows and the memory peak."""
    tag = uuid.uuid4().hex[:12]
    env = {**os.environ, TAG_CHOICE_VAR: tag, "PYTHONUNBUFFERED": "1"}
    done = run_sampled(simulate_command(scenario, out, overrides), out.parent / f"{out.name}.log", env=env, tag=tag,
                       interval=interval, timeout_s=timeout_s)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    ends = [t - done.launched for t in round_end_times(out, len(rows))]
    return {"overrides": overrides, "load_before": done.load_before, "load_after": done.load_after,
            "process_wall_s": round(done.wall_s, 2),
            "round_end_s": [round(t, 2) for t in ends],
            "round_cpu_s": [round(sum(done.sampler.cpu_between(t0, t1).values()), 2)
                            for t0, t1 in zip([0.0, *ends], ends)],
            "steady_cpu_s_per_round_by_process": steady_cpu_by_process(done.sampler, ends),
            "round_seconds": [round(r["seconds"], 3) for r in rows],
            "eval_seconds": [round(r.get("eval_seconds") or 0.0, 3) for r in rows],
            "clients_ok": [r["clients_ok"] for r in rows],
            "server_wall_s": round(json.loads((out / "summary.json").read_text())["wall_seconds"], 2),
            **done.sampler.summary()}


def steady_cpu_by_process(sampler: TreeSampler, ends: list[float]) -> dict[str, float] | None:
    """CPU seconds per round and kind of process over rounds 2 .. R-1 (round 1 starts
    everything, the last round evaluates); None with fewer than 3 rounds."""
    if len(ends) < 3:
        return None
    spent = sampler.cpu_between(ends[0], ends[-2])
    return {label: round(cpu / (len(ends) - 2), 3) for label, cpu in spent.items()}


def training_seconds(run: dict[str, Any]) -> list[float]:
    """Per-round seconds without the server's evaluation (the last round always evaluates)."""
    return [s - e for s, e in zip(run["round_seconds"], run["eval_seconds"])]
