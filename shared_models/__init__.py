"""Generative model families behind one protocol (pure PyTorch: no Flower, no Opacus)."""

from .protocol import Batch, DPSGDTrainable, GenerativeModel, Releasing, TrainingStep
from .registry import (
    ModelConfigError,
    UnknownModelError,
    build_model,
    list_models,
    model_options,
    register_model,
)

# One import line per family registers it.
from . import vae  # noqa: F401,E402
from . import gan  # noqa: F401,E402
from . import flow  # noqa: F401,E402
from . import diffusion  # noqa: F401,E402
from . import mmd  # noqa: F401,E402

__all__ = [
    "Batch",
    "DPSGDTrainable",
    "GenerativeModel",
    "ModelConfigError",
    "Releasing",
    "TrainingStep",
    "UnknownModelError",
    "build_model",
    "list_models",
    "model_options",
    "register_model",
]
