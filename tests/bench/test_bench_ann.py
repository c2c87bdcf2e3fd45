"""jobs/bench_ann.py on a small catalogue: exact vs IVF measured, recall against exact, memory."""

from __future__ import annotations

import json

import numpy as np
import torch

from recsys_ray.bench.ann import (
    clustered_unit_vectors,
    exact_search,
    load_bench_ann_config,
    run_bench_ann,
)
from recsys_ray.index import top_k


def test_small_run_reports_recall_that_reaches_one_when_every_group_is_searched(tmp_path):
    cfg = load_bench_ann_config({"sizes": [3000], "dim": 16, "users": 20, "nprobes": [1, 10_000], "k": 50,
                                 "output": str(tmp_path)})
    summary = run_bench_ann(cfg, "test")
    res = json.loads((tmp_path / "results.json").read_text())["sizes"]["3000"]
    ivf = res["ivf"]
    assert ivf["nlist"] == 3000 // 39
    assert ivf["nprobe"]["10000"]["recall_at_50"] == 1.0  # every group searched: the exact top k
    assert ivf["nprobe"]["1"]["recall_at_50"] < 1.0
    assert res["exact_matrix_bytes"] == 3000 * 16 * 4 and ivf["index_bytes"] > res["exact_matrix_bytes"]
    assert summary["ivf"]["3000"]["10000"][1] == 1.0
    assert "| 3,000 |" in (tmp_path / "results.md").read_text()


def test_exact_search_is_the_predictors_exact_path():
    rng = np.random.default_rng(0)
    items = clustered_unit_vectors(500, 8, rng.standard_normal((5, 8)).astype(np.float32), rng)
    assert np.allclose(np.linalg.norm(items, axis=1), 1.0, atol=1e-5)
    users, prior = items[:3] * 0.5, np.linspace(0, 1, 500, dtype=np.float32)
    got = exact_search(torch.from_numpy(items), prior, 0.1, users, 5, [[0], [], [2, 3]])
    for j, (rows, scores) in enumerate(got):
        want = top_k(users[j] @ items.T / 0.1 + prior, 5, [[0], [], [2, 3]][j])
        assert rows.tolist() == want[0].tolist() and np.allclose(scores, want[1], atol=1e-4)
