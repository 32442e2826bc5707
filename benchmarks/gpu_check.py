"""CUDA check: the one local training loop on the GPU against the same loop on the CPU.

    python benchmarks/gpu_check.py [--examples 300] [--rounds 2] [--local-steps 5] [--timing-steps 10]

Part 1, per scenario (the quickstart's DP VAE, the DP GAN, the DP diffusion model, the flow
hybrid's release round then DP-SGD, the mmd release, and the quickstart without DP): a few
rounds of ``client.task.train_site`` at one site (scikit-learn digits, the first
``--examples`` images), once with ``device: cpu`` and once with ``device: cuda``, checking

- the CUDA run ran on CUDA: every module called during training had its parameters and its
  tensor inputs on the GPU (a global forward pre-hook records them), and the model came
  back on the CPU (``train_site`` returns it there for the server);
- the privacy ledger is the CPU run's: sigma, q, steps and epsilon per round are
  deterministic (Poisson batches come from a CPU generator; only the model's internal
  draws and the DP noise differ between devices, and they are not compared);
- the losses are finite and of the CPU run's magnitude;
- ``sample()`` of the CUDA-trained model, on CUDA, is finite and in the data range [0, 1].

Part 2: seconds per training iteration (each of the family's steps once; a GAN's
iteration is its discriminator's DP steps and one generator step) on CUDA and on the CPU for
every registered family trained by DP-SGD, at its digits scenario's batch size.

Prints a table, writes ``benchmarks/results/gpu_check.json`` (``gpu_check-nocuda.json``
without CUDA, where the "cuda" side runs on the CPU too) and a copy to ``$OUT`` when that is
set; exits 1 when a check fails. Without CUDA every check still runs, CPU against CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fedgen.client.data import SiteData, load_data  # noqa: E402
from fedgen.client.task import train_site  # noqa: E402
from fedgen.client.training import new_site_ledger, private_steps_per_iteration, run_local_round  # noqa: E402
from fedgen.contract.rundir import DataSpec  # noqa: E402
from fedgen.contract.task import TaskConfig, task_from_scenario  # noqa: E402
from fedgen.shared_models import build_model, list_models  # noqa: E402
from fedgen.contract.scenario import load_scenario  # noqa: E402

SCENARIOS = REPO / "scenarios"
RESULTS = REPO / "benchmarks" / "results"
# (label, scenario file, overrides): every registered family, and one round without DP
CASES: list[tuple[str, str, list[str]]] = [
    ("vae-dp (quickstart)", "quickstart.yaml", ["warm_start=null"]),  # DP-SGD from round 1 (no release round)
    ("vae-nodp (quickstart)", "quickstart.yaml", ["privacy.enabled=false", "warm_start=null"]),
    ("gan-dp", "gan-digits.yaml", []),
    ("diffusion-dp", "diffusion-digits.yaml", []),
    ("flow-warm (release warm start, then dp)", "flow-digits.yaml", []),
    ("mmd-release", "mmd-digits.yaml", []),
]
LEDGER_KEYS = ("round", "steps", "noise_multiplier", "sample_rate", "epsilon")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def synchronize() -> None:
    if cuda_available():
        torch.cuda.synchronize()


# -- a scenario's task at one site ------------------------------------------------------

def site_data(examples: int) -> SiteData:
    """The first ``examples`` images of scikit-learn's digits: one site's data."""
    data = load_data("digits")
    return data.subset(range(min(examples, len(data))))


def scenario_task(path: Path, overrides: list[str], data: SiteData, device: str) -> TaskConfig:
    """The task a site receives for scenario ``path``, as the server builds it
    (``contract.task.task_from_scenario``; no Flower needed: the GPU machine has no flwr)."""
    scenario = load_scenario(path, [*overrides, f"simulation.device={device}"])
    spec = DataSpec(format="digits", path=None, shape=tuple(data.shape), num_classes=data.num_classes, num_sites=1)
    return task_from_scenario(scenario, spec)


def initial_state(task: TaskConfig) -> dict[str, Tensor]:
    torch.manual_seed(task.seed)  # as the server builds the global model (server/run.py)
    return task.build_model().state_dict()


# -- where training ran -------------------------------------------------------------------

@contextmanager
def recorded_devices() -> Iterator[set[str]]:
    """Device types of the parameters and tensor inputs of every module called inside."""
    seen: set[str] = set()

    def hook(module: nn.Module, args: tuple) -> None:
        seen.update(p.device.type for p in module.parameters(recurse=False))
        seen.update(a.device.type for a in args if isinstance(a, Tensor))

    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def tensor_devices(model: nn.Module) -> set[str]:
    return {t.device.type for t in (*model.parameters(), *model.buffers())}


# -- part 1: rounds on both devices -------------------------------------------------------

def run_rounds(task: TaskConfig, data: SiteData, rounds: int) -> dict[str, Any]:
    """``rounds`` rounds of ``train_site`` at one site, each starting from the last one's model."""
    state, ledger, out = initial_state(task), None, []
    model = None
    for r in range(1, rounds + 1):
        synchronize()
        start = time.perf_counter()
        with recorded_devices() as seen:
            model, result, ledger = train_site(task, data, state, site="0", server_round=r, ledger=ledger)
        synchronize()
        out.append({"round": r, "status": result.status, "iterations": result.iterations,
                    "dp_steps": result.dp_steps, "losses": result.losses,
                    "seconds": round(time.perf_counter() - start, 4),
                    "devices_in_training": sorted(seen), "devices_returned": sorted(tensor_devices(model))})
        state = model.state_dict()
    history = [] if ledger is None else [{k: getattr(h, k) for k in LEDGER_KEYS} for h in ledger.history]
    return {"rounds": out, "ledger": history, "model": model}


def sample_check(model: nn.Module, device: str, n: int = 64) -> dict[str, Any]:
    """``sample(n)`` on ``device``: finite and in the data range [0, 1]."""
    model = model.to(device).eval()
    torch.manual_seed(0)
    x = model.sample(n)
    finite = bool(torch.isfinite(x).all())
    return {"device": x.device.type, "shape": list(x.shape), "finite": finite,
            "min": float(x.min()), "max": float(x.max()),
            "ok": finite and x.device.type == device and float(x.min()) >= 0.0 and float(x.max()) <= 1.0}


def similar(a: float, b: float) -> bool:
    """Same magnitude: within a factor 2 of each other (or 0.1 apart near zero); the DP
    noise and the model's own draws differ between devices, so the values do too."""
    return abs(a - b) <= 0.5 * max(abs(a), abs(b)) + 0.1


def compare(cpu: dict[str, Any], gpu: dict[str, Any], device: str) -> dict[str, bool]:
    """The checks of one scenario (module docstring), each True when it passed."""
    trained = [r for r in gpu["rounds"] if r["losses"]]
    losses = [(r["losses"], c["losses"]) for r, c in zip(gpu["rounds"], cpu["rounds"])]
    return {
        "same_status": [r["status"] for r in gpu["rounds"]] == [r["status"] for r in cpu["rounds"]],
        "trained_on_device": all(r["devices_in_training"] == [device] for r in trained),
        "returned_on_cpu": all(r["devices_returned"] == ["cpu"] for r in gpu["rounds"]),
        "ledger_equal": gpu["ledger"] == cpu["ledger"],
        "losses_finite": all(math.isfinite(v) for g, _ in losses for v in g.values()),
        "losses_similar": all(g.keys() == c.keys() and all(similar(g[k], c[k]) for k in g) for g, c in losses),
    }


def check_case(label: str, path: Path, overrides: list[str], data: SiteData, *, rounds: int,
               local_steps: int, device: str) -> dict[str, Any]:
    steps = [f"training.local_steps={local_steps}"]
    runs = {side: run_rounds(scenario_task(path, [*overrides, *steps], data, name), data, rounds)
            for side, name in (("cpu", "cpu"), ("device", device))}
    checks = compare(runs["cpu"], runs["device"], device)
    sampled = sample_check(runs["device"].pop("model"), device)
    runs["cpu"].pop("model")
    checks["sample_ok"] = sampled["ok"]
    return {"case": label, "scenario": path.name, "overrides": [*overrides, *steps], "family":
            scenario_task(path, overrides, data, "cpu").model.family, "checks": checks, "sample": sampled,
            "cpu": runs["cpu"], "device": runs["device"]}


# -- part 2: seconds per DP-SGD iteration -------------------------------------------------

def digits_scenario(family: str) -> Path:
    """The family's digits scenario: the quickstart for the VAE, else ``<family>-digits.yaml``."""
    for path in (SCENARIOS / "quickstart.yaml", SCENARIOS / f"{family}-digits.yaml"):
        if path.exists() and load_scenario(path).model.family == family:
            return path
    raise SystemExit(f"no digits scenario for family {family!r}: add scenarios/{family}-digits.yaml")


def dp_sgd_families(data: SiteData) -> list[str]:
    """Registered families trained by DP-SGD (a release family such as mmd has no DP step)."""
    return [f for f in list_models()
            if build_model(f, data_shape=data.shape, num_classes=data.num_classes).training_mode == "sgd"]


def seconds_per_iteration(task: TaskConfig, data: SiteData, device: str, *, steps: int, repeats: int) -> float:
    """Median over ``repeats`` of (round of 2 + ``steps`` iterations - round of 2) / ``steps``:
    the difference cancels what a round costs besides its iterations (optimizers, hooks,
    the accountant's check). A hybrid takes its release round first."""
    privacy = dataclasses.replace(task.privacy, target_epsilon=1e6)  # never refuse while timing
    ledger = new_site_ledger("timing", privacy)
    model = task.build_model()
    rounds = iter(range(1, 10_000))
    if model.training_mode == "release":
        run_local_round(model, data, training=task.training, privacy=privacy, ledger=ledger,
                        server_round=next(rounds), seed=0, device=device)
    ledger.noise_multiplier = 1.0  # sigma fixed: calibration is a once-per-run cost, not a step's
    ledger.sample_rate = min(1.0, task.training.batch_size / len(data))

    def round_seconds(iterations: int) -> float:
        training = dataclasses.replace(task.training, local_steps=iterations)
        synchronize()
        start = time.perf_counter()
        run_local_round(model, data, training=training, privacy=privacy, ledger=ledger,
                        server_round=next(rounds), seed=0, device=device)
        synchronize()
        return time.perf_counter() - start

    round_seconds(2)  # warm-up: CUDA context, kernels, allocator
    return statistics.median((round_seconds(2 + steps) - round_seconds(2)) / steps for _ in range(repeats))


def time_family(family: str, data: SiteData, device: str, *, steps: int, repeats: int) -> dict[str, Any]:
    path = digits_scenario(family)
    row: dict[str, Any] = {"family": family, "scenario": path.name}
    for side, name in (("cpu", "cpu"), ("device", device)):
        task = scenario_task(path, [], data, name)
        row[f"{side}_s_per_iteration"] = round(seconds_per_iteration(task, data, name, steps=steps,
                                                                     repeats=repeats), 5)
    row["batch_size"] = task.training.batch_size
    row["dp_steps_per_iteration"] = private_steps_per_iteration(task.build_model())
    row["grad_sample_mode"] = task.build_model().grad_sample_mode
    row["cpu_over_device"] = round(row["cpu_s_per_iteration"] / row["device_s_per_iteration"], 2)
    return row


# -- report -------------------------------------------------------------------------------

def environment(device: str) -> dict[str, Any]:
    env = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_cores": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "device": device}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def steady_round_seconds(rounds: list[dict[str, Any]]) -> float:
    """Mean seconds of the rounds after the first (the first calibrates sigma, which the
    accountant caches for the other device's run, and on CUDA starts the context)."""
    return statistics.mean(r["seconds"] for r in (rounds[1:] or rounds))


def print_report(result: dict[str, Any]) -> None:
    device = result["environment"]["device"]
    print(f"\n{'case':32s} {'family':10s} cpu s/round  {device} s/round  checks   (rounds after the first)")
    for case in result["cases"]:
        failed = [k for k, ok in case["checks"].items() if not ok]
        cpu_s, dev_s = (steady_round_seconds(case[side]["rounds"]) for side in ("cpu", "device"))
        print(f"{case['case']:32s} {case['family']:10s} {cpu_s:11.3f}  {dev_s:11.3f}  "
              f"{'ok' if not failed else 'FAILED: ' + ', '.join(failed)}")
    print(f"\n{'family':10s} {'mode':6s} batch  cpu s/iter  {device} s/iter  cpu/{device}")
    for row in result["timing"]:
        print(f"{row['family']:10s} {row['grad_sample_mode']:6s} {row['batch_size']:5d}  "
              f"{row['cpu_s_per_iteration']:10.4f}  {row['device_s_per_iteration']:10.4f}  "
              f"{row['cpu_over_device']:6.2f}")
    print("\nall checks passed" if result["passed"] else "\nSOME CHECKS FAILED")


def write(result: dict[str, Any], name: str) -> list[Path]:
    text = json.dumps(result, indent=2) + "\n"
    paths = [RESULTS / name]
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / name)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return paths


def run_check(*, examples: int, rounds: int, local_steps: int, timing_steps: int, repeats: int,
              cases: list[tuple[str, str, list[str]]] = CASES, timing: bool = True) -> dict[str, Any]:
    """Both parts; ``passed`` is True when every check of every case passed."""
    device = "cuda" if cuda_available() else "cpu"
    data = site_data(examples)
    checked = [check_case(label, SCENARIOS / file, overrides, data, rounds=rounds, local_steps=local_steps,
                          device=device) for label, file, overrides in cases]
    timed = [time_family(f, data, device, steps=timing_steps, repeats=repeats)
             for f in dp_sgd_families(data)] if timing else []
    return {"environment": environment(device), "examples": len(data), "cases": checked, "timing": timed,
            "passed": all(all(c["checks"].values()) for c in checked)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=300, help="the site's digits (the first N)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=5, help="training.local_steps of the checked rounds")
    parser.add_argument("--timing-steps", type=int, default=10, help="iterations per timed difference")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not cuda_available():
        print("CUDA is not available: comparing the CPU with the CPU (the 'cuda' side runs on the CPU)")
    result = run_check(examples=args.examples, rounds=args.rounds, local_steps=args.local_steps,
                       timing_steps=args.timing_steps, repeats=args.repeats)
    print_report(result)
    for path in write(result, "gpu_check.json" if cuda_available() else "gpu_check-nocuda.json"):
        print(f"wrote {path}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
