import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys_ray.data.config import SyntheticConfig
from recsys_ray.data.synthetic import TOPICS, item_table, user_event_counts, write_synthetic


def _read(folder):
    return {
        "events": pq.read_table(folder / "events"),
        "items": pq.read_table(folder / "items.parquet"),
        "users": pq.read_table(folder / "users"),
    }


def test_deterministic_per_seed_and_independent_of_sharding(tmp_path):
    cfg = SyntheticConfig(num_users=60, num_items=80, num_events=900, shard_users=25)
    a = _read(tmp_path / "a") if write_synthetic(cfg, 7, tmp_path / "a") else None
    b = _read(tmp_path / "b") if write_synthetic(cfg, 7, tmp_path / "b") else None
    c = _read(tmp_path / "c") if write_synthetic(cfg, 8, tmp_path / "c") else None
    for name in a:
        assert a[name].equals(b[name]), name
    assert not a["events"].equals(c["events"])
    assert a["events"].num_rows == 900 and a["items"].num_rows == 80 and a["users"].num_rows == 60
    counts = user_event_counts(cfg, 7)
    assert counts.sum() == 900 and counts.min() >= 3


def test_users_repeat_no_item_and_prefer_their_topics(tmp_path):
    cfg = SyntheticConfig(num_users=100, num_items=200, num_events=3000, num_topics=8, taste_prob=0.85)
    write_synthetic(cfg, 0, tmp_path)
    ev = pq.read_table(tmp_path / "events").to_pandas()
    assert not ev.duplicated(["user_id", "item_id"]).any()
    _, topic, _ = item_table(cfg, 0)
    ev["topic"] = topic[ev["item_id"].str[1:].astype(int)]
    # planted structure: a user's two most frequent topics cover most of their events,
    # far above the 2/8 a user without tastes would show
    top2 = ev.groupby("user_id")["topic"].agg(lambda s: s.value_counts().iloc[:2].sum() / len(s))
    assert top2.mean() > 0.7
    items = pq.read_table(tmp_path / "items.parquet")
    title_topic = [next(t for t in TOPICS if f" {t} " in f" {title} ") for title in items["title"].to_pylist()]
    assert title_topic == [TOPICS[t] for t in topic]  # the topic is visible in the text
    assert np.all(np.diff(pc.cast(pq.read_table(tmp_path / "events")["timestamp"], "int64").to_numpy()) >= 0)
