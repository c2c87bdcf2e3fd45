"""The catalogue: item ids <-> rows, each item's text, token ids and train-event count.

Training, evaluation and serving all index items by their row here. Every training checkpoint
carries its catalogue as ``items.parquet`` (:data:`CATALOGUE_FILE`), so a served model needs
nothing but its checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from recsys_ray.data import layout
from recsys_ray.errors import DataError, UnknownItems, one_line

CATALOGUE_FILE = "items.parquet"  # inside a checkpoint directory


class Catalogue:
    """Item ids <-> rows, each item's text, token ids (no specials) and train-event count."""

    def __init__(self, table: pa.Table):
        missing = [c for c in ("item_id", "input_ids") if c not in table.column_names]
        if missing:
            raise DataError(f"catalogue lacks column(s) {missing}")
        self.ids: list[str] = [str(i) for i in table["item_id"].to_pylist()]
        self.index = {iid: i for i, iid in enumerate(self.ids)}
        self.tokens: list[list[int]] = table["input_ids"].to_pylist()
        self.texts: list[str] = table["text"].to_pylist() if "text" in table.column_names else list(self.ids)
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
        """Write the catalogue as one parquet file (``CATALOGUE_FILE`` inside a checkpoint)."""
        path = Path(path)
        pq.write_table(self.table(), str(path))
        return path

    @classmethod
    def from_data_dir(cls, data_dir: str) -> Catalogue:
        """Items of a prepared data directory, with train counts from its train split."""
        items = layout.read_items(data_dir, ["item_id", "text", "input_ids"])
        if layout.has_part(data_dir, layout.split_part("train")):
            targets = layout.read_split(data_dir, "train", ["target_item_id"])["target_item_id"]
            counts = {d["values"]: d["counts"] for d in pc.value_counts(targets).to_pylist()}
            items = items.append_column(
                "train_count", pa.array([counts.get(i, 0) for i in items["item_id"].to_pylist()], pa.int64())
            )
        return cls(items)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Catalogue:
        """A prepared data dir (local or a URI), a checkpoint dir (its items.parquet) or an items
        parquet file/dir."""
        if layout.is_prepared(str(path)):
            return cls.from_data_dir(str(path))
        p = Path(path)
        if (p / CATALOGUE_FILE).is_file():
            p = p / CATALOGUE_FILE
        if not p.exists():
            raise DataError(f"catalogue not found: {path}")
        try:
            return cls(pads.dataset(str(p), format="parquet").to_table())
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"{path}: unreadable catalogue ({one_line(exc)})") from None
