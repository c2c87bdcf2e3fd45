"""The item-token ranker (``model.kind: ranker``, ``history: items``): packed candidate tokens,
its start from a retriever, hard negatives, the two-stage validation, the Predictor, a real run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from recsys_ray.data.catalogue import Catalogue
from recsys_ray.data.layout import read_manifest, read_split_rows
from recsys_ray.errors import ConfigError, RecsysError
from recsys_ray.model.config import ModelConfig
from recsys_ray.model.kinds import config_problems, from_config, load_model, start_model
from recsys_ray.model.kinds.item_ranker import ItemTokenRanker, pack_candidates
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


@pytest.fixture(scope="module")
def items(syn_data) -> Catalogue:
    return Catalogue.from_data_dir(syn_data)


def _retriever(tokenizer, items, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(kind="retriever", history="items", tiny=TINY, temperature=0.1)
    return from_config(cfg, tokenizer, item_tokens=items.tokens)


def _save(model, data: str, path: Path) -> str:
    model.save(path, extra={"text": read_manifest(data)["text"]})
    Catalogue.from_data_dir(data).save(path / "items.parquet")
    return str(path)


def test_pack_candidates_lets_each_candidate_see_the_history_only():
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
    ids2, pos, vis, cols = pack_candidates(ids, torch.tensor([3, 4]), torch.tensor([[90, 91], [92, 93]]))
    assert ids2.tolist() == [[1, 2, 3, 90, 91, 0], [4, 5, 6, 7, 92, 93]]
    assert cols.tolist() == [[3, 4], [4, 5]]
    assert pos.tolist() == [[0, 1, 2, 3, 3, 0], [0, 1, 2, 3, 4, 4]]
    v = vis[0].int().tolist()
    assert v[1] == [1, 1, 0, 0, 0, 0]  # main: causal, no candidate
    assert v[3] == [1, 1, 1, 1, 0, 0] and v[4] == [1, 1, 1, 0, 1, 0]  # a candidate: the history and itself
    assert v[5] == [0, 0, 0, 0, 0, 1]  # padding: itself


def test_a_ranker_started_from_a_retriever_scores_as_it_and_each_candidate_as_the_next_item(tokenizer, items):
    ret = _retriever(tokenizer, items)
    ranker = ItemTokenRanker.from_retriever(ret, ModelConfig(kind="ranker", history="items", hard_pool=7))
    assert ranker.cfg.kind == "ranker" and ranker.cfg.hard_pool == 7 and ranker.cfg.temperature == 0.1
    sp = special_ids(tokenizer)
    off = ret.item_offset
    ctxs = [history_context([2000], [5, 9, 7], off, 50, sp), history_context(None, [3], off, 50, sp)]
    rows = [[4, 2, 8, 11], [1, 0, 6, 2]]
    flat_ctx = [c for c, rs in zip(ctxs, rows, strict=True) for _ in rs]
    cands = ranker.candidate_ids([r for rs in rows for r in rs], items)
    got = ranker.score_pairs(flat_ctx, cands, sp, "cpu", 16, 0)
    b = build_sequence_batch(ctxs, sp)
    with torch.no_grad():
        want = ret.score(ret.encode(b["input_ids"], b["attention_mask"]), ret.item_vectors())
        want = np.concatenate([want[j, rows[j]].numpy() for j in range(2)])
        assert np.allclose(got, want, atol=1e-5)  # the residual head starts at zero
        # a candidate token reads what the same item appended as the next history item would
        torch.nn.init.normal_(ranker.rank_head.weight)
        ids2, pos, vis, cols = pack_candidates(b["input_ids"], b["attention_mask"].sum(1), torch.tensor(rows) + off)
        h_packed = ranker.hidden_states(ids2, None, pos, vis)
        for j, ctx in enumerate(ctxs):
            for c, r in enumerate(rows[j]):
                one = build_sequence_batch([[*ctx, off + r]], sp)
                h_one = ranker.hidden_states(one["input_ids"], one["attention_mask"])[0, -1]
                assert torch.allclose(h_packed[j, cols[j, c]], h_one, atol=1e-4)
        moved = ranker.score_pairs(flat_ctx, cands, sp, "cpu", 16, 0)
        assert not np.allclose(moved, got)
    with pytest.raises(RecsysError, match="not texts"):
        ranker.score_pairs([ctxs[0]], [[2000, 2001]], sp, "cpu", 16, 0)


def test_config_rules_of_the_items_ranker():
    assert not config_problems(ModelConfig(kind="ranker", history="items"))
    assert any("hard_pool" in p for p in config_problems(ModelConfig(kind="ranker", history="items", hard_pool=-1)))
    base = {"model": {"kind": "ranker", "history": "items"}, "loss": "softmax"}
    with pytest.raises(ConfigError, match="negatives >= 1 hard negatives"):
        load_train_config({**base, "negatives": 0})
    with pytest.raises(ConfigError, match=r"must be <= model.hard_pool \(50\)"):
        load_train_config({**base, "negatives": 60})


def test_hard_negatives_come_from_the_retrieval_top_and_never_from_the_history(syn_data, tokenizer, items):
    ranker = ItemTokenRanker.from_retriever(_retriever(tokenizer, items),
                                            ModelConfig(kind="ranker", history="items", hard_pool=10)).train()
    seqs = pads.dataset(f"{syn_data}/sequences").to_table().slice(0, 16).to_pylist()
    collate = SequenceCollator(items, special_ids(tokenizer), ranker.item_offset, 8, 6, tokenizer, 0, sampled=False,
                               with_history=True)
    batch = collate(seqs)
    last = batch["last_item"]
    assert torch.equal(last, batch["targets"][torch.arange(16), batch["attention_mask"].sum(1) - 1])
    negs = ranker._negatives(batch, last, 6)
    ranker.eval()
    with torch.no_grad():
        scores = ranker.score(ranker.encode(batch["input_ids"], batch["attention_mask"]), ranker.item_vectors())
    for i in range(16):
        hist = set(batch["history"][i][batch["history"][i] >= 0].tolist())
        seq = [items.index[x] for x in seqs[i]["item_ids"][: seqs[i]["n_train"]]]
        assert hist == set(seq[: len(hist)]) and last[i].item() == seq[len(hist)]
        assert len(set(negs[i].tolist())) == 6 and not (set(negs[i].tolist()) & (hist | {last[i].item()}))
        allowed = scores[i].clone()
        allowed[list(hist | {last[i].item()})] = float("-inf")
        assert set(negs[i].tolist()) <= set(allowed.topk(10).indices.tolist())
    ranker.cfg.hard_share = 0.5  # 3 from the top 10, 3 uniform; none twice
    for _ in range(5):
        negs = ranker._negatives(batch, last, 6)
        for i in range(16):
            hist = set(batch["history"][i][batch["history"][i] >= 0].tolist())
            allowed = scores[i].clone()
            allowed[list(hist | {last[i].item()})] = float("-inf")
            assert set(negs[i, :3].tolist()) <= set(allowed.topk(10).indices.tolist())
            assert len(set(negs[i].tolist())) == 6 and not (set(negs[i].tolist()) & (hist | {last[i].item()}))
    ranker.cfg.hard_pool = 0  # uniform: anything but the history and the target
    negs = ranker._negatives(batch, last, 6)
    assert all(not (set(negs[i].tolist()) & (set(batch["history"][i].tolist()) | {last[i].item()})) for i in range(16))


def test_holdout_last_keeps_the_last_events_out_of_the_retriever_and_makes_them_the_rankers_lists(syn_data, tokenizer, items):
    seqs = pads.dataset(f"{syn_data}/sequences").to_table().slice(0, 32).to_pylist()
    sp, off = special_ids(tokenizer), tokenizer.vocab_size
    for lists in (False, True):
        collate = SequenceCollator(items, sp, off, 4, 3, tokenizer, 0, sampled=False, with_history=True, holdout_last=2,
                                   lists_on_holdout=lists)
        for _ in range(4):
            b = collate(seqs)
            for i, r in enumerate(seqs):
                seq = [items.index[x] for x in r["item_ids"][: r["n_train"]]]
                kept = max(1, len(seq) - 2)
                hist = b["history"][i][b["history"][i] >= 0].tolist()
                assert hist == seq[: len(hist)] and b["last_item"][i].item() == seq[len(hist)]
                # the retriever's windows end inside the kept events; the ranker's at a held-out one
                assert (len(hist) >= kept) == (lists and kept < len(seq))
                # a next-item target is never a held-out event: each is the event after its input item
                ids, tgt = b["input_ids"][i].tolist(), b["targets"][i].tolist()
                cols = [j for j, t in enumerate(ids) if t >= off]  # the window's input items, in order
                start = len(hist) - len(cols)  # seq index of the first of them
                for m, j in enumerate(cols):
                    if tgt[j] >= 0:  # the target after window item m is event start + m + 1, a kept one
                        assert start + m + 1 < kept and tgt[j] == seq[start + m + 1]
                assert sum(t >= 0 for t in tgt) >= (0 if lists else 1)
    ret = _retriever(tokenizer, items)
    with pytest.raises(RecsysError, match="the retriever was trained with holdout_last 0"):
        ItemTokenRanker.from_retriever(ret, ModelConfig(kind="ranker", history="items", holdout_last=3))


@pytest.mark.parametrize("retrieval_weight", [0.0, 0.5])
def test_the_list_loss_falls_on_a_fixed_batch_and_the_base_stays_frozen(syn_data, tokenizer, items, retrieval_weight):
    ranker = ItemTokenRanker.from_retriever(
        _retriever(tokenizer, items),
        ModelConfig(kind="ranker", history="items", hard_pool=20, retrieval_weight=retrieval_weight)).train()
    assert not any(p.requires_grad for p in ranker.base.parameters()) and not ranker.base.training
    assert ranker.head.weight.requires_grad == bool(retrieval_weight)
    base_before = {k: v.clone() for k, v in ranker.base.state_dict().items()}
    seqs = pads.dataset(f"{syn_data}/sequences").to_table().slice(0, 16).to_pylist()
    batch = SequenceCollator(items, special_ids(tokenizer), ranker.item_offset, 8, 5, tokenizer, 0, sampled=False,
                             with_history=True)(seqs)
    step = ScoreStep(ranker)
    opt = torch.optim.AdamW([p for p in ranker.parameters() if p.requires_grad], lr=3e-3)
    seen = []
    torch.manual_seed(0)
    for _ in range(25):
        scores, retrieval = step(batch)
        assert scores.shape == (16, 6)
        if retrieval_weight:
            assert retrieval.shape == (int((batch["targets"] >= 0).sum()), len(items))
        else:
            assert retrieval is None
        loss = ranker.train_loss("softmax", scores, retrieval, batch)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in ranker.parameters() if p.requires_grad)  # what DDP needs
        opt.step()
        seen.append(float(loss.detach()))
    assert seen[-1] < 0.8 * seen[0], seen
    assert ranker.rank_head.weight.abs().sum() > 0
    assert all(torch.equal(v, base_before[k]) for k, v in ranker.base.state_dict().items())


def test_warm_started_ranker_run_validates_two_stage_and_serves_in_a_predictor(ray_session, syn_data, tokenizer, tmp_path):
    from recsys_ray.evaluate.evaluate import EvalSettings, metrics_of, rank_split

    ret_ck = _save(_retriever(tokenizer, Catalogue.from_data_dir(syn_data)), syn_data, tmp_path / "ret")
    with pytest.raises(RecsysError, match="only an item-token retriever can start another kind"):
        start_model(ret_ck, ModelConfig(kind="ranker", history="text"))
    cfg = load_train_config({
        "data": syn_data, "init_from": ret_ck,
        "model": {"kind": "ranker", "history": "items", "hard_pool": 10},
        "loss": "softmax", "negatives": 5, "batch_size": 8, "epochs": 2, "max_steps_per_epoch": 6,
        "optim": {"lr": 0.003, "new_lr": 0.01, "warmup_ratio": 0.0},
        "num_workers": 2, "storage_path": str(tmp_path / "runs"), "name": "rk", "log_every": 5,
    })
    res = fit(cfg)
    ck = Path(res["best_checkpoint"])
    ranker = load_model(ck, expect="ranker")
    assert isinstance(ranker, ItemTokenRanker) and ranker.cfg.hard_pool == 10 and ranker.cfg.temperature == 0.1
    items = Catalogue.from_data_dir(syn_data)
    rows = read_split_rows(syn_data, "valid")
    again = validate(ranker, rows, items, special_ids(tokenizer), torch.device("cpu"), cfg.eval_settings())
    assert again["ndcg@10"] == pytest.approx(res["metrics"]["ndcg@10"], abs=1e-6)
    # two-stage in the evaluation path: the retriever's top 10 rescored by the ranker
    ranks = rank_split(EvalSettings(data=syn_data, batch_size=32, actors=1, betas=(0.0,), rerank_top=10), "valid",
                       ret_ck, str(ck), 0.0)
    assert 0 < metrics_of(ranks["rank_two_stage"])["hr@50"] <= 1
    p = Predictor(PredictorConfig(retriever=ret_ck, ranker=str(ck), rerank_top=10))
    ctx = p.context_ids(p.items.ids[:4])
    (top, scores), = p.recommend([ctx], k=5, exclude=[p.items.rows(p.items.ids[:4])])
    assert len(top) == 5 and np.all(np.diff(scores) <= 1e-6)
    assert np.allclose(p.score(ctx, p.candidate_ids(top.tolist())), scores, atol=1e-4)
