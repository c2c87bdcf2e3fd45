"""Serving faults on the local Ray, loopback only, bounded in time and count: replicas SIGKILLed
under steady load, an open loop far beyond capacity, redeploys and a shutdown with requests in
flight. Each test prints one ``FAULT {...}`` JSON line: the figures docs/reliability.md quotes
(``pytest tests/serve/test_serve_faults.py -s -k NAME`` reproduces one)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from fault_helpers import alive_actor_pids

from recsys_ray.bench.serve import closed_loop, open_loop

pytestmark = pytest.mark.slow

REQUEST_TIMEOUT_S = 10  # what prod.yaml sets: an unanswered request gets a 408 after this
SERVE_HTTP_OPTIONS = {"request_timeout_s": REQUEST_TIMEOUT_S}
APP = "faults"
OVERLOAD_MAX_RPS = 150.0  # what one Python load generator on a 2-core machine offers without starving the app
SMALL = {"ray_actor_options": {"num_cpus": 0.25}}


def report(name: str, **figures) -> None:
    print("FAULT " + json.dumps({"test": name, **figures}))


def deploy_app(checkpoints: dict, replicas: int = 2, retriever: dict | None = None, ingress: dict | None = None,
               **args) -> None:
    """Retriever-only app with ``replicas`` Retriever and ``replicas`` ingress (RecsysAPI) replicas."""
    from ray import serve

    from recsys_ray.serve.api import AppArgs
    from recsys_ray.serve.app import app_from_args

    options = {"Retriever": {**SMALL, "num_replicas": replicas, **(retriever or {})},
               "RecsysAPI": {**SMALL, "num_replicas": replicas, **(ingress or {})}}
    app = app_from_args(AppArgs(checkpoint=checkpoints["retriever"], device="cpu", max_k=20, torch_threads=1, **args),
                        options)
    serve.run(app, name=APP, route_prefix=f"/{APP}")


def running_replicas(deployment: str) -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or deployment not in app.deployments:
        return 0
    return app.deployments[deployment].replica_states.get("RUNNING", 0)


def kill_one_and_time_replacement(deployment: str, timeout_s: float = 90) -> dict:
    """SIGKILL one replica process of ``deployment``; seconds until two are RUNNING again."""
    pids = alive_actor_pids(f"ServeReplica:{APP}:{deployment}")
    assert len(pids) == 2, (deployment, pids)
    t0 = time.monotonic()
    os.kill(pids[0], signal.SIGKILL)
    while time.monotonic() - t0 < timeout_s:
        alive = alive_actor_pids(f"ServeReplica:{APP}:{deployment}")
        if pids[0] not in alive and len(alive) == 2 and running_replicas(deployment) == 2:
            return {"killed_pid": pids[0], "replacement_ready_s": round(time.monotonic() - t0, 1)}
        time.sleep(0.2)
    raise AssertionError(f"{deployment}: no replacement RUNNING {timeout_s} s after the kill")


@pytest.fixture(scope="module")
def bodies(catalogue_ids) -> list[dict]:
    return [{"user": {"history": catalogue_ids[j: j + 4]}, "k": 10} for j in range(0, 100, 3)]


@pytest.fixture(scope="module")
def url(serve_port, checkpoints):
    from ray import serve

    deploy_app(checkpoints)
    yield f"http://127.0.0.1:{serve_port}/{APP}/v1/recommend"
    serve.delete(APP)


def in_thread(fn, *args):
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=fn(*args)), daemon=True)
    thread.start()
    return thread, box


def test_killing_a_model_replica_then_an_ingress_replica_under_steady_load(url, bodies):
    """20 req/s for 26 s; a Retriever replica is SIGKILLed at 4 s, an ingress replica once the
    first replacement is RUNNING (about 19 s)."""
    rate, duration = 20.0, 26.0
    thread, box = in_thread(lambda: asyncio.run(open_loop(url, bodies, rate, 0.0, duration, 0, seed=1, drain_s=20)))
    t0 = time.monotonic()
    time.sleep(4)
    retriever = kill_one_and_time_replacement("Retriever")
    ingress_killed_at = round(time.monotonic() - t0, 1)
    ingress = kill_one_and_time_replacement("RecsysAPI")
    thread.join(timeout=duration + 60)
    load = box["result"]
    report("replica_kills", offered_rps=rate, duration_s=duration, requests=load["requests"],
           error_rate=load["error_rate"], rate_503=load["rate_503"], p99_ms=load["p99_ms"], max_ms=load["max_ms"],
           unanswered=load["unanswered"], retriever=retriever, ingress={**ingress, "killed_at_s": ingress_killed_at})
    assert load["requests"] >= 0.9 * rate * duration
    assert load["error_rate"] + load["rate_503"] < 0.01, load  # under 1% of requests fail
    assert load["unanswered"] == 0 and load["max_ms"] < REQUEST_TIMEOUT_S * 1000 + 1000, load  # nothing hangs
    assert requests.post(url, json=bodies[0], timeout=30).status_code == 200


def test_items_added_through_one_replica_are_known_to_every_replica(url, bodies, catalogue_ids):
    """Two ingress and two Retriever replicas: after POST /v1/items every request naming the new
    items succeeds, whichever replicas it lands on, and within a second every Retriever replica
    can recommend them (an empty history: the prior-free scores of all items)."""
    base = url.rsplit("/v1/", 1)[0]
    new = [{"item_id": f"fresh-{j}", "text": f"a {w} guide for every day"} for j, w in enumerate(("jazz", "chess"))]
    r = requests.post(f"{base}/v1/items", json={"items": new}, timeout=30)
    assert r.status_code == 200 and r.json()["added"] == 2, r.text
    body = {"user": {"history": ["fresh-0", catalogue_ids[2]]}, "item_ids": ["fresh-1", catalogue_ids[3]]}
    codes = [requests.post(f"{base}/v1/score", json=body, timeout=30).status_code for _ in range(16)]
    assert codes == [200] * 16, codes
    from ray import serve

    time.sleep(1.1)  # the sync period: a replica looks at the item log again before it answers
    handle = serve.get_deployment_handle("Retriever", app_name=APP)
    sizes = {}
    for _ in range(24):
        info = handle.ready.remote().result(timeout_s=30)
        sizes[info["replica"]] = info["items"]
    assert len(sizes) == 2 and set(sizes.values()) == {len(catalogue_ids) + 2}, sizes
    report("items_added", replicas=2, requests_after_add=16, ok=codes.count(200), items_by_replica=sizes)


def test_overload_is_refused_fast_with_retry_after_and_the_service_recovers(url, bodies, checkpoints):
    """Admission sized from the measured cost (serve.app.admission_limits): capacity C of one
    ingress + one Retriever replica from a closed loop, at most budget x C requests admitted;
    then an open loop at 3x C for 8 s. (One of each: on 2 cores every extra process takes CPU
    from the proxy, and the proxy is what refuses.)"""
    from recsys_ray.serve.app import admission_limits

    budget_s = 0.25  # Little's law: the mean wait of an admitted request at capacity
    deploy_app(checkpoints, replicas=1)
    try:
        capacity = asyncio.run(closed_loop(url, bodies, concurrency=8, warmup_s=1.0, duration_s=4.0,
                                           pairs_per_request=0))
        c = capacity["rps"]
        limits = admission_limits(c, budget_s, ingress_replicas=1)
        deploy_app(checkpoints, replicas=1, ingress=limits)
        # 3x capacity, but at most 150 req/s: with the Batcher the capacity reached 82 req/s, and at
        # 247 req/s the load generator and the proxy refusing took the 2 cores from the replicas
        # (CI: 23.5 req/s admitted and served, 0.28x capacity); 150 is still ~2x of that capacity
        over = asyncio.run(open_loop(url, bodies, min(3 * c, OVERLOAD_MAX_RPS), 1.0, 8.0, 0, seed=2, drain_s=20))
        t0 = time.monotonic()
        r = requests.post(url, json=bodies[0], timeout=30)
        recovered_s = time.monotonic() - t0
        burst = [requests.post(url, json=bodies[0], timeout=30) for _ in range(3)]  # idle again: all served
    finally:
        deploy_app(checkpoints)  # the module's app for the tests that follow
    report("overload", capacity_rps=c, latency_budget_s=budget_s, ingress_limits=limits,
           offered_rps=over["offered_rps"], ok_rps=over["rps"], rate_503=over["rate_503"],
           p50_503_ms=over["p50_503_ms"], p99_503_ms=over["p99_503_ms"], p50_ok_ms=over["p50_ms"], p99_ok_ms=over["p99_ms"],
           error_rate=over["error_rate"], max_ms=over["max_ms"], recovered_first_request_s=round(recovered_s, 3))
    if over["offered_rps"] >= 2 * c:
        assert over["rate_503"] > 0.3, over  # far beyond capacity: most of the excess is refused
    else:
        # a fast machine: the load generator's cap (OVERLOAD_MAX_RPS) is under 2x capacity (CI on
        # 2026-12-05: capacity 131.75 req/s, 150 offered, 145 served, 7% refused), so there is
        # little excess to refuse; what must hold is that some of it is refused rather than all of
        # it queued (and the latency bounds below). The share refused can exceed the excess: on 2
        # shared cores refusing costs the replicas CPU (a local run: capacity 101.75, 88 served, 44% refused)
        assert over["rate_503"] > 0, over
    assert over["error_rate"] < 0.01, over  # refused with 503, never failed or timed out
    assert over["rps"] >= 0.4 * c, over  # admitted requests still finish
    # refused fast: the median refusal is what the proxy costs; the p99 is what 2 shared cores do to
    # it (104-436 ms on the dev machine, 1511 ms on a CI run where the proxy, the replicas and the
    # load generator at 170 req/s shared the cores; the 100 ms target needs a proxy with CPU of its
    # own). Bounded well below the request timeout and the 18 s the default queues made requests wait
    assert over["p50_503_ms"] is not None and over["p50_503_ms"] < 300, over
    assert over["p99_503_ms"] < 3000, over
    assert over["p50_ms"] < 4 * budget_s * 1000 and over["p99_ms"] < 12 * budget_s * 1000, over
    assert r.status_code == 200 and recovered_s < 2.0 and all(b.status_code == 200 for b in burst)


def test_redeploys_and_a_shutdown_drain_in_flight_requests(url, bodies, checkpoints):
    """10 req/s while the app is redeployed twice (a user_config change, reconfigured in place,
    then new arguments: every replica replaced); then the app is deleted with requests in flight."""
    from ray import serve

    rate, duration = 10.0, 16.0
    thread, box = in_thread(lambda: asyncio.run(open_loop(url, bodies, rate, 0.0, duration, 0, seed=3, drain_s=30)))
    time.sleep(3)
    deploy_app(checkpoints, retriever={"user_config": {"max_batch_size": 4, "batch_wait_timeout_s": 0.002}})
    time.sleep(2)
    deploy_app(checkpoints, max_candidates=150)  # new args: new replicas, the old ones drain
    thread.join(timeout=duration + 60)
    load = box["result"]

    def one(j):
        return requests.post(url, json=bodies[j % len(bodies)], timeout=30).status_code

    # the Retriever holds each batch 0.5 s: when the delete starts, the burst is inside the app
    deploy_app(checkpoints, retriever={"user_config": {"max_batch_size": 32, "batch_wait_timeout_s": 0.5}})
    with ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(one, j) for j in range(24)]
        time.sleep(0.3)
        serve.delete(APP)
        codes = [f.result() for f in futures]
    report("redeploy_and_shutdown", offered_rps=rate, duration_s=duration, requests=load["requests"],
           error_rate=load["error_rate"], rate_503=load["rate_503"], unanswered=load["unanswered"],
           shutdown_burst=codes)
    assert load["error_rate"] == 0 and load["rate_503"] == 0 and load["unanswered"] == 0, load  # none lost
    # a request the app had accepted finishes (200); one that arrives after the delete finds no route (404)
    assert all(c in (200, 404) for c in codes), codes
    assert codes.count(200) >= 1, codes
    deploy_app(checkpoints)  # the fixture's teardown deletes it again
