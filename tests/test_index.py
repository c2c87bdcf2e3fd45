"""The retriever's item index: exact top k by hand, the faiss IVF index equal to exact when it
searches every group, close to it when it searches few, extended in place by added items, and
the Predictor / served path using it with the prior and the history exclusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys_ray.data.catalogue import Catalogue
from recsys_ray.data.layout import read_manifest, read_split_rows
from recsys_ray.errors import RecsysError
from recsys_ray.index import IVFIndex, default_nlist, top_k
from recsys_ray.model.config import ModelConfig
from recsys_ray.model.kinds import from_config
from recsys_ray.predict import Predictor, PredictorConfig


def clustered(n: int, dim: int, centers: int, seed: int) -> np.ndarray:
    """Unit vectors around ``centers`` random directions (item / user vectors have such structure)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim))
    x = c[rng.integers(0, centers, n)] + 0.35 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact(users, items, temperature, prior, k, exclude):
    scores = users @ items.T / temperature + (0 if prior is None else prior[None, :])
    return [top_k(scores[j], k, exclude[j]) for j in range(len(users))]


def test_top_k_by_hand_ties_go_to_the_lower_row_and_excluded_rows_never_come_back():
    scores = np.array([0.5, 0.9, 0.9, 0.1, 0.7], np.float32)
    rows, s = top_k(scores, 3, [4])
    assert rows.tolist() == [1, 2, 0] and s.tolist() == pytest.approx([0.9, 0.9, 0.5])
    assert top_k(scores, 10, [0, 1, 2, 3, 4])[0].size == 0
    assert top_k(scores, 10, [])[0].tolist() == [1, 2, 4, 0, 3]


def test_ivf_searching_every_group_is_the_exact_top_k_with_the_prior_and_exclusions():
    items, users = clustered(3000, 32, 40, seed=0), clustered(50, 32, 40, seed=1)
    prior = (0.3 * np.log1p(np.random.default_rng(2).zipf(1.5, 3000).clip(max=10_000))).astype(np.float32)
    exclude = [list(np.random.default_rng(3 + j).choice(3000, 15, replace=False)) for j in range(50)]
    nlist = default_nlist(3000)
    assert nlist == 3000 // 39  # 4 sqrt(N) = 219 groups would leave k-means under 39 points each
    index = IVFIndex(items, temperature=0.05, prior=prior, nprobe=nlist)
    got = index.search(users, 20, exclude)
    want = exact(users, items, 0.05, prior, 20, exclude)
    for (r1, s1), (r2, s2), ex in zip(got, want, exclude, strict=True):
        assert r1.tolist() == r2.tolist() and np.allclose(s1, s2, atol=1e-3)
        assert not set(r1.tolist()) & set(int(e) for e in ex)
    # the prior moves the ranking: without it the same users get other lists
    plain = exact(users, items, 0.05, None, 20, exclude)
    assert sum(a[0].tolist() != b[0].tolist() for a, b in zip(want, plain, strict=True)) > 10


def test_ivf_with_few_groups_searched_stays_close_and_its_scores_are_exact():
    items, users = clustered(20_000, 48, 200, seed=4), clustered(100, 48, 200, seed=5)
    index = IVFIndex(items, temperature=0.05, nprobe=16)
    got = index.search(users, 100)
    want = exact(users, items, 0.05, None, 100, [()] * 100)
    recall = np.mean([len(set(a[0].tolist()) & set(b[0].tolist())) / 100 for a, b in zip(got, want, strict=True)])
    print(f"IVF nlist {index.nlist} nprobe 16: recall@100 {recall:.3f}")
    assert recall > 0.8
    for j, (rows, scores) in enumerate(got):  # a hit carries the exact score of its item
        assert np.allclose(scores, items[rows] @ users[j] / 0.05, atol=1e-3)
    assert index.memory_bytes() > items.nbytes  # flat lists keep every vector (+ centroids)


def test_items_added_to_an_ivf_index_are_found_under_their_new_rows():
    items = clustered(2000, 16, 20, seed=6)
    index = IVFIndex(items, temperature=0.1, nprobe=default_nlist(2000))
    user = clustered(1, 16, 20, seed=7)
    index.add(user.copy(), np.array([0.0], np.float32))  # an item pointing exactly where the user does
    assert len(index) == 2001
    rows, scores = index.search(user, 5)[0]
    assert rows[0] == 2000 and scores[0] == pytest.approx(1 / 0.1, rel=1e-4)
    with pytest.raises(RecsysError, match="nprobe must be >= 1"):
        IVFIndex(items, temperature=0.1, nprobe=0)


def test_predictor_with_the_ivf_index_retrieves_like_exact_and_takes_added_items(syn_data, tokenizer, tmp_path):
    items = Catalogue.from_data_dir(syn_data)
    model = from_config(ModelConfig(kind="retriever", history="items", dropout=0.0,
                                    tiny={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                          "intermediate_size": 64}), tokenizer, item_tokens=items.tokens)
    path = model.save(tmp_path / "r", extra={"text": read_manifest(syn_data)["text"]})
    items.save(path / "items.parquet")
    common = {"retriever": str(path), "popularity_weight": 0.5}
    exact_p = Predictor(PredictorConfig(**common))
    ivf_p = Predictor(PredictorConfig(**common, index="ivf", index_nprobe=10_000))  # every group: exact
    rows = read_split_rows(syn_data, "test")[:20]
    ctx = exact_p.example_contexts({k: [r[k] for r in rows] for k in ("context_ids", "seen_item_ids", "profile_ids")})
    exclude = [exact_p.items.rows(r["seen_item_ids"][:5]) for r in rows]
    for (r1, s1), (r2, s2) in zip(ivf_p.retrieve(ctx, 10, exclude), exact_p.retrieve(ctx, 10, exclude), strict=True):
        assert r1.tolist() == r2.tolist() and np.allclose(s1, s2, atol=1e-3)
    built = ivf_p.build_index()
    assert built is ivf_p.build_index() and exact_p.build_index() is None

    new_ids, texts = ["brand-new-1", "brand-new-2"], ["a quiet film about the sea", "a loud film about cars"]
    assert ivf_p.add_items(new_ids, texts) == exact_p.add_items(new_ids, texts) == len(items) + 2
    assert len(ivf_p.build_index()) == len(items) + 2  # extended in place, not rebuilt
    n = len(items) + 2
    for (r1, _), (r2, _) in zip(ivf_p.retrieve(ctx, n, None), exact_p.retrieve(ctx, n, None), strict=True):
        assert r1.tolist() == r2.tolist() and sorted(r1.tolist()) == list(range(n))  # the new rows ranked too
    with pytest.raises(RecsysError, match="index 'hnsw': one of exact, ivf"):
        Predictor(PredictorConfig(**common, index="hnsw"))
    assert torch.equal(ivf_p.item_vectors(), exact_p.item_vectors())
