"""The data preparation job: logs -> validated events -> split -> tokenized examples (Ray Data).

Stages (all Ray Data; the driver holds only the catalogue, the item popularity and counts):

1. read + validate   one read task per file on an actor pool holding the catalogue's ids;
                     each row is accepted or rejected with a reason (``rejects/``)
2. order + split     hash-partition by user, then one vectorised pass per block builds each
                     user's ordered sequence and its leave-last-out split (``sequences/``)
3. examples          actor pool holding the tokenizer and the tokenized catalogue: contexts,
                     negatives, token ids (``examples/split=*``)
4. manifest          counts that reconcile, tokenizer, text config, fingerprint
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from recsys_ray.config import ColumnMap, DataConfig, to_dict
from recsys_ray.data import movielens, synthetic
from recsys_ray.data import text as T
from recsys_ray.data.examples import (
    SEQUENCE_SCHEMA,
    ExampleBuilder,
    ExampleSettings,
    build_sequences,
    train_item_counts,
)
from recsys_ray.data.files import FileRef, iter_record_batches, list_files, read_columns, read_table
from recsys_ray.data.tokenize import encode_texts, list_column, load_tokenizer, tokenizer_info
from recsys_ray.data.validate import REJECT_COLUMNS, log_columns, required_columns, validate_batch
from recsys_ray.errors import DataError
from recsys_ray.runtime import cluster_cpus, init_ray, unwrap_task_error

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SPLITS = ("train", "valid", "test")
_OUTPUT_PARTS = ("items", "users", "sequences", "examples", "rejects", "source", MANIFEST)


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


def resolve_source(cfg: DataConfig, out: Path) -> Source:
    """Materialise built-in datasets into ``out/source`` and describe any source uniformly."""
    if cfg.dataset == "movielens-100k":
        tables, desc = movielens.load_movielens(cfg.movielens_path, cfg.cache_dir)
        src = out / "source"
        src.mkdir(parents=True, exist_ok=True)
        for name, table in tables.items():
            pq.write_table(table, src / f"{name}.parquet")
        return Source(
            events=str(src / "events.parquet"),
            items=str(src / "items.parquet"),
            users=str(src / "users.parquet"),
            columns=ColumnMap(value="rating"),
            format="parquet",
            timestamp_unit="s",
            item_id_column="item_id",
            user_id_column="user_id",
            item_text_columns=cfg.item_text_columns or movielens.ITEM_TEXT_COLUMNS,
            user_profile_columns=cfg.user_profile_columns or movielens.USER_PROFILE_COLUMNS,
            description={"dataset": "movielens-100k", **desc},
        )
    if cfg.dataset == "synthetic":
        paths = synthetic.write_synthetic(cfg.synthetic, cfg.seed, out / "source")
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
    ids = pc.utf8_trim_whitespace(table[src.item_id_column].combine_chunks())
    empty = np.flatnonzero(np.asarray(pc.fill_null(pc.equal(ids, ""), True)))
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


# ---------------------------------------------------------------------------------------------
# Ray Data UDFs


_STORAGE_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
    "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE",
)  # fmt: skip


def storage_env() -> dict[str, str]:
    """The driver's object-store settings, handed to workers that do not have their own."""
    return {k: os.environ[k] for k in _STORAGE_ENV if k in os.environ}


def apply_storage_env(env: dict[str, str]) -> None:
    for k, v in env.items():
        os.environ.setdefault(k, v)


class LogReader:
    """Reads whole files (one per input row) and validates them batch by batch."""

    def __init__(self, columns: ColumnMap, timestamp_unit: str, catalogue_ids: pa.Array, batch_rows: int, env: dict):
        apply_storage_env(env)
        self.columns, self.unit, self.batch_rows = columns, timestamp_unit, batch_rows
        self.catalogue = catalogue_ids

    def __call__(self, files: pa.Table) -> Iterator[pa.Table]:
        for f in files.to_pylist():
            ref = FileRef(uri=f["uri"], format=f["format"], size=f["size"], mtime_ns=f["mtime_ns"])
            batches = iter_record_batches(ref, log_columns(self.columns), self.batch_rows)
            while True:
                try:
                    table, malformed = next(batches)
                except StopIteration:
                    break
                except (OSError, pa.ArrowException) as exc:  # a corrupt or vanished file
                    raise DataError(f"{ref.uri}: cannot read ({str(exc).splitlines()[0]})") from None
                yield validate_batch(
                    table,
                    columns=self.columns,
                    timestamp_unit=self.unit,
                    catalogue=self.catalogue,
                    source_file=ref.uri,
                    file_idx=f["file_idx"],
                    malformed=malformed,
                )


def read_profiles(files: pa.Table, id_column: str, profile_columns: list[str], env: dict) -> Iterator[pa.Table]:
    """User files -> profile rows shaped like accepted events (``item_id`` null) plus ``profile_text``.

    They are shuffled together with the events, so each user's profile meets its history
    without a join; rows without a user id are skipped.
    """
    apply_storage_env(env)
    for f in files.to_pylist():
        ref = FileRef(uri=f["uri"], format=f["format"], size=f["size"], mtime_ns=f["mtime_ns"])
        for table, _ in iter_record_batches(ref, [id_column, *profile_columns], 65_536):
            ids = pc.utf8_trim_whitespace(pc.cast(table[id_column], pa.string()))
            keep = pc.fill_null(pc.not_equal(ids, ""), False)
            kept = table.filter(keep)
            records = kept.select(profile_columns).to_pylist()
            n = kept.num_rows
            yield pa.table(
                {
                    "user_id": ids.filter(keep),
                    "item_id": pa.nulls(n, pa.string()),
                    "timestamp": pa.nulls(n, pa.timestamp("us", tz="UTC")),
                    "file_idx": pa.array(np.full(n, f["file_idx"], np.int32)),
                    "source_row": kept["__row"],
                    "profile_text": pa.array([T.render_profile(r, profile_columns) for r in records], pa.string()),
                }
            )


def _accepted(t: pa.Table, with_profile: bool) -> pa.Table:
    out = t.filter(pc.is_null(t["reason"])).select(["user_id", "item_id", "timestamp", "file_idx", "source_row"])
    if with_profile:  # same schema as the profile rows it is unioned with
        out = out.append_column("profile_text", pa.nulls(out.num_rows, pa.string()))
    return out


def _rejected(t: pa.Table) -> pa.Table:
    return t.filter(pc.is_valid(t["reason"])).select(REJECT_COLUMNS)


def _reject_counts(t: pa.Table) -> pa.Table:
    counts = pc.value_counts(t["reason"].drop_null()) if t.num_rows else None
    if counts is None or len(counts) == 0:
        return pa.table({"reason": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
    return pa.table({"reason": counts.field("values"), "count": pc.cast(counts.field("counts"), pa.int64())})


def _sequence_stats(t: pa.Table) -> pa.Table:
    n = pc.list_value_length(t["item_ids"])
    split = pc.cast(pc.equal(t["n_train"], pc.subtract(n, 2)), pa.int64())
    return pa.table(
        {
            "users": pa.array([t.num_rows], pa.int64()),
            "events": pa.array([pc.sum(n).as_py() or 0], pa.int64()),
            "train_events": pa.array([pc.sum(t["n_train"]).as_py() or 0], pa.int64()),
            "split_users": pa.array([pc.sum(split).as_py() or 0], pa.int64()),
            "profiles": pa.array(
                [pc.sum(pc.cast(pc.is_valid(t["profile_text"]), pa.int64())).as_py() or 0
                 if "profile_text" in t.column_names else 0],
                pa.int64(),
            ),
        }
    )


# ---------------------------------------------------------------------------------------------
# the job


def _prepare_output(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MANIFEST).exists() and not (out / "source").exists():
            raise DataError(f"output {out} is not empty and holds no {MANIFEST}; refusing to overwrite it")
        for part in _OUTPUT_PARTS:
            p = out / part
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _fingerprint(cfg: DataConfig, src: Source, refs: list[FileRef], tok: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(src.description, sort_keys=True, default=str).encode())
    if src.description.get("dataset") not in ("movielens-100k", "synthetic"):
        for r in refs:  # generic logs: identity of each file (content hashing 10 GB is not free)
            h.update(f"{r.uri}|{r.size}|{r.mtime_ns}".encode())
    conf = to_dict(cfg)
    for volatile in ("output", "cache_dir", "num_actors"):
        conf.pop(volatile, None)
    h.update(json.dumps(conf, sort_keys=True).encode())
    h.update(tok["vocab_sha256"].encode())
    return h.hexdigest()[:16]


def _count_rows(path: Path) -> int:
    if not path.exists():
        return 0
    return pads.dataset(str(path), format="parquet").count_rows()


def prepare(cfg: DataConfig) -> dict:
    """Run the whole preparation; return the manifest (also written to ``output/manifest.json``)."""
    import ray
    from ray.data.context import ShuffleStrategy

    t0 = time.perf_counter()
    out = Path(cfg.output).expanduser().resolve()
    _prepare_output(out)
    tok = tokenizer_info(cfg.tokenizer)
    init_ray()
    ctx = ray.data.DataContext.get_current()
    previous_strategy = ctx.shuffle_strategy
    # The pull-based sort shuffle runs as plain tasks; the hash shuffle starts aggregator
    # actors, which costs ~6 s per shuffle here (measured: 0.3 s vs 6 s for 600 rows,
    # 1.1 s vs 7 s for 2M rows on 2 CPUs).
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        src = resolve_source(cfg, out)
        refs = list_files(src.events, src.format)
        check_log_files(refs, src.columns)
        catalogue, text_cols = load_catalogue(src)
        user_refs = list_files(src.users, "auto") if src.users else []
        profile_cols: list[str] = []
        if user_refs:
            present = read_columns(user_refs[0])
            if src.user_id_column not in present:
                raise DataError(f"{user_refs[0].uri}: missing column {src.user_id_column!r} (has: {', '.join(present)})")
            profile_cols = src.user_profile_columns or [c for c in present if c != src.user_id_column]
            missing = [c for c in profile_cols if c not in present]
            if missing:
                raise DataError(f"{user_refs[0].uri}: missing profile column {missing[0]!r} (has: {', '.join(present)})")
        manifest = _run(cfg, src, refs, user_refs, profile_cols, catalogue, text_cols, tok, out)
    except Exception as exc:  # errors raised in Ray workers arrive wrapped
        inner = unwrap_task_error(exc)
        if inner is not exc:
            raise inner from None
        raise
    finally:
        ctx.shuffle_strategy = previous_strategy
    manifest["seconds"] = round(time.perf_counter() - t0, 2)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def _file_rows(refs: list[FileRef]) -> list[dict]:
    return [
        {"uri": r.uri, "format": r.format, "size": r.size, "mtime_ns": r.mtime_ns, "file_idx": i}
        for i, r in enumerate(refs)
    ]


def _sum_rows(ds, columns: list[str]) -> dict[str, int]:
    """Sum small per-block summary tables on the driver (no shuffle: one row per block)."""
    import ray

    totals = dict.fromkeys(columns, 0)
    for ref in ds.to_arrow_refs():
        t = ray.get(ref)
        for c in columns:
            totals[c] += int(pc.sum(t[c]).as_py() or 0)
    return totals


def _counts_by_key(ds, key: str) -> dict[str, int]:
    """(key, count) rows from every block -> one dict on the driver (keys are few: reasons, items)."""
    import ray

    out: dict[str, int] = {}
    for ref in ds.to_arrow_refs():
        t = ray.get(ref)
        for k, v in zip(t[key].to_pylist(), t["count"].to_pylist(), strict=True):
            out[k] = out.get(k, 0) + v
    return out


def _run(cfg, src, refs, user_refs, profile_cols, catalogue, text_cols, tok, out: Path) -> dict:
    import ray
    from ray.data import ActorPoolStrategy

    cpus = cluster_cpus()
    actors = cfg.num_actors or cpus
    pool = ActorPoolStrategy(min_size=1, max_size=actors)
    timings: dict[str, float] = {}

    # items: the catalogue is small next to the log and already on the driver; its texts are
    # tokenized once here (the tokenizer is loaded anyway) and shipped to every example actor
    t = time.perf_counter()
    full_ids = encode_texts(load_tokenizer(cfg.tokenizer), catalogue["text"].to_pylist())
    items = catalogue.append_column("full_ids", list_column(full_ids))
    items_out = catalogue.append_column("input_ids", pc.list_slice(items["full_ids"], 0, cfg.max_item_tokens))
    (out / "items").mkdir(parents=True, exist_ok=True)
    pq.write_table(items_out, out / "items" / "items.parquet")
    timings["items"] = time.perf_counter() - t

    # 1. read + validate: one block per file so files are read in parallel
    t = time.perf_counter()
    files_ds = ray.data.from_arrow(pa.Table.from_pylist(_file_rows(refs)), override_num_blocks=len(refs))
    validated = files_ds.map_batches(
        LogReader,
        fn_constructor_kwargs={
            "columns": src.columns,
            "timestamp_unit": src.timestamp_unit,
            "catalogue_ids": catalogue["item_id"].combine_chunks(),
            "batch_rows": 262_144,
            "env": storage_env(),
        },
        compute=pool,
        batch_size=1,
        batch_format="pyarrow",
    ).materialize()
    rows_read = validated.count()
    if rows_read == 0:
        raise DataError(f"empty input: 0 events read from {src.events}")
    by_reason = _counts_by_key(validated.map_batches(_reject_counts, batch_format="pyarrow", batch_size=None), "reason")
    n_rejected = sum(by_reason.values())
    if n_rejected:
        validated.map_batches(_rejected, batch_format="pyarrow", batch_size=None).write_parquet(str(out / "rejects"))
    n_accepted = rows_read - n_rejected
    if n_accepted == 0:
        raise DataError(f"every one of the {rows_read} events in {src.events} was rejected; see {out / 'rejects'}")
    timings["read_validate"] = time.perf_counter() - t

    # 2. order + split per user. Sorting by user (range partitioning) puts all of a user's
    # rows - events and profile - in one block, the guarantee Ray's own map_groups relies on;
    # the per-user time order is then sorted inside each block.
    t = time.perf_counter()
    accepted = validated.map_batches(
        _accepted, fn_kwargs={"with_profile": bool(user_refs)}, batch_format="pyarrow", batch_size=None
    )
    if user_refs:
        profiles = ray.data.from_arrow(
            pa.Table.from_pylist(_file_rows(user_refs)), override_num_blocks=len(user_refs)
        ).map_batches(
            read_profiles,
            fn_kwargs={"id_column": src.user_id_column, "profile_columns": profile_cols, "env": storage_env()},
            batch_size=1,
            batch_format="pyarrow",
        )
        accepted = accepted.union(profiles)
    sequences = (
        accepted.sort("user_id")
        .map_batches(
            build_sequences,
            fn_kwargs={"min_user_events": cfg.min_user_events},
            batch_size=None,
            batch_format="pyarrow",
        )
        .materialize()
    )
    # with profiles, sequences keep profile_text: history="items" models train from sequences
    seq_columns = SEQUENCE_SCHEMA.names + (["profile_text"] if user_refs else [])
    sequences.select_columns(seq_columns).write_parquet(str(out / "sequences"))
    stats = _sum_rows(
        sequences.map_batches(_sequence_stats, batch_format="pyarrow", batch_size=None),
        ["users", "events", "train_events", "split_users", "profiles"],
    )
    popularity = None
    if cfg.negative_sampling == "popularity":
        popularity = _counts_by_key(
            sequences.map_batches(train_item_counts, batch_format="pyarrow", batch_size=None), "item_id"
        )
    timings["split"] = time.perf_counter() - t

    # 3. examples: contexts, negatives and token ids on the actor pool (tokenizer once per actor)
    t = time.perf_counter()
    settings = ExampleSettings.from_config(cfg)
    examples = sequences.map_batches(
        ExampleBuilder,
        fn_constructor_kwargs={
            "settings": settings,
            "items": items.select(["item_id", "text", "full_ids"]),
            "popularity": popularity,
        },
        # A fixed-size pool (an autoscaling one stays at one actor while the writer holds a CPU),
        # each actor a little under one CPU: with whole CPUs the writer gets no budget on a small
        # machine, the actors' output piles up in the object store and everything stalls
        # (seen at 10M events on 2 CPUs).
        compute=ActorPoolStrategy(size=actors),
        num_cpus=0.8,
        batch_size=256,
        batch_format="pyarrow",
    )
    # writing is I/O next to the CPU-bound actors; a whole CPU per write task would idle one actor
    examples.write_parquet(str(out / "examples"), partition_cols=["split"], ray_remote_args={"num_cpus": 0.1})
    timings["examples"] = time.perf_counter() - t

    example_counts = {s: _count_rows(out / "examples" / f"split={s}") for s in SPLITS}
    users, split_users = stats["users"], stats["split_users"]
    assert stats["events"] == n_accepted, (stats, n_accepted)  # every accepted event is in a sequence
    return {
        "dataset": cfg.dataset,
        "output": str(out),
        "source": src.description,
        "counts": {
            "rows_read": rows_read,
            "events_accepted": n_accepted,
            "events_rejected": n_rejected,
            "rejects_by_reason": by_reason,
            "items": items.num_rows,
            "users": users,
            "users_split": split_users,
            "users_train_only": users - split_users,
            "users_with_profile": stats["profiles"],
            "events_by_split": {"train": stats["train_events"], "valid": split_users, "test": split_users},
            "examples_by_split": example_counts,
        },
        "tokenizer": tok,
        "text": {
            "item_text_columns": text_cols,
            "user_profile_columns": profile_cols,
            "max_history": cfg.max_history,
            "max_context_tokens": cfg.max_context_tokens,
            "max_item_tokens": cfg.max_item_tokens,
            "history_order": "most_recent_first",
        },
        "config": to_dict(cfg),
        "fingerprint": _fingerprint(cfg, src, refs, tok),
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "ray": {"cpus": cpus, "actors": actors},
    }


def summary_line(manifest: dict) -> dict:
    """The one-line JSON a job prints at the end."""
    c = manifest["counts"]
    return {
        "output": manifest["output"],
        "rows_read": c["rows_read"],
        "events_accepted": c["events_accepted"],
        "events_rejected": c["events_rejected"],
        "users": c["users"],
        "users_in_test": c["events_by_split"]["test"],
        "items": c["items"],
        "examples": c["examples_by_split"],
        "fingerprint": manifest["fingerprint"],
        "seconds": manifest.get("seconds"),
    }
