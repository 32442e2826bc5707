"""Site data: readers for the supported formats and validation on load.

Every reader returns a :class:`SiteData` with ``x`` as float32 in [0, 1], shaped
``[N, C, H, W]`` (images) or ``[N, D]`` (vectors), and optional integer labels ``y``.
Any problem raises :class:`~client.errors.DataError` naming the file and what is wrong.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .errors import DataError


@dataclass(frozen=True)
class SiteData:
    """Examples held at one site (or a whole dataset before partitioning)."""

    x: Tensor  # float32, [N, *shape], values in [0, 1]
    y: Tensor | None  # int64 [N] or None
    num_classes: int | None
    source: str

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def subset(self, indices: np.ndarray | Tensor, source: str | None = None) -> "SiteData":
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return SiteData(self.x[idx], None if self.y is None else self.y[idx], self.num_classes,
                        source or self.source)

    def without_labels(self) -> "SiteData":
        return SiteData(self.x, None, None, self.source)

    def fingerprint(self) -> str:
        """Content hash (for caches keyed by data)."""
        h = hashlib.sha256(self.x.numpy().tobytes())
        if self.y is not None:
            h.update(self.y.numpy().tobytes())
        return h.hexdigest()[:16]


# -- validation ---------------------------------------------------------------------

def validate_arrays(x: np.ndarray, y: np.ndarray | None, source: str) -> SiteData:
    """Check and convert raw arrays to :class:`SiteData`; ``source`` names the file."""
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DataError(f"{source}: x has non-numeric dtype {x.dtype}; store numbers")
    if x.ndim < 2:
        raise DataError(f"{source}: x must be [N, D], [N, H, W] or [N, C, H, W], got shape {x.shape}")
    if x.shape[0] == 0:
        raise DataError(f"{source}: no examples (x is empty)")
    if x.ndim == 3:  # [N, H, W] -> one channel
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # NHWC -> NCHW
        x = np.transpose(x, (0, 3, 1, 2))
    elif x.ndim > 4:
        raise DataError(f"{source}: x has {x.ndim} dimensions; expected at most 4 ([N, C, H, W])")
    if np.issubdtype(x.dtype, np.integer) and x.dtype.itemsize == 1 and not np.issubdtype(x.dtype, np.signedinteger):
        x = x.astype(np.float32) / 255.0  # uint8 pixels
    else:
        x = x.astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        first = int(np.argwhere(bad.reshape(len(x), -1).any(1))[0, 0])
        raise DataError(f"{source}: x contains {int(bad.sum())} NaN/Inf values (first in example {first}); "
                        "clean or drop those examples")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise DataError(f"{source}: x values span [{lo:.4g}, {hi:.4g}]; expected [0, 1] "
                        "(scale the data, or store images as uint8)")
    labels, num_classes = None, None
    if y is not None:
        y = np.asarray(y)
        if y.shape != (x.shape[0],):
            raise DataError(f"{source}: y has shape {y.shape}; expected ({x.shape[0]},), one label per example")
        if not np.issubdtype(y.dtype, np.integer):
            if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
                y = y.astype(np.int64)
            else:
                raise DataError(f"{source}: labels must be integers 0..K-1, got dtype {y.dtype}")
        if y.min() < 0:
            raise DataError(f"{source}: labels must be >= 0, found {int(y.min())}")
        num_classes = int(y.max()) + 1
        labels = torch.from_numpy(y.astype(np.int64))
    return SiteData(torch.from_numpy(np.ascontiguousarray(x)), labels, num_classes, source)


# -- readers --------------------------------------------------------------------------

def read_digits(path: str | Path | None = None) -> SiteData:
    """scikit-learn's embedded 8x8 digits (1 797 images, values 0..16 -> [0, 1])."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return validate_arrays((d.images / 16.0).astype(np.float32), d.target, "sklearn digits")


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (LeCun's MNIST format), gzipped or raw."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read IDX file ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = raw[4 + 4 * ndim:]
    if len(body) != expected:
        raise DataError(f"{path}: IDX header says {dims} but the file holds {len(body)} bytes, not {expected}")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).exists():
            return folder / name
    return None


def read_mnist(path: str | Path) -> SiteData:
    """MNIST IDX: a folder holding ``*-images-idx3-ubyte[.gz]`` and ``*-labels-idx1-ubyte[.gz]``
    (test split preferred: it is the one available offline), or the images file itself."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: MNIST data not found (give the folder with the IDX files)")
    if path.is_dir():
        images = _find(path, "t10k-images-idx3-ubyte") or _find(path, "train-images-idx3-ubyte")
        if images is None:
            raise DataError(f"{path}: no t10k-/train-images-idx3-ubyte[.gz] file in this folder")
    else:
        images = path
    labels = Path(str(images).replace("images-idx3", "labels-idx1"))
    x = read_idx(images)
    y = read_idx(labels) if labels.exists() and labels != images else None
    return validate_arrays(x, y, str(images))


def read_npz(path: str | Path) -> SiteData:
    """``.npz`` with ``x`` (uint8 or float in [0, 1]) and optional integer ``y``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz.files:
                raise DataError(f"{path}: no array named 'x' (found: {', '.join(npz.files) or 'none'})")
            x = npz["x"]
            y = npz["y"] if "y" in npz.files else None
    except DataError:
        raise
    except Exception as err:  # zipfile/pickle/format errors
        raise DataError(f"{path}: cannot read as .npz ({err})") from None
    return validate_arrays(x, y, str(path))


READERS: dict[str, Callable[..., SiteData]] = {
    "digits": read_digits,
    "mnist": read_mnist,
    "npz": read_npz,
}


def load_data(fmt: str, path: str | Path | None = None) -> SiteData:
    """Read a dataset with the reader registered for ``fmt``."""
    try:
        reader = READERS[fmt]
    except KeyError:
        raise DataError(f"unknown data format {fmt!r}; supported: {', '.join(sorted(READERS))}") from None
    if fmt != "digits" and not path:
        raise DataError(f"data format {fmt!r} needs a path (data.path)")
    return reader(path) if path is not None else reader()
