"""The same preparation as ``recsys_ray.data.pipeline.prepare`` in one process with pandas, no Ray.

It exists to be measured against (``jobs/bench_data.py``, :mod:`recsys_ray.bench.data`): same inputs, same validation
rules, same ordering and split, the same per-user example code (``ExampleBuilder`` called
in-process), the same parquet outputs. What differs is only the orchestration: one process
holding the whole log in a DataFrame instead of Ray Data streaming blocks through tasks and
actors.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_ray.data.config import DataConfig
from recsys_ray.data.examples import (
    EXAMPLE_SCHEMA,
    ExampleBuilder,
    ExampleSettings,
    build_sequences,
)
from recsys_ray.data.files import list_files
from recsys_ray.data.sources import load_catalogue, resolve_source
from recsys_ray.data.text import render_profile
from recsys_ray.data.tokenize import encode_texts, list_column
from recsys_ray.model.tokenizer import load_tokenizer


def prepare_pandas(cfg: DataConfig) -> dict:
    """Single-process preparation of a parquet log (the benchmark's plain alternative)."""
    t0 = time.perf_counter()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    src = resolve_source(cfg, out)
    catalogue, _ = load_catalogue(src)
    tok = load_tokenizer(cfg.tokenizer)
    full_ids = encode_texts(tok, catalogue["text"].to_pylist())
    items = catalogue.append_column("full_ids", list_column(full_ids))

    # read + validate (pandas, whole log in memory)
    frames = []
    for i, ref in enumerate(list_files(src.events, src.format)):
        df = pd.read_parquet(ref.uri, columns=[src.columns.user_id, src.columns.item_id, src.columns.timestamp])
        df.columns = ["user_id", "item_id", "timestamp"]
        df["file_idx"], df["source_row"] = i, np.arange(len(df))
        frames.append(df)
    ev = pd.concat(frames, ignore_index=True)
    rows_read = len(ev)
    ev["user_id"] = ev["user_id"].astype(str)
    ev["item_id"] = ev["item_id"].astype(str)
    ts = pd.to_numeric(ev["timestamp"], errors="coerce")
    ok = ev["user_id"].ne("") & ev["item_id"].isin(set(catalogue["item_id"].to_pylist())) & ts.notna()
    rejects = ev[~ok]
    ev = ev[ok].copy()
    ev["timestamp"] = pd.to_datetime(ts[ok].astype("int64"), unit="s", utc=True)
    if len(rejects):
        rejects.to_parquet(out / "rejects.parquet")

    # order + split: one sort of the whole log, then the same per-user sequence code
    ev = ev.sort_values(["user_id", "timestamp", "file_idx", "source_row"], kind="stable")
    table = pa.Table.from_pandas(ev, preserve_index=False).cast(
        pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.timestamp("us", tz="UTC")),
                   ("file_idx", pa.int32()), ("source_row", pa.int64())])
    )
    sequences = build_sequences(table, cfg.min_user_events)
    if src.users:
        users = pd.concat([pd.read_parquet(r.uri) for r in list_files(src.users)], ignore_index=True)
        users = users.drop_duplicates("user_id").set_index("user_id")
        cols = src.user_profile_columns or [c for c in users.columns]
        profile = {u: render_profile(r, cols) for u, r in zip(users.index, users[cols].to_dict("records"), strict=True)}
        sequences = sequences.append_column(
            "profile_text", pa.array([profile.get(u) for u in sequences["user_id"].to_pylist()], pa.string())
        )
    pq.write_table(sequences, out / "sequences.parquet")

    # examples in chunks of users (the same ExampleBuilder, called in-process)
    settings = ExampleSettings.from_config(cfg)
    if cfg.negative_sampling == "popularity":
        raise ValueError("the reference implementation covers uniform negatives only")
    builder = ExampleBuilder(settings, items.select(["item_id", "text", "full_ids"]), None)
    writer = pq.ParquetWriter(out / "examples.parquet", EXAMPLE_SCHEMA)
    n_examples = 0
    for start in range(0, sequences.num_rows, 256):
        batch = builder(sequences.slice(start, 256))
        n_examples += batch.num_rows
        writer.write_table(batch)
    writer.close()
    return {
        "rows_read": rows_read,
        "events_accepted": len(ev),
        "events_rejected": len(rejects),
        "examples": n_examples,
        "seconds": round(time.perf_counter() - t0, 2),
    }
