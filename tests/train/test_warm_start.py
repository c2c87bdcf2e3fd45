"""Warm start on newer data (``init_from``) with a catalogue that grew and lost items: the first
model is trained on the log as it stood at a cutoff with the old catalogue; the refresh starts
from it on the whole log with the new catalogue (10 items removed, 20 added)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys_ray.config import build_config
from recsys_ray.data.catalogue import Catalogue
from recsys_ray.data.config import DataConfig
from recsys_ray.data.pipeline import prepare
from recsys_ray.errors import ConfigError
from recsys_ray.model.kinds import load_model
from recsys_ray.train.config import load_train_config
from recsys_ray.train.driver import fit, plan

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
WORDS = ["jazz", "chess", "sushi", "robots", "poetry", "opera", "yoga", "wine"]
CUTOFF = 1_000_000  # seconds; every event of items i60..i79 comes after it


def _items(path: Path, ids: range) -> str:
    path.write_text("item_id,title\n" + "".join(f"i{i},{WORDS[i % 8]} {WORDS[(i // 8) % 8]} item\n" for i in ids))
    return str(path)


@pytest.fixture(scope="module")
def windows(ray_session, tmp_path_factory) -> dict[str, str]:
    """Two prepared windows of one log: "before" (cutoff, items i0..i59) and "after" (the whole
    log, items i10..i79: the events of i0..i9 become unknown_item rejects)."""
    tmp = tmp_path_factory.mktemp("warm")
    rng = np.random.default_rng(0)
    rows = ["user_id,item_id,timestamp"]
    for u in range(96):
        early = rng.choice(60, size=8, replace=False)
        late = rng.choice(np.arange(10, 80), size=4, replace=False)
        rows += [f"u{u},i{i},{100 + 1000 * t}" for t, i in enumerate(early)]
        rows += [f"u{u},i{i},{CUTOFF + 1000 * t}" for t, i in enumerate(late)]
    (tmp / "log.csv").write_text("\n".join(rows) + "\n")
    out = {}
    for name, ids, extra in (("before", range(60), {"cutoff": str(CUTOFF)}), ("after", range(10, 80), {})):
        cfg = build_config(DataConfig, {"dataset": str(tmp / "log.csv"), "items": _items(tmp / f"{name}.csv", ids),
                                        "output": str(tmp / name), "max_history": 8, **extra})
        out[name] = str(tmp / name)
        out[f"{name}_manifest"] = prepare(cfg)
    return out


def _cfg(data: str, tmp: Path, name: str, **over):
    return load_train_config({
        "data": data,
        "model": {"kind": "retriever", "history": "items", "history_len": 8, "tiny": TINY, "dropout": 0.0,
                  "temperature": 0.1},
        "loss": "softmax", "negatives": 0, "batch_size": 8, "epochs": 1,
        "optim": {"lr": 0.003, "new_lr": 0.01, "warmup_ratio": 0.0},
        "num_workers": 1, "storage_path": str(tmp / "runs"), "name": name, "log_every": 5, **over,
    })


@pytest.fixture(scope="module")
def runs(windows, tmp_path_factory) -> dict:
    """The first model (the "before" window) and its refresh (the "after" window, from the first)."""
    tmp = tmp_path_factory.mktemp("warm_runs")
    first = fit(_cfg(windows["before"], tmp, "first"))
    cwd = os.getcwd()
    os.chdir(Path(first["run"]).parent)  # init_from relative to the driver's directory: the workers run elsewhere
    try:
        refresh = fit(_cfg(windows["after"], tmp, "refresh", init_from=Path(first["run"]).name))
    finally:
        os.chdir(cwd)
    return {"first": first, "refresh": refresh}


def test_a_refresh_starts_from_the_served_model_on_a_grown_catalogue(windows, runs):
    before, after = windows["before_manifest"]["counts"], windows["after_manifest"]["counts"]
    # every late event is left out of "before": after_cutoff, or unknown_item first for i60..i79
    assert set(before["rejects_by_reason"]) == {"after_cutoff", "unknown_item"}
    assert sum(before["rejects_by_reason"].values()) == 96 * 4
    assert after["rejects_by_reason"].get("unknown_item", 0) > 0 and "after_cutoff" not in after["rejects_by_reason"]

    first = runs["first"]
    old_path = Path(first["best_checkpoint"])
    old = load_model(old_path)
    old_items = Catalogue.load(old_path)
    assert old.num_items == len(old_items) == 60

    # what a warm start does to the item table, exactly: known rows kept, new rows from their text
    model = load_model(old_path)
    new_items = Catalogue.from_data_dir(windows["after"])
    counts = model.adopt_catalogue(old_items, new_items)
    assert counts == {"kept": 50, "new": 20, "dropped": 10}
    assert model.num_items == 70
    for row, iid in enumerate(new_items.ids):
        if iid in old_items.index:
            assert torch.equal(model.item_emb.weight[row], old.item_emb.weight[old_items.index[iid]]), iid
    new_rows = [r for r, iid in enumerate(new_items.ids) if iid not in old_items.index]
    text_init = model.initial_item_vectors([new_items.tokens[r] for r in new_rows])
    assert torch.allclose(model.item_emb.weight[new_rows], text_init)
    assert torch.equal(model.encoder.embeddings.word_embeddings.weight, old.encoder.embeddings.word_embeddings.weight)

    # the refresh: a run on the "after" window from the first run's directory (its best checkpoint)
    refresh = runs["refresh"]
    ckpt = Path(refresh["best_checkpoint"])
    state = json.loads((ckpt / "train_state.json").read_text())["progress"]
    assert state["warm_start"] == {"source": first["run"], "step": json.loads(
        (old_path / "recsys_ray.json").read_text())["extra"]["step"], "kept": 50, "new": 20, "dropped": 10}
    served = load_model(ckpt)
    assert served.num_items == 70 and Catalogue.load(ckpt).ids == new_items.ids
    assert json.loads((ckpt / "recsys_ray.json").read_text())["extra"]["warm_start"]["new"] == 20
    assert refresh["metrics"]["ndcg@10"] > 0


def test_a_bad_init_from_fails_before_training_with_the_reason(windows, checkpoints, tmp_path):
    with pytest.raises(ConfigError, match="init_from '/nope/run'"):
        plan(_cfg(windows["after"], tmp_path, "x", init_from="/nope/run"))
    # a text ranker checkpoint cannot warm-start an item-token retriever
    with pytest.raises(ConfigError, match="is a ranker/text checkpoint but the config trains a retriever/items"):
        plan(_cfg(windows["after"], tmp_path, "x", init_from=checkpoints["ranker"]))


def test_the_promotion_gate_promotes_only_a_winner_and_points_the_serving_config_at_it(windows, runs, tmp_path):
    """Both orders of the same two models on the same window: exactly one is promoted (the one
    with the higher NDCG@10), only its serving config changes (comments kept); a margin larger
    than the gap refuses even the winner. The current model is scored on the window's catalogue
    (the first model never saw i60..i79: their item tokens come from their text)."""
    from recsys_ray.evaluate.promote import PromoteSettings, promote

    first, refresh = runs["first"]["best_checkpoint"], runs["refresh"]["best_checkpoint"]
    text = f"# served model\napplications:\n  - name: recsys\n    args:\n      checkpoint: {first}  # the current one\n"

    def gate(candidate, current, name, margin=0.0):
        config = tmp_path / f"{name}.yaml"
        config.write_text(text)
        d = promote(PromoteSettings(candidate=candidate, current=current, data=windows["after"],
                                    decision=str(tmp_path / f"{name}.json"), serve_config=str(config),
                                    margin=margin, actors=1))
        assert json.loads((tmp_path / f"{name}.json").read_text()) == d
        return d, config.read_text()

    a, a_text = gate(refresh, None, "a")  # current = the serving config's checkpoint
    assert a["current"]["checkpoint"] == first
    b, b_text = gate(first, refresh, "b")
    assert a["candidate"]["ndcg@10"] == b["current"]["ndcg@10"] and a["current"]["ndcg@10"] == b["candidate"]["ndcg@10"]
    assert a["candidate"]["ndcg@10"] != a["current"]["ndcg@10"], a
    assert a["promoted"] != b["promoted"], (a, b)
    winner, loser = (a, b) if a["promoted"] else (b, a)
    assert winner["candidate"]["ndcg@10"] > winner["current"]["ndcg@10"]
    assert "candidate ndcg@10" in winner["reason"] and " > current " in winner["reason"]
    assert " <= current " in loser["reason"] and loser["serve_config"]["updated"] is False
    assert winner["serve_config"]["updated"] is True
    winner_text, loser_text = (a_text, b_text) if a["promoted"] else (b_text, a_text)
    assert loser_text == text  # a refused candidate changes nothing
    assert winner_text == text.replace(f"checkpoint: {first}", f'checkpoint: "{winner["candidate"]["checkpoint"]}"')
    assert "# the current one" in winner_text
    # a margin above the gap: even the winner stays out
    gap = winner["candidate"]["ndcg@10"] / max(winner["current"]["ndcg@10"], 1e-9) - 1
    held, held_text = gate(winner["candidate"]["checkpoint"], winner["current"]["checkpoint"], "held", margin=gap + 0.5)
    assert held["promoted"] is False and held_text == text


def test_the_promotion_gate_refuses_bad_input_before_scoring(windows, runs, tmp_path):
    from recsys_ray.evaluate.promote import PromoteSettings, promote

    ok = runs["first"]["best_checkpoint"]
    two = tmp_path / "two.yaml"
    two.write_text("applications:\n  - {name: a, args: {checkpoint: x}}\n  - {name: b, args: {checkpoint: x}}\n")
    with pytest.raises(ConfigError) as info:
        promote(PromoteSettings(candidate="/nope", current=ok, data=str(tmp_path), serve_config=str(two),
                                metric="auc", decision=str(tmp_path / "d.json")))
    msg = str(info.value)
    for part in ("--candidate /nope: not found", "not a prepared data directory", "--metric 'auc'",
                 "give --app, one of ['a', 'b']"):
        assert part in msg, msg
    assert not (tmp_path / "d.json").exists()
    with pytest.raises(ConfigError, match="give --current, or --serve-config"):
        promote(PromoteSettings(candidate=ok, current=None, data=windows["after"], decision=str(tmp_path / "d.json")))
