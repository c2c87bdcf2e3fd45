"""Timestamps of behaviour logs and configs -> epoch microseconds: the one parsing rule
(numbers in a unit, ISO-8601 text, native timestamp and date columns), shared by validation
(:mod:`recsys_ray.data.validate`) and ``DataConfig.cutoff``. Depends on nothing of ours."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

_UNIT_TO_US = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": 0.001}
# Epoch values outside [1900, 2200] are almost always a wrong unit, not a real time.
_MIN_US = -2_208_988_800 * 1_000_000
_MAX_US = 7_258_118_400 * 1_000_000


def parse_timestamps(arr: pa.ChunkedArray | pa.Array, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """-> (int64 epoch microseconds, ok mask). Numbers use ``unit``; text may be a number or ISO-8601."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    if pa.types.is_timestamp(arr.type):
        us = pc.cast(arr.cast(pa.timestamp(arr.type.unit, tz=arr.type.tz)), pa.int64())
        factor = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": 0.001}[arr.type.unit]
        vals = np.asarray(pc.fill_null(us, 0), dtype=np.float64) * factor
        ok = np.asarray(arr.is_valid())
        return vals.astype(np.int64), ok
    if pa.types.is_date(arr.type):
        arr = pc.cast(arr, pa.timestamp("us"))
        return parse_timestamps(arr, unit)
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
        num = np.asarray(pc.fill_null(pc.cast(arr, pa.float64()), np.nan), dtype=np.float64)
        return _numeric_to_us(num, unit)
    text = pd.Series(np.asarray(pc.cast(arr, pa.string()).to_pylist(), dtype=object))
    num = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
    us, ok = _numeric_to_us(num, unit)
    need = ~ok & text.notna().to_numpy() & np.isnan(num)
    if need.any():
        parsed = pd.to_datetime(text[need], errors="coerce", utc=True, format="ISO8601")
        good = parsed.notna().to_numpy()
        idx = np.flatnonzero(need)[good]
        us[idx] = parsed[good].astype("datetime64[us, UTC]").astype("int64").to_numpy()
        ok[idx] = True
    assert len(us) == n
    return us, ok


def _numeric_to_us(num: np.ndarray, unit: str) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = num * _UNIT_TO_US[unit]
        ok = np.isfinite(scaled) & (scaled >= _MIN_US) & (scaled <= _MAX_US)
    us = np.where(ok, scaled, 0).astype(np.int64)
    return us, ok


def cutoff_us(cutoff: str | float | None, unit: str) -> int | None:
    """``DataConfig.cutoff`` as epoch microseconds, the unit events are compared in; None if unparseable."""
    if cutoff is None:
        return None
    us, ok = parse_timestamps(pa.array([str(cutoff)]), unit)
    return int(us[0]) if ok[0] else None
