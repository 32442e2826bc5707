"""Exact k-nearest-neighbour search in Euclidean space, chunked so memory stays bounded.

Every audit in this package (DCR, near-copies, GAN-Leaks) needs, for each query row, the
distance to its nearest rows in a reference set. ``torch.cdist`` computes the full
distance block of a chunk of queries with one matrix product (fast, float32), then the
``k + margin`` best candidates are re-scored exactly in float64 from the raw coordinates:
the matrix-product form ``|a|^2 + |b|^2 - 2ab`` loses precision for near-identical
vectors (an exact copy would otherwise read as ~1e-3 instead of 0).
"""

from __future__ import annotations

import numpy as np
import torch

# Extra float32 candidates re-scored in float64, so float32 rounding cannot reorder the k best.
_REFINE_MARGIN = 4


def as_matrix(x: np.ndarray | torch.Tensor, *, name: str) -> np.ndarray:
    """``x`` as a finite float64 ``(n, d)`` matrix (one flattened record per row)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    array = np.asarray(x, dtype=np.float64)
    if array.ndim == 0 or len(array) == 0:
        raise ValueError(f"{name}: expected a non-empty array of records, got shape {array.shape}")
    array = array.reshape(len(array), -1)
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: contains NaN or Inf; clean or drop those records before auditing")
    return array


def nearest_neighbours(
    queries: np.ndarray,
    references: np.ndarray,
    *,
    k: int = 1,
    chunk_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest reference rows of every query row, by Euclidean (L2) distance.

    Returns ``(distances, indices)``, each ``(n_queries, k)``, sorted ascending per row;
    distances are in the units of the input coordinates.
    """
    q = as_matrix(queries, name="queries")
    r = as_matrix(references, name="references")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} features but references have {r.shape[1]}")
    if not 1 <= k <= len(r):
        raise ValueError(f"k={k} must be between 1 and the number of references ({len(r)})")
    k_search = min(k + _REFINE_MARGIN, len(r))
    r64 = torch.from_numpy(r)
    r32 = r64.float()
    out_d = np.empty((len(q), k), dtype=np.float64)
    out_i = np.empty((len(q), k), dtype=np.int64)
    for start in range(0, len(q), chunk_size):
        q64 = torch.from_numpy(q[start:start + chunk_size])
        approx = torch.cdist(q64.float(), r32)
        candidates = torch.topk(approx, k_search, dim=1, largest=False).indices
        exact = (q64[:, None, :] - r64[candidates]).pow(2).sum(-1).sqrt()
        order = torch.argsort(exact, dim=1, stable=True)[:, :k]
        out_d[start:start + chunk_size] = torch.gather(exact, 1, order).numpy()
        out_i[start:start + chunk_size] = torch.gather(candidates, 1, order).numpy()
    return out_d, out_i
