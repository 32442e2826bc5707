"""Model registry: ``register_model`` / ``build_model`` / ``list_models``.

A registry is a dict and a decorator (the torchvision pattern): a new family is one file
in ``shared_models/`` with ``@register_model("name")`` on its class or builder, plus one
import line in ``shared_models/__init__.py``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

from .protocol import GenerativeModel

_MODELS: dict[str, Callable[..., GenerativeModel]] = {}

T = TypeVar("T", bound=Callable[..., GenerativeModel])


class UnknownModelError(KeyError):
    """Raised for a model name that is not registered; the message lists the options."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


class ModelConfigError(TypeError):
    """Raised when a model config has keys the family does not accept."""


def register_model(name: str) -> Callable[[T], T]:
    def decorator(builder: T) -> T:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    return sorted(_MODELS)


def get_model_builder(name: str) -> Callable[..., GenerativeModel]:
    try:
        return _MODELS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model family {name!r}; registered families: {', '.join(list_models())}"
        ) from None


def model_options(name: str) -> list[str]:
    """Names of the keyword options a family's builder accepts."""
    params = inspect.signature(get_model_builder(name)).parameters
    return [p for p in params if p not in ("self", "data_shape", "num_classes")]


def build_model(
    name: str, *, data_shape: tuple[int, ...], num_classes: int | None = None, **cfg: Any
) -> GenerativeModel:
    """Build the family ``name`` for data of ``data_shape`` (``(C, H, W)`` or ``(D,)``)."""
    builder = get_model_builder(name)
    allowed = set(model_options(name))
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ModelConfigError(
            f"model {name!r} does not accept option(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(sorted(allowed))}"
        )
    return builder(data_shape=tuple(data_shape), num_classes=num_classes, **cfg)
