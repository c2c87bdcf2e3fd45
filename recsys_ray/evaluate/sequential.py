"""Sequential baselines: they read each user's history in time order, as the BERT models do.

- **Markov**: first-order item-to-item transitions counted over train sequences,
  ``P(j | last item)``, with a back-off: the transitions of earlier history items (weights
  ``decay ** age``) and popularity (weight ``backoff``) fill in where the last item says little.
- **SASRec** (Kang & McAuley 2018) trained with full softmax cross-entropy over the catalogue at
  every position ("SASRec+", Klenitskiy & Vasilev, RecSys 2023): causal self-attention over item
  ids, early-stopped on validation NDCG@10. Plain PyTorch: a baseline, not a model kind.

Both take sequences of item *indices* (``ItemIndex`` order) and return (U, I) scores that go
through the same metric code as every other row (:mod:`recsys_ray.evaluate.metrics`). Their
knobs are chosen on the validation split only (``tune_*``); the test split never is looked at.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import scipy.sparse as sp

from recsys_ray.evaluate.metrics import MetricAccumulator, target_ranks

logger = logging.getLogger(__name__)

Seqs = Sequence[np.ndarray]  # one int array of item indices per user, oldest first


def _history_mask(histories: Seqs, num_items: int) -> sp.csr_matrix:
    lengths = np.fromiter((len(h) for h in histories), np.int64, len(histories))
    cols = np.concatenate([np.asarray(h, np.int64) for h in histories]) if len(histories) else np.zeros(0, np.int64)
    rows = np.repeat(np.arange(len(histories)), lengths)
    m = sp.csr_matrix((np.ones(cols.size, bool), (rows, cols)), shape=(len(histories), num_items))
    m.sum_duplicates()
    return m


def ndcg10(scores: np.ndarray, targets: np.ndarray, histories: Seqs, mask: sp.csr_matrix | None = None) -> float:
    """Validation NDCG@10 of (U, I) scores, each user's history masked (the protocol); ``mask``:
    the histories' mask when the caller scores the same users many times."""
    if mask is None:
        mask = _history_mask(histories, scores.shape[1])
    ranks = target_ranks(scores, np.asarray(targets, np.int64), mask)
    return MetricAccumulator(ks=(10,)).update(ranks).result()["ndcg@10"]


# --- Markov --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MarkovParams:
    decay: float = 0.0  # weight of the k-th item back in the history: decay ** k (0: the last only)
    backoff: float = 0.1  # weight of popularity (a distribution, like each transition row)
    window: int = 10  # history items whose transitions count (when decay > 0)


MARKOV_GRID: tuple[MarkovParams, ...] = tuple(
    MarkovParams(decay=d, backoff=b, window=w) for d in (0.0, 0.3, 0.6, 0.8, 0.9) for b in (0.01, 0.1, 0.5)
    for w in ((10,) if d == 0 else (10, 30)))


class Markov:
    """Order-1 transition model with back-off, fitted on sequences of item indices."""

    def __init__(self, sequences: Seqs, num_items: int, params: MarkovParams = MarkovParams()):
        self.params, self.num_items = params, num_items
        src = np.concatenate([np.asarray(s[:-1], np.int64) for s in sequences if len(s) > 1] or [np.zeros(0, np.int64)])
        dst = np.concatenate([np.asarray(s[1:], np.int64) for s in sequences if len(s) > 1] or [np.zeros(0, np.int64)])
        counts = sp.csr_matrix((np.ones(src.size), (src, dst)), shape=(num_items, num_items))
        counts.sum_duplicates()
        out = np.asarray(counts.sum(axis=1)).ravel()
        self.transitions = sp.diags(1.0 / np.maximum(out, 1.0)) @ counts  # rows: P(next | item)
        pop = np.bincount(np.concatenate([np.asarray(s, np.int64) for s in sequences] or [np.zeros(0, np.int64)]),
                          minlength=num_items).astype(np.float64)
        self.popularity = pop / max(pop.sum(), 1.0)

    def with_params(self, params: MarkovParams) -> Markov:
        """The same fitted counts, other knobs (a grid search fits once)."""
        other = copy.copy(self)
        other.params = params
        return other

    def scores(self, histories: Seqs) -> np.ndarray:
        """(U, I) scores: decayed transition rows of the last items plus the popularity back-off."""
        p = self.params
        depth = 1 if p.decay == 0 else p.window
        rows, cols, weights = [], [], []
        for u, h in enumerate(histories):
            recent = np.asarray(h[-depth:], np.int64)[::-1]  # the last item first
            rows.append(np.full(recent.size, u))
            cols.append(recent)
            weights.append(p.decay ** np.arange(recent.size))  # decay 0: depth 1, weight 0 ** 0 = 1
        W = sp.csr_matrix((np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(len(histories), self.num_items))
        return np.asarray((W @ self.transitions).todense()) + p.backoff * self.popularity[None, :]


def tune_markov(train: Seqs, valid_histories: Seqs, valid_targets: np.ndarray, num_items: int,
                grid: Sequence[MarkovParams] = MARKOV_GRID) -> tuple[MarkovParams, dict[str, float]]:
    """The grid point with the best validation NDCG@10: fitted on ``train``, scoring the
    validation users' histories (their train sequences) against their validation items."""
    base, mask = Markov(train, num_items), _history_mask(valid_histories, num_items)
    curve = {}
    for params in grid:
        curve[_key(params)] = ndcg10(base.with_params(params).scores(valid_histories), valid_targets, valid_histories, mask)
    best = max(grid, key=lambda p: curve[_key(p)])  # first maximum on ties
    return best, curve


def _key(params) -> str:
    return ",".join(f"{k}={v}" for k, v in asdict(params).items())


# --- SASRec --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SASRecParams:
    max_len: int = 50  # the last items of a history the model reads
    hidden: int = 64
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 128
    max_epochs: int = 200
    eval_every: int = 5  # epochs between validations
    patience: int = 6  # validations without improvement before stopping (validation is noisy: +-0.005)
    seed: int = 0
    max_seconds: float = 600.0  # a wall-clock cap on training (the best epoch so far is kept)


# max_len 200 (SASRec's ML-1M setting) was tried on MovieLens-100K: 4x the time per epoch (4.2 s vs
# 1 s on 2 cores) and no better on validation (0.093 at its best epoch vs 0.096 for 50)
SASREC_GRID: tuple[SASRecParams, ...] = tuple(SASRecParams(max_len=50, dropout=d) for d in (0.2, 0.5))


def _sasrec_module(num_items: int, p: SASRecParams):
    import torch
    from torch import nn

    class SASRec(nn.Module):
        def __init__(self):
            super().__init__()
            self.item = nn.Embedding(num_items + 1, p.hidden, padding_idx=0)  # index 0: padding
            self.pos = nn.Embedding(p.max_len, p.hidden)
            layer = nn.TransformerEncoderLayer(p.hidden, p.heads, dim_feedforward=p.hidden, dropout=p.dropout,
                                               activation="gelu", batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, p.blocks, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(p.hidden)
            self.drop = nn.Dropout(p.dropout)
            nn.init.normal_(self.item.weight, std=0.02)
            with torch.no_grad():
                self.item.weight[0].zero_()

        def forward(self, seq):  # (B, L) item index + 1, left-padded with 0 -> (B, L, hidden)
            B, L = seq.shape
            x = self.item(seq) * math.sqrt(p.hidden) + self.pos.weight[None, -L:]
            # causal, padded keys hidden; a position always sees itself (no all-masked row)
            masked = torch.ones(L, L, dtype=torch.bool).triu(1)[None] | (seq == 0)[:, None, :]
            masked &= ~torch.eye(L, dtype=torch.bool)[None]
            masked = masked.repeat_interleave(p.heads, dim=0)
            return self.norm(self.encoder(self.drop(x), mask=masked))

        def logits(self, h):  # (..., hidden) -> (..., num_items): tied item embeddings, pad dropped
            return h @ self.item.weight[1:].T

    return SASRec()


def _left_pad(seqs: Seqs, length: int) -> np.ndarray:
    out = np.zeros((len(seqs), length), np.int64)
    for u, s in enumerate(seqs):
        s = np.asarray(s[-length:], np.int64) + 1
        if s.size:
            out[u, -s.size:] = s
    return out


class SASRec:
    """Trains on train sequences (next item at every position, full softmax), keeps the weights
    of the best validation epoch; :meth:`scores` reads any histories."""

    def __init__(self, num_items: int, params: SASRecParams = SASRecParams()):
        self.num_items, self.params = num_items, params
        self.best_ndcg, self.best_epoch, self.epochs_run, self.seconds = -1.0, 0, 0, 0.0
        self.model = None

    def fit(self, train: Seqs, valid_histories: Seqs | None = None, valid_targets: np.ndarray | None = None) -> SASRec:
        """Early-stopped on validation NDCG@10 (the best epoch's weights kept); without
        validation data exactly ``max_epochs`` epochs (a refit for a number chosen before)."""
        import torch

        p = self.params
        torch.manual_seed(p.seed)
        rng = np.random.default_rng(p.seed)
        self.model = model = _sasrec_module(self.num_items, p)
        opt = torch.optim.Adam(model.parameters(), lr=p.lr)
        seqs = [np.asarray(s, np.int64) for s in train if len(s) > 1]
        windows = torch.from_numpy(_left_pad(seqs, p.max_len + 1))  # input [:-1], next item [1:]
        mask = None if valid_histories is None else _history_mask(valid_histories, self.num_items)
        best_state, bad, t0 = None, 0, time.perf_counter()
        for epoch in range(1, p.max_epochs + 1):
            model.train()
            for idx in np.array_split(rng.permutation(len(seqs)), max(1, math.ceil(len(seqs) / p.batch_size))):
                batch = windows[torch.from_numpy(idx)]
                inp, nxt = batch[:, :-1], batch[:, 1:]
                keep = (nxt > 0) & (inp > 0)
                h = model(inp)[keep]
                loss = torch.nn.functional.cross_entropy(model.logits(h), nxt[keep] - 1)
                opt.zero_grad()
                loss.backward()
                opt.step()
            self.epochs_run = epoch
            out_of_time = time.perf_counter() - t0 > p.max_seconds
            if valid_histories is None:
                if out_of_time:
                    break
                continue
            if epoch % p.eval_every == 0 or epoch == p.max_epochs or out_of_time:
                score = ndcg10(self.scores(valid_histories), valid_targets, valid_histories, mask)
                logger.info("SASRec %s epoch %d valid ndcg@10=%.4f", _key(p), epoch, score)
                if score > self.best_ndcg:
                    self.best_ndcg, self.best_epoch, bad = score, epoch, 0
                    best_state = {k: v.clone() for k, v in model.state_dict().items()}
                else:
                    bad += 1
                if bad >= p.patience or out_of_time:
                    break
        if best_state is not None:
            model.load_state_dict(best_state)
        self.seconds = time.perf_counter() - t0
        return self

    def scores(self, histories: Seqs, batch_size: int = 256) -> np.ndarray:
        """(U, I) scores of the next item after each history (the last position's logits)."""
        import torch

        self.model.eval()
        inp = torch.from_numpy(_left_pad(histories, self.params.max_len))
        out = []
        with torch.no_grad():
            for start in range(0, len(inp), batch_size):
                out.append(self.model.logits(self.model(inp[start:start + batch_size])[:, -1]).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.num_items), np.float32)


@dataclass(frozen=True)
class SequentialSettings:
    """Which sequential rows :func:`recsys_ray.evaluate.baselines.baseline_ranks` adds."""

    markov: bool = True
    sasrec_seeds: int = 3  # 0: no SASRec row; else the grid is chosen with seed 0, reported over seeds 1..N
    sasrec_grid: tuple[SASRecParams, ...] = SASREC_GRID
    # each reported seed: early-stopped on validation, then (refit) trained again on everything
    # before the test event for its best epoch count, as EASE and Markov are refitted
    sasrec_refit: bool = True

    def problems(self) -> list[str]:
        out = []
        if self.sasrec_seeds < 0:
            out.append(f"sasrec_seeds must be >= 0, got {self.sasrec_seeds}")
        if self.sasrec_seeds and not self.sasrec_grid:
            out.append("sasrec_grid is empty")
        return out


def tune_sasrec(train: Seqs, valid_histories: Seqs, valid_targets: np.ndarray, num_items: int,
                grid: Sequence[SASRecParams] = SASREC_GRID, seed: int = 0) -> tuple[SASRec, dict[str, dict]]:
    """Fit every grid point (with ``seed``); the fitted model of the best validation NDCG@10."""
    fitted, curve = [], {}
    for params in grid:
        m = SASRec(num_items, replace(params, seed=seed)).fit(train, valid_histories, valid_targets)
        curve[_key(params)] = {"valid_ndcg@10": round(m.best_ndcg, 5), "best_epoch": m.best_epoch,
                               "epochs": m.epochs_run, "seconds": round(m.seconds, 1)}
        fitted.append(m)
    return max(fitted, key=lambda m: m.best_ndcg), curve
