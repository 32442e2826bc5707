"""The CUDA path: benchmarks/gpu_check.py's checks at small size (docs/benchmarks.md, "GPU check").

Where CUDA exists, the one local training loop runs on the GPU for every family (DP-SGD,
the hybrid's release, the mmd release, one round without DP) and must match the CPU's
ledger, keep its losses finite and of the CPU's magnitude, return the model on the CPU and
sample in range. Without CUDA those tests are skipped with the reason; the check's own
logic is still tested, CPU against CPU.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

from fedgen.shared_models import build_model

REPO = Path(__file__).resolve().parent.parent
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CUDA not available: torch.cuda.is_available() is False on this machine "
           "(run benchmarks/gpu_check.py on a GPU machine; docs/benchmarks.md, 'GPU check')")


def _load_gpu_check() -> ModuleType:
    """benchmarks/gpu_check.py, loaded by path (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GPU_CHECK = _load_gpu_check()


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    return GPU_CHECK


@pytest.fixture(scope="module")
def site(gpu_check):
    return gpu_check.site_data(200)


@needs_cuda
@pytest.mark.parametrize("label, file, overrides", GPU_CHECK.CASES, ids=[c[0].split()[0] for c in GPU_CHECK.CASES])
def test_cuda_round_matches_cpu(gpu_check, site, label, file, overrides):
    result = gpu_check.check_case(label, gpu_check.SCENARIOS / file, overrides, site, rounds=2, local_steps=2,
                                  device="cuda")
    assert result["checks"] == {k: True for k in result["checks"]}, (result["checks"], result["sample"])
    assert result["cpu"]["ledger"] == result["device"]["ledger"]
    trained = [r for r in result["device"]["rounds"] if r["losses"]]
    assert all(r["devices_in_training"] == ["cuda"] for r in trained)


@needs_cuda
def test_cuda_release_warm_start_takes_cpu_data_on_a_gpu_model():
    """A release round on CUDA (the flow hybrid's failed before it became warm_start.release):
    ``statistic_sum`` gets the site's data on the CPU while the model is on the GPU."""
    from fedgen.shared_models.warm_start import with_release_warm_start
    torch.manual_seed(0)
    model = with_release_warm_start(build_model("flow", data_shape=(1, 8, 8), num_classes=10), release_epsilon=4.0)
    x, y = torch.rand(32, 1, 8, 8), torch.arange(32) % 10
    on_cpu = model.statistic_sum(x, y)
    on_gpu = model.to("cuda").statistic_sum(x, y)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-5, atol=1e-5)


@needs_cuda
def test_cuda_dp_iteration_timing_runs(gpu_check, site):
    row = gpu_check.time_family("vae", site, "cuda", steps=2, repeats=1)
    assert row["device_s_per_iteration"] > 0 and row["cpu_s_per_iteration"] > 0


def test_gpu_check_cpu_against_cpu_passes(gpu_check, site):
    """The check's logic where no GPU is: the quickstart's DP round, CPU against CPU."""
    result = gpu_check.run_check(examples=100, rounds=1, local_steps=1, timing_steps=1, repeats=1,
                                 cases=gpu_check.CASES[:1], timing=False)
    assert result["passed"], result["cases"][0]["checks"]
    assert result["cases"][0]["cpu"]["ledger"][0]["steps"] == 1


def test_gpu_check_flags_a_ledger_mismatch_and_a_model_left_on_the_device(gpu_check):
    cpu = {"rounds": [{"status": "trained", "losses": {"elbo": 40.0}, "devices_in_training": ["cpu"],
                       "devices_returned": ["cpu"]}],
           "ledger": [{"round": 1, "steps": 2, "noise_multiplier": 1.5, "sample_rate": 0.8, "epsilon": 4.0}]}
    same = gpu_check.compare(cpu, copy.deepcopy(cpu), "cpu")
    assert all(same.values())
    other = copy.deepcopy(cpu)
    other["ledger"][0]["epsilon"] = 4.5
    other["rounds"][0]["devices_returned"] = ["cuda"]
    other["rounds"][0]["losses"] = {"elbo": 400.0}
    checks = gpu_check.compare(cpu, other, "cpu")
    assert not checks["ledger_equal"] and not checks["returned_on_cpu"] and not checks["losses_similar"]
    assert checks["losses_finite"] and checks["trained_on_device"]
