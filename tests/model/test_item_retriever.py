"""The item-token sequence retriever (``model.history: items``): causal reading, the training
windows, the Predictor's contexts, and a real 2-worker run whose scores the evaluation path
reproduces."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from recsys_ray.data.catalogue import Catalogue
from recsys_ray.data.layout import read_manifest, read_split_rows
from recsys_ray.errors import ConfigError, RecsysError
from recsys_ray.model.base import BertRecommender
from recsys_ray.model.config import ModelConfig
from recsys_ray.model.kinds import config_problems, from_config, load_model
from recsys_ray.model.kinds.item_retriever import (
    SequenceCollator,
    build_sequence_batch,
    history_context,
)
from recsys_ray.model.tokenizer import special_ids
from recsys_ray.predict import Predictor, PredictorConfig
from recsys_ray.train.config import load_train_config
from recsys_ray.train.driver import fit
from recsys_ray.train.loop import ScoreStep, validate

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def _model(tokenizer, item_tokens, seed=0, **over) -> BertRecommender:
    torch.manual_seed(seed)
    cfg = ModelConfig(kind="retriever", history="items", tiny=TINY, dropout=0.0, temperature=0.1, **over)
    return from_config(cfg, tokenizer, item_tokens=item_tokens)


@pytest.fixture(scope="module")
def items(syn_data) -> Catalogue:
    return Catalogue.from_data_dir(syn_data)


def test_config_checks_and_the_catalogue_requirement(tokenizer):
    assert "model.kind must be one of ranker, retriever" in " ".join(
        config_problems(ModelConfig(kind="scorer", history="items")))
    assert any("history_len" in p for p in config_problems(ModelConfig(kind="retriever", history="items", history_len=0)))
    with pytest.raises(ConfigError, match="needs the catalogue"):
        from_config(ModelConfig(kind="retriever", history="items", tiny=TINY), tokenizer)


def test_reading_is_causal_and_item_vectors_start_from_the_item_text(tokenizer, items):
    model = _model(tokenizer, items.tokens)
    sp = special_ids(tokenizer)
    off = model.item_offset
    assert off == tokenizer.vocab_size
    # item embeddings start as the mean of the item's word-piece embeddings
    words = model.encoder.embeddings.word_embeddings.weight
    assert torch.allclose(model.item_emb.weight[3], words[torch.tensor(items.tokens[3])].mean(0))
    ctx = history_context([2000, 2001], [5, 9, 7, 1], off, 50, sp)
    assert ctx == [2000, 2001, sp[1], off + 5, off + 9, off + 7, off + 1]
    with torch.no_grad():
        full = model.encode_positions(**{k: v for k, v in build_sequence_batch([ctx], sp).items() if k != "token_type_ids"})
        for cut in range(3, len(ctx) + 1):  # the user after item j does not see the items after j
            b = build_sequence_batch([ctx[:cut]], sp)
            prefix = model.encode(b["input_ids"], b["attention_mask"])
            assert torch.allclose(prefix[0], full[0, cut], atol=1e-5)
        # right padding does not change a row's vector
        b = build_sequence_batch([ctx, ctx[:4]], sp)
        both = model.encode(b["input_ids"], b["attention_mask"])
        assert torch.allclose(both[1], full[0, 4], atol=1e-5)
    # only the last history_len rows are read
    assert history_context(None, list(range(10)), off, 3, sp) == [sp[1], off + 7, off + 8, off + 9]


def test_checkpoint_round_trip_and_freeze_keeps_item_embeddings_training(tokenizer, items, tmp_path):
    model = _model(tokenizer, items.tokens, freeze="encoder")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"item_emb.weight", "head.weight", "head.bias"}
    model.save(tmp_path / "ck")
    again = load_model(tmp_path / "ck")
    assert again.num_items == len(items) and again.encoder.config.is_decoder
    assert torch.equal(again.item_vectors(), model.item_vectors())
    sp = special_ids(tokenizer)
    b = build_sequence_batch([history_context(None, [1, 2, 3], model.item_offset, 50, sp)], sp)
    with torch.no_grad():
        assert torch.allclose(again.encode(b["input_ids"], b["attention_mask"]),
                              model.encode(b["input_ids"], b["attention_mask"]))


def test_windows_predict_the_next_train_item_and_never_see_valid_or_test(syn_data, tokenizer, items):
    seqs = pads.dataset(f"{syn_data}/sequences").to_table().slice(0, 24).to_pylist()
    collate = SequenceCollator(items, special_ids(tokenizer), tokenizer.vocab_size, 4, 3, tokenizer, seed=0, sampled=True)
    off = tokenizer.vocab_size
    for _ in range(5):
        b = collate(seqs)
        for row, ids, tgt in zip(seqs, b["input_ids"].tolist(), b["targets"].tolist(), strict=True):
            train = [items.index[i] for i in row["item_ids"][: row["n_train"]]]
            hist = [t - off for t in ids if t >= off]
            assert len(hist) <= 4
            targets = [t for t in tgt if t >= 0]
            # inputs then targets form one contiguous stretch of the train events
            window = hist + targets[-1:] if hist else targets
            starts = [s for s in range(len(train)) if train[s : s + len(window)] == window]
            assert starts, (window, train)
            # each item position's target is the next event (a [SEP] target, when there is one,
            # is the window's first event)
            if hist:
                assert targets[-len(hist) :] == window[1:]
            assert len(targets) in (len(hist), len(hist) + 1)
        # sampled losses: the target first, negatives never equal to it
        cands = b["candidates"]
        assert torch.equal(cands[:, 0], b["targets"][b["targets"] >= 0])
        assert not (cands[:, 1:] == cands[:, :1]).any()


def test_refit_windows_also_end_at_the_validation_event_and_never_see_test(syn_data, tokenizer, items):
    seqs = pads.dataset(f"{syn_data}/sequences").to_table().slice(0, 24).to_pylist()
    assert all(len(r["item_ids"]) - r["n_train"] == 2 for r in seqs)  # train, validation, test
    off, ends_at_valid = tokenizer.vocab_size, 0
    for refit in (True, False):
        collate = SequenceCollator(items, special_ids(tokenizer), off, 4, 0, tokenizer, seed=0, sampled=False, refit=refit)
        for _ in range(30):
            b = collate(seqs)
            for row, ids, tgt in zip(seqs, b["input_ids"].tolist(), b["targets"].tolist(), strict=True):
                seen = [items.index[i] for i in row["item_ids"][: row["n_train"] + refit]]
                window = [t - off for t in ids if t >= off] + [t for t in tgt if t >= 0][-1:]
                assert any(seen[s : s + len(window)] == window for s in range(len(seen))), (refit, window, seen)
                # (seen stops before the test event, and without refit before the validation one)
                ends_at_valid += refit and window == seen[-len(window):]
    assert ends_at_valid > 0  # refit windows do end at the validation event


def test_a_refit_run_keeps_its_last_epoch_and_evaluate_asks_for_beta(ray_session, syn_data, tokenizer, tmp_path):
    from recsys_ray.evaluate.evaluate import EvalSettings, _check_refits
    from recsys_ray.train.report import format_summary

    base = {"data": syn_data, "model": {"kind": "retriever", "history": "items", "history_len": 8, "tiny": TINY},
            "loss": "softmax", "negatives": 0, "batch_size": 8, "epochs": 2, "num_workers": 1,
            "storage_path": str(tmp_path / "runs"), "name": "refit", "keep_checkpoints": 1, "refit": True}
    with pytest.raises(ConfigError, match="refit: early_stopping"):
        load_train_config({**base, "early_stopping": {"patience": 2}})
    with pytest.raises(ConfigError, match="refit: only the item-token retriever"):
        load_train_config({**base, "model": {"kind": "retriever", "history": "text", "tiny": TINY}})
    res = fit(load_train_config(base))
    assert res["metrics"]["epoch"] == 2 and res["metrics"]["validated"] is False and res["metrics"]["refit"] is True
    assert "refit run" in format_summary(res) and "NDCG@10" not in format_summary(res)
    ckpt = res["best_checkpoint"]
    with pytest.raises(ConfigError, match="refit checkpoint .* pass --beta"):
        _check_refits(EvalSettings(data=syn_data, checkpoints=[ckpt]))
    with pytest.raises(ConfigError, match="two-stage gate"):
        _check_refits(EvalSettings(data=syn_data, checkpoints=[ckpt], rankers=[ckpt], beta=0.5))
    given = EvalSettings(data=syn_data, checkpoints=[ckpt], beta=0.7)
    _check_refits(given)
    assert 0.7 in given.betas


@pytest.mark.parametrize("loss", ["softmax", "bpr"])
def test_the_sequence_model_lowers_its_loss_on_a_fixed_batch(syn_data, tokenizer, items, loss):
    model = _model(tokenizer, items.tokens).train()
    seqs = pads.dataset(f"{syn_data}/sequences").to_table().slice(0, 16).to_pylist()
    batch = SequenceCollator(items, special_ids(tokenizer), model.item_offset, 8, 4, tokenizer, 0, sampled=loss != "softmax")(seqs)
    step, opt = ScoreStep(model), torch.optim.AdamW(model.parameters(), lr=3e-3)
    seen = []
    for _ in range(30):
        own, inbatch = step(batch)
        loss_value = model.train_loss(loss, own, inbatch, batch)
        opt.zero_grad()
        loss_value.backward()
        opt.step()
        seen.append(float(loss_value.detach()))
    assert seen[-1] < 0.8 * seen[0], seen


def test_item_text_dropout_reads_a_random_share_of_items_as_their_text_on_both_sides(syn_data, tokenizer, items, tmp_path):
    assert any("item_text_dropout" in p for p in config_problems(ModelConfig(kind="retriever", item_text_dropout=0.2)))
    assert any("item_text_dropout" in p for p in config_problems(
        ModelConfig(kind="retriever", history="items", item_init="random", item_text_dropout=0.2)))
    assert any("item_text_dropout" in p for p in config_problems(
        ModelConfig(kind="retriever", history="items", item_text_dropout=1.0)))
    model = _model(tokenizer, items.tokens, item_text_dropout=0.5).train()
    words = model.encoder.embeddings.word_embeddings.weight
    mean = words[torch.tensor(items.tokens[3])].mean(0)
    assert torch.allclose(model.item_emb.weight[3], mean, atol=1e-6)  # text_proj starts as the identity
    with torch.no_grad():  # move every learned token away from its text start, and the map off identity
        model.item_emb.weight.add_(torch.randn_like(model.item_emb.weight))
        model.text_proj.weight.mul_(2.0)
    text = model.initial_item_vectors(items.tokens)  # (N, H) what a new item gets now
    assert torch.allclose(text[3], 2.0 * mean, atol=1e-5)
    torch.manual_seed(3)
    table = model._train_table()
    as_text = torch.isclose(table, text).all(dim=1)
    learned = torch.isclose(table, model.item_emb.weight).all(dim=1)
    assert bool((as_text ^ learned).all())  # each row is one or the other
    assert 0.3 < float(as_text.float().mean()) < 0.7, float(as_text.float().mean())
    # the same draw on both sides: the input tokens and the scored item vectors
    sp = special_ids(tokenizer)
    ctx = history_context(None, list(range(8)), model.item_offset, 50, sp)
    ids = torch.tensor([ctx])
    embeds = model._embed(ids, table)[0, 1:]  # the 8 item positions after [SEP]
    assert torch.allclose(embeds, table[:8]) and torch.allclose(model.item_vectors(table), model.normalize(table))
    # gradients reach only the learned rows of the step; evaluation reads the learned tokens
    seqs = pads.dataset(f"{syn_data}/sequences").to_table().slice(0, 16).to_pylist()
    batch = SequenceCollator(items, sp, model.item_offset, 8, 0, tokenizer, 0, sampled=False)(seqs)
    torch.manual_seed(3)
    scores, _ = model.train_scores(batch)
    model.train_loss("softmax", scores, None, batch).backward()
    grad_rows = model.item_emb.weight.grad.abs().sum(dim=1) > 0
    assert not bool((grad_rows & as_text).any()) and bool((grad_rows & learned).any())
    assert model.text_proj.weight.grad.abs().sum() > 0  # the map learns from the rows read as text
    assert model.eval()._train_table() is None
    again = load_model(model.save(tmp_path / "ck"))  # the learned map travels with the checkpoint
    assert torch.equal(again.initial_item_vectors(items.tokens[:5]), model.initial_item_vectors(items.tokens[:5]))
    assert _model(tokenizer, items.tokens).train()._train_table() is None  # off by default


def test_item_text_encoder_reads_a_uniform_draw_of_trained_items_through_the_encoder(syn_data, tokenizer, items, tmp_path):
    """model.item_text_encoder N: N catalogue rows a step (drawn uniformly from the items with train
    events) read as text start + text_tower(the encoder's mean hidden state over their word pieces), on
    both sides; the tower starts at zero, learns with the encoder, and is the rule for every item added
    later (cold start)."""
    for bad in (ModelConfig(kind="retriever", item_text_encoder=4),
                ModelConfig(kind="retriever", history="items", item_init="random", item_text_encoder=4),
                ModelConfig(kind="retriever", history="items", item_text_encoder=-1)):
        assert any("item_text_encoder" in p for p in config_problems(bad)), bad
    assert any("choose one" in p for p in config_problems(
        ModelConfig(kind="retriever", history="items", item_text_encoder=4, item_text_dropout=0.2)))
    torch.manual_seed(0)
    quiet = {**TINY, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # train mode = eval mode
    cfg = ModelConfig(kind="retriever", history="items", tiny=quiet, dropout=0.0, temperature=0.1, item_text_encoder=4)
    model = from_config(cfg, tokenizer, item_tokens=items.tokens).train()
    words = model.encoder.embeddings.word_embeddings.weight
    mean = words[torch.tensor(items.tokens[3])].mean(0)
    assert torch.allclose(model.item_emb.weight[3], mean, atol=1e-6)  # the tower starts at zero: the text start
    assert torch.allclose(model.initial_item_vectors(items.tokens[:4])[3], mean, atol=1e-6)
    sp = special_ids(tokenizer)
    seqs = pads.dataset(f"{syn_data}/sequences").to_table().slice(0, 16).to_pylist()
    collate = SequenceCollator(items, sp, model.item_offset, 8, 0, tokenizer, 0, sampled=False, text_rows=4)
    batch = collate(seqs)
    scores, _ = model.train_scores(batch)  # a fresh model's first step already trains the tower (DDP needs it used)
    model.train_loss("softmax", scores, None, batch).backward()
    assert model.text_tower.weight.grad.abs().sum() > 0
    model.zero_grad()
    with torch.no_grad():  # learned tokens away from their text start, the tower off zero
        model.item_emb.weight.add_(torch.randn_like(model.item_emb.weight))
        model.text_tower.weight.normal_(std=0.5)
    text = model.initial_item_vectors(items.tokens)  # (N, H) what a new or held-out item gets now
    ids = torch.tensor([items.tokens[3][:32]])
    read = model.hidden_states(ids, torch.ones_like(ids)).mean(dim=1)[0]  # the encoder's reading, by hand
    assert torch.allclose(text[3], mean + model.text_tower(read), atol=1e-5)
    assert not torch.allclose(text[3], mean, atol=1e-3)
    table = model._train_table(batch["text_rows"])
    as_text = torch.isclose(table, text, atol=1e-5).all(dim=1)
    learned = torch.isclose(table, model.item_emb.weight).all(dim=1)
    assert bool((as_text ^ learned).all())  # each row is one or the other
    assert as_text.nonzero().flatten().tolist() == batch["text_rows"].tolist() and len(batch["text_rows"]) == 4
    # the draw: uniform over the items with a train event (never one training never saw), fresh per batch
    some = copy.copy(items)  # a catalogue whose first 10 items had no train event (held-out cold items)
    some.counts = items.counts.copy()
    some.counts[:10] = 0
    with_events = set(range(10, len(items)))
    collate = SequenceCollator(some, sp, model.item_offset, 8, 0, tokenizer, 0, sampled=False, text_rows=4)
    draws = [set(collate(seqs)["text_rows"].tolist()) for _ in range(300)]
    assert set().union(*draws) == with_events and all(len(d) == 4 for d in draws)
    with pytest.raises(RecsysError, match="no text_rows"):
        model._train_table(None)
    # the item embeddings of the rows read as text get no gradient; the tower and the encoder learn from them
    scores, _ = model.train_scores(batch)
    model.train_loss("softmax", scores, None, batch).backward()
    grad_rows = model.item_emb.weight.grad.abs().sum(dim=1) > 0
    assert not bool((grad_rows & as_text).any()) and bool((grad_rows & learned).any())
    assert model.text_tower.weight.grad.abs().sum() > 0
    assert model.eval()._train_table(batch["targets"]) is None  # evaluation reads the learned tokens
    # the tower travels with the checkpoint and places items added to a Predictor
    ck = model.save(tmp_path / "tower", extra={"text": read_manifest(syn_data)["text"]})
    items.save(tmp_path / "tower" / "items.parquet")
    again = load_model(ck)
    assert torch.allclose(again.initial_item_vectors(items.tokens[:5]), text[:5], atol=1e-5)
    p = Predictor(PredictorConfig(retriever=str(ck)))
    n = len(p.items)
    p.add_items(["new-a"], ["vintage jazz collection for every day"])
    new_ids = p.text_ids(["vintage jazz collection for every day"])
    plain = p.retriever.encoder.embeddings.word_embeddings.weight[torch.tensor(new_ids[0])].mean(0)
    assert torch.allclose(p.retriever.item_emb.weight[n], p.retriever.initial_item_vectors(new_ids)[0], atol=1e-5)
    assert not torch.allclose(p.retriever.item_emb.weight[n], plain, atol=1e-3)  # the tower's, not the bare text start


def _save(data: str, tokenizer, path: Path, seed=0) -> str:
    items = Catalogue.from_data_dir(data)
    model = _model(tokenizer, items.tokens, seed=seed)
    model.save(path, extra={"text": read_manifest(data)["text"]})
    Catalogue.from_data_dir(data).save(path / "items.parquet")
    return str(path)


def test_predictor_contexts_recommendations_and_refusals(syn_data, tokenizer, tmp_path):
    ck = _save(syn_data, tokenizer, tmp_path / "seq")
    p = Predictor(PredictorConfig(retriever=ck))
    assert p.retriever.history == "items" and not p.scores_texts
    rows = read_split_rows(syn_data, "test")[:10]
    batch = {k: [r[k] for r in rows] for k in ("context_ids", "seen_item_ids", "profile_ids")}
    seqs = {r["user_id"]: r for r in pads.dataset(f"{syn_data}/sequences").to_table().to_pylist()}
    for r, ctx in zip(rows, p.example_contexts(batch), strict=True):
        # what serving builds from (history, profile text) is what evaluation builds from examples
        profile = seqs[r["user_id"]].get("profile_text")
        assert p.context_ids(r["seen_item_ids"], profile) == ctx
    history = p.items.ids[:7]
    ctx = p.context_ids(history)
    (top, scores), = p.recommend([ctx], k=10, exclude=[p.items.rows(history)])
    assert len(top) == 10 and not set(top.tolist()) & set(p.items.rows(history))
    # scoring catalogue items equals the full-catalogue scores; texts are refused
    cands = p.candidate_ids([4, 2, 8])
    assert np.allclose(p.score(ctx, cands), p.retrieval_scores([ctx], with_prior=False)[0][[4, 2, 8]], atol=1e-5)
    with pytest.raises(RecsysError, match="not texts"):
        p.score(ctx, [[2000, 2001]])
    # a checkpoint trained on another catalogue is refused at start-up
    other = tmp_path / "other.parquet"
    Catalogue(Catalogue.from_data_dir(syn_data).table().slice(0, 20)).save(other)
    with pytest.raises(RecsysError, match="item embeddings but the catalogue"):
        Predictor(PredictorConfig(retriever=ck, items=str(other)))


def test_items_added_to_a_predictor_get_text_initialised_tokens_and_are_recommendable(syn_data, tokenizer, tmp_path):
    """Predictor.add_items (what POST /v1/items runs in every replica): the new rows' item tokens
    are the mean of their word pieces, as at first training; their vectors are appended; known
    rows keep theirs; a history or candidate may name them at once; clashes change nothing."""
    ck = _save(syn_data, tokenizer, tmp_path / "seq")
    p = Predictor(PredictorConfig(retriever=ck, popularity_weight=0.5))
    n, before = len(p.items), p.item_vectors().clone()
    texts = ["vintage jazz collection for every day", "modern chess kit with extra care"]
    assert p.add_items(["new-a", "new-b"], texts) == n + 2
    assert p.items.ids[n:] == ["new-a", "new-b"] and p.items.counts[n:].tolist() == [0, 0]
    want = p.retriever.initial_item_vectors(p.text_ids(texts))
    assert torch.allclose(p.retriever.item_emb.weight[n:], want)
    vecs = p.item_vectors()
    assert vecs.shape[0] == n + 2 and torch.equal(vecs[:n], before)
    assert torch.allclose(vecs[n:], p.retriever.item_vectors()[n:])
    # the new items are scored, can be in a history, and rank (the prior counts them as never seen)
    ctx = p.context_ids([p.items.ids[0], "new-a"])
    scores = p.retrieval_scores([ctx])
    assert scores.shape == (1, n + 2)
    assert np.allclose(p.score(ctx, p.candidates(["new-b"], None)), p.retrieval_scores([ctx], with_prior=False)[0, n + 1:],
                       atol=1e-5)
    ((rows, _),) = p.retrieve([ctx], n + 2, [p.items.rows([p.items.ids[0], "new-a"])])
    assert n + 1 in rows.tolist() and n not in rows.tolist()
    for ids, why in ((["new-a"], "already in the catalogue"), (["x", "x"], "given twice"),
                     ([p.items.ids[3]], "already in the catalogue")):
        with pytest.raises(RecsysError, match=why):
            p.add_items(ids, ["t"] * len(ids))
    assert len(p.items) == n + 2 and p.item_vectors().shape[0] == n + 2
    # reinit_items (evaluate's held-out cold items): those rows back to their text init, the rest untouched
    with torch.no_grad():
        p.retriever.item_emb.weight[:5] += 1.0
    trained = p.retriever.item_emb.weight.detach().clone()
    p.reinit_items(p.items.ids[:3])
    assert torch.allclose(p.retriever.item_emb.weight[:3], p.retriever.initial_item_vectors(p.items.tokens[:3]))
    assert torch.equal(p.retriever.item_emb.weight[3:], trained[3:])
    assert torch.allclose(p.item_vectors()[:3], p.retriever.item_vectors()[:3])


def test_two_worker_run_learns_and_evaluation_reproduces_its_validation_scores(ray_session, syn_data, tokenizer, tmp_path):
    from recsys_ray.evaluate.evaluate import EvalSettings, metrics_of, rank_split

    cfg = load_train_config({
        "data": syn_data,
        "model": {"kind": "retriever", "history": "items", "history_len": 8, "tiny": TINY,
                  "dropout": 0.0, "temperature": 0.1},
        "loss": "softmax", "negatives": 0, "batch_size": 8, "epochs": 3,
        "optim": {"lr": 0.003, "new_lr": 0.01, "warmup_ratio": 0.0},
        "num_workers": 2, "storage_path": str(tmp_path / "runs"), "name": "seq", "log_every": 5,
    })
    res = fit(cfg)
    m = res["metrics"]
    assert res["steps_per_epoch"] == 200 // 16 and res["final"]["global_step"] == 3 * 12
    assert m["global_step"] == 12 * m["epoch"]  # the best checkpoint's own step
    ckpt = Path(res["best_checkpoint"])
    meta = json.loads((ckpt / "recsys_ray.json").read_text())
    items = Catalogue.from_data_dir(syn_data)
    torch.manual_seed(0)
    fresh = from_config(cfg.model, tokenizer, item_tokens=items.tokens)
    untrained = validate(fresh, read_split_rows(syn_data, "valid"), items, special_ids(tokenizer), torch.device("cpu"), cfg.eval_settings())
    assert meta["extra"]["metrics"]["ndcg@10"] > untrained["ndcg@10"], (meta["extra"]["metrics"], untrained)
    # the evaluation path (Ray Data + Predictor) ranks the validation split exactly as training did
    ranks = rank_split(EvalSettings(data=syn_data, batch_size=32, actors=1, betas=(0.0,)), "valid", str(ckpt), None, None)
    assert metrics_of(ranks["rank_b0"])["ndcg@10"] == pytest.approx(meta["extra"]["metrics"]["ndcg@10"], abs=1e-6)


def test_http_routes_with_an_item_token_retriever_and_a_text_ranker(syn_data, tokenizer, tmp_path):
    """The plain app's backend (same routes and candidate handling as the Serve replicas)."""
    import asyncio

    from recsys_ray.bench.serve_plain import PlainBackend, build_plain_app
    from recsys_ray.serve.api import ApiError, AppArgs, RecommendRequest, ScoreRequest

    seq = _save(syn_data, tokenizer, tmp_path / "seq")
    torch.manual_seed(0)
    ranker = from_config(ModelConfig(kind="ranker", tiny=TINY, dropout=0.0), tokenizer)
    ranker.save(tmp_path / "ranker", extra={"text": read_manifest(syn_data)["text"]})
    Catalogue.from_data_dir(syn_data).save(tmp_path / "ranker" / "items.parquet")
    ids = Catalogue.from_data_dir(syn_data).ids
    user = {"history": ids[:6], "profile": {"age": 30}}

    _, alone = build_plain_app(AppArgs(checkpoint=seq))
    backend = PlainBackend(alone, AppArgs(checkpoint=seq))
    out, _ = asyncio.run(backend.score(ScoreRequest(user=user, item_ids=ids[10:13])))
    want = alone.retrieval_scores([alone.context_ids(ids[:6], {"age": 30})], with_prior=False)[0][[10, 11, 12]]
    assert np.allclose(out.scores, want, atol=1e-5)
    with pytest.raises(ApiError) as info:  # free texts: a 422 that says why, not a 500
        asyncio.run(backend.score(ScoreRequest(user=user, texts=["a brand new film"])))
    assert info.value.status == 422 and "not texts" in str(info.value.detail)

    _, both = build_plain_app(AppArgs(checkpoint=seq, ranker_checkpoint=str(tmp_path / "ranker"), rerank_top=10))
    backend = PlainBackend(both, AppArgs(checkpoint=seq))
    rec, _ = asyncio.run(backend.recommend(RecommendRequest(user=user, k=5)))
    got = [i.item_id for i in rec.items]
    assert len(got) == 5 and not set(got) & set(ids[:6])
    # the ranker reranks the item-token retriever's shortlist with its own (text) context
    rank_ctx = both.context_ids(ids[:6], {"age": 30}, kind="ranker")
    assert rank_ctx == Predictor(PredictorConfig(ranker=str(tmp_path / "ranker"))).context_ids(ids[:6], {"age": 30})
    (rows, _), = both.recommend([both.context_ids(ids[:6], {"age": 30})], 5, [both.items.rows(ids[:6])], [rank_ctx])
    assert got == [ids[r] for r in rows]
    out, _ = asyncio.run(backend.score(ScoreRequest(user=user, texts=["a brand new film"])))
    assert len(out.scores) == 1  # with a ranker, free texts are scored


def test_a_predictor_loads_an_s3_checkpoint_with_its_catalogue(syn_data, tokenizer, tmp_path, monkeypatch):
    """Local S3 (moto on 127.0.0.1): the checkpoint and its items.parquet come from the copy."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    import pyarrow.fs

    ck = _save(syn_data, tokenizer, tmp_path / "seq")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
                           "RECSYS_RAY_CACHE": str(tmp_path / "cache")}.items():
            monkeypatch.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket="models")
        fs, _ = pyarrow.fs.FileSystem.from_uri("s3://models/seq")
        pyarrow.fs.copy_files(ck, "models/seq", source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)
        remote = Predictor(PredictorConfig(retriever="s3://models/seq"))
        local = Predictor(PredictorConfig(retriever=ck))
        assert remote.items.ids == local.items.ids
        ctx = local.context_ids(local.items.ids[:5])
        assert np.allclose(remote.retrieval_scores([ctx]), local.retrieval_scores([ctx]))
    finally:
        server.stop()
