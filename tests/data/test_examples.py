import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from recsys_ray.data import text as T
from recsys_ray.data.examples import (
    ExampleBuilder,
    ExampleSettings,
    build_sequences,
    sample_negatives,
    train_item_counts,
    user_rng,
)
from recsys_ray.data.tokenize import encode_texts


def _events(rows):
    """rows: (user, item, ts_seconds, file_idx, source_row)"""
    return pa.table(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "timestamp": pa.array([r[2] * 1_000_000 for r in rows], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "file_idx": pa.array([r[3] for r in rows], pa.int32()),
            "source_row": pa.array([r[4] for r in rows], pa.int64()),
        }
    )


def test_split_orders_by_time_with_source_order_for_ties():
    # u1's events arrive shuffled; b and c share a timestamp: c came first in the source
    ev = _events(
        [
            ("u1", "d", 40, 0, 9),
            ("u1", "b", 20, 0, 5),
            ("u2", "x", 1, 0, 0),
            ("u1", "a", 10, 0, 8),
            ("u1", "c", 20, 0, 2),
            ("u1", "e", 20, 1, 0),  # same second, later file: after b and c
            ("u2", "y", 2, 0, 1),
        ]
    )
    seq = {r["user_id"]: r for r in build_sequences(ev, min_user_events=3).to_pylist()}
    assert seq["u1"]["item_ids"] == ["a", "c", "b", "e", "d"]
    assert seq["u1"]["n_train"] == 3  # a, c, b train; e valid; d test
    assert seq["u2"]["item_ids"] == ["x", "y"] and seq["u2"]["n_train"] == 2  # too few: train only
    ts = [t.timestamp() for t in seq["u1"]["timestamps"]]
    assert ts == sorted(ts)
    # no train event after the validation event
    assert max(ts[:3]) <= ts[3] <= ts[4]


def test_train_item_counts_only_count_train_positions():
    seq = build_sequences(
        _events([("u1", "a", 1, 0, 0), ("u1", "b", 2, 0, 1), ("u1", "a", 3, 0, 2), ("u1", "c", 4, 0, 3)]), 3
    )
    counts = dict(zip(*train_item_counts(seq).to_pydict().values(), strict=True))
    assert counts == {"a": 1, "b": 1}  # a(3) is valid, c(4) is test


@pytest.mark.parametrize("popular", [False, True])
def test_negatives_never_hit_the_users_items_and_are_distinct(popular):
    rng = np.random.default_rng(0)
    excluded = np.array([0, 1, 2, 5, 7])
    cdf = None
    if popular:
        w = np.arange(1, 11, dtype=float) ** 2
        cdf = np.cumsum(w) / w.sum()
    neg = sample_negatives(rng, 200, 4, excluded, 10, cdf)
    assert not np.isin(neg, excluded).any()
    assert all(len(set(row)) == 4 for row in neg.tolist())
    # only 2 items are allowed: each row gets both, then -1 padding
    neg = sample_negatives(rng, 3, 4, np.arange(8), 10, cdf)
    assert sorted(neg[0, :2].tolist()) == [8, 9] and (neg[:, 2:] == -1).all()


def test_negatives_popularity_weighting_prefers_popular_items():
    rng = np.random.default_rng(1)
    w = np.array([1.0] * 9 + [100.0])
    neg = sample_negatives(rng, 500, 1, np.array([], dtype=np.int64), 10, np.cumsum(w) / w.sum())
    assert (neg == 9).mean() > 0.8


def _builder(tokenizer_name="default", **kw):
    settings = ExampleSettings(
        tokenizer=tokenizer_name, max_history=kw.get("max_history", 2), max_context_tokens=kw.get("max_ctx", 64),
        min_history=1, negatives=2, negative_sampling="uniform", popularity_alpha=0.75, seed=kw.get("seed", 0),
    )
    texts = [f"Movie {c.upper()} (199{i}) | genres: Drama" for i, c in enumerate("abcdefgh")]
    from recsys_ray.model.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_name)
    items = pa.table({"item_id": list("abcdefgh"), "text": texts, "full_ids": encode_texts(tok, texts)})
    return ExampleBuilder(settings, items, None), texts


def _seq_with_profile(seq):
    return seq.append_column("profile_text", pa.array(["age: 30"] * seq.num_rows)).append_column(
        "profile_ids", pa.array([[2287, 1024, 2382]] * seq.num_rows, pa.list_(pa.int32()))
    )


def test_examples_contexts_most_recent_first_and_splits(tokenizer):
    builder, texts = _builder()
    seq = build_sequences(_events([("u1", c, i, 0, i) for i, c in enumerate("abcde")]), 3)
    seq = _seq_with_profile(seq)
    ex = builder(seq).to_pylist()
    assert [e["split"] for e in ex] == ["train", "train", "valid", "test"]
    assert [e["target_item_id"] for e in ex] == ["b", "c", "d", "e"]
    test = ex[-1]
    # history before e, most recent first, capped at max_history=2
    assert test["context_text"] == T.render_context("age: 30", [texts[3], texts[2]])
    assert test["seen_item_ids"] == ["a", "b", "c", "d"] and test["negative_item_ids"] == []
    for e in ex:
        if e["split"] == "train":
            assert len(e["negative_item_ids"]) == 2
            assert not set(e["negative_item_ids"]) & set("abc")  # never one of the user's train items


def test_train_negatives_may_be_the_users_future_items():
    """Negatives are drawn from what is known at training time: excluding the user's validation
    and test items would leak them (they would never be negatives, so the model learns they are
    not)."""
    builder, _ = _builder()
    # 8 catalogue items: u1 trained on a, b; valid c, test d; e-h were never the user's
    seq = build_sequences(_events([("u1", c, i, 0, i) for i, c in enumerate("abcd")]), 3)
    drawn = set()
    for seed in range(40):
        builder.s = dataclasses.replace(builder.s, seed=seed)
        for e in builder(seq).to_pylist():
            if e["split"] == "train":
                assert not set(e["negative_item_ids"]) & {"a", "b"}
                drawn |= set(e["negative_item_ids"])
    assert {"c", "d"} <= drawn  # the future items are drawn as negatives like any other item


def test_context_ids_equal_the_tokenizers_own_output(tokenizer):
    builder, _ = _builder(max_history=5, max_ctx=24)
    seq = _seq_with_profile(build_sequences(_events([("u1", c, i, 0, i) for i, c in enumerate("abcdefgh")]), 3))
    ex = builder(seq).to_pylist()
    for e in ex:
        direct = tokenizer(e["context_text"], add_special_tokens=False, truncation=True, max_length=24)["input_ids"]
        assert e["context_ids"] == direct
    assert any(len(e["context_ids"]) == 24 for e in ex)  # truncation happened, from the oldest end
    # the ranker input equals the tokenizer's pair encoding with truncation of the context only
    e = ex[-1]
    cand = tokenizer("Movie H (1997) | genres: Drama", add_special_tokens=False)["input_ids"]
    pair = [tokenizer.cls_token_id, *e["context_ids"], tokenizer.sep_token_id, *cand, tokenizer.sep_token_id]
    full = tokenizer(e["context_text"], "Movie H (1997) | genres: Drama", truncation="only_first", max_length=len(pair))
    assert full["input_ids"] == pair


def test_negatives_are_seeded_per_user_and_independent_of_batching():
    b1, _ = _builder(seed=5)
    rows = [(u, c, i, 0, i) for u in ("u1", "u2") for i, c in enumerate("abcd")]
    seq = build_sequences(_events(rows), 3)
    together = {(e["user_id"], e["position"]): e["negative_item_ids"] for e in b1(seq).to_pylist()}
    apart = {}
    for k in range(seq.num_rows):
        apart.update({(e["user_id"], e["position"]): e["negative_item_ids"] for e in b1(seq.slice(k, 1)).to_pylist()})
    assert together == apart
    assert user_rng(5, "u1").integers(1 << 30) != user_rng(6, "u1").integers(1 << 30)
