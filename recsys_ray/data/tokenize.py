"""Tokenization for the data pipeline (no padding here: batches are padded in the loader).

The tokenizer of an encoder name comes from :func:`recsys_ray.model.tokenizer.load_tokenizer`
(the one loader data preparation, training and serving share).

Items and profiles are tokenized once (``TextTokenizer`` on a Ray Data actor pool). A user
context is the concatenation of its pieces' ids (``ContextEncoder``): for BERT's WordPiece
(whitespace + punctuation pre-tokenization, per-character normalisation) this equals
tokenizing the rendered context string, which ``ContextEncoder.check`` verifies on samples
at start-up; for a tokenizer where it does not hold it tokenizes each context string instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from recsys_ray.data import text as T
from recsys_ray.model.tokenizer import load_tokenizer, resolve_encoder_path, vocab_digest

log = logging.getLogger(__name__)


def tokenizer_info(name: str) -> dict:
    """What the manifest records about the tokenizer, so a mismatched model can be refused."""
    tok = load_tokenizer(name)
    return {
        "name": name,
        "path": resolve_encoder_path(name),
        "class": type(tok).__name__,
        "vocab_size": len(tok.get_vocab()),
        "vocab_sha256": vocab_digest(tok),
        "cls_token_id": tok.cls_token_id,
        "sep_token_id": tok.sep_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def encode_texts(tok, texts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
    """Token ids without special tokens, cut to ``max_tokens`` from the end (None = no cut)."""
    if not len(texts):
        return []
    enc = tok(
        list(texts),
        add_special_tokens=False,
        truncation=max_tokens is not None,
        max_length=max_tokens,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    return enc["input_ids"]


def list_column(ids: list[list[int]]) -> pa.Array:
    """Python lists of ids -> arrow list<int32> (int32 halves the size of the parquet)."""
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum([len(x) for x in ids], out=offsets[1:])
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


class TextTokenizer:
    """Ray Data UDF: adds ``out_column`` (list<int32>) tokenizing ``column``. One tokenizer per actor."""

    def __init__(self, tokenizer: str, column: str, out_column: str, max_tokens: int | None):
        self.tok = load_tokenizer(tokenizer)
        self.column, self.out_column, self.max_tokens = column, out_column, max_tokens

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch[self.column].to_pylist()
        ids = encode_texts(self.tok, [t or "" for t in texts], self.max_tokens)
        return batch.append_column(self.out_column, list_column(ids))


class ContextEncoder:
    """Builds context token ids from already-tokenized pieces (profile, items)."""

    def __init__(self, tok, max_tokens: int):
        self.tok = tok
        self.max_tokens = max_tokens

        def ids(s: str) -> list[int]:
            return encode_texts(tok, [s])[0]

        self.field_sep = ids(T.FIELD_SEP.strip())
        self.history_prefix = ids(T.HISTORY_PREFIX)
        self.history_sep = ids(T.HISTORY_SEP.strip())
        self.empty = ids(T.EMPTY_HISTORY)
        self.concat_ok = True

    def check(self, samples: Sequence[tuple[str, Sequence[str], list[int], Sequence[list[int]]]]) -> bool:
        """Compare concatenation with direct tokenization on (profile, item texts, ids...) samples."""
        for profile_text, item_texts, profile_ids, item_ids in samples:
            text = T.render_context(profile_text, item_texts)
            direct = encode_texts(self.tok, [text], self.max_tokens)[0]
            if self.encode(profile_ids, item_ids) != direct:
                log.warning("tokenizer is not concatenation-safe; tokenizing every context (slower)")
                self.concat_ok = False
                return False
        return True

    def encode(self, profile_ids: list[int] | None, history_ids: Sequence[list[int]]) -> list[int]:
        """Ids of ``render_context`` for these pieces, cut to ``max_tokens``."""
        out: list[int] = []
        if profile_ids:
            out += profile_ids
            out += self.field_sep
        out += self.history_prefix
        if not history_ids:
            out += self.empty
        for i, item in enumerate(history_ids):
            if len(out) >= self.max_tokens:
                break  # the rest would be truncated anyway
            if i:
                out += self.history_sep
            out += item
        return out[: self.max_tokens]

    def encode_texts(self, contexts: Sequence[str]) -> list[list[int]]:
        """Fallback: tokenize rendered context strings directly."""
        return encode_texts(self.tok, contexts, self.max_tokens)
