"""The one predictor class: offline evaluation (Ray Data batch inference) and Ray Serve wrap it.

A :class:`Predictor` holds a retriever and/or a ranker checkpoint and the catalogue:

- ``context_ids(history, profile)``: a user's token ids, built exactly as the data pipeline
  builds ``context_ids`` (profile, then history most recent first, cut to the checkpoint's
  ``max_context_tokens``); for a ``history="items"`` retriever: ``profile [SEP]`` and the last
  ``history_len`` items as item-token ids, oldest first (:func:`recsys_ray.model.history_context`);
- ``candidate_ids(rows)``: catalogue rows as the model's candidate inputs (their token ids, or
  one item-token id each for a ``history="items"`` retriever, which scores catalogue items only);
- ``retrieve(contexts, k, exclude)``: full-catalogue top k by the retriever (item vectors are
  computed once and kept), optionally plus a popularity prior ``beta * log(1 + train count)``;
- ``score_pairs(contexts, candidates)``: ranker logits for (context, candidate) pairs, sorted
  by length into batches so padding stays small;
- ``score(context, candidates)``: what ``POST /v1/score`` answers (ranker if loaded, else the
  retriever's scaled cosine);
- ``recommend(contexts, k, exclude)``: two-stage: the retriever's top ``rerank_top`` rescored by
  the ranker; the rest of the catalogue keeps the retriever's order behind them.

Everything takes token ids without special tokens (what the prepared data stores); nothing is
cached per request, so results are the same whatever the batch composition.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from recsys_ray.data import text as T
from recsys_ray.data.tokenize import ContextEncoder, encode_texts, vocab_digest
from recsys_ray.errors import DataError, RecsysError
from recsys_ray.model import (
    BertRecommender,
    build_pair_batch,
    encode_batched,
    history_context,
    special_ids,
)

log = logging.getLogger(__name__)

CATALOGUE_FILE = "items.parquet"  # written into every training checkpoint: serving needs nothing else
DEFAULT_MAX_HISTORY = 20
DEFAULT_MAX_CONTEXT_TOKENS = 256


class UnknownItems(DataError):
    """Item ids not in the catalogue (the HTTP API turns this into a 422 naming them)."""

    def __init__(self, ids: Sequence[str]):
        self.ids = list(ids)
        shown = ", ".join(repr(i) for i in self.ids[:10]) + (" ..." if len(self.ids) > 10 else "")
        super().__init__(f"unknown item id(s): {shown}")


class Catalogue:
    """Item ids <-> rows, each item's text, token ids (no specials) and train-event count."""

    def __init__(self, table: pa.Table):
        missing = [c for c in ("item_id", "input_ids") if c not in table.column_names]
        if missing:
            raise DataError(f"catalogue lacks column(s) {missing}")
        self.ids: list[str] = [str(i) for i in table["item_id"].to_pylist()]
        self.index = {iid: i for i, iid in enumerate(self.ids)}
        self.tokens: list[list[int]] = table["input_ids"].to_pylist()
        self.texts: list[str] = (
            table["text"].to_pylist() if "text" in table.column_names else list(self.ids)
        )
        self.counts = (
            np.asarray(table["train_count"].to_numpy(zero_copy_only=False), dtype=np.float64)
            if "train_count" in table.column_names
            else None
        )

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, item_ids: Sequence[str]) -> list[int]:
        """Catalogue rows of these ids; :class:`UnknownItems` names every id it lacks."""
        unknown = [i for i in item_ids if i not in self.index]
        if unknown:
            raise UnknownItems(unknown)
        return [self.index[i] for i in item_ids]

    def table(self) -> pa.Table:
        cols = {
            "item_id": pa.array(self.ids, pa.string()),
            "text": pa.array(self.texts, pa.string()),
            "input_ids": pa.array(self.tokens, pa.list_(pa.int32())),
        }
        if self.counts is not None:
            cols["train_count"] = pa.array(self.counts.astype(np.int64))
        return pa.table(cols)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        pq.write_table(self.table(), str(path))
        return path

    @classmethod
    def from_data_dir(cls, data_dir: str) -> Catalogue:
        """Items of a prepared data directory, with train counts from its train split."""
        root = str(data_dir).rstrip("/")
        items = pads.dataset(f"{root}/items", format="parquet").to_table(columns=["item_id", "text", "input_ids"])
        train = f"{root}/examples/split=train"
        if os.path.isdir(train):
            targets = pads.dataset(train, format="parquet").to_table(columns=["target_item_id"])["target_item_id"]
            vc = pa.compute.value_counts(targets).to_pylist()
            counts = {d["values"]: d["counts"] for d in vc}
            items = items.append_column(
                "train_count", pa.array([counts.get(i, 0) for i in items["item_id"].to_pylist()], pa.int64())
            )
        return cls(items)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Catalogue:
        """A prepared data dir, a checkpoint dir (its items.parquet) or an items parquet file/dir."""
        p = Path(path)
        if (p / "manifest.json").is_file() and (p / "items").is_dir():
            return cls.from_data_dir(str(p))
        if (p / CATALOGUE_FILE).is_file():
            p = p / CATALOGUE_FILE
        if not p.exists():
            raise DataError(f"catalogue not found: {path}")
        try:
            return cls(pads.dataset(str(p), format="parquet").to_table())
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"{path}: unreadable catalogue ({str(exc).splitlines()[0]})") from None


def _ordered_chunks(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Indices sorted by length, cut into batches (similar lengths together: little padding)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


@dataclass
class PredictorConfig:
    retriever: str | None = None
    ranker: str | None = None
    items: str | None = None  # default: the checkpoint's items.parquet
    device: str = "cpu"
    batch_size: int = 64  # contexts or pairs per forward pass
    rerank_top: int = 50
    popularity_weight: float = 0.0  # beta of the retriever's popularity prior
    max_context_tokens: int | None = None  # default: what the checkpoint trained with
    torch_threads: int | None = None


class Predictor:
    """Retriever and/or ranker + catalogue; see the module docstring."""

    def __init__(self, cfg: PredictorConfig | None = None, **kwargs):
        cfg = cfg or PredictorConfig(**kwargs)
        if not cfg.retriever and not cfg.ranker:
            raise RecsysError("a predictor needs a retriever or a ranker checkpoint")
        if cfg.batch_size < 1 or cfg.rerank_top < 1:
            raise RecsysError("batch_size and rerank_top must be >= 1")
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.retriever = self._load(cfg.retriever, "retriever") if cfg.retriever else None
        self.ranker = self._load(cfg.ranker, "ranker") if cfg.ranker else None
        models = [m for m in (self.retriever, self.ranker) if m is not None]
        self.tokenizer = models[0].tokenizer
        if len(models) == 2 and vocab_digest(models[0].tokenizer) != vocab_digest(models[1].tokenizer):
            raise RecsysError("retriever and ranker checkpoints use different vocabularies")
        self.special = special_ids(self.tokenizer)
        # the checkpoints' local folders (an s3:// checkpoint was copied to the cache by _load)
        local = [m.source for m in (self.retriever, self.ranker) if m is not None]
        items_path = cfg.items or next((p for p in local if (Path(p) / CATALOGUE_FILE).is_file()), None)
        if items_path is None:
            raise RecsysError(
                f"no catalogue: the checkpoint has no {CATALOGUE_FILE}; pass items= (a prepared data dir)"
            )
        self.items = Catalogue.load(items_path)
        if len(self.items) == 0:
            raise RecsysError(f"{items_path}: the catalogue is empty")
        text = dict(models[0].extra.get("text") or {})
        train_cfg = models[0].extra.get("train_config") or {}
        self.max_history = int(text.get("max_history") or DEFAULT_MAX_HISTORY)
        self.profile_columns = list(text.get("user_profile_columns") or [])
        self.max_context_tokens = int(
            cfg.max_context_tokens
            or train_cfg.get("max_context_tokens")
            or text.get("max_context_tokens")
            or DEFAULT_MAX_CONTEXT_TOKENS
        )
        self._ctx = ContextEncoder(self.tokenizer, self.max_context_tokens)
        # a history="items" retriever: contexts and candidates are item-token ids
        self.sequence = self.retriever is not None and self.retriever.cfg.history == "items"
        if self.sequence and self.retriever.num_items != len(self.items):
            raise RecsysError(
                f"{cfg.retriever}: the retriever has {self.retriever.num_items} item embeddings but the catalogue "
                f"{items_path} has {len(self.items)} items (another catalogue?)"
            )
        self._item_vecs: torch.Tensor | None = None
        self._prior = self._popularity_prior()

    def _load(self, path: str, kind: str) -> BertRecommender:
        from recsys_ray.model import resolve_encoder_path

        local = resolve_encoder_path(path) if str(path).startswith("s3://") else path
        model = BertRecommender.from_checkpoint(local, map_location=self.device)
        model.source = str(local)  # where its items.parquet is
        if model.cfg.kind != kind:
            raise RecsysError(f"{path}: is a {model.cfg.kind} checkpoint, expected a {kind}")
        return model

    def _popularity_prior(self) -> np.ndarray | None:
        if not self.cfg.popularity_weight:
            return None
        if self.items.counts is None:
            raise RecsysError("popularity_weight needs train counts in the catalogue (train_count column)")
        return (self.cfg.popularity_weight * np.log1p(self.items.counts)).astype(np.float32)

    @property
    def kinds(self) -> list[str]:
        return [k for k, m in (("retriever", self.retriever), ("ranker", self.ranker)) if m is not None]

    # --- inputs ---------------------------------------------------------------------------------

    def profile_text(self, profile: Mapping[str, object] | str | None) -> str:
        if profile is None:
            return ""
        if isinstance(profile, str):
            return " ".join(profile.split())
        cols = self.profile_columns or list(profile)
        return T.render_profile(profile, cols)

    def context_ids(self, history: Sequence[str], profile: Mapping[str, object] | str | None = None,
                    kind: str | None = None) -> list[int]:
        """Model input ids of a user: ``history`` oldest first (as logged).

        ``kind``: whose context ("retriever" or "ranker"; default the retriever if loaded). Text
        contexts use the last ``max_history`` items, item-token contexts the last ``history_len``.
        """
        rows = self.items.rows(list(history))
        ptext = self.profile_text(profile)
        pids = encode_texts(self.tokenizer, [ptext])[0] if ptext else None
        if self._sequence_kind(kind):
            return self.sequence_context(pids, rows)
        recent = rows[::-1][: self.max_history]
        return self._ctx.encode(pids, [self.items.tokens[i] for i in recent])

    def sequence_context(self, profile_ids: Sequence[int] | None, rows: Sequence[int]) -> list[int]:
        """history="items" context of catalogue rows (oldest first) and profile token ids."""
        m = self._need("retriever")
        return history_context(profile_ids, rows, m.item_offset, m.cfg.history_len, self.special)

    def example_contexts(self, batch: Mapping[str, Sequence], kind: str | None = None) -> list[list[int]]:
        """Contexts of prepared valid/test example rows (``context_ids``, or ``seen_item_ids`` and
        ``profile_ids`` for an item-token retriever) for the model of ``kind``."""
        if self._sequence_kind(kind):
            profiles = batch["profile_ids"] if "profile_ids" in batch else [None] * len(batch["seen_item_ids"])
            return [self.sequence_context(list(p) if p is not None else None, self.items.rows(list(seen)))
                    for p, seen in zip(profiles, batch["seen_item_ids"], strict=True)]
        return [list(c) for c in batch["context_ids"]]

    def _sequence_kind(self, kind: str | None) -> bool:
        kind = kind or ("retriever" if self.retriever is not None else "ranker")
        return kind == "retriever" and self.sequence

    @property
    def scores_texts(self) -> bool:
        """Whether :meth:`score` takes free-text candidates (not for an item-token retriever alone)."""
        return self.ranker is not None or not self.sequence

    def candidate_ids(self, rows: Sequence[int]) -> list[list[int]]:
        """Catalogue rows as candidates for :meth:`score`: token ids, or [item-token id] each."""
        if self.sequence and self.ranker is None:
            off = self.retriever.item_offset
            return [[off + int(r)] for r in rows]
        return [self.items.tokens[r] for r in rows]

    def text_ids(self, texts: Sequence[str], max_tokens: int = 64) -> list[list[int]]:
        """Free candidate texts -> token ids (over-long texts are cut, never refused)."""
        return encode_texts(self.tokenizer, [" ".join(t.split()) for t in texts], max_tokens)

    def _cut(self, ctx: Sequence[int]) -> list[int]:
        return list(ctx)[: self.max_context_tokens]

    # --- retriever ------------------------------------------------------------------------------

    def encode(self, ids_list: Sequence[Sequence[int]]) -> torch.Tensor:
        """Retriever vectors (N, H) for model inputs as given (contexts, or a text retriever's items)."""
        return encode_batched(self._need("retriever"), ids_list, self.special, self.device, self.cfg.batch_size)

    def user_vectors(self, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Retriever vectors (B, H) of contexts (text contexts cut to ``max_context_tokens``)."""
        return self.encode(contexts if self.sequence else [self._cut(c) for c in contexts])

    def candidate_vectors(self, candidates: Sequence[Sequence[int]]) -> torch.Tensor:
        """Retriever vectors (N, H) of candidates (see :meth:`candidate_ids`)."""
        if not self.sequence:
            return encode_batched(self._need("retriever"), candidates, self.special, self.device, self.cfg.batch_size)
        off = self.retriever.item_offset
        rows = [c[0] - off if len(c) == 1 and c[0] >= off else None for c in candidates]
        if any(r is None for r in rows):
            raise RecsysError("this retriever reads item tokens (history='items'): it scores catalogue item ids, not texts")
        return self.item_vectors()[torch.as_tensor(rows, dtype=torch.long)]

    def item_vectors(self) -> torch.Tensor:
        """Every catalogue item's vector (I, H), computed on first use and kept."""
        if self._item_vecs is None:
            if self.sequence:
                with torch.no_grad():
                    self._item_vecs = self.retriever.item_vectors().cpu()
            else:
                self._item_vecs = self.encode(self.items.tokens)
        return self._item_vecs

    def retrieval_scores(self, contexts: Sequence[Sequence[int]], with_prior: bool = True) -> np.ndarray:
        """(B, I) scaled cosine of each context with every item (+ the popularity prior)."""
        model = self._need("retriever")
        users = self.user_vectors(contexts)
        scores = model.score(users, self.item_vectors()).numpy()
        if with_prior and self._prior is not None:
            scores = scores + self._prior[None, :]
        return scores

    def retrieve(self, contexts: Sequence[Sequence[int]], k: int,
                 exclude: Sequence[Sequence[int]] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per context: (item rows, scores) of the top k, best first, ``exclude`` rows left out."""
        scores = self.retrieval_scores(contexts)
        return [_top(scores[j], k, exclude[j] if exclude else ()) for j in range(len(contexts))]

    # --- ranker ---------------------------------------------------------------------------------

    @torch.no_grad()
    def score_pairs(self, contexts: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]]) -> np.ndarray:
        """Ranker logits (P,) for pairs (contexts[p], candidates[p]), in the given order."""
        model = self._need("ranker")
        if len(contexts) != len(candidates):
            raise ValueError(f"{len(contexts)} contexts but {len(candidates)} candidates")
        out = np.empty(len(contexts), dtype=np.float32)
        lengths = [len(c) + len(i) for c, i in zip(contexts, candidates, strict=True)]
        for idx in _ordered_chunks(lengths, self.cfg.batch_size):
            b = build_pair_batch([self._cut(contexts[i]) for i in idx], [candidates[i] for i in idx], self.special)
            logits = model.forward_pairs(*(b[k].to(self.device) for k in ("input_ids", "attention_mask", "token_type_ids")))
            out[idx] = logits.float().cpu().numpy()
        return out

    # --- what the API answers -------------------------------------------------------------------

    def score(self, context: Sequence[int], candidates: Sequence[Sequence[int]]) -> np.ndarray:
        """One user's score per candidate (token ids), in order: ranker if loaded, else retriever."""
        if self.ranker is not None:
            return self.score_pairs([context] * len(candidates), candidates)
        model = self._need("retriever")
        u = self.user_vectors([context])
        return model.score(u, self.candidate_vectors(candidates)).numpy()[0]

    def score_many(self, contexts: Sequence[Sequence[int]], candidates: Sequence[Sequence[Sequence[int]]]) -> list[np.ndarray]:
        """:meth:`score` for several users in one pass (what a batched replica calls)."""
        if self.ranker is not None:
            flat_ctx = [c for c, cs in zip(contexts, candidates, strict=True) for _ in cs]
            flat = self.score_pairs(flat_ctx, [i for cs in candidates for i in cs])
            bounds = np.cumsum([0] + [len(cs) for cs in candidates])
            return [flat[bounds[j] : bounds[j + 1]] for j in range(len(contexts))]
        model = self._need("retriever")
        users = self.user_vectors(contexts)
        items = self.candidate_vectors([i for cs in candidates for i in cs])
        bounds = np.cumsum([0] + [len(cs) for cs in candidates])
        return [model.score(users[j : j + 1], items[bounds[j] : bounds[j + 1]]).numpy()[0] for j in range(len(contexts))]

    def rerank(self, context: Sequence[int], rows: Sequence[int]) -> np.ndarray:
        """Ranker scores of catalogue rows for one context."""
        return self.score_pairs([context] * len(rows), [self.items.tokens[i] for i in rows])

    def recommend(self, contexts: Sequence[Sequence[int]], k: int,
                  exclude: Sequence[Sequence[int]] | None = None,
                  rank_contexts: Sequence[Sequence[int]] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top k catalogue rows per context: retrieve ``max(k, rerank_top)``, rerank with the ranker.

        ``rank_contexts``: the ranker's contexts when they differ from the retriever's (an
        item-token retriever with a text ranker); default ``contexts``.
        Without a retriever the ranker scores the whole catalogue (slow; small catalogues only).
        """
        rank_contexts = rank_contexts if rank_contexts is not None else contexts
        if k < 1:
            raise ValueError("k must be >= 1")
        n = max(k, self.cfg.rerank_top)
        if self.retriever is not None:
            shortlist = self.retrieve(contexts, n if self.ranker is not None else k, exclude)
        else:
            shortlist = [(np.setdiff1d(np.arange(len(self.items)), np.asarray(exclude[j] if exclude else [], dtype=np.int64)), None)
                         for j in range(len(contexts))]
        if self.ranker is None:
            return shortlist
        out = []
        for j, (rows, _) in enumerate(shortlist):
            s = self.rerank(rank_contexts[j], rows)
            order = np.argsort(-s, kind="stable")[:k]
            out.append((np.asarray(rows)[order], s[order]))
        return out

    def _need(self, kind: str) -> BertRecommender:
        model = self.retriever if kind == "retriever" else self.ranker
        if model is None:
            raise RecsysError(f"this predictor has no {kind} checkpoint")
        return model


def _top(scores: np.ndarray, k: int, exclude: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
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
