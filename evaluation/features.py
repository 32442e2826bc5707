"""The domain feature extractor: a small network fit to the *reference* data only.

FID, KID and PRDC need an embedding. The usual one (Inception-v3 trained on ImageNet) is
neither available offline nor meaningful for 8x8 digits or tabular rows, so fedgen
trains its own: the small classifier of :mod:`evaluation.classifier`, fit to the held-out
real (reference) data. Its penultimate layer gives the features, its softmax the class
probabilities used by the Inception-Score analogue and the mode-collapse histogram.

Numbers computed in this space are **domain-feature** metrics (``fid_domain``,
``kid_domain``, ...). They rank models trained on the same data against the same
extractor; they are *not* comparable with published Inception FIDs, nor across
extractors (different reference set, seed or architecture => different numbers).

Unlabelled reference data (``reference_y is None``): there is nothing to classify, so
the extractor is the *same* architecture left at its seeded random initialisation
("random embeddings", Naeem et al. 2020, §5: randomly initialised networks give usable
embeddings for fidelity/diversity metrics outside ImageNet), and the "classes" used by
the collapse diagnostics are ``num_clusters`` k-means clusters of the reference
features (nearest-centroid assignment); there are no probabilities, so no
Inception-Score analogue and no label agreement.

The fitted extractor is cached on disk under a key hashing the reference data, the
labels, the architecture/schedule and the seed; a second construction with the same
inputs loads it (``loaded_from_cache``) instead of retraining. Files are written to a
temporary name and renamed, so concurrent processes never read half a file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from fedgen.privacy.ledger import atomic_write

from .classifier import ClassifierConfig, SmallClassifier, accuracy, build_classifier, fit_classifier, predict

log = logging.getLogger(__name__)

#: bump when the architecture or the training code changes meaning
CACHE_VERSION = 1

ExtractorMode = Literal["classifier", "random"]


def default_cache_dir() -> Path:
    """``$FEDGEN_CACHE`` if set, else ``~/.cache/fedgen``; extractors live in ``features/``."""
    root = os.environ.get("FEDGEN_CACHE") or Path.home() / ".cache" / "fedgen"
    return Path(root).expanduser() / "features"


def content_hash(*arrays: Tensor | np.ndarray | None, extra: str = "") -> str:
    """BLAKE2b digest of the arrays' dtype, shape and bytes (``None`` hashes as absent)."""
    h = hashlib.blake2b(digest_size=20)
    for a in arrays:
        if a is None:
            h.update(b"<none>")
            continue
        arr = a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    h.update(extra.encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Embedding:
    """What the extractor says about a set of examples.

    Attributes:
        features: penultimate-layer features ``[n, F]`` (float64).
        predictions: class (or k-means cluster) of each example ``[n]`` (int64).
        probabilities: classifier softmax ``[n, K]``; ``None`` for a random extractor.
    """

    features: np.ndarray
    predictions: np.ndarray
    probabilities: np.ndarray | None


class DomainFeatureExtractor:
    """Domain-feature embedding for FID / KID / PRDC / collapse metrics.

    Build it with :meth:`fit` (which uses the disk cache); call :meth:`embed` on any
    tensor ``[n, *data_shape]`` in data range. Embeddings of recently seen tensors are
    memoised by content hash, so the reference set is embedded once per process.
    """

    def __init__(
        self,
        network: SmallClassifier,
        *,
        config: ClassifierConfig,
        mode: ExtractorMode,
        cache_key: str,
        centroids: Tensor | None = None,
        train_accuracy: float | None = None,
        loaded_from_cache: bool = False,
        cache_path: Path | None = None,
    ) -> None:
        self.network = network.eval()
        self.config = config
        self.mode: ExtractorMode = mode
        self.cache_key = cache_key
        self.centroids = centroids
        self.train_accuracy = train_accuracy
        self.loaded_from_cache = loaded_from_cache
        self.cache_path = cache_path
        self._memo: OrderedDict[str, Embedding] = OrderedDict()

    # -- construction ------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        reference_x: Tensor,
        reference_y: Tensor | None = None,
        *,
        num_classes: int | None = None,
        seed: int = 0,
        config: ClassifierConfig | None = None,
        num_clusters: int = 10,
        cache_dir: str | Path | None = None,
        use_cache: bool = True,
    ) -> "DomainFeatureExtractor":
        """Train (or load from cache) the extractor for ``reference_x`` ``[n, *data_shape]``.

        Args:
            reference_x: held-out real data in data range; never training data of the
                generator.
            reference_y: integer labels ``[n]``; ``None`` gives the random-embedding
                extractor with k-means pseudo-classes (see the module docstring).
            num_classes: number of classes; default ``max(reference_y) + 1``.
            seed: initialisation / minibatch-order / k-means seed.
            config: classifier size and schedule (:class:`ClassifierConfig`).
            num_clusters: k-means clusters for unlabelled data.
            cache_dir: where fitted extractors are stored; default :func:`default_cache_dir`.
            use_cache: ``False`` neither reads nor writes the cache.
        """
        config = config or ClassifierConfig()
        x = torch.as_tensor(reference_x).detach().float().cpu()
        if x.dim() not in (2, 4):
            raise ValueError(f"reference_x must be [n, C, H, W] or [n, D], got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("reference_x contains NaN or Inf")
        y = None if reference_y is None else torch.as_tensor(reference_y).detach().long().cpu()
        if y is not None and y.shape != (x.shape[0],):
            raise ValueError(f"reference_y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        mode: ExtractorMode = "random" if y is None else "classifier"
        k = num_clusters if y is None else int(num_classes or int(y.max()) + 1)
        meta = json.dumps(
            {"v": CACHE_VERSION, "mode": mode, "k": k, "seed": seed, "config": dataclasses.asdict(config)},
            sort_keys=True,
        )
        key = content_hash(x, y, extra=meta)
        path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = path / f"domain-extractor-{key}.pt"
        if use_cache and path.exists():
            try:
                return cls._load(path, key)
            except Exception as err:  # a corrupt or foreign file: retrain and overwrite
                log.warning("ignoring unreadable feature-extractor cache %s (%s)", path, err)

        if y is None:
            network = build_classifier(tuple(x.shape[1:]), k, config, seed=seed)
            network.set_standardisation(x)
            features = predict(network.eval(), x)[0].double().numpy()
            centroids = _kmeans_centroids(features, k, seed=seed)
            extractor = cls(network, config=config, mode=mode, cache_key=key, centroids=centroids)
        else:
            network = fit_classifier(x, y, k, config=config, seed=seed)
            extractor = cls(
                network, config=config, mode=mode, cache_key=key, train_accuracy=accuracy(network, x, y)
            )
        if use_cache:
            extractor._save(path)
        return extractor

    def _save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "key": self.cache_key,
            "mode": self.mode,
            "data_shape": list(self.network.data_shape),
            "num_classes": self.network.num_classes,
            "config": dataclasses.asdict(self.config),
            "state_dict": self.network.state_dict(),
            "centroids": self.centroids,
            "train_accuracy": self.train_accuracy,
        }
        atomic_write(path, lambda fh: torch.save(payload, fh))
        self.cache_path = path

    @classmethod
    def _load(cls, path: Path, key: str) -> "DomainFeatureExtractor":
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload["key"] != key:
            raise ValueError("cache key mismatch")
        config = ClassifierConfig(**{**payload["config"], "channels": tuple(payload["config"]["channels"])})
        network = SmallClassifier(tuple(payload["data_shape"]), payload["num_classes"], config)
        network.load_state_dict(payload["state_dict"])
        return cls(
            network,
            config=config,
            mode=payload["mode"],
            cache_key=key,
            centroids=payload["centroids"],
            train_accuracy=payload["train_accuracy"],
            loaded_from_cache=True,
            cache_path=path,
        )

    # -- properties ----------------------------------------------------------------------
    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.network.data_shape

    @property
    def num_classes(self) -> int:
        """Classes of the classifier, or k-means clusters of a random extractor."""
        return self.network.num_classes

    @property
    def feature_dim(self) -> int:
        return self.network.head.in_features

    @property
    def has_classifier(self) -> bool:
        """Whether predictions are real classes (and probabilities exist)."""
        return self.mode == "classifier"

    # -- embedding -------------------------------------------------------------------
    def embed(self, x: Tensor) -> Embedding:
        """Features, predicted classes and (classifier only) probabilities of ``x``."""
        x = torch.as_tensor(x).detach().float().cpu()
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(
                f"examples of shape {tuple(x.shape[1:])} given to an extractor fit to {self.data_shape}"
            )
        if not torch.isfinite(x).all():
            raise ValueError("examples contain NaN or Inf: nothing meaningful can be embedded")
        key = content_hash(x)
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        feats, logits = predict(self.network, x)
        features = feats.double().numpy()
        if self.mode == "classifier":
            probs = torch.softmax(logits.double(), dim=1).numpy()
            emb = Embedding(features, probs.argmax(axis=1), probs)
        else:
            assert self.centroids is not None
            dist = torch.cdist(torch.from_numpy(features), self.centroids.double())
            emb = Embedding(features, dist.argmin(dim=1).numpy(), None)
        for array in (emb.features, emb.predictions, emb.probabilities):
            if array is not None:
                array.flags.writeable = False  # memoised and shared: never modified in place
        self._memo[key] = emb
        while len(self._memo) > 4:
            self._memo.popitem(last=False)
        return emb

    def features(self, x: Tensor) -> np.ndarray:
        """Penultimate-layer domain features ``[n, F]`` of ``x``."""
        return self.embed(x).features

    def __repr__(self) -> str:
        return (
            f"DomainFeatureExtractor(mode={self.mode!r}, data_shape={self.data_shape}, "
            f"num_classes={self.num_classes}, key={self.cache_key[:10]}, "
            f"loaded_from_cache={self.loaded_from_cache})"
        )


def _kmeans_centroids(features: np.ndarray, k: int, *, seed: int) -> Tensor:
    from sklearn.cluster import KMeans

    if features.shape[0] < k:
        raise ValueError(f"{features.shape[0]} reference examples cannot form {k} k-means clusters")
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(features)
    return torch.from_numpy(km.cluster_centers_).float()
