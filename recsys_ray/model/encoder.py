"""The pretrained BERT under every model kind: loading it (pretrained or a tiny random one) and
which of its weights train (freeze strategies, LoRA). Encoder names and the tokenizer:
:mod:`recsys_ray.model.tokenizer`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertModel, PreTrainedTokenizerBase

from recsys_ray.checkpoint import META_FILE
from recsys_ray.errors import ConfigError, RecsysError, one_line
from recsys_ray.model.config import parse_freeze
from recsys_ray.model.tokenizer import resolve_encoder_path

log = logging.getLogger(__name__)

LORA_TARGETS = ("query", "key", "value")  # attention projections of every BertSelfAttention



# ---------------------------------------------------------------------------------------------
# the encoder


def load_bert(encoder: str, tiny: dict | None, tokenizer: PreTrainedTokenizerBase, **options) -> BertModel:
    """Pretrained ``BertModel`` for ``encoder``, or a random one shaped by ``tiny``.

    ``options`` are BertConfig overrides a model kind needs (``is_decoder`` for a causal reader).
    No pooler: the kinds read the CLS vector or pool the tokens themselves, and an unused pooler
    would hold trainable parameters without gradients (DDP then needs find_unused_parameters).
    """
    if tiny is not None:
        bert_config = BertConfig(**tiny, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **options)
        return BertModel(bert_config, add_pooling_layer=False)
    path = resolve_encoder_path(encoder)
    if (Path(path) / META_FILE).is_file():
        raise RecsysError(
            f"encoder {encoder!r} is a recsys_ray checkpoint, not a BERT folder; "
            "load it with recsys_ray.model.kinds.load_model"
        )
    try:
        bert, info = BertModel.from_pretrained(
            path, add_pooling_layer=False, dtype=torch.float32, output_loading_info=True, **options
        )
    except (OSError, ValueError) as exc:
        raise RecsysError(f"cannot load encoder {encoder!r}: {one_line(exc)}") from None
    if info["missing_keys"]:
        # from_pretrained would silently start these from random values
        missing = sorted(info["missing_keys"])
        raise RecsysError(f"encoder {encoder!r}: weights missing for {len(missing)} tensors, e.g. {missing[0]}")
    if len(tokenizer) > bert.config.vocab_size:
        raise RecsysError(
            f"encoder {encoder!r}: tokenizer has {len(tokenizer)} tokens, embeddings only {bert.config.vocab_size}"
        )
    return bert


# ---------------------------------------------------------------------------------------------
# freeze strategies


def apply_freeze(model: nn.Module, spec: str) -> dict:
    """Set which parameters of a recommender train; returns ``{"trainable", "total", "spec"}``.

    ``none`` everything; ``embeddings`` all but the embedding layer; ``bottom:K`` all but the
    embeddings and the lowest K layers; ``encoder`` the head (and a kind's own tables) only;
    ``lora:R`` LoRA adapters of rank R on query/key/value (injected here, base weights frozen)
    plus the head. Parameters outside ``model.encoder`` (heads, item tokens) always train.
    """
    kind, k = parse_freeze(spec)
    layers = model.encoder.encoder.layer
    if kind == "bottom" and k > len(layers):
        raise ConfigError([f"model.freeze {spec!r}: the encoder has only {len(layers)} layers"])
    if model.lora_rank is not None and (kind != "lora" or k != model.lora_rank):
        raise ConfigError([f"model.freeze {spec!r}: the model already carries LoRA adapters of rank {model.lora_rank}"])
    if kind == "lora" and model.lora_rank is None:
        inject_lora(model, k)

    model.requires_grad_(True)
    enc = model.encoder
    if kind == "embeddings":
        enc.embeddings.requires_grad_(False)
    elif kind == "bottom":
        enc.embeddings.requires_grad_(False)
        for layer in layers[:k]:
            layer.requires_grad_(False)
    elif kind == "encoder":
        enc.requires_grad_(False)
    elif kind == "lora":
        for name, p in enc.named_parameters():
            p.requires_grad_("lora_" in name)
    # keep the config in step: save() records it and from_checkpoint() rebuilds adapters from it
    model.cfg = dataclasses.replace(model.cfg, freeze=spec)
    return {"trainable": model.trainable_parameters(), "total": model.total_parameters(), "spec": spec}


def inject_lora(model: nn.Module, rank: int) -> None:
    """Replace query/key/value Linears in place with PEFT LoRA layers (the encoder stays a BertModel)."""
    from peft import LoraConfig, inject_adapter_in_model  # slow import, only needed for lora:R

    lora = LoraConfig(r=rank, lora_alpha=model.cfg.lora_alpha, lora_dropout=model.cfg.lora_dropout,
                      target_modules=list(LORA_TARGETS), bias="none")
    model.encoder = inject_adapter_in_model(lora, model.encoder)
    model.lora_rank = rank
