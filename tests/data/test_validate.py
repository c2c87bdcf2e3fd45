import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


def _read_and_validate(path, columns=None, catalogue=CATALOGUE, **filters):
    """A log file through the readers and the validator, as the pipeline does."""
    columns = columns or ColumnMap()
    ref = list_files(str(path))[0]
    outs = []
    for table, malformed in iter_record_batches(ref, [c for c in (columns.user_id, columns.item_id, columns.timestamp,
                                                                  columns.event, columns.value) if c]):
        outs.append(validate_batch(table, columns=columns, timestamp_unit="s", catalogue=catalogue,
                                   source_file=ref.uri, file_idx=0, malformed=malformed, **filters))
    return pa.concat_tables(outs)


def test_one_id_rule_for_every_format(tmp_path):
    """12, 12.0 and "12.0" are the id "12" in Parquet (int and float columns), JSONL and CSV."""
    import pyarrow.parquet as pq

    catalogue = {"12", "7", "007", "12.5"}
    pq.write_table(pa.table({"user_id": [1.0, 2.0], "item_id": [12.0, 12.5], "timestamp": [1, 2]}), tmp_path / "f.parquet")
    pq.write_table(pa.table({"user_id": [1, 2], "item_id": [12, 7], "timestamp": [1, 2]}), tmp_path / "i.parquet")
    (tmp_path / "l.jsonl").write_text('{"user_id": 1.0, "item_id": 12.0, "timestamp": 1}\n'
                                      '{"user_id": "2", "item_id": "007", "timestamp": 2}\n')
    (tmp_path / "c.csv").write_text("user_id,item_id,timestamp\n1.0,12.0,1\n 2 ,12.50,2\n")
    got = {name: _read_and_validate(tmp_path / name, catalogue=catalogue)
           for name in ("f.parquet", "i.parquet", "l.jsonl", "c.csv")}
    assert got["f.parquet"]["item_id"].to_pylist() == ["12", "12.5"]
    assert got["i.parquet"]["item_id"].to_pylist() == ["12", "7"]
    assert got["l.jsonl"]["item_id"].to_pylist() == ["12", "007"]  # text other than N.0 stays as written
    assert got["c.csv"]["item_id"].to_pylist() == ["12", "12.50"]
    for out in got.values():
        assert out["user_id"].to_pylist() == ["1", "2"]
    assert got["c.csv"]["reason"].to_pylist() == [None, "unknown_item"]


def test_catalogue_ids_follow_the_same_rule(tmp_path):
    from recsys_ray.data.sources import Source, load_catalogue

    def source(items):
        return Source(events="", items=str(items), users=None, columns=ColumnMap(), format="auto", timestamp_unit="s",
                      item_id_column="item_id", user_id_column="user_id", item_text_columns=[], user_profile_columns=[])

    (tmp_path / "items.jsonl").write_text('{"item_id": 12.0, "title": "a"}\n{"item_id": "13", "title": "b"}\n')
    table, _ = load_catalogue(source(tmp_path / "items.jsonl"))
    assert table["item_id"].to_pylist() == ["12", "13"]
    (tmp_path / "dup.csv").write_text("item_id,title\n12,a\n12.0,b\n")
    with pytest.raises(DataError, match="duplicate item_id '12' at rows 0 and 1"):
        load_catalogue(source(tmp_path / "dup.csv"))


def test_bytes_that_are_not_utf8_reject_their_row_not_the_file(tmp_path):
    (tmp_path / "log.csv").write_bytes(b"user_id,item_id,timestamp\nu1,i1,1\nu\xff2,i2,2\nu3,i3,3\n")
    (tmp_path / "log.jsonl").write_bytes(b'{"user_id": "u1", "item_id": "i1", "timestamp": 1}\n'
                                         b'{"user_id": "u\xff2", "item_id": "i2", "timestamp": 2}\n'
                                         b'{"user_id": "u3", "item_id": "i3", "timestamp": 3}\n')
    for name, detail in (("log.csv", "user_id: not UTF-8 (an invalid byte, read as U+FFFD)"),
                         ("log.jsonl", "not UTF-8 (byte 0xff at offset 14)")):
        out = _read_and_validate(tmp_path / name)
        assert out.num_rows == 3, name
        rows = sorted(zip(out["source_row"].to_pylist(), out["reason"].to_pylist(), out["detail"].to_pylist(), strict=True))
        assert [(r, why) for r, why, _ in rows] == [(0, None), (1, "malformed_row"), (2, None)], name
        assert rows[1][2] == detail, name


def test_min_value_and_event_types_reject_with_their_reason():
    raw = pa.table({"user_id": ["u1"] * 5, "item_id": ["i1"] * 5, "timestamp": ["1", "2", "3", "4", "5"],
                    "event": ["click", "buy", " buy ", "view", None], "value": ["5", "3.5", "4", None, "4"]})
    table = raw.append_column("__row", pa.array(range(5), pa.int64()))
    out = validate_batch(table, columns=ColumnMap(event="event", value="value"), timestamp_unit="s",
                         catalogue=CATALOGUE, source_file="f", file_idx=0, min_value=4, event_types=["buy", "click"])
    assert out["reason"].to_pylist() == [None, "below_min_value", None, "below_min_value", "other_event_type"]
    assert out["detail"][1].as_py() == "value=3.5 is below min_value=4"
    assert out["detail"][4].as_py() == 'event=None is not one of event_types ["buy", "click"]'


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30) | st.floats(allow_nan=False)
    | st.text(max_size=8) | st.sampled_from(["i1", "i2", "u1", "2024-01-02", "1e999", " ", "12.0"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=4,
)
LOG_ROWS = st.lists(
    st.one_of(
        st.fixed_dictionaries({}, optional={k: JSON_VALUES for k in ("user_id", "item_id", "timestamp", "value", "event")}),
        st.binary(max_size=20).filter(lambda b: b"\n" not in b and b.strip()),  # raw lines, often not JSON / UTF-8
        st.builds(lambda ts: {"user_id": "u1", "item_id": "i1", "timestamp": ts},  # far past / future, negative
                  st.integers(min_value=-(10**20), max_value=10**20)),
    ),
    min_size=1, max_size=30,
)


@given(rows=LOG_ROWS, fmt=st.sampled_from(["jsonl", "csv"]))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzzed_log_rows_are_each_accepted_or_rejected_with_a_reason(tmp_path_factory, rows, fmt):
    folder = tmp_path_factory.mktemp("fuzz")
    if fmt == "jsonl":
        lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
        (folder / "log.jsonl").write_bytes(b"\n".join(lines) + b"\n")
        n = sum(1 for line in lines if line.strip())
    else:  # one csv cell per field: values as their JSON text, a raw line as it is
        cols = ["user_id", "item_id", "timestamp", "value", "event"]
        lines = [",".join(cols).encode()]
        for r in rows:
            if isinstance(r, bytes):
                lines.append(r.replace(b"\r", b""))
            else:
                lines.append(b",".join(b"" if r.get(c) is None else json.dumps(r[c]).replace(",", ";").encode() for c in cols))
        (folder / "log.csv").write_bytes(b"\n".join(lines) + b"\n")
        n = None  # the csv parser decides what a line is (quotes may join lines)
    out = _read_and_validate(folder / f"log.{fmt}", columns=ColumnMap(event="event", value="value"))
    if n is not None:
        assert out.num_rows == n
    reasons = out["reason"].to_pylist()
    rejected = [i for i, r in enumerate(reasons) if r is not None]
    assert all(out["detail"][i].as_py() for i in rejected)
    assert len(set(out["source_row"].to_pylist())) == out.num_rows  # each row once
    accepted = out.filter(pa.compute.is_null(out["reason"]))
    assert all(u and i in CATALOGUE for u, i in zip(accepted["user_id"].to_pylist(), accepted["item_id"].to_pylist(), strict=True))
