"""What every model kind shares: one BERT encoder, its head, checkpoints, padding, the contract.

A model kind (``recsys_ray/model/kinds/<kind>.py``) subclasses :class:`BertRecommender` (or
:class:`Retriever`) and owns everything that differs between kinds: its head and tables, how
training batches are built from the prepared data and scored, which loss form each loss name
takes, how validation ranks items, and how the Predictor turns a user and candidates into inputs.
Training, evaluation, the Predictor and Serve call only the methods declared here; which class a
config or a checkpoint means is decided by the registry in :mod:`recsys_ray.model.kinds`.

Shapes in comments: B rows, L tokens, H hidden size, N items.

Checkpoint files (see :mod:`recsys_ray.checkpoint`): ``model.safetensors`` (this module's whole
state dict), ``config.json`` (the BERT config), the tokenizer files and ``recsys_ray.json``
(ModelConfig + the caller's extras). A LoRA model is saved UNMERGED: adapter tensors live under
their PEFT names (``...attention.self.query.lora_A.default.weight``, base weight
``...query.base_layer.weight``) and :meth:`BertRecommender.from_checkpoint` injects the same
adapters before loading, so reloaded scores are bit-identical and training can resume on the
adapters alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase

from recsys_ray import checkpoint
from recsys_ray.data.catalogue import Catalogue
from recsys_ray.data.tokenize import ContextEncoder
from recsys_ray.errors import RecsysError, one_line
from recsys_ray.evaluate.metrics import target_ranks
from recsys_ray.model.config import ModelConfig, parse_freeze
from recsys_ray.model.encoder import apply_freeze, inject_lora, load_bert
from recsys_ray.model.tokenizer import load_tokenizer, special_ids

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


@dataclass
class InputSettings:
    """How the Predictor turns a user into model inputs: the settings its checkpoint's data was
    prepared and trained with (``extra["text"]``, ``extra["train_config"]``)."""

    tokenizer: PreTrainedTokenizerBase
    max_history: int  # most recent history items in a text context
    profile_columns: list[str]  # profile fields, in order (empty: the request's own order)
    max_context_tokens: int  # text context token budget (the oldest history is cut first)

    def __post_init__(self):
        self.special = special_ids(self.tokenizer)
        self.context_encoder = ContextEncoder(self.tokenizer, self.max_context_tokens)


@dataclass
class TrainSettings:
    """What a kind's batches and loss need from the training config (a plain, picklable subset)."""

    loss: str
    negatives: int
    max_context_tokens: int  # 0 = as prepared
    seed: int
    refit: bool = False  # also train on each user's validation event (TrainConfig.refit)


@dataclass
class ValidationSettings:
    """What a kind's validation needs (TrainConfig.eval plus the context cut)."""

    batch_size: int
    ranker_candidates: int
    seed: int
    max_context_tokens: int  # 0 = as prepared


def pad_rows(rows: list[np.ndarray], first_lengths: list[int], pad_id: int) -> Batch:
    """Right-pad id rows to the longest: ``input_ids``, ``attention_mask``, ``token_type_ids``
    (segment 1 from ``first_lengths[i]`` on), each (B, L)."""
    if not rows:
        raise ValueError("cannot build an empty batch")
    width = max(len(r) for r in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)  # (B, L)
    attention_mask = np.zeros((len(rows), width), dtype=np.int64)  # (B, L)
    token_type_ids = np.zeros((len(rows), width), dtype=np.int64)  # (B, L)
    for i, (row, first) in enumerate(zip(rows, first_lengths, strict=True)):
        input_ids[i, : len(row)] = row
        attention_mask[i, : len(row)] = 1
        token_type_ids[i, first: len(row)] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "token_type_ids": torch.from_numpy(token_type_ids),
    }


def ordered_chunks(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Indices sorted by length, cut into batches (similar lengths together: little padding)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


class ExampleCandidates:
    """A train example's candidate rows: its positive, then ``negatives`` prepared negatives
    (topped up with random items other than the positive when a tiny catalogue left too few)."""

    def __init__(self, catalogue: Catalogue, negatives: int, seed: int):
        self.items, self.k = catalogue, negatives
        self.rng = np.random.default_rng(seed)

    def __call__(self, row: dict) -> list[int]:
        pos = self.items.index[row["target_item_id"]]
        negs = [self.items.index[n] for n in row["negative_item_ids"][: self.k]]
        while len(negs) < self.k:
            c = int(self.rng.integers(len(self.items)))
            if c != pos:
                negs.append(c)
        return [pos, *negs]


def cut_contexts(rows: list[dict], max_context_tokens: int) -> list[list[int]]:
    """Each row's ``context_ids``, cut to ``max_context_tokens`` (0 = as prepared)."""
    return [list(r["context_ids"])[:max_context_tokens] if max_context_tokens else list(r["context_ids"]) for r in rows]


class BertRecommender(nn.Module):
    """One BERT encoder + a kind's head; the contract every model kind fulfils.

    Build with :func:`recsys_ray.model.kinds.from_config` or ``load_model`` (both return the model
    in eval mode, like Hugging Face), so call ``.train()`` before training.
    """

    kind: ClassVar[str]  # ModelConfig.kind this class implements ("ranker" | "retriever")
    history: ClassVar[str]  # ModelConfig.history this class implements ("text" | "items")
    train_part: ClassVar[str]  # the prepared-data part it trains from (recsys_ray.data.layout)
    bucket_key: ClassVar[str]  # the column whose length sorts training rows into buckets
    scores_texts: ClassVar[bool] = True  # whether free-text candidates can be scored
    prepared_negatives: ClassVar[bool] = True  # whether training reads the negatives prepare_data sampled

    def __init__(self, cfg: ModelConfig, encoder: BertModel, tokenizer: PreTrainedTokenizerBase | None = None,
                 num_items: int = 0):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self._add_tables(num_items, hidden)  # before the head: parameter order and RNG draws fixed
        self._add_head(hidden)
        self.tokenizer = tokenizer  # saved with the checkpoint; not a module, so not in state_dict
        self.extra: dict = {}  # the `extra` dict of the checkpoint this model was loaded from
        self.lora_rank: int | None = None  # set when LoRA adapters are injected
        self.source: Path | None = None  # the checkpoint folder it was loaded from

    # --- what a kind defines ---------------------------------------------------------------------

    def _add_tables(self, num_items: int, hidden: int) -> None:
        """Per-item parameters (none unless the kind has them)."""

    def _add_head(self, hidden: int) -> None:
        raise NotImplementedError

    @classmethod
    def encoder_options(cls) -> dict:
        """BertConfig overrides this kind reads the encoder with (e.g. a causal mask)."""
        return {}

    def encoder_owners(self) -> list[nn.Module]:
        """Every module whose ``.encoder`` is a BERT this model runs when it scores (compression
        replaces each one: :func:`recsys_ray.model.compress.compress`); a kind holding a second
        encoder (the items ranker's frozen first stage) adds its owner."""
        return [self]

    def init_tables(self, item_tokens: Sequence[Sequence[int]] | None) -> None:
        """A new model's per-item parameters from the catalogue (none unless the kind has them)."""

    def adopt_catalogue(self, old: Catalogue, new: Catalogue) -> dict:
        """Take ``new`` as the catalogue of a model trained on ``old`` (a warm start on newer data):
        kinds with per-item tables re-index them; text kinds read the items' text and change
        nothing. Returns ``{"kept", "new", "dropped"}`` item counts."""
        kept = sum(1 for iid in new.ids if iid in old.index)
        return {"kept": kept, "new": len(new) - kept, "dropped": len(old) - kept}

    def reinit_items(self, rows: Sequence[int], item_tokens: Sequence[Sequence[int]]) -> None:
        """Give these catalogue rows their first-training initialisation again (kinds with per-item
        tables; text kinds read the item text and change nothing): an item the model must treat
        as never seen, e.g. a held-out cold item that a full-catalogue softmax trained as a negative."""

    @classmethod
    def train_rows(cls, manifest: dict) -> tuple[int, str]:
        """(rows one epoch covers, what they are) in the prepared data."""
        raise NotImplementedError

    @classmethod
    def data_problem(cls, root: str) -> str | None:
        """What the prepared data lacks for training this kind beyond its parts (None: nothing)."""
        return None

    @classmethod
    def train_columns(cls, root: str) -> list[str] | None:
        """Columns of ``train_part`` the batches read (None: all)."""
        return None

    def collator(self, catalogue: Catalogue, special: tuple[int, int, int], settings: TrainSettings,
                 tokenizer: PreTrainedTokenizerBase, rank: int) -> Callable[[list[dict]], Batch]:
        """Rows of ``train_part`` -> one micro-batch of tensors (with a ``tokens`` count)."""
        raise NotImplementedError

    def train_scores(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward pass over a micro-batch: the scores the loss reads (what DDP wraps)."""
        raise NotImplementedError

    def train_loss(self, loss: str, scores: torch.Tensor, extra: torch.Tensor | None, batch: Batch) -> torch.Tensor:
        """The loss ``loss`` in this kind's form (in-batch, full catalogue or sampled list)."""
        raise NotImplementedError

    def validation_ranks(self, rows: list[dict], catalogue: Catalogue, special: tuple[int, int, int],
                         device: torch.device, settings: ValidationSettings) -> tuple[list[int], str]:
        """0-based rank of each validation row's target, and the protocol ("full" or sampled)."""
        raise NotImplementedError

    # predictor-side inputs (ids without special tokens, what the prepared data stores)

    def context_ids(self, rows: Sequence[int], profile_ids: Sequence[int] | None, catalogue: Catalogue,
                    text: InputSettings) -> list[int]:
        """A user's model input: ``rows`` = catalogue rows of the history, oldest first."""
        raise NotImplementedError

    def example_contexts(self, batch: Mapping[str, Sequence], catalogue: Catalogue, text: InputSettings) -> list[list[int]]:
        """Contexts of prepared valid/test example rows."""
        return [list(c) for c in batch["context_ids"]]

    def candidate_ids(self, rows: Sequence[int], catalogue: Catalogue) -> list[list[int]]:
        """Catalogue rows as this model's candidate inputs."""
        return [catalogue.tokens[r] for r in rows]

    searches = False  # reads a typed query with the user (the item-token retriever with model.search_mix > 0)

    def search_context(self, user_context: Sequence[int] | None, query_ids: Sequence[int],
                       special: tuple[int, int, int]) -> list[int]:
        raise RecsysError(f"a {self.kind} with history={self.history!r} does not read queries")

    def catalogue_problem(self, catalogue: Catalogue) -> str | None:
        """Why this model cannot serve ``catalogue`` (None: it can)."""
        return None

    # --- bookkeeping ---------------------------------------------------------------------------

    def trainable_parameters(self) -> int:
        """Number of parameter values that receive gradients."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def total_parameters(self) -> int:
        """Number of parameter values, frozen ones (and LoRA base weights) included."""
        return sum(p.numel() for p in self.parameters())

    # --- construction and checkpoints ------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None,
                    item_tokens: Sequence[Sequence[int]] | None = None) -> BertRecommender:
        """New model: pretrained (or tiny random) encoder, fresh head, ``cfg.freeze`` applied.

        ``item_tokens`` (each catalogue item's token ids, in row order) sizes and initialises the
        per-item parameters of kinds that have them.
        """
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.encoder)
        encoder = load_bert(cfg.encoder, cfg.tiny, tokenizer, **cls.encoder_options())
        model = cls(cfg, encoder, tokenizer, num_items=len(item_tokens or ()))
        model.init_tables(item_tokens)
        info = apply_freeze(model, cfg.freeze)
        log.info(
            "model: %s/%s on %s, freeze=%s, %d of %d parameters train",
            cfg.kind, cfg.history, "tiny random BERT" if cfg.tiny is not None else cfg.encoder,
            cfg.freeze, info["trainable"], info["total"],
        )
        return model.eval()

    def save(self, path: str | os.PathLike, extra: dict | None = None,
             tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
        """Write the model files of a checkpoint directory; ``extra`` (JSON-able: metrics, step,
        data fingerprint, text config) goes into recsys_ray.json. Under DDP call it on the model,
        not the DDP wrapper."""
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is None:
            raise RecsysError(f"cannot save {path}: the model has no tokenizer (pass tokenizer=)")
        try:  # serialise first: a bad `extra` must not leave half a checkpoint behind
            text = checkpoint.meta_text(dataclasses.asdict(self.cfg), extra)
        except RecsysError as exc:
            raise RecsysError(f"cannot save {path}: {exc}") from None
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / checkpoint.WEIGHTS_FILE), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(path))
        # full config, not the diff against defaults: defaults may change between transformers versions
        self.encoder.config.to_json_file(str(path / checkpoint.BERT_CONFIG_FILE), use_diff=False)
        (path / checkpoint.META_FILE).write_text(text)
        return path

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, cfg: ModelConfig, meta: dict,
                        map_location: str | torch.device = "cpu") -> BertRecommender:
        """Load the model files of a checkpoint directory whose recsys_ray.json names this kind
        (called by :func:`recsys_ray.model.kinds.load_model`, which reads and checks the config)."""
        path = Path(path)
        # without its files AutoTokenizer still builds a tokenizer (of the special tokens only)
        if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
            raise RecsysError(f"{path}: cannot read config or tokenizer (no tokenizer.json or vocab.txt)")
        try:
            bert_config = BertConfig.from_json_file(str(path / checkpoint.BERT_CONFIG_FILE))
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise RecsysError(f"{path}: cannot read config or tokenizer ({one_line(exc)})") from None
        if len(tokenizer) > bert_config.vocab_size:
            raise RecsysError(f"{path}: the tokenizer has {len(tokenizer)} tokens, the encoder's vocabulary "
                              f"{bert_config.vocab_size}: they come from different models")
        try:
            state = load_file(str(path / checkpoint.WEIGHTS_FILE), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise RecsysError(f"{path / checkpoint.WEIGHTS_FILE}: unreadable safetensors ({one_line(exc)})") from None
        model = cls(cfg, BertModel(bert_config, add_pooling_layer=False), tokenizer,
                    num_items=cls.saved_items(state, path))
        kind, rank = parse_freeze(cfg.freeze)
        if kind == "lora":  # adapters were saved unmerged: recreate them so the keys match
            inject_lora(model, rank)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise RecsysError(f"{path / checkpoint.WEIGHTS_FILE}: weights do not match the saved config "
                              f"({one_line(exc)})") from None
        apply_freeze(model, cfg.freeze)  # requires_grad is not saved; resume trains what it trained
        model.extra = meta.get("extra") or {}
        model.source = path
        return model.to(map_location).eval()

    @classmethod
    def saved_items(cls, state: dict[str, torch.Tensor], path: Path) -> int:
        """How many per-item rows a saved state dict holds (0 for kinds without)."""
        return 0


def kind_problem(cfg: ModelConfig, known: Mapping[tuple[str, str], type]) -> str | None:
    """Why no model kind in ``known`` reads ``cfg`` ((kind, history) pairs), or None."""
    if (cfg.kind, cfg.history) in known:
        return None
    kinds, histories = sorted({k for k, _ in known}), sorted({h for _, h in known})
    if cfg.kind not in kinds:
        return f"model.kind must be one of {', '.join(kinds)}, got {cfg.kind!r}"
    if cfg.history not in histories:
        return f"model.history must be one of {', '.join(histories)}, got {cfg.history!r}"
    readers = [k for k, h in known if h == cfg.history]
    return f"model.history {cfg.history!r} needs model.kind {' or '.join(map(repr, readers))}"


class Retriever(BertRecommender):
    """A dual encoder: users (and text items) -> unit vectors; score = cosine / temperature.

    The head is a projection initialised to the identity: at step 0 it returns the pretrained
    encoder's vectors unchanged, and under ``freeze="encoder"`` it is the part that trains (a
    temperature alone would leave the ranking fixed).
    """

    kind = "retriever"

    def _add_head(self, hidden: int) -> None:
        self.head = nn.Linear(hidden, hidden)
        nn.init.eye_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Unit-length vector per input row -> (B, H)."""
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`encode` (call the model, not the method, under DDP so gradients synchronise)."""
        return self.encode(input_ids, attention_mask, token_type_ids)

    def score(self, user_vecs: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarity of every user with every item: (B, H) x (N, H) -> (B, N)."""
        return user_vecs @ item_vecs.T / self.cfg.temperature  # (B, N)

    @staticmethod
    def normalize(h: torch.Tensor) -> torch.Tensor:
        """Unit length in float32: under bf16 autocast the dot products would lose the ranking."""
        return F.normalize(h.float(), dim=-1)

    def input_batch(self, ids_list: Sequence[Sequence[int]], special: tuple[int, int, int]) -> Batch:
        """Model inputs of id lists as :meth:`encode` reads them."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_batched(self, ids_list: Sequence[Sequence[int]], special: tuple[int, int, int],
                       device: torch.device | str, batch_size: int) -> torch.Tensor:
        """Vectors (N, H) of id lists, float32 on CPU, in the given order; rows are sorted by
        length into batches (similar lengths together: little padding)."""
        out = torch.empty(len(ids_list), self.encoder.config.hidden_size)
        for idx in ordered_chunks([len(x) for x in ids_list], batch_size):
            b = self.input_batch([ids_list[i] for i in idx], special)
            out[torch.as_tensor(idx)] = self.encode(b["input_ids"].to(device), b["attention_mask"].to(device)).float().cpu()
        return out

    # predictor side

    def user_vectors(self, contexts: Sequence[Sequence[int]], special: tuple[int, int, int], device,
                     batch_size: int, max_context_tokens: int) -> torch.Tensor:
        """Vectors (B, H) of user contexts."""
        return self.encode_batched(contexts, special, device, batch_size)

    def candidate_vectors(self, candidates: Sequence[Sequence[int]], special: tuple[int, int, int], device,
                          batch_size: int, catalogue_vectors: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Vectors (N, H) of candidates (see :meth:`candidate_ids`); ``catalogue_vectors`` gives
        the (cached) vectors of the whole catalogue."""
        return self.encode_batched(candidates, special, device, batch_size)

    def catalogue_vectors(self, catalogue: Catalogue, special: tuple[int, int, int], device,
                          batch_size: int) -> torch.Tensor:
        """Every catalogue item's vector (I, H), float32 on CPU."""
        raise NotImplementedError

    @torch.no_grad()
    def full_ranks(self, rows: list[dict], catalogue: Catalogue, item_vecs: torch.Tensor, special, device,
                   batch_size: int, contexts: Callable[[list[dict]], list[list[int]]]) -> list[int]:
        """Rank of each validation row's target among every catalogue item (its seen items
        masked, ties against it); ``contexts(chunk)`` builds a chunk of rows' model inputs.
        Rows whose target repeats a seen item are not given (``metrics.repeats_history``)."""
        ranks: list[int] = []
        for s in range(0, len(rows), batch_size):
            chunk = rows[s : s + batch_size]
            b = self.input_batch(contexts(chunk), special)
            u = self.encode(b["input_ids"].to(device), b["attention_mask"].to(device)).float().cpu()
            scores = self.score(u, item_vecs).numpy()  # (b, I)
            target = np.array([catalogue.index[r["target_item_id"]] for r in chunk])
            seen = np.zeros_like(scores, dtype=bool)
            for j, r in enumerate(chunk):
                seen[j, [catalogue.index[i] for i in r["seen_item_ids"]]] = True
            ranks.extend(target_ranks(scores, target, seen).tolist())
        return ranks
