"""Offline ranking metrics for the full-ranking, leave-last-out protocol (see DESIGN.md).

Every user's held-out item is ranked against ALL catalogue items, with the items already in the
user's history masked out. A held-out event that repeats an item of the user's history is left out
of the evaluation (and counted, :func:`repeats_history`): unmasking just the target would make the
candidate set depend on the label, and masking it would make the hit impossible. Ties are resolved pessimistically: an item scoring the same as the
target ranks above it, so a model that gives every item the same score gets the worst rank, not a
lucky one. Ranks are 0-based (rank 0 = first place).

Everything is vectorised over users; the (U, I) temporaries mean callers should score and rank
users in batches (a few hundred to a few thousand rows) and combine the batches with
:class:`MetricAccumulator`.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence

import numpy as np
import scipy.sparse as sp

DEFAULT_KS: tuple[int, ...] = (5, 10, 20, 50)  # the cut-offs every report and validation uses
HEADLINE: tuple[str, ...] = ("ndcg@10", "hr@10")  # the headline metrics (NDCG@10 ranks checkpoints)
# every metric MetricAccumulator.result() reports (and so every validation report)
METRIC_NAMES: tuple[str, ...] = (*(f"{m}@{k}" for m in ("ndcg", "hr", "mrr", "recall") for k in DEFAULT_KS), "mrr")
# the same metrics of the validation rows that carry a query, read as searches (a search model's runs)
SEARCH_PREFIX = "search_"
SEARCH_METRIC_NAMES: tuple[str, ...] = tuple(SEARCH_PREFIX + m for m in METRIC_NAMES)

# A (U, I) boolean mask: dense numpy or any scipy.sparse matrix/array (histories are sparse).
Mask = np.ndarray | sp.spmatrix | sp.sparray


def repeats_history(target: str, seen: Sequence[str]) -> bool:
    """Whether a held-out event repeats an item the user already had: the protocol scores only
    new items, each against the catalogue minus the user's whole history (a set that does not
    depend on the label). Training validation, evaluation and the baselines all use this rule."""
    return target in seen


# --- input checks -------------------------------------------------------------------------------


def _check_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (users, items), got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.number) or np.issubdtype(
        scores.dtype, np.complexfloating
    ):
        raise ValueError(f"scores must be real numbers, got dtype {scores.dtype}")
    nan_rows = np.flatnonzero(np.isnan(scores).any(axis=1))
    if nan_rows.size:
        raise ValueError(f"scores contain NaN (first at user row {int(nan_rows[0])})")
    return scores


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    return tuple(sorted({int(k) for k in ks}))


def _check_ranks(ranks: np.ndarray) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim != 1:
        raise ValueError(f"ranks must be 1-D (one per user), got shape {ranks.shape}")
    if ranks.size and not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must be integers, got dtype {ranks.dtype}")
    if ranks.size and ranks.min() < 0:
        raise ValueError("ranks must be >= 0 (they are 0-based)")
    return ranks.astype(np.int64, copy=False)


def _as_csr_mask(mask: Mask, shape: tuple[int, int], name: str) -> sp.csr_array:
    """A boolean CSR copy of a dense or sparse (U, I) mask, explicit zeros dropped."""
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {mask.shape}, scores have {shape}")
    csr = (
        sp.csr_array(mask, dtype=bool)
        if sp.issparse(mask)
        else sp.csr_array(np.asarray(mask, dtype=bool))
    )
    csr.eliminate_zeros()
    return csr


def _as_dense_mask(mask: Mask, shape: tuple[int, int], name: str) -> np.ndarray:
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {mask.shape}, scores have {shape}")
    if sp.issparse(mask):
        return mask.toarray().astype(bool, copy=False)  # (U, I) bytes: batch the users
    return np.asarray(mask, dtype=bool)


def _seen_nonzeros(seen: sp.csr_array) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of every masked (user, item) pair."""
    rows = np.repeat(np.arange(seen.shape[0]), np.diff(seen.indptr))
    return rows, seen.indices


# --- full ranking -------------------------------------------------------------------------------


def target_ranks(
    scores: np.ndarray, target_index: np.ndarray, seen_mask: Mask | None = None
) -> np.ndarray:
    """0-based rank of each user's target among the unmasked items, ties pessimistic.

    scores: (U, I) model scores, higher is better. target_index: (U,) the held-out item per user.
    seen_mask: (U, I) bool, dense or scipy.sparse, True for items in the user's history; those
    items are excluded from the ranking even when they score higher. The target itself must not
    be masked (ValueError naming the user row). Returns (U,) int64.
    """
    scores = _check_scores(scores)
    num_users, num_items = scores.shape
    target_index = np.asarray(target_index)
    if target_index.shape != (num_users,) or not np.issubdtype(target_index.dtype, np.integer):
        raise ValueError(
            f"target_index must be ({num_users},) integers, got {target_index.shape} {target_index.dtype}"
        )
    if num_users and (target_index.min() < 0 or target_index.max() >= num_items):
        raise ValueError(f"target_index out of range [0, {num_items})")

    users = np.arange(num_users)
    target_score = scores[users, target_index]  # (U,)
    # One (U, I) comparison; `>=` counts ties against the target (pessimistic), minus itself.
    ranks = np.count_nonzero(scores >= target_score[:, None], axis=1) - 1
    if seen_mask is None:
        return ranks.astype(np.int64)

    # Work on the masked pairs only (nnz << U * I for real histories): a seen item lowers the
    # rank by one exactly when it would have been counted above the target.
    seen = _as_csr_mask(seen_mask, scores.shape, "seen_mask")
    rows, cols = _seen_nonzeros(seen)
    bad = np.flatnonzero(cols == target_index[rows])
    if bad.size:
        raise ValueError(f"seen_mask contains the target item at user row {int(rows[bad[0]])}")
    above = scores[rows, cols] >= target_score[rows]
    ranks -= np.bincount(rows[above], minlength=num_users)
    return ranks.astype(np.int64)


def sample_unseen(user_id: str, exclude: np.ndarray, num_items: int, n: int, seed: int) -> np.ndarray:
    """The sampled protocol's negatives: ``n`` uniform items not in ``exclude`` (history + target).

    Seeded by ``(seed, crc32(user_id))``, not ``hash()`` (str hashes are randomised per process),
    so every process and every run draws the same list for a user.
    """
    rng = np.random.default_rng([seed, zlib.crc32(str(user_id).encode("utf-8"))])
    pool = np.setdiff1d(np.arange(num_items), np.asarray(exclude, dtype=np.int64))
    return rng.choice(pool, size=min(n, len(pool)), replace=False)


def sampled_ranks(scores_target: np.ndarray, scores_negatives: np.ndarray) -> np.ndarray:
    """0-based rank of the target among 1 positive + N sampled negatives, ties pessimistic.

    scores_target: (U,); scores_negatives: (U, N). This is the *sampled* protocol: its numbers
    overstate quality and do not order models like full ranking does, so metrics computed from
    these ranks are reported only labelled "sampled" (e.g. ``sampled_ndcg@10``), never as headline.
    """
    scores_target = np.asarray(scores_target)
    scores_negatives = np.asarray(scores_negatives)
    if scores_target.ndim != 1 or scores_negatives.ndim != 2:
        raise ValueError("scores_target must be (U,) and scores_negatives (U, N)")
    if scores_negatives.shape[0] != scores_target.shape[0]:
        raise ValueError(
            f"{scores_target.shape[0]} targets but {scores_negatives.shape[0]} rows of negatives"
        )
    if np.isnan(scores_target).any() or np.isnan(scores_negatives).any():
        raise ValueError("scores contain NaN")
    return np.count_nonzero(scores_negatives >= scores_target[:, None], axis=1).astype(np.int64)


def top_k(scores: np.ndarray, k: int, seen_mask: Mask | None = None) -> np.ndarray:
    """Indices (U, k) of each user's k best unseen items, best first, ties by lower item index.

    Seen items never appear; a user with fewer than k unseen items is a ValueError.
    Cost: O(U * I) to find the k-th score, then a sort of the (usually ~k) candidates only.
    """
    scores = _check_scores(scores)
    num_users, num_items = scores.shape
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= num_items:
        raise ValueError(f"k must be an integer in [1, {num_items}], got {k}")
    k = int(k)
    scores = scores.astype(np.float64, copy=False)
    if seen_mask is None:
        unseen = np.ones(scores.shape, dtype=bool)
    else:
        unseen = ~_as_dense_mask(seen_mask, scores.shape, "seen_mask")
    short = np.flatnonzero(unseen.sum(axis=1) < k)
    if short.size:
        raise ValueError(f"user row {int(short[0])} has fewer than k={k} unseen items")

    masked = np.where(unseen, scores, -np.inf)
    kth = -np.partition(-masked, k - 1, axis=1)[:, k - 1]  # k-th best unseen score per user
    # Candidates: every unseen item at least as good as the k-th (>= k per row; more on ties).
    rows, cols = np.nonzero((masked >= kth[:, None]) & unseen)  # row-major: cols ascending
    counts = np.bincount(rows, minlength=num_users)
    width = int(counts.max())
    pos = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    cand_items = np.full((num_users, width), num_items, dtype=np.int64)
    cand_scores = np.full((num_users, width), -np.inf)
    cand_items[rows, pos] = cols
    cand_scores[rows, pos] = masked[rows, cols]
    # Stable sort keeps ascending item index among equal scores, and the padding (placed after
    # every real candidate) behind real -inf scores.
    order = np.argsort(-cand_scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cand_items, order, axis=1)


# --- metrics from ranks -------------------------------------------------------------------------


class MetricAccumulator:
    """Streaming ranking metrics: feed rank batches with :meth:`update`, read :meth:`result`.

    Keeps a histogram of ranks (at most I counters), so the result does not depend on how users
    were split into batches, and accumulators from several workers combine with :meth:`merge`.
    """

    def __init__(self, ks: Sequence[int] = DEFAULT_KS):
        self.ks = _check_ks(ks)
        self._counts = np.zeros(0, dtype=np.int64)  # _counts[r] = users whose target ranked r

    @property
    def num_users(self) -> int:
        return int(self._counts.sum())

    def update(self, ranks: np.ndarray) -> MetricAccumulator:
        """Add a batch of 0-based ranks (one per user); returns self."""
        ranks = _check_ranks(ranks)
        if ranks.size:
            batch = np.bincount(ranks)
            self._grow(batch.size)
            self._counts[: batch.size] += batch
        return self

    def merge(self, other: MetricAccumulator) -> MetricAccumulator:
        """Add another accumulator's users (same ks); returns self."""
        if other.ks != self.ks:
            raise ValueError(f"cannot merge ks={other.ks} into ks={self.ks}")
        self._grow(other._counts.size)
        self._counts[: other._counts.size] += other._counts
        return self

    def result(self) -> dict[str, float]:
        """ndcg@K, hr@K, mrr@K, recall@K for each K, untruncated "mrr", and "num_users"."""
        n = self.num_users
        if n == 0:
            raise ValueError("no users: nothing to average")
        rank = np.arange(self._counts.size)
        reciprocal = 1.0 / (rank + 1)
        gain = 1.0 / np.log2(rank + 2)  # DCG of one relevant item at this rank; IDCG = 1
        out: dict[str, float] = {}
        for k in self.ks:
            within = self._counts[:k]
            hr = float(within.sum() / n)
            out[f"ndcg@{k}"] = float((within * gain[:k]).sum() / n)
            out[f"hr@{k}"] = hr
            out[f"mrr@{k}"] = float((within * reciprocal[:k]).sum() / n)
            out[f"recall@{k}"] = hr  # one held-out positive per user: recall == hit rate
        out["mrr"] = float((self._counts * reciprocal).sum() / n)
        out["num_users"] = n
        return out

    def _grow(self, size: int) -> None:
        if size > self._counts.size:
            self._counts = np.pad(self._counts, (0, size - self._counts.size))


def ranking_metrics(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Metrics from 0-based ranks of one held-out item per user.

    NDCG@K = 1/log2(rank+2) if rank < K else 0 (the ideal DCG is 1); HR@K = Recall@K = [rank < K];
    MRR@K = 1/(rank+1) if rank < K else 0; "mrr" is untruncated. Values are means over users.
    """
    return MetricAccumulator(ks).update(ranks).result()


def multi_positive_metrics(
    scores: np.ndarray,
    positives_mask: Mask,
    seen_mask: Mask | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """recall@K, ndcg@K and hr@K when a user has several held-out positives; plus "num_users".

    Recall@K = positives in the top K / all the user's positives. NDCG@K is normalised by the
    ideal DCG (all positives first, min(#positives, K) of them). Ties pessimistic: among equal
    scores, non-positives rank first. Seen items are excluded; a positive must not be seen.
    Cost: a full (U, I) lexsort, O(U * I * log I): call on user batches.
    """
    scores = _check_scores(scores)
    ks = _check_ks(ks)
    shape = scores.shape
    positives = _as_dense_mask(positives_mask, shape, "positives_mask")
    empty = np.flatnonzero(~positives.any(axis=1))
    if empty.size:
        raise ValueError(f"user row {int(empty[0])} has no positive item")
    if seen_mask is None:
        seen = np.zeros(shape, dtype=bool)
    else:
        seen = _as_dense_mask(seen_mask, shape, "seen_mask")
        clash = np.flatnonzero((seen & positives).any(axis=1))
        if clash.size:
            raise ValueError(f"seen_mask contains a positive item at user row {int(clash[0])}")

    # Keys, last one primary: unseen first, then score descending, then non-positives first.
    order = np.lexsort((positives, -scores.astype(np.float64), seen), axis=1)
    hits = np.take_along_axis(positives, order, axis=1)  # (U, I) relevance in ranked order
    num_pos = positives.sum(axis=1)  # (U,)
    discount = 1.0 / np.log2(np.arange(shape[1]) + 2)
    ideal = np.cumsum(discount)  # ideal[j] = IDCG with j+1 relevant items on top

    out: dict[str, float] = {}
    for k in ks:
        top = hits[:, :k]
        found = top.sum(axis=1)
        dcg = (top * discount[: top.shape[1]]).sum(axis=1)
        idcg = ideal[np.minimum(num_pos, k) - 1]
        out[f"ndcg@{k}"] = float(np.mean(dcg / idcg))
        out[f"hr@{k}"] = float(np.mean(found > 0))
        out[f"recall@{k}"] = float(np.mean(found / num_pos))
    out["num_users"] = shape[0]
    return out


# --- AUC ----------------------------------------------------------------------------------------


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of 1-D binary labels (bool or 0/1) against scores; a tied pair counts 0.5.

    Same value as ``sklearn.metrics.roc_auc_score(labels, scores)``, via the Mann-Whitney U
    statistic on average ranks: O(n log n), no (pos x neg) matrix.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"labels {labels.shape} and scores {scores.shape} must be equal 1-D shapes"
        )
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be binary (bool or 0/1)")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    labels = labels.astype(bool)
    num_pos = int(labels.sum())
    num_neg = labels.size - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError("AUC needs at least one positive and one negative label")
    _, group, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # 1-based average rank of each tie group: a tie between a positive and a negative thus
    # contributes half a win.
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = avg_rank[group][labels].sum()
    return float((rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def metrics_of(ranks: np.ndarray) -> dict:
    """Every metric at :data:`DEFAULT_KS` of a set of 0-based ranks."""
    return MetricAccumulator(ks=DEFAULT_KS).update(np.asarray(ranks, dtype=np.int64)).result()


def aggregate(per_seed: list[dict]) -> dict:
    """Mean and sample std over seeds of every metric."""
    keys = [k for k in per_seed[0] if isinstance(per_seed[0][k], float)]
    mean = {k: float(np.mean([m[k] for m in per_seed])) for k in keys}
    std = {k: (float(np.std([m[k] for m in per_seed], ddof=1)) if len(per_seed) > 1 else 0.0) for k in keys}
    return {"mean": mean, "std": std, "seeds": len(per_seed), "num_users": per_seed[0].get("num_users")}
