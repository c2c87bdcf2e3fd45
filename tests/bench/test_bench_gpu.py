"""jobs/bench_gpu.py: the one GPU check, wired end to end on CPU with its dry run (tiny random BERT,
a few steps, 1-second load points), and what it refuses."""

from __future__ import annotations

import json
import math

import pytest
import ray
import torch

from recsys_ray.bench.gpu import BenchGpuConfig, load_bench_gpu_config, preset_config, run_bench_gpu
from recsys_ray.errors import ConfigError, RecsysError


@pytest.mark.slow
def test_dry_run_measures_every_section_and_writes_what_it_returns(syn_data, ray_session, tmp_path):
    cfg = load_bench_gpu_config({"data": syn_data, "dry_run": True, "output": str(tmp_path / "out")})
    assert (cfg.steps, cfg.concurrency, cfg.precisions) == (2, [1, 4], ["fp32", "bf16"])
    summary = run_bench_gpu(cfg, "test")
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    sections = res["sections"]
    assert summary["errors"] == {} and res["headline"]["errors"] == {}, summary["errors"]
    assert list(sections) == ["train", "retriever", "ranker", "ray_train", "serve"]
    assert all(s["seconds"] > 0 for s in sections.values())

    # training: both presets' item-token retrievers, bf16 autocast and fp32, every timed sample counted
    for preset, batch in (("cpu", 16), ("gpu", 32)):
        runs = sections["train"]["presets"][preset]["runs"]
        assert sections["train"]["presets"][preset]["model"]["history_len"] == preset_config(cfg, preset, "cpu").model.history_len
        for label in ("bf16", "fp32"):
            r = runs[label]
            assert r["bf16"] is (label == "bf16")
            assert r["samples"] == cfg.steps * batch and math.isfinite(r["last_loss"])
            assert r["mfu"] == pytest.approx(r["flop_per_s"] / sections["train"]["peak_flop_per_s"][label])
            assert summary[f"train_{preset}_{label}_samples_per_s"] == round(r["samples_per_s"], 1)

    # Ray Train: two epochs of the first preset on one worker, next to the plain bf16 loop
    rt = sections["ray_train"]
    assert rt["preset"] == "cpu" and rt["ray_1w"]["workers"] == 1 and rt["ray_1w"]["steps"] == cfg.steps
    assert rt["ray_over_plain"] == round(rt["ray_1w"]["samples_per_s"] / rt["plain_bf16_samples_per_s"], 3)

    # offline: each precision measured, compared with fp32's scores
    assert set(sections["retriever"]["precisions"]) == {"fp32", "bf16"}
    overlap = sections["retriever"]["precisions"]["bf16"]["vs_fp32"]["top10_overlap"]
    assert 0.5 <= overlap <= 1.0
    assert sections["ranker"]["single_candidate_fp32"]["batch"] == cfg.single_batch

    # serve: every closed-loop point answered without errors; batching off (1) vs on, 1 candidate too
    serve = sections["serve"]
    assert set(serve["closed"]) == {"1", "4"} and set(serve["plain"]["closed"]) == {"1", "4"}
    for point in [*serve["closed"].values(), *serve["batch_compare_single"].values(), serve["recommend"]]:
        assert point["ok"] > 0 and point["error_rate"] == 0.0
    assert serve["batch_compare_single"]["off"]["max_batch_size"] == 1
    assert serve["batch_compare_single"]["on"]["max_batch_size"] > 1
    assert summary["serve_c4_p99_ms"] == serve["closed"]["4"]["p99_ms"]
    assert ray.is_initialized()  # the test session's Ray is not the run's to shut down


def test_bad_config_and_a_missing_gpu_are_refused_before_anything_runs(syn_data, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_bench_gpu_config({"sections": ["serve", "bogus"], "presets": ["nope"], "precisions": ["int4"],
                               "concurrency": [], "steps": 0})
    text = str(err.value)
    for part in ("sections: unknown 'bogus'", "presets: no configs/nope.yaml", "precisions: unknown 'int4'",
                 "concurrency must be a non-empty list", "steps must be >= 1"):
        assert part in text, text
    if not torch.cuda.is_available():
        with pytest.raises(RecsysError, match="no CUDA GPU is visible.*dry_run=true"):
            run_bench_gpu(BenchGpuConfig(data=syn_data, output=str(tmp_path / "x")))
    with pytest.raises(RecsysError, match="not a prepared data directory"):
        run_bench_gpu(BenchGpuConfig(data=str(tmp_path), dry_run=True, output=str(tmp_path / "y")))
    assert not (tmp_path / "x").exists()
