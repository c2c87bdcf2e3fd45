"""The preparation job end to end on the session's local Ray."""

import json

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from recsys_ray.config import build_config
from recsys_ray.data.config import DataConfig
from recsys_ray.data.layout import read_split
from recsys_ray.data.pipeline import prepare
from recsys_ray.errors import ConfigError, DataError, RecsysError

ITEMS = "item_id,title,genre\ni1,Alpha,drama\ni2,Beta,comedy\ni3,Gamma,drama\ni4,Delta,horror\ni5,Epsilon,comedy\n"
# u1: 4 good events (two tied at t=30: i3 came first in the file); u2: 3 good; u3: 2 good (train only)
LOG = """user_id,item_id,timestamp,rating
u1,i1,10,5
u2,i2,5,3
u1,i3,30,4
u1,i2,30,4
u2,i9,6,1
u3,i1,1,2
u1,i4,50,1
,i1,7,1
u2,i4,7,2
u2,i5,9,2
u3,i2,2,5
u3,i3,notatime,1
u1,i5,60,x
"""


def _cfg(tmp_path, **extra):
    data = {
        "dataset": str(tmp_path / "log.csv"),
        "items": str(tmp_path / "items.csv"),
        "output": str(tmp_path / "out"),
        "columns": {"value": "rating"},
        "negatives": 2,
        "max_history": 3,
    }
    data.update(extra)
    return build_config(DataConfig, data)


@pytest.fixture
def small_log(tmp_path):
    (tmp_path / "items.csv").write_text(ITEMS)
    (tmp_path / "log.csv").write_text(LOG)
    # u1 twice (the first row wins), a row without an id, u9 has no event
    (tmp_path / "users.csv").write_text("user_id,age,city\nu1,30,Paris\nu2,41,Lyon\nu1,99,Dup\n ,20,Nowhere\nu9,50,Nice\n")
    return tmp_path


def test_small_log_counts_reconcile_and_split_is_right(ray_session, small_log):
    m = prepare(_cfg(small_log, users=str(small_log / "users.csv")))
    c = m["counts"]
    assert c["rows_read"] == 13 == c["events_accepted"] + c["events_rejected"]
    assert c["events_rejected"] == 4
    assert c["rejects_by_reason"] == {"unknown_item": 1, "missing_user_id": 1, "bad_timestamp": 1, "bad_value": 1}
    rejects = pads.dataset(str(small_log / "out" / "rejects")).to_table().to_pylist()
    by_row = {r["source_row"]: r for r in rejects}
    assert set(by_row) == {4, 7, 11, 12}  # 0-based data rows of the csv
    assert by_row[4]["reason"] == "unknown_item" and json.loads(by_row[4]["raw"])["item_id"] == "i9"
    assert all(r["source_file"].endswith("log.csv") for r in rejects)

    assert c["users"] == 3 and c["users_split"] == 2 and c["users_train_only"] == 1
    assert c["events_by_split"] == {"train": 2 + 1 + 2, "valid": 2, "test": 2}
    test = {r["user_id"]: r for r in read_split(small_log / "out", "test").to_pylist()}
    valid = {r["user_id"]: r for r in read_split(small_log / "out", "valid").to_pylist()}
    assert (test["u1"]["target_item_id"], valid["u1"]["target_item_id"]) == ("i4", "i2")  # tie kept in file order
    assert test["u1"]["seen_item_ids"] == ["i1", "i3", "i2"]
    assert (test["u2"]["target_item_id"], valid["u2"]["target_item_id"]) == ("i5", "i4")
    assert "u3" not in test  # fewer than 3 events: train only
    assert test["u1"]["context_text"].startswith("age: 30 | city: Paris | history: Beta | genre: comedy ; Gamma")
    train = read_split(small_log / "out", "train").to_pylist()
    assert sorted((r["user_id"], r["target_item_id"]) for r in train) == [("u1", "i3"), ("u3", "i2")]
    for r in train:  # negatives are never the user's train-time items (valid/test items may be)
        user_items = {"u1": {"i1", "i3"}, "u3": {"i1", "i2"}}[r["user_id"]]
        assert len(r["negative_item_ids"]) == 2
        assert not set(r["negative_item_ids"]) & user_items
    assert c["users_with_profile"] == 2
    assert c["user_rows"] == {"read": 5, "rejected_by_reason": {"missing_user_id": 1}, "duplicates_ignored": 1,
                              "profiles_without_events": 1}
    user_rejects = pads.dataset(str(small_log / "out" / "user_rejects")).to_table().to_pylist()
    assert [(r["source_row"], r["reason"], r["detail"]) for r in user_rejects] == [(3, "missing_user_id", "user_id is empty")]
    assert json.loads(user_rejects[0]["raw"]) == {"user_id": " ", "age": "20", "city": "Nowhere"}
    assert m["tokenizer"]["vocab_size"] == 30522
    on_disk = json.loads((small_log / "out" / "manifest.json").read_text())
    assert on_disk["fingerprint"] == m["fingerprint"]


def test_a_query_column_makes_search_events_that_flow_to_sequences_and_examples(ray_session, small_log):
    """columns.query: an event with a query is a search event, an empty one a browsing event; the
    query stays with its event through validation, the split (profiles and rejects included) and
    tokenization, and the manifest counts both kinds."""
    lines = LOG.splitlines()
    queries = ["", "comedy", "a drama", "", "x", "old film", "", "q", "  ", "comedy please", "", "", ""]
    log = [lines[0] + ",query"] + [f"{line},{q}" for line, q in zip(lines[1:], queries, strict=True)]
    (small_log / "qlog.csv").write_text("\n".join(log) + "\n")
    m = prepare(_cfg(small_log, dataset=str(small_log / "qlog.csv"), users=str(small_log / "users.csv"),
                     columns={"value": "rating", "query": "query"}))
    c = m["counts"]
    assert c["rows_read"] == 13 and c["events_accepted"] == 9
    # accepted search events: u2 i2 "comedy", u1 i3 "a drama", u3 i1 "old film", u2 i5 "comedy please"
    # ("  " is no query)
    assert c["events_by_kind"] == {"search": 4, "browse": 5} and m["queries"]["column"] == "query"
    test = {r["user_id"]: r for r in read_split(small_log / "out", "test").to_pylist()}
    valid = {r["user_id"]: r for r in read_split(small_log / "out", "valid").to_pylist()}
    assert test["u2"]["query"] == "comedy please" and test["u2"]["query_ids"]
    assert test["u1"]["query"] is None and test["u1"]["query_ids"] is None and valid["u1"]["query"] is None
    train = {(r["user_id"], r["target_item_id"]): r["query"] for r in read_split(small_log / "out", "train").to_pylist()}
    assert train == {("u1", "i3"): "a drama", ("u3", "i2"): None}
    seqs = {r["user_id"]: r for r in pads.dataset(str(small_log / "out" / "sequences")).to_table().to_pylist()}
    assert seqs["u1"]["item_ids"] == ["i1", "i3", "i2", "i4"] and seqs["u1"]["queries"] == [None, "a drama", None, None]
    assert seqs["u1"]["profile_text"].startswith("age: 30")
    rejects = {r["source_row"]: r for r in pads.dataset(str(small_log / "out" / "rejects")).to_table().to_pylist()}
    assert json.loads(rejects[4]["raw"])["query"] == "x"  # a rejected row keeps its query in raw


def test_same_log_as_jsonl_and_parquet_gives_the_same_examples(ray_session, small_log):
    prepare(_cfg(small_log))
    base = read_split(small_log / "out", "test").sort_by("user_id")
    rows = [dict(zip(LOG.splitlines()[0].split(","), line.split(","), strict=True)) for line in LOG.splitlines()[1:]]
    (small_log / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    prepare(_cfg(small_log, dataset=str(small_log / "log.jsonl"), output=str(small_log / "o2")))
    assert read_split(small_log / "o2", "test").sort_by("user_id").drop_columns([]).equals(base)
    (small_log / "pq").mkdir()
    half = len(rows) // 2  # two files: source order continues across them
    pq.write_table(pa.Table.from_pylist(rows[:half]), small_log / "pq" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[half:]), small_log / "pq" / "b.parquet")
    m = prepare(_cfg(small_log, dataset=str(small_log / "pq"), output=str(small_log / "o3")))
    assert m["counts"]["rows_read"] == 13
    assert read_split(small_log / "o3", "test").sort_by("user_id").equals(base)


def test_min_value_keeps_only_the_positive_events(ray_session, small_log):
    m = prepare(_cfg(small_log, min_value=4))
    c = m["counts"]
    assert c["rows_read"] == 13 == c["events_accepted"] + c["events_rejected"]
    # ratings 5, 4, 4, 5 survive (u1: i1 i3 i2; u3: i2); the rest were 1-3 or bad before the filter
    assert c["rejects_by_reason"] == {"unknown_item": 1, "missing_user_id": 1, "bad_timestamp": 1, "bad_value": 1,
                                      "below_min_value": 5}
    assert c["events_accepted"] == 4 and c["users_split"] == 1


def test_cutoff_keeps_the_log_as_it_stood_and_counts_the_rest(ray_session, small_log):
    """Events at or after the cutoff are rejects of their own reason (the refresh cycle's "before"
    window); a number is read in timestamp_unit, text as ISO-8601; a bad cutoff is a config error."""
    m = prepare(_cfg(small_log, cutoff="30"))
    c = m["counts"]
    assert c["rows_read"] == 13 == c["events_accepted"] + c["events_rejected"]
    # u1's i3 and i2 at t=30 and i4 at t=50 (i5 at t=60 was a bad_value first)
    assert c["rejects_by_reason"]["after_cutoff"] == 3 and c["events_accepted"] == 6, c
    rejects = pads.dataset(str(small_log / "out" / "rejects")).to_table().to_pylist()
    late = sorted(r["raw"] for r in rejects if r["reason"] == "after_cutoff")
    assert len(late) == 3 and all("at or after cutoff 1970-01-01T00:00:30+00:00" in r["detail"]
                                  for r in rejects if r["reason"] == "after_cutoff")
    iso = prepare(_cfg(small_log, cutoff="1970-01-01T00:00:30Z", output=str(small_log / "iso")))
    assert iso["counts"]["rejects_by_reason"] == c["rejects_by_reason"]
    with pytest.raises(ConfigError, match="cutoff: 'yesterday' is not a time"):
        _cfg(small_log, cutoff="yesterday")


def test_cold_items_are_held_out_of_training_and_validation_but_kept_as_test_targets(ray_session, small_log):
    """cold_items=0.2 of the 5 items with events = 1, the one first seen latest: i3 (t=30). u1's
    i3 leaves its history (train and validation move up); counts still reconcile."""
    m = prepare(_cfg(small_log, cold_items=0.2))
    c, cold = m["counts"], m["cold_items"]
    assert cold["ids"] == ["i3"] and cold["count"] == 1 and cold["items_with_events"] == 5
    assert c["cold_item_events_held_out"] == 1 == cold["events_held_out"]
    split = c["events_by_split"]
    assert c["events_accepted"] == split["train"] + split["valid"] + split["test"] + 1
    seqs = {r["user_id"]: r for r in pads.dataset(str(small_log / "out" / "sequences")).to_table().to_pylist()}
    assert seqs["u1"]["item_ids"] == ["i1", "i2", "i4"] and seqs["u1"]["n_train"] == 1
    rows = pads.dataset(str(small_log / "out" / "examples"), partitioning="hive").to_table().to_pylist()
    for r in rows:
        assert "i3" not in r["seen_item_ids"] and "Gamma" not in r["context_text"], r
        assert r["target_item_id"] != "i3" or r["split"] == "test", r
    with pytest.raises(ConfigError, match="cold_items"):
        _cfg(small_log, cold_items=1.0)


def test_cold_users_are_held_out_and_get_rows_from_their_first_events(ray_session, tmp_path):
    """cold_users: a seeded share of the split users leaves training and validation; each gets
    cold_users rows (profile + first k events -> event k, k = 0, 1, 2); counts reconcile."""
    from recsys_ray.data.examples import is_cold_user

    cfg = build_config(DataConfig, {"dataset": "synthetic", "output": str(tmp_path / "out"), "cold_users": 0.2},
                       ["synthetic.num_users=60", "synthetic.num_items=40", "synthetic.num_events=900"])
    m = prepare(cfg)
    c, cold = m["counts"], m["cold_users"]
    assert cold["users"] > 0 and c["cold_user_events"] == cold["events"]
    split = c["events_by_split"]
    assert c["events_accepted"] == split["train"] + split["valid"] + split["test"] + cold["events"]
    rows = read_split(tmp_path / "out", "cold_users").to_pylist()
    assert c["examples_by_split"]["cold_users"] == len(rows) == 3 * cold["users"]
    users = {r["user_id"] for r in rows}
    assert all(is_cold_user(u, 0.2, 0) for u in users)
    seqs = pads.dataset(str(tmp_path / "out" / "sequences")).to_table().to_pylist()
    assert not users & {r["user_id"] for r in seqs}  # nothing of theirs to train on
    for split_name in ("train", "valid", "test"):
        assert not users & set(read_split(tmp_path / "out", split_name)["user_id"].to_pylist())
    by_user: dict = {}
    for r in rows:
        by_user.setdefault(r["user_id"], []).append(r)
    for rs in by_user.values():
        rs.sort(key=lambda r: r["position"])
        assert [r["position"] for r in rs] == [0, 1, 2] and rs[0]["seen_item_ids"] == []
        assert rs[2]["seen_item_ids"] == [rs[0]["target_item_id"], rs[1]["target_item_id"]]


def test_rerun_into_the_same_output_replaces_it(ray_session, small_log):
    first = prepare(_cfg(small_log))
    second = prepare(_cfg(small_log))
    assert first["fingerprint"] == second["fingerprint"]
    assert read_split(small_log / "out", "test").num_rows == 2  # not appended twice


@pytest.mark.parametrize(
    "change, message",
    [
        ({"dataset": "MISSING/log.csv"}, "input not found"),
        ({"items": "MISSING/items.csv"}, "input not found"),
        ({"items": None}, "an item catalogue file is required"),
        ({"columns": {"timestamp": "ts"}}, "missing required column 'ts'"),
        ({"columns": {"value": "score"}}, "missing mapped column 'score'"),
        ({"dataset": "EMPTY"}, "empty input: 0 events"),
        ({"dataset": "ALLBAD"}, "every one of the 1 events"),
        ({"items": "DUPITEMS"}, "duplicate item_id 'i1' at rows 0 and 1"),
        ({"users": "BADUSERS"}, "missing column 'user_id'"),
        ({"columns": {}, "min_value": 4}, "min_value=4: the log at .* has no value column"),
        ({"event_types": ["buy"]}, "event_types: the log at .* has no event column"),
    ],
)
def test_bad_input_fails_with_one_clear_line(ray_session, small_log, change, message):
    (small_log / "empty.csv").write_text("user_id,item_id,timestamp,rating\n")
    (small_log / "allbad.csv").write_text("user_id,item_id,timestamp,rating\nu1,zz,1,1\n")
    (small_log / "dup.csv").write_text("item_id,title\ni1,a\ni1,b\n")
    (small_log / "badusers.csv").write_text("uid,age\n1,2\n")
    names = {"EMPTY": "empty.csv", "ALLBAD": "allbad.csv", "DUPITEMS": "dup.csv", "BADUSERS": "badusers.csv"}
    fixed = {}
    for k, v in change.items():
        if isinstance(v, str):
            v = str(small_log / names[v]) if v in names else v.replace("MISSING", str(small_log / "missing"))
        fixed[k] = v
    with pytest.raises(RecsysError, match=message) as info:
        prepare(_cfg(small_log, **fixed))
    assert "\n" not in str(info.value)


def test_logs_read_from_s3_and_the_output_written_to_s3(ray_session, small_log, s3_server):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="logs")
    s3.upload_file(str(small_log / "log.csv"), "logs", "day=1/log.csv")
    s3.upload_file(str(small_log / "items.csv"), "logs", "catalogue/items.csv")
    m = prepare(_cfg(small_log, dataset="s3://logs/day=1/", items="s3://logs/catalogue/items.csv"))
    assert m["counts"]["rows_read"] == 13 and m["counts"]["events_rejected"] == 4
    rejects = pads.dataset(str(small_log / "out" / "rejects")).to_table()
    assert rejects["source_file"][0].as_py() == "s3://logs/day=1/log.csv"
    # the same preparation into the bucket: every part lands there, nothing on local disk
    remote = prepare(_cfg(small_log, dataset="s3://logs/day=1/", items="s3://logs/catalogue/items.csv",
                          output="s3://logs/prepared"))
    assert remote["output"] == "s3://logs/prepared" and remote["counts"] == m["counts"]
    assert read_split("s3://logs/prepared", "test").sort_by("user_id").equals(
        read_split(str(small_log / "out"), "test").sort_by("user_id"))
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="logs", Prefix="prepared/")["Contents"]}
    assert "prepared/manifest.json" in keys and any(k.startswith("prepared/rejects/") for k in keys)
    assert sum(remote["ray"]["rows_read_by_node"].values()) == 13
    assert not (small_log / "s3:").exists()  # never a local folder named after the URI
    with pytest.raises(DataError, match="input not found: s3://logs/nope/"):
        prepare(_cfg(small_log, dataset="s3://logs/nope/", items="s3://logs/catalogue/items.csv"))
    with pytest.raises(RecsysError, match="output: cannot write s3://no-such-bucket/x: .*(no such bucket|NoSuchBucket)"):
        prepare(_cfg(small_log, output="s3://no-such-bucket/x"))


def test_synthetic_dataset_prepares(ray_session, tmp_path):
    cfg = build_config(
        DataConfig,
        {"dataset": "synthetic", "output": str(tmp_path / "syn"), "negative_sampling": "popularity"},
        ["synthetic.num_users=50", "synthetic.num_items=60", "synthetic.num_events=600"],
    )
    m = prepare(cfg)
    c = m["counts"]
    assert c["rows_read"] == 600 and c["events_rejected"] == 0 and c["users"] == 50 and c["items"] == 60
    assert c["examples_by_split"]["test"] == c["users_split"] == 50
    assert c["examples_by_split"]["train"] == 600 - 3 * 50  # every event but valid, test and the first


@pytest.mark.slow
def test_movielens_100k_summary(ray_session, tmp_path, recbole_wheel):
    cfg = build_config(DataConfig, {"dataset": "movielens-100k", "output": str(tmp_path / "ml"), "cache_dir": str(recbole_wheel.parent)})
    c = prepare(cfg)["counts"]
    assert (c["rows_read"], c["events_accepted"], c["events_rejected"]) == (100_000, 100_000, 0)
    assert (c["users"], c["items"], c["events_by_split"]["test"]) == (943, 1682, 943)
    assert c["examples_by_split"] == {"train": 100_000 - 3 * 943, "valid": 943, "test": 943}
