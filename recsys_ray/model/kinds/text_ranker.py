"""Text ranker (cross-encoder): ``[CLS] context [SEP] candidate [SEP]`` -> CLS vector -> one logit.

``model.kind: ranker`` (``history: text``). The most accurate per pair and one encoder pass per
(user, candidate), so it reranks a short list. Trains from ``examples/split=train``: each row's
positive and its prepared negatives become pairs with the same context; every loss reads the
(B, 1 + K) logits with column 0 the positive. Validation is the labelled *sampled* protocol
(1 positive + ``ranker_candidates - 1`` unseen items): ranking the whole catalogue would take one
pass per item and user.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from recsys_ray.data import layout
from recsys_ray.data.catalogue import Catalogue
from recsys_ray.evaluate.metrics import sample_unseen, sampled_ranks
from recsys_ray.model import losses
from recsys_ray.model.base import (
    Batch,
    BertRecommender,
    ExampleCandidates,
    InputSettings,
    TrainSettings,
    ValidationSettings,
    cut_contexts,
    ordered_chunks,
    pad_rows,
)

log = logging.getLogger(__name__)


def build_pair_batch(
    context_ids: Sequence[Sequence[int]],
    item_ids: Sequence[Sequence[int]],
    special: tuple[int, int, int],
    max_length: int | None = None,
) -> Batch:
    """Ranker inputs ``[CLS] ctx [SEP] item [SEP]``, padded to the longest row.

    Same ids as ``tokenizer(ctx_text, item_text, truncation="only_first", max_length=...)``: only
    the context is cut, from its end (the oldest history). If even an empty context cannot fit the
    item, the item is cut too (with a warning) rather than failing a training step.
    """
    if len(context_ids) != len(item_ids):
        raise ValueError(f"{len(context_ids)} contexts but {len(item_ids)} items")
    if max_length is not None and max_length < 3:
        raise ValueError(f"max_length must be >= 3 for pairs, got {max_length}")
    cls_id, sep_id, pad_id = special
    rows, first_lengths = [], []
    cut_items = 0
    for ctx, item in zip(context_ids, item_ids, strict=True):
        ctx, item = np.asarray(ctx, dtype=np.int64), np.asarray(item, dtype=np.int64)
        if max_length is not None:
            excess = len(ctx) + len(item) + 3 - max_length
            if excess > 0:
                cut = min(excess, len(ctx))
                ctx = ctx[: len(ctx) - cut]
                if excess > cut:
                    item = item[: len(item) - (excess - cut)]
                    cut_items += 1
        rows.append(np.concatenate([[cls_id], ctx, [sep_id], item, [sep_id]]))
        first_lengths.append(len(ctx) + 2)  # [CLS] ctx [SEP] is segment 0
    if cut_items:
        log.warning("max_length=%d cannot fit %d candidate(s) even with an empty context; cut them",
                    max_length, cut_items)
    return pad_rows(rows, first_lengths, pad_id)


class PairCollator:
    """Examples -> (context, candidate) pairs of one micro-batch (dynamic padding)."""

    def __init__(self, catalogue: Catalogue, special: tuple[int, int, int], settings: TrainSettings, seed: int):
        self.items, self.special, self.max_ctx = catalogue, special, settings.max_context_tokens
        self.candidates = ExampleCandidates(catalogue, settings.negatives, seed)

    def __call__(self, rows: list[dict]) -> Batch:
        ctx = cut_contexts(rows, self.max_ctx)
        cands = [self.candidates(r) for r in rows]  # (B, 1 + K) catalogue rows
        pairs = build_pair_batch(
            [c for c, cs in zip(ctx, cands, strict=True) for _ in cs],
            [self.items.tokens[i] for cs in cands for i in cs],
            self.special,
        )
        out: Batch = {"candidates": torch.tensor(cands, dtype=torch.long)}
        out.update({f"pair_{k}": v for k, v in pairs.items()})
        # non-padding tokens the encoder processes: the context is encoded once per pair
        n_tokens = sum((len(c) + 3) * len(cs) + sum(len(self.items.tokens[i]) for i in cs)
                       for c, cs in zip(ctx, cands, strict=True))
        out["tokens"] = torch.tensor(n_tokens)
        return out


class TextRanker(BertRecommender):
    """Cross-encoder over the text context: ``Linear(H, 1)`` on the CLS vector."""

    kind = "ranker"
    history = "text"
    train_part = layout.split_part("train")
    bucket_key = "context_ids"

    def _add_head(self, hidden: int) -> None:
        self.dropout = nn.Dropout(self.cfg.dropout)
        self.head = nn.Linear(hidden, 1)
        nn.init.normal_(self.head.weight, std=self.encoder.config.initializer_range)  # BERT's head init
        nn.init.zeros_(self.head.bias)

    def forward_pairs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One logit per ``[CLS] context [SEP] candidate [SEP]`` row -> (B,)."""
        h = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state  # (B, L, H)
        cls_vec = self.dropout(h[:, 0])  # (B, H)
        return self.head(cls_vec).squeeze(-1)  # (B,)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward_pairs` (call the model under DDP so gradients synchronise)."""
        return self.forward_pairs(input_ids, attention_mask, token_type_ids)

    # --- training --------------------------------------------------------------------------------

    @classmethod
    def train_rows(cls, manifest: dict) -> tuple[int, str]:
        return manifest["counts"]["examples_by_split"]["train"], "train examples"

    def collator(self, catalogue, special, settings: TrainSettings, tokenizer, rank: int):
        return PairCollator(catalogue, special, settings, settings.seed + rank)

    def train_scores(self, batch: Batch) -> tuple[torch.Tensor, None]:
        b, n = batch["candidates"].shape
        logits = self.forward_pairs(batch["pair_input_ids"], batch["pair_attention_mask"], batch["pair_token_type_ids"])
        return logits.view(b, n), None  # (B, 1 + K)

    def train_loss(self, loss: str, scores: torch.Tensor, extra, batch: Batch) -> torch.Tensor:
        return losses.compute_loss(loss, scores)

    @torch.no_grad()
    def validation_ranks(self, rows, catalogue, special, device, settings: ValidationSettings) -> tuple[list[int], str]:
        n = settings.ranker_candidates
        ranks = []
        for r in rows:
            pos = catalogue.index[r["target_item_id"]]
            seen = {catalogue.index[i] for i in r["seen_item_ids"]} | {pos}
            negs = sample_unseen(r["user_id"], np.fromiter(seen, dtype=np.int64), len(catalogue), n - 1, settings.seed)
            cands = [pos, *negs.tolist()]
            ctx = list(r["context_ids"])[: settings.max_context_tokens or None]
            scores = []
            for s in range(0, len(cands), settings.batch_size):
                part = cands[s : s + settings.batch_size]
                b = build_pair_batch([ctx] * len(part), [catalogue.tokens[i] for i in part], special)
                scores.append(self.forward_pairs(*(b[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids"))).float().cpu())
            sc = torch.cat(scores).numpy()
            ranks.append(int(sampled_ranks(sc[:1], sc[None, 1:])[0]))
        return ranks, f"sampled_1+{n - 1}"

    # --- predictor side ------------------------------------------------------------------------

    def context_ids(self, rows, profile_ids, catalogue, inputs: InputSettings) -> list[int]:
        recent = list(rows)[::-1][: inputs.max_history]
        return inputs.context_encoder.encode(profile_ids, [catalogue.tokens[i] for i in recent])

    @torch.no_grad()
    def score_pairs(self, contexts: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]],
                    special: tuple[int, int, int], device, batch_size: int, max_context_tokens: int) -> np.ndarray:
        """Logits (P,) for pairs (contexts[p], candidates[p]), in the given order; sorted by length
        into batches of ``batch_size`` pairs so padding stays small."""
        if len(contexts) != len(candidates):
            raise ValueError(f"{len(contexts)} contexts but {len(candidates)} candidates")
        out = np.empty(len(contexts), dtype=np.float32)
        lengths = [len(c) + len(i) for c, i in zip(contexts, candidates, strict=True)]
        for idx in ordered_chunks(lengths, batch_size):
            b = build_pair_batch([list(contexts[i])[:max_context_tokens] for i in idx], [candidates[i] for i in idx], special)
            logits = self.forward_pairs(*(b[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids")))
            out[idx] = logits.float().cpu().numpy()
        return out
