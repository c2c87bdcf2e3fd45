"""Offline evaluation: the predictor, the Ray Data ranking UDF, baselines on a hand-made log, the report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys_ray import storage
from recsys_ray.checkpoint import resolve
from recsys_ray.data.catalogue import Catalogue
from recsys_ray.data.layout import read_manifest
from recsys_ray.errors import ConfigError, RecsysError, UnknownItems
from recsys_ray.evaluate.baselines import baseline_ranks
from recsys_ray.evaluate.evaluate import EvalSettings, RankUDF, evaluate, merge_results, metrics_of
from recsys_ray.evaluate.sequential import SASRecParams, SequentialSettings
from recsys_ray.model.config import ModelConfig
from recsys_ray.model.kinds import from_config
from recsys_ray.predict import Predictor, PredictorConfig

REPO = Path(__file__).resolve().parents[2]
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def _save_tiny(data: str, path: Path, kind: str, tokenizer, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = from_config(ModelConfig(kind=kind, tiny=TINY, dropout=0.0, temperature=0.1), tokenizer)
    extra = {"text": read_manifest(data)["text"], "train_config": {"max_context_tokens": 64}}
    model.save(path, extra=extra)
    Catalogue.from_data_dir(data).save(path / "items.parquet")
    return str(path)


@pytest.fixture(scope="module")
def tiny_models(syn_data, tokenizer, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        "retriever": _save_tiny(syn_data, root / "retriever", "retriever", tokenizer),
        "retriever2": _save_tiny(syn_data, root / "retriever2", "retriever", tokenizer, seed=1),
        "ranker": _save_tiny(syn_data, root / "ranker", "ranker", tokenizer),
    }


# --- the UDF's ranking, with scores we control ---------------------------------------------------


class _FakePredictor:
    """Stands in for Predictor inside RankUDF: scores are given, not computed."""

    def __init__(self, items: Catalogue, scores: np.ndarray):
        self.items, self._scores = items, scores
        self.retriever, self.ranker = object(), None

    def retrieval_scores(self, contexts, with_prior=True):
        return self._scores[: len(contexts)]

    def example_contexts(self, batch, kind=None):
        return [list(c) for c in batch["context_ids"]]


def _udf_with(items: Catalogue, scores: np.ndarray, betas=(0.0,), prior=None) -> RankUDF:
    udf = RankUDF.__new__(RankUDF)
    udf.p, udf.betas, udf.rerank_beta, udf.sampled, udf.seed = _FakePredictor(items, scores), list(betas), None, 0, 0
    udf.prior = np.zeros(len(items), np.float32) if prior is None else np.asarray(prior, np.float32)
    return udf


def _catalogue(n: int) -> Catalogue:
    return Catalogue(pa.table({"item_id": [str(i) for i in range(n)], "input_ids": [[1000 + i] for i in range(n)]}))


def test_an_oracle_model_gets_ndcg_1_and_seen_items_never_count():
    items = _catalogue(6)
    # the seen items "0" and "1" score highest; the target is the best *unseen* item
    scores = np.array([[9.0, 8.0, 1.0, 7.0, 0.5, 0.0], [9.0, 1.0, 8.0, 0.0, 0.0, 7.0]])
    batch = {"user_id": np.array(["u1", "u2"]), "target_item_id": ["3", "5"],
             "seen_item_ids": [["0", "1"], ["0", "2"]], "context_ids": [[1], [2]]}
    out = _udf_with(items, scores)(batch)
    assert out["rank_b0"].tolist() == [0, 0]
    m = metrics_of(out["rank_b0"])
    assert m["ndcg@10"] == 1.0 and m["hr@5"] == 1.0 and m["mrr"] == 1.0


def test_ranks_are_pessimistic_and_seen_items_are_masked():
    items = _catalogue(5)
    scores = np.array([[2.0, 2.0, 2.0, 5.0, 1.0]])  # target "0" tied with "1" and "2"
    batch = {"user_id": np.array(["u"]), "target_item_id": ["0"], "seen_item_ids": [["3"]], "context_ids": [[1]]}
    # "3" is masked; ties count against the target; "4" scores lower
    assert _udf_with(items, scores)(batch)["rank_b0"].tolist() == [2]


def test_the_retriever_row_is_its_own_scores_whatever_the_betas():
    """The ``retriever`` row must not be betas[0]'s column: with betas that do not start at 0 it
    is computed from the raw scores, and with 0 elsewhere in the list it is that column."""
    items = _catalogue(4)
    scores = np.array([[1.0, 3.0, 2.0, 0.0]])  # on its own the model ranks "1" first
    prior = [0.0, 0.0, 0.0, 10.0]  # a prior that lifts "3" to the top
    batch = {"user_id": np.array(["u"]), "target_item_id": ["1"], "seen_item_ids": [[]], "context_ids": [[1]]}
    for betas in ((1.0,), (1.0, 0.0), (0.0, 1.0)):
        out = _udf_with(items, scores, betas=betas, prior=prior)(batch)
        assert out["rank_retriever"].tolist() == [0], betas
        assert out[f"rank_b{list(betas).index(1.0)}"].tolist() == [1], betas


def test_report_shows_each_metric_once():
    from recsys_ray.evaluate.report import report_markdown

    m = metrics_of(np.array([0, 3, 12]))
    model = {"mean": m, "std": dict.fromkeys(m, 0.0), "seeds": 1, "protocol": "full", "per_seed": [m]}
    text = report_markdown({"data": "d", "num_items": 20, "num_users": 3, "models": {"retriever": model}})
    header = next(line for line in text.splitlines() if line.startswith("| model |"))
    cells = [c.strip().lower() for c in header.strip("|").split("|")]
    assert len(cells) == len(set(cells)), cells
    assert {"ndcg@10", "hr@10", "ndcg@50", "mrr@20"} <= set(cells)


# --- baselines on a hand-made log ----------------------------------------------------------------


def _hand_made_data(root: Path) -> str:
    """items a..h; 5 users with ordered histories: train = the first n_train, then valid, test."""
    (root / "items").mkdir(parents=True)
    (root / "sequences").mkdir()
    pq.write_table(pa.table({"item_id": list("abcdefgh"), "text": list("abcdefgh"), "input_ids": [[1]] * 8}),
                   root / "items" / "items.parquet")
    # u5's test item a repeats its history: left out by the protocol
    seqs = {"u1": list("abcd"), "u2": list("abce"), "u3": list("bcae"), "u4": list("cebad"), "u5": list("abca")}
    pq.write_table(pa.table({
        "user_id": list(seqs), "item_ids": list(seqs.values()),
        "n_train": [2, 2, 2, 3, 2],
    }), root / "sequences" / "part-0.parquet")
    (root / "manifest.json").write_text(json.dumps({"counts": {"items": 8}, "text": {}}))
    return str(root)


def _ease_by_hand(X: np.ndarray, l2: float) -> np.ndarray:
    """Steck (2019), closed form: B = I - P diagMat(1 / diag(P)), P = (X'X + l2 I)^-1."""
    P = np.linalg.inv(X.T @ X + l2 * np.eye(X.shape[1]))
    B = -P / np.diag(P)[None, :]
    np.fill_diagonal(B, 0.0)
    return B


def test_popularity_and_ease_rank_a_hand_made_log_as_computed_by_hand(tmp_path):
    data = _hand_made_data(tmp_path)
    out = baseline_ranks(data)
    assert out["_users"]["ids"] == ["u1", "u2", "u3", "u4"]
    assert out["_users"]["repeats_left_out"] == 1  # u5
    # popularity over everything before each test event (users count once per item):
    # a:5 b:5 c:5 e:1, d f g h: 0; ties rank above the target (pessimistic)
    # u1 (a,b,c; target d): unseen d e f g h -> e above, f g h tie -> rank 4
    # u2, u3 (target e): e is the best unseen item -> rank 0
    # u4 (c,e,b,a; target d): unseen d f g h, all 0 -> rank 3
    assert out["popularity"]["ranks"][0].tolist() == [4, 0, 0, 3]
    # EASE: the closed form computed here, on everything before each user's test event (u5 included)
    l2 = out["EASE"]["params"]["l2"]
    curve = {float(k): v for k, v in out["EASE"]["params"]["valid_ndcg@10_by_l2"].items()}
    assert curve[l2] == max(curve.values())
    X = np.zeros((5, 8))
    for u, hist in enumerate(["abc", "abc", "bca", "ceba", "abc"]):
        X[u, ["abcdefgh".index(c) for c in hist]] = 1
    S = X @ _ease_by_hand(X, l2)
    expected = []
    for u, target in zip(range(4), "deed", strict=True):
        t = "abcdefgh".index(target)
        unseen = [i for i in range(8) if X[u, i] == 0 and i != t]
        expected.append(sum(S[u, i] >= S[u, t] for i in unseen))
    assert out["EASE"]["ranks"][0].tolist() == expected
    assert len(set(expected)) > 1 and max(expected) >= 2  # a wrong model could rank otherwise



def test_sequential_rows_rank_the_hand_made_log_and_report_seeds_other_than_the_tuning_one(tmp_path):
    tiny = SASRecParams(max_len=4, hidden=8, max_epochs=2, eval_every=1)
    out = baseline_ranks(_hand_made_data(tmp_path), sequential=SequentialSettings(sasrec_seeds=2, sasrec_grid=(tiny,)))
    # Markov over everything before each test event: d f g h never occur (score 0 for any knobs);
    # u1 (last c) and u2: c -> e once, so e leads; u3 (.. c a): e only through the back-off; u4: all 0
    assert out["Markov"]["ranks"][0].tolist() == [4, 0, 0, 3]
    assert len(out["Markov"]["params"]["valid_ndcg@10_by_params"]) > 1
    sas = out["SASRec"]
    assert len(sas["ranks"]) == 2 and all(r.shape == (4,) for r in sas["ranks"])
    assert sas["params"]["chosen_with_seed"] == 0 and [r["seed"] for r in sas["params"]["runs"]] == [1, 2]


# --- the predictor -------------------------------------------------------------------------------


def test_predictor_context_ids_match_the_pipeline(syn_data, tiny_models):
    import pyarrow.dataset as pads

    p = Predictor(PredictorConfig(retriever=tiny_models["retriever"]))
    seqs = {r["user_id"]: r for r in pads.dataset(f"{syn_data}/sequences").to_table().to_pylist()}
    rows = pads.dataset(f"{syn_data}/examples/split=test").to_table().slice(0, 20).to_pylist()
    assert p.max_context_tokens == 64  # what the checkpoint trained with, not the data's 256
    for r in rows:
        history = seqs[r["user_id"]]["item_ids"][: r["position"]]  # oldest first, as logged
        ptext = r["context_text"].split(" | history:")[0] if " | history:" in r["context_text"] else None
        assert p.context_ids(history, ptext) == list(r["context_ids"])[:64]


def test_predictor_recommend_never_returns_history_and_names_unknown_items(tiny_models):
    p = Predictor(PredictorConfig(retriever=tiny_models["retriever"], ranker=tiny_models["ranker"], rerank_top=10))
    history = p.items.ids[:7]
    ctx = p.context_ids(history)
    rows, scores = p.recommend([ctx], k=5, exclude=[p.items.rows(history)])[0]
    assert len(rows) == 5 and not set(rows.tolist()) & set(p.items.rows(history))
    assert np.all(np.diff(scores) <= 0)  # best first
    with pytest.raises(UnknownItems, match="'nope'"):
        p.context_ids(["nope", history[0]])
    # the ranker's scores of a candidate list do not depend on what else is in the batch
    cands = [p.items.tokens[i] for i in range(6)]
    alone = p.score(ctx, cands[:2])
    together = p.score_many([ctx, p.context_ids(history[:2])], [cands, cands[2:]])[0][:2]
    assert np.allclose(alone, together, atol=1e-5)


def test_predictor_refuses_a_checkpoint_of_the_wrong_kind(tiny_models):
    with pytest.raises(RecsysError, match="is a ranker checkpoint, expected a retriever"):
        Predictor(PredictorConfig(retriever=tiny_models["ranker"]))
    with pytest.raises(RecsysError, match="not found"):
        Predictor(PredictorConfig(retriever="/nonexistent/ckpt"))


# --- the job end to end --------------------------------------------------------------------------


def _with_one_repeat(data: str, dst: Path) -> str:
    """A copy of prepared data in which the first user's test item repeats its first item."""
    import pyarrow.dataset as pads

    shutil.copytree(data, dst)
    seq = pads.dataset(dst / "sequences").to_table()
    first = min(seq["user_id"].to_pylist())
    rows = seq.to_pylist()
    for r in rows:
        if r["user_id"] == first:
            r["item_ids"][-1] = r["item_ids"][0]
    shutil.rmtree(dst / "sequences")
    (dst / "sequences").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=seq.schema), dst / "sequences" / "part-0.parquet")
    part = dst / "examples" / "split=test"
    test = pads.dataset(part).to_table()
    rows = test.to_pylist()
    for r in rows:
        if r["user_id"] == first:
            r["target_item_id"] = r["seen_item_ids"][0]
    shutil.rmtree(part)
    part.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=test.schema), part / "part-0.parquet")
    return str(dst)


def test_evaluate_writes_metrics_report_and_plots_for_every_model(ray_session, syn_data, tiny_models, tmp_path, s3_server):
    # data, one checkpoint and the output on S3 (the local test server), the rest local; the
    # first user's test event repeats a history item: left out by every model and baseline
    data = _with_one_repeat(syn_data, tmp_path / "data")
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="evaluate")
    storage.upload_dir(data, "s3://evaluate/data")
    storage.upload_dir(tiny_models["retriever"], "s3://evaluate/retriever")
    out = "s3://evaluate/eval"
    settings = EvalSettings(data="s3://evaluate/data", checkpoints=["s3://evaluate/retriever", tiny_models["retriever2"]],
                            rankers=[tiny_models["ranker"]], output=out, rerank_top=10, sampled=True,
                            max_users=40, batch_size=16, actors=1,
                            sequential=SequentialSettings(sasrec_seeds=1, sasrec_grid=(
                                SASRecParams(max_len=8, hidden=16, max_epochs=2, eval_every=1),)))
    res = evaluate(settings)
    assert res["summary"]["report"] == f"{out}/report.md"
    result = res["result"]
    names = set(result["models"])
    assert {"popularity", "EASE", "Markov", "SASRec", "retriever", "retriever+prior", "two-stage",
            "retriever (sampled)", "ranker (sampled)"} <= names
    assert result["models"]["retriever"]["seeds"] == 2
    assert result["models"]["retriever (sampled)"]["protocol"] == "sampled_1+99"
    report = storage.read_text(f"{out}/report.md")
    for name in names:
        assert f"| {name} |" in report
    for png in ("ndcg_at_k.png", "hr_at_k.png", "headline.png"):
        assert storage.info(f"{out}/{png}").size > 5000
    saved = json.loads(storage.read_text(f"{out}/metrics.json"))
    assert saved["num_users"] == 39 and saved["repeat_targets_left_out"] == 1
    assert "repeated targets left out" in saved["protocol"]
    for name in ("EASE", "retriever", "two-stage"):
        assert all(m["num_users"] == 39 for m in result["models"][name]["per_seed"]), name
    # a retrieval miss stays a miss: two-stage HR@N can never beat the retriever's recall@N
    recall = result["models"]["two-stage"]["retriever_recall@N"]["mean"]
    assert result["models"]["two-stage"]["mean"]["hr@10"] <= recall + 1e-9
    # the gate: two-stage against the retriever + prior on validation, per checkpoint, said in a note
    gates = result["models"]["two-stage"]["gate"]
    assert len(gates) == 2 and all(g["two_stage_on"] == (g["valid_ndcg@10_two-stage"] > g["valid_ndcg@10_retriever+prior"])
                                   for g in gates)
    assert any(n.startswith("gate: two-stage beats retriever+prior on validation") for n in result["notes"])
    # separate runs (one job per seed) merge into one report: model rows add up, baselines stay once
    merged = merge_results([f"{out}/metrics.json"] * 2, str(tmp_path / "merged"))["result"]
    assert merged["models"]["retriever"]["seeds"] == 4 and merged["models"]["EASE"]["seeds"] == 1
    assert merged["models"]["retriever"]["mean"]["ndcg@10"] == pytest.approx(result["models"]["retriever"]["mean"]["ndcg@10"])
    assert "| two-stage |" in (tmp_path / "merged" / "report.md").read_text()


def test_evaluate_refuses_bad_settings_before_ray_starts(syn_data, tmp_path):
    with pytest.raises(ConfigError) as err:
        evaluate(EvalSettings(data=str(tmp_path), checkpoints=[str(tmp_path / "missing")], rerank_top=0))
    text = str(err.value)
    assert "checkpoint not found" in text and "not a prepared data directory" in text and "rerank_top" in text


def test_resolve_checkpoint_picks_the_best_of_a_run(tmp_path):
    run = tmp_path / "run"
    for name in ("checkpoint_a", "checkpoint_b"):
        (run / name).mkdir(parents=True)
        (run / name / "model.safetensors").write_bytes(b"x")
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps({"checkpoint_results": [
        {"version": 0, "checkpoint_dir_name": "checkpoint_a", "metrics": {"ndcg@10": 0.3}},
        {"version": 0, "checkpoint_dir_name": "checkpoint_b", "metrics": {"ndcg@10": 0.2}},
    ]}))
    assert resolve(str(run)) == str(run / "checkpoint_a")
    assert resolve(str(run / "checkpoint_b")) == str(run / "checkpoint_b")


def test_the_job_prints_one_json_line_or_one_error_line(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "jobs" / "evaluate.py"), "--data", str(tmp_path),
                          "--checkpoint", str(tmp_path / "nope")], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: ")


def test_cold_start_rows_cold_items_warm_items_and_cold_users(ray_session, syn_data, tokenizer, tmp_path):
    """Data prepared with cold_items (seeded random) and cold_users: --targets cold scores only the
    test events on held-out items (popularity and EASE have never seen them: they rank them
    behind every warm item, HR@20 = 0), warm the others (together: every test row), cold_users one row per number of
    known events next to popularity."""
    from recsys_ray.config import build_config
    from recsys_ray.data.config import DataConfig
    from recsys_ray.data.layout import read_split
    from recsys_ray.data.pipeline import prepare

    data = str(tmp_path / "data")
    m = prepare(build_config(DataConfig, {"dataset": "synthetic", "output": data, "max_history": 5, "cold_items": 0.2,
                                          "cold_items_by": "random", "cold_users": 0.15},
                             ["synthetic.num_users=150", "synthetic.num_items=60", "synthetic.num_events=3000"]))
    cold_ids = set(m["cold_items"]["ids"])
    test = read_split(data, "test", ["target_item_id"])["target_item_id"].to_pylist()
    n_cold = sum(t in cold_ids for t in test)
    assert 0 < n_cold < len(test)
    ck = _save_tiny(data, tmp_path / "retriever", "retriever", tokenizer)
    base = {"data": data, "checkpoints": [ck], "batch_size": 16, "actors": 1, "sequential": None}
    cold = evaluate(EvalSettings(**base, targets="cold", output=str(tmp_path / "cold")))["result"]
    warm = evaluate(EvalSettings(**base, targets="warm", output=str(tmp_path / "warm")))["result"]
    assert cold["num_users"] == n_cold and warm["num_users"] == len(test) - n_cold
    # never seen in training: popularity ranks each cold target behind every warm item the user has not seen
    from recsys_ray.data.layout import read_sequences
    from recsys_ray.evaluate.baselines import baseline_ranks

    fitted = baseline_ranks(data, targets_in=cold_ids)
    seqs = {r["user_id"]: r for r in read_sequences(data, ["user_id", "item_ids", "n_train"]).to_pylist()}
    n_items = m["counts"]["items"]
    for user, rank in zip(fitted["_users"]["ids"], fitted["popularity"]["ranks"][0], strict=True):
        seen = set(seqs[user]["item_ids"][: seqs[user]["n_train"] + 1])
        assert rank >= n_items - len(cold_ids) - len(seen), (user, rank)
    assert cold["models"]["popularity"]["mean"]["mrr"] < warm["models"]["popularity"]["mean"]["mrr"]
    assert cold["models"]["retriever"]["per_seed"][0]["num_users"] == n_cold and cold["targets"] == "cold"
    users = evaluate(EvalSettings(**base, targets="cold_users", output=str(tmp_path / "users")))["result"]
    n_users = m["cold_users"]["users"]
    for k in (0, 1, 2):
        for name in (f"popularity, {k} events", f"popularity of event {k + 1}, {k} events", f"retriever, {k} events",
                     f"retriever+prior, {k} events"):
            assert users["models"][name]["num_users"] == n_users, (name, users["models"][name])
    assert "| popularity, 0 events |" in (tmp_path / "users" / "report.md").read_text()
    plain = EvalSettings(data=syn_data, checkpoints=[ck], targets="cold_users").problems()
    assert any("has no cold users" in p for p in plain), plain
    with pytest.raises(ConfigError, match="--targets cold: .* has no cold items"):
        evaluate(EvalSettings(data=syn_data, checkpoints=[ck], targets="cold", output=str(tmp_path / "x"),
                              sequential=None, actors=1))
