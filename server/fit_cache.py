"""A disk cache of the server's generator fit under a release warm start.

Fitting the release's generator is the largest shared cost of the per-family MNIST sweep
(1 500 conv steps, about 15 minutes on 2 cores, docs/benchmarks.md), and it is the same
for every family given the same release: the fit sees only the combined release, the
generator's configuration and initial weights, and the seed. So the server keys the
fitted generator by a content hash of exactly those (:func:`fit_key`) and stores its
weights; a later run with the same key loads them instead of fitting, and pretrains the
family on the very same generator (the pretraining re-seeds its own draws), so a hit gives
bitwise the pretraining of a miss.

Only runs with seeded noise (``privacy.seeded_noise``) use it: with noise from the OS's
entropy every release differs, so no entry could ever be hit again. Entries live in
``$FEDGEN_CACHE/generator-fits/`` (default ``~/.cache/fedgen/generator-fits/``; the
evaluation extractors' cache root), one ``<key>.pt`` each, written atomically and read with
``torch.load(weights_only=True)``: tensors, strings and numbers only, nothing in a cache file
can run code. A file that is unreadable or does not fit the generator is ignored with one
warning line and the fit runs; a cache never stops a run.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedgen.evaluation.features import default_cache_dir
from fedgen.privacy.ledger import atomic_write
from fedgen.shared_models import layers as _layers
from fedgen.shared_models import warm_start as _warm_start

log = logging.getLogger(__name__)

#: bump when what a cached fit means changes in a way the hashed sources do not show
FIT_CACHE_VERSION = 1
FOLDER = "generator-fits"


def default_fit_cache_dir() -> Path:
    """``$FEDGEN_CACHE/generator-fits`` (default ``~/.cache/fedgen/generator-fits``)."""
    return default_cache_dir().parent / FOLDER


def _source_digest(*modules: object) -> str:
    """The fit's code version: a digest of the source files it runs."""
    h = hashlib.sha256()
    for module in modules:
        try:
            h.update(inspect.getsource(module).encode())  # type: ignore[arg-type]
        except (OSError, TypeError):  # no source (frozen install): fall back to the name
            h.update(getattr(module, "__name__", repr(module)).encode())
    return h.hexdigest()


def fit_key(head: nn.Module, release_noise_variance: float | None, seed: int) -> str:
    """What determines the fit, hashed: the code version (the head's module, the layers and
    the warm start, ``FIT_CACHE_VERSION``, torch's version, the device type), the head's
    scalar configuration, every parameter and buffer of the head (the combined release, the
    random frequencies, the generator's initial weights), the release's noise variance (it
    sets where the fit stops) and the fit's seed."""
    h = hashlib.sha256()
    h.update(f"v{FIT_CACHE_VERSION}|torch {torch.__version__}|{type(head).__qualname__}|".encode())
    h.update(_source_digest(sys.modules[type(head).__module__], _layers, _warm_start).encode())
    config = {k: v for k, v in sorted(vars(head).items())
              if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str, tuple, type(None)))}
    h.update(repr(config).encode())
    tensors = list(head.named_parameters()) + list(head.named_buffers())
    device = tensors[0][1].device.type if tensors else "cpu"
    h.update(f"|device {device}|seed {int(seed)}|".encode())
    variance = release_noise_variance
    h.update(("none" if variance is None else float(variance).hex()).encode())
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class GeneratorFitCache:
    """Fitted release generators on disk, by :func:`fit_key` (module docstring)."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else default_fit_cache_dir()
        self.hits = 0

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.pt"

    def fit(self, head: nn.Module, release_noise_variance: float | None, seed: int) -> dict[str, float]:
        """``head.server_update(release_noise_variance)``, or its cached result: the same
        generator weights and fit info. ``head.generator`` is the fitted module."""
        key = fit_key(head, release_noise_variance, seed)
        info = self.load(key, head.generator)  # type: ignore[arg-type]
        if info is not None:
            self.hits += 1
            log.info("warm start: the generator fit came from the cache (%s)", self.path(key))
            return info
        info = dict(head.server_update(release_noise_variance))  # type: ignore[operator]
        if info:  # an empty release fits nothing: nothing to keep
            self.store(key, head.generator, info)  # type: ignore[arg-type]
        return info

    def load(self, key: str, generator: nn.Module) -> dict[str, float] | None:
        """Load the entry into ``generator`` and return its fit info; ``None`` (and one
        warning line when a file was there) when it is missing, unreadable or does not fit."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            state, info = _checked(entry, key, generator)
        except Exception as err:  # a cache never stops a run
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            log.warning("fedgen: ignoring the cached generator fit %s (%s); fitting again", path, reason[:200])
            return None
        generator.load_state_dict(state)
        return info

    def store(self, key: str, generator: nn.Module, info: dict[str, float]) -> None:
        """Write the entry atomically; a folder that cannot be written costs a warning, not the run."""
        entry = {"key": key, "version": FIT_CACHE_VERSION,
                 "state": {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()},
                 "info": {k: v if isinstance(v, int) else float(v) for k, v in info.items()}}
        buffer = io.BytesIO()
        torch.save(entry, buffer)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path(key), lambda fh: fh.write(buffer.getvalue()))
        except OSError as err:
            log.warning("fedgen: could not cache the generator fit in %s (%s); set FEDGEN_CACHE to a writable folder",
                        self.folder, err.strerror or err)


def _checked(entry: Any, key: str, generator: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The entry's state and info, or ``ValueError`` naming what does not fit."""
    if not isinstance(entry, dict) or entry.get("key") != key:
        raise ValueError("its key does not match its name")
    state, info = entry.get("state"), entry.get("info")
    if not isinstance(state, dict) or not isinstance(info, dict):
        raise ValueError("it holds no generator state")
    expected = generator.state_dict()
    if set(state) != set(expected):
        raise ValueError("its tensors are not this generator's")
    for name, tensor in expected.items():
        got = state[name]
        if not isinstance(got, torch.Tensor) or got.shape != tensor.shape or got.dtype != tensor.dtype:
            raise ValueError(f"{name} has the wrong shape or type")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise ValueError(f"{name} is not finite")
    if not all(isinstance(k, str) and isinstance(v, (int, float)) and math.isfinite(v) for k, v in info.items()):
        raise ValueError("its fit info is not numbers")
    return {k: v.to(expected[k].device) for k, v in state.items()}, info
