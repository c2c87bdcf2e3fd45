"""Every loss against a value worked out by hand (math.log / math.exp, not the same formula)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recsys_ray.errors import ConfigError
from recsys_ray.model.losses import (
    LOSSES,
    bce,
    bpr,
    compute_loss,
    in_batch_softmax,
    lambdarank,
    softmax,
)


def softplus(x: float) -> float:
    """log(1 + e^x): the logistic loss of a margin -x."""
    return math.log(1.0 + math.exp(x))


def close(t: torch.Tensor, expected: float) -> None:
    assert t.dim() == 0
    assert t.item() == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_bce_is_the_mean_logistic_loss_of_every_score():
    scores = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    labels = torch.tensor([[1, 0], [0, 1]])
    # label 1: -log sigmoid(s) = log(1 + e^-s); label 0: -log(1 - sigmoid(s)) = log(1 + e^s)
    expected = (softplus(-2.0) + softplus(-1.0) + softplus(0.5) + softplus(-3.0)) / 4
    close(bce(scores, labels), expected)


def test_softmax_is_the_cross_entropy_of_the_positive_column():
    scores = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    e = math.e
    row0 = math.log(e**2 + e + 1) - 2.0  # -log(e^2 / (e^2 + e^1 + e^0))
    row1 = math.log(1 + e + 1) - 0.0
    close(softmax(scores), (row0 + row1) / 2)
    # another column as the positive, for every row or per row
    close(softmax(scores, positive_index=1), ((math.log(e**2 + e + 1) - 1) + (math.log(2 + e) - 1)) / 2)
    close(softmax(scores, positive_index=torch.tensor([0, 1])), (row0 + (math.log(2 + e) - 1)) / 2)


def test_bpr_averages_the_pairwise_loss_over_negatives_and_rows():
    scores = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, -1.0]])
    # -log sigmoid(pos - neg) = log(1 + e^-(pos - neg)); margins: 1, 2 | -1, 1
    expected = (softplus(-1.0) + softplus(-2.0) + softplus(1.0) + softplus(-1.0)) / 4
    close(bpr(scores), expected)


def test_lambdarank_weights_each_pair_by_its_ndcg_change():
    scores = torch.tensor([[0.5, 2.0, 1.0]])
    labels = torch.tensor([[2.0, 0.0, 1.0]])
    # ranks by score: col1 -> 1, col2 -> 2, col0 -> 3; gains 2^l - 1: col0 3, col1 0, col2 1
    d1, d2, d3 = 1.0, 1.0 / math.log2(3), 1.0 / math.log2(4)
    idcg = 3 * d1 + 1 * d2 + 0 * d3  # ideal order: col0, col2, col1
    # pairs with labels[i] > labels[j]: (col0, col1), (col0, col2), (col2, col1)
    pair_01 = abs(3 - 0) * abs(d3 - d1) / idcg * softplus(-(0.5 - 2.0))
    pair_02 = abs(3 - 1) * abs(d3 - d2) / idcg * softplus(-(0.5 - 1.0))
    pair_21 = abs(1 - 0) * abs(d2 - d1) / idcg * softplus(-(1.0 - 2.0))
    close(lambdarank(scores, labels), pair_01 + pair_02 + pair_21)


def test_lambdarank_binary_rows_average_and_push_the_positive_up():
    scores = torch.tensor([[1.0, 2.0, 0.0], [0.3, 0.2, 0.1]], requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # row 0: positive col0 at rank 2, negatives at ranks 1 and 3; IDCG = 1 (gain 1 at rank 1)
    d1, d2, d3 = 1.0, 1.0 / math.log2(3), 1.0 / math.log2(4)
    row0 = abs(d2 - d1) * softplus(-(1.0 - 2.0)) + abs(d2 - d3) * softplus(-(1.0 - 0.0))
    row1 = 0.0  # no relevant item: no pairs
    loss = lambdarank(scores, labels)
    close(loss, (row0 + row1) / 2)
    loss.backward()
    assert scores.grad[0, 0] < 0 < scores.grad[0, 1]  # descent raises the positive, lowers the negative
    assert torch.all(scores.grad[1] == 0)


def test_in_batch_softmax_masks_accidental_positives():
    # users 0 and 2 share their positive item 10; the sampled negative (column 3) is item 20,
    # user 1's positive
    scores = torch.tensor(
        [
            [2.0, 1.0, 0.5, 0.0],
            [0.3, 1.5, -0.2, 0.7],
            [1.0, 0.0, 0.2, -1.0],
        ]
    )
    positives = torch.tensor([10, 20, 10])
    negatives = torch.tensor([20])
    e = math.exp
    row0 = math.log(e(2.0) + e(1.0) + e(0.0)) - 2.0  # column 2 (item 10 again) masked
    row1 = math.log(e(0.3) + e(1.5) + e(-0.2)) - 1.5  # column 3 (item 20 again) masked
    row2 = math.log(e(1.0 - 1.0) + e(0.2) + e(-1.0)) - 0.2  # column 0 (item 10 again) masked
    loss = in_batch_softmax(scores, positives, negatives)
    close(loss, (row0 + row1 + row2) / 3)
    assert loss.item() != pytest.approx(F.cross_entropy(scores, torch.arange(3)).item())

    # a seen mask removes more columns, but never a row's own target
    seen = torch.zeros(3, 4, dtype=torch.bool)
    seen[0, 1] = True
    seen[1, 1] = True
    row0_seen = math.log(e(2.0) + e(0.0)) - 2.0
    close(in_batch_softmax(scores, positives, negatives, seen=seen), (row0_seen + row1 + row2) / 3)


def test_in_batch_softmax_without_extra_negatives_is_plain_cross_entropy_when_items_differ():
    scores = torch.tensor([[1.0, 0.0], [0.5, 2.0]])
    e = math.exp
    expected = ((math.log(e(1.0) + e(0.0)) - 1.0) + (math.log(e(0.5) + e(2.0)) - 2.0)) / 2
    close(in_batch_softmax(scores, torch.tensor([1, 2])), expected)
    with pytest.raises(ValueError, match="negative ids"):
        in_batch_softmax(scores, torch.tensor([1, 2]), torch.tensor([3]))


def test_compute_loss_puts_the_positive_in_column_zero():
    scores = torch.tensor([[1.0, 2.0, 0.0]])
    e = math.exp
    d1, d2, d3 = 1.0, 1.0 / math.log2(3), 1.0 / math.log2(4)
    expected = {
        "bce": (softplus(-1.0) + softplus(2.0) + softplus(0.0)) / 3,
        "softmax": math.log(e(1.0) + e(2.0) + e(0.0)) - 1.0,
        "bpr": (softplus(-(1.0 - 2.0)) + softplus(-(1.0 - 0.0))) / 2,
        "lambdarank": abs(d2 - d1) * softplus(1.0) + abs(d2 - d3) * softplus(-1.0),
    }
    assert set(expected) == set(LOSSES)
    for name, value in expected.items():
        close(compute_loss(name, scores), value)
    # graded labels reach lambdarank
    graded = torch.tensor([[2.0, 0.0, 1.0]])
    close(compute_loss("lambdarank", scores, graded), lambdarank(scores, graded).item())
    with pytest.raises(ConfigError, match="loss must be one of"):
        compute_loss("hinge", scores)
