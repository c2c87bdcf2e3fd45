"""The HTTP edge without Ray: strict bodies, renderable errors, and a property test that no body
(bytes or JSON of any shape) gets a 5xx from the routes."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys_ray.serve.api import (
    MAX_JSON_DEPTH,
    AppArgs,
    RecommendResponse,
    ScoreResponse,
    create_api,
    parse_json_body,
)


class EchoBackend:
    """Answers like a model would (one score per candidate), so only the edge is tested."""

    args = AppArgs(checkpoint="unused", max_candidates=50, max_k=20, max_body_bytes=20_000)

    async def score(self, req):
        return ScoreResponse(model="retriever", scores=[0.0] * len(req.candidates)), 1

    async def recommend(self, req):
        return RecommendResponse(model="retriever", items=[]), 1

    async def search(self, req):
        return RecommendResponse(model="retriever", items=[]), 1

    async def ready(self):
        return True, {}


@pytest.fixture(scope="module")
def client():
    return TestClient(create_api(EchoBackend()), raise_server_exceptions=False)


@pytest.mark.parametrize("body, reason", [
    (b'\xff{"user": {}}', "not UTF-8 (byte 0xff at offset 0)"),
    (b'{"user": {"profile": {"a": NaN}}}', "NaN is not standard JSON"),
    (b'{"user": {}, "k": Infinity}', "Infinity is not standard JSON"),
    (b'{"user": {}, "k": -Infinity}', "-Infinity is not standard JSON"),
    (b'{"user": {}, "k": 1e400}', "number 1e400 is out of range"),
    (b'{"user": {}, "k": ' + b"9" * 5000 + b"}", "integer with 5000 digits is out of range"),
    (b"[" * 100_000 + b"]" * 100_000, f"nested deeper than {MAX_JSON_DEPTH} levels"),
    (b'{"user": {"profile": "\\ud800"}}', "unpaired UTF-16 surrogate"),
    (b'{"user": ', "Expecting value"),
])
def test_bodies_that_are_not_plain_json_are_refused_with_the_reason(client, body, reason):
    with pytest.raises(json.JSONDecodeError) as err:
        parse_json_body(body)
    assert reason in err.value.msg
    for route in ("/v1/score", "/v1/recommend", "/v1/search"):
        r = client.post(route, content=body, headers={"content-type": "application/json"})
        assert r.status_code in (413, 422), (route, r.status_code, r.text[:200])
        if r.status_code == 422:
            assert reason in r.json()["message"] and r.json()["message"].startswith("body: invalid JSON: ")


def test_plain_json_passes_and_a_bom_is_ignored():
    assert parse_json_body(b'\xef\xbb\xbf{"a": [1, 2.5, "\\u00e9", "\\ud83d\\ude00"]}') == {"a": [1, 2.5, "é", "😀"]}


def test_validation_errors_say_where_and_what_without_echoing_the_input(client):
    r = client.post("/v1/recommend", json={"user": {"history": [1]}, "k": "ten", "extra": "x" * 500})
    assert r.status_code == 422
    body = r.json()
    assert body["message"].startswith("body.user.history.0: Input should be a valid string (and 2 more)")
    assert {tuple(e["loc"]) for e in body["detail"]} == {("body", "user", "history", 0), ("body", "k"), ("body", "extra")}
    assert "x" * 100 not in r.text and "input" not in body["detail"][0]
    r = client.post("/v1/score", content=b"\xff\xfe", headers={"content-type": "text/plain"})
    assert r.status_code == 422 and "JSON object" in r.json()["message"], r.text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)
shaped = st.fixed_dictionaries(
    {"user": st.fixed_dictionaries({}, optional={"history": json_values | st.lists(st.text(), max_size=5),
                                                 "profile": json_values})},
    optional={"item_ids": json_values | st.lists(st.text(), max_size=60), "texts": json_values,
              "query": json_values | st.text(max_size=20),
              "k": json_values | st.integers(), "exclude_history": json_values, "extra": json_values},
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode()),
                      shaped.map(lambda v: json.dumps(v).encode())),
       route=st.sampled_from(["/v1/score", "/v1/recommend", "/v1/search"]),
       content_type=st.sampled_from(["application/json", "text/plain", None]))
def test_no_body_gets_a_server_error(client, body, route, content_type):
    headers = {"content-type": content_type} if content_type else {}
    r = client.post(route, content=body, headers=headers)
    assert r.status_code < 500, (r.status_code, body[:200], r.text[:300])
    if r.status_code >= 400:
        assert r.json().get("message") or r.json().get("detail"), r.text


# ---------------------------------------------------------------------------------------------
# API keys

KEY_A, KEY_B = "a" * 32, "0123456789abcdef0123456789abcdef"


def keyed_client(monkeypatch, tmp_path, **args) -> TestClient:
    backend = EchoBackend()
    backend.args = backend.args.model_copy(update=args)
    return TestClient(create_api(backend), raise_server_exceptions=False)


def test_api_keys_from_env_and_file_several_for_rotation(monkeypatch, tmp_path):
    monkeypatch.setenv("TEST_RECSYS_KEYS", f"{KEY_A}, {KEY_A}")
    keys = tmp_path / "keys"
    keys.write_text(f"# rotated 2026-12\n{KEY_B}\n\n")
    client = keyed_client(monkeypatch, tmp_path, api_keys_env="TEST_RECSYS_KEYS", api_keys_file=str(keys))
    body = {"user": {}, "k": 3}
    assert client.get("/healthz").status_code == 200  # liveness stays open
    for headers in ({}, {"Authorization": "Bearer wrong-key-wrong-key"}, {"X-API-Key": KEY_A[:-1]},
                    {"Authorization": f"Basic {KEY_A}"}, {"X-API-Key": KEY_A + "x"}):
        for method, path in (("post", "/v1/recommend"), ("get", "/readyz"), ("get", "/openapi.json")):
            r = client.request(method, path, json=body if method == "post" else None, headers=headers)
            assert r.status_code == 401, (headers, path, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
            assert ("missing API key" if not headers or "Basic" in str(headers) else "invalid API key") in r.json()["detail"]
            assert KEY_A not in r.text and KEY_B not in r.text
    for headers in ({"Authorization": f"Bearer {KEY_A}"}, {"authorization": f"bearer {KEY_B}"}, {"X-API-Key": KEY_B}):
        assert client.post("/v1/recommend", json=body, headers=headers).status_code == 200, headers
        assert client.get("/readyz", headers=headers).status_code == 200


def test_an_unauthenticated_huge_body_is_refused_before_it_is_read(monkeypatch, tmp_path):
    monkeypatch.setenv("TEST_RECSYS_KEYS", KEY_A)
    client = keyed_client(monkeypatch, tmp_path, api_keys_env="TEST_RECSYS_KEYS")
    assert client.post("/v1/score", content=b"x" * 100_000).status_code == 401
    r = client.post("/v1/score", content=b"x" * 100_000, headers={"X-API-Key": KEY_A})
    assert r.status_code == 413


@pytest.mark.parametrize("setup, args, expected", [
    (lambda mp, d: mp.delenv("TEST_RECSYS_KEYS", raising=False), {"api_keys_env": "TEST_RECSYS_KEYS"},
     "api_keys_env: environment variable TEST_RECSYS_KEYS is not set (or empty) on this node"),
    (lambda mp, d: mp.setenv("TEST_RECSYS_KEYS", " , "), {"api_keys_env": "TEST_RECSYS_KEYS"},
     "api_keys_env: environment variable TEST_RECSYS_KEYS is not set"),
    (lambda mp, d: None, {"api_keys_file": "/nonexistent/keys"},
     "api_keys_file: cannot read /nonexistent/keys: FileNotFoundError"),
    (lambda mp, d: (d / "keys").write_text("# none yet\n"), {"api_keys_file": "{d}/keys"}, "holds no key"),
    (lambda mp, d: mp.setenv("TEST_RECSYS_KEYS", "short-secret"), {"api_keys_env": "TEST_RECSYS_KEYS"},
     "1 API key(s) shorter than 16 characters"),
])
def test_a_configured_key_check_without_usable_keys_fails_at_start_up(monkeypatch, tmp_path, setup, args, expected):
    from recsys_ray.errors import ConfigError

    setup(monkeypatch, tmp_path)
    args = {k: v.format(d=tmp_path) for k, v in args.items()}
    with pytest.raises(ConfigError) as err:
        keyed_client(monkeypatch, tmp_path, **args)
    assert expected in str(err.value)
    assert "short-secret" not in str(err.value)  # a key never reaches a message


def test_key_comparison_is_over_digests_and_every_key():
    import hashlib

    from recsys_ray.serve import api

    calls = []
    real = api.hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    digests = tuple(hashlib.sha256(k.encode()).digest() for k in (KEY_A, KEY_B, "c" * 40))
    api.hmac.compare_digest, saved = spy, api.hmac.compare_digest
    try:
        assert api.key_matches(KEY_A.encode(), digests)  # the first key matches: the others are still compared
        assert not api.key_matches(b"x", digests)
    finally:
        api.hmac.compare_digest = saved
    assert calls == [(32, 32)] * 6
