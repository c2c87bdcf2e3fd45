"""The serving benchmark's load generator and statistics, against a stub HTTP server (no Ray)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from recsys_ray.bench.serve import (
    BENCH_ROLE,
    CpuAccount,
    Sample,
    bench_serve_config,
    closed_loop,
    load_bench_serve_config,
    make_checkpoints,
    offline_single_candidate,
    open_loop,
    parse_server_timing,
    percentile,
    poisson_arrivals,
    ranker_batch_size,
    request_bodies,
    summarize,
    with_retriever_layout,
)
from recsys_ray.errors import ConfigError, RecsysError


def test_summarize_counts_rates_percentiles_and_refusals_by_hand():
    ok = [Sample(latency_s=(i + 1) / 1000, status=200, pairs=20, batch=1 + i % 3) for i in range(100)]  # 1..100 ms
    shed = [Sample(latency_s=(i + 1) / 1000, status=503) for i in range(10)]  # 1..10 ms
    failed = [Sample(latency_s=5.0, status=0), Sample(latency_s=0.01, status=500)]
    r = summarize(ok + shed + failed, window_s=4.0, dropped=3)
    assert r["requests"] == 115 and r["ok"] == 100
    assert r["rps"] == 25.0 and r["pairs_per_s"] == 500.0
    # linear interpolation between closest ranks: p50 of 1..100 = 50.5, p95 = 95.05, p99 = 99.01
    assert (r["p50_ms"], r["p95_ms"], r["p99_ms"]) == (50.5, 95.05, 99.01)
    assert r["rate_503"] == round(10 / 115, 4) and (r["p50_503_ms"], r["p99_503_ms"]) == (5.5, 9.91)
    assert r["error_rate"] == round(5 / 115, 4)  # a timeout, a 500 and 3 client drops
    assert r["mean_batch"] == round(np.mean([1 + i % 3 for i in range(100)]), 2)
    empty = summarize([], window_s=1.0)
    assert empty["rps"] == 0 and empty["p99_ms"] is None and empty["error_rate"] == 0.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        summarize(ok, window_s=0)


def test_server_timing_stages_are_averaged_per_point_by_hand():
    assert parse_server_timing("retriever-model;dur=12.5, total;dur=20") == {"retriever-model": 12.5, "total": 20.0}
    assert parse_server_timing(None) is None and parse_server_timing("total;dur=abc") is None
    a = Sample(latency_s=0.030, status=200, stages={"retriever-prep": 1.0, "retriever-model": 10.0, "total": 20.0})
    b = Sample(latency_s=0.050, status=200, stages={"retriever-model": 30.0, "ranker-model": 4.0, "total": 40.0})
    c = Sample(latency_s=0.001, status=503)
    r = summarize([a, b, c], window_s=1.0)
    # a stage a request lacks counts 0 for it; outside the route = client latency - the route's total
    assert r["stages_ms"] == {"retriever-prep": 0.5, "retriever-model": 20.0, "total": 30.0, "ranker-model": 2.0}
    assert r["outside_route_ms"] == 10.0
    assert summarize([c], window_s=1.0)["stages_ms"] == {} and summarize([c], window_s=1.0)["outside_route_ms"] is None


def test_poisson_arrivals_have_the_asked_rate_and_are_reproducible():
    times = poisson_arrivals(rate=50.0, horizon_s=200.0, seed=3)
    assert times == sorted(times) and 0 < times[0] and times[-1] < 200.0
    assert abs(len(times) - 10_000) < 400  # 4 standard deviations of a Poisson count
    gaps = np.diff(times)
    assert abs(gaps.mean() - 0.02) < 0.001 and abs(gaps.std() - 0.02) < 0.002  # exponential: mean = std
    assert poisson_arrivals(50.0, 10.0, seed=3) == poisson_arrivals(50.0, 10.0, seed=3)


async def _stub_server(delay_s: float):
    """127.0.0.1 HTTP server: 200 + X-Batch-Size 2 after delay_s; every 5th request a 503."""
    from aiohttp import web

    hits = 0

    async def score(request):
        nonlocal hits
        hits += 1
        await request.json()
        if hits % 5 == 0:
            return web.json_response({"detail": "full"}, status=503, headers={"Retry-After": "0"})
        await asyncio.sleep(delay_s)
        return web.json_response({"scores": [0.0]}, headers={"X-Batch-Size": "2"})

    app = web.Application()
    app.router.add_post("/v1/score", score)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/v1/score"


def test_closed_and_open_loop_measure_what_a_stub_server_does():
    async def run():
        runner, url = await _stub_server(delay_s=0.02)
        try:
            t0 = time.perf_counter()
            closed = await closed_loop(url, [{"x": 1}], concurrency=4, warmup_s=0.2, duration_s=1.0, pairs_per_request=3)
            took = time.perf_counter() - t0
            opened = await open_loop(url, [{"x": 1}], rate=40.0, warmup_s=0.2, duration_s=1.0, pairs_per_request=3, seed=0)
        finally:
            await runner.cleanup()
        return closed, took, opened

    closed, took, opened = asyncio.run(run())
    assert 1.2 <= took < 3.0  # warm-up + window + the last in-flight requests
    # 4 clients, 20 ms per 200: at most ~200 req/s; the stub's 503s come back at once
    assert 40 < closed["rps"] <= 200 and closed["pairs_per_s"] == pytest.approx(3 * closed["rps"], rel=0.02)
    assert closed["p50_ms"] >= 20 and closed["mean_batch"] == 2.0
    assert 0.1 < closed["rate_503"] < 0.3 and closed["error_rate"] == 0.0
    assert opened["offered_rps"] == 40.0 and opened["unanswered"] == 0
    assert opened["ok"] + round(opened["rate_503"] * opened["requests"]) == opened["requests"]
    assert 15 < opened["rps"] < 60 and opened["p50_ms"] >= 20


def test_load_only_goes_to_localhost():
    with pytest.raises(RecsysError, match="127.0.0.1"):
        asyncio.run(closed_loop("http://example.com:80/v1/score", [{}], 1, 0.0, 0.1, 1))


def test_bench_config_checks_and_the_serve_config_it_deploys(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    with pytest.raises(ConfigError) as err:
        load_bench_serve_config({"concurrency": [], "duration_s": 0, "open_loop": [-1.0]})
    assert len(err.value.problems) == 3
    quick = load_bench_serve_config({"quick": True})
    assert quick.duration_s <= 6 and quick.concurrency == [1, 64]

    cfg = load_bench_serve_config({})
    ckpt = {"retriever": str(tmp_path / "r"), "ranker": str(tmp_path / "k")}
    config = bench_serve_config(cfg, ckpt, port=12345, max_batch_size=1)
    schema = ServeDeploySchema.model_validate(config)
    assert schema.http_options.host == "127.0.0.1" and schema.http_options.port == 12345
    (app,) = schema.applications
    assert app.args["ranker_checkpoint"] == ckpt["ranker"] and app.args["rerank_top"] == cfg.rerank_top
    deps = {d.name: d for d in app.deployments}
    assert deps["Ranker"].user_config["max_batch_size"] == 1 and deps["Ranker"].autoscaling_config["max_replicas"] == 2
    # the last point pins the Ranker instead of autoscaling it
    pinned = bench_serve_config(cfg, ckpt, port=12345, fixed_replicas=2)
    ServeDeploySchema.model_validate(pinned)
    ranker = {d["name"]: d for d in pinned["applications"][0]["deployments"]}["Ranker"]
    assert ranker["num_replicas"] == 2 and "autoscaling_config" not in ranker
    assert ranker_batch_size(config) == 1 and ranker_batch_size(pinned) == 16  # local.yaml's Ranker
    # precision reaches the deployed app (both models), as it reaches the offline and plain measurements
    assert app.args["precision"] == "fp32"
    int8 = bench_serve_config(load_bench_serve_config({"precision": "int8"}), ckpt, port=12345)
    assert ServeDeploySchema.model_validate(int8).applications[0].args["precision"] == "int8"


def _burn(seconds: float) -> None:
    t0 = time.process_time()
    while time.process_time() - t0 < seconds:
        pass


def test_cpu_account_splits_cpu_by_process_role():
    import subprocess
    import sys

    import psutil

    # a child whose command line names the HTTP proxy's process title: classified by it
    child = subprocess.Popen([sys.executable, "-c", "import time\n# ray::ProxyActor\nt=time.process_time()\n"
                              "while time.process_time() - t < 0.6: pass\ntime.sleep(60)"])
    try:
        with CpuAccount() as acct:
            _burn(0.4)
            deadline = time.monotonic() + 30
            while sum(psutil.Process(child.pid).cpu_times()[:2]) < 0.6 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.1)  # a process that ends before the second snapshot is not counted: keep it alive
    finally:
        child.kill()
        child.wait()
    cores = acct.result["cores_by_role"]
    wall = acct.result["wall_s"]
    assert wall >= 0.4
    assert cores[BENCH_ROLE] * wall == pytest.approx(0.4, abs=0.15)
    # the child ran ~0.6 s of CPU but may have used some before the first snapshot
    assert 0.2 <= cores["HTTP proxy"] * wall <= 0.75
    assert 0 < acct.result["machine_cores"] <= 2.5
    ms = acct.per_request_ms(10.0)
    assert ms[BENCH_ROLE] == pytest.approx(cores[BENCH_ROLE] * 100, abs=0.1)
    assert acct.per_request_ms(0) == {}


def test_offline_single_candidate_times_one_request_per_call_vs_batched(syn_data, tmp_path):
    cfg = load_bench_serve_config({"data": syn_data, "model": "tiny"})
    ckpt = make_checkpoints(cfg, tmp_path)
    from recsys_ray.data.catalogue import Catalogue

    bodies = request_bodies(syn_data, Catalogue.load(ckpt["retriever"]).ids, candidates=3, seed=0)
    for precision in ("fp32", "int8"):  # the compressed ranker measured the same way
        out = offline_single_candidate(ckpt, bodies, batch=4, device="cpu", requests=16, precision=precision)
        assert out["requests"] == min(16, len(bodies)) and out["batch"] == 4 and out["torch_threads"] == 1
        assert out["one_per_pass_pairs_per_s"] > 0 and out["batched_pairs_per_s"] > 0
        assert out["ratio"] == pytest.approx(out["batched_pairs_per_s"] / out["one_per_pass_pairs_per_s"], rel=0.01)


def test_the_two_retriever_layouts_carry_the_same_model_settings():
    """local.yaml as shipped, turned into the other layout and back: the retriever keeps its CPU
    share, batch settings and backpressure; the ingress its request limits."""
    import yaml

    from recsys_ray.bench.serve import RETRIEVER_CONFIG
    from recsys_ray.serve.api import AppArgs

    shipped = yaml.safe_load(RETRIEVER_CONFIG.read_text())
    for in_ingress in (True, False):
        cfg = with_retriever_layout(shipped, in_ingress)
        app = cfg["applications"][0]
        assert AppArgs.model_validate(app["args"]).retriever_in_ingress is in_ingress
        deps = {d["name"]: d for d in app["deployments"]}
        model = deps["RetrieverAPI" if in_ingress else "Retriever"]
        assert set(deps) == ({"RetrieverAPI"} if in_ingress else {"RecsysAPI", "Retriever"})
        assert model["ray_actor_options"]["num_cpus"] == 0.5
        assert model["user_config"] == {"max_batch_size": 16, "batch_wait_timeout_s": 0.0}
        assert model["backpressure_config"]["retry_after_s"] == 1
        if not in_ingress:
            assert deps["RecsysAPI"]["ray_actor_options"] == {"num_cpus": 0}
        back = with_retriever_layout(cfg, not in_ingress)
        assert with_retriever_layout(back, in_ingress) == cfg
    assert shipped == yaml.safe_load(RETRIEVER_CONFIG.read_text()), "the shipped config is not modified"


def test_recommend_report_has_a_row_per_layout_and_client_count_with_both_ceilings():
    from recsys_ray.bench.serve import recommend_markdown

    point = {"rps": 80.0, "over_offline_best": 0.667, "over_offline_machine_best": 0.4, "p50_ms": 90.0, "p99_ms": 120.0,
             "stages_ms": {"retriever-model": 45.0, "total": 65.0}, "outside_route_ms": 25.0,
             "cpu": {"machine_cores": 1.6, "ms_per_request": {"HTTP proxy": 4.3}}}
    res = {"command": "python jobs/bench_serve.py --set mode=recommend", "date": "today", "wall_s": 1.0,
           "machine": {"cpus": 2, "ray": "2.60.0"},
           "recommend": {"precision": "onnx", "offline": {"best_users_per_s": 120.0, "best_users_per_s_machine": 200.0},
                         "layouts": {"in_ingress": {"closed": {"8": point}},
                                     "separate": {"closed": {"8": {**point, "rps": 60.0, "cpu": {}}}}}}}
    md = recommend_markdown(res)
    rows = [ln for ln in md.splitlines() if ln.startswith("| in_ingress") or ln.startswith("| separate")]
    assert len(rows) == 4  # two load rows, two CPU rows (the separate point has no CPU account: dashes)
    assert rows[0].startswith("| in_ingress | closed, 8 clients | 80.00 | 0.667 | 0.400 | 90.0 | 120.0 | 45.0 | 65.0 | 25.0 |")
    assert "| in_ingress | 8 | 1.60 | 4.3 |" in md and "| separate | 8 | - | - |" in md and "(1 thread, onnx)" in md
    assert "direct ingress" not in md
    res["recommend"]["direct_ingress_on"] = True
    res["recommend"]["layouts"]["direct"] = {"closed": {"8": {**point, "rps": 100.0}}, "url": "http://127.0.0.1:30000"}
    md = recommend_markdown(res)
    assert "Serve direct ingress on" in md and "| direct | closed, 8 clients | 100.00 |" in md
