"""The Serve app over HTTP with tiny random BERT checkpoints: served scores are the offline
Predictor's, concurrent requests share batches, bad input gets a 4xx that says why, overload a
fast 503 with Retry-After, a checkpoint that cannot load fails the start-up; the shipped Serve
configs validate against Ray's own schema."""

from __future__ import annotations

import collections
import copy
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from recsys_ray.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
MAX_CANDIDATES = 8
RERANK_TOP = 12
SMALL_REPLICA = {"ray_actor_options": {"num_cpus": 0.5}}


def deploy(name: str, args: dict, options: dict | None = None) -> None:
    from ray import serve

    from recsys_ray.serve.api import AppArgs
    from recsys_ray.serve.app import app_from_args

    opts = {"Ranker": dict(SMALL_REPLICA), "Retriever": dict(SMALL_REPLICA)}
    for dep, o in (options or {}).items():
        opts[dep] = {**opts.get(dep, {}), **o}
    serve.run(app_from_args(AppArgs(**args), opts), name=name, route_prefix=f"/{name}")


APP = "recsys-test"


def app_config(checkpoints: dict, ranker_batch: int) -> dict:
    """A Serve config like serve_configs/local.yaml; the Ranker waits up to 0.2 s to fill a batch."""
    small = {"ray_actor_options": {"num_cpus": 0.5}}
    return {"applications": [{
        "name": APP, "route_prefix": f"/{APP}", "import_path": "recsys_ray.serve:build_app",
        "args": {"checkpoint": checkpoints["retriever"], "ranker_checkpoint": checkpoints["ranker"],
                 "max_candidates": MAX_CANDIDATES, "max_k": 20, "rerank_top": RERANK_TOP,
                 "max_body_bytes": 20_000, "device": "cpu"},
        "deployments": [
            {"name": "Retriever", **small},
            {"name": "Ranker", **small, "max_ongoing_requests": 16,
             "user_config": {"max_batch_size": ranker_batch, "batch_wait_timeout_s": 0.2}},
        ],
    }]}


@pytest.fixture(scope="module")
def app(serve_port, checkpoints) -> str:
    """Retriever + ranker, deployed from a config (the typed builder gets its args as Serve parses them)."""
    from ray import serve

    from recsys_ray.serve.app import deploy_config

    deploy_config(app_config(checkpoints, ranker_batch=8))
    yield f"http://127.0.0.1:{serve_port}/{APP}"
    serve.delete(APP)


@pytest.fixture(scope="module")
def offline(checkpoints):
    from recsys_ray.predict import Predictor, PredictorConfig

    return Predictor(PredictorConfig(retriever=checkpoints["retriever"], ranker=checkpoints["ranker"],
                                     rerank_top=RERANK_TOP))


def post(url: str, body, **kw) -> requests.Response:
    return requests.post(url, json=body, timeout=60, **kw)


def server_timing(header: str) -> dict[str, float]:
    """``a;dur=1.5, b;dur=2`` -> ``{"a": 1.5, "b": 2.0}`` (in the header's order)."""
    out = {}
    for part in header.split(","):
        name, dur = part.strip().split(";dur=")
        out[name] = float(dur)
    return out


def score_requests(ids: list[str]) -> list[dict]:
    """Eight users: histories, dict / text / no profiles, catalogue ids or free texts."""
    out = []
    for j in range(8):
        user = {"history": ids[j * 5: j * 5 + 3 + j % 3]}
        if j % 3 == 0:
            user["profile"] = {"age": 20 + j, "country": "fr"}
        elif j % 3 == 1:
            user["profile"] = "age: 41 | country: jp"
        body = {"user": user}
        if j % 2:
            body["texts"] = [f"a {w} gift for a friend" for w in ("red", "blue", "green")[: 1 + j % 3]]
        else:
            body["item_ids"] = ids[100 + j: 100 + j + 2 + j % 5]
        out.append(body)
    return out


# --------------------------------------------------------------------------- scores, batches


def test_served_scores_equal_the_offline_predictor_and_concurrent_requests_share_a_batch(app, offline, catalogue_ids):
    bodies = score_requests(catalogue_ids)
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: post(f"{app}/v1/score", b), bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses]
    batch_sizes = [int(r.headers["X-Batch-Size"]) for r in responses]
    assert max(batch_sizes) > 1, f"no two requests were merged: {batch_sizes}"
    # requests merged into one batch share its forward pass: the same ranker-model time
    merged = [server_timing(r.headers["Server-Timing"])["ranker-model"] for r, b in zip(responses, batch_sizes, strict=True)
              if b == max(batch_sizes)]
    assert len(set(merged)) < len(merged), merged

    for body, r in zip(bodies, responses, strict=True):
        got = r.json()
        assert got["model"] == "ranker"
        user = body["user"]
        ctx = offline.context_ids(user["history"], user.get("profile"))
        if "item_ids" in body:
            cands = [offline.items.tokens[i] for i in offline.items.rows(body["item_ids"])]
        else:
            cands = offline.text_ids(body["texts"])
        want = offline.score(ctx, cands)
        assert len(got["scores"]) == len(want)
        assert np.allclose(got["scores"], want, atol=1e-5), (got["scores"], want)


def test_recommend_is_the_offline_two_stage_ranking_without_history_items(app, offline, catalogue_ids):
    history = catalogue_ids[:40:2]  # 20 items
    r = post(f"{app}/v1/recommend", {"user": {"history": history, "profile": {"age": 33}}, "k": 10})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["model"] == "retriever+ranker"
    ids = [it["item_id"] for it in got["items"]]
    assert len(ids) == 10 and not set(ids) & set(history)

    # where the time went: each model's stages (as its replica measured them), then the route's total
    stages = server_timing(r.headers["Server-Timing"])
    for model in ("retriever", "ranker"):
        assert {f"{model}-{s}" for s in ("prep", "wait", "model", "hops")} <= set(stages), stages
    assert list(stages)[-1] == "total" and all(ms >= 0 for ms in stages.values())
    inside = sum(ms for name, ms in stages.items() if name != "total")
    assert inside <= stages["total"] + 1.0  # the calls are awaited one after the other inside the route
    assert float(r.headers["X-Model-Ms"]) == pytest.approx(stages["retriever-model"] + stages["ranker-model"], abs=0.02)

    ctx = offline.context_ids(history, {"age": 33})
    ((rows, scores),) = offline.recommend([ctx], 10, [offline.items.rows(history)])
    assert ids == [offline.items.ids[i] for i in rows]
    assert np.allclose([it["score"] for it in got["items"]], scores, atol=1e-5)
    assert [it["text"] for it in got["items"]] == [offline.items.texts[i] for i in rows]

    # with exclude_history=false the history is rankable again (the same shortlist rule applies)
    r = post(f"{app}/v1/recommend", {"user": {"history": history}, "k": 20, "exclude_history": False})
    assert r.status_code == 200 and len(r.json()["items"]) == 20


def test_items_added_to_the_running_app_are_scored_and_recommended_at_once(app, checkpoints, catalogue_ids):
    """POST /v1/items: the new items are scored (history and candidates) by the next request,
    exactly as an offline Predictor with the same items added; an id already there -> 422."""
    from recsys_ray.predict import Predictor, PredictorConfig

    new = [{"item_id": "added-1", "text": "a vintage jazz collection for every day"},
           {"item_id": "added-2", "text": "a modern chess kit made to last"}]
    r = post(f"{app}/v1/items", {"items": new})
    assert r.status_code == 200, r.text
    assert r.json() == {"added": 2, "items": len(catalogue_ids) + 2}
    offline = Predictor(PredictorConfig(retriever=checkpoints["retriever"], ranker=checkpoints["ranker"],
                                        rerank_top=RERANK_TOP))
    offline.add_items([it["item_id"] for it in new], [it["text"] for it in new])

    history = [catalogue_ids[1], "added-1"]
    r = post(f"{app}/v1/score", {"user": {"history": history}, "item_ids": ["added-2", catalogue_ids[7]]})
    assert r.status_code == 200, r.text
    want = offline.score(offline.context_ids(history, kind="ranker"), offline.candidates(["added-2", catalogue_ids[7]], None))
    assert np.allclose(r.json()["scores"], want, atol=1e-5)
    r = post(f"{app}/v1/recommend", {"user": {"history": history}, "k": 10})
    assert r.status_code == 200, r.text
    ((rows, _),) = offline.recommend([offline.context_ids(history)], 10, [offline.items.rows(history)],
                                     [offline.context_ids(history, kind="ranker")])
    assert [it["item_id"] for it in r.json()["items"]] == [offline.items.ids[i] for i in rows]

    r = post(f"{app}/v1/items", {"items": [new[0], {"item_id": "added-3", "text": "x"}]})
    assert r.status_code == 422 and "'added-1'" in r.json()["detail"]["message"], r.text
    r = post(f"{app}/v1/score", {"user": {}, "item_ids": ["added-3"]})  # the refused request added nothing
    assert r.status_code == 422 and r.json()["detail"]["unknown_item_ids"] == ["added-3"]
    for body in ({"items": []}, {"items": [{"item_id": " padded ", "text": "t"}]}, {"items": [{"item_id": "a", "text": ""}]}):
        assert post(f"{app}/v1/items", body).status_code == 422, body


def test_health_readiness_and_openapi(app):
    assert requests.get(f"{app}/healthz", timeout=10).json() == {"status": "ok"}
    r = requests.get(f"{app}/readyz", timeout=10)
    assert r.status_code == 200 and r.json()["ready"] is True
    assert set(r.json()["models"]) == {"retriever", "ranker"}
    assert r.json()["models"]["ranker"]["max_batch_size"] == 8  # the user_config in force
    paths = requests.get(f"{app}/openapi.json", timeout=10).json()["paths"]
    assert {"/v1/score", "/v1/recommend", "/v1/search", "/v1/items", "/healthz", "/readyz"} <= set(paths)


# --------------------------------------------------------------------------- bad input


def bad_requests(ids: list[str]) -> list[tuple[str, str, object, int, str]]:
    user = {"history": ids[:3]}
    return [
        ("unknown candidate ids", "score", {"user": user, "item_ids": [ids[0], "no-such-item", "nope2"]}, 422, "no-such-item"),
        ("unknown history id", "score", {"user": {"history": ["ghost"]}, "item_ids": ids[:2]}, 422, "ghost"),
        ("unknown history id (recommend)", "recommend", {"user": {"history": ["ghost"]}, "k": 3}, 422, "ghost"),
        ("empty candidates", "score", {"user": user, "item_ids": []}, 422, "empty"),
        ("duplicate candidates", "score", {"user": user, "item_ids": [ids[5], ids[6], ids[5]]}, 422, ids[5]),
        ("duplicate texts", "score", {"user": user, "texts": ["same", "same"]}, 422, "duplicate"),
        ("no candidates", "score", {"user": user}, 422, "exactly one"),
        ("ids and texts", "score", {"user": user, "item_ids": ids[:1], "texts": ["x"]}, 422, "exactly one"),
        ("id of wrong type", "score", {"user": user, "item_ids": [7]}, 422, "string"),
        ("history not a list", "score", {"user": {"history": ids[0]}, "item_ids": ids[:1]}, 422, "list"),
        ("profile of wrong type", "score", {"user": {"profile": [1, 2]}, "item_ids": ids[:1]}, 422, "profile"),
        ("missing user", "score", {"item_ids": ids[:2]}, 422, "user"),
        ("unknown field", "score", {"user": user, "item_ids": ids[:2], "candidates": []}, 422, "candidates"),
        ("not json", "score", b"{not json", 422, "json"),
        ("not UTF-8", "score", b'{"user": {"history": ["\xff"]}, "item_ids": ["a"]}', 422, "not UTF-8"),
        ("NaN", "score", b'{"user": {"profile": {"age": NaN}}, "item_ids": ["a"]}', 422, "NaN is not standard JSON"),
        ("Infinity k", "recommend", b'{"user": {}, "k": Infinity}', 422, "Infinity is not standard JSON"),
        ("k overflows to inf", "recommend", b'{"user": {}, "k": 1e999}', 422, "out of range"),
        ("k float", "recommend", {"user": user, "k": 2.5}, 422, "integer"),
        ("k huge", "recommend", {"user": user, "k": 10**30}, 422, "max_k"),
        ("deeply nested", "score", b'{"user": {"profile": ' + b"[" * 5_000 + b"]" * 5_000 + b"}}", 422, "nested deeper"),
        ("lone surrogate", "score", b'{"user": {}, "item_ids": ["\\udc00"]}', 422, "surrogate"),
        ("history id of wrong type", "recommend", {"user": {"history": [1.5]}}, 422, "string"),
        ("10^5 candidates", "score", {"user": user, "item_ids": [f"i{i}" for i in range(100_000)]}, 413, "larger than"),
        ("body an array", "score", [1, 2], 422, "body"),
        ("k zero", "recommend", {"user": user, "k": 0}, 422, "greater than or equal to 1"),
        ("k negative", "recommend", {"user": user, "k": -3}, 422, "greater than or equal to 1"),
        ("k not an int", "recommend", {"user": user, "k": "ten"}, 422, "integer"),
        ("k over max_k", "recommend", {"user": user, "k": 21}, 422, "max_k"),
        ("too many candidates", "score", {"user": user, "item_ids": ids[: MAX_CANDIDATES + 1]}, 413, f"at most {MAX_CANDIDATES}"),
        ("body too large", "score", {"user": user, "texts": ["x" * 30_000]}, 413, "larger than"),
    ]


def test_fuzzed_requests_to_every_route_never_get_a_5xx(app):
    """schemathesis generates valid and invalid requests for every route of the served app's own
    OpenAPI schema; none may get a 5xx, every error says what was wrong."""
    schema = schemathesis.openapi.from_url(f"{app}/openapi.json")
    cases = schema.as_strategy(GenerationMode.POSITIVE) | schema.as_strategy(GenerationMode.NEGATIVE)
    seen: collections.Counter = collections.Counter()

    @given(case=cases)
    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call(base_url=app, timeout=60)
        seen[(case.method, case.path, response.status_code)] += 1
        assert response.status_code < 500, (case.method, case.path, case.body, response.status_code, response.text[:300])
        if response.status_code >= 400:
            body = response.json()
            assert body.get("message") or body.get("detail"), response.text[:300]

    check()
    routes = {(method, path) for method, path, _ in seen}
    # every route with an input is fuzzed; the input-less GET probes may draw no example among 150
    # random ones (a CI run drew none for /readyz), so each is called once as well
    assert {("POST", "/v1/score"), ("POST", "/v1/recommend"), ("POST", "/v1/items"), ("POST", "/v1/search")} <= routes, seen
    for path in ("/healthz", "/readyz"):
        assert requests.get(f"{app}{path}", timeout=30).status_code == 200, path
    assert any(status == 422 for *_, status in seen) and any(status == 200 for *_, status in seen), seen


def test_every_bad_request_gets_its_status_and_a_reason_never_a_500(app, catalogue_ids):
    problems = []
    for name, route, body, status, needle in bad_requests(catalogue_ids):
        if isinstance(body, bytes):
            r = requests.post(f"{app}/v1/{route}", data=body, headers={"content-type": "application/json"}, timeout=30)
        else:
            r = post(f"{app}/v1/{route}", body)
        if r.status_code != status or needle.lower() not in r.text.lower():
            problems.append(f"{name}: {r.status_code} {r.text[:200]}")
    assert not problems, "\n".join(problems)
    # a chunked upload (no Content-Length) is cut off once it passes the limit
    chunks = iter([b'{"user": {}, "texts": ["' + b"x" * 5_000] * 6 + [b'"]}'])
    r = requests.post(f"{app}/v1/score", data=chunks, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "larger than" in r.text, r.text


def test_unknown_ids_are_listed_and_long_texts_are_cut_not_refused(app, offline, catalogue_ids):
    r = post(f"{app}/v1/score", {"user": {"history": ["ghost"]}, "item_ids": [catalogue_ids[0], "nope"]})
    assert r.status_code == 422 and r.json()["detail"]["unknown_item_ids"] == ["ghost"]
    r = post(f"{app}/v1/score", {"user": {}, "item_ids": [catalogue_ids[0], "nope", "nada"]})
    assert r.status_code == 422 and r.json()["detail"]["unknown_item_ids"] == ["nope", "nada"]

    long_text = "an extremely long description " * 400  # 12 KB, thousands of tokens
    r = post(f"{app}/v1/score", {"user": {"history": catalogue_ids[:2], "profile": "p " * 2000}, "texts": [long_text]})
    assert r.status_code == 200, r.text
    want = offline.score(offline.context_ids(catalogue_ids[:2], "p " * 2000), offline.text_ids([long_text]))
    assert np.allclose(r.json()["scores"], want, atol=1e-5)


def test_batch_size_is_changed_at_runtime_through_user_config(app, checkpoints, catalogue_ids):
    from recsys_ray.serve.app import deploy_config

    before = requests.get(f"{app}/readyz", timeout=10).json()["models"]["ranker"]
    deploy_config(app_config(checkpoints, ranker_batch=1))  # only user_config differs
    deadline = time.monotonic() + 60
    while (now := requests.get(f"{app}/readyz", timeout=10).json()["models"]["ranker"])["max_batch_size"] != 1:
        assert time.monotonic() < deadline, f"user_config not applied: {now}"
        time.sleep(0.5)
    assert now["replica"] == before["replica"], "reconfigure must not restart the replica"
    bodies = score_requests(catalogue_ids)[:6]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: post(f"{app}/v1/score", b), bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    assert {r.headers["X-Batch-Size"] for r in responses} == {"1"}


# --------------------------------------------------------------------------- retriever only, overload


def test_retriever_only_app_scores_with_cosine_and_sheds_overload_with_503(serve_port, checkpoints, catalogue_ids):
    """Without a ranker: /v1/score is the retriever's scaled cosine, /v1/recommend the retriever's
    top k. Then overload: 2 requests in the replica (each batch waits 1 s to fill 4 slots), 1 in
    the ingress's queue; the other concurrent requests are refused at once with 503."""
    from ray import serve

    from recsys_ray.predict import Predictor, PredictorConfig

    name = "recsys-retriever-only"
    deploy(name, {"checkpoint": checkpoints["retriever"], "device": "cpu"},
           {"Retriever": {"max_ongoing_requests": 2, "max_queued_requests": 1,
                          "user_config": {"max_batch_size": 4, "batch_wait_timeout_s": 1.0}}})
    base = f"http://127.0.0.1:{serve_port}/{name}"
    try:
        offline = Predictor(PredictorConfig(retriever=checkpoints["retriever"]))
        body = {"user": {"history": catalogue_ids[3:9], "profile": {"age": 50}}, "item_ids": catalogue_ids[20:26]}
        r = post(f"{base}/v1/score", body)
        assert r.status_code == 200 and r.json()["model"] == "retriever", r.text
        ctx = offline.context_ids(catalogue_ids[3:9], {"age": 50})
        want = offline.score(ctx, [offline.items.tokens[i] for i in offline.items.rows(catalogue_ids[20:26])])
        assert np.allclose(r.json()["scores"], want, atol=1e-4)

        history = catalogue_ids[:30]
        r = post(f"{base}/v1/recommend", {"user": {"history": history}, "k": 15})
        assert r.status_code == 200 and r.json()["model"] == "retriever"
        ids = [it["item_id"] for it in r.json()["items"]]
        ((rows, _),) = offline.retrieve([offline.context_ids(history)], 15, [offline.items.rows(history)])
        assert ids == [offline.items.ids[i] for i in rows] and not set(ids) & set(history)

        def timed(j):
            t0 = time.perf_counter()
            resp = post(f"{base}/v1/score", {"user": {"history": catalogue_ids[j:j + 2]}, "item_ids": catalogue_ids[50:53]})
            return resp, time.perf_counter() - t0

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(timed, range(12)))
        codes = [resp.status_code for resp, _ in results]
        assert set(codes) <= {200, 503}, codes
        shed = [(resp, dt) for resp, dt in results if resp.status_code == 503]
        assert len(shed) >= 6, codes  # at most 2 running + 1 queued (+ a few that arrive after a slot frees)
        assert codes.count(200) >= 3, codes
        for resp, dt in shed:
            assert resp.headers.get("Retry-After") == "1"
            assert "retry" in resp.json()["detail"].lower()
            assert dt < 0.9, f"a 503 took {dt:.2f} s: refusals must not wait for the batch"
    finally:
        serve.delete(name)


def test_retriever_in_ingress_answers_every_route_from_one_process(serve_port, checkpoints, catalogue_ids):
    """``retriever_in_ingress``: one deployment (RetrieverAPI) parses the request and runs the
    retriever; its answers are the offline Predictor's, items added through it are recommended,
    its handle 'hop' is an in-process call; with a ranker, the ranker stays its own deployment."""
    from ray import serve

    from recsys_ray import ray_compat
    from recsys_ray.predict import Predictor, PredictorConfig

    name = "recsys-fused"
    deploy(name, {"checkpoint": checkpoints["retriever"], "device": "cpu", "retriever_in_ingress": True},
           {"RetrieverAPI": SMALL_REPLICA})
    base = f"http://127.0.0.1:{serve_port}/{name}"
    try:
        assert set(serve.status().applications[name].deployments) == {"RetrieverAPI"}
        assert ray_compat.direct_ingress_urls(name) == []  # direct ingress off: only the proxy serves HTTP
        r = requests.get(f"{base}/readyz", timeout=30)
        assert r.status_code == 200 and r.json()["models"]["retriever"]["kind"] == "retriever", r.text
        offline = Predictor(PredictorConfig(retriever=checkpoints["retriever"]))
        history = catalogue_ids[:30]
        r = post(f"{base}/v1/recommend", {"user": {"history": history, "profile": {"age": 50}}, "k": 15})
        assert r.status_code == 200 and r.json()["model"] == "retriever", r.text
        ((rows, scores),) = offline.retrieve([offline.context_ids(history, {"age": 50})], 15, [offline.items.rows(history)])
        assert [it["item_id"] for it in r.json()["items"]] == [offline.items.ids[i] for i in rows]
        assert np.allclose([it["score"] for it in r.json()["items"]], scores, atol=1e-4)
        stages = server_timing(r.headers["Server-Timing"])
        assert {"retriever-prep", "retriever-wait", "retriever-model"} <= set(stages), stages
        assert stages["retriever-hops"] < 5.0, stages  # an await in the same process, not a second replica

        body = {"user": {"history": catalogue_ids[3:9]}, "item_ids": catalogue_ids[20:26]}
        r = post(f"{base}/v1/score", body)
        want = offline.score(offline.context_ids(catalogue_ids[3:9]),
                             [offline.items.tokens[i] for i in offline.items.rows(catalogue_ids[20:26])])
        assert r.status_code == 200 and np.allclose(r.json()["scores"], want, atol=1e-4), r.text
        with ThreadPoolExecutor(8) as pool:  # concurrent users still share the replica's encoder passes
            responses = list(pool.map(lambda j: post(f"{base}/v1/recommend", {"user": {"history": catalogue_ids[j:j + 4]}}),
                                      range(8)))
        assert [x.status_code for x in responses] == [200] * 8
        assert max(int(x.headers["X-Batch-Size"]) for x in responses) > 1

        new = [{"item_id": "fused-1", "text": "a vintage jazz collection for every day"}]
        r = post(f"{base}/v1/items", {"items": new})
        assert r.status_code == 200 and r.json()["added"] == 1, r.text
        offline.add_items(["fused-1"], [new[0]["text"]])
        r = post(f"{base}/v1/recommend", {"user": {"history": ["fused-1"]}, "k": 5})
        ((rows, _),) = offline.retrieve([offline.context_ids(["fused-1"])], 5, [offline.items.rows(["fused-1"])])
        assert r.status_code == 200 and [it["item_id"] for it in r.json()["items"]] == [offline.items.ids[i] for i in rows]
        for bad in ({"user": {"history": ["nope"]}}, {"user": {}, "k": 0}, {"user": {}, "k": 10_000}):
            r = post(f"{base}/v1/recommend", bad)
            assert r.status_code == 422, (bad, r.text)
    finally:
        serve.delete(name)

    deploy(name, {"checkpoint": checkpoints["retriever"], "ranker_checkpoint": checkpoints["ranker"], "device": "cpu",
                  "retriever_in_ingress": True, "rerank_top": RERANK_TOP}, {"RetrieverAPI": SMALL_REPLICA})
    try:
        assert set(serve.status().applications[name].deployments) == {"RetrieverAPI", "Ranker"}
        offline = Predictor(PredictorConfig(retriever=checkpoints["retriever"], ranker=checkpoints["ranker"],
                                            rerank_top=RERANK_TOP))
        history = catalogue_ids[:40:2]
        r = post(f"{base}/v1/recommend", {"user": {"history": history}, "k": 10})
        assert r.status_code == 200 and r.json()["model"] == "retriever+ranker", r.text
        ((rows, _),) = offline.recommend([offline.context_ids(history)], 10, [offline.items.rows(history)])
        assert [it["item_id"] for it in r.json()["items"]] == [offline.items.ids[i] for i in rows]
        assert server_timing(r.headers["Server-Timing"])["ranker-hops"] >= 0
    finally:
        serve.delete(name)


def test_search_through_serve_is_the_offline_search_ranking(serve_port, app, syn_data, tokenizer, tmp_path,
                                                           catalogue_ids):
    """/v1/search on a retriever trained for search (an untrained tiny one: the wiring, not the
    quality) is the offline Predictor's ranking of the same search context; the module's app,
    whose retriever was not trained for search, answers 422 with the reason."""
    import torch
    from ray import serve

    from recsys_ray.data.catalogue import Catalogue
    from recsys_ray.data.layout import read_manifest
    from recsys_ray.model.config import ModelConfig
    from recsys_ray.model.kinds import from_config
    from recsys_ray.predict import Predictor, PredictorConfig

    items = Catalogue.from_data_dir(syn_data)
    torch.manual_seed(0)
    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    model = from_config(ModelConfig(kind="retriever", history="items", tiny=tiny, search_mix=0.5), tokenizer,
                        item_tokens=items.tokens)
    ckpt = model.save(tmp_path / "search", extra={"text": read_manifest(syn_data)["text"]})
    items.save(ckpt / "items.parquet")
    name = "recsys-search"
    deploy(name, {"checkpoint": str(ckpt), "device": "cpu", "max_k": 20})
    base = f"http://127.0.0.1:{serve_port}/{name}"
    try:
        offline = Predictor(PredictorConfig(retriever=str(ckpt)))
        history = catalogue_ids[:5]
        r = post(f"{base}/v1/search", {"user": {"history": history}, "query": "a jazz gift", "k": 7})
        assert r.status_code == 200 and r.json()["model"] == "retriever", r.text
        ctx = offline.search_context(offline.context_ids(history), "a jazz gift")
        ((rows, scores),) = offline.retrieve([ctx], 7, [offline.items.rows(history)])
        assert [it["item_id"] for it in r.json()["items"]] == [offline.items.ids[i] for i in rows]
        assert np.allclose([it["score"] for it in r.json()["items"]], scores, atol=1e-4)
        r = post(f"{base}/v1/search", {"query": "jazz", "k": 3})  # plain search
        ((rows, _),) = offline.retrieve([offline.search_context(None, "jazz")], 3)
        assert r.status_code == 200 and [it["item_id"] for it in r.json()["items"]] == [offline.items.ids[i] for i in rows]
        for bad in ({"query": " ", "k": 3}, {"query": "jazz", "k": 21}, {"user": {"history": ["nope"]}, "query": "x"}):
            assert post(f"{base}/v1/search", bad).status_code == 422, bad
        r = post(f"{app}/v1/search", {"user": {"history": history}, "query": "jazz"})
        assert r.status_code == 422 and "not trained for search" in r.json()["detail"]["message"], r.text
    finally:
        serve.delete(name)


def test_a_lost_replica_is_retried_once_then_a_503_not_a_500():
    """A replica killed under a request (scale-down past its grace period): scoring is idempotent,
    so the ingress retries once on another replica, then answers 503 + Retry-After."""
    import asyncio

    from ray.exceptions import ActorDiedError

    from recsys_ray.serve.api import ApiError, AppArgs, ScoreRequest
    from recsys_ray.serve.app import ServeBackend

    class FlakyMethod:
        def __init__(self, failures: int):
            self.failures, self.calls = failures, 0

        def remote(self, *args, **kwargs):
            self.calls += 1
            fail = self.calls <= self.failures

            async def answer():
                if fail:
                    raise ActorDiedError()
                return {"scores": [1.0], "batch_size": 1}

            return answer()

    class Handle:
        def __init__(self, failures):
            self.score = FlakyMethod(failures)

    req = ScoreRequest.model_validate({"user": {}, "item_ids": ["a"]})
    once = Handle(failures=1)
    out, batch = asyncio.run(ServeBackend(once, None, AppArgs(checkpoint="unused")).score(req))
    assert out.scores == [1.0] and once.score.calls == 2
    twice = Handle(failures=2)
    with pytest.raises(ApiError) as err:
        asyncio.run(ServeBackend(twice, None, AppArgs(checkpoint="unused")).score(req))
    assert err.value.status == 503 and err.value.headers["Retry-After"] == "1" and twice.score.calls == 2


# --------------------------------------------------------------------------- start-up failures


def test_missing_or_mismatched_checkpoints_fail_the_build_with_the_reason(checkpoints, tmp_path):
    import shutil

    from pydantic import ValidationError

    from recsys_ray.serve import build_app
    from recsys_ray.serve.api import AppArgs

    with pytest.raises(ConfigError, match="not found") as err:
        build_app({"checkpoint": str(tmp_path / "nowhere")})
    assert "nowhere" in str(err.value)
    with pytest.raises(ConfigError, match="is a ranker checkpoint, expected a retriever"):
        build_app(AppArgs(checkpoint=checkpoints["ranker"]))
    with pytest.raises(ConfigError, match="ranker_checkpoint: .* is a retriever checkpoint, expected a ranker"):
        build_app(AppArgs(checkpoint=checkpoints["retriever"], ranker_checkpoint=checkpoints["retriever"]))
    # both problems at once
    with pytest.raises(ConfigError) as err:
        build_app(AppArgs(checkpoint=checkpoints["ranker"], ranker_checkpoint=str(tmp_path / "gone")))
    assert len(err.value.problems) == 2
    no_catalogue = tmp_path / "no_catalogue"
    shutil.copytree(checkpoints["retriever"], no_catalogue)
    (no_catalogue / "items.parquet").unlink()
    with pytest.raises(ConfigError, match="items.parquet"):
        build_app(AppArgs(checkpoint=str(no_catalogue)))
    with pytest.raises(ValidationError):
        AppArgs.model_validate({"checkpoint": checkpoints["retriever"], "max_candidate": 5})
    # a valid one builds (nothing runs until serve.run)
    assert build_app(AppArgs(checkpoint=checkpoints["retriever"], ranker_checkpoint=checkpoints["ranker"])) is not None


def test_a_checkpoint_that_cannot_load_fails_the_deploy_and_readiness_says_why(serve_port, checkpoints):
    from ray import serve

    name = "recsys-broken"
    with pytest.raises(RuntimeError, match="Ranker"):
        deploy(name, {"checkpoint": checkpoints["retriever"], "ranker_checkpoint": checkpoints["broken_ranker"],
                      "device": "cpu"}, {"Ranker": {"max_constructor_retry_count": 1}})
    try:
        base = f"http://127.0.0.1:{serve_port}/{name}"
        r = requests.get(f"{base}/readyz", timeout=30)
        assert r.status_code == 503 and r.json()["ready"] is False
        assert "unreadable safetensors" in r.json()["reason"], r.text
        assert requests.get(f"{base}/healthz", timeout=10).status_code == 200  # alive, not ready
    finally:
        serve.delete(name)


# --------------------------------------------------------------------------- shipped configs


def load_config(path: Path):
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))


def check_app_config(app, has_ranker: bool) -> dict:
    from recsys_ray.serve.api import AppArgs
    from recsys_ray.serve.app import BatchConfig

    assert app.import_path == "recsys_ray.serve:build_app"
    args = AppArgs.model_validate(app.args)  # what Serve does with the typed builder
    assert bool(args.ranker_checkpoint) == has_ranker
    deps = {d.name: d for d in app.deployments}
    assert set(deps) <= {"RecsysAPI", "Retriever", "RetrieverAPI", "Ranker"}
    assert ("Ranker" in deps) == has_ranker, "Serve refuses settings for a deployment the app lacks"
    for name in ("Retriever", "Ranker"):
        if name not in deps:
            continue
        d = deps[name]
        batch = BatchConfig.model_validate(d.user_config)
        assert d.max_ongoing_requests >= batch.max_batch_size, name
        assert 0 < d.max_queued_requests <= 1024, name
        assert d.backpressure_config.retry_after_s >= 1, name
    return deps


@pytest.mark.parametrize("name", ["local.yaml", "local-ranker.yaml", "prod.yaml"])
def test_shipped_serve_configs_validate_against_rays_schema(name):
    config = load_config(REPO / "serve_configs" / name)
    (app,) = config.applications
    deps = check_app_config(app, has_ranker=name != "local.yaml")
    if name.startswith("local"):
        assert config.http_options.host == "127.0.0.1"
        assert app.args["checkpoint"] == "artifacts/models/retriever"
        assert all(not (d.ray_actor_options and d.ray_actor_options.num_gpus) for d in deps.values())
    else:
        assert app.args["checkpoint"].startswith("s3://") and app.args["ranker_checkpoint"].startswith("s3://")
        assert config.http_options.request_timeout_s and config.http_options.request_timeout_s > 0
        for model in ("Ranker", "Retriever"):
            d = deps[model]
            assert d.ray_actor_options.num_gpus > 0
            auto = d.autoscaling_config
            assert auto["min_replicas"] >= 1 and auto["max_replicas"] > auto["min_replicas"]
            assert auto["target_ongoing_requests"] > 0
            assert d.health_check_period_s and d.health_check_timeout_s
            assert d.graceful_shutdown_timeout_s and d.graceful_shutdown_wait_loop_s


def test_the_local_ranker_config_is_local_yaml_plus_a_ranker():
    """Serve configs cannot include each other: the two local files are checked to stay in step."""
    plain = yaml.safe_load((REPO / "serve_configs/local.yaml").read_text())
    with_ranker = yaml.safe_load((REPO / "serve_configs/local-ranker.yaml").read_text())
    app = with_ranker["applications"][0]
    assert app["args"].pop("ranker_checkpoint") == "artifacts/models/ranker"
    ranker = [d for d in app["deployments"] if d["name"] == "Ranker"]
    app["deployments"] = [d for d in app["deployments"] if d["name"] != "Ranker"]
    assert with_ranker == plain
    assert ranker[0]["autoscaling_config"]["max_replicas"] >= 2


def test_kuberay_service_serves_the_same_app_args():
    doc = yaml.safe_load((REPO / "cluster/kuberay/rayservice.yaml").read_text())
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    (app,) = config.applications
    from recsys_ray.serve.api import AppArgs

    args = AppArgs.model_validate(copy.deepcopy(app.args))
    assert args.checkpoint.startswith("s3://") and "retriever" in args.checkpoint
    assert args.ranker_checkpoint is None or "ranker" in args.ranker_checkpoint
