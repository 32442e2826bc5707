"""How audit results describe themselves, and how they become JSON.

Every reported number carries its ``name``, ``direction`` (which way is more private) and
``units`` (synthcity's self-describing metrics are the model), so the report and any
later comparison can read a result without knowing which function produced it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import numpy as np
import torch

# Directions, stated from the privacy officer's side.
LOWER_IS_PRIVATE = "lower is more private"
HIGHER_IS_PRIVATE = "higher is more private"
HALF_IS_PRIVATE = "0.5 expected without leakage; higher indicates leakage"
INFORMATIONAL = "informational"


def described(name: str, value: Any, *, direction: str, units: str, **extra: Any) -> dict:
    """One self-describing result: ``{"name", "value", "direction", "units", ...}``."""
    return {"name": name, "value": value, "direction": direction, "units": units, **extra}


def fingerprint(x: np.ndarray | torch.Tensor) -> dict:
    """sha256 of an array's C-order bytes, with its shape and dtype (the bytes alone are
    ambiguous without them), so an audit names exactly the data it was run on."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    array = np.ascontiguousarray(x)
    return {"sha256": hashlib.sha256(array.tobytes()).hexdigest(),
            "shape": list(array.shape), "dtype": str(array.dtype)}


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy/torch values, tuples and dataclasses turned into JSON types.
    Non-finite floats become ``None`` (JSON has no NaN/Inf)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().numpy())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj
