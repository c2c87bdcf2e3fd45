"""Row-level validation of behaviour logs: every row is accepted or rejected with a reason.

``validate_batch`` turns a raw batch (the log's own column names and types) into the canonical
event schema below; rejected rows keep their source file, row number, reason and raw values,
so accepted + rejected always equals rows read.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from recsys_ray.data.config import ColumnMap
from recsys_ray.data.timestamps import parse_timestamps

EVENT_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("timestamp", pa.timestamp("us", tz="UTC")),
        ("event", pa.string()),
        ("value", pa.float64()),
        ("query", pa.string()),  # null = a browsing event (no query column, or an empty query)
        ("source_file", pa.string()),
        ("file_idx", pa.int32()),
        ("source_row", pa.int64()),
        ("reason", pa.string()),  # null = accepted
        ("detail", pa.string()),
        ("raw", pa.string()),
    ]
)
REJECT_COLUMNS = ["source_file", "source_row", "reason", "detail", "raw"]
REASONS = (
    "malformed_row",
    "missing_user_id",
    "missing_item_id",
    "missing_timestamp",
    "bad_timestamp",
    "bad_value",
    "unknown_item",
    "below_min_value",  # DataConfig.min_value: e.g. ratings under 4 are not a positive signal
    "other_event_type",  # DataConfig.event_types: e.g. only purchases
    "after_cutoff",  # DataConfig.cutoff: the log as it stood at that time
)
def required_columns(columns: ColumnMap) -> list[str]:
    """The log columns that must exist in every input file."""
    return [columns.user_id, columns.item_id, columns.timestamp]


def log_columns(columns: ColumnMap) -> list[str]:
    """Every log column the pipeline reads (required + the optional mapped ones)."""
    out = required_columns(columns)
    out += [c for c in (columns.event, columns.value, columns.query) if c]
    return out


def canonical_ids(arr: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The one id rule, for every format and every file (logs, catalogue, user file).

    An id is text, trimmed; an empty one is null. A number with an integral value is written as
    that integer, whatever carried it: ``12``, ``12.0`` and ``"12.0"`` are one id ``"12"`` in a
    Parquet int or float column (pandas writes int ids with nulls as floats), a JSONL number or a
    CSV cell. Any other text is kept as written (``"007"``, ``"12.5"``, ``"a.0"``).
    """
    text = pc.utf8_trim_whitespace(pc.cast(arr, pa.string()))  # floats cast as "12", not "12.0"
    text = pc.replace_substring_regex(text, r"^(-?[0-9]+)\.0+$", r"\1")
    out = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
    return out.combine_chunks() if isinstance(out, pa.ChunkedArray) else out


def _as_float(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
        vals = np.asarray(pc.fill_null(pc.cast(arr, pa.float64()), np.nan), dtype=np.float64)
        return vals, np.isfinite(vals) | np.asarray(arr.is_null())
    text = pd.Series(np.asarray(pc.cast(arr, pa.string()).to_pylist(), dtype=object))
    vals = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
    return vals, np.isfinite(vals) | text.isna().to_numpy()


def _raw_json(table: pa.Table, rows: np.ndarray, columns: list[str]) -> list[str]:
    out = []
    sub = table.take(pa.array(rows, pa.int64())).select(columns).to_pylist()
    for rec in sub:
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()}
        out.append(json.dumps(clean, default=str, ensure_ascii=False))
    return out


def validate_batch(
    table: pa.Table,
    *,
    columns: ColumnMap,
    timestamp_unit: str,
    catalogue: set[str] | pa.Array,
    source_file: str,
    file_idx: int,
    malformed: list[tuple[int, str, str]] = (),
    min_value: float | None = None,
    event_types: list[str] | None = None,
    cutoff_us: int | None = None,
) -> pa.Table:
    """Raw batch (log column names + ``__row``) -> EVENT_SCHEMA table, rejects included.

    The first failing check names the reason; ``malformed`` rows (unparseable lines found by the
    reader) are appended as rejects so that nothing read is lost. ``min_value`` / ``event_types``
    (``DataConfig``) reject valid events that are not a positive signal, with their own reasons.
    """
    n = table.num_rows
    reason = np.full(n, None, dtype=object)
    detail = np.full(n, None, dtype=object)

    def reject(mask: np.ndarray, why: str, describe) -> None:
        """Mark rows not yet rejected; ``describe(indices) -> list[str]`` (only for those rows)."""
        new = np.flatnonzero(mask & pd.isna(reason))
        if len(new):
            reason[new] = why
            detail[new] = describe(new) if callable(describe) else describe

    def show(arr, template: str):
        return lambda idx: [template.format(v) for v in arr.take(pa.array(idx)).to_pylist()]

    empty = pa.array([], pa.string())
    user = canonical_ids(table[columns.user_id]) if n else empty
    item = canonical_ids(table[columns.item_id]) if n else empty
    reject(np.asarray(user.is_null()), "missing_user_id", f"{columns.user_id} is empty")
    reject(np.asarray(item.is_null()), "missing_item_id", f"{columns.item_id} is empty")

    ts_raw = table[columns.timestamp].combine_chunks() if n else pa.array([], pa.string())
    ts_null = np.asarray(ts_raw.is_null()) if n else np.zeros(0, bool)
    reject(ts_null, "missing_timestamp", f"{columns.timestamp} is empty")
    us, ok = parse_timestamps(ts_raw, timestamp_unit) if n else (np.zeros(0, np.int64), np.zeros(0, bool))
    reject(~ok & ~ts_null, "bad_timestamp", show(ts_raw, columns.timestamp + "={!r} is not a time"))

    value = np.full(n, np.nan)
    if columns.value and n:
        value_raw = table[columns.value].combine_chunks()
        value, vok = _as_float(value_raw)
        reject(~vok, "bad_value", show(value_raw, columns.value + "={!r} is not a number"))

    if n:
        known = np.asarray(pc.fill_null(pc.is_in(item, value_set=_as_value_set(catalogue)), True))
        reject(~known, "unknown_item", show(item, "item_id {!r} is not in the catalogue"))

    event = (
        pc.utf8_trim_whitespace(pc.cast(table[columns.event], pa.string())).combine_chunks()
        if columns.event and n
        else pa.nulls(n, pa.string())
    )
    query = pa.nulls(n, pa.string())
    if columns.query and n:
        q = pc.utf8_trim_whitespace(pc.cast(table[columns.query], pa.string())).combine_chunks()
        query = pc.if_else(pc.equal(q, ""), pa.scalar(None, pa.string()), q)
    if min_value is not None and n:
        reject(~(value >= min_value), "below_min_value",  # a missing value is no positive signal either
               show(pa.array(value), columns.value + "={!r} is below min_value=" + f"{min_value:g}"))
    if event_types and n:
        wanted = np.asarray(pc.fill_null(pc.is_in(event, value_set=pa.array(event_types, pa.string())), False))
        reject(~wanted, "other_event_type",
               show(event, columns.event + "={!r} is not one of event_types "
                    + json.dumps(list(event_types)).replace("{", "{{").replace("}", "}}")))
    if cutoff_us is not None and n:
        cut = pd.Timestamp(cutoff_us, unit="us", tz="UTC").isoformat()
        reject(ok & (us >= cutoff_us), "after_cutoff",
               show(ts_raw, columns.timestamp + "={!r} is at or after cutoff " + cut))
    bad = np.flatnonzero(~pd.isna(reason))
    raw = np.full(n, None, dtype=object)
    if len(bad):
        raw[bad] = _raw_json(table, bad, log_columns(columns))

    out = pa.table(
        {
            "user_id": user,
            "item_id": item,
            "timestamp": pa.array(np.where(ok, us, 0), pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "event": event,
            "value": pa.array(value, pa.float64(), from_pandas=True),
            "query": query,
            "source_file": pa.array([source_file] * n, pa.string()),
            "file_idx": pa.array(np.full(n, file_idx, np.int32)),
            "source_row": table["__row"].combine_chunks() if n else pa.array([], pa.int64()),
            "reason": pa.array(reason.tolist(), pa.string()),
            "detail": pa.array(detail.tolist(), pa.string()),
            "raw": pa.array(raw.tolist(), pa.string()),
        },
        schema=EVENT_SCHEMA,
    )
    if malformed:
        out = pa.concat_tables([out, malformed_rejects(malformed, source_file, file_idx)])
    return out


def _as_value_set(catalogue: set[str] | pa.Array) -> pa.Array:
    return catalogue if isinstance(catalogue, pa.Array) else pa.array(sorted(catalogue), pa.string())


def malformed_rejects(malformed, source_file: str, file_idx: int) -> pa.Table:
    """Reject rows (EVENT_SCHEMA, reason ``malformed_row``) of lines a reader could not parse."""
    m = len(malformed)
    return pa.table(
        {
            "user_id": pa.nulls(m, pa.string()),
            "item_id": pa.nulls(m, pa.string()),
            "timestamp": pa.nulls(m, pa.timestamp("us", tz="UTC")),
            "event": pa.nulls(m, pa.string()),
            "value": pa.nulls(m, pa.float64()),
            "query": pa.nulls(m, pa.string()),
            "source_file": pa.array([source_file] * m, pa.string()),
            "file_idx": pa.array(np.full(m, file_idx, np.int32)),
            "source_row": pa.array([r for r, _, _ in malformed], pa.int64()),
            "reason": pa.array(["malformed_row"] * m, pa.string()),
            "detail": pa.array([d for _, d, _ in malformed], pa.string()),
            "raw": pa.array([json.dumps(t, ensure_ascii=False) for _, _, t in malformed], pa.string()),
        },
        schema=EVENT_SCHEMA,
    )
