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
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from fedgen.contract.data_formats import CsvOptions, DataOptions, ImageOptions, TableSchema, data_format

from .errors import DataError


@dataclass(frozen=True)
class SiteData:
    """Examples held at one site (or a whole dataset before partitioning)."""

    x: Tensor  # float32, [N, *shape], values in [0, 1]
    y: Tensor | None  # int64 [N] or None
    num_classes: int | None
    source: str
    columns: tuple[str, ...] | None = None  # tabular data: the feature columns' names, in order

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def subset(self, indices: np.ndarray | Tensor, source: str | None = None) -> "SiteData":
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return SiteData(self.x[idx], None if self.y is None else self.y[idx], self.num_classes,
                        source or self.source, self.columns)

    def without_labels(self) -> "SiteData":
        return SiteData(self.x, None, None, self.source, self.columns)

    def fingerprint(self) -> str:
        """Content hash (for caches keyed by data)."""
        h = hashlib.sha256(self.x.numpy().tobytes())
        if self.y is not None:
            h.update(self.y.numpy().tobytes())
        return h.hexdigest()[:16]


# -- validation ---------------------------------------------------------------------

def validate_arrays(x: np.ndarray, y: np.ndarray | None, source: str, *, scaling_advice: str | None = None,
                    columns: tuple[str, ...] | None = None) -> SiteData:
    """Check and convert raw arrays to :class:`SiteData`; ``source`` names the file.
    ``scaling_advice`` replaces the default fix named when values leave [0, 1] (a reader
    knows its own: a CSV's is its bounds options)."""
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
        if scaling_advice is None:
            scaling_advice = ("scale the data, or store images as uint8" if x.ndim == 4 else
                              "scale each feature into [0, 1] with bounds fixed in advance")
        raise DataError(f"{source}: x values span [{lo:.4g}, {hi:.4g}]; expected [0, 1] ({scaling_advice})")
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
    return SiteData(torch.from_numpy(np.ascontiguousarray(x)), labels, num_classes, source, columns)


# -- readers --------------------------------------------------------------------------

def read_digits(path: str | Path | None = None) -> SiteData:
    """scikit-learn's embedded 8x8 digits (1 797 images, values 0..16 -> [0, 1])."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return validate_arrays((d.images / 16.0).astype(np.float32), d.target, "sklearn digits")


def breast_cancer_table() -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray, np.ndarray]:
    """scikit-learn's embedded Wisconsin breast-cancer table: (x in original units, labels
    0 = malignant / 1 = benign, the 30 column names, declared lower and upper bounds). The
    bounds are public: the published table's range per column, widened outward to two
    significant digits, so a site holding part of it needs no statistic of its own rows."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    names = [n.replace(" ", "_") for n in d.feature_names]
    lo, hi = d.data.min(0), d.data.max(0)
    return d.data, d.target, names, _round_out(lo, np.floor), _round_out(hi, np.ceil)


def _round_out(v: np.ndarray, rounding) -> np.ndarray:
    scale = 10.0 ** (np.floor(np.log10(np.maximum(np.abs(v), 1e-12))) - 1)
    out = rounding(v / scale) * scale
    return np.where(v == 0, 0.0, np.round(out, 12))


def read_breast_cancer(path: str | Path | None = None) -> SiteData:
    """The breast-cancer table (569 rows, 30 numeric columns, 2 classes), min-max scaled with
    its declared bounds (:func:`breast_cancer_table`) into [0, 1]."""
    x, y, names, lo, hi = breast_cancer_table()
    return validate_arrays(((x - lo) / (hi - lo)).astype(np.float32), y, "sklearn breast cancer",
                           columns=tuple(names))


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


def _per_feature(value: object, d: int, name: str, source: str) -> np.ndarray:
    """A scaling statistic from config: one number for every column, or one per column
    (a list, or a comma-separated string as ``--node-config`` passes it)."""
    if isinstance(value, str):
        value = [v for v in value.replace(";", ",").split(",") if v.strip()]
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{source}: {name} must be a number or a list of {d} numbers, got {value!r}") from None
    if arr.size == 1:
        arr = np.full(d, float(arr[0]))
    if arr.size != d:
        raise DataError(f"{source}: {name} has {arr.size} values; the file has {d} feature columns")
    return arr


def read_csv(path: str | Path, options: CsvOptions = CsvOptions()) -> SiteData:
    """Tabular data: a CSV with a header row of column names and numeric cells.

    ``options.label_column`` (a header name or a 0-based index) holds integer class labels;
    every other column is a feature. Features must end up in [0, 1]: either they already
    are, or they are min-max scaled with statistics **fixed by configuration** --
    ``feature_min`` / ``feature_max`` (a number, or one per column) or a JSON
    ``feature_stats`` file with ``"min"`` and ``"max"`` -- never computed from the private
    file itself (statistics of private data that leave the site, or shape the released
    model, are outside the DP-SGD guarantee; docs/deploy.md). ``feature_clip`` clips scaled
    values into [0, 1] (data-independent, so free under DP) instead of rejecting the file.
    """
    import csv
    import json

    path = Path(path)
    label_column, feature_min, feature_max = options.label_column, options.feature_min, options.feature_max
    if not path.is_file():
        raise DataError(f"{path}: CSV file not found")
    if path.stat().st_size > MAX_CSV_BYTES:
        raise DataError(f"{path}: {path.stat().st_size / 2**20:.0f} MiB is over the CSV reader's "
                        f"{MAX_CSV_BYTES // 2**20} MiB limit; store a table that large as .npz (x, optional y)")
    try:
        with open(path, newline="") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read as CSV ({err})") from None
    if len(rows) < 2:
        raise DataError(f"{path}: needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    label_idx = None
    if label_column is not None and str(label_column) != "":
        if str(label_column) in header:
            label_idx = header.index(str(label_column))
        elif str(label_column).lstrip("-").isdigit() and 0 <= int(label_column) < len(header):
            label_idx = int(label_column)
        else:
            raise DataError(f"{path}: label column {label_column!r} not in the header ({', '.join(header)})")
    values = np.empty((len(rows) - 1, len(header)), dtype=np.float64)
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path}: line {i} has {len(row)} cells, the header has {len(header)}")
        for j, cell in enumerate(row):
            try:
                values[i - 2, j] = float(cell)
            except ValueError:
                raise DataError(f"{path}: line {i}, column {header[j]!r}: {cell!r} is not a number "
                                "(only numeric columns are supported; encode categories as numbers)") from None
    features = [j for j in range(len(header)) if j != label_idx]
    if not features:
        raise DataError(f"{path}: no feature columns besides the label column")
    x = values[:, features]
    y = values[:, label_idx] if label_idx is not None else None
    source = str(path)
    if options.feature_stats is not None:
        try:
            stats = json.loads(Path(options.feature_stats).read_text())
            feature_min, feature_max = stats["min"], stats["max"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"{options.feature_stats}: scaling statistics must be JSON with 'min' and 'max' ({err})") from None
    if (feature_min is None) != (feature_max is None):
        raise DataError(f"{source}: give both feature-min and feature-max (or a stats file), not one")
    if feature_min is not None:
        lo = _per_feature(feature_min, x.shape[1], "feature-min", source)
        hi = _per_feature(feature_max, x.shape[1], "feature-max", source)
        if np.any(hi <= lo):
            raise DataError(f"{source}: feature-max must exceed feature-min for every column")
        x = (x - lo) / (hi - lo)
    if options.feature_clip:
        x = np.clip(x, 0.0, 1.0)
    advice = ("a value lies outside its column's feature-min/feature-max: widen the bounds, or set "
              "feature-clip=true" if feature_min is not None else
              "give each column's bounds with feature-min and feature-max (or feature-stats)")
    return validate_arrays(x.astype(np.float32), y, source, scaling_advice=advice,
                           columns=tuple(header[j] for j in features))


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


MAX_CSV_BYTES = 256 * 2**20  # the CSV reader holds the rows as Python lists: ~10x the file in memory
MAX_IMAGE_PIXELS = 4096 * 4096  # a larger header is refused before any pixel is decoded


def _open_image(f: Path):
    """``Image.open`` that refuses a header larger than ``MAX_IMAGE_PIXELS`` (a decompression
    bomb: a few KiB of file that claims gigabytes of pixels) before decoding, one-line errors."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(f)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise DataError(f"{f}: cannot read image ({err})") from None
    if im.width * im.height > MAX_IMAGE_PIXELS:
        im.close()
        raise DataError(f"{f}: the image claims {im.width}x{im.height} pixels, over the limit of "
                        f"{MAX_IMAGE_PIXELS} (4096x4096); resize the images first")
    return im


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)


def read_image_folder(path: str | Path, options: ImageOptions = ImageOptions()) -> SiteData:
    """A folder of PNG/JPEG images, all of one size: either the images themselves
    (unlabelled) or one sub-folder per class.

    Class labels: sub-folders named by integers use that integer (``0/``, ``1/``, ...);
    otherwise ``options.image_classes`` (a list, or comma-separated names) fixes the order,
    else the sorted folder names. Every site must use the same class names, so that a label
    means the same class everywhere -- prefer integer folder names or explicit
    ``image_classes``. ``options.image_mode`` is ``"L"`` (grayscale) or ``"RGB"``; by
    default grayscale when every image is, else RGB.
    """
    from PIL import UnidentifiedImageError

    root = Path(path)
    classes, mode = options.image_classes, options.image_mode
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    top = _image_files(root)
    if top and subdirs:
        raise DataError(f"{root}: holds both images and sub-folders; use only class sub-folders, or only images")
    files: list[tuple[Path, int | None]] = [(f, None) for f in top]
    if subdirs:
        names = [d.name for d in subdirs]
        if isinstance(classes, str):
            classes = [c.strip() for c in classes.split(",") if c.strip()]
        if classes:
            unknown = sorted(set(names) - set(classes))
            if unknown:
                raise DataError(f"{root}: class folder(s) {', '.join(unknown)} not in the configured classes "
                                f"({', '.join(classes)})")
            label_of = {c: i for i, c in enumerate(classes)}
        elif all(n.isdigit() for n in names):
            label_of = {n: int(n) for n in names}
        else:
            label_of = {n: i for i, n in enumerate(names)}
        for d in subdirs:
            files += [(f, label_of[d.name]) for f in _image_files(d)]
    if not files:
        raise DataError(f"{root}: no .png/.jpg/.jpeg images found")
    if mode is None:
        modes = set()
        for f, _ in files:
            with _open_image(f) as im:
                modes.add(im.mode)
        mode = "L" if modes <= {"1", "L", "I", "I;16", "F", "LA"} else "RGB"
    if mode not in ("L", "RGB"):
        raise DataError(f"{root}: image mode must be 'L' (grayscale) or 'RGB', got {mode!r}")
    arrays, size = [], None
    for f, _ in files:
        try:
            with _open_image(f) as im:
                if im.mode in ("I", "I;16", "F"):  # 16-bit / float grayscale -> 8 bit
                    im = im.point(lambda v: v / 256).convert("L") if im.mode != "F" else im.convert("L")
                arr = np.asarray(im.convert(mode), dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as err:
            raise DataError(f"{f}: cannot read image ({err})") from None
        if size is None:
            size = arr.shape[:2]
        elif arr.shape[:2] != size:
            raise DataError(f"{f}: image is {arr.shape[1]}x{arr.shape[0]} (WxH), the first image "
                            f"{files[0][0].name} is {size[1]}x{size[0]}; all images must share a size")
        arrays.append(arr)
    x = np.stack(arrays)
    x = x[:, None] if x.ndim == 3 else np.transpose(x, (0, 3, 1, 2))  # -> [N, C, H, W] uint8
    y = None if subdirs == [] else np.asarray([label for _, label in files], dtype=np.int64)
    return validate_arrays(np.ascontiguousarray(x), y, str(root))


Reader = Callable[[Any, DataOptions], SiteData]  # (path, the format's validated options) -> SiteData


def _without_options(read: Callable[[Any], SiteData]) -> Reader:
    return lambda path, options: read(path)  # the format declares no options

#: the reader of each registered format (contract/data_formats.py declares the formats and
#: their options; tests/test_data_formats.py checks the two name the same formats)
READERS: dict[str, Reader] = {
    "digits": _without_options(read_digits),
    "breast-cancer": _without_options(read_breast_cancer),
    "mnist": _without_options(read_mnist),
    "npz": _without_options(read_npz),
    "csv": read_csv,
    "images": read_image_folder,
}


def load_data(fmt: str, path: str | Path | None = None, options: Mapping[str, Any] | None = None) -> SiteData:
    """Read a dataset with the reader registered for ``fmt``; ``options`` are that format's
    options (contract/data_formats.py), validated here: snake_case as a scenario spells
    them or kebab-case as ``--node-config`` does."""
    try:
        spec = data_format(fmt)
        parsed = spec.parse(options)
    except ValueError as err:
        raise DataError(str(err)) from None
    if spec.needs_path and not path:
        raise DataError(f"data format {fmt!r} needs a path (data.path)")
    return READERS[fmt](path, parsed)


def declared_table(fmt: str, options: Mapping[str, Any] | None, data: SiteData) -> TableSchema | None:
    """The table schema (column names, label column, declared bounds per column) of tabular
    ``data`` read as ``fmt`` with ``options``: what ``inputs/site_data.json`` records so
    ``fedgen sample --out rows.csv`` writes the original columns in their original units.
    ``None`` for data that are not rows of named columns."""
    if data.columns is None or len(data.shape) != 1:
        return None
    if fmt == "breast-cancer":
        _, _, names, lo, hi = breast_cancer_table()
        return TableSchema(columns=names, label_column="target" if data.y is not None else None,
                           feature_min=lo.tolist(), feature_max=hi.tolist())
    opts = data_format(fmt).parse(options)
    d = len(data.columns)
    lo_v, hi_v = getattr(opts, "feature_min", None), getattr(opts, "feature_max", None)
    if getattr(opts, "feature_stats", None):
        import json

        stats = json.loads(Path(opts.feature_stats).read_text())
        lo_v, hi_v = stats["min"], stats["max"]
    lo = _per_feature(0.0 if lo_v is None else lo_v, d, "feature-min", data.source)
    hi = _per_feature(1.0 if hi_v is None else hi_v, d, "feature-max", data.source)
    label = getattr(opts, "label_column", None)
    label_name = None if label is None or data.y is None else str(label)
    return TableSchema(columns=list(data.columns), label_column=label_name,
                       feature_min=lo.tolist(), feature_max=hi.tolist())
