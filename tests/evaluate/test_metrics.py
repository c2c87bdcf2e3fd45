"""Ranking metrics against hand-computed values, brute force and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from recsys_ray.evaluate.metrics import (
    MetricAccumulator,
    auc,
    multi_positive_metrics,
    ranking_metrics,
    sampled_ranks,
    target_ranks,
    top_k,
)

# --- target_ranks -------------------------------------------------------------------------------


def test_target_ranks_counts_items_scoring_above_the_target():
    scores = np.array(
        [
            [0.9, 0.1, 0.5, 0.7],  # target 2 (0.5): 0.9 and 0.7 above -> rank 2
            [0.2, 0.4, 0.3, 0.1],  # target 1 (0.4) is the best -> rank 0
            [0.2, 0.4, 0.3, 0.1],  # target 3 (0.1) is the worst -> rank 3
        ]
    )
    assert target_ranks(scores, np.array([2, 1, 3])).tolist() == [2, 0, 3]


def test_ties_are_pessimistic():
    scores = np.array(
        [
            [0.5, 0.5, 0.2],  # target 1 ties item 0 -> item 0 ranks above it -> rank 1
            [0.5, 0.5, 0.2],  # target 0 ties item 1 -> rank 1 as well (not 0)
            [0.3, 0.3, 0.3],  # every item equal: the target ranks last of 3 -> rank 2
        ]
    )
    assert target_ranks(scores, np.array([1, 0, 2])).tolist() == [1, 1, 2]


@pytest.mark.parametrize("as_sparse", [False, True])
def test_seen_items_are_excluded_even_when_they_score_higher(as_sparse):
    scores = np.array(
        [
            [0.9, 0.8, 0.3, 0.85],  # target 1; seen 0 (0.9) and 3 (0.85) both above -> rank 0
            [0.5, 0.5, 0.7, 0.1],  # target 0; seen 1 ties it, 2 unseen above -> rank 1
        ]
    )
    seen = np.array([[True, False, False, True], [False, True, False, False]])
    mask = sp.csr_matrix(seen) if as_sparse else seen
    assert target_ranks(scores, np.array([1, 0])).tolist() == [2, 2]
    assert target_ranks(scores, np.array([1, 0]), mask).tolist() == [0, 1]


def test_masked_target_and_nan_are_rejected():
    scores = np.array([[0.1, 0.2], [0.3, 0.4]])
    seen = np.array([[False, True], [True, False]])  # row 1 masks its own target (item 0)
    with pytest.raises(ValueError, match="user row 1"):
        target_ranks(scores, np.array([0, 0]), seen)
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(np.array([[0.1, np.nan]]), np.array([0]))
    with pytest.raises(ValueError, match="out of range"):
        target_ranks(scores, np.array([0, 2]))


def test_target_ranks_match_brute_force_on_random_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 5, size=(7, 30)).astype(np.float32)  # many ties
        targets = rng.integers(0, 30, size=7)
        seen = rng.random((7, 30)) < 0.3
        seen[np.arange(7), targets] = False
        expected = [
            sum(1 for i in range(30) if i != t and not seen[u, i] and scores[u, i] >= scores[u, t])
            for u, t in enumerate(targets)
        ]
        assert target_ranks(scores, targets, seen).tolist() == expected
        assert target_ranks(scores, targets, sp.csr_array(seen)).tolist() == expected


def test_a_model_that_scores_the_true_item_first_is_perfect():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(50, 200))
    targets = rng.integers(0, 200, size=50)
    seen = rng.random((50, 200)) < 0.2
    seen[np.arange(50), targets] = False
    unseen_best = np.where(seen, -np.inf, scores).max(axis=1)
    scores[np.arange(50), targets] = unseen_best + 1.0
    # Seen items may still outscore the target: the mask must keep them out of the ranking.
    scores[seen] = 100.0
    m = ranking_metrics(target_ranks(scores, targets, seen))
    assert m["ndcg@10"] == 1.0
    assert m["hr@10"] == 1.0
    assert m["mrr"] == 1.0
    assert m["num_users"] == 50


# --- ranking_metrics / MetricAccumulator --------------------------------------------------------


def test_ranking_metrics_hand_computed():
    ranks = np.array([0, 3, 9, 10, 60])
    m = ranking_metrics(ranks, ks=(5, 10))
    n = 5
    assert m["ndcg@5"] == pytest.approx((1 / math.log2(2) + 1 / math.log2(5)) / n)
    assert m["ndcg@10"] == pytest.approx(
        (1 / math.log2(2) + 1 / math.log2(5) + 1 / math.log2(11)) / n
    )
    assert m["hr@5"] == pytest.approx(2 / n)
    assert m["hr@10"] == pytest.approx(3 / n)
    assert m["recall@5"] == m["hr@5"]
    assert m["recall@10"] == m["hr@10"]
    assert m["mrr@5"] == pytest.approx((1 + 1 / 4) / n)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 4 + 1 / 10) / n)
    assert m["mrr"] == pytest.approx((1 + 1 / 4 + 1 / 10 + 1 / 11 + 1 / 61) / n)
    assert m["num_users"] == 5
    assert set(m) == {
        f"{name}@{k}" for name in ("ndcg", "hr", "mrr", "recall") for k in (5, 10)
    } | {"mrr", "num_users"}


def test_default_ks_and_bad_input():
    m = ranking_metrics(np.array([0]))
    assert {"ndcg@5", "ndcg@10", "ndcg@20", "ndcg@50"} <= set(m)
    with pytest.raises(ValueError):
        ranking_metrics(np.array([], dtype=np.int64))
    with pytest.raises(ValueError):
        ranking_metrics(np.array([-1, 2]))
    with pytest.raises(ValueError):
        ranking_metrics(np.array([0.5]))


def test_accumulator_over_batches_equals_one_shot():
    rng = np.random.default_rng(2)
    ranks = rng.integers(0, 500, size=1000)
    one_shot = ranking_metrics(ranks)
    acc = MetricAccumulator()
    for part in np.split(ranks, [1, 17, 400, 401, 999]):
        acc.update(part)
    assert acc.result() == one_shot
    # Two workers' accumulators merged give the same too.
    left, right = MetricAccumulator().update(ranks[:300]), MetricAccumulator().update(ranks[300:])
    assert left.merge(right).result() == one_shot
    with pytest.raises(ValueError):
        MetricAccumulator().result()


# --- top_k --------------------------------------------------------------------------------------


def test_top_k_orders_by_score_then_item_index_and_skips_seen():
    scores = np.array([[0.3, 0.9, 0.9, 0.1, 0.9]])
    assert top_k(scores, 3).tolist() == [[1, 2, 4]]  # three-way tie: lower index first
    seen = np.array([[False, False, True, False, False]])
    assert top_k(scores, 3, seen).tolist() == [[1, 4, 0]]  # item 2 never appears
    assert top_k(scores, 3, sp.csr_matrix(seen)).tolist() == [[1, 4, 0]]


def test_top_k_matches_a_full_stable_sort():
    rng = np.random.default_rng(3)
    for _ in range(20):
        scores = rng.integers(0, 4, size=(6, 25)).astype(np.float64)
        scores[rng.random(scores.shape) < 0.1] = -np.inf
        seen = rng.random(scores.shape) < 0.3
        k = int(rng.integers(1, 10))
        got = top_k(scores, k, seen)
        for u in range(6):
            ranked = [i for i in np.argsort(-scores[u], kind="stable") if not seen[u, i]]
            assert got[u].tolist() == ranked[:k]


def test_top_k_rejects_users_with_too_few_unseen_items():
    with pytest.raises(ValueError, match="user row 1"):
        top_k(np.zeros((2, 3)), 2, np.array([[False] * 3, [True, True, False]]))


# --- sampled protocol ---------------------------------------------------------------------------


def test_sampled_ranks_pessimistic():
    target = np.array([0.5, 0.9])
    negatives = np.array([[0.7, 0.5, 0.1], [0.1, 0.2, 0.3]])  # 0.7 above, 0.5 ties -> rank 2
    assert sampled_ranks(target, negatives).tolist() == [2, 0]


# --- multi-positive -----------------------------------------------------------------------------


def test_multi_positive_hand_computed():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    positives = np.array([[False, True, False, True, False]])
    seen = np.array([[True, False, False, False, False]])
    # Unseen order: item1 (pos), item2, item3 (pos), item4 -> positives at positions 0 and 2.
    m = multi_positive_metrics(scores, positives, seen, ks=(1, 3))
    assert m["recall@1"] == pytest.approx(1 / 2)
    assert m["recall@3"] == pytest.approx(2 / 2)
    assert m["ndcg@1"] == pytest.approx(1.0)  # ideal with min(2, 1) = 1 relevant item
    assert m["ndcg@3"] == pytest.approx(
        (1 / math.log2(2) + 1 / math.log2(4)) / (1 / math.log2(2) + 1 / math.log2(3))
    )
    assert m["hr@1"] == 1.0
    assert m["num_users"] == 1


def test_multi_positive_ties_put_negatives_first():
    scores = np.array([[0.5, 0.5, 0.5, 0.1]])
    positives = np.array([[False, True, True, False]])
    # Pessimistic order: item0 (neg), then the two positives -> positions 1 and 2.
    m = multi_positive_metrics(scores, positives, ks=(1, 2))
    assert m["recall@1"] == 0.0
    assert m["recall@2"] == pytest.approx(1 / 2)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3)) / (1 / math.log2(2) + 1 / math.log2(3)))


def test_multi_positive_with_one_positive_equals_ranking_metrics():
    rng = np.random.default_rng(4)
    scores = rng.integers(0, 6, size=(40, 60)).astype(np.float64)
    targets = rng.integers(0, 60, size=40)
    seen = rng.random(scores.shape) < 0.25
    seen[np.arange(40), targets] = False
    positives = np.zeros(scores.shape, dtype=bool)
    positives[np.arange(40), targets] = True
    single = ranking_metrics(target_ranks(scores, targets, seen))
    multi = multi_positive_metrics(scores, positives, seen)
    for key in multi:
        assert multi[key] == pytest.approx(single[key]), key


def test_multi_positive_rejects_seen_or_missing_positives():
    scores = np.zeros((2, 3))
    with pytest.raises(ValueError, match="user row 1"):
        multi_positive_metrics(scores, np.array([[True, False, False], [False] * 3]))
    with pytest.raises(ValueError, match="user row 0"):
        multi_positive_metrics(
            scores,
            np.array([[True, False, False]] * 2),
            np.array([[True, False, False], [False] * 3]),
        )


# --- AUC ----------------------------------------------------------------------------------------


def test_auc_hand_computed_with_a_tie():
    # Pairs (pos, neg): (0.8, 0.8) tie = 0.5, (0.8, 0.1) = 1, (0.3, 0.8) = 0, (0.3, 0.1) = 1.
    assert auc(np.array([1, 0, 1, 0]), np.array([0.8, 0.8, 0.3, 0.1])) == pytest.approx(2.5 / 4)


def test_auc_matches_brute_force_and_sklearn_with_ties():
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
    rng = np.random.default_rng(5)
    for _ in range(50):
        n = int(rng.integers(2, 60))
        labels = rng.random(n) < rng.uniform(0.1, 0.9)
        labels[:2] = [True, False]  # both classes present
        scores = rng.integers(0, 8, size=n).astype(np.float64)  # heavy ties
        pos, neg = scores[labels], scores[~labels]
        brute = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
        assert auc(labels, scores) == pytest.approx(brute, abs=1e-12)
        assert auc(labels.astype(int), scores) == pytest.approx(
            roc_auc_score(labels, scores), abs=1e-12
        )


def test_auc_needs_both_classes():
    with pytest.raises(ValueError):
        auc(np.array([1, 1]), np.array([0.1, 0.2]))
