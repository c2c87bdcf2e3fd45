"""Baselines the fine-tuned models are reported against, on the same split and protocol:
popularity, EASE (Steck 2019) and item-kNN (cosine) here, the sequential Markov and SASRec in
:mod:`recsys_ray.evaluate.sequential`; :func:`baseline_ranks` scores the test split with them.

All of them score users from their interaction rows X (users x items, scipy CSR, binary), so
their scores go through exactly the metric code the BERT models use (`recsys_ray.evaluate.metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, replace

import numpy as np
import scipy.sparse as sp

from recsys_ray.data import layout
from recsys_ray.errors import DataError
from recsys_ray.evaluate.metrics import MetricAccumulator, repeats_history, target_ranks
from recsys_ray.evaluate.sequential import (
    Markov,
    SASRec,
    SequentialSettings,
    tune_markov,
    tune_sasrec,
)

logger = logging.getLogger(__name__)

DEFAULT_L2_CANDIDATES: tuple[float, ...] = (10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)

Rows = np.ndarray | sp.spmatrix | sp.sparray


# --- ids and interaction matrices ---------------------------------------------------------------


class ItemIndex:
    """Catalogue item ids (strings) <-> dense indices 0..I-1, in catalogue order."""

    def __init__(self, item_ids: Iterable[str]):
        self.ids: tuple[str, ...] = tuple(item_ids)
        self._index = {item_id: i for i, item_id in enumerate(self.ids)}
        if len(self._index) != len(self.ids):
            dup = next(i for n, i in enumerate(self.ids) if self._index[i] != n)
            raise DataError(f"duplicate item_id in catalogue: {dup!r}")

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._index

    def index_of(self, item_id: str) -> int:
        """The index of one id; DataError if the catalogue lacks it."""
        try:
            return self._index[item_id]
        except KeyError:
            raise DataError(f"item_id not in catalogue: {item_id!r}") from None

    def indices(self, item_ids: Iterable[str]) -> np.ndarray:
        """Indices (int64) of several ids, in order."""
        return np.fromiter((self.index_of(i) for i in item_ids), dtype=np.int64)

    def ids_of(self, indices: Iterable[int]) -> list[str]:
        """The ids at these indices (inverse of :meth:`indices`)."""
        return [self.ids[int(i)] for i in indices]


def interactions_matrix(
    user_rows: Sequence[Sequence[str]], index: ItemIndex, dtype: type = np.float32
) -> sp.csr_matrix:
    """Binary (U, I) CSR matrix: row u has a 1 for every item id in ``user_rows[u]``.

    Repeats of an item count once (EASE and item-kNN are defined on binary data).
    """
    lengths = np.fromiter((len(r) for r in user_rows), dtype=np.int64, count=len(user_rows))
    cols = index.indices(i for row in user_rows for i in row)
    rows = np.repeat(np.arange(len(user_rows)), lengths)
    X = sp.csr_matrix(
        (np.ones(cols.size, dtype=dtype), (rows, cols)), shape=(len(user_rows), len(index))
    )
    X.sum_duplicates()
    X.data[:] = 1  # duplicates were summed; back to binary
    return X


# --- popularity ---------------------------------------------------------------------------------


def popularity_scores(train_item_indices: np.ndarray, num_items: int) -> np.ndarray:
    """(I,) float64 count of train interactions per item; the same scores for every user.

    Rank a batch of U users with ``np.broadcast_to(pop, (U, I))`` (no copy).
    """
    idx = np.asarray(train_item_indices)
    if idx.size and (
        not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0 or idx.max() >= num_items
    ):
        raise ValueError(f"train_item_indices must be integers in [0, {num_items})")
    return np.bincount(idx.ravel().astype(np.int64), minlength=num_items).astype(np.float64)


# --- EASE ---------------------------------------------------------------------------------------


def _gram(X: Rows, dtype: type = np.float64) -> np.ndarray:
    """Dense X^T X (I, I): I^2 * 8 bytes in float64 (1.7k items: 23 MB; 50k items: 20 GB).

    Co-occurrence counts are exact in float32 too (up to 2^24 users).
    """
    X = sp.csr_matrix(X, dtype=dtype)
    return (X.T @ X).toarray()


def _ease_from_gram(gram: np.ndarray, l2: float, copy: bool = True) -> np.ndarray:
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0 (X^T X alone is usually singular), got {l2}")
    G = gram.copy() if copy else gram
    G[np.diag_indices_from(G)] += l2
    # The one expensive step: an (I, I) inverse, O(I^3) time (about a second for 10k items on a
    # multi-core CPU, tens of minutes for 100k). float32 halves memory and roughly halves time,
    # at ~1e-6 relative error in B.
    P = np.linalg.inv(G)
    B = P / -np.diag(P)  # column j divided by -P_jj
    B[np.diag_indices_from(B)] = 0.0
    return B


def ease_fit(X: Rows, l2: float, dtype: type = np.float64) -> np.ndarray:
    """EASE item-item weights B (I, I), the closed form of Steck 2019.

    B = argmin ||X - X B||^2 + l2 ||B||^2 subject to diag(B) = 0:
    G = X^T X + l2 I, P = G^-1, B = -P / diag(P) (column-wise), diag(B) = 0.
    Memory is a few dense (I, I) arrays; time O(I^3) for the inverse.
    """
    return _ease_from_gram(_gram(X, dtype), l2, copy=False)


def _item_item_scores(X_rows: Rows, W: np.ndarray) -> np.ndarray:
    if X_rows.shape[1] != W.shape[0]:
        raise ValueError(f"X_rows has {X_rows.shape[1]} items, weights have {W.shape[0]}")
    return np.asarray(X_rows @ W)  # sparse @ dense: O(nnz * I), dense (U, I) result


def ease_scores(X_rows: Rows, B: np.ndarray) -> np.ndarray:
    """(U, I) EASE scores X_rows @ B for users' history rows (sparse or dense)."""
    return _item_item_scores(X_rows, B)


def tune_ease_l2(
    X_train: Rows,
    valid_targets: np.ndarray,
    candidates: Sequence[float] = DEFAULT_L2_CANDIDATES,
    seen: Rows | None = None,
    batch_size: int = 2048,
) -> tuple[float, dict[float, float]]:
    """Pick EASE's l2 by validation NDCG@10 under the full-ranking protocol.

    X_train: (U, I) train interactions, which are both the fitting data and the users' histories.
    valid_targets: (U,) each user's validation item index, -1 for users without one (still used
    to fit, not scored). seen: (U, I) mask of items to exclude from ranking; defaults to X_train,
    and then a user whose target is already in X_train is not scored (the evaluation protocol).
    Returns (best l2, {l2: ndcg@10}); ties go to the earlier candidate. The Gram matrix is built
    once; each candidate costs one O(I^3) inverse plus scoring the validation users.
    """
    X_train = sp.csr_matrix(X_train)
    valid_targets = np.asarray(valid_targets)
    if valid_targets.shape != (X_train.shape[0],):
        raise ValueError(
            f"valid_targets must have shape ({X_train.shape[0]},), got {valid_targets.shape}"
        )
    if not candidates:
        raise ValueError("no l2 candidates")
    users = np.flatnonzero(valid_targets >= 0)
    if seen is None:  # a target already in the train history is not scored (metrics.repeats_history)
        users = users[np.asarray(X_train[users, valid_targets[users]]).ravel() == 0]
    if users.size == 0:
        raise ValueError("no user has a validation target (that is not a repeat)")
    targets = valid_targets[users].astype(np.int64)
    history = X_train[users]
    mask = sp.csr_matrix(history if seen is None else sp.csr_matrix(seen)[users], dtype=bool)

    gram = _gram(X_train)
    results: dict[float, float] = {}
    for l2 in candidates:
        B = _ease_from_gram(gram, float(l2))
        acc = MetricAccumulator(ks=(10,))
        for start in range(0, users.size, batch_size):  # (batch, I) scores at a time
            sl = slice(start, start + batch_size)
            acc.update(target_ranks(ease_scores(history[sl], B), targets[sl], mask[sl]))
        results[float(l2)] = acc.result()["ndcg@10"]
        logger.info("EASE l2=%g valid ndcg@10=%.4f", l2, results[float(l2)])
    best = max(results, key=lambda l2: results[l2])  # first maximum = earlier candidate on ties
    return best, results


# --- item-kNN -----------------------------------------------------------------------------------


def itemknn_fit(X: Rows, neighbours: int | None = None) -> np.ndarray:
    """Cosine item-item similarity S (I, I) with zero diagonal.

    neighbours: keep only each item's top-``neighbours`` most similar items (per column, ties by
    lower index), the usual sparsification; None keeps all. Memory: a dense (I, I) float64.
    """
    gram = _gram(X)
    norms = np.sqrt(np.diag(gram))
    norms[norms == 0] = 1.0  # items without interactions: similarity 0, not NaN
    S = gram / norms[:, None] / norms[None, :]
    np.fill_diagonal(S, 0.0)
    if neighbours is not None and neighbours < S.shape[0]:
        if neighbours < 1:
            raise ValueError(f"neighbours must be >= 1, got {neighbours}")
        # Per column j (the item being scored), keep its strongest source items.
        order = np.argsort(-S, axis=0, kind="stable")
        drop = order[neighbours:]
        S[drop, np.arange(S.shape[1])[None, :]] = 0.0
    return S


def itemknn_scores(X_rows: Rows, S: np.ndarray) -> np.ndarray:
    """(U, I) item-kNN scores X_rows @ S: summed similarity of each item to the user's history."""
    return _item_item_scores(X_rows, S)


# --- the test split ------------------------------------------------------------------------------


def baseline_ranks(data: str, max_users: int = 0, sequential: SequentialSettings | None = None,
                   targets_in: set[str] | None = None) -> dict[str, dict]:
    """Popularity, EASE (L2 tuned on validation) and, with ``sequential``, Markov and SASRec
    (knobs tuned on validation) ranks of every test user's target: ``{name: {"ranks": [one
    array per seed], "params": ...}}``.

    Histories are each user's events before the test event (train + validation), all masked; a
    user whose test item repeats one of them is left out (``_users.repeats_left_out``), as the
    model evaluation does; users by id, the order the model rows are scored in. The fitted
    models see the train part when their knobs are chosen (scored on validation) and are fitted
    again on everything before the test event to score it (SASRec for the number of epochs its
    validation chose, unless ``sasrec_refit`` is off: then the best validation epoch's weights).
    """
    items = ItemIndex(layout.read_items(data, ["item_id"])["item_id"].to_pylist())
    seq = layout.read_sequences(data, ["user_id", "item_ids", "n_train"]).to_pylist()
    seq.sort(key=lambda r: r["user_id"])
    train_rows, full_rows, valid_t, test_t, test_users = [], [], [], [], []
    for r in seq:
        ids, n = r["item_ids"], r["n_train"]
        train_rows.append(ids[:n])
        valid_t.append(items.index_of(ids[n]) if len(ids) > n else -1)
        has_test = len(ids) > n + 1
        full_rows.append(ids[: n + 1] if has_test else ids)
        test_t.append(items.index_of(ids[n + 1]) if has_test else -1)
        if has_test:
            test_users.append(r["user_id"])
    X_train = interactions_matrix(train_rows, items)
    X_full = interactions_matrix(full_rows, items)  # everything before each user's test event
    users = np.flatnonzero(np.asarray(test_t) >= 0)
    if max_users:
        users, test_users = users[:max_users], test_users[:max_users]
    if targets_in is not None:  # only the test events on these items (evaluate --targets)
        keep = np.asarray([items.ids[t] in targets_in for t in np.asarray(test_t)[users]], dtype=bool)
        users, test_users = users[keep], [u for u, k in zip(test_users, keep, strict=True) if k]
    targets = np.asarray(test_t)[users]
    # a test event that repeats a history item is not scored (metrics.repeats_history)
    novel = np.asarray(X_full[users, targets]).ravel() == 0
    users, targets = users[novel], targets[novel]
    test_users = [u for u, keep in zip(test_users, novel, strict=True) if keep]
    history = X_full[users]
    mask = sp.csr_matrix(history, dtype=bool)
    out: dict[str, dict] = {}
    pop = popularity_scores(X_full.tocoo().col, len(items))
    out["popularity"] = {"ranks": [target_ranks(np.tile(pop, (len(users), 1)), targets, mask)], "params": {}}
    l2, curve = tune_ease_l2(X_train, np.asarray(valid_t))
    B = ease_fit(X_full, l2)
    out["EASE"] = {"ranks": [target_ranks(ease_scores(history, B), targets, mask)],
                   "params": {"l2": l2, "valid_ndcg@10_by_l2": {str(k): round(v, 5) for k, v in curve.items()}}}
    if sequential is not None:
        out.update(_sequential_ranks(sequential, items, train_rows, full_rows, np.asarray(valid_t), users, targets, mask))
    out["_users"] = {"ids": test_users, "repeats_left_out": int((~novel).sum())}
    return out


def _sequential_ranks(settings: SequentialSettings, items: ItemIndex, train_rows, full_rows, valid_t: np.ndarray,
                      users: np.ndarray, targets: np.ndarray, mask) -> dict[str, dict]:
    train = [items.indices(r) for r in train_rows]  # time order kept
    full = [items.indices(r) for r in full_rows]
    # validation users: with a validation item that is not a repeat of their train part
    v_users = [u for u in np.flatnonzero(valid_t >= 0) if not repeats_history(valid_t[u], train[u])]
    v_hist, v_targets = [train[u] for u in v_users], valid_t[v_users]
    test_hist = [full[u] for u in users]
    out: dict[str, dict] = {}
    if settings.markov:
        params, curve = tune_markov(train, v_hist, v_targets, len(items))
        markov = Markov(full, len(items), params)
        out["Markov"] = {"ranks": [target_ranks(markov.scores(test_hist), targets, mask)],
                         "params": {**asdict(params), "valid_ndcg@10_by_params": {k: round(v, 5) for k, v in curve.items()}}}
    if settings.sasrec_seeds:
        chosen, curve = tune_sasrec(train, v_hist, v_targets, len(items), settings.sasrec_grid, seed=0)
        ranks, runs = [], []
        for seed in range(1, settings.sasrec_seeds + 1):  # the seed that chose the knobs is not reported
            m = SASRec(len(items), replace(chosen.params, seed=seed)).fit(train, v_hist, v_targets)
            run = {"seed": seed, "valid_ndcg@10": round(m.best_ndcg, 5), "best_epoch": m.best_epoch,
                   "epochs": m.epochs_run, "seconds": round(m.seconds, 1)}
            if settings.sasrec_refit:  # everything before the test event, for the epochs validation chose
                m = SASRec(len(items), replace(chosen.params, seed=seed, max_epochs=m.best_epoch)).fit(full)
                run["refit_seconds"] = round(m.seconds, 1)
            ranks.append(target_ranks(m.scores(test_hist), targets, mask))
            runs.append(run)
            logger.info("SASRec seed %d: %s", seed, run)
        out["SASRec"] = {"ranks": ranks, "params": {**asdict(replace(chosen.params, seed=0)), "chosen_with_seed": 0,
                                                    "refit": settings.sasrec_refit, "valid_by_grid": curve,
                                                    "runs": runs}}
    return out
