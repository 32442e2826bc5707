"""The harness's part of a public-data warm start: read the declared-public set, fit it to
the model's data shape, check it, and hand it to the run directory (``inputs/public.npz``).

The server never reads a path of its own choosing: it pretrains on exactly the arrays
written here (server/warm_start.py), and nothing from the sites' data goes in. A set that
does not fit the model stops ``fedgen validate`` / ``fedgen simulate`` with one line
naming ``warm_start.public``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fedgen.client.data import read_digits, load_data
from fedgen.contract.scenario import PUBLIC_DIGITS_28, Scenario

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
    if num_classes is not None:
        if y is None:
            raise ScenarioError(f"{KEY}: the model is class-conditional but the public set has no labels; "
                                "give a labelled set or set data.conditional: false")
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise ScenarioError(f"{KEY}: public labels span {int(y.min())}..{int(y.max())}, "
                                f"the model has {num_classes} classes")
        arrays["y"] = y.astype(np.int64)
    return arrays
