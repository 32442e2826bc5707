"""Unit tests of evaluation/: FID/KID maths, PRDC against a reference, collapse
diagnostics, TSTR, the feature-extractor cache and the suite (no Flower; seconds)."""

from __future__ import annotations

import gzip
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from fedgen.evaluation import (
    ClassifierConfig,
    DomainFeatureExtractor,
    Metric,
    UnknownMetricError,
    collapse_diagnostics,
    compute_prdc,
    default_metric_names,
    evaluate_samples,
    fid_from_features,
    frechet_distance,
    get_metric,
    inception_score,
    kernel_inception_distance,
    list_metrics,
    metric_directions,
    train_synthetic_test_real,
)
from fedgen.evaluation.fid import polynomial_kernel
from fedgen.evaluation.report import write_comparison
from fedgen.evaluation.tstr import wilson_interval

MNIST_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    """sklearn digits as (1, 8, 8) images in [0, 1], split 50/50 (stratified, seeded)
    into a generator-side ``train`` half and a held-out ``ref`` half."""
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    tr, ref = train_test_split(np.arange(len(y)), test_size=0.5, stratify=d.target, random_state=0)
    return {"x_train": x[tr], "y_train": y[tr], "x_ref": x[ref], "y_ref": y[ref]}


@pytest.fixture(scope="module")
def extractor(digits, tmp_path_factory) -> DomainFeatureExtractor:
    return DomainFeatureExtractor.fit(
        digits["x_ref"], digits["y_ref"], seed=0, cache_dir=tmp_path_factory.mktemp("cache")
    )


# -- registry ------------------------------------------------------------------------------
def test_registry_describes_every_metric():
    directions = metric_directions()
    assert set(directions) == set(list_metrics())
    for name in list_metrics():
        m = get_metric(name)
        assert isinstance(m, Metric)
        assert m.name == name and m.direction in ("minimize", "maximize") and m.units
    assert directions["fid_domain"] == "minimize" and directions["coverage"] == "maximize"
    assert "tstr_accuracy" not in default_metric_names() and "tstr_accuracy" in default_metric_names(tstr=True)


def test_unknown_metric_lists_the_registered_ones():
    with pytest.raises(UnknownMetricError) as err:
        get_metric("inception_fid")
    assert "fid_domain" in str(err.value) and "coverage" in str(err.value)


# -- FID -----------------------------------------------------------------------------------
def _closed_form_fid(mu1, s1, mu2, s2) -> float:
    """Independent route to Tr((S1 S2)^{1/2}) = Tr((S1^{1/2} S2 S1^{1/2})^{1/2}) via eigh."""
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def _random_gaussian(rng: np.random.Generator, d: int) -> tuple[np.ndarray, np.ndarray]:
    a = rng.normal(size=(d, d))
    return rng.normal(size=d), a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_matches_closed_form():
    # one dimension by hand: N(0, 1) vs N(1, 4): 1 + 1 + 4 - 2 * 2 = 2
    assert frechet_distance(np.zeros(1), np.eye(1), np.ones(1), 4 * np.eye(1)) == pytest.approx(2.0, abs=1e-9)
    rng = np.random.default_rng(0)
    (mu1, s1), (mu2, s2) = _random_gaussian(rng, 16), _random_gaussian(rng, 16)  # non-commuting
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_closed_form_fid(mu1, s1, mu2, s2), abs=1e-3)


def _with_exact_moments(z: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Samples whose empirical mean / unbiased covariance are exactly ``mu`` / ``sigma``."""
    z = z - z.mean(0)
    white = np.linalg.cholesky(np.cov(z, rowvar=False))
    return mu + z @ np.linalg.inv(white).T @ np.linalg.cholesky(sigma).T


def test_fid_from_features_on_gaussians_with_exact_moments():
    rng = np.random.default_rng(1)
    (mu1, s1), (mu2, s2) = _random_gaussian(rng, 8), _random_gaussian(rng, 8)
    a = _with_exact_moments(rng.normal(size=(500, 8)), mu1, s1)
    b = _with_exact_moments(rng.normal(size=(700, 8)), mu2, s2)
    assert fid_from_features(a, b) == pytest.approx(_closed_form_fid(mu1, s1, mu2, s2), abs=1e-3)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)


def test_fid_survives_singular_covariance():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(20, 32))  # fewer samples than dimensions: rank-deficient covariance
    b = rng.normal(size=(20, 32)) + 1.0
    value = fid_from_features(a, b)
    assert math.isfinite(value) and value > 0


# -- KID -----------------------------------------------------------------------------------
def _unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    m = x.shape[0]
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    off = ~np.eye(m, dtype=bool)
    return kxx[off].sum() / (m * (m - 1)) + kyy[off].sum() / (m * (m - 1)) - 2 * kxy.mean()


def test_kid_is_the_unbiased_mmd2_and_separates_distributions():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    whole = kernel_inception_distance(x, y, num_subsets=3, subset_size=300)  # every subset = all rows
    assert whole.mean == pytest.approx(_unbiased_mmd2(x, y), rel=1e-9, abs=1e-12) and whole.std < 1e-9
    same = kernel_inception_distance(x, y, num_subsets=50, subset_size=100, seed=0)
    shifted = kernel_inception_distance(x, y + 0.5, num_subsets=50, subset_size=100, seed=0)
    assert abs(same.mean) < 0.02
    assert shifted.mean > 10 * max(abs(same.mean), same.std) and shifted.mean > 0.1


# -- PRDC ----------------------------------------------------------------------------------
def _prdc_by_loops(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """Independent reference: the formulas of Kynkäänniemi et al. 2019 / Naeem et al. 2020
    written out as loops over points."""
    def radius(points, i):
        d = sorted(np.linalg.norm(points - points[i], axis=1))
        return d[k]  # d[0] is the point itself

    r_real = [radius(real, i) for i in range(len(real))]
    r_fake = [radius(fake, j) for j in range(len(fake))]
    dist = lambda a, b: float(np.linalg.norm(a - b))  # noqa: E731
    precision = np.mean([any(dist(f, r) < r_real[i] for i, r in enumerate(real)) for f in fake])
    recall = np.mean([any(dist(r, f) < r_fake[j] for j, f in enumerate(fake)) for r in real])
    density = np.mean([sum(dist(f, r) < r_real[i] for i, r in enumerate(real)) for f in fake]) / k
    coverage = np.mean([min(dist(r, f) for f in fake) < r_real[i] for i, r in enumerate(real)])
    return dict(precision=precision, recall=recall, density=density, coverage=coverage)


def test_prdc_matches_independent_reference():
    rng = np.random.default_rng(4)
    real, fake = rng.normal(size=(60, 5)), rng.normal(size=(50, 5)) + 0.3
    ours = compute_prdc(real, fake, k=5)
    for key, value in _prdc_by_loops(real, fake, 5).items():
        assert getattr(ours, key) == pytest.approx(value, abs=1e-12), key


def test_prdc_matches_the_prdc_package():
    prdc_pkg = pytest.importorskip("prdc", reason="the authors' `prdc` package is a test extra")
    rng = np.random.default_rng(5)
    for shift in (0.0, 0.5):
        real = rng.normal(size=(400, 16)).astype(np.float32)
        fake = (rng.normal(size=(300, 16)) + shift).astype(np.float32)
        expected = prdc_pkg.compute_prdc(real_features=real, fake_features=fake, nearest_k=5)
        ours = compute_prdc(real, fake, k=5)
        for key, value in expected.items():
            assert getattr(ours, key) == pytest.approx(float(value), abs=1e-9), (key, shift)


def test_inception_score_bounds():
    assert inception_score(np.eye(10)) == pytest.approx(10.0, rel=1e-6)  # confident and even
    assert inception_score(np.tile(np.eye(10)[3], (20, 1))) == pytest.approx(1.0, rel=1e-6)  # one class
    assert inception_score(np.full((20, 10), 0.1)) == pytest.approx(1.0, rel=1e-6)  # unsure


# -- collapse on digits ------------------------------------------------------------------
def test_one_class_generator_is_flagged_collapsed(digits, extractor):
    ref_x, ref_y = digits["x_ref"], digits["y_ref"]
    # A "generator" emitting only the reference's own 3s: the classifier fit them, so
    # every sample lands in class 3.
    only3 = ref_x[ref_y == 3]
    m = evaluate_samples(only3, None, ref_x, ref_y, extractor=extractor)
    assert m["classes_covered"] == 1 and m["collapsed"] == 1
    assert m["coverage"] < 0.2 and m["class_entropy"] < 0.05
    # Unseen 3s: a classifier error or two may touch another class, still collapsed.
    unseen3 = digits["x_train"][digits["y_train"] == 3]
    m = evaluate_samples(unseen3, None, ref_x, ref_y, extractor=extractor)
    assert m["classes_covered"] <= 3 and m["collapsed"] == 1 and m["coverage"] < 0.2


def test_real_held_out_digits_are_not_collapsed(digits, extractor):
    m = evaluate_samples(
        digits["x_train"], digits["y_train"], digits["x_ref"], digits["y_ref"], extractor=extractor
    )
    assert m["classes_covered"] == 10 and m["collapsed"] == 0
    assert m["class_entropy"] > 0.95 and 0.7 < m["diversity_ratio"] < 1.5
    assert m["coverage"] > 0.8 and m["precision"] > 0.8 and m["label_agreement"] > 0.9
    assert m["is_domain"] > 7.0
    noise = evaluate_samples(torch.rand(500, 1, 8, 8), None, digits["x_ref"], digits["y_ref"], extractor=extractor)
    assert noise["fid_domain"] > 10 * m["fid_domain"] and noise["kid_domain"] > 10 * abs(m["kid_domain"])
    # precision is inflated by outlier-sized real balls (Naeem et al. 2020); density is not
    assert noise["precision"] < 0.25 and noise["density"] < 0.1 and noise["coverage"] < 0.1


def test_collapse_diagnostics_on_synthetic_features():
    rng = np.random.default_rng(6)
    real = rng.normal(size=(400, 4))
    real_cls = np.repeat(np.arange(4), 100)
    # all four classes present, but each generated class squeezed to a tenth of the spread
    fake = 0.1 * rng.normal(size=(400, 4))
    d = collapse_diagnostics(fake, real_cls, real, real_cls, 4)
    assert d.classes_covered == 4 and d.diversity_ratio < 0.2 and d.collapsed
    d = collapse_diagnostics(rng.normal(size=(400, 4)), real_cls, real, real_cls, 4)
    assert d.classes_covered == 4 and 0.8 < d.diversity_ratio < 1.2 and not d.collapsed
    assert d.class_entropy == pytest.approx(1.0)


# -- TSTR ----------------------------------------------------------------------------------
def test_tstr_on_real_digits_beats_chance_and_noise_does_not(digits):
    real = train_synthetic_test_real(digits["x_train"], digits["y_train"], digits["x_ref"], digits["y_ref"], seed=0)
    assert real.tstr_accuracy > 0.85 and real.trtr_accuracy > 0.85
    assert real.validation_accuracy > 0.85  # the same classifier on the real-train half
    assert real.n_real_train + real.n_real_test == len(digits["y_ref"])
    g = torch.Generator().manual_seed(0)
    noise_x, noise_y = torch.rand(len(digits["y_train"]), 1, 8, 8, generator=g), torch.randint(0, 10, (len(digits["y_train"]),), generator=g)
    noise = train_synthetic_test_real(noise_x, noise_y, digits["x_ref"], digits["y_ref"], seed=0)
    assert noise.tstr_accuracy < 0.25
    assert noise.validation_accuracy < 0.25
    assert noise.trtr_accuracy == real.trtr_accuracy  # same reference split and seed
    low, high = real.tstr_interval()
    assert low < real.tstr_accuracy < high
    assert (low, high) == wilson_interval(round(real.tstr_accuracy * real.n_real_test), real.n_real_test)


@pytest.mark.parametrize("successes,trials", [(920, 1000), (3, 40), (0, 50), (50, 50)])
def test_wilson_interval_matches_its_closed_form(successes, trials):
    # Wilson (1927): (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), z the normal 97.5 % point
    z, n, p = 1.959963984540054, trials, successes / trials
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = wilson_interval(successes, trials)
    assert low == pytest.approx(max(0.0, (centre - half) / (1 + z * z / n)), abs=1e-12)
    assert high == pytest.approx(min(1.0, (centre + half) / (1 + z * z / n)), abs=1e-12)
    assert wilson_interval(successes, trials, 0.99)[0] <= low  # wider at higher confidence


def test_reports_print_tstr_with_its_interval(tmp_path):
    runs = []
    for name, tstr in (("a", 0.931), ("b", 0.5)):
        run = tmp_path / name
        run.mkdir()
        metrics = {"tstr_accuracy": tstr, "tstr_ci95_low": 0.9136, "tstr_ci95_high": 0.9451} if name == "a" else {
            "tstr_accuracy": tstr}
        (run / "summary.json").write_text(json.dumps({"rounds_completed": 1, "metrics": metrics}))
        (run / "metrics.jsonl").write_text(json.dumps({"round": 1, **metrics}) + "\n")
        runs.append(run)
    write_comparison(runs, tmp_path / "cmp")
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| tstr_accuracy | 0.931 (95 % interval 0.914–0.945) | 0.5 |" in table


# -- feature extractor ---------------------------------------------------------------------
def test_extractor_cache_reuses_and_keys_by_reference(digits, tmp_path):
    cfg = ClassifierConfig(epochs=2)
    first = DomainFeatureExtractor.fit(digits["x_ref"], digits["y_ref"], seed=0, config=cfg, cache_dir=tmp_path)
    assert not first.loaded_from_cache and first.cache_path is not None and first.cache_path.exists()
    mtime = first.cache_path.stat().st_mtime_ns
    second = DomainFeatureExtractor.fit(digits["x_ref"], digits["y_ref"], seed=0, config=cfg, cache_dir=tmp_path)
    assert second.loaded_from_cache and second.cache_key == first.cache_key
    assert second.cache_path.stat().st_mtime_ns == mtime  # not rewritten, i.e. not retrained
    np.testing.assert_array_equal(second.features(digits["x_train"]), first.features(digits["x_train"]))
    other = DomainFeatureExtractor.fit(digits["x_train"], digits["y_train"], seed=0, config=cfg, cache_dir=tmp_path)
    assert not other.loaded_from_cache and other.cache_key != first.cache_key
    reseeded = DomainFeatureExtractor.fit(digits["x_ref"], digits["y_ref"], seed=1, config=cfg, cache_dir=tmp_path)
    assert reseeded.cache_key != first.cache_key
    assert len(list(tmp_path.glob("domain-extractor-*.pt"))) == 3
    assert not list(tmp_path.glob(".tmp-*"))  # atomic writes leave no partial files


def test_extractor_is_deterministic_by_seed(digits):
    cfg = ClassifierConfig(epochs=2)
    a = DomainFeatureExtractor.fit(digits["x_ref"], digits["y_ref"], seed=3, config=cfg, use_cache=False)
    b = DomainFeatureExtractor.fit(digits["x_ref"], digits["y_ref"], seed=3, config=cfg, use_cache=False)
    np.testing.assert_array_equal(a.features(digits["x_train"]), b.features(digits["x_train"]))


def test_cache_dir_defaults_to_fedgen_cache_env(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGEN_CACHE", str(tmp_path))
    ex = DomainFeatureExtractor.fit(digits["x_ref"][:200], None, seed=0)
    assert ex.cache_path is not None and ex.cache_path.parent == tmp_path / "features"


def test_unlabelled_reference_uses_random_features_and_clusters(digits, tmp_path):
    ex = DomainFeatureExtractor.fit(digits["x_ref"], None, seed=0, cache_dir=tmp_path)
    assert ex.mode == "random" and not ex.has_classifier and ex.num_classes == 10
    m = evaluate_samples(digits["x_train"], None, digits["x_ref"], None, extractor=ex)
    assert "is_domain" not in m and "label_agreement" not in m
    assert m["classes_covered"] >= 8 and m["collapsed"] == 0
    m0 = evaluate_samples(digits["x_ref"][digits["y_ref"] == 0], None, digits["x_ref"], None, extractor=ex)
    assert m0["fid_domain"] > 5 * m["fid_domain"] and m0["coverage"] < m["coverage"]


def test_vector_data_uses_the_mlp(digits, tmp_path):
    flat = {k: v.flatten(1) if v.dim() > 1 else v for k, v in digits.items()}
    ex = DomainFeatureExtractor.fit(flat["x_ref"], flat["y_ref"], seed=0, cache_dir=tmp_path)
    assert ex.data_shape == (64,)
    m = evaluate_samples(flat["x_train"], flat["y_train"], flat["x_ref"], flat["y_ref"], extractor=ex)
    assert m["classes_covered"] == 10 and m["label_agreement"] > 0.85


# -- suite ---------------------------------------------------------------------------------
def test_suite_output_is_flat_json_with_known_directions(digits, extractor):
    m = evaluate_samples(
        digits["x_train"][:300], digits["y_train"][:300], digits["x_ref"], digits["y_ref"],
        extractor=extractor, tstr=True, seed=1,
    )
    expected = {
        "fid_domain", "kid_domain", "kid_domain_std", "precision", "recall", "density", "coverage",
        "is_domain", "classes_covered", "class_entropy", "diversity_ratio", "collapsed",
        "label_agreement", "tstr_accuracy", "tstr_ci95_low", "tstr_ci95_high", "trtr_accuracy",
    }
    assert set(m) == expected
    assert set(m) <= set(metric_directions())
    assert json.loads(json.dumps(m)) == m
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in m.values())
    only = evaluate_samples(
        digits["x_train"][:300], None, digits["x_ref"], digits["y_ref"], extractor=extractor,
        metrics=["fid_domain", "label_agreement"],
    )
    assert set(only) == {"fid_domain"}  # label_agreement needs sample labels


def test_suite_rejects_bad_inputs(digits, extractor):
    ref_x, ref_y = digits["x_ref"], digits["y_ref"]
    bad = torch.full((50, 1, 8, 8), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        evaluate_samples(bad, None, ref_x, ref_y, extractor=extractor)
    with pytest.raises(ValueError, match="shape"):
        evaluate_samples(torch.rand(50, 1, 9, 9), None, ref_x, ref_y, extractor=extractor)
    with pytest.raises(ValueError, match="sample_labels"):
        evaluate_samples(torch.rand(50, 1, 8, 8), torch.zeros(7), ref_x, ref_y, extractor=extractor)
    with pytest.raises(UnknownMetricError, match="fid_domain"):
        evaluate_samples(torch.rand(50, 1, 8, 8), None, ref_x, ref_y, extractor=extractor, metrics=["fid"])


# -- MNIST (28x28) -------------------------------------------------------------------------
def _load_mnist(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    with gzip.open(MNIST_DIR / "t10k-images-idx3-ubyte.gz") as fh:
        x = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n]
    with gzip.open(MNIST_DIR / "t10k-labels-idx1-ubyte.gz") as fh:
        y = np.frombuffer(fh.read(), np.uint8, offset=8)[:n]
    return torch.tensor(x / 255.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


@pytest.mark.skipif(not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(), reason="MNIST not at ../shared/data/mnist")
def test_mnist_real_vs_noise_and_eval_speed(tmp_path):
    x, y = _load_mnist(2000)
    ref_x, ref_y, gen_x, gen_y = x[:1000], y[:1000], x[1000:], y[1000:]
    ex = DomainFeatureExtractor.fit(ref_x, ref_y, seed=0, config=ClassifierConfig(epochs=5), cache_dir=tmp_path)
    evaluate_samples(gen_x[:10], None, ref_x, ref_y, extractor=ex)  # embeds the reference once
    start = time.perf_counter()
    real = evaluate_samples(gen_x, gen_y, ref_x, ref_y, extractor=ex)
    seconds = time.perf_counter() - start
    assert seconds < 10.0  # ~0.5 s here; generous for a shared machine
    noise = evaluate_samples(torch.rand(1000, 1, 28, 28), None, ref_x, ref_y, extractor=ex)
    assert real["classes_covered"] == 10 and real["collapsed"] == 0 and real["label_agreement"] > 0.8
    assert noise["fid_domain"] > 10 * real["fid_domain"] and noise["collapsed"] == 1


def test_trace_sqrt_product_equals_the_general_matrix_square_root():
    import scipy.linalg

    from fedgen.evaluation.fid import trace_sqrt_product

    rng = np.random.default_rng(0)
    for d, n in [(8, 50), (32, 20)]:  # full rank, and singular (fewer samples than dimensions)
        a, b = rng.standard_normal((n, d)), rng.standard_normal((n, d)) * 2.0
        s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        expected = float(np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
        assert trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-6, abs=1e-8)


def test_grid_rows_hold_one_class_each():
    from fedgen.evaluation.plots import rows_by_class, sample_grid

    labels = torch.arange(40) % 4  # the order balanced_labels gives: 0 1 2 3 0 1 2 3 ...
    x = labels.float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2) / 3  # every image is its label's grey
    grid = sample_grid(rows_by_class(x, labels, per_class=10), nrow=10, pad=1)
    assert grid.shape == (4 * 3 + 1, 10 * 3 + 1)
    for c in range(4):  # row c: ten images of grey c / 3
        row = grid[1 + 3 * c: 3 + 3 * c]
        np.testing.assert_allclose(row[:, 1::3], c / 3, atol=1e-6)
