"""A synthetic behaviour log of any size with a planted, text-visible preference structure.

Every item's title carries one *topic* word (``vintage jazz collection``); every user favours
two topics and picks an item of those topics with probability ``taste_prob`` (popular items
within a topic more often), otherwise a random item. A text model sees the shared topic word
between history and candidate and can learn it; a random scorer cannot.

Deterministic per seed: shards hold a fixed number of users and use their own generator
``[seed, shard]``, so the output does not depend on how many workers generate it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from recsys_ray import storage
from recsys_ray.data.config import SyntheticConfig

TOPICS = [
    "jazz", "hiking", "chess", "sushi", "robots", "gardening", "poetry", "surfing", "baking",
    "astronomy", "cycling", "opera", "pottery", "soccer", "origami", "camping", "vinyl",
    "knitting", "skiing", "birding", "yoga", "comics", "wine", "drones",
]  # fmt: skip
ADJECTIVES = ["vintage", "modern", "classic", "deluxe", "compact", "handmade", "premium", "basic",
              "portable", "giant", "tiny", "bright", "quiet", "rustic", "urban", "golden"]  # fmt: skip
NOUNS = ["collection", "guide", "kit", "set", "box", "journal", "edition", "bundle", "series",
         "manual", "pack", "album", "poster", "course", "story", "toolkit"]  # fmt: skip
FILLER = ["for", "every", "day", "with", "extra", "care", "and", "style", "made", "to", "last",
          "simple", "fun", "clear", "design", "new", "best", "value", "home", "gift"]  # fmt: skip
COUNTRIES = ["fr", "de", "us", "jp", "br", "in", "ng", "se"]
EPOCH_START = 1_600_000_000  # 2020-09-13, seconds


def item_table(cfg: SyntheticConfig, seed: int) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """Catalogue (item_id, title, description) plus each item's topic and popularity weight."""
    rng = np.random.default_rng([seed, 1])
    n = cfg.num_items
    topic = rng.integers(0, cfg.num_topics, size=n)
    adj = rng.integers(0, len(ADJECTIVES), size=n)
    noun = rng.integers(0, len(NOUNS), size=n)
    filler = rng.integers(0, len(FILLER), size=(n, 4))
    weight = 1.0 / (1.0 + rng.permutation(n)) ** 0.6  # Zipf-like popularity
    titles = [f"{ADJECTIVES[a]} {TOPICS[t]} {NOUNS[b]}" for a, t, b in zip(adj, topic, noun, strict=True)]
    descr = [" ".join(FILLER[j] for j in row) for row in filler]
    table = pa.table(
        {"item_id": [f"i{i}" for i in range(n)], "title": titles, "description": descr}
    )
    return table, topic, weight


def user_event_counts(cfg: SyntheticConfig, seed: int) -> np.ndarray:
    """Events per user, skewed (log-normal shares), at least ``min_events_per_user``, summing exactly."""
    rng = np.random.default_rng([seed, 2])
    extra = cfg.num_events - cfg.num_users * cfg.min_events_per_user
    share = rng.lognormal(0.0, 1.0, size=cfg.num_users)
    counts = rng.multinomial(extra, share / share.sum()) + cfg.min_events_per_user
    # A user cannot have more distinct items than the catalogue: move the excess elsewhere.
    cap = cfg.num_items
    over = np.maximum(counts - cap, 0).sum()
    counts = np.minimum(counts, cap)
    i = 0
    while over > 0:
        room = cap - counts[i % cfg.num_users]
        if room > 0:
            take = min(room, over)
            counts[i % cfg.num_users] += take
            over -= take
        i += 1
    return counts


def generate_shard(
    cfg: SyntheticConfig, seed: int, shard: int, counts: np.ndarray, topic: np.ndarray, weight: np.ndarray
) -> tuple[pa.Table, pa.Table]:
    """Events and user profiles of users ``[shard * shard_users, ...)``; ``counts`` are theirs."""
    rng = np.random.default_rng([seed, 3, shard])
    first = shard * cfg.shard_users
    n_users = len(counts)
    n_items = cfg.num_items
    by_topic = [np.flatnonzero(topic == t) for t in range(cfg.num_topics)]
    cdf_topic = [np.cumsum(weight[ix]) / weight[ix].sum() if len(ix) else None for ix in by_topic]
    cdf_all = np.cumsum(weight) / weight.sum()
    tastes = np.stack([rng.choice(cfg.num_topics, size=2, replace=False) for _ in range(n_users)]) if n_users else np.zeros((0, 2), int)

    users_col, items_col, ts_col = [], [], []
    for u in range(n_users):
        c = int(counts[u])
        # oversample, drop repeats (keeping first occurrences), top up uniformly if short
        m = 2 * c + 8
        use_taste = rng.random(m) < cfg.taste_prob
        which = tastes[u, rng.integers(0, 2, size=m)]
        picks = np.empty(m, dtype=np.int64)
        for t in np.unique(which[use_taste]):
            sel = use_taste & (which == t)
            if cdf_topic[t] is None:
                use_taste[sel] = False
                continue
            r = np.searchsorted(cdf_topic[t], rng.random(sel.sum()), side="right")
            picks[sel] = by_topic[t][np.minimum(r, len(by_topic[t]) - 1)]
        rest = ~use_taste
        picks[rest] = np.minimum(np.searchsorted(cdf_all, rng.random(rest.sum()), side="right"), n_items - 1)
        _, first_pos = np.unique(picks, return_index=True)
        chosen = picks[np.sort(first_pos)][:c]
        if len(chosen) < c:
            pool = np.setdiff1d(np.arange(n_items), chosen)
            chosen = np.concatenate([chosen, rng.choice(pool, size=c - len(chosen), replace=False)])
        gaps = np.round(rng.exponential(6 * 3600, size=c)).astype(np.int64)
        gaps[rng.random(c) < 0.1] = 0  # same-second events: ties the split must order stably
        start = EPOCH_START + int(rng.integers(0, 365 * 86400))
        users_col.append(np.full(c, first + u, dtype=np.int64))
        items_col.append(chosen)
        ts_col.append(start + np.cumsum(gaps))

    if n_users:
        uu, ii, tt = np.concatenate(users_col), np.concatenate(items_col), np.concatenate(ts_col)
    else:
        uu = ii = tt = np.zeros(0, np.int64)
    order = np.argsort(tt, kind="stable")  # a log is written in time order, users interleaved
    events = pa.table(
        {
            "user_id": pa.array([f"u{x}" for x in uu[order]], pa.string()),
            "item_id": pa.array([f"i{x}" for x in ii[order]], pa.string()),
            "timestamp": pa.array(tt[order], pa.int64()),
            "event": pa.array(["click"] * len(order), pa.string()),
        }
    )
    ages = rng.integers(18, 70, size=n_users)
    country = rng.integers(0, len(COUNTRIES), size=n_users)
    profiles = pa.table(
        {
            "user_id": [f"u{first + u}" for u in range(n_users)],
            "age": [str(a) for a in ages],
            "country": [COUNTRIES[c] for c in country],
        }
    )
    return events, profiles


def write_synthetic(cfg: SyntheticConfig, seed: int, out_dir: str | Path) -> dict[str, str]:
    """Write ``events/part-*.parquet``, ``items.parquet`` and ``users/part-*.parquet`` under a
    local folder or a URI; return their paths.

    Shards run as Ray tasks when Ray is initialised (the bench's 10M events), else in-process;
    user profiles are written per shard (``users/part-*.parquet``) so nothing is gathered here.
    """
    out = str(out_dir) if storage.is_remote(out_dir) else str(Path(out_dir))
    items, topic, weight = item_table(cfg, seed)
    storage.write_parquet(items, storage.join(out, "items.parquet"))
    counts = user_event_counts(cfg, seed)
    n_shards = math.ceil(cfg.num_users / cfg.shard_users)

    def run(shard: int) -> int:
        lo, hi = shard * cfg.shard_users, min(cfg.num_users, (shard + 1) * cfg.shard_users)
        events, profiles = generate_shard(cfg, seed, shard, counts[lo:hi], topic, weight)
        storage.write_parquet(events, storage.join(out, "events", f"part-{shard:05d}.parquet"))
        storage.write_parquet(profiles, storage.join(out, "users", f"part-{shard:05d}.parquet"))
        return events.num_rows

    if ray.is_initialized() and n_shards > 1:
        remote = ray.remote(num_cpus=1)(run)
        ray.get([remote.remote(s) for s in range(n_shards)])
    else:
        for s in range(n_shards):
            run(s)
    return {
        "events": storage.join(out, "events"),
        "items": storage.join(out, "items.parquet"),
        "users": storage.join(out, "users"),
    }
