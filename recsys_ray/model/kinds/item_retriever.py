"""Item-token retriever (sequence model): the user's history as one learned token per item, read
causally by the pretrained BERT.

``model.kind: retriever``, ``history: items`` (the ``cpu`` preset). Each catalogue item is one
vector (initialised from the mean of the item text's pretrained word-piece embeddings, so the
vocabulary seeds it); ``[CLS] profile [SEP] item_1 .. item_L`` -> the hidden state at each position
-> ``Linear(H, H)`` -> unit length = the user after that item; item vectors = the same item
embeddings, unit length (tied, as in SASRec). One forward pass trains a next-item prediction at
every position, which is what makes it affordable on CPUs. Item positions carry ids
``vocab_size + row`` in the input ids, so contexts stay plain lists of ints everywhere (data,
Predictor, Serve). It trains from ``sequences/`` (a window of each user's train events per step),
scores catalogue items only (free-text candidates need a ranker) and validates by full ranking.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from recsys_ray.data import layout
from recsys_ray.data.catalogue import Catalogue
from recsys_ray.data.examples import MAX_QUERY_TOKENS
from recsys_ray.data.tokenize import encode_texts
from recsys_ray.errors import ConfigError, RecsysError
from recsys_ray.model import losses
from recsys_ray.model.base import (
    Batch,
    InputSettings,
    Retriever,
    TrainSettings,
    ValidationSettings,
    pad_rows,
)

# word pieces of an item's text that ``model.item_text_encoder`` reads (MovieLens title + genres: 31 at most)
ITEM_TEXT_TOKENS = 32


def history_context(profile_ids: Sequence[int] | None, history_rows: Sequence[int], item_offset: int,
                    history_len: int, special: tuple[int, int, int], max_profile_tokens: int = 32) -> list[int]:
    """Context ids ``profile [SEP] item_1 .. item_L``, oldest first, the last ``history_len``
    catalogue rows as ids ``item_offset + row`` ([CLS] is added by the batch)."""
    _, sep_id, _ = special
    rows = list(history_rows)[-history_len:] if history_len else []
    return [*list(profile_ids or [])[:max_profile_tokens], sep_id, *(item_offset + int(r) for r in rows)]


def search_context(user_context: Sequence[int], query_ids: Sequence[int], special: tuple[int, int, int]) -> list[int]:
    """A search input: the user's :func:`history_context` (``[SEP]`` alone for no user), ``[SEP]``,
    the query's word pieces; the user vector is read after the query's last word piece."""
    return [*user_context, special[1], *query_ids]


def anonymous_context(special: tuple[int, int, int]) -> list[int]:
    """The context of no user: no profile, no history."""
    return [special[1]]


def build_sequence_batch(ids_list: Sequence[Sequence[int]], special: tuple[int, int, int]) -> Batch:
    """Inputs ``[CLS] ids`` (no closing [SEP]: the user vector is read at the last real position),
    right-padded to the longest row."""
    cls_id, _, pad_id = special
    rows = [np.concatenate([[cls_id], np.asarray(ids, dtype=np.int64)]) for ids in ids_list]
    return pad_rows(rows, [len(r) for r in rows], pad_id)


def block_layout(n_main: int, blocks: Sequence[tuple[int, int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Position ids (length,) and attention (length, length) bool of a row of ``n_main`` causal
    tokens followed by query blocks ``(cut, n)``: a block's ``n`` tokens see the first ``cut`` main
    tokens and their own block causally, with positions ``cut, cut + 1, ..`` as if they followed
    those tokens directly, so each block reads exactly what :func:`search_context` of that shorter
    history would. Main tokens never see a block; padding sees only itself."""
    seg = np.full(length, -1)
    lim = np.zeros(length, dtype=np.int64)
    pos = np.zeros(length, dtype=np.int64)
    seg[:n_main], lim[:n_main], pos[:n_main] = 0, np.arange(1, n_main + 1), np.arange(n_main)
    o = n_main
    for b, (cut, n) in enumerate(blocks, start=1):
        seg[o:o + n], lim[o:o + n], pos[o:o + n] = b, cut, cut + np.arange(n)
        o += n
    idx = np.arange(length)
    seen = (seg[None, :] == 0) & (idx[None, :] < lim[:, None])  # the history before the block's event
    own = (seg[None, :] == seg[:, None]) & (seg[:, None] > 0) & (idx[None, :] <= idx[:, None])
    visible = seen | own
    visible[idx, idx] = True
    return pos, visible


class SequenceCollator:
    """User sequences -> causal next-item rows for one micro-batch.

    A row is one user's train events (the first ``n_train`` of ``item_ids``). Each draw cuts a
    window of up to ``history_len + 1`` events ending at ``e = min(n_train, U[1, n_train +
    history_len])``, which makes every train event equally likely to be a target. Input =
    ``[CLS] profile [SEP] w_0 .. w_{n-2}``; the target at ``w_j``'s position is ``w_{j+1}``, and
    at ``[SEP]`` it is ``w_0`` when the window starts at the user's first event. For the sampled
    losses every target gets ``negatives`` uniform catalogue items other than itself.

    Search windows (``search_mix``): a personal one appends the queries of the last event and of up
    to ``search_queries - 1`` earlier events of the window, each as a ``[SEP] query`` block that
    sees only the history before its event (:func:`block_layout`; the batch then carries
    ``position_ids`` and ``visible``), its event the target at the block's last word piece; an
    anonymous one (``search_anonymous``) is ``[SEP] [SEP] query`` -> the last event.
    """

    def __init__(self, items: Catalogue, special: tuple[int, int, int], item_offset: int, history_len: int,
                 negatives: int, tokenizer, seed: int, sampled: bool, search_mix: float = 0.0,
                 search_anonymous: float = 0.0, search_queries: int = 1, with_history: bool = False,
                 holdout_last: int = 0, lists_on_holdout: bool = False, text_rows: int = 0,
                 refit: bool = False):
        self.refit = refit  # a split user's validation event is a train event too
        self.with_history = with_history  # also the catalogue rows before each window's last event
        # holdout_last k: each user's last k train events are never a next-item target; with
        # lists_on_holdout every window ends at one of them instead (an items ranker's lists)
        self.holdout, self.lists_on_holdout = holdout_last, lists_on_holdout
        self.items, self.special, self.offset, self.L = items, special, item_offset, history_len
        self.k, self.tok, self.sampled = negatives, tokenizer, sampled
        self.search_mix, self.anonymous, self.n_queries = search_mix, search_anonymous, search_queries
        self.rng = np.random.default_rng(seed)
        # text_rows N (model.item_text_encoder): each batch names N catalogue rows drawn uniformly from the
        # items with a train event, to be read as their text: as negatives mostly, as positives where they
        # are targets, so the text tower learns calibrated scores (items never trained on are not drawn)
        self.n_text = text_rows
        counts = items.counts if items.counts is not None else np.ones(len(items))
        self._text_pool = np.flatnonzero(np.asarray(counts) > 0) if text_rows else np.zeros(0, dtype=np.int64)
        self._profiles: dict[str, list[int]] = {}
        self._queries: dict[str, list[int]] = {}

    def _query(self, text: str) -> list[int]:
        if text not in self._queries:
            self._queries[text] = encode_texts(self.tok, [text], MAX_QUERY_TOKENS)[0]
        return self._queries[text]

    def _profile(self, row: dict) -> list[int]:
        text = row.get("profile_text") or ""
        if not text:
            return []
        if row["user_id"] not in self._profiles:
            self._profiles[row["user_id"]] = encode_texts(self.tok, [text])[0]
        return self._profiles[row["user_id"]]

    def __call__(self, rows: list[dict]) -> Batch:
        contexts, targets, layouts, before, lasts = [], [], [], [], []
        for r in rows:
            ids, n = list(r["item_ids"]), int(r["n_train"])  # n_train >= 1
            if self.refit and len(ids) - n == 2:  # train, validation, test: the validation event joins train
                n += 1
            seq = [self.items.index[i] for i in ids[:n]]
            kept = max(1, len(seq) - self.holdout)  # events that may be next-item targets
            if self.lists_on_holdout and kept < len(seq):  # the window ends at a held-out event
                end = int(self.rng.integers(kept + 1, len(seq) + 1))
            else:
                seq = seq[:kept]
                end = min(len(seq), int(self.rng.integers(1, len(seq) + self.L + 1)))
            before.append(seq[: end - 1])  # the user's whole history before the window's last event
            lasts.append(seq[end - 1])
            start = max(0, end - (self.L + 1))
            window = seq[start:end]
            held = max(0, end - max(kept, start))  # held-out events at the window's end: not next-item targets
            ctx = history_context(self._profile(r), window[:-1], self.offset, self.L, self.special)
            n_prefix = len(ctx) - (len(window) - 1)  # profile + [SEP]; [CLS] shifts everything by 1
            t = [-100] * (len(ctx) + 1)
            if start == 0:
                t[n_prefix] = window[0]  # at [SEP]: the first event from the profile alone
            for j in range(1, len(window) - held):
                t[n_prefix + j] = window[j]
            queries = r.get("queries") if self.search_mix else None  # aligned with item_ids
            queries = list(queries[start:end]) if queries is not None else []  # aligned with window
            blocks: list[tuple[int, int]] = []
            if queries and queries[-1] and self.rng.random() < self.search_mix:  # a search window
                if self.rng.random() < self.anonymous:  # plain search: the last event's query alone
                    ctx = search_context(anonymous_context(self.special), self._query(queries[-1]), self.special)
                    t = [-100] * (len(ctx) + 1)
                    t[len(ctx)] = window[-1]
                else:  # the last event's query and up to search_queries - 1 earlier ones, each its own block
                    earlier = [c for c in range(0 if start == 0 else 1, len(window) - 1) if queries[c]]
                    n = min(len(earlier), self.n_queries - 1)
                    picked = sorted(self.rng.choice(earlier, size=n, replace=False).tolist()) if n else []
                    for c in [*picked, len(window) - 1]:
                        block = [self.special[1], *self._query(queries[c])]
                        blocks.append((1 + n_prefix + c, len(block)))  # sees [CLS] profile [SEP] w_0 .. w_{c-1}
                        ctx = [*ctx, *block]
                        t = [*t, *([-100] * len(block))]
                        t[-1] = window[c]
            contexts.append(ctx)
            targets.append(t)
            layouts.append(blocks)
        b = build_sequence_batch(contexts, self.special)
        tgt = torch.full(b["input_ids"].shape, -100, dtype=torch.long)  # (B, L)
        for i, t in enumerate(targets):
            tgt[i, : len(t)] = torch.as_tensor(t)
        out = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "targets": tgt}
        if any(layouts):  # query blocks: each row's positions and who sees whom
            length = b["input_ids"].shape[1]
            rows_pos, rows_vis = zip(*(block_layout(len(ctx) + 1 - sum(n for _, n in blocks), blocks, length)
                                       for ctx, blocks in zip(contexts, layouts, strict=True)), strict=True)
            out["position_ids"] = torch.as_tensor(np.stack(rows_pos))  # (B, L)
            out["visible"] = torch.as_tensor(np.stack(rows_vis))  # (B, L, L) bool
        if self.sampled:
            pos = tgt[tgt >= 0]  # (M,) in the order train_scores selects them
            negs = torch.as_tensor(self.rng.integers(0, len(self.items), size=(len(pos), self.k)))
            clash = negs == pos[:, None]
            negs[clash] = (negs[clash] + 1) % len(self.items)  # never the target itself
            out["candidates"] = torch.cat([pos[:, None], negs], dim=1)  # (M, 1 + K)
        if self.with_history:  # (B, S) catalogue rows, -1 padded
            hist = torch.full((len(before), max(1, max(map(len, before)))), -1, dtype=torch.long)
            for i, h in enumerate(before):
                hist[i, : len(h)] = torch.as_tensor(h, dtype=torch.long)
            out["history"] = hist
            out["last_item"] = torch.as_tensor(lasts, dtype=torch.long)  # (B,) each window's last event
            out["num_negatives"] = torch.tensor(self.k)  # the list each window's last event is ranked in
        if self.n_text and len(self._text_pool):
            drawn = self.rng.choice(self._text_pool, size=min(self.n_text, len(self._text_pool)), replace=False)
            out["text_rows"] = torch.as_tensor(np.sort(drawn), dtype=torch.long)  # (N,)
        out["tokens"] = torch.tensor(int(b["attention_mask"].sum()))
        return out


class ItemTokenRetriever(Retriever):
    """The history as item tokens (causal BERT); item vectors tied to the item tokens."""

    history = "items"
    train_part = layout.SEQUENCES
    bucket_key = "item_ids"
    scores_texts = False
    prepared_negatives = False  # the sampled losses draw negatives per step

    def _add_tables(self, num_items: int, hidden: int) -> None:
        if num_items < 1:
            raise RecsysError("a history='items' retriever needs the catalogue (num_items >= 1)")
        # (N, H) one vector per catalogue row: input tokens of the history and the item tower (tied)
        self.item_emb = nn.Embedding(num_items, hidden)
        self._item_tokens: list[list[int]] = []  # each row's word pieces (init_tables, adopt_catalogue)
        if self.cfg.item_text_dropout > 0:  # the text start of an item, mapped to where trained items live
            self.text_proj = nn.Linear(hidden, hidden)
            with torch.no_grad():  # identity at first: a new model's items start exactly as without it
                self.text_proj.weight.copy_(torch.eye(hidden))
                self.text_proj.bias.zero_()
        if self.cfg.item_text_encoder > 0:  # the encoder's reading of an item's text, added to its text start
            self.text_tower = nn.Linear(hidden, hidden)
            nn.init.zeros_(self.text_tower.weight)  # zero at first: a new model's items start exactly as without it
            nn.init.zeros_(self.text_tower.bias)

    @classmethod
    def encoder_options(cls) -> dict:
        return {"is_decoder": True, "use_cache": False}  # causal: position t sees positions <= t

    @classmethod
    def from_config(cls, cfg, tokenizer=None, item_tokens=None) -> ItemTokenRetriever:
        if not item_tokens:
            raise ConfigError(["model.history 'items' needs the catalogue's item tokens to build item embeddings"])
        return super().from_config(cfg, tokenizer, item_tokens)

    @torch.no_grad()
    def initial_item_vectors(self, item_tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """(n, H) first embeddings of items with these token ids: the mean of each item's
        word-piece embeddings ("text"; through ``text_proj`` when the model learned one with
        ``item_text_dropout``, plus ``text_tower``'s reading of the text with ``item_text_encoder``),
        or BERT's random init. The one rule for items at first training (both maps start neutral),
        items new to a warm-started run, held-out items and items added to a serving model."""
        if self.cfg.item_init == "random":
            words = self.encoder.embeddings.word_embeddings.weight
            out = torch.empty(len(item_tokens), words.shape[1], dtype=words.dtype, device=words.device)
            return out.normal_(std=self.encoder.config.initializer_range)
        was_training = self.training
        self.eval()  # the encoder's reading (text_tower) without dropout: the same vector every time
        try:
            return self._text_vectors(item_tokens)
        finally:
            self.train(was_training)

    def _text_vectors(self, item_tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """(n, H) each item's mean word-piece embedding (no gradient), then ``text_proj`` if any,
        plus ``text_tower`` of the encoder's reading of the text if any (both with their gradients,
        the encoder's included, when called under autograd; outside it a tower still at zero is
        skipped: it adds nothing, and a fresh model's whole catalogue need not be read)."""
        words = self.encoder.embeddings.word_embeddings.weight.detach()  # (V, H)
        out = torch.empty(len(item_tokens), words.shape[1], dtype=words.dtype, device=words.device)
        for row, ids in enumerate(item_tokens):
            ids = torch.as_tensor(list(ids), dtype=torch.long, device=words.device)
            out[row] = words[ids].mean(dim=0) if len(ids) else words.mean(dim=0)
        proj = getattr(self, "text_proj", None)
        out = out if proj is None else proj(out)
        tower = getattr(self, "text_tower", None)
        if tower is None or not (torch.is_grad_enabled() or tower.weight.any() or tower.bias.any()):
            return out
        return out + tower(self._read_texts(item_tokens))

    def _read_texts(self, item_tokens: Sequence[Sequence[int]], chunk: int = 256) -> torch.Tensor:
        """(n, H) the encoder's hidden states averaged over each item's first ``ITEM_TEXT_TOKENS`` word
        pieces (read causally, as the user tower reads; no special tokens), ``chunk`` items a pass."""
        device = self.item_emb.weight.device
        pad = int(self.encoder.config.pad_token_id or 0)
        rows = [np.asarray(list(ids)[:ITEM_TEXT_TOKENS] or [pad], dtype=np.int64) for ids in item_tokens]
        out = []
        for s in range(0, len(rows), chunk):
            b = pad_rows(rows[s: s + chunk], [len(r) for r in rows[s: s + chunk]], pad)
            ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)  # (n, T)
            h = self.hidden_states(ids, mask)  # (n, T, H)
            m = mask.unsqueeze(-1).to(h.dtype)
            out.append((h * m).sum(dim=1) / m.sum(dim=1))  # (n, H)
        return torch.cat(out)

    @torch.no_grad()
    def init_tables(self, item_tokens: Sequence[Sequence[int]] | None) -> None:
        self.item_emb.weight.copy_(self.initial_item_vectors(item_tokens))
        self._item_tokens = [list(ids) for ids in item_tokens or ()]

    @torch.no_grad()
    def reinit_items(self, rows: Sequence[int], item_tokens: Sequence[Sequence[int]]) -> None:
        if len(rows):
            self.item_emb.weight[torch.as_tensor(list(rows), dtype=torch.long)] = self.initial_item_vectors(item_tokens)

    def _train_table(self, text_rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """(N, H) the item table of one training step that reads some rows as their text, the rest as
        their learned tokens; None when off or none drawn. Under ``model.item_text_dropout`` p a fresh
        random p of the rows read as :meth:`initial_item_vectors` (their text through ``text_proj``,
        which learns here where an untrained item belongs: DropoutNet, Volkovs et al. 2017); under
        ``model.item_text_encoder`` the batch's ``text_rows`` (the collator's uniform draw) do,
        through the encoder and ``text_tower``, which learn it there.

        (A first version drew the rows among the step's targets: the tower then saw mostly positives
        and scored every text-read item above the learned ones, cold items crowding warm targets out.)"""
        p, n_read = self.cfg.item_text_dropout, self.cfg.item_text_encoder
        if not (self.training and (p > 0 or n_read > 0)):
            return None
        weight = self.item_emb.weight
        tokens = self._item_tokens
        if len(tokens) != len(weight):
            raise RecsysError("model.item_text_dropout / item_text_encoder need the item tokens of the model's catalogue")
        if n_read:
            if text_rows is None:
                raise RecsysError("model.item_text_encoder: the batch names no text_rows (not this kind's collator?)")
            rows = text_rows.tolist()
        else:
            drop = torch.rand(len(weight), device=weight.device) < p  # (N,)
            rows = drop.nonzero().flatten().tolist()
        if not rows:
            return None
        text = self._text_vectors([tokens[r] for r in rows])  # (R, H) the rule for new items; trains text_proj
        return weight.index_copy(0, torch.as_tensor(rows, dtype=torch.long, device=weight.device), text)

    @torch.no_grad()
    def adopt_catalogue(self, old: Catalogue, new: Catalogue) -> dict:
        """Item embeddings for ``new``: an item ``old`` knew keeps its learned vector, a new item
        gets :meth:`initial_item_vectors`, a removed one is dropped."""
        counts = super().adopt_catalogue(old, new)
        if self.num_items != len(old):
            raise RecsysError(f"the model has {self.num_items} item embeddings but its catalogue {len(old)} items")
        weight = self.initial_item_vectors(new.tokens)  # (N_new, H)
        known = [(row, old.index[iid]) for row, iid in enumerate(new.ids) if iid in old.index]
        if known:
            rows, old_rows = (torch.as_tensor(x, dtype=torch.long) for x in zip(*known, strict=True))
            weight[rows] = self.item_emb.weight[old_rows]
        self.item_emb = nn.Embedding.from_pretrained(weight, freeze=False)
        self._item_tokens = [list(ids) for ids in new.tokens]
        return counts

    @classmethod
    def saved_items(cls, state: dict[str, torch.Tensor], path: Path) -> int:
        if "item_emb.weight" not in state:
            raise RecsysError(f"{path}: a history='items' checkpoint without item_emb.weight")
        return int(state["item_emb.weight"].shape[0])

    @property
    def item_offset(self) -> int:
        """Input id of catalogue row 0 in a context (ids below are word pieces)."""
        return self.encoder.config.vocab_size

    @property
    def num_items(self) -> int:
        return self.item_emb.num_embeddings

    def _embed(self, input_ids: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids, word pieces below ``item_offset`` and items above -> (B, L, H) input vectors
        (items from ``table`` (N, H) when given, else the item embeddings)."""
        off = self.item_offset
        is_item = (input_ids >= off).unsqueeze(-1)  # (B, L, 1)
        words = self.encoder.embeddings.word_embeddings(input_ids.clamp(max=off - 1))  # (B, L, H)
        rows = (input_ids - off).clamp(min=0)
        items = self.item_emb(rows) if table is None else F.embedding(rows, table)  # (B, L, H)
        return torch.where(is_item, items, words)

    def encode_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         position_ids: torch.Tensor | None = None, visible: torch.Tensor | None = None,
                         table: torch.Tensor | None = None) -> torch.Tensor:
        """Unit-length user vector after every position (causal) -> (B, L, H); with ``visible``
        (B, L, L) bool and ``position_ids`` (B, L), the query blocks of :func:`block_layout`;
        ``table`` replaces the item embeddings (:meth:`_train_table`)."""
        return self.normalize(self.head(self.hidden_states(input_ids, attention_mask, position_ids, visible, table)))

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor | None = None, visible: torch.Tensor | None = None,
                      table: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's last hidden state (B, L, H) of :meth:`encode_positions`' inputs."""
        embeds = self._embed(input_ids, table)
        if visible is not None:  # a prepared 4D mask is used as given: bool for sdpa, additive for eager
            mask = visible[:, None]
            if self.encoder.config._attn_implementation == "eager":
                mask = torch.zeros(mask.shape, dtype=embeds.dtype, device=mask.device).masked_fill(
                    ~mask, torch.finfo(embeds.dtype).min)
            attention_mask = mask
        return self.encoder(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (B, L, H); position t sees positions <= t only

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The user vector after the last real position of each :func:`build_sequence_batch` row -> (B, H)."""
        last = attention_mask.sum(dim=1) - 1  # (B,) index of the last real position
        vecs = self.encode_positions(input_ids, attention_mask)  # (B, L, H)
        return vecs[torch.arange(len(last), device=vecs.device), last]  # (B, H)

    def item_vectors(self, table: torch.Tensor | None = None) -> torch.Tensor:
        """Every catalogue item's unit vector (N, H) (the tied item embeddings, or ``table``)."""
        return self.normalize(self.item_emb.weight if table is None else table)

    def input_batch(self, ids_list, special) -> Batch:
        return build_sequence_batch(ids_list, special)

    # --- training --------------------------------------------------------------------------------

    @classmethod
    def train_rows(cls, manifest: dict) -> tuple[int, str]:
        return manifest["counts"]["users"], "users"  # one row per user; a window drawn per step

    @classmethod
    def data_problem(cls, root: str) -> str | None:
        if "profile_ids" not in layout.columns(root, layout.split_part("valid")):
            return f"{root}: prepared by an older recsys_ray (no profile_ids); prepare the data again"
        return None

    @classmethod
    def train_columns(cls, root: str) -> list[str]:
        cols = ["user_id", "item_ids", "n_train"]
        present = layout.columns(root, layout.SEQUENCES)
        cols += [c for c in ("profile_text", "queries") if c in present]
        return cols

    def collator(self, catalogue, special, settings: TrainSettings, tokenizer, rank: int):
        return SequenceCollator(catalogue, special, self.item_offset, self.cfg.history_len, settings.negatives,
                                tokenizer, settings.seed + rank, sampled=settings.loss != "softmax",
                                search_mix=self.cfg.search_mix, search_anonymous=self.cfg.search_anonymous,
                                search_queries=self.cfg.search_queries, holdout_last=self.cfg.holdout_last,
                                text_rows=self.cfg.item_text_encoder, refit=settings.refit)

    def train_scores(self, batch: Batch) -> tuple[torch.Tensor, None]:
        """A prediction at every position with a target: (M, N) over the catalogue, or (M, 1 + K)
        over sampled candidates (column 0 the target)."""
        table = self._train_table(batch.get("text_rows"))  # the same rows read as text on both sides, or None
        vecs = self.encode_positions(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"),
                                     batch.get("visible"), table)  # (B, L, H)
        u = vecs[batch["targets"] >= 0]  # (M, H)
        items = self.item_vectors(table)  # (N, H)
        if "candidates" in batch:
            return torch.einsum("mh,mkh->mk", u, items[batch["candidates"]]) / self.cfg.temperature, None
        return self.score(u, items), None

    def train_loss(self, loss: str, scores: torch.Tensor, extra, batch: Batch) -> torch.Tensor:
        """``softmax`` over the whole catalogue; the sampled losses over each target's list."""
        if loss == "softmax":
            return losses.softmax(scores, batch["targets"][batch["targets"] >= 0])  # (M, N) vs catalogue rows
        return losses.compute_loss(loss, scores)

    def _valid_context(self, row: dict, catalogue, special) -> list[int]:
        """A validation row's :func:`history_context` (profile, seen items)."""
        return history_context(row.get("profile_ids"), [catalogue.index[i] for i in row["seen_item_ids"]],
                               self.item_offset, self.cfg.history_len, special)

    @torch.no_grad()
    def validation_ranks(self, rows, catalogue, special, device, settings: ValidationSettings) -> tuple[list[int], str]:
        def contexts(chunk):
            return [self._valid_context(r, catalogue, special) for r in chunk]

        item_vecs = self.item_vectors().cpu()
        return self.full_ranks(rows, catalogue, item_vecs, special, device, settings.batch_size, contexts), "full"

    @torch.no_grad()
    def search_validation_ranks(self, rows, catalogue, special, device, settings: ValidationSettings) -> list[int]:
        """Full-ranking ranks of the targets of validation rows that carry a query (``query_ids``),
        each read as a search: the user's history, ``[SEP]``, the query."""
        def contexts(chunk):
            return [search_context(self._valid_context(r, catalogue, special), list(r["query_ids"])[:MAX_QUERY_TOKENS],
                                   special) for r in chunk]

        item_vecs = self.item_vectors().cpu()
        return self.full_ranks(rows, catalogue, item_vecs, special, device, settings.batch_size, contexts)

    # --- predictor side ------------------------------------------------------------------------

    def context_ids(self, rows, profile_ids, catalogue, inputs: InputSettings) -> list[int]:
        return history_context(profile_ids, rows, self.item_offset, self.cfg.history_len, inputs.special)

    def example_contexts(self, batch, catalogue, inputs: InputSettings) -> list[list[int]]:
        profiles = batch["profile_ids"] if "profile_ids" in batch else [None] * len(batch["seen_item_ids"])
        return [history_context(list(p) if p is not None else None, catalogue.rows(list(seen)), self.item_offset,
                                self.cfg.history_len, inputs.special)
                for p, seen in zip(profiles, batch["seen_item_ids"], strict=True)]

    def candidate_ids(self, rows, catalogue) -> list[list[int]]:
        return [[self.item_offset + int(r)] for r in rows]

    @property
    def searches(self) -> bool:
        """Whether this checkpoint was trained to read a query (``model.search_mix`` > 0)."""
        return self.cfg.search_mix > 0

    def search_context(self, user_context: Sequence[int] | None, query_ids: Sequence[int],
                       special: tuple[int, int, int]) -> list[int]:
        """Search input ids of a user's context (None: no user) and a query's word pieces."""
        return search_context(user_context if user_context is not None else anonymous_context(special), query_ids,
                              special)

    def candidate_vectors(self, candidates, special, device, batch_size, catalogue_vectors) -> torch.Tensor:
        off = self.item_offset
        rows = [c[0] - off if len(c) == 1 and c[0] >= off else None for c in candidates]
        if any(r is None for r in rows):
            raise RecsysError("this retriever reads item tokens (history='items'): it scores catalogue item ids, not texts")
        return catalogue_vectors()[torch.as_tensor(rows, dtype=torch.long)]

    def catalogue_problem(self, catalogue) -> str | None:
        if self.num_items != len(catalogue):
            return (f"the retriever has {self.num_items} item embeddings but the catalogue has "
                    f"{len(catalogue)} items (another catalogue?)")
        return None

    @torch.no_grad()
    def catalogue_vectors(self, catalogue, special, device, batch_size: int) -> torch.Tensor:
        return self.item_vectors().cpu()
