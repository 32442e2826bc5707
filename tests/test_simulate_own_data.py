"""`fedgen simulate` on the operator's own files (issue #20): a CSV table and a folder of
images with class sub-folders, read by the same readers and options a deployed site uses.
End to end on Flower's simulation runtime, 2 short rounds each."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedgen.contract import rundir

from .test_data_formats import write_digits_csv, write_digits_pngs
from .test_simulation_flower import fedgen, quick_run

pytestmark = pytest.mark.integration

SHORT = ["federation.rounds=2", "federation.num_sites=3"]


def _assert_completed_within_budget(run_dir) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_reason"] == "completed" and summary["rounds_completed"] == 2
    assert math.isfinite(summary["epsilon"]) and 0 < summary["epsilon"] <= 10.0  # quickstart's target


def _sample_shape(run_dir, tmp_path) -> tuple[int, ...]:
    out = tmp_path / "samples.npz"
    res = fedgen("sample", run_dir, "-n", "6", "--out", out, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    with np.load(out) as z:
        x = z["x"]
    assert 0.0 <= x.min() and x.max() <= 1.0
    return x.shape


def test_simulate_runs_a_scenario_from_a_csv_file(tmp_path):
    csv = write_digits_csv(tmp_path / "digits.csv")  # 64 pixel columns in 0..16 + label
    run_dir = quick_run(tmp_path, "quickstart", *SHORT, "data.format=csv", f"data.path={csv}",
                        "data.options.label_column=label", "data.options.feature_min=0",
                        "data.options.feature_max=16", "model.architecture=mlp")
    _assert_completed_within_budget(run_dir)
    spec = rundir.DataSpec.read(run_dir)
    assert spec.format == "csv" and spec.shape == (64,) and spec.options["feature_max"] == 16.0
    assert _sample_shape(run_dir, tmp_path) == (6, 64)


def test_simulate_runs_a_scenario_from_an_image_folder(tmp_path):
    folder = write_digits_pngs(tmp_path / "digits")  # 0/ .. 9/ of 8x8 grayscale PNGs
    run_dir = quick_run(tmp_path, "quickstart", *SHORT, "data.format=images", f"data.path={folder}",
                        "data.options.image_mode=L")
    _assert_completed_within_budget(run_dir)
    spec = rundir.DataSpec.read(run_dir)
    assert spec.format == "images" and spec.shape == (1, 8, 8) and spec.num_classes == 10
    assert _sample_shape(run_dir, tmp_path) == (6, 1, 8, 8)
