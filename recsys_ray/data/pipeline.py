"""The data preparation job: logs -> validated events -> split -> tokenized examples (Ray Data).

Stages (all Ray Data; the driver holds only the catalogue, the item popularity and counts):

1. items             the catalogue, tokenized once on the driver (``items/``)
2. read + validate   one read task per file on an actor pool holding the catalogue's ids;
                     each row is accepted or rejected with a reason (``rejects/``)
3. order + split     range-partition by user, then one vectorised pass per block builds each
                     user's ordered sequence and its leave-last-out split (``sequences/``)
4. examples          actor pool holding the tokenizer and the tokenized catalogue: contexts,
                     negatives, token ids (``examples/split=*``)
5. manifest          counts that reconcile, tokenizer, text config, fingerprint

Where each input comes from and how it is checked before Ray starts: :mod:`recsys_ray.data.sources`.
The folder written: :mod:`recsys_ray.data.layout`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import ActorPoolStrategy
from ray.data.context import ShuffleStrategy

from recsys_ray import storage
from recsys_ray.config import to_dict
from recsys_ray.data import layout
from recsys_ray.data import text as T
from recsys_ray.data.config import ColumnMap, DataConfig
from recsys_ray.data.examples import (
    SEQUENCE_SCHEMA,
    ExampleBuilder,
    ExampleSettings,
    build_sequences,
    hold_out_items,
    item_first_seen,
    mark_cold_users,
    train_item_counts,
)
from recsys_ray.data.files import FileRef, iter_record_batches, list_files
from recsys_ray.data.sources import (
    Source,
    check_log_files,
    load_catalogue,
    profile_columns,
    resolve_source,
)
from recsys_ray.data.timestamps import cutoff_us
from recsys_ray.data.tokenize import encode_texts, list_column, tokenizer_info
from recsys_ray.data.validate import (
    REJECT_COLUMNS,
    canonical_ids,
    log_columns,
    malformed_rejects,
    validate_batch,
)
from recsys_ray.errors import ConfigError, DataError, one_line
from recsys_ray.model.tokenizer import load_tokenizer
from recsys_ray.runtime import cluster_cpus, init_ray, unwrap_task_error

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Ray Data UDFs


NODE = "node"  # column of validated rows: the Ray node that read them (dictionary-encoded: 1 byte a row)


def _node_column(n: int) -> pa.DictionaryArray:
    node = ray.get_runtime_context().get_node_id()
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int8)), pa.array([node]))


class LogReader:
    """Reads whole files (one per input row) and validates them batch by batch.

    Storage credentials are this worker's own (its node's environment, shared config or
    instance role): nothing secret is handed to it.
    """

    def __init__(self, columns: ColumnMap, timestamp_unit: str, catalogue_ids: pa.Array, batch_rows: int,
                 min_value: float | None = None, event_types: list[str] | None = None,
                 cutoff_us: int | None = None):
        self.columns, self.unit, self.batch_rows = columns, timestamp_unit, batch_rows
        self.catalogue = catalogue_ids
        self.min_value, self.event_types, self.cutoff_us = min_value, event_types, cutoff_us

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
                    raise DataError(f"{ref.uri}: cannot read ({one_line(exc)})") from None
                out = validate_batch(
                    table,
                    columns=self.columns,
                    timestamp_unit=self.unit,
                    catalogue=self.catalogue,
                    source_file=ref.uri,
                    file_idx=f["file_idx"],
                    malformed=malformed,
                    min_value=self.min_value,
                    event_types=self.event_types,
                    cutoff_us=self.cutoff_us,
                )
                yield out.append_column(NODE, _node_column(out.num_rows))


def read_profiles(files: pa.Table, id_column: str, profile_columns: list[str]) -> Iterator[pa.Table]:
    """User files -> profile rows shaped like accepted events (``item_id`` null) plus
    ``profile_text``, and the rows that cannot be one (``reason`` set, kept for the rejects).

    They are shuffled together with the events, so each user's profile meets its history
    without a join. Ids follow :func:`~recsys_ray.data.validate.canonical_ids`, as in the logs.
    """
    for f in files.to_pylist():
        ref = FileRef(uri=f["uri"], format=f["format"], size=f["size"], mtime_ns=f["mtime_ns"])
        for table, malformed in iter_record_batches(ref, [id_column, *profile_columns], 65_536):
            ids = canonical_ids(table[id_column])
            empty = ids.is_null()
            records = table.select(profile_columns).to_pylist()
            n = table.num_rows
            raw = [json.dumps({id_column: i, **r}, default=str, ensure_ascii=False) if e else None
                   for i, r, e in zip(table[id_column].to_pylist(), records, empty.to_pylist(), strict=True)]
            out = pa.table(
                {
                    "user_id": ids,
                    "item_id": pa.nulls(n, pa.string()),
                    "timestamp": pa.nulls(n, pa.timestamp("us", tz="UTC")),
                    "file_idx": pa.array(np.full(n, f["file_idx"], np.int32)),
                    "source_row": table["__row"],
                    "profile_text": pa.array([T.render_profile(r, profile_columns) for r in records], pa.string()),
                    "source_file": pa.array([ref.uri] * n, pa.string()),
                    "reason": pc.if_else(empty, pa.scalar("missing_user_id"), pa.scalar(None, pa.string())),
                    "detail": pc.if_else(empty, pa.scalar(f"{id_column} is empty"), pa.scalar(None, pa.string())),
                    "raw": pa.array(raw, pa.string()),
                }
            )
            if malformed:  # unparseable lines of a csv / jsonl user file; profile_text comes back null
                rejects = malformed_rejects(malformed, ref.uri, f["file_idx"]).drop_columns(["event", "value", "query"])
                out = pa.concat_tables([out, rejects], promote_options="default")
            yield out


PROFILE_COLUMNS = ["user_id", "item_id", "timestamp", "file_idx", "source_row", "profile_text"]


def _accepted(t: pa.Table, with_profile: bool, with_query: bool = False) -> pa.Table:
    cols = ["user_id", "item_id", "timestamp", "file_idx", "source_row"] + (["query"] if with_query else [])
    out = t.filter(pc.is_null(t["reason"])).select(cols)
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


def _node_counts(t: pa.Table) -> pa.Table:
    """(node, count): how many log rows each Ray node read and validated, in one block."""
    if t.num_rows == 0:
        return pa.table({NODE: pa.array([], pa.string()), "count": pa.array([], pa.int64())})
    counts = pc.value_counts(pc.cast(t[NODE], pa.string()))
    return pa.table({NODE: counts.field("values"), "count": pc.cast(counts.field("counts"), pa.int64())})


def _with_null_query(t: pa.Table) -> pa.Table:
    return t.append_column("query", pa.nulls(t.num_rows, pa.string()))


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
            "search_events": pa.array(
                [pc.sum(pc.cast(pc.is_valid(pc.list_flatten(t["queries"])), pa.int64())).as_py() or 0
                 if "queries" in t.column_names else 0],
                pa.int64(),
            ),
        }
    )


# ---------------------------------------------------------------------------------------------
# the job


def output_root(output: str) -> str:
    """The output folder as every process can name it: a URI, or an absolute local path."""
    if storage.is_remote(output):
        if not output.startswith("s3://"):
            raise DataError(f"output {output}: only local paths and s3:// URIs can be written")
        return output.rstrip("/")
    return str(Path(output).expanduser().resolve())


def _prepare_output(out: str) -> None:
    """An empty or earlier-prepared folder, its old parts removed; anything else is refused.
    Written to once first, so a path the job cannot write fails now, with the reason."""
    storage.check_writable(out, "output")
    if not storage.is_empty_dir(out):
        if storage.read_text(layout.part_path(out, layout.MANIFEST)) is None and not layout.has_part(out, layout.SOURCE):
            raise DataError(f"output {out} is not empty and holds no {layout.MANIFEST}; refusing to overwrite it")
        for part in layout.PARTS:
            storage.delete_dir(layout.part_path(out, part))


def _fingerprint(cfg: DataConfig, src: Source, refs: list[FileRef], tok: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(src.description, sort_keys=True, default=str).encode())
    if src.description.get("dataset") not in ("movielens-100k", "synthetic"):
        for r in refs:  # generic logs: identity of each file (content hashing 10 GB is not free)
            h.update(f"{r.uri}|{r.size}|{r.mtime_ns}".encode())
    conf = to_dict(cfg)
    for volatile in ("output", "cache_dir", "num_actors", "s3_endpoint"):
        conf.pop(volatile, None)
    h.update(json.dumps(conf, sort_keys=True).encode())
    h.update(tok["vocab_sha256"].encode())
    return h.hexdigest()[:16]


@dataclass
class Inputs:
    """Everything the stages read, resolved and checked on the driver."""

    cfg: DataConfig
    src: Source
    refs: list[FileRef]  # the log files
    user_refs: list[FileRef]  # the user-profile files (none without profiles)
    profile_cols: list[str]
    catalogue: pa.Table  # item_id, text, <text columns>
    text_cols: list[str]
    tok: dict  # what the manifest records about the tokenizer
    out: str  # the output folder: an absolute local path or a URI


def prepare(cfg: DataConfig) -> dict:
    """Run the whole preparation; return the manifest (also written to ``output/manifest.json``)."""
    t0 = time.perf_counter()
    storage.use_endpoint(cfg.s3_endpoint)
    out = output_root(cfg.output)
    _prepare_output(out)
    tok = tokenizer_info(cfg.tokenizer)
    init_ray()
    ctx = ray.data.DataContext.get_current()
    previous_strategy = ctx.shuffle_strategy
    # The pull-based sort shuffle runs as plain tasks; the hash shuffle starts aggregator
    # actors, which costs ~6 s per shuffle here (measured: 0.3 s vs 6 s for 600 rows,
    # 1.1 s vs 7 s for 2M rows on 2 CPUs).
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    # Actor pools start every one of their minimum actors before the first block: readers that
    # come up one by one let the first one read every small file itself, on one node.
    previous_wait, ctx.wait_for_min_actors_s = ctx.wait_for_min_actors_s, 120
    try:
        src = resolve_source(cfg, out)
        _check_filters(cfg, src)
        refs = list_files(src.events, src.format)
        check_log_files(refs, src.columns)
        catalogue, text_cols = load_catalogue(src)
        user_refs, profile_cols = profile_columns(src)
        manifest = _run(Inputs(cfg, src, refs, user_refs, profile_cols, catalogue, text_cols, tok, out))
    except Exception as exc:  # errors raised in Ray workers arrive wrapped
        inner = unwrap_task_error(exc)
        if inner is not exc:
            raise inner from None
        raise
    finally:
        ctx.shuffle_strategy = previous_strategy
        ctx.wait_for_min_actors_s = previous_wait
    manifest["seconds"] = round(time.perf_counter() - t0, 2)
    storage.write_text(layout.part_path(out, layout.MANIFEST), json.dumps(manifest, indent=2, default=str))
    return manifest


def _check_filters(cfg: DataConfig, src: Source) -> None:
    """``min_value`` needs a value column and ``event_types`` an event column in the source."""
    problems = []
    if cfg.min_value is not None and not src.columns.value:
        problems.append(f"min_value={cfg.min_value:g}: the log at {cfg.dataset} has no value column (set columns.value)")
    if cfg.event_types and not src.columns.event:
        problems.append(f"event_types: the log at {cfg.dataset} has no event column (set columns.event)")
    if problems:
        raise ConfigError(problems)


def _file_rows(refs: list[FileRef]) -> list[dict]:
    return [
        {"uri": r.uri, "format": r.format, "size": r.size, "mtime_ns": r.mtime_ns, "file_idx": i}
        for i, r in enumerate(refs)
    ]


def _sum_rows(ds, columns: list[str]) -> dict[str, int]:
    """Sum small per-block summary tables on the driver (no shuffle: one row per block)."""
    totals = dict.fromkeys(columns, 0)
    for ref in ds.to_arrow_refs():
        t = ray.get(ref)
        for c in columns:
            totals[c] += int(pc.sum(t[c]).as_py() or 0)
    return totals


def _counts_by_key(ds, key: str) -> dict[str, int]:
    """(key, count) rows from every block -> one dict on the driver (keys are few: reasons, items)."""
    out: dict[str, int] = {}
    for ref in ds.to_arrow_refs():
        t = ray.get(ref)
        for k, v in zip(t[key].to_pylist(), t["count"].to_pylist(), strict=True):
            out[k] = out.get(k, 0) + v
    return out


def _run(inp: Inputs) -> dict:
    cpus = cluster_cpus()
    actors = inp.cfg.num_actors or cpus
    timings: dict[str, float] = {}

    def timed(stage: str, fn, *args):
        t = time.perf_counter()
        result = fn(*args)
        timings[stage] = time.perf_counter() - t
        return result

    items = timed("items", _write_items, inp)
    validated, counts = timed("read_validate", _read_validate, inp, actors)
    sequences, stats, popularity = timed("split", _split_users, inp, validated)
    timed("examples", _write_examples, inp, sequences, items, popularity, actors)
    assert stats["events_in_sequences"] == counts["accepted"], (stats, counts)  # every accepted event is in a sequence
    return _manifest(inp, items, counts, stats, timings, cpus, actors)


def _write_items(inp: Inputs) -> pa.Table:
    """The catalogue is small next to the log and already on the driver: its texts are tokenized
    once here and shipped to every example actor (``full_ids``: untruncated, for exact contexts)."""
    full_ids = encode_texts(load_tokenizer(inp.cfg.tokenizer), inp.catalogue["text"].to_pylist())
    items = inp.catalogue.append_column("full_ids", list_column(full_ids))
    items_out = inp.catalogue.append_column("input_ids", pc.list_slice(items["full_ids"], 0, inp.cfg.max_item_tokens))
    storage.write_parquet(items_out, storage.join(layout.part_path(inp.out, layout.ITEMS), "items.parquet"))
    return items


def _read_validate(inp: Inputs, actors: int):
    """One block per file so files are read in parallel; rejects written with their reasons."""
    src, out = inp.src, inp.out
    files_ds = ray.data.from_arrow(pa.Table.from_pylist(_file_rows(inp.refs)), override_num_blocks=len(inp.refs))
    validated = files_ds.map_batches(
        LogReader,
        fn_constructor_kwargs={
            "columns": src.columns,
            "timestamp_unit": src.timestamp_unit,
            "catalogue_ids": inp.catalogue["item_id"].combine_chunks(),
            "batch_rows": 262_144,
            "min_value": inp.cfg.min_value,
            "event_types": list(inp.cfg.event_types),
            "cutoff_us": cutoff_us(inp.cfg.cutoff, src.timestamp_unit),
        },
        # one reader per file up to one per CPU, from the start: an autoscaling pool that starts
        # with one actor lets it read every small file itself, on one node
        compute=ActorPoolStrategy(min_size=max(1, min(actors, len(inp.refs))), max_size=actors),
        batch_size=1,
        batch_format="pyarrow",
    ).materialize()
    rows_read = validated.count()
    if rows_read == 0:
        raise DataError(f"empty input: 0 events read from {src.events}")
    by_reason = _counts_by_key(validated.map_batches(_reject_counts, batch_format="pyarrow", batch_size=None), "reason")
    by_node = _counts_by_key(validated.map_batches(_node_counts, batch_format="pyarrow", batch_size=None), NODE)
    n_rejected = sum(by_reason.values())
    if n_rejected:
        path, fs = layout.dataset_target(out, layout.REJECTS)
        validated.map_batches(_rejected, batch_format="pyarrow", batch_size=None).write_parquet(path, filesystem=fs)
    if n_rejected == rows_read:
        raise DataError(f"every one of the {rows_read} events in {src.events} was rejected; "
                        f"see {layout.part_path(out, layout.REJECTS)}")
    return validated, {"read": rows_read, "rejected": n_rejected, "accepted": rows_read - n_rejected,
                       "by_reason": by_reason, "by_node": by_node}


def _split_users(inp: Inputs, validated):
    """Order + split per user. Sorting by user (range partitioning) puts all of a user's rows -
    events and profile - in one block, the guarantee Ray's own map_groups relies on; the per-user
    time order is then sorted inside each block."""
    with_profiles = bool(inp.user_refs)
    with_query = bool(inp.src.columns.query)
    accepted = validated.map_batches(
        _accepted, fn_kwargs={"with_profile": with_profiles, "with_query": with_query}, batch_format="pyarrow",
        batch_size=None,
    )
    profile_counts: dict = {}
    if with_profiles:
        profiles, profile_counts = _read_profiles(inp)
        if with_query:  # the union needs one schema: profile rows carry no query
            profiles = profiles.map_batches(_with_null_query, batch_format="pyarrow", batch_size=None)
        accepted = accepted.union(profiles)
    sequences = (
        accepted.sort("user_id")
        .map_batches(
            build_sequences,
            fn_kwargs={"min_user_events": inp.cfg.min_user_events},
            batch_size=None,
            batch_format="pyarrow",
        )
        .materialize()
    )
    # every accepted event is in a sequence (counted before any cold items are held out)
    events_in_sequences = _sum_rows(
        sequences.map_batches(_sequence_stats, batch_format="pyarrow", batch_size=None), ["events"])["events"]
    cold = (_cold_items(inp.cfg.cold_items, inp.cfg.cold_items_by, inp.cfg.seed, sequences, inp.catalogue.num_rows)
            if inp.cfg.cold_items else None)
    if cold is not None:
        sequences = sequences.map_batches(hold_out_items, fn_kwargs={"cold": cold["ids"]}, batch_size=None,
                                          batch_format="pyarrow").materialize()
        cold["events_held_out"] = _sum_rows(sequences.select_columns(["held_out"]), ["held_out"])["held_out"]
    cold_users = None
    warm = sequences
    if inp.cfg.cold_users:
        sequences = sequences.map_batches(mark_cold_users, fn_kwargs={"fraction": inp.cfg.cold_users,
                                                                      "seed": inp.cfg.seed},
                                          batch_size=None, batch_format="pyarrow").materialize()
        warm = sequences.filter(expr="cold_user == False").materialize()
        held = _sum_rows(sequences.filter(expr="cold_user == True").map_batches(
            _sequence_stats, batch_format="pyarrow", batch_size=None), ["users", "events"])
        cold_users = {"fraction": inp.cfg.cold_users, "seed": inp.cfg.seed, "users": held["users"],
                      "events": held["events"], "events_known": list(range(layout.COLD_USER_EVENTS))}
    # with profiles, sequences keep profile_text: history="items" models train from sequences
    seq_columns = (SEQUENCE_SCHEMA.names + (["profile_text"] if with_profiles else [])
                   + (["queries"] if with_query else []))
    path, fs = layout.dataset_target(inp.out, layout.SEQUENCES)
    warm.select_columns(seq_columns).write_parquet(path, filesystem=fs)  # what training reads: no cold user
    stats = _sum_rows(
        warm.map_batches(_sequence_stats, batch_format="pyarrow", batch_size=None),
        ["users", "events", "train_events", "split_users", "profiles", "search_events"],
    )
    stats["events_in_sequences"] = events_in_sequences
    stats["cold_items"] = cold
    stats["cold_users"] = cold_users
    popularity = None
    if inp.cfg.negative_sampling == "popularity":
        popularity = _counts_by_key(
            warm.map_batches(train_item_counts, batch_format="pyarrow", batch_size=None), "item_id"
        )
    if with_profiles:
        profile_counts["profiles_without_events"] = profile_counts.pop("users") - stats["profiles"]
    stats["profile_rows"] = profile_counts
    return sequences, stats, popularity


def _cold_items(fraction: float, by: str, seed: int, sequences, num_items: int) -> dict:
    """The ``fraction`` of items with events first seen latest (ties: by id), or a seeded random one."""
    first: dict[str, int] = {}
    for ref in sequences.map_batches(item_first_seen, batch_format="pyarrow", batch_size=None).to_arrow_refs():
        t = ray.get(ref)
        for k, v in zip(t["item_id"].to_pylist(), t["first"].to_pylist(), strict=True):
            first[k] = min(v, first.get(k, v))
    n = max(1, round(fraction * len(first)))
    if by == "latest":
        ids = sorted(first, key=lambda k: (-first[k], k))[:n]
    else:
        ids = list(np.random.default_rng([seed, 7]).choice(sorted(first), size=n, replace=False))
    since = min(first[k] for k in ids)
    return {"fraction": fraction, "by": "first event, latest first" if by == "latest" else f"random (seed {seed})",
            "items_with_events": len(first), "catalogue_items": num_items, "count": n,
            "first_seen_since": pd.Timestamp(since, unit="us", tz="UTC").isoformat(), "ids": sorted(map(str, ids))}


def _read_profiles(inp: Inputs):
    """The user files' rows: accepted profile rows (a dataset), the rest written to
    ``user_rejects/`` with a reason; counts that reconcile with the rows read. A user with several
    rows keeps the first (file order, then row order: ``build_sequences``); the others are counted."""
    rows = ray.data.from_arrow(
        pa.Table.from_pylist(_file_rows(inp.user_refs)), override_num_blocks=len(inp.user_refs)
    ).map_batches(
        read_profiles,
        fn_kwargs={"id_column": inp.src.user_id_column, "profile_columns": inp.profile_cols},
        batch_size=1,
        batch_format="pyarrow",
    ).materialize()
    read = rows.count()
    by_reason = _counts_by_key(rows.map_batches(_reject_counts, batch_format="pyarrow", batch_size=None), "reason")
    if by_reason:
        path, fs = layout.dataset_target(inp.out, layout.USER_REJECTS)
        rows.map_batches(_rejected, batch_format="pyarrow", batch_size=None).write_parquet(path, filesystem=fs)
    kept = rows.map_batches(_accepted_profiles, batch_format="pyarrow", batch_size=None).materialize()
    kept_rows = kept.count()
    users = kept.groupby("user_id").count().count() if kept_rows else 0
    return kept, {"read": read, "rejected_by_reason": by_reason, "duplicates_ignored": kept_rows - users, "users": users}


def _accepted_profiles(t: pa.Table) -> pa.Table:
    return t.filter(pc.is_null(t["reason"])).select(PROFILE_COLUMNS)


def _write_examples(inp: Inputs, sequences, items: pa.Table, popularity: dict | None, actors: int) -> None:
    """Contexts, negatives and token ids on the actor pool (the tokenizer loaded once per actor)."""
    examples = sequences.map_batches(
        ExampleBuilder,
        fn_constructor_kwargs={
            "settings": ExampleSettings.from_config(inp.cfg),
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
    path, fs = layout.dataset_target(inp.out, layout.EXAMPLES)
    examples.write_parquet(path, filesystem=fs, partition_cols=["split"], ray_remote_args={"num_cpus": 0.1})


def _manifest(inp: Inputs, items: pa.Table, counts: dict, stats: dict, timings: dict, cpus: int, actors: int) -> dict:
    cfg, out = inp.cfg, inp.out
    example_counts = {s: layout.count_rows(out, layout.split_part(s))
                      for s in (*layout.SPLITS, *([layout.COLD_USERS] if cfg.cold_users else []))}
    users, split_users = stats["users"], stats["split_users"]
    return {
        "dataset": cfg.dataset,
        "output": out,
        "source": inp.src.description,
        "counts": {
            "rows_read": counts["read"],
            "events_accepted": counts["accepted"],
            "events_rejected": counts["rejected"],
            "rejects_by_reason": counts["by_reason"],
            "items": items.num_rows,
            "users": users,
            "users_split": split_users,
            "users_train_only": users - split_users,
            "users_with_profile": stats["profiles"],
            # user-file rows: read = rejected + duplicates_ignored + users_with_profile + profiles_without_events
            "user_rows": stats["profile_rows"],
            "events_by_split": {"train": stats["train_events"], "valid": split_users, "test": split_users},
            # search events carry a query (columns.query, or DataConfig.queries); the others are browsing
            "events_by_kind": {"search": stats["search_events"], "browse": stats["events"] - stats["search_events"]},
            "examples_by_split": example_counts,
            # events_accepted = train + valid + test events + these two (DataConfig.cold_items, cold_users)
            "cold_item_events_held_out": (stats["cold_items"] or {}).get("events_held_out", 0),
            "cold_user_events": (stats["cold_users"] or {}).get("events", 0),
        },
        "queries": {"column": inp.src.columns.query, "generated": cfg.queries},
        "cold_users": stats["cold_users"],
        # the held-out items (ids, how chosen): evaluate --targets cold|warm reads them
        "cold_items": stats["cold_items"],
        "tokenizer": inp.tok,
        "text": {
            "item_text_columns": inp.text_cols,
            "user_profile_columns": inp.profile_cols,
            "max_history": cfg.max_history,
            "max_context_tokens": cfg.max_context_tokens,
            "max_item_tokens": cfg.max_item_tokens,
            "history_order": "most_recent_first",
        },
        "config": to_dict(cfg),
        "fingerprint": _fingerprint(cfg, inp.src, inp.refs, inp.tok),
        "timings": {k: round(v, 2) for k, v in timings.items()},
        # which Ray node read and validated how many log rows (the record that work spread)
        "ray": {"cpus": cpus, "actors": actors, "nodes": sum(n["Alive"] for n in ray.nodes()), "rows_read_by_node": counts["by_node"]},
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
