"""Heterogeneity: quantity skew, per-site feature skew, and the on-disk partition cache.

Unit tier: no Flower run (the site's loader is called with a stand-in context)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fedgen.simulations.prepare as prepare
from fedgen.client.data import SiteData
from fedgen.client.feature_skew import adjust_contrast, rotate, transform_images
from fedgen.client.site import load_site_data
from fedgen.simulations.errors import PartitionError
from fedgen.simulations.partition import partition, spread_over_sites
from fedgen.contract.scenario import scenario_from_dict

LABELS = np.random.default_rng(0).integers(0, 10, 1000)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGEN_CACHE", str(tmp_path / "cache"))


def _sizes(alpha: float, seed: int) -> np.ndarray:
    return np.array([len(p) for p in partition("quantity", LABELS, 1000, 10, seed=seed, alpha=alpha)])


# -- quantity skew ------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_quantity_sizes_differ_strongly_at_small_alpha_and_barely_at_large(seed):
    small, large = _sizes(0.1, seed), _sizes(1000.0, seed)
    assert small.std() / small.mean() > 1.0 and small.max() > 10 * small.min()
    assert large.std() / large.mean() < 0.06 and large.max() < 1.2 * large.min()
    assert small.sum() == large.sum() == 1000


def test_quantity_is_a_seeded_cover_with_iid_labels():
    a = partition("quantity", LABELS, 1000, 10, seed=3, alpha=0.5)
    assert all(np.array_equal(x, y) for x, y in zip(a, partition("quantity", LABELS, 1000, 10, seed=3, alpha=0.5)))
    assert any(len(x) != len(y) for x, y in zip(a, partition("quantity", LABELS, 1000, 10, seed=4, alpha=0.5)))
    assert np.array_equal(np.sort(np.concatenate(a)), np.arange(1000))
    biggest = max(a, key=len)  # labels drawn uniformly: its class mix is the global one
    tv = 0.5 * np.abs(np.bincount(LABELS[biggest], minlength=10) / len(biggest)
                      - np.bincount(LABELS, minlength=10) / 1000).sum()
    assert len(biggest) > 200 and tv < 0.1


def test_quantity_needs_no_labels_and_keeps_min_examples():
    parts = partition("quantity", None, 1000, 10, seed=0, alpha=0.05, min_examples=40)
    assert min(len(p) for p in parts) >= 40 and sum(len(p) for p in parts) == 1000


def test_quantity_errors_say_why_and_what_to_change():
    with pytest.raises(PartitionError, match=r"30 examples cannot give 10 sites 5 each; .*partition.min_examples"):
        partition("quantity", None, 30, 10, seed=0, min_examples=5)
    with pytest.raises(PartitionError, match="alpha must be > 0"):
        partition("quantity", None, 100, 10, seed=0, alpha=-1.0)


def test_quantity_split_with_holdout_covers_every_example_once(digits):
    scenario = scenario_from_dict({"partition": {"name": "quantity", "alpha": 0.3}, "federation": {"num_sites": 7}})
    sites, holdout = prepare.split_sites(scenario, digits)
    everything = np.concatenate([*sites, holdout])
    assert np.array_equal(np.sort(everything), np.arange(len(digits)))
    assert len(holdout) == round(0.2 * len(digits)) and len({len(s) for s in sites}) > 1


# -- feature skew: the transforms -----------------------------------------------------------

def test_rotation_zero_is_identity_and_ninety_is_rot90():
    x = torch.rand(3, 2, 9, 9)
    assert torch.allclose(rotate(x, 0.0), x, atol=1e-6)
    assert torch.allclose(rotate(x, 90.0), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5)  # counter-clockwise
    assert torch.allclose(rotate(x, -90.0), torch.rot90(x, -1, dims=(-2, -1)), atol=1e-5)


def test_rotation_changes_images_and_keeps_shape_and_range(digits):
    x = digits.x[:50]
    for degrees in (-30.0, 17.0, 45.0):
        r = rotate(x, degrees)
        assert r.shape == x.shape and r.dtype == x.dtype
        assert float(r.min()) >= 0.0 and float(r.max()) <= 1.0
        assert (r - x).abs().mean() > 0.05
    wide = torch.rand(2, 1, 4, 6)  # non-square: turned rigidly, the centre 4x4 of rot90 lands in the middle
    assert torch.allclose(rotate(wide, 90.0)[..., 1:5], torch.rot90(wide, 1, dims=(-2, -1))[..., 1:5, :], atol=1e-5)


def test_contrast_scales_deviations_from_each_image_mean_and_clips():
    x = torch.tensor([[[[0.0, 0.5], [1.0, 0.5]]], [[[0.2, 0.2], [0.2, 0.6]]]])  # means 0.5 and 0.3
    half = adjust_contrast(x, 0.5)
    assert torch.allclose(half, torch.tensor([[[[0.25, 0.5], [0.75, 0.5]]], [[[0.25, 0.25], [0.25, 0.45]]]]))
    double = adjust_contrast(x, 2.0)  # 0.5 + 2 * (0 - 0.5) = -0.5 -> 0; 1.5 -> 1
    assert torch.allclose(double, torch.tensor([[[[0.0, 0.5], [1.0, 0.5]]], [[[0.1, 0.1], [0.1, 0.9]]]]))
    assert torch.allclose(adjust_contrast(x, 1.0), x)
    assert torch.equal(transform_images(x, {"kind": "contrast", "factor": 0.5}), half)


def test_site_parameters_span_the_range_in_a_seeded_order():
    a = spread_over_sites(-30.0, 30.0, 5, seed=1)
    assert sorted(a.tolist()) == [-30.0, -15.0, 0.0, 15.0, 30.0]
    assert np.array_equal(a, spread_over_sites(-30.0, 30.0, 5, seed=1))
    assert any(not np.array_equal(a, spread_over_sites(-30.0, 30.0, 5, seed=s)) for s in range(2, 6))
    assert spread_over_sites(0.5, 1.5, 1, seed=0).tolist() == [1.0]


def test_feature_skew_refuses_vectors():
    scenario = scenario_from_dict({"partition": {"feature_skew": {"kind": "rotation"}}})
    vectors = SiteData(torch.rand(100, 12), None, None, "table.npz")
    with pytest.raises(PartitionError, match=r"^partition.feature_skew: rotation transforms images, but table.npz "
                                             r"holds vectors of shape \(12,\); remove partition.feature_skew"):
        prepare.site_feature_skew(scenario, vectors)


# -- feature skew: recorded in the run directory, applied by the site -------------------------

def _site(run_dir, site: int):
    context = SimpleNamespace(node_config={"partition-id": site}, run_config={})
    return load_site_data(context, conditional=True, run_dir=str(run_dir))


def test_rotation_is_recorded_per_site_and_applied_when_the_site_loads(tmp_path, digits):
    scenario = scenario_from_dict({"name": "skew", "seed": 2, "federation": {"num_sites": 5},
                                   "partition": {"name": "quantity", "feature_skew": {"kind": "rotation",
                                                                                      "max_degrees": 40}}})
    run_dir = prepare.write_run_dir(scenario, tmp_path / "run")
    recorded = json.loads((run_dir / "inputs" / "sites.json").read_text())
    degrees = [recorded[str(i)]["feature_skew"]["degrees"] for i in range(5)]
    assert sorted(degrees) == [-40.0, -20.0, 0.0, 20.0, 40.0]
    assert all(recorded[str(i)]["feature_skew"]["kind"] == "rotation" for i in range(5))
    with np.load(run_dir / "inputs" / "partitions.npz") as z:
        parts, holdout = [z[f"site_{i}"] for i in range(5)], z["holdout"]
    assert [recorded[str(i)]["examples"] for i in range(5)] == [len(p) for p in parts]
    for i in range(5):
        got = _site(run_dir, i)
        assert torch.allclose(got.x, rotate(digits.x[parts[i]], degrees[i]))
        assert torch.equal(got.y, digits.y[parts[i]]) and float(got.x.max()) <= 1.0
        assert torch.allclose(got.x, digits.x[parts[i]], atol=1e-6) == (degrees[i] == 0.0)
    with np.load(run_dir / "inputs" / "reference.npz") as z:  # the evaluation reference is not transformed
        assert np.array_equal(z["x"], digits.x[holdout].numpy())


def test_contrast_factors_are_recorded_and_no_skew_records_none(tmp_path, digits):
    scenario = scenario_from_dict({"name": "c", "partition": {"feature_skew": {"kind": "contrast", "min": 0.5,
                                                                                "max": 1.5}}})
    run_dir = prepare.write_run_dir(scenario, tmp_path / "c")
    recorded = json.loads((run_dir / "inputs" / "sites.json").read_text())
    factors = sorted(v["feature_skew"]["factor"] for v in recorded.values())
    assert factors == [0.5, 0.75, 1.0, 1.25, 1.5]
    plain = prepare.write_run_dir(scenario_from_dict({"name": "p"}), tmp_path / "p")
    assert all(set(v) == {"examples"} for v in json.loads((plain / "inputs" / "sites.json").read_text()).values())
    with np.load(plain / "inputs" / "partitions.npz") as z:
        assert torch.equal(_site(plain, 0).x, digits.x[z["site_0"]])


# -- the partition cache -----------------------------------------------------------------------

@pytest.fixture
def counted(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0])
        return partition(*args, **kwargs)

    monkeypatch.setattr(prepare, "partition", counting)
    return calls


def _cache_files(tmp_path):
    return sorted((tmp_path / "cache" / "partitions").glob("*.npz"))


def _same(a, b) -> bool:
    return len(a[0]) == len(b[0]) and all(np.array_equal(x, y) for x, y in zip(a[0], b[0])) and \
        np.array_equal(a[1], b[1])


def test_second_split_comes_from_the_cache(tmp_path, digits, counted):
    scenario = scenario_from_dict({"partition": {"name": "dirichlet", "alpha": 0.3}})
    first = prepare.split_sites(scenario, digits)
    assert counted == ["dirichlet"] and len(_cache_files(tmp_path)) == 1
    assert _same(prepare.split_sites(scenario, digits), first) and counted == ["dirichlet"]
    prepare.split_sites(scenario_from_dict({"seed": 1, "partition": {"name": "dirichlet", "alpha": 0.3}}), digits)
    prepare.split_sites(scenario_from_dict({"partition": {"name": "dirichlet", "alpha": 0.3}}), digits.subset(
        np.arange(1000)))  # other data, other entry
    assert len(counted) == 3 and len(_cache_files(tmp_path)) == 3


def test_feature_skew_shares_the_cached_split(tmp_path, digits, counted):
    prepare.split_sites(scenario_from_dict({}), digits)
    prepare.split_sites(scenario_from_dict({"partition": {"feature_skew": {"kind": "rotation"}}}), digits)
    assert counted == ["iid"]


def test_corrupt_or_mismatched_cache_entries_are_recomputed(tmp_path, digits, counted):
    scenario = scenario_from_dict({"partition": {"name": "quantity"}})
    first = prepare.split_sites(scenario, digits)
    (path,) = _cache_files(tmp_path)
    path.write_bytes(b"not a zip file")
    assert _same(prepare.split_sites(scenario, digits), first) and len(counted) == 2
    assert _same(prepare.split_sites(scenario, digits), first) and len(counted) == 2  # rewritten, trusted again
    with np.load(path) as z:
        entry = dict(z)
    short = entry | {"site_0": entry["site_0"][:-1]}  # one index lost: not a cover of the data
    np.savez(path, **short)
    assert _same(prepare.split_sites(scenario, digits), first) and len(counted) == 3
    np.savez(path, **(entry | {"key": np.str_("another key")}))
    assert _same(prepare.split_sites(scenario, digits), first) and len(counted) == 4
    assert not list(path.parent.glob(".*.tmp"))  # atomic writes leave no temporary files
