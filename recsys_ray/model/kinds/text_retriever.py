"""Text retriever (dual encoder): ``[CLS] text [SEP]`` -> mean of the token vectors -> ``Linear(H, H)``
(identity at start) -> unit length; score = dot product / temperature. Users and items share it.

``model.kind: retriever``, ``history: text``: the user is the rendered context (profile + recent
items' texts). Trains from ``examples/split=train``: each user is encoded once and each of its
candidates (positive + prepared negatives) once, in one forward call; ``softmax`` scores every
user against every candidate of the batch (in-batch negatives), the other losses read the user's
own (1 + K) list. Validation ranks the whole catalogue.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from recsys_ray.data import layout
from recsys_ray.model import losses
from recsys_ray.model.base import (
    Batch,
    ExampleCandidates,
    InputSettings,
    Retriever,
    TrainSettings,
    ValidationSettings,
    cut_contexts,
    pad_rows,
)


def build_single_batch(ids_list: Sequence[Sequence[int]], special: tuple[int, int, int],
                       max_length: int | None = None) -> Batch:
    """Retriever inputs ``[CLS] ids [SEP]`` (ids cut from their end), padded to the longest row."""
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    cls_id, sep_id, pad_id = special
    rows = []
    for ids in ids_list:
        ids = np.asarray(ids, dtype=np.int64)
        if max_length is not None:
            ids = ids[: max_length - 2]
        rows.append(np.concatenate([[cls_id], ids, [sep_id]]))
    return pad_rows(rows, [len(r) for r in rows], pad_id)


class TwoTowerCollator:
    """Examples -> the users' and their candidates' inputs of one micro-batch."""

    def __init__(self, catalogue, special, settings: TrainSettings, seed: int):
        self.items, self.special, self.max_ctx = catalogue, special, settings.max_context_tokens
        self.candidates = ExampleCandidates(catalogue, settings.negatives, seed)

    def __call__(self, rows: list[dict]) -> Batch:
        ctx = cut_contexts(rows, self.max_ctx)
        cands = [self.candidates(r) for r in rows]  # (B, 1 + K) catalogue rows
        out: Batch = {"candidates": torch.tensor(cands, dtype=torch.long)}
        users = build_single_batch(ctx, self.special)
        flat = [i for cs in cands for i in cs]
        items = build_single_batch([self.items.tokens[i] for i in flat], self.special)
        out.update({f"user_{k}": v for k, v in users.items()})
        out.update({f"item_{k}": v for k, v in items.items()})
        n_tokens = sum(len(c) + 2 for c in ctx) + sum(len(self.items.tokens[i]) + 2 for cs in cands for i in cs)
        out["tokens"] = torch.tensor(n_tokens)
        return out


class TextRetriever(Retriever):
    """Dual encoder over texts: mean-pooled token vectors through the identity-initialised head."""

    history = "text"
    train_part = layout.split_part("train")
    bucket_key = "context_ids"

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Unit-length vector per ``[CLS] text [SEP]`` row -> (B, H)."""
        h = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state  # (B, L, H)
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # (B, H), padding excluded
        return self.normalize(self.head(pooled))  # (B, H)

    def input_batch(self, ids_list, special) -> Batch:
        return build_single_batch(ids_list, special)

    # --- training --------------------------------------------------------------------------------

    @classmethod
    def train_rows(cls, manifest: dict) -> tuple[int, str]:
        return manifest["counts"]["examples_by_split"]["train"], "train examples"

    def collator(self, catalogue, special, settings: TrainSettings, tokenizer, rank: int):
        return TwoTowerCollator(catalogue, special, settings, settings.seed + rank)

    def train_scores(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Users and candidates in one forward pass: own (B, 1 + K) and in-batch (B, B + B*K)."""
        b, n = batch["candidates"].shape
        u = self.encode(batch["user_input_ids"], batch["user_attention_mask"])  # (B, H)
        v = self.encode(batch["item_input_ids"], batch["item_attention_mask"]).view(b, n, -1)  # (B, 1+K, H)
        own = torch.einsum("bh,bnh->bn", u, v) / self.cfg.temperature  # (B, 1 + K)
        # in-batch: every user against all positives, then all sampled negatives
        cols = torch.cat([v[:, 0], v[:, 1:].reshape(b * (n - 1), -1)])  # (B + B*K, H)
        return own, self.score(u, cols)

    def train_loss(self, loss: str, scores: torch.Tensor, inbatch: torch.Tensor | None, batch: Batch) -> torch.Tensor:
        """``softmax`` learns from in-batch negatives too; the other losses from the own list."""
        candidates = batch["candidates"]
        if loss == "softmax" and inbatch is not None:
            negatives = candidates[:, 1:].reshape(-1) if candidates.shape[1] > 1 else None
            return losses.in_batch_softmax(inbatch, candidates[:, 0], negatives)
        return losses.compute_loss(loss, scores)

    @torch.no_grad()
    def validation_ranks(self, rows, catalogue, special, device, settings: ValidationSettings) -> tuple[list[int], str]:
        item_vecs = self.encode_batched(catalogue.tokens, special, device, max(settings.batch_size, 64))
        cut = settings.max_context_tokens or None
        return self.full_ranks(rows, catalogue, item_vecs, special, device, settings.batch_size,
                               lambda chunk: [list(r["context_ids"])[:cut] for r in chunk]), "full"

    # --- predictor side ------------------------------------------------------------------------

    def context_ids(self, rows, profile_ids, catalogue, inputs: InputSettings) -> list[int]:
        recent = list(rows)[::-1][: inputs.max_history]
        return inputs.context_encoder.encode(profile_ids, [catalogue.tokens[i] for i in recent])

    def user_vectors(self, contexts, special, device, batch_size: int, max_context_tokens: int) -> torch.Tensor:
        return self.encode_batched([list(c)[:max_context_tokens] for c in contexts], special, device, batch_size)

    def catalogue_vectors(self, catalogue, special, device, batch_size: int) -> torch.Tensor:
        return self.encode_batched(catalogue.tokens, special, device, batch_size)

