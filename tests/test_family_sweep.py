"""benchmarks/family_sweep.py: --collect puts a run's summary and grid in place; the table and
the plot are built from the summaries alone (docs/benchmarks.md, "The per-family MNIST sweep")."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def sweep(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("family_sweep", REPO / "benchmarks" / "family_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(mod, "IMG", tmp_path / "img")
    monkeypatch.setattr(mod, "MMD", {10: tmp_path / "results" / "mnist-utility-eps10-summary.json"})
    return mod


def _run_dir(path: Path, tstr: float, epsilon: float) -> Path:
    from PIL import Image

    (path / "samples").mkdir(parents=True)
    summary = {"epsilon": epsilon, "wall_seconds": 1234.5,
               "metrics": {"tstr_accuracy": tstr, "trtr_accuracy": 0.929, "fid_domain": 20.25, "precision": 0.7,
                           "recall": 0.8, "label_agreement": 0.75}}
    (path / "summary.json").write_text(json.dumps(summary))
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(path / "samples" / "round-0001.png")
    Image.fromarray(np.full((8, 8, 4), 255, np.uint8)).save(path / "samples" / "round-0003.png")
    return path


def test_collect_table_and_plot(sweep, tmp_path, capsys):
    gan = _run_dir(tmp_path / "gan10", 0.812, 9.9965)
    mmd = _run_dir(tmp_path / "mmd10", 0.866, 10.0)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "mnist-utility-eps10-summary.json").write_text((mmd / "summary.json").read_text())
    sweep.main(["--collect", "gan", "10", str(gan)])
    assert json.loads((tmp_path / "results" / "gan-mnist-eps10-summary.json").read_text())["epsilon"] == 9.9965
    from PIL import Image

    grid = Image.open(tmp_path / "img" / "gan-mnist-eps10.png")
    assert grid.mode == "L" and grid.getpixel((0, 0)) == 255  # the last round's grid, grey
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "| gan | full size | 10 | 10.00 | 81.2 % | 92.9 % | 20.2 | 0.70 | 0.80 | 0.75 | 1 234 s |"
    assert out[3].startswith("| mmd | full size | 10 | 10.00 | 86.6 %")
    assert (tmp_path / "img" / "family-sweep-tstr.png").stat().st_size > 0
    table = json.loads((tmp_path / "results" / "family_sweep.json").read_text())
    assert table["gan"]["10"]["tstr_accuracy"] == 0.812 and set(table) == {"gan", "mmd"}


def test_collect_refuses_an_unfinished_run(sweep, tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit, match="no summary.json"):
        sweep.main(["--collect", "vae", "10", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="unknown family"):
        sweep.main(["--collect", "mmd", "10", str(tmp_path / "run")])
