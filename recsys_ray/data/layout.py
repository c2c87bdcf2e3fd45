"""The prepared-data folder (what ``jobs/prepare_data.py`` writes) and its one reader.

::

    OUTPUT/
      manifest.json          counts, rejects by reason, tokenizer, text config, fingerprint
      items/                 the catalogue, one row per item
      sequences/             one row per user: the ordered history and its split
      examples/split=train/  one row per train target; split=valid/, split=test/: one per user
      rejects/               bad log rows with a reason (absent when there are none)
      user_rejects/          bad user-file rows with a reason (absent when there are none)
      source/                built-in datasets only: the tables read from the source

Columns: ``docs/data_format.md``. Every path here may be local or a URI (``s3://``); reads go
through :mod:`recsys_ray.storage`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from recsys_ray import storage
from recsys_ray.errors import DataError, one_line

MANIFEST = "manifest.json"
ITEMS = "items"
SEQUENCES = "sequences"
EXAMPLES = "examples"
REJECTS = "rejects"
USER_REJECTS = "user_rejects"
SOURCE = "source"
SPLITS = ("train", "valid", "test")
COLD_USERS = "cold_users"  # DataConfig.cold_users: rows of held-out users (profile + first k events -> event k)
COLD_USER_EVENTS = 3  # a cold user's rows: its first 0, 1, 2 events known, the next one the target
PARTS = (ITEMS, SEQUENCES, EXAMPLES, REJECTS, USER_REJECTS, SOURCE, MANIFEST)  # what a preparation (re)writes


def split_part(split: str) -> str:
    """The folder of one split, relative to the data root: ``examples/split=valid``."""
    if split not in (*SPLITS, COLD_USERS):
        raise ValueError(f"split must be one of {(*SPLITS, COLD_USERS)}, got {split!r}")
    return f"{EXAMPLES}/split={split}"


def part_path(root: str, part: str) -> str:
    """``root/part`` for a local root or a URI."""
    return storage.join(str(root), part)


def has_part(root: str, part: str) -> bool:
    """Whether ``root/part`` is a folder."""
    return storage.is_dir(part_path(root, part))


def require_parts(root: str, parts: Sequence[str]) -> None:
    """DataError naming the first missing folder of a prepared data directory."""
    for part in parts:
        if not has_part(root, part):
            raise DataError(f"{root}: missing {part}/ (prepare the data again)")


def read_manifest(root: str) -> dict:
    """``manifest.json`` of a prepared data directory (DataError when it is not one)."""
    text = storage.read_text(part_path(root, MANIFEST))
    if text is None:
        raise DataError(f"{root}: no manifest.json (prepare the data with jobs/prepare_data.py first)")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise DataError(f"{part_path(root, MANIFEST)}: unreadable ({one_line(exc)})") from None


def is_prepared(root: str) -> bool:
    """Whether ``root`` looks like a prepared data directory (a manifest and a catalogue)."""
    return storage.read_text(part_path(root, MANIFEST)) is not None and has_part(root, ITEMS)


def _dataset(root: str, part: str) -> pads.Dataset:
    if not has_part(root, part):
        what = {ITEMS: "catalogue", SEQUENCES: "sequences"}.get(part, part.split("=")[-1] + " split")
        raise DataError(f"{part_path(root, part)}: no prepared {what} (run jobs/prepare_data.py first)")
    fs, path = storage.filesystem(part_path(root, part))
    return pads.dataset(path, format="parquet", filesystem=fs)


def columns(root: str, part: str) -> list[str]:
    """Column names of one part (``items``, ``sequences`` or :func:`split_part`)."""
    return list(_dataset(root, part).schema.names)


def read_table(root: str, part: str, columns: Sequence[str] | None = None) -> pa.Table:
    """One part as a pyarrow Table (the catalogue, sequences, the small valid/test splits)."""
    return _dataset(root, part).to_table(columns=list(columns) if columns is not None else None)


def read_split(root: str, split: str, columns: Sequence[str] | None = None) -> pa.Table:
    """A prepared split as one pyarrow Table (valid / test; train only when it is small)."""
    return read_table(root, split_part(split), columns)


def read_split_rows(root: str, split: str) -> list[dict]:
    """A small split (valid / test) as row dicts."""
    return read_split(root, split).to_pylist()


def read_items(root: str, columns: Sequence[str] | None = None) -> pa.Table:
    """The tokenized catalogue (``items/``)."""
    return read_table(root, ITEMS, columns)


def read_sequences(root: str, columns: Sequence[str] | None = None) -> pa.Table:
    """One row per user: ``item_ids`` in time order and ``n_train`` (``sequences/``)."""
    return read_table(root, SEQUENCES, columns)


def dataset_target(root: str, part: str) -> tuple[str, pafs.FileSystem | None]:
    """(path, filesystem) of one part for Ray Data's readers and writers (see
    :func:`recsys_ray.storage.ray_target`)."""
    uri = part_path(root, part)
    return (uri, None) if not storage.is_remote(uri) else storage.ray_target(uri)


def read_dataset(root: str, part: str, columns: Sequence[str] | None = None, **kwargs):
    """One part as a Ray Dataset (streamed: the train split, sequences for training)."""
    import ray.data  # Ray Data is a heavy import; only streaming readers need it

    _dataset(root, part)  # the same DataError as the table readers for a missing part
    path, fs = dataset_target(root, part)
    return ray.data.read_parquet(path, filesystem=fs, columns=list(columns) if columns else None, **kwargs)


def count_rows(root: str, part: str) -> int:
    """Rows of one part (0 when it does not exist)."""
    return _dataset(root, part).count_rows() if has_part(root, part) else 0
