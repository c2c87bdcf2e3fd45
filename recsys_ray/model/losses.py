"""Ranking losses over model scores (logits or scaled similarities).

Shapes: B rows (users / contexts), N candidates per row. In the common training layout a row is
``[positive, negative_1, ..., negative_K]`` (N = 1 + K), which :func:`compute_loss` assumes.
Losses are computed in float32 whatever the autocast dtype of the scores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from recsys_ray.errors import ConfigError


def bce(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pointwise: mean binary cross-entropy of every score (a logit) against its 0/1 label."""
    return F.binary_cross_entropy_with_logits(scores.float(), labels.to(scores.device).float())


def softmax(scores: torch.Tensor, positive_index: int | torch.Tensor = 0) -> torch.Tensor:
    """Listwise: mean over rows of -log softmax(row)[positive]; (B, N) -> scalar.

    ``positive_index`` is one column for every row, or a (B,) tensor of columns.
    """
    _check_rows(scores)
    target = torch.as_tensor(positive_index, dtype=torch.long, device=scores.device)
    target = target.expand(scores.shape[0]) if target.dim() == 0 else target  # (B,)
    return F.cross_entropy(scores.float(), target)


def in_batch_softmax(
    scores: torch.Tensor,
    positive_item_ids: torch.Tensor,
    negative_item_ids: torch.Tensor | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Retriever loss: each user against every item vector of the batch.

    ``scores`` (B, M): user i x column j, where columns ``0..B-1`` are the rows' positives (column i
    is user i's target) and columns ``B..M-1`` are extra sampled negatives with ids
    ``negative_item_ids`` (M - B,). Item ids are integers (e.g. catalogue row numbers).
    A column holding the same item as user i's positive (another user clicked it too, or it was
    sampled as a negative) is masked out of row i: it is not a negative, and as a "negative" it
    would push the positive's own score down. ``seen`` (B, M) bool masks further columns (items
    in the user's history); a row's own target is never masked.
    """
    _check_rows(scores)
    b, m = scores.shape
    item_ids = positive_item_ids if negative_item_ids is None else torch.cat([positive_item_ids, negative_item_ids])
    if positive_item_ids.shape != (b,) or item_ids.shape != (m,):
        raise ValueError(
            f"scores {tuple(scores.shape)} need {b} positive ids and {m - b} negative ids, "
            f"got {tuple(positive_item_ids.shape)} positive ids and {item_ids.numel()} ids in total"
        )
    target = torch.eye(b, m, dtype=torch.bool, device=scores.device)  # (B, M) row i -> column i
    masked = (item_ids.to(scores.device)[None, :] == positive_item_ids.to(scores.device)[:, None]) & ~target  # (B, M)
    if seen is not None:
        masked |= seen.to(device=scores.device, dtype=torch.bool) & ~target
    logits = scores.float().masked_fill(masked, float("-inf"))  # (B, M); target column stays finite
    return F.cross_entropy(logits, torch.arange(b, device=scores.device))


def bpr(scores: torch.Tensor) -> torch.Tensor:
    """Pairwise (BPR): mean of -log sigmoid(positive - negative) over the K negatives of each row and
    over rows; (B, 1 + K) with column 0 the positive -> scalar."""
    _check_rows(scores)
    s = scores.float()
    return -F.logsigmoid(s[:, :1] - s[:, 1:]).mean()  # (B, K) -> scalar


def lambdarank(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """LambdaRank: pairwise logistic loss weighted by the NDCG change of swapping the pair.

    For each row and each pair (i, j) with ``labels[i] > labels[j]``:
    ``|gain_i - gain_j| * |disc(rank_i) - disc(rank_j)| / IDCG * log(1 + exp(-(s_i - s_j)))`` with
    gain = 2^label - 1, disc(r) = 1 / log2(1 + r), ranks (1 = top) from the current scores (ties by
    column order) and IDCG the DCG of the ideal order. Summed over pairs, averaged over rows.
    The weights are constants (no gradient), as in LambdaMART.
    """
    _check_rows(scores)
    s = scores.float()  # (B, N)
    y = labels.to(s.device).float()  # (B, N)
    b, n = s.shape
    with torch.no_grad():
        order = torch.argsort(s, dim=1, descending=True, stable=True)  # (B, N) columns, best first
        positions = torch.arange(1, n + 1, device=s.device).expand(b, n)
        ranks = torch.empty_like(order).scatter_(1, order, positions)  # (B, N) rank of each column
        gains = torch.pow(2.0, y) - 1.0  # (B, N)
        disc = 1.0 / torch.log2(1.0 + ranks.float())  # (B, N)
        ideal_disc = 1.0 / torch.log2(1.0 + positions[0].float())  # (N,)
        idcg = (gains.sort(dim=1, descending=True).values * ideal_disc).sum(dim=1)  # (B,)
        delta = (gains[:, :, None] - gains[:, None, :]).abs() * (disc[:, :, None] - disc[:, None, :]).abs()  # (B, N, N)
        pairs = y[:, :, None] > y[:, None, :]  # (B, N, N) i should rank above j
        # a row with pairs has a label > 0, hence IDCG > 0; clamp only guards all-zero rows
        weight = torch.where(pairs, delta / idcg.clamp(min=1e-12)[:, None, None], torch.zeros_like(delta))
    diff = s[:, :, None] - s[:, None, :]  # (B, N, N) s_i - s_j
    return (weight * F.softplus(-diff)).sum(dim=(1, 2)).mean()


@dataclass(frozen=True)
class Loss:
    """A loss over (B, 1 + K) scores whose column 0 is the positive."""

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (scores, labels) -> scalar
    needs_negatives: bool  # False: it also works from in-batch or full-catalogue negatives alone


LossName = Literal["bce", "softmax", "bpr", "lambdarank"]  # what TrainConfig.loss accepts

# The one list of losses: TrainConfig, Tune's search space, the benchmarks and compute_loss read it.
LOSSES: dict[str, Loss] = {
    "bce": Loss(bce, needs_negatives=True),
    "softmax": Loss(lambda scores, labels: softmax(scores, 0), needs_negatives=False),
    "bpr": Loss(lambda scores, labels: bpr(scores), needs_negatives=True),
    "lambdarank": Loss(lambdarank, needs_negatives=True),
}
assert tuple(LOSSES) == get_args(LossName)


def compute_loss(name: str, scores: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Loss ``name`` for scores (B, 1 + K) whose column 0 is the positive.

    ``labels`` (B, 1 + K) default to 1 for column 0 and 0 elsewhere; only ``bce`` and
    ``lambdarank`` read them (graded labels, e.g. ratings, work with lambdarank).
    The retrievers' in-batch and full-catalogue forms are wired by their model kinds.
    """
    if name not in LOSSES:
        raise ConfigError([f"loss must be one of {', '.join(LOSSES)}, got {name!r}"])
    _check_rows(scores)
    if labels is None:
        labels = torch.zeros_like(scores, dtype=torch.float32)
        labels[:, 0] = 1.0
    return LOSSES[name].fn(scores, labels)


def _check_rows(scores: torch.Tensor) -> None:
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"expected scores of shape (B, N) with N >= 2 candidates, got {tuple(scores.shape)}")
