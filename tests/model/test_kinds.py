"""The model-kind registry: every registered kind fulfils the whole contract the shared training
loop, validation, the Predictor and Serve call, and configs / checkpoints find their kind."""

from __future__ import annotations

import math

import pytest
import torch

from recsys_ray.data import layout
from recsys_ray.data.catalogue import Catalogue
from recsys_ray.errors import RecsysError
from recsys_ray.model.base import InputSettings, TrainSettings, ValidationSettings
from recsys_ray.model.config import ModelConfig
from recsys_ray.model.kinds import (
    KINDS,
    config_problems,
    from_config,
    kind_class,
    load_model,
    model_kind_problem,
)
from recsys_ray.model.tokenizer import special_ids

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def test_every_kind_is_registered_under_its_own_config_pair():
    assert set(KINDS) == {("ranker", "text"), ("retriever", "text"), ("retriever", "items"), ("ranker", "items")}
    for (kind, history), cls in KINDS.items():
        assert (cls.kind, cls.history) == (kind, history)
        assert kind_class(ModelConfig(kind=kind, history=history)) is cls
    assert model_kind_problem(ModelConfig(kind="ranker", history="items")) is None
    assert "model.kind must be one of" in model_kind_problem(ModelConfig(kind="tower"))
    assert config_problems(ModelConfig(kind="ranker", history="rows", temperature=0))[0].startswith("model.history")


@pytest.mark.parametrize("pair", sorted(KINDS), ids=lambda p: "/".join(p))
def test_each_kind_trains_validates_and_builds_predictor_inputs(syn_data, tokenizer, pair, tmp_path):
    kind, history = pair
    cls = KINDS[pair]
    catalogue = Catalogue.from_data_dir(syn_data)
    torch.manual_seed(0)
    model = from_config(ModelConfig(kind=kind, history=history, tiny=TINY, dropout=0.0, temperature=0.1),
                        tokenizer, item_tokens=catalogue.tokens)
    assert isinstance(model, cls)
    special = special_ids(tokenizer)
    manifest = layout.read_manifest(syn_data)
    n_rows, what = cls.train_rows(manifest)
    assert n_rows > 0 and what
    assert cls.data_problem(syn_data) is None
    # one training step from the part it trains from, through its own score step and loss form
    rows = layout.read_table(syn_data, cls.train_part, cls.train_columns(syn_data)).slice(0, 16).to_pylist()
    collate = model.collator(catalogue, special, TrainSettings(loss="softmax", negatives=2, max_context_tokens=0, seed=0),
                             tokenizer, rank=0)
    batch = collate(rows)
    assert int(batch["tokens"]) > 0
    model.train()
    scores, extra = model.train_scores(batch)
    loss = model.train_loss("softmax", scores, extra, batch)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and any(p.grad is not None for p in model.parameters())
    model.eval()
    # validation by the kind's own protocol
    valid = layout.read_split_rows(syn_data, "valid")[:12]
    ranks, protocol = model.validation_ranks(valid, catalogue, special, torch.device("cpu"),
                                             ValidationSettings(batch_size=8, ranker_candidates=10, seed=0, max_context_tokens=0))
    assert len(ranks) == 12 and all(0 <= r < len(catalogue) for r in ranks)
    assert protocol == {"retriever": "full", "ranker": "sampled_1+9" if history == "text" else "two_stage_top50"}[kind]
    # predictor-side inputs: a user's history as logged, catalogue candidates
    inputs = InputSettings(tokenizer=tokenizer, max_history=5, profile_columns=[], max_context_tokens=64)
    ctx = model.context_ids([3, 1, 4], None, catalogue, inputs)
    assert ctx and all(isinstance(t, int) for t in ctx)
    assert len(model.candidate_ids([0, 1], catalogue)) == 2
    assert model.catalogue_problem(catalogue) is None
    # the checkpoint comes back as the same kind, with the same weights
    model.save(tmp_path / "ck")
    again = load_model(tmp_path / "ck")
    assert type(again) is cls
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values(), strict=True))
    with pytest.raises(RecsysError, match="expected a"):
        load_model(tmp_path / "ck", expect="ranker" if kind == "retriever" else "retriever")
