import json

import numpy as np
import pyarrow as pa
import pytest

from recsys_ray.data.config import ColumnMap
from recsys_ray.data.files import FileRef, iter_record_batches, list_files, read_columns
from recsys_ray.data.validate import parse_timestamps, validate_batch
from recsys_ray.errors import DataError

CATALOGUE = {"i1", "i2", "i3"}


VALUE_COLUMNS = ColumnMap(value="value")


def _validate(table, columns=VALUE_COLUMNS, unit="s", malformed=()):
    table = table.append_column("__row", pa.array(range(table.num_rows), pa.int64()))
    return validate_batch(
        table, columns=columns, timestamp_unit=unit, catalogue=CATALOGUE,
        source_file="log.csv", file_idx=0, malformed=list(malformed),
    )


def test_each_bad_row_gets_its_reason_and_nothing_is_lost():
    raw = pa.table(
        {
            "user_id": ["u1", None, "u1", "u2", "u2", "u3", " "],
            "item_id": ["i1", "i2", "", "i9", "i2", "i3", "i1"],
            "timestamp": ["100", "101", "102", "103", "yesterday", "2024-01-02T03:04:05Z", "5"],
            "value": ["5", "4", "3", "2", "1", "x", "1"],
        }
    )
    out = _validate(raw)
    assert out.num_rows == raw.num_rows  # accepted + rejected = read
    reasons = out["reason"].to_pylist()
    assert reasons == [None, "missing_user_id", "missing_item_id", "unknown_item", "bad_timestamp", "bad_value", "missing_user_id"]
    assert out["detail"][3].as_py() == "item_id 'i9' is not in the catalogue"
    assert out["detail"][4].as_py() == "timestamp='yesterday' is not a time"
    assert json.loads(out["raw"][5].as_py()) == {"user_id": "u3", "item_id": "i3", "timestamp": "2024-01-02T03:04:05Z", "value": "x"}
    assert out["raw"][0].as_py() is None  # accepted rows carry no raw copy
    assert out["source_row"].to_pylist() == list(range(7))
    assert out["source_file"][0].as_py() == "log.csv"


def test_malformed_rows_from_the_reader_are_appended_as_rejects():
    raw = pa.table({"user_id": ["u1"], "item_id": ["i1"], "timestamp": [1], "value": [1.0]})
    out = _validate(raw, malformed=[(7, "invalid JSON: x", "{oops")])
    assert out.num_rows == 2
    last = out.slice(1).to_pylist()[0]
    assert (last["reason"], last["source_row"], json.loads(last["raw"])) == ("malformed_row", 7, "{oops")


def test_timestamps_numeric_units_iso_and_native():
    us, ok = parse_timestamps(pa.array(["881250949", "2024-01-02T00:00:00Z", "2024-01-02 01:00:00", "nope", None]), "s")
    assert ok.tolist() == [True, True, True, False, False]
    assert us[0] == 881250949 * 1_000_000
    assert us[1] == 1704153600 * 1_000_000 and us[2] == (1704153600 + 3600) * 1_000_000
    us, ok = parse_timestamps(pa.array([881250949000], pa.int64()), "ms")
    assert ok.all() and us[0] == 881250949 * 1_000_000
    # a milliseconds value read as seconds is far outside [1900, 2200]: rejected, not silently wrong
    _, ok = parse_timestamps(pa.array([881250949000], pa.int64()), "s")
    assert not ok[0]
    native = pa.array([np.datetime64("2024-01-02T00:00:00", "ms")], pa.timestamp("ms"))
    us, ok = parse_timestamps(native, "s")
    assert ok.all() and us[0] == 1704153600 * 1_000_000


def test_integer_and_float_ids_become_the_same_strings():
    raw = pa.table({"user_id": pa.array([7, 8]), "item_id": pa.array([1.0, 2.0]), "timestamp": pa.array([1, 2])})
    out = validate_batch(
        raw.append_column("__row", pa.array([0, 1], pa.int64())), columns=ColumnMap(), timestamp_unit="s",
        catalogue={"1", "2"}, source_file="f", file_idx=0,
    )
    assert out["user_id"].to_pylist() == ["7", "8"] and out["item_id"].to_pylist() == ["1", "2"]
    assert out["reason"].null_count == 2


def test_csv_reader_reports_malformed_lines_with_their_row(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("user_id,item_id,timestamp\nu1,i1,1\nu2,i2\nu3,i3,3\nu4,i4,4,extra\nu5,i5,5\n")
    ref = list_files(str(p))[0]
    tables = list(iter_record_batches(ref, ["user_id", "item_id", "timestamp"]))
    good = pa.concat_tables([t for t, _ in tables])
    bad = [m for _, ms in tables for m in ms]
    assert good["user_id"].to_pylist() == ["u1", "u3", "u5"]
    assert good["__row"].to_pylist() == [0, 2, 4]
    assert [b[0] for b in bad] == [1, 3]


def test_jsonl_reader_keeps_bad_json_and_missing_keys(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text('{"user_id": "u1", "item_id": 1, "timestamp": 10}\n{broken\n{"user_id": "u2", "timestamp": 11}\n')
    ref = list_files(str(p))[0]
    assert set(read_columns(ref)) == {"user_id", "item_id", "timestamp"}
    (t, malformed), = list(iter_record_batches(ref, ["user_id", "item_id", "timestamp"]))
    assert t["item_id"].to_pylist() == ["1", None]
    assert t["__row"].to_pylist() == [0, 2]
    assert malformed[0][0] == 1 and malformed[0][1].startswith("invalid JSON")


def test_listing_files_folders_globs_and_errors(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("b.csv", "a.csv", "c.parquet", ".hidden.csv", "_SUCCESS"):
        (tmp_path / "d" / name).write_text("user_id\n")
    assert [r.uri.rsplit("/", 1)[1] for r in list_files(str(tmp_path / "d"))] == ["a.csv", "b.csv", "c.parquet"]
    assert [r.format for r in list_files(str(tmp_path / "d" / "*.csv"))] == ["csv", "csv"]
    with pytest.raises(DataError, match="input not found"):
        list_files(str(tmp_path / "missing.csv"))
    with pytest.raises(DataError, match="no input files match"):
        list_files(str(tmp_path / "d" / "*.jsonl"))
    (tmp_path / "x.weird").write_text("")
    with pytest.raises(DataError, match="cannot tell the file format"):
        list_files(str(tmp_path / "x.weird"))
    assert isinstance(list_files(str(tmp_path / "d" / "a.csv"))[0], FileRef)
