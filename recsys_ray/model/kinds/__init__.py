"""The registry of model kinds: which class a config or a checkpoint means.

A kind is one module here with one class implementing :class:`recsys_ray.model.base.BertRecommender`
(its head, batches, score step, loss forms, validation and predictor-side inputs); it is named by
the ``(model.kind, model.history)`` pair of :class:`~recsys_ray.model.config.ModelConfig`.
Training, evaluation, the Predictor and Serve reach a kind only through this module.

Adding a kind: write ``kinds/<name>.py`` with the class, then add it to :data:`KINDS`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from recsys_ray import checkpoint
from recsys_ray.config import value_problems
from recsys_ray.errors import ConfigError, RecsysError
from recsys_ray.model.base import BertRecommender, kind_problem
from recsys_ray.model.config import ModelConfig
from recsys_ray.model.kinds.item_ranker import ItemTokenRanker
from recsys_ray.model.kinds.item_retriever import ItemTokenRetriever
from recsys_ray.model.kinds.text_ranker import TextRanker
from recsys_ray.model.kinds.text_retriever import TextRetriever

KINDS: dict[tuple[str, str], type[BertRecommender]] = {
    (cls.kind, cls.history): cls for cls in (TextRanker, TextRetriever, ItemTokenRetriever, ItemTokenRanker)
}


def model_kind_problem(cfg: ModelConfig) -> str | None:
    """Why no registered kind reads ``cfg`` (its kind x history pair), or None."""
    return kind_problem(cfg, KINDS)


def config_problems(cfg: ModelConfig) -> list[str]:
    """Every problem of a model config (whether a kind reads it, then its fields), one line each."""
    problem = model_kind_problem(cfg)
    return ([problem] if problem else []) + value_problems(cfg, "model.")


def kind_class(cfg: ModelConfig) -> type[BertRecommender]:
    """The class of the kind ``cfg`` names (ConfigError listing every problem of ``cfg``)."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return KINDS[(cfg.kind, cfg.history)]


def from_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None,
                item_tokens: Sequence[Sequence[int]] | None = None) -> BertRecommender:
    """A new model of the kind ``cfg`` names (see :meth:`BertRecommender.from_config`)."""
    return kind_class(cfg).from_config(cfg, tokenizer, item_tokens)


def checkpoint_config(path: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """(ModelConfig, recsys_ray.json) of a checkpoint directory, checked."""
    path = Path(path)
    meta = checkpoint.read_meta(path)
    data = meta.get("model_config")
    where = path / checkpoint.META_FILE
    if not isinstance(data, dict):
        raise RecsysError(f"{where}: model_config missing")
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise RecsysError(f"{where}: unknown model_config keys {unknown} (newer recsys_ray?)")
    cfg = ModelConfig(**data)
    problems = config_problems(cfg)
    if problems:
        raise RecsysError(f"{where}: invalid model_config ({'; '.join(problems)})")
    return cfg, meta


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu",
               expect: str | None = None) -> BertRecommender:
    """The model of a local checkpoint directory, of the kind its recsys_ray.json names.

    ``expect`` (``"ranker"`` / ``"retriever"``) refuses a checkpoint with another role. Needs
    nothing but that directory (:func:`recsys_ray.checkpoint.resolve` makes one of a run folder
    or an ``s3://`` URI).
    """
    path = Path(path)
    checkpoint.require_files(path)
    cfg, meta = checkpoint_config(path)
    if expect is not None and cfg.kind != expect:
        raise RecsysError(f"{path}: is a {cfg.kind} checkpoint, expected a {expect}")
    return KINDS[(cfg.kind, cfg.history)].from_checkpoint(path, cfg, meta, map_location)


def start_model(path: str | os.PathLike, cfg: ModelConfig) -> BertRecommender:
    """The model a warm start (``init_from``) of a ``cfg`` run begins with: the checkpoint's own
    model when it is of ``cfg``'s kind and history, an items ranker made of an item-token retriever
    (:meth:`ItemTokenRanker.from_retriever`); RecsysError for any other pair."""
    model = load_model(path)
    have, want = (model.cfg.kind, model.cfg.history), (cfg.kind, cfg.history)
    if have == want:
        return model
    if want == ("ranker", "items") and have == ("retriever", "items"):
        return ItemTokenRanker.from_retriever(model, cfg)
    raise RecsysError(f"is a {'/'.join(have)} checkpoint but the config trains a {'/'.join(want)} model "
                      "(only an item-token retriever can start another kind: an items ranker)")
