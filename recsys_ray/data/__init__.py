"""Behaviour logs -> validated, split, tokenized examples (Ray Data). See docs/data_format.md."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads

from recsys_ray.errors import DataError

SPLITS = ("train", "valid", "test")


def _split_dir(output: str | Path, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(output) / "examples" / f"split={split}"
    if not path.is_dir():
        raise DataError(f"{path}: no prepared {split} split (run jobs/prepare_data.py first)")
    return path


def load_split(output: str | Path, split: str):
    """A prepared split as a Ray Dataset (streamed, for training and batch inference)."""
    import ray

    return ray.data.read_parquet(str(_split_dir(output, split)))


def read_split_table(output: str | Path, split: str, columns: list[str] | None = None) -> pa.Table:
    """A prepared split as one pyarrow Table (for the small valid/test splits)."""
    return pads.dataset(str(_split_dir(output, split)), format="parquet").to_table(columns=columns)


def read_items(output: str | Path) -> pa.Table:
    """The tokenized catalogue written by the preparation."""
    path = Path(output) / "items"
    if not path.is_dir():
        raise DataError(f"{path}: no prepared catalogue (run jobs/prepare_data.py first)")
    return pads.dataset(str(path), format="parquet").to_table()
