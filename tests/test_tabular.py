"""Tabular data end to end (issue #23 items 3 and 4): the table schema and its validation,
`fedgen sample --out rows.csv` in the columns' original units and inside their declared
bounds, the site's node-config keys read in one place (`fedgen check-data`), the mmd
family's `architecture: auto`, and a simulated run on the breast-cancer table."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import yaml

from fedgen.client.data import breast_cancer_table, load_data
from fedgen.client.errors import DataError
from fedgen.contract import rundir
from fedgen.contract.data_formats import NODE_CONFIG_KEYS, SITE_NODE_KEYS, TableSchema, site_data_config
from fedgen.contract.errors import ScenarioError
from fedgen.contract.scenario import scenario_from_dict
from fedgen.evaluation.tabular import in_bounds_fraction, logistic_accuracy
from fedgen.shared_models import build_model
from fedgen.simulations.cli import main
from fedgen.simulations.sampling import table_csv

from .conftest import REPO

SCENARIO = REPO / "scenarios" / "tabular-breast-cancer.yaml"


def _deployment(**table) -> dict:
    return {"model": {"family": "mmd"},
            "deployment": {"data_shape": [len(table.get("columns", [1, 2]))], "num_classes": 2, "table": table}}


# -- the table schema ---------------------------------------------------------------------

@pytest.mark.parametrize("table, message", [
    ({"columns": ["a", "b"], "feature_min": [0, 0, 0], "feature_max": [1, 1]}, "feature_min has 3 values; columns has 2"),
    ({"columns": ["a", "b"], "feature_min": [0, 5], "feature_max": [1, 5]}, "feature_max must exceed feature_min "
     "for every column; not for b"),
    ({"columns": ["a", "a"], "feature_min": 0, "feature_max": 1}, "columns: names must be distinct"),
    ({"columns": ["a", "y"], "label_column": "y", "feature_min": 0, "feature_max": 1}, "label_column 'y' is also"),
    ({"columns": ["a", "b"], "feature_min": 0}, "deployment.table.feature_max: Field required"),
])
def test_table_schema_errors_are_one_line(table, message):
    with pytest.raises(ScenarioError) as err:
        scenario_from_dict(_deployment(**table))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_table_must_match_the_declared_shape():
    raw = _deployment(columns=["a", "b"], feature_min=0, feature_max=1)
    raw["deployment"]["data_shape"] = [3]
    with pytest.raises(ScenarioError, match=r"table: 2 columns need data_shape \[2\], got \[3\]"):
        scenario_from_dict(raw)


def test_table_csv_writes_original_units_and_clamps():
    table = TableSchema(columns=["age", "dose"], label_column="outcome", feature_min=[18, 0.5], feature_max=[90, 2.5])
    x = np.array([[0.0, 1.0], [0.5, 0.25], [1.7, -0.3]], dtype=np.float32)  # last row outside [0, 1]
    rows = list(csv.reader(table_csv(x, np.array([1, 0, 1]), table).splitlines()))
    assert rows[0] == ["age", "dose", "outcome"]
    values = np.array([[float(v) for v in r[:2]] for r in rows[1:]])
    np.testing.assert_allclose(values, [[18, 2.5], [54, 1.0], [90, 0.5]])  # 18 + 0.5 * 72 = 54; clamped
    assert [r[2] for r in rows[1:]] == ["1", "0", "1"]
    assert in_bounds_fraction(values, [18, 0.5], [90, 2.5]).tolist() == [1.0, 1.0]


# -- data formats and the site's node-config keys ----------------------------------------------

def test_breast_cancer_is_embedded_and_scaled_by_public_bounds():
    data = load_data("breast-cancer")
    x, y, names, lo, hi = breast_cancer_table()
    assert len(data) == 569 and data.shape == (30,) and data.num_classes == 2 and len(names) == 30
    assert data.columns == tuple(names) and float(data.x.min()) >= 0.0 and float(data.x.max()) <= 1.0
    assert np.all(lo <= x.min(0)) and np.all(hi >= x.max(0)) and np.all(hi > lo)
    np.testing.assert_allclose(lo + data.x.numpy() * (hi - lo), x, rtol=1e-5, atol=1e-4)


def _write_site_csv(folder, n=40):
    rng = np.random.default_rng(0)
    x = rng.uniform([0, 100], [10, 300], size=(n, 2))
    label = (x[:, 0] > 5).astype(int)
    path = folder / "site.csv"
    path.write_text("temp,pressure,label\n" + "".join(f"{a:.3f},{b:.3f},{c}\n" for (a, b), c in zip(x, label)))
    (folder / "stats.json").write_text(json.dumps({"min": [0, 100], "max": [10, 300]}))
    return path


def test_node_config_keys_live_in_one_place():
    cfg = site_data_config({"data-path": "/d/site.csv", "feature-stats": "s.json", "feature-clip": True,
                            "label-column": "y", "site-id": "a", "state-dir": "/s", "max-epsilon": 8.0})
    assert (cfg.format, cfg.path) == ("csv", "/d/site.csv")  # format from the file name
    assert cfg.options == {"feature_stats": "s.json", "feature_clip": True, "label_column": "y"}
    assert {"image-classes", "image-mode", "feature-stats", "feature-clip"} <= set(NODE_CONFIG_KEYS)
    with pytest.raises(ValueError, match="key\\(s\\) colour not known; accepted: data-path, "):
        site_data_config({"data-path": "x.csv", "colour": 1}, strict=True)
    assert "state-dir" in SITE_NODE_KEYS


def test_check_data_accepts_the_documented_keys_and_reports_rows(tmp_path, capsys, monkeypatch):
    path = _write_site_csv(tmp_path)
    monkeypatch.chdir(tmp_path)
    node_config = (f'site-id="a" data-path="{path}" label-column="label" feature-stats="stats.json" '
                   'feature-clip=true state-dir="/tmp/x" max-epsilon=8.0')
    assert main(["check-data", "--node-config", node_config]) == 0
    out = capsys.readouterr().out
    assert "40 rows of 2 feature columns, 2 classes" in out and "(csv)" in out


def test_check_data_errors_name_the_key_or_the_fix(tmp_path, capsys):
    path = _write_site_csv(tmp_path)
    assert main(["check-data", "--node-config", f'data-path="{path}" image-colour="red"']) == 2
    err = capsys.readouterr().err
    assert "image-colour not known" in err and "Traceback" not in err
    # unscaled columns: the advice names the CSV's bounds keys, not image storage
    assert main(["check-data", "--node-config", f'data-path="{path}" label-column="label"']) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "feature-min and feature-max" in err and "uint8" not in err


def test_csv_value_outside_declared_bounds_names_the_bounds(tmp_path):
    path = _write_site_csv(tmp_path)
    with pytest.raises(DataError) as err:
        load_data("csv", path, {"label-column": "label", "feature-min": "0,100", "feature-max": "4,300"})
    assert "feature-min/feature-max" in str(err.value) and "feature-clip=true" in str(err.value)
    assert "uint8" not in str(err.value)


# -- mmd on rows --------------------------------------------------------------------------

def test_mmd_architecture_auto_is_mlp_for_rows_and_conv_for_images():
    assert build_model("mmd", data_shape=(30,), num_classes=2, num_features=20).architecture == "mlp"
    assert build_model("mmd", data_shape=(1, 8, 8), num_features=20).architecture == "conv"
    assert build_model("mmd", data_shape=(1, 6, 6), num_features=20).architecture == "mlp"


def test_prepare_with_a_shape_the_architecture_cannot_take_is_one_line(tmp_path, capsys):
    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump({"name": "t", "model": {"family": "mmd", "architecture": "conv"},
                                        "deployment": {"data_shape": [30], "num_classes": 2}}))
    assert main(["prepare", str(scenario), "--out", str(tmp_path / "run")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "deployment.data_shape, shape [30]" in err and "use architecture: mlp" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_prepare_records_the_table_and_sample_csv_needs_one(tmp_path):
    scenario = tmp_path / "s.yaml"
    table = {"columns": ["a", "b", "c"], "label_column": "y", "feature_min": [0, 0, -1], "feature_max": [1, 10, 1]}
    scenario.write_text(yaml.safe_dump({"name": "t", "model": {"family": "mmd", "num_features": 20},
                                        "deployment": {"data_shape": [3], "num_classes": 2, "table": table}}))
    assert main(["prepare", str(scenario), "--out", str(tmp_path / "run")]) == 0
    spec = rundir.DataSpec.read(tmp_path / "run")
    assert spec.table["columns"] == ["a", "b", "c"] and spec.table["feature_max"] == [1, 10, 1]


# -- a simulated run on the breast-cancer table --------------------------------------------

@pytest.mark.slow
@pytest.mark.integration
def test_breast_cancer_simulation_writes_csv_in_bounds_with_useful_labels(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["simulate", str(SCENARIO), "--out", str(run), "--set", "evaluation.every=0"]) == 0
    out = tmp_path / "rows.csv"
    assert main(["sample", str(run), "-n", "600", "--out", str(out)]) == 0
    rows = list(csv.reader(out.read_text().splitlines()))
    x, y, names, lo, hi = breast_cancer_table()
    assert rows[0] == names + ["target"]
    synth = np.array([[float(v) for v in r[:-1]] for r in rows[1:]])
    labels = np.array([int(r[-1]) for r in rows[1:]])
    assert synth.shape == (600, 30) and set(labels) == {0, 1}
    assert in_bounds_fraction(synth, lo, hi).min() == 1.0  # every value inside its declared bounds
    with np.load(run / rundir.REFERENCE) as ref:  # the held-out real rows, scaled
        real_x, real_y = lo + ref["x"] * (hi - lo), ref["y"]
    assert logistic_accuracy(synth, labels, real_x, real_y) >= 0.85
    # .npz keeps the model's [0, 1] units
    assert main(["sample", str(run), "-n", "10", "--out", str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as z:
        assert z["x"].shape == (10, 30) and 0.0 <= z["x"].min() and z["x"].max() <= 1.0


def test_mmd_unbiased_fit_loss_has_no_small_batch_bias():
    torch.manual_seed(0)
    model = build_model("mmd", data_shape=(3,), num_features=40, bandwidth=0.5)
    x = torch.rand(500, 3)
    model.set_release(model.statistic_sum(x, None) / len(x))
    with torch.no_grad():
        exact = float(model.mmd_loss(200_000))  # the batch bias is ~1/batch: negligible here
        plain = np.mean([float(model.mmd_loss(8)) for _ in range(400)])
        model.fit_unbiased = True
        unbiased = np.mean([float(model.mmd_loss(8)) for _ in range(400)])
    assert abs(unbiased - exact) < 0.2 * abs(plain - exact)
