"""The retriever's top k over the catalogue: exact (every item scored) or approximate (a faiss IVF index).

Scores are what :meth:`recsys_ray.predict.Predictor.retrieval_scores` computes: the scaled cosine
``u . v / temperature`` of unit vectors plus the popularity prior ``beta * log(1 + train count)``.
The prior is folded into the index as one more dimension, so the approximate search ranks by
the same score: item ``x = [v / temperature, prior]``, query ``q = [u, 1]``, ``q . x`` = the score.

``IVFIndex`` (faiss ``IndexIVFFlat``, inner product): items are grouped around ``nlist`` k-means
centroids; a query scores only the items of its ``nprobe`` best groups (exactly: the scores it
returns are the exact scores of the items it found, so a hit is ranked as the exact search would
rank it). Built from the item vectors when a replica loads, extended in place when items are
added (rows only grow, so faiss's sequential ids stay the catalogue rows). Excluded rows (the
user's history) are filtered after the search, which asks for ``k`` + as many extra candidates.
When it pays and what it costs: docs/benchmarks.md (``jobs/bench_ann.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from recsys_ray.errors import RecsysError

INDEXES = ("exact", "ivf")
MIN_TRAIN_PER_LIST = 39  # faiss's own floor for k-means: fewer training points per centroid and it warns
TRAIN_PER_LIST = 64  # k-means sample per group: 10^6 items train in seconds, not minutes (recall: benchmarks)


def top_k(scores: np.ndarray, k: int, exclude: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the k best scores (ties: lower row first), excluded rows left out."""
    s = scores.astype(np.float64, copy=True)
    if len(exclude):
        s[np.asarray(list(exclude), dtype=np.int64)] = -np.inf
    k = min(k, int(np.isfinite(s).sum()))
    if k <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    part = np.argpartition(-s, k - 1)[:k]
    order = part[np.lexsort((part, -s[part]))]
    return order.astype(np.int64), scores[order].astype(np.float32)


def augmented_items(item_vecs: np.ndarray, temperature: float, prior: np.ndarray | None) -> np.ndarray:
    """(N, H + 1) float32 ``[v / temperature, prior]`` (prior 0 without one)."""
    n = item_vecs.shape[0]
    extra = np.zeros((n, 1), np.float32) if prior is None else np.asarray(prior, np.float32).reshape(n, 1)
    return np.ascontiguousarray(np.hstack([np.asarray(item_vecs, np.float32) / temperature, extra]))


def augmented_users(user_vecs: np.ndarray) -> np.ndarray:
    """(B, H + 1) float32 ``[u, 1]``."""
    u = np.asarray(user_vecs, np.float32)
    return np.ascontiguousarray(np.hstack([u, np.ones((u.shape[0], 1), np.float32)]))


def default_nlist(n: int) -> int:
    """About 4 sqrt(N) groups (faiss's guideline for IVF), at most N / 39 so k-means has enough points."""
    return max(1, min(int(4 * math.sqrt(n)), n // MIN_TRAIN_PER_LIST))


class IVFIndex:
    """Approximate top k by inner product over augmented item vectors (see the module docstring)."""

    def __init__(self, item_vecs: np.ndarray, temperature: float, prior: np.ndarray | None = None,
                 nlist: int = 0, nprobe: int = 32, train_size: int = 0, seed: int = 0):
        import faiss  # only where an approximate index is asked for

        if item_vecs.ndim != 2 or item_vecs.shape[0] < 1:
            raise RecsysError(f"an IVF index needs a non-empty (N, H) item matrix, got shape {item_vecs.shape}")
        if nprobe < 1 or nlist < 0:
            raise RecsysError(f"index nprobe must be >= 1 and nlist >= 0, got {nprobe} and {nlist}")
        self.temperature = temperature
        x = augmented_items(item_vecs, temperature, prior)
        n, d = x.shape
        self.nlist = min(nlist or default_nlist(n), n)
        quantizer = faiss.IndexFlatIP(d)
        self.index = faiss.IndexIVFFlat(quantizer, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.cp.seed = seed
        # k-means on a seeded sample of TRAIN_PER_LIST points per group
        m = min(n, train_size or TRAIN_PER_LIST * self.nlist)
        sample = x if m == n else x[np.random.default_rng(seed).choice(n, m, replace=False)]
        self.index.train(sample)
        self.index.add(x)
        self.index.nprobe = min(nprobe, self.nlist)
        self._keep = (quantizer,)  # the IVF index does not own its quantizer's Python object

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, item_vecs: np.ndarray, prior: np.ndarray | None = None) -> None:
        """Append items (their rows follow the existing ones); the groups are not retrained."""
        self.index.add(augmented_items(item_vecs, self.temperature, prior))

    def memory_bytes(self) -> int:
        """Bytes of the index as faiss serializes it (vectors, lists, centroids)."""
        import faiss

        return int(faiss.serialize_index(self.index).nbytes)

    def search(self, user_vecs: np.ndarray, k: int, exclude: Sequence[Sequence[int]] | None = None
               ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per user: (rows, scores) of its approximate top k, best first (ties: lower row first)."""
        exclude = exclude or [()] * len(user_vecs)
        extra = max((len(e) for e in exclude), default=0)
        want = min(k + extra, len(self))
        dist, ids = self.index.search(augmented_users(user_vecs), want)
        out = []
        for j in range(len(user_vecs)):
            skip = set(int(r) for r in exclude[j])
            keep = [(float(s), int(r)) for s, r in zip(dist[j], ids[j], strict=True) if r >= 0 and int(r) not in skip]
            keep.sort(key=lambda t: (-t[0], t[1]))
            keep = keep[:k]
            out.append((np.array([r for _, r in keep], np.int64), np.array([s for s, _ in keep], np.float32)))
        return out
