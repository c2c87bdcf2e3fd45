"""The training benchmark (jobs/bench_train.py) in its smallest mode: tiny BERT, a few steps."""

from __future__ import annotations

import json
import math

import pytest
import torch

from recsys_ray.bench.train import (
    fixed_widths,
    load_bench_config,
    pad_batch,
    run_benchmark,
    sample_rows,
    token_counts,
    train_config,
)
from recsys_ray.data.catalogue import Catalogue
from recsys_ray.data.layout import read_manifest
from recsys_ray.errors import RecsysError
from recsys_ray.model.kinds import from_config
from recsys_ray.model.tokenizer import load_tokenizer, special_ids
from recsys_ray.train.loop import ScoreStep

RUNS = ("plain_1t", "plain_1t_fixed_pad", "plain_2t", "ray_1w", "ray_2w")


@pytest.fixture(scope="module")
def bench_data(syn_data) -> str:
    """The session's small synthetic dataset (tests/conftest.py)."""
    return syn_data


def test_smallest_benchmark_reports_every_number(bench_data, tmp_path):
    cfg = load_bench_config({
        "data": bench_data, "model": "tiny", "steps": 3, "warmup_steps": 1, "batch_size": 8,
        "matmul_size": 256, "matmul_reps": 2, "eval_users": 4, "output": str(tmp_path / "out"),
    })
    summary = run_benchmark(cfg, command="pytest bench")
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert summary["results"] == str(tmp_path / "out" / "results.json")
    assert set(summary["samples_per_s"]) == set(RUNS) and res["skipped"] == {}
    assert res["command"] == "pytest bench" and res["config"]["steps"] == 3
    assert res["model"]["layers"] == 2 and res["model"]["hidden"] == 32
    assert all(p > 1e6 for p in res["peak"]["flop_per_s"].values())  # any CPU does > 1 MFLOP/s

    for name in RUNS:
        r = res["runs"][name]
        for key in ("samples_per_s", "tokens_per_s", "train_tokens_per_s", "flop_per_s", "peak_flop_per_s", "seconds"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
        assert 0 < r["mfu"] < 1, (name, r["mfu"])
        assert r["steps"] == 3
        if "padded_tokens_per_s" in r:  # measured (plain) runs: real tokens are part of the tensors
            assert r["tokens_per_s"] <= r["padded_tokens_per_s"]
    for name in ("ray_1w", "ray_2w"):
        r = res["runs"][name]
        assert r["samples"] == 3 * r["workers"] * 8
        assert r["cold_samples_per_s"] > 0 and math.isfinite(r["train_loss"])

    dyn, fixed = res["runs"]["plain_1t"], res["runs"]["plain_1t_fixed_pad"]
    # same batches: fixed padding adds only padding (same real tokens, same loss), and costs FLOPs
    assert dyn["tokens_per_sample"] == fixed["tokens_per_sample"]
    assert 0 <= dyn["pad_fraction"] < fixed["pad_fraction"] < 1
    assert fixed["flops_per_sample"] > dyn["flops_per_sample"]
    assert dyn["samples"] == 3 * 8 and dyn["seconds"] == pytest.approx(dyn["samples"] / dyn["samples_per_s"])

    ratios = res["ratios"]
    assert ratios["ray_1w_over_plain_1t"] == pytest.approx(res["runs"]["ray_1w"]["samples_per_s"] / dyn["samples_per_s"])
    assert ratios["ray_2w_over_ray_1w"] == pytest.approx(
        res["runs"]["ray_2w"]["samples_per_s"] / res["runs"]["ray_1w"]["samples_per_s"])
    assert ratios["dynamic_over_fixed_padding"] == pytest.approx(dyn["samples_per_s"] / fixed["samples_per_s"])
    assert ratios["meets_target"] == (ratios["ray_1w_over_plain_1t"] >= 0.9)

    md = (tmp_path / "out" / "results.md").read_text()
    assert "`pytest bench`" in md
    assert all(f"| {name} |" in md for name in RUNS)
    assert f"{dyn['samples_per_s']:.1f}" in md


def test_fixed_padding_pads_to_the_data_budget_and_leaves_scores_unchanged(bench_data, tmp_path):
    cfg = load_bench_config({"data": bench_data, "model": "tiny", "output": str(tmp_path)})
    tc = train_config(cfg, 1, str(tmp_path), "t")
    tok = load_tokenizer(tc.model.encoder)
    torch.manual_seed(0)
    model = from_config(tc.model, tok)  # eval mode: no dropout
    step = ScoreStep(model)
    collate = model.collator(Catalogue.from_data_dir(bench_data), special_ids(tok), tc.train_settings(), tok, rank=0)
    batch = collate(sample_rows(bench_data, 8, 0))
    widths = fixed_widths(tc, read_manifest(bench_data))
    assert widths["user_"] == 256 + 2 and widths["item_"] == 64 + 2  # DataConfig's default budgets
    padded = pad_batch(batch, widths, special_ids(tok)[2])
    assert padded["user_input_ids"].shape == (8, widths["user_"])
    assert padded["item_input_ids"].shape == (8 * 5, widths["item_"])
    assert token_counts(padded)[0] == token_counts(batch)[0] < token_counts(padded)[1]
    with torch.no_grad():
        (own, inbatch), (own_p, inbatch_p) = step(batch), step(padded)
    torch.testing.assert_close(own_p, own, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(inbatch_p, inbatch, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_mode_refuses_without_a_gpu(tmp_path):
    cfg = load_bench_config({"data": str(tmp_path), "gpu": True, "output": str(tmp_path / "out")})
    with pytest.raises(RecsysError, match="no CUDA GPU"):
        run_benchmark(cfg)
    assert not (tmp_path / "out").exists()
