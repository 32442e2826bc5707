"""One data-format registry (contract/data_formats.py) for simulation and deployment
(issue #20): a scenario takes any registered format with its reader options, a deployed
site's --node-config keys are the same options in kebab-case, and a simulated site
re-reads its data with the options the harness recorded. Fast: no Flower."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedgen.client.data import READERS, load_data
from fedgen.client.errors import DataError
from fedgen.client.site import READER_NODE_KEYS, load_site_data
from fedgen.contract import rundir
from fedgen.contract.data_formats import DATA_FORMATS, node_config_key
from fedgen.contract.errors import ScenarioError
from fedgen.contract.scenario import scenario_from_dict

from .conftest import REPO


def write_digits_csv(path, n: int | None = None):
    """scikit-learn's digits as 64 pixel columns (0..16) and a ``label`` column."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.data[:n], d.target[:n]
    header = ",".join([f"p{i}" for i in range(64)] + ["label"])
    rows = [",".join(str(int(v)) for v in (*xi, yi)) for xi, yi in zip(x, y)]
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def write_digits_pngs(folder, per_class: int | None = None):
    """scikit-learn's digits as 8x8 grayscale PNGs in one sub-folder per class (``0/`` .. ``9/``)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    counts: dict[int, int] = {}
    for image, label in zip(d.images, d.target):
        k = counts.get(int(label), 0)
        if per_class is not None and k >= per_class:
            continue
        counts[int(label)] = k + 1
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).round().astype(np.uint8)).save(folder / str(label) / f"{k}.png")
    return folder


CSV_OPTIONS = {"label_column": "label", "feature_min": 0, "feature_max": 16}


def test_scenario_accepts_csv_and_images_with_their_options():
    csv = scenario_from_dict({"data": {"format": "csv", "path": "x.csv", "options": CSV_OPTIONS}}).data
    assert csv.options == {"label_column": "label", "feature_min": 0.0, "feature_max": 16.0,
                           "feature_stats": None, "feature_clip": False}  # defaults filled: scenario.yaml says all
    images = scenario_from_dict({"data": {"format": "images", "path": "imgs",
                                          "options": {"image_classes": "0,1", "image_mode": "L"}}}).data
    assert images.options == {"image_classes": "0,1", "image_mode": "L"}
    assert scenario_from_dict({}).data.options == {}  # digits: no options


@pytest.mark.parametrize("data, message", [
    ({"format": "csv", "path": "x.csv", "options": {"colour": "red"}},
     "data.options: option(s) colour not accepted by data format 'csv'; accepted: label_column, feature_min, "
     "feature_max, feature_stats, feature_clip"),
    ({"format": "csv", "path": "x.csv", "options": {"image_mode": "L"}},  # another format's option
     "option(s) image_mode not accepted by data format 'csv'"),
    ({"format": "npz", "path": "x.npz", "options": {"label_column": "y"}}, "accepted: none"),
    ({"format": "images", "path": "imgs", "options": {"image_mode": "CMYK"}},
     "option image_mode of data format 'images': Input should be 'L' or 'RGB'"),
    ({"format": "parquet", "path": "x"}, "unknown data format 'parquet'; supported: breast-cancer, csv, digits, images, mnist, npz"),
])
def test_scenario_rejects_unknown_data_option_in_one_line(data, message):
    with pytest.raises(ScenarioError) as err:
        scenario_from_dict({"data": data}, source="s.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_every_format_has_a_reader_and_node_config_keys_are_the_options_in_kebab_case():
    assert set(READERS) == set(DATA_FORMATS)
    options = {o for f in DATA_FORMATS.values() for o in f.option_names}
    assert READER_NODE_KEYS == {o.replace("_", "-"): o for o in options}
    assert {"label-column", "feature-min", "feature-max", "feature-stats", "feature-clip", "image-classes",
            "image-mode"} == set(READER_NODE_KEYS)  # the keys deployed sites already use


def test_docs_name_the_same_options_for_simulation_and_deployment():
    deploy, simulation = (REPO / "docs" / "deploy.md").read_text(), (REPO / "docs" / "simulation.md").read_text()
    table_keys = set(re.findall(r"^\| `([a-z-]+)`(?:, `([a-z-]+)`)? \|", deploy, flags=re.M))
    table_keys = {k for pair in table_keys for k in pair if k}
    for fmt in DATA_FORMATS.values():
        for option in fmt.option_names:
            assert node_config_key(option) in table_keys, f"docs/deploy.md node-config table lacks {option}"
            assert f"`{option}`" in simulation, f"docs/simulation.md does not document {option}"


def _simulated_site(run_dir, site: int):
    ctx = Context(run_id=0, node_id=site, node_config={"partition-id": site, "num-partitions": 2},
                  state=RecordDict(), run_config={"run-dir": str(run_dir)})
    return load_site_data(ctx, conditional=True)


def test_simulated_site_rereads_csv_with_the_recorded_options(tmp_path, monkeypatch):
    from fedgen.simulations.prepare import write_run_dir

    monkeypatch.setenv("FEDGEN_CACHE", str(tmp_path / "cache"))
    csv = write_digits_csv(tmp_path / "digits.csv", n=200)
    scenario = scenario_from_dict({"data": {"format": "csv", "path": str(csv), "options": CSV_OPTIONS},
                                   "federation": {"num_sites": 2}})
    run_dir = write_run_dir(scenario, tmp_path / "run")
    spec = rundir.DataSpec.read(run_dir)
    assert spec.format == "csv" and spec.shape == (64,) and spec.num_classes == 10
    assert spec.options["label_column"] == "label" and spec.options["feature_max"] == 16.0
    whole = load_data("csv", csv, CSV_OPTIONS)
    with np.load(run_dir / rundir.PARTITIONS) as parts:
        idx = parts["site_1"]
    site = _simulated_site(run_dir, 1)
    np.testing.assert_array_equal(site.x.numpy(), whole.x.numpy()[idx])  # scaled by 16, as the harness did
    np.testing.assert_array_equal(site.y.numpy(), whole.y.numpy()[idx])


def test_run_dirs_written_before_data_options_still_read(tmp_path):
    (tmp_path / "inputs").mkdir()
    (tmp_path / rundir.SITE_DATA).write_text(json.dumps({"format": "digits", "path": None, "shape": [1, 8, 8],
                                                         "num_classes": 10, "num_sites": 2}))
    assert rundir.DataSpec.read(tmp_path).options == {}


def _deployed_site(tmp_path, **node_config):
    ctx = Context(run_id=0, node_id=7, node_config={"state-dir": str(tmp_path / "state"), **node_config},
                  state=RecordDict(), run_config={})
    return load_site_data(ctx, conditional=True)


def test_deployed_site_reads_the_same_options_from_node_config(tmp_path):
    csv = write_digits_csv(tmp_path / "digits.csv", n=50)
    data = _deployed_site(tmp_path, **{"data-path": str(csv), "data-format": "csv", "label-column": "label",
                                       "feature-min": 0, "feature-max": 16})
    np.testing.assert_array_equal(data.x.numpy(), load_data("csv", csv, CSV_OPTIONS).x.numpy())
    folder = write_digits_pngs(tmp_path / "imgs", per_class=2)
    data = _deployed_site(tmp_path, **{"data-path": str(folder), "data-format": "images", "image-mode": "RGB"})
    assert data.shape == (3, 8, 8) and data.num_classes == 10
    with pytest.raises(DataError, match="option.s. image_mode not accepted by data format 'csv'"):
        _deployed_site(tmp_path, **{"data-path": str(csv), "data-format": "csv", "image-mode": "L"})
