"""The harness's part of a public-data warm start: read the declared-public set, fit it to
the model's data shape, check it, and hand it to the run directory (``inputs/public.npz``).

The server never reads a path of its own choosing: it pretrains on exactly the arrays
written here (server/warm_start.py), and nothing from the sites' data goes in. A set that
does not fit the model stops ``fedgen validate`` / ``fedgen simulate`` with one line
naming ``warm_start.public``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedgen.client.data import read_digits, load_data
from fedgen.contract.scenario import EMBEDDED_PUBLIC_SETS, PUBLIC_DIGITS_28, PUBLIC_DIGITS_FONTS_28, Scenario

from .errors import ScenarioError

KEY = "warm_start.public"


def _resize(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Images ``[N, H, W]`` or ``[N, C, H, W]`` resized (bilinear, antialiased) to ``shape``
    ``(C, H, W)``; grey images are repeated over channels. Values stay in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if t.dim() == 3:
        t = t[:, None]
    c, h, w = shape
    t = F.interpolate(t, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    if t.shape[1] != c:
        if t.shape[1] != 1:
            raise ScenarioError(f"{KEY}: the public images have {t.shape[1]} channels, the model's data {c}")
        t = t.expand(-1, c, -1, -1)
    return t.clamp(0.0, 1.0).contiguous().numpy()


def digits_28(shape: tuple[int, ...] = (1, 28, 28)) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1 797 digits resized from 8 x 8 to ``shape`` (default 28 x 28)."""
    d = read_digits()
    return _resize(d.x.numpy(), shape), d.y.numpy()


# Fonts matplotlib ships whose digits are not symbols (its size variants, non-Unicode and
# math-symbol fonts draw other glyphs); the rest of its ttf folder, sorted, is used.
_NOT_DIGIT_FONTS = ("Siz", "NonUni", "cmex", "cmsy", "LastResort", "Display")
INK = 0.1  # a pixel above this is part of a digit's stroke (cropping to the ink)


def printed_digits(canvas: int = 64) -> tuple[list[np.ndarray], np.ndarray]:
    """The digits 0-9 printed in every text font matplotlib ships (DejaVu, STIX, Computer
    Modern: 22 fonts in matplotlib 3.8-3.10), white on black, cropped to their ink: a list
    of ``[h, w]`` arrays in [0, 1] and their labels. Public by construction (no person's
    data), embedded (no download)."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    glyphs, labels = [], []
    for path in sorted(folder.glob("*.ttf")):
        if any(tag in path.name for tag in _NOT_DIGIT_FONTS):
            continue
        font = ImageFont.truetype(str(path), canvas * 3 // 4)
        for digit in range(10):
            image = Image.new("L", (canvas, canvas), 0)
            ImageDraw.Draw(image).text((canvas // 2, canvas // 2), str(digit), fill=255, font=font, anchor="mm")
            ink = np.asarray(image, dtype=np.float32) / 255.0
            if ink.max() > INK:
                glyphs.append(_crop_to_ink(ink))
                labels.append(digit)
    return glyphs, np.asarray(labels, dtype=np.int64)


def mnist_geometry(glyph: np.ndarray, box: int = 20, side: int = 28) -> np.ndarray:
    """``glyph`` (an ``[h, w]`` image cropped to its ink) as MNIST drew its digits (LeCun et
    al. 1998): scaled, keeping its aspect, to fit a ``box`` x ``box`` square, then placed in a
    ``side`` x ``side`` frame with its centre of mass at the centre."""
    h, w = glyph.shape
    s = box / max(h, w)
    t = torch.from_numpy(np.ascontiguousarray(glyph, dtype=np.float32))[None, None]
    t = F.interpolate(t, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear", antialias=True,
                      align_corners=False)[0, 0].clamp(0.0, 1.0).numpy()
    mass = t.sum()
    rows, cols = np.mgrid[:t.shape[0], :t.shape[1]]
    top = int(round(side / 2 - (rows * t).sum() / mass)) if mass > 0 else (side - t.shape[0]) // 2
    left = int(round(side / 2 - (cols * t).sum() / mass)) if mass > 0 else (side - t.shape[1]) // 2
    top, left = min(max(top, 0), side - t.shape[0]), min(max(left, 0), side - t.shape[1])
    out = np.zeros((side, side), dtype=np.float32)
    out[top:top + t.shape[0], left:left + t.shape[1]] = t
    return out


def digits_fonts_28() -> tuple[np.ndarray, np.ndarray]:
    """``digits-fonts-28``: scikit-learn's 1 797 handwritten digits and the printed digits of
    :func:`printed_digits`, each in MNIST's geometry (:func:`mnist_geometry`): ``[N, 1, 28,
    28]`` in [0, 1] and the labels."""
    d = read_digits()
    handwritten = [mnist_geometry(_crop_to_ink(img)) for img in _resize(d.x.numpy(), (1, 64, 64))[:, 0]]
    glyphs, printed_labels = printed_digits()
    images = handwritten + [mnist_geometry(g) for g in glyphs]
    return np.stack(images)[:, None], np.concatenate([d.y.numpy().astype(np.int64), printed_labels])


def _crop_to_ink(image: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(image > INK)
    return image[rows.min():rows.max() + 1, cols.min():cols.max() + 1] if len(rows) else image


def public_set(scenario: Scenario, shape: tuple[int, ...], num_classes: int | None) -> dict[str, np.ndarray] | None:
    """The arrays of ``inputs/public.npz`` for a public warm start (``x`` in the model's
    data shape, ``y`` for a conditional model), or ``None`` when the scenario has none.
    Raises a one-line :class:`ScenarioError` naming the key when the set does not fit."""
    ws = scenario.warm_start
    if ws is None or ws.public is None:
        return None
    cfg = ws.public
    shape = tuple(int(d) for d in shape)
    if cfg.format == PUBLIC_DIGITS_28:
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise ScenarioError(f"{KEY}: {PUBLIC_DIGITS_28} holds grey images, but the model's data have shape "
                                f"{list(shape)}; declare a public set of that shape instead")
        x, y = digits_28(shape)
        name = f"{PUBLIC_DIGITS_28} (scikit-learn digits resized to {shape[1]}x{shape[2]})"
    elif cfg.format == PUBLIC_DIGITS_FONTS_28:
        if shape != (1, 28, 28):
            raise ScenarioError(f"{KEY}: {PUBLIC_DIGITS_FONTS_28} holds grey 28 x 28 images, but the model's data "
                                f"have shape {list(shape)}; use {PUBLIC_DIGITS_28} (resized to any shape) instead")
        x, y = digits_fonts_28()
        name = f"{PUBLIC_DIGITS_FONTS_28} ({EMBEDDED_PUBLIC_SETS[PUBLIC_DIGITS_FONTS_28]}; {len(x)} images)"
    else:
        try:
            data = load_data(cfg.format, cfg.path, cfg.options)
        except Exception as err:  # the reader's own one-line error, under the key that named the file
            raise ScenarioError(f"{KEY}: {str(err).splitlines()[0]}") from None
        if data.shape != shape:
            raise ScenarioError(f"{KEY}: {cfg.path or cfg.format} holds examples of shape {list(data.shape)}, "
                                f"but the model's data have shape {list(shape)}")
        x, y = data.x.numpy(), None if data.y is None else data.y.numpy()
        name = f"{cfg.format} {cfg.path}" if cfg.path else cfg.format
    arrays: dict[str, np.ndarray] = {"x": x.astype(np.float32), "name": np.str_(name)}
    # perceptual features (mmd's, or a release generator's) train their network as a classifier
    # of the public set (shared_models/perceptual.py): labels, within its >= 10 outputs
    perceptual = scenario.model.perceptual or ws.release_perceptual
    if num_classes is not None or perceptual:
        if y is None:
            raise ScenarioError(f"{KEY}: the model is class-conditional but the public set has no labels; "
                                "give a labelled set or set data.conditional: false" if num_classes is not None else
                                f"{KEY}: the perceptual features are trained as a classifier of the public set, "
                                "which has no labels; give a labelled set")
        classes = num_classes if num_classes is not None else 10
        if int(y.min()) < 0 or int(y.max()) >= classes:
            raise ScenarioError(f"{KEY}: public labels span {int(y.min())}..{int(y.max())}, "
                                f"the {'model' if num_classes is not None else 'perceptual network'} has {classes} "
                                "classes")
        arrays["y"] = y.astype(np.int64)
    return arrays
