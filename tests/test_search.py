"""Personalised search end to end on the session's Ray: logs with a query column -> a tiny
item-token retriever trained with ``model.search_mix`` -> the search table of jobs/evaluate.py ->
the Predictor and the HTTP route /v1/search (the plain app's backend: the Serve app's routes and
checks without Serve; tests/serve/test_serve.py runs the route through Serve)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient

from recsys_ray.config import build_config
from recsys_ray.data.catalogue import Catalogue
from recsys_ray.data.config import DataConfig
from recsys_ray.data.examples import MAX_QUERY_TOKENS
from recsys_ray.data.layout import read_manifest, read_split_rows
from recsys_ray.data.pipeline import prepare
from recsys_ray.errors import ConfigError, DataError, RecsysError
from recsys_ray.model.config import ModelConfig
from recsys_ray.model.kinds import config_problems, from_config
from recsys_ray.model.kinds.item_retriever import SequenceCollator, history_context
from recsys_ray.model.tokenizer import special_ids
from recsys_ray.predict import Predictor, PredictorConfig
from recsys_ray.train.config import load_train_config
from recsys_ray.train.driver import fit

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="module")
def search_data(ray_session, tmp_path_factory) -> str:
    """The synthetic log as generic logs with a query column: each event's query is the topic word
    of the item acted on (a query matches ~1/12 of the catalogue; the history decides within it);
    every fifth event is a browsing event (no query)."""
    root = tmp_path_factory.mktemp("search")
    base = build_config(DataConfig, {"dataset": "synthetic", "output": str(root / "syn"), "max_history": 5},
                        ["synthetic.num_users=200", "synthetic.num_items=150", "synthetic.num_events=4000"])
    prepare(base)
    src = root / "syn" / "source"
    events, items = pq.read_table(src / "events"), pq.read_table(src / "items.parquet")
    topic = dict(zip(items["item_id"].to_pylist(), [t.split()[1] for t in items["title"].to_pylist()], strict=True))
    queries = [None if j % 5 == 4 else topic[i] for j, i in enumerate(events["item_id"].to_pylist())]
    pq.write_table(events.append_column("query", pa.array(queries, pa.string())), root / "log.parquet")
    cfg = build_config(DataConfig, {"dataset": str(root / "log.parquet"), "items": str(src / "items.parquet"),
                                    "output": str(root / "data"), "max_history": 5,
                                    "columns": {"event": "event", "query": "query"}})
    m = prepare(cfg)
    assert m["counts"]["events_by_kind"]["search"] == sum(q is not None for q in queries)
    assert sum(m["counts"]["events_by_kind"].values()) == m["counts"]["events_accepted"]
    return str(root / "data")


@pytest.fixture(scope="module")
def trained(search_data, tmp_path_factory) -> dict:
    cfg = load_train_config({
        "data": search_data,
        "model": {"kind": "retriever", "history": "items", "history_len": 8, "tiny": TINY, "dropout": 0.0,
                  "temperature": 0.1, "search_mix": 0.5, "search_anonymous": 0.2, "search_queries": 3},
        "loss": "softmax", "negatives": 0, "batch_size": 8, "epochs": 6,
        "early_stopping": {"metric": "search_ndcg@10", "patience": 6},  # the search metric exists and is read
        "optim": {"lr": 0.003, "new_lr": 0.01, "warmup_ratio": 0.0},
        "num_workers": 1, "storage_path": str(tmp_path_factory.mktemp("runs")), "name": "search", "log_every": 50,
    })
    return fit(cfg)


def test_search_mix_is_a_mode_of_the_item_token_retriever_and_needs_logs_with_queries(syn_data, tmp_path):
    assert any("search_mix" in p for p in config_problems(ModelConfig(kind="retriever", history="text", search_mix=0.5)))
    assert any("search_mix" in p for p in config_problems(ModelConfig(kind="retriever", history="items", search_mix=2)))
    cfg = load_train_config({"data": syn_data, "model": {"kind": "retriever", "history": "items", "tiny": TINY,
                                                         "search_mix": 0.5}, "loss": "softmax", "negatives": 0,
                             "num_workers": 1, "storage_path": str(tmp_path)})
    with pytest.raises(DataError, match="carry no queries"):
        fit(cfg)
    # the search_* validation metrics come from search models only
    from recsys_ray.tune.config import SweepConfig, TuneSettings

    rec = {"data": syn_data, "model": {"kind": "retriever", "history": "items", "tiny": TINY}, "loss": "softmax",
           "negatives": 0, "num_workers": 1, "storage_path": str(tmp_path)}
    with pytest.raises(ConfigError, match="early_stopping.metric: 'search_ndcg@10' is reported by search models only"):
        load_train_config({**rec, "early_stopping": {"metric": "search_ndcg@10", "patience": 2}})
    assert any("search models only" in p for p in SweepConfig(train=load_train_config(rec),
                                                               tune=TuneSettings(metric="search_ndcg@10")).problems())


def test_search_windows_append_the_query_and_leave_the_recommendation_targets_as_they_were(search_data, tokenizer):
    items = Catalogue.from_data_dir(search_data)
    special = special_ids(tokenizer)
    offset = tokenizer.vocab_size
    import pyarrow.dataset as pads

    from recsys_ray.data.synthetic import TOPICS

    rows = [r for r in pads.dataset(f"{search_data}/sequences").to_table().to_pylist() if r["n_train"] >= 4][:1]
    # every event a search event here (the log's browsing events have none): its item's topic word
    rows[0]["queries"] = [next(w for w in TOPICS if w in items.texts[items.index[i]].split()) for i in rows[0]["item_ids"]]
    plain = SequenceCollator(items, special, offset, 8, 0, tokenizer, seed=3, sampled=False)(rows)
    search = SequenceCollator(items, special, offset, 8, 0, tokenizer, seed=3, sampled=False, search_mix=1.0,
                              search_anonymous=0.0)(rows)
    n = int(plain["attention_mask"].sum())
    ids = search["input_ids"][0].tolist()
    assert ids[:n] == plain["input_ids"][0, :n].tolist()  # the same window, then [SEP] query
    last = int(search["attention_mask"].sum()) - 1
    t = search["targets"][0]
    assert t[:n].tolist() == plain["targets"][0, :n].tolist()  # every next-item target kept
    assert ids[n] == special[1]  # [SEP], then the query's word pieces
    query_ids = ids[n + 1 : last + 1]
    assert all(q < offset for q in query_ids) and len(query_ids) >= 1
    # read after the query: the window's last event, the same target as at the last history item
    assert int(t[last]) == int(plain["targets"][0, n - 1]) >= 0
    # the target at the query is the event whose query it is (the topic word of its item)
    assert tokenizer.decode(query_ids).strip() in items.texts[int(t[last])]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_query_blocks_read_exactly_what_a_search_of_the_shorter_history_reads(search_data, tokenizer, attn):
    """``search_queries`` > 1: every block's vector equals the one :func:`search_context` of the
    history before its event gives alone, its target is that event, and the recommendation
    positions are those of the window without any query."""
    import pyarrow.dataset as pads

    from recsys_ray.data.synthetic import TOPICS

    items = Catalogue.from_data_dir(search_data)
    special, offset = special_ids(tokenizer), tokenizer.vocab_size
    rows = [r for r in pads.dataset(f"{search_data}/sequences").to_table().to_pylist() if r["n_train"] >= 6][:3]
    for r in rows:
        r["queries"] = [next(w for w in TOPICS if w in items.texts[items.index[i]].split()) for i in r["item_ids"]]
    plain = SequenceCollator(items, special, offset, 8, 0, tokenizer, seed=5, sampled=False)(rows)
    packed = SequenceCollator(items, special, offset, 8, 0, tokenizer, seed=5, sampled=False, search_mix=1.0,
                              search_anonymous=0.0, search_queries=3)(rows)
    torch.manual_seed(0)
    model = from_config(ModelConfig(kind="retriever", history="items", tiny=TINY, search_mix=1.0, dropout=0.0),
                        tokenizer, item_tokens=items.tokens).eval()
    model.encoder.config._attn_implementation = attn
    with torch.no_grad():
        vp = model.encode_positions(plain["input_ids"], plain["attention_mask"])
        vq = model.encode_positions(packed["input_ids"], packed["attention_mask"], packed["position_ids"],
                                    packed["visible"])
    n_blocks = 0
    for i, r in enumerate(rows):
        n = int(plain["attention_mask"][i].sum())
        assert packed["input_ids"][i, :n].tolist() == plain["input_ids"][i, :n].tolist()
        assert packed["targets"][i, :n].tolist() == plain["targets"][i, :n].tolist()
        assert torch.allclose(vq[i, :n], vp[i, :n], atol=1e-5)  # recommendation positions untouched
        ids, tgt = packed["input_ids"][i].tolist(), packed["targets"][i]
        window = ids[1:n]  # profile [SEP] items (no [CLS])
        sep_at = window.index(special[1])
        ends = [j for j in range(n, int(packed["attention_mask"][i].sum())) if int(tgt[j]) >= 0]
        starts = [n] + [e + 1 for e in ends[:-1]]
        assert 1 <= len(ends) <= 3
        for s, e in zip(starts, ends, strict=True):
            cut = int(packed["position_ids"][i, s])  # [CLS] profile [SEP] w_0 .. w_{c-1}
            history = [x - offset for x in window[sep_at + 1: cut - 1]]
            alone = model.search_context(history_context(window[:sep_at], history, offset, 8, special),
                                         ids[s + 1: e + 1], special)
            b = model.input_batch([alone], special)
            with torch.no_grad():
                u = model.encode(b["input_ids"], b["attention_mask"])
            assert torch.allclose(vq[i, e], u[0], atol=1e-5)
            # the target is the event after that history, whose query it is
            seq, run = [items.index[x] for x in r["item_ids"]], [*history, int(tgt[e])]
            assert any(seq[k: k + len(run)] == run for k in range(len(seq)))
            assert tokenizer.decode(ids[s + 1: e + 1]).strip() in items.texts[int(tgt[e])]
            n_blocks += 1
    assert n_blocks > len(rows)  # more than one query per window


def test_causal_reading_keeps_the_scores_before_the_query(search_data, tokenizer):
    items = Catalogue.from_data_dir(search_data)
    torch.manual_seed(0)
    model = from_config(ModelConfig(kind="retriever", history="items", tiny=TINY, search_mix=0.5, dropout=0.0),
                        tokenizer, item_tokens=items.tokens).eval()
    special = special_ids(tokenizer)
    ctx = history_context([2023, 2003], [3, 5, 7], model.item_offset, 8, special)
    with_query = model.search_context(ctx, tokenizer("jazz please", add_special_tokens=False)["input_ids"], special)
    a, b = (model.input_batch([c], special) for c in (ctx, with_query))
    with torch.no_grad():
        va = model.encode_positions(a["input_ids"], a["attention_mask"])
        vb = model.encode_positions(b["input_ids"], b["attention_mask"])
        ua, ub = model.encode(a["input_ids"], a["attention_mask"]), model.encode(b["input_ids"], b["attention_mask"])
    assert torch.allclose(va[0], vb[0, : va.shape[1]], atol=1e-5)
    assert not torch.allclose(ua, ub, atol=1e-3)  # the query moves the vector read after it


def test_a_trained_search_model_beats_its_own_recommendation_route_and_the_table_has_every_row(
        search_data, trained, tmp_path):
    from recsys_ray.evaluate.evaluate import EvalSettings, evaluate

    # training validation reads the validation rows with a query as searches too (search_ndcg@10, ...)
    m = trained["metrics"]
    assert m["search_ndcg@10"] > 1.5 * m["ndcg@10"] > 0, m
    out = evaluate(EvalSettings(data=search_data, checkpoints=[trained["best_checkpoint"]], task="search",
                                output=str(tmp_path / "ev"), sequential=None))
    models = out["result"]["models"]
    assert set(models) == {"BM25 (query vs item text)", "MiniLM zero-shot (query vs item text)",
                           "recommendation (query ignored)", "personalised search", "search, query only (no user)"}
    ndcg = {k: v["mean"]["ndcg@10"] for k, v in models.items()}
    assert all(0.0 <= v <= 1.0 for v in ndcg.values())
    # the query (the item's topic word, ~1/12 of the catalogue) is what the search route adds
    assert ndcg["personalised search"] > 1.5 * ndcg["recommendation (query ignored)"], ndcg
    assert ndcg["BM25 (query vs item text)"] > 0.05, ndcg  # the topic word is in the item text
    assert Path(out["summary"]["report"]).is_file()
    result = json.loads(Path(out["summary"]["metrics"]).read_text())
    assert result["targets"] == "search" and result["num_users"] == len(
        [r for r in read_split_rows(search_data, "test") if r["query"]])
    # a recommendation-only checkpoint is refused with the reason
    with pytest.raises(ConfigError, match="not a search checkpoint"):
        evaluate(EvalSettings(data=search_data, checkpoints=[_checkpoint(search_data, tmp_path / "rec", 0.0)],
                              task="search", output=str(tmp_path / "ev2"), sequential=None))


def _checkpoint(data: str, path: Path, search_mix: float) -> str:
    from recsys_ray.model.tokenizer import load_tokenizer

    items = Catalogue.from_data_dir(data)
    torch.manual_seed(0)
    model = from_config(ModelConfig(kind="retriever", history="items", tiny=TINY, search_mix=search_mix),
                        load_tokenizer("default"), item_tokens=items.tokens)
    model.save(path, extra={"text": read_manifest(data)["text"]})
    items.save(path / "items.parquet")
    return str(path)


def test_predictor_search_contexts_and_refusals(search_data, tmp_path):
    p = Predictor(PredictorConfig(retriever=_checkpoint(search_data, tmp_path / "s", 0.5)))
    sep = p.special[1]
    history = p.items.ids[:4]
    ctx = p.context_ids(history)
    q = p.search_context(ctx, "  jazz   ")
    assert q[: len(ctx)] == ctx and q[len(ctx)] == sep and len(q) > len(ctx) + 1
    assert p.search_context(None, "jazz")[:2] == [sep, sep]  # no user: the query alone
    long = p.search_context(None, "jazz " * 500)  # cut, not refused
    assert len(long) == 2 + MAX_QUERY_TOKENS
    with pytest.raises(RecsysError, match="query is empty"):
        p.search_context(ctx, " \t ")
    (rows, scores), = p.retrieve([q], 5, [p.items.rows(history)])
    assert len(rows) == 5 and not set(rows.tolist()) & set(p.items.rows(history))
    rec = Predictor(PredictorConfig(retriever=_checkpoint(search_data, tmp_path / "r", 0.0)))
    with pytest.raises(RecsysError, match="not trained for search"):
        rec.search_context(ctx, "jazz")


def test_search_route_answers_and_refuses_bad_input_with_4xx(search_data, tmp_path):
    from recsys_ray.bench.serve_plain import build_plain_app
    from recsys_ray.serve.api import AppArgs

    app, p = build_plain_app(AppArgs(checkpoint=_checkpoint(search_data, tmp_path / "s", 0.5), max_k=20))
    client = TestClient(app, raise_server_exceptions=False)
    history = p.items.ids[:3]
    r = client.post("/v1/search", json={"user": {"history": history}, "query": "jazz", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "retriever" and len(body["items"]) == 5
    assert not {i["item_id"] for i in body["items"]} & set(history)
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True) and all(i["text"] for i in body["items"])
    r = client.post("/v1/search", json={"query": "jazz", "k": 3})  # plain search: no user
    assert r.status_code == 200 and len(r.json()["items"]) == 3
    assert client.post("/v1/search", json={"query": "jazz " * 2000, "k": 3}).status_code == 200  # cut, not refused
    for bad, why in [({"query": "", "k": 3}, "query is empty"), ({"query": "   ", "k": 3}, "query is empty"),
                     ({"k": 3}, "query"), ({"query": "jazz", "k": 21}, "max_k"), ({"query": "jazz", "k": 0}, "k"),
                     ({"query": 5}, "query"), ({"query": "jazz", "user": {"history": ["nope"]}}, "nope"),
                     ({"query": "jazz", "extra": 1}, "extra")]:
        r = client.post("/v1/search", json=bad)
        assert r.status_code == 422 and why in r.text, (bad, r.status_code, r.text)
    app2, _ = build_plain_app(AppArgs(checkpoint=_checkpoint(search_data, tmp_path / "r", 0.0)))
    r = TestClient(app2, raise_server_exceptions=False).post("/v1/search", json={"query": "jazz"})
    assert r.status_code == 422 and "not trained for search" in r.text
