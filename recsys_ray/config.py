"""Typed configuration: dataclasses, YAML loading, ``--set key=value`` overrides, and one
validation step that reports every problem at once.

A config dataclass documents each field with a one-line comment. Value checks come in two forms,
both collected by :func:`build_config` across the whole tree (nested configs prefixed by their
path, ``optim.lr``):

- ``RANGES``: a class attribute mapping field -> rule, e.g. ``{"lr": "> 0", "warmup_ratio":
  "[0, 1)"}`` (``>= x``, ``> x``, ``<= x``, ``< x`` or an interval with ``[``/``(`` ends);
- ``problems() -> list[str]``: the checks no rule can say (several fields together).

Unknown keys, wrong types and value problems end in one :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import datetime
import operator
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from recsys_ray.errors import ConfigError, one_line

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# range rules (the RANGES class attribute)

_BOUND = re.compile(r"^(>=|>|<=|<)\s*(\S+)$")
_INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])$")
_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def rule_holds(value: Any, rule: str) -> bool:
    """Whether a number satisfies a rule such as ``">= 1"`` or ``"[0, 1)"``."""
    m = _BOUND.match(rule)
    if m:
        return _COMPARE[m.group(1)](value, float(m.group(2)))
    m = _INTERVAL.match(rule)
    if not m:
        raise ValueError(f"not a range rule: {rule!r}")
    lo, hi = float(m.group(2)), float(m.group(3))
    low_ok = value >= lo if m.group(1) == "[" else value > lo
    high_ok = value <= hi if m.group(4) == "]" else value < hi
    return low_ok and high_ok


def range_problems(obj: Any, prefix: str = "") -> list[str]:
    """One line per field of ``obj`` that breaks its ``RANGES`` rule (``prefix`` names its path)."""
    out = []
    for name, rule in getattr(type(obj), "RANGES", {}).items():
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not rule_holds(value, rule):
            shown = rule if _BOUND.match(rule) else f"in {rule}"
            out.append(f"{prefix}{name} must be {shown}, got {value!r}")
    return out


def location_problems(storage_path: str, name: str, prefix: str = "") -> list[str]:
    """A run's ``storage_path`` and ``name`` (one folder under it; the same name resumes)."""
    out = []
    if not storage_path:
        out.append(f"{prefix}storage_path must not be empty")
    if not name or "/" in name:
        out.append(f"{prefix}name must be a non-empty folder name, got {name!r}")
    return out


def value_problems(obj: Any, prefix: str = "") -> list[str]:
    """Range rules and ``problems()`` of ``obj`` and of every nested config, in field order."""
    out = range_problems(obj, prefix)
    check = getattr(obj, "problems", None)
    if callable(check):
        out.extend(check())
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.extend(value_problems(value, f"{prefix}{f.name}."))
    return out


# ---------------------------------------------------------------------------------------------
# building a config from a dict


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


def _coerce(value: Any, tp: Any) -> Any:
    """YAML 1.1 reads some scalars as another type than the field means: ``1e-12`` (no dot) is a
    str, ``2026-01-01T00:00:00Z`` a datetime. A str field takes a date's ISO text or a number's
    text, a float field a str that is a float; anything else stays as it is (and is type-checked)."""
    if isinstance(value, datetime.date) and _type_ok("", tp):
        return value.isoformat()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not _type_ok(value, tp) and _type_ok("", tp):
        return str(value)  # cutoff=891382271
    if isinstance(value, str) and not _type_ok(value, tp) and _type_ok(0.0, tp):
        try:
            return float(value)
        except ValueError:
            return value
    return value


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
        elif _type_ok(value := _coerce(value, tp), tp):
            kwargs[key] = float(value) if tp is float else value
        else:
            problems.append(f"{path}: expected {_describe(tp)}, got {value!r}")
    return cls(**kwargs)


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


def deep_merge(base: dict, over: dict) -> dict:
    """``base`` with ``over`` written on top, nested mappings merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_config(cls: type[T], data: dict | None = None, overrides: list[str] | None = None) -> T:
    """Build and validate ``cls`` from a dict plus overrides; raise one ConfigError listing all problems."""
    merged = merge_overrides(data or {}, overrides or [])
    problems: list[str] = []
    obj = _build(cls, merged, "", problems)
    if not problems:
        problems.extend(value_problems(obj))
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
        raise ConfigError([f"{p}: invalid YAML ({one_line(exc)})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: top level must be a mapping"])
    return data


def to_dict(obj: Any) -> dict:
    """Dataclass -> plain dict (for manifests, checkpoints and logs)."""
    return dataclasses.asdict(obj)


def leaf_fields(cls: type, prefix: str = "") -> set[str]:
    """Dotted paths of every non-dataclass field of ``cls`` and its nested configs."""
    hints = typing.get_type_hints(cls)
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out |= leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.add(f"{prefix}{f.name}")
    return out
