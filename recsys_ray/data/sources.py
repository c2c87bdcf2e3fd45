"""Where a preparation's events, catalogue and user profiles come from, read and checked on the
driver before any Ray work: the built-in datasets (MovieLens-100K, synthetic) are materialised
into ``OUTPUT/source/``; generic logs are described by the config's paths and column names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys_ray import storage
from recsys_ray.config import to_dict
from recsys_ray.data import layout, movielens, queries, synthetic
from recsys_ray.data import text as T
from recsys_ray.data.config import ColumnMap, DataConfig
from recsys_ray.data.files import FileRef, list_files, read_columns, read_table
from recsys_ray.data.validate import canonical_ids, log_columns, required_columns
from recsys_ray.errors import DataError


@dataclass
class Source:
    """Where the events, catalogue and profiles are, and how to read them."""

    events: str
    items: str
    users: str | None
    columns: ColumnMap
    format: str
    timestamp_unit: str
    item_id_column: str
    user_id_column: str
    item_text_columns: list[str]
    user_profile_columns: list[str]
    description: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# sources


def resolve_source(cfg: DataConfig, out: str) -> Source:
    """Materialise built-in datasets into ``out/source`` (local or a URI, where every node can
    read them) and describe any source uniformly."""
    src = layout.part_path(out, layout.SOURCE)
    if cfg.dataset == "movielens-100k":
        tables, desc = movielens.load_movielens(cfg.movielens_path, cfg.cache_dir)
        if cfg.queries == "metadata":  # every event a search event, its query from the item's metadata
            tables["events"] = tables["events"].append_column(
                "query", queries.metadata_queries(tables["events"], tables["items"], cfg.seed))
        for name, table in tables.items():
            storage.write_parquet(table, storage.join(src, f"{name}.parquet"))
        return Source(
            events=storage.join(src, "events.parquet"),
            items=storage.join(src, "items.parquet"),
            users=storage.join(src, "users.parquet"),
            columns=ColumnMap(value="rating", query="query" if cfg.queries == "metadata" else None),
            format="parquet",
            timestamp_unit="s",
            item_id_column="item_id",
            user_id_column="user_id",
            item_text_columns=cfg.item_text_columns or movielens.ITEM_TEXT_COLUMNS,
            user_profile_columns=cfg.user_profile_columns or movielens.USER_PROFILE_COLUMNS,
            description={"dataset": "movielens-100k", **desc},
        )
    if cfg.dataset == "synthetic":
        paths = synthetic.write_synthetic(cfg.synthetic, cfg.seed, src)
        return Source(
            events=paths["events"],
            items=paths["items"],
            users=paths["users"],
            columns=ColumnMap(event="event"),
            format="parquet",
            timestamp_unit="s",
            item_id_column="item_id",
            user_id_column="user_id",
            item_text_columns=cfg.item_text_columns or ["title", "description"],
            user_profile_columns=cfg.user_profile_columns or ["age", "country"],
            description={"dataset": "synthetic", "seed": cfg.seed, **to_dict(cfg.synthetic)},
        )
    if not cfg.items:
        raise DataError(f"items: an item catalogue file is required for logs at {cfg.dataset}")
    return Source(
        events=cfg.dataset,
        items=cfg.items,
        users=cfg.users,
        columns=cfg.columns,
        format=cfg.format,
        timestamp_unit=cfg.timestamp_unit,
        item_id_column=cfg.item_id_column,
        user_id_column=cfg.user_id_column,
        item_text_columns=list(cfg.item_text_columns),
        user_profile_columns=list(cfg.user_profile_columns),
        description={"dataset": cfg.dataset, "items": cfg.items, "users": cfg.users},
    )


def check_log_files(refs: list[FileRef], columns: ColumnMap) -> None:
    """Every file has every mapped column (checked before any Ray work)."""
    for ref in refs:
        present = read_columns(ref)
        for col in log_columns(columns):
            if col not in present:
                kind = "required" if col in required_columns(columns) else "mapped"
                raise DataError(
                    f"{ref.uri}: missing {kind} column {col!r} (has: {', '.join(present) or 'none'})"
                )


def load_catalogue(src: Source) -> tuple[pa.Table, list[str]]:
    """Catalogue -> (item_id, text, <text columns>) with unique, non-empty ids."""
    table = read_table(src.items)
    name = src.items
    if src.item_id_column not in table.column_names:
        raise DataError(f"{name}: missing column {src.item_id_column!r} (has: {', '.join(table.column_names)})")
    text_cols = src.item_text_columns or [c for c in table.column_names if c != src.item_id_column]
    missing = [c for c in text_cols if c not in table.column_names]
    if missing:
        raise DataError(f"{name}: missing item text column {missing[0]!r} (has: {', '.join(table.column_names)})")
    if not text_cols:
        raise DataError(f"{name}: no text columns besides {src.item_id_column!r}")
    if table.num_rows == 0:
        raise DataError(f"{name}: the item catalogue is empty")
    ids = canonical_ids(table[src.item_id_column])  # the logs' id rule
    empty = np.flatnonzero(np.asarray(ids.is_null()))
    if len(empty):
        raise DataError(f"{name}: row {int(empty[0])}: empty {src.item_id_column}")
    counts = pc.value_counts(ids)
    dup = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(dup):
        first = dup[0]["values"].as_py()
        rows = np.flatnonzero(np.asarray(pc.equal(ids, first)))[:2].tolist()
        raise DataError(f"{name}: duplicate {src.item_id_column} {first!r} at rows {rows[0]} and {rows[1]}")
    records = table.select(text_cols).to_pylist()
    texts = [T.render_item(r, text_cols) for r in records]
    out = pa.table({"item_id": ids, "text": pa.array(texts, pa.string())})
    for c in text_cols:
        if c not in ("item_id", "text"):
            out = out.append_column(c, table[c])
    return out, text_cols


def profile_columns(src: Source) -> tuple[list[FileRef], list[str]]:
    """The user files and the profile columns read from them (none without a user file)."""
    user_refs = list_files(src.users, "auto") if src.users else []
    if not user_refs:
        return [], []
    present = read_columns(user_refs[0])
    if src.user_id_column not in present:
        raise DataError(f"{user_refs[0].uri}: missing column {src.user_id_column!r} (has: {', '.join(present)})")
    cols = src.user_profile_columns or [c for c in present if c != src.user_id_column]
    missing = [c for c in cols if c not in present]
    if missing:
        raise DataError(f"{user_refs[0].uri}: missing profile column {missing[0]!r} (has: {', '.join(present)})")
    return user_refs, cols
