"""Baselines against hand-computed values and independent derivations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from recsys_ray.errors import DataError
from recsys_ray.evaluate.baselines import (
    ItemIndex,
    ease_fit,
    ease_scores,
    interactions_matrix,
    itemknn_fit,
    itemknn_scores,
    popularity_scores,
    tune_ease_l2,
)
from recsys_ray.evaluate.metrics import ranking_metrics, target_ranks, top_k

# --- ids and interaction matrices ---------------------------------------------------------------


def test_item_index_round_trip_and_errors():
    index = ItemIndex(["242", "1", "50"])
    assert len(index) == 3
    assert index.index_of("1") == 1
    assert index.indices(["50", "242", "50"]).tolist() == [2, 0, 2]
    assert index.ids_of([2, 0]) == ["50", "242"]
    assert "1" in index and "7" not in index
    with pytest.raises(DataError, match="'7'"):
        index.index_of("7")
    with pytest.raises(DataError, match="duplicate item_id in catalogue: '1'"):
        ItemIndex(["1", "2", "1"])


def test_interactions_matrix_is_binary_per_user_row():
    index = ItemIndex(["a", "b", "c", "d"])
    X = interactions_matrix([["a", "c", "a"], [], ["d", "b"]], index)  # "a" repeated once
    assert sp.issparse(X) and X.format == "csr"
    assert X.toarray().tolist() == [[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 1]]


# --- popularity ---------------------------------------------------------------------------------


def test_popularity_on_a_hand_made_log():
    index = ItemIndex(["a", "b", "c", "d"])
    log = ["a", "b", "b", "c", "b", "c"]  # a:1, b:3, c:2, d:0
    pop = popularity_scores(index.indices(log), len(index))
    assert pop.tolist() == [1.0, 3.0, 2.0, 0.0]
    scores = np.broadcast_to(pop, (2, 4))
    seen = np.array([[False] * 4, [False, True, False, False]])  # user 1 already has "b"
    assert [index.ids_of(r) for r in top_k(scores, 3, seen)] == [["b", "c", "a"], ["c", "a", "d"]]
    # User 1's held-out "a" ranks second once the seen "b" is masked.
    assert target_ranks(scores, index.indices(["c", "a"]), seen).tolist() == [1, 1]
    with pytest.raises(ValueError):
        popularity_scores(np.array([0, 4]), 4)


# --- EASE ---------------------------------------------------------------------------------------


def test_ease_two_items_worked_by_hand():
    # X^T X = [[3, 1], [1, 2]]; with l2 = 1, G = [[4, 1], [1, 3]], P = G^-1 = [[3, -1], [-1, 4]] / 11.
    # B[0, 1] = -P01 / P11 = (1/11) / (4/11) = 1/4; B[1, 0] = -P10 / P00 = (1/11) / (3/11) = 1/3.
    X = sp.csr_matrix(np.array([[1, 1], [1, 0], [1, 0], [0, 1]]))
    B = ease_fit(X, l2=1.0)
    np.testing.assert_allclose(B, [[0.0, 1 / 4], [1 / 3, 0.0]], atol=1e-12)
    # Scores are X @ B: user 1 (item 0 only) gets 1/4 for item 1.
    np.testing.assert_allclose(ease_scores(X[1], B), [[0.0, 1 / 4]], atol=1e-12)


def test_ease_equals_per_item_ridge_without_the_item_itself():
    # diag(B) = 0 means column j is a ridge regression of item j on every *other* item:
    # b_{-j} = (X_{-j}^T X_{-j} + l2 I)^-1 X_{-j}^T x_j, solved here item by item.
    rng = np.random.default_rng(0)
    X = (rng.random((40, 7)) < 0.35).astype(np.float64)
    l2 = 3.0
    B = ease_fit(sp.csr_matrix(X), l2)
    expected = np.zeros((7, 7))
    for j in range(7):
        others = [i for i in range(7) if i != j]
        Xo = X[:, others]
        expected[others, j] = np.linalg.solve(Xo.T @ Xo + l2 * np.eye(6), Xo.T @ X[:, j])
    np.testing.assert_allclose(B, expected, atol=1e-10)
    assert np.all(np.diag(B) == 0.0)
    B32 = ease_fit(sp.csr_matrix(X), l2, dtype=np.float32)
    assert B32.dtype == np.float32
    np.testing.assert_allclose(B32, expected, atol=1e-5)
    with pytest.raises(ValueError):
        ease_fit(sp.csr_matrix(X), 0.0)


def _clustered_log(seed: int, num_users: int = 120, num_items: int = 30, per_user: int = 6):
    """Users who each draw from one of three item blocks, so co-occurrence carries signal."""
    rng = np.random.default_rng(seed)
    blocks = np.array_split(np.arange(num_items), 3)
    rows = []
    for u in range(num_users):
        block = blocks[u % 3]
        rows.append(rng.choice(block, size=per_user, replace=False))
    return np.array(rows)


def test_tune_ease_l2_picks_the_best_validation_ndcg():
    items = _clustered_log(1)  # (U, 6): first 5 train, last one validation
    num_users, num_items = items.shape[0], 30
    X = np.zeros((num_users, num_items))
    X[np.repeat(np.arange(num_users), 5), items[:, :5].ravel()] = 1.0
    targets = items[:, 5].copy()
    targets[::10] = -1  # users without a validation event: fitted on, not scored
    candidates = (0.1, 5.0, 50.0, 5000.0)

    best, results = tune_ease_l2(sp.csr_matrix(X), targets, candidates)

    scored = targets >= 0
    expected = {}
    for l2 in candidates:  # the same protocol, computed independently, all users in one batch
        scores = X[scored] @ ease_fit(sp.csr_matrix(X), l2)
        ranks = target_ranks(scores, targets[scored], X[scored].astype(bool))
        expected[l2] = ranking_metrics(ranks)["ndcg@10"]
    assert results == pytest.approx(expected)
    assert len(set(np.round(list(results.values()), 9))) > 1  # the choice is not a tie
    assert best == max(candidates, key=lambda l2: expected[l2])
    # Tiny batches give the same numbers (metrics stream through an accumulator).
    assert tune_ease_l2(sp.csr_matrix(X), targets, candidates, batch_size=7)[1] == results


def test_tune_ease_l2_leaves_a_repeated_target_out():
    # 6 items. User 0's validation item 1 is already in its train history: not scored.
    # User 1 (history 0, 1; target 4) is ranked against the 3 other unseen items 2, 3, 5.
    X = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 1, 0], [1, 0, 1, 1, 0, 1],
                  [0, 0, 1, 1, 1, 0]], dtype=float)
    best, results = tune_ease_l2(sp.csr_matrix(X), np.array([1, 4, -1, -1, -1]), candidates=(1.0, 10.0))
    for l2 in (1.0, 10.0):
        P = np.linalg.inv(X.T @ X + l2 * np.eye(6))  # the closed form, by hand
        B = -P / np.diag(P)[None, :]
        np.fill_diagonal(B, 0.0)
        s = X[1] @ B
        rank = sum(s[i] >= s[4] for i in (2, 3, 5))
        assert results[l2] == pytest.approx(1 / math.log2(rank + 2)), l2
    assert best == max(results, key=lambda l2: (results[l2], -l2))
    with pytest.raises(ValueError, match="not a repeat"):  # only repeats: nothing to score
        tune_ease_l2(sp.csr_matrix(X), np.array([1, -1, -1, -1, -1]), candidates=(1.0,))


# --- item-kNN -----------------------------------------------------------------------------------


def test_itemknn_cosine_by_hand():
    # Item columns: a = [1, 1, 0], b = [1, 0, 1], c = [1, 1, 1].
    X = sp.csr_matrix(np.array([[1, 1, 1], [1, 0, 1], [0, 1, 1]]))
    S = itemknn_fit(X)
    ab, ac, bc = 1 / 2, 2 / math.sqrt(2 * 3), 2 / math.sqrt(2 * 3)
    np.testing.assert_allclose(S, [[0, ab, ac], [ab, 0, bc], [ac, bc, 0]], atol=1e-12)
    # A user who has only "a": scores are a's similarities.
    np.testing.assert_allclose(itemknn_scores(sp.csr_matrix([[1, 0, 0]]), S), [S[0]])
    # One neighbour per column: for column a, c (0.816) beats b (0.5).
    S1 = itemknn_fit(X, neighbours=1)
    np.testing.assert_allclose(S1[:, 0], [0, 0, ac], atol=1e-12)
    assert np.count_nonzero(S1, axis=0).tolist() == [1, 1, 1]
