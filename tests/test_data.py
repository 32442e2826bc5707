"""Site data readers and validation: errors name the file and the problem."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from fedgen.client.data import load_data, read_idx, read_mnist, read_npz
from fedgen.client.errors import DataError


def test_digits_is_the_embedded_default(digits):
    assert len(digits) == 1797 and digits.shape == (1, 8, 8) and digits.num_classes == 10
    assert float(digits.x.min()) == 0.0 and float(digits.x.max()) == 1.0


def test_real_mnist_test_split(mnist_dir):
    data = read_mnist(mnist_dir)
    assert len(data) == 10_000 and data.shape == (1, 28, 28) and data.num_classes == 10
    assert 0.0 <= float(data.x.min()) and float(data.x.max()) <= 1.0
    assert np.bincount(data.y.numpy()).min() > 800


def _write_idx(path, arr: np.ndarray, gz: bool):
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    (gzip.open if gz else open)(path, "wb").write(header + arr.astype(np.uint8).tobytes())


@pytest.mark.parametrize("gz", [True, False])
def test_idx_raw_and_gzip(tmp_path, gz):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 4, 4))
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", imgs, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", np.arange(5), gz)
    data = read_mnist(tmp_path)
    assert data.shape == (1, 4, 4) and data.y.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(data.x.numpy()[:, 0], imgs / 255.0, atol=1e-6)


def test_truncated_idx_names_the_file(tmp_path):
    p = tmp_path / "x-images-idx3-ubyte"
    p.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 10, 28, 28) + b"\0" * 100)
    with pytest.raises(DataError, match=r"x-images-idx3-ubyte.*holds 100 bytes"):
        read_idx(p)


def test_npz_uint8_images_and_vectors(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.full((3, 2, 2), 255, np.uint8), y=np.array([0, 1, 1]))
    data = read_npz(tmp_path / "a.npz")
    assert data.shape == (1, 2, 2) and float(data.x.max()) == 1.0 and data.num_classes == 2
    np.savez(tmp_path / "b.npz", x=np.random.default_rng(0).random((6, 5)))
    assert read_npz(tmp_path / "b.npz").shape == (5,)


@pytest.mark.parametrize("arrays, message", [
    (dict(x=np.array([[0.1, np.nan]])), "NaN/Inf"),
    (dict(x=np.array([[0.1, 2.0]])), r"span \[0.1, 2\]; expected \[0, 1\]"),
    (dict(x=np.zeros((0, 4))), "no examples"),
    (dict(x=np.zeros((2, 4)), y=np.array([0, -1])), "labels must be >= 0"),
    (dict(x=np.zeros((2, 4)), y=np.array([0, 1, 2])), "one label per example"),
    (dict(x=np.zeros((2, 4)), y=np.array([0.5, 1.0])), "labels must be integers"),
    (dict(x=np.zeros(4)), "must be"),
    (dict(z=np.zeros((2, 4))), "no array named 'x'"),
])
def test_bad_npz_is_rejected_naming_file_and_problem(tmp_path, arrays, message):
    path = tmp_path / "site.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as err:
        read_npz(path)
    assert "site.npz" in str(err.value) and "\n" not in str(err.value)


def test_missing_and_unknown(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_data("npz", tmp_path / "nope.npz")
    with pytest.raises(DataError, match="supported: breast-cancer, csv, digits, images, mnist, npz"):
        load_data("parquet", "x")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match="cannot read as .npz"):
        read_npz(tmp_path / "junk.npz")
