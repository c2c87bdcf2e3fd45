"""Fine-tuning on Ray Train (V2): ``train_loop_per_worker`` and the driver that builds the
``TorchTrainer``. Tune wraps :func:`build_trainer` / :func:`fit`, never a copy of them.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` examples per worker. Every
rank runs exactly ``steps_per_epoch`` steps per epoch (derived from the train split's size), so
no rank runs short and DDP never waits on a missing all-reduce. Validation (NDCG@10, HR@10, MRR on
the validation split) runs at the end of every epoch, then rank 0 writes a checkpoint and all
ranks call ``ray.train.report`` with the same metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch
from torch import nn

from recsys_ray import losses
from recsys_ray.config import build_config, to_dict
from recsys_ray.errors import ConfigError, DataError, RecsysError
from recsys_ray.metrics import MetricAccumulator, sample_unseen, sampled_ranks, target_ranks
from recsys_ray.model import (
    BertRecommender,
    ModelConfig,
    build_pair_batch,
    build_sequence_batch,
    build_single_batch,
    build_user_batch,
    encode_batched,
    history_context,
    load_tokenizer,
    special_ids,
)

log = logging.getLogger(__name__)

METRIC = "ndcg@10"  # the checkpoint and Tune score


@dataclasses.dataclass
class OptimConfig:
    """AdamW with linear warmup and linear decay."""

    lr: float = 5e-5  # peak learning rate
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    warmup_ratio: float = 0.1  # fraction of all steps spent warming up
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    grad_accum: int = 1  # micro-batches per optimizer step
    new_lr: float = 0.0  # peak lr of the parameters that are not pretrained (head, item embeddings); 0 = lr

    def problems(self) -> list[str]:
        out = []
        if not self.lr > 0:
            out.append(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            out.append(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            out.append(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.grad_clip < 0:
            out.append(f"optim.grad_clip must be >= 0, got {self.grad_clip}")
        if self.new_lr < 0:
            out.append(f"optim.new_lr must be >= 0, got {self.new_lr}")
        if self.grad_accum < 1:
            out.append(f"optim.grad_accum must be >= 1, got {self.grad_accum}")
        return out


@dataclasses.dataclass
class EvalConfig:
    """End-of-epoch validation."""

    max_users: int = 0  # validate on the first N validation users (0 = all)
    ranker_candidates: int = 100  # ranker: 1 positive + (N - 1) sampled unseen items (labelled "sampled")
    batch_size: int = 64  # contexts (retriever) or pairs (ranker) per forward pass
    seed: int = 0  # seed of the ranker's sampled candidate lists

    def problems(self) -> list[str]:
        out = []
        if self.max_users < 0:
            out.append(f"eval.max_users must be >= 0, got {self.max_users}")
        if self.ranker_candidates < 2:
            out.append(f"eval.ranker_candidates must be >= 2, got {self.ranker_candidates}")
        if self.batch_size < 1:
            out.append(f"eval.batch_size must be >= 1, got {self.batch_size}")
        return out


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs; presets in configs/*.yaml carry the same fields."""

    data: str = "artifacts/ml-100k"  # prepared data directory (jobs/prepare_data.py output)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: Literal["bce", "softmax", "bpr", "lambdarank"] = "softmax"  # retriever + softmax = in-batch negatives too
    negatives: int = 4  # negatives per positive used from the prepared examples (<= prepared)
    batch_size: int = 16  # examples per worker per micro-batch
    epochs: int = 1  # passes (of steps_per_epoch steps) over the train split
    max_steps_per_epoch: int = 0  # cap on steps per epoch (0 = the whole split)
    max_context_tokens: int = 0  # cut contexts further at batch time (0 = as prepared)
    bucket_batches: int = 8  # length bucketing: sort this many batches' rows by length, then batch
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    num_workers: int = 2  # Ray Train workers (DDP ranks)
    use_gpu: bool = False  # one GPU per worker; bf16 autocast on GPU only
    resources_per_worker: dict = dataclasses.field(default_factory=dict)  # e.g. {"CPU": 1}
    storage_path: str = "artifacts/runs"  # run storage: local path or s3:// URI
    name: str = "train"  # run name under storage_path (same name = resume)
    keep_checkpoints: int = 2  # best K checkpoints by validation ndcg@10
    checkpoint_every_steps: int = 0  # extra mid-epoch checkpoints (0 = end of epoch only)
    max_failures: int = 0  # worker failures tolerated (restarts from the latest checkpoint)
    log_every: int = 10  # rank 0 prints a progress line every N steps
    seed: int = 0  # model init, data order, dropout
    torch_threads: int = 0  # intra-op threads per worker (0 = CPUs per worker)
    fail_at_step: int = 0  # fault-injection for tests: rank 0 raises once at this step of a fresh run

    def problems(self) -> list[str]:
        out = []
        for name in ("batch_size", "epochs", "num_workers", "keep_checkpoints", "log_every", "bucket_batches"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("negatives", "max_steps_per_epoch", "max_context_tokens", "checkpoint_every_steps",
                     "max_failures", "torch_threads", "fail_at_step"):
            if getattr(self, name) < 0:
                out.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.loss != "softmax" and self.negatives < 1:
            out.append(f"loss {self.loss!r} needs negatives >= 1")
        if not self.storage_path:
            out.append("storage_path must not be empty")
        if not self.name or "/" in self.name:
            out.append(f"name must be a non-empty folder name, got {self.name!r}")
        return out


def load_train_config(data: dict | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Validate a training config (dict + ``--set`` overrides); every problem in one ConfigError."""
    return build_config(TrainConfig, data, overrides)


# ---------------------------------------------------------------------------------------------
# data: prepared examples -> model inputs


def read_manifest(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{data_dir}: no manifest.json (prepare the data with jobs/prepare_data.py first)")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None


def check_data_matches_model(manifest: dict, tokenizer, data_dir: str) -> None:
    """Refuse data tokenized with another vocabulary than the model's."""
    from recsys_ray.data.tokenize import vocab_digest

    want = manifest.get("tokenizer", {}).get("vocab_sha256")
    have = vocab_digest(tokenizer)
    if want != have:
        raise DataError(
            f"{data_dir} was tokenized with {manifest.get('tokenizer', {}).get('name')!r} "
            f"(vocab {str(want)[:12]}), but the model's tokenizer has vocab {have[:12]}: "
            "prepare the data again with --set tokenizer=<the model's encoder>"
        )


class ItemTable:
    """The catalogue: id <-> row index and each item's token ids (what candidates are built from)."""

    def __init__(self, items: pa.Table):
        self.ids: list[str] = items["item_id"].to_pylist()
        self.index = {iid: i for i, iid in enumerate(self.ids)}
        self.tokens: list[list[int]] = items["input_ids"].to_pylist()

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_data_dir(cls, data_dir: str) -> ItemTable:
        path = f"{str(data_dir).rstrip('/')}/items"
        return cls(pads.dataset(path, format="parquet").to_table(columns=["item_id", "input_ids"]))


def length_buckets(rows: list[dict], batch_size: int, rng: random.Random, key: str = "context_ids") -> list[list[dict]]:
    """Split a chunk of rows into batches of similar length (less padding), in random order."""
    rows = sorted(rows, key=lambda r: len(r[key]))
    batches = [rows[i : i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


class Collator:
    """Examples -> padded tensors for one micro-batch (dynamic padding, nothing stored padded)."""

    def __init__(self, items: ItemTable, special: tuple[int, int, int], kind: str, negatives: int,
                 max_context_tokens: int, seed: int):
        self.items, self.special, self.kind, self.k = items, special, kind, negatives
        self.max_ctx = max_context_tokens
        self.rng = np.random.default_rng(seed)

    def _candidates(self, row: dict) -> list[int]:
        pos = self.items.index[row["target_item_id"]]
        negs = [self.items.index[n] for n in row["negative_item_ids"][: self.k]]
        while len(negs) < self.k:  # tiny catalogues: too few unseen items were left to sample
            c = int(self.rng.integers(len(self.items)))
            if c != pos:
                negs.append(c)
        return [pos, *negs]

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ctx = [list(r["context_ids"])[: self.max_ctx] if self.max_ctx else list(r["context_ids"]) for r in rows]
        cands = [self._candidates(r) for r in rows]  # (B, 1 + K) catalogue rows
        out: dict[str, torch.Tensor] = {"candidates": torch.tensor(cands, dtype=torch.long)}
        if self.kind == "ranker":
            pairs = build_pair_batch(
                [c for c, cs in zip(ctx, cands, strict=True) for _ in cs],
                [self.items.tokens[i] for cs in cands for i in cs],
                self.special,
            )
            out.update({f"pair_{k}": v for k, v in pairs.items()})
        else:
            users = build_single_batch(ctx, self.special)
            flat = [i for cs in cands for i in cs]
            items = build_single_batch([self.items.tokens[i] for i in flat], self.special)
            out.update({f"user_{k}": v for k, v in users.items()})
            out.update({f"item_{k}": v for k, v in items.items()})
        # non-padding tokens the encoder actually processes (a ranker encodes the context per pair)
        if self.kind == "ranker":
            n_tokens = sum((len(c) + 3) * len(cs) + sum(len(self.items.tokens[i]) for i in cs) for c, cs in zip(ctx, cands, strict=True))
        else:
            n_tokens = sum(len(c) + 2 for c in ctx) + sum(len(self.items.tokens[i]) + 2 for cs in cands for i in cs)
        out["tokens"] = torch.tensor(n_tokens)
        return out


class SequenceCollator:
    """history="items": user sequences -> causal next-item rows for one micro-batch.

    A row is one user's train events (the first ``n_train`` of ``item_ids``). Each draw cuts a
    window of up to ``history_len + 1`` events ending at ``e = min(n_train, U[1, n_train +
    history_len])``, which makes every train event equally likely to be a target. Input =
    ``[CLS] profile [SEP] w_0 .. w_{n-2}``; the target at ``w_j``'s position is ``w_{j+1}``, and
    at ``[SEP]`` it is ``w_0`` when the window starts at the user's first event. For the sampled
    losses every target gets ``negatives`` uniform catalogue items other than itself.
    """

    def __init__(self, items: ItemTable, special: tuple[int, int, int], item_offset: int, history_len: int,
                 negatives: int, tokenizer, seed: int):
        self.items, self.special, self.offset, self.L = items, special, item_offset, history_len
        self.k, self.tok = negatives, tokenizer
        self.rng = np.random.default_rng(seed)
        self._profiles: dict[str, list[int]] = {}

    def _profile(self, row: dict) -> list[int]:
        text = row.get("profile_text") or ""
        if not text:
            return []
        if row["user_id"] not in self._profiles:
            from recsys_ray.data.tokenize import encode_texts

            self._profiles[row["user_id"]] = encode_texts(self.tok, [text])[0]
        return self._profiles[row["user_id"]]

    def __call__(self, rows: list[dict], sampled: bool) -> dict[str, torch.Tensor]:
        contexts, targets = [], []
        for r in rows:
            seq = [self.items.index[i] for i in list(r["item_ids"])[: int(r["n_train"])]]  # n_train >= 1
            end = min(len(seq), int(self.rng.integers(1, len(seq) + self.L + 1)))
            start = max(0, end - (self.L + 1))
            window = seq[start:end]
            ctx = history_context(self._profile(r), window[:-1], self.offset, self.L, self.special)
            n_prefix = len(ctx) - (len(window) - 1)  # profile + [SEP]; [CLS] shifts everything by 1
            t = [-100] * (len(ctx) + 1)
            if start == 0:
                t[n_prefix] = window[0]  # at [SEP]: the first event from the profile alone
            for j in range(1, len(window)):
                t[n_prefix + j] = window[j]
            contexts.append(ctx)
            targets.append(t)
        b = build_sequence_batch(contexts, self.special)
        tgt = torch.full(b["input_ids"].shape, -100, dtype=torch.long)  # (B, L)
        for i, t in enumerate(targets):
            tgt[i, : len(t)] = torch.as_tensor(t)
        out = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "targets": tgt}
        if sampled:
            pos = tgt[tgt >= 0]  # (M,) in the order ScoreStep selects them
            negs = torch.as_tensor(self.rng.integers(0, len(self.items), size=(len(pos), self.k)))
            clash = negs == pos[:, None]
            negs[clash] = (negs[clash] + 1) % len(self.items)  # never the target itself
            out["candidates"] = torch.cat([pos[:, None], negs], dim=1)  # (M, 1 + K)
        out["tokens"] = torch.tensor(int(b["attention_mask"].sum()))
        return out


class ScoreStep(nn.Module):
    """What DDP wraps: one forward per micro-batch -> (B, 1 + K) scores (+ in-batch matrix).

    A retriever encodes users and candidate items in the same forward call, so DDP sees one
    forward and one backward per step; padding stays per input (contexts are long, items short).
    """

    def __init__(self, model: BertRecommender):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if "targets" in batch:  # history="items": a prediction at every position with a target
            vecs = self.model.encode_positions(batch["input_ids"], batch["attention_mask"])  # (B, L, H)
            u = vecs[batch["targets"] >= 0]  # (M, H)
            items = self.model.item_vectors()  # (N, H)
            if "candidates" in batch:  # sampled losses: (M, 1 + K), column 0 the target
                return torch.einsum("mh,mkh->mk", u, items[batch["candidates"]]) / self.model.cfg.temperature, None
            return self.model.score(u, items), None  # (M, N): softmax over the whole catalogue
        b, n = batch["candidates"].shape
        if self.model.cfg.kind == "ranker":
            logits = self.model.forward_pairs(batch["pair_input_ids"], batch["pair_attention_mask"], batch["pair_token_type_ids"])
            return logits.view(b, n), None  # (B, 1 + K)
        u = self.model.encode(batch["user_input_ids"], batch["user_attention_mask"])  # (B, H)
        v = self.model.encode(batch["item_input_ids"], batch["item_attention_mask"]).view(b, n, -1)  # (B, 1+K, H)
        own = torch.einsum("bh,bnh->bn", u, v) / self.model.cfg.temperature  # (B, 1 + K)
        # in-batch: every user against all positives, then all sampled negatives
        cols = torch.cat([v[:, 0], v[:, 1:].reshape(b * (n - 1), -1)])  # (B + B*K, H)
        return own, self.model.score(u, cols)  # (B, 1 + K), (B, B + B*K)


def batch_loss(name: str, own: torch.Tensor, inbatch: torch.Tensor | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The configured loss; a retriever with softmax also learns from in-batch negatives, and a
    history="items" retriever with softmax from the whole catalogue."""
    if "targets" in batch and name == "softmax":
        return losses.softmax(own, batch["targets"][batch["targets"] >= 0])  # (M, N) vs catalogue rows
    candidates = batch["candidates"]
    if inbatch is not None and name == "softmax":
        return losses.in_batch_softmax(inbatch, candidates[:, 0], candidates[:, 1:].reshape(-1) if candidates.shape[1] > 1 else None)
    return losses.compute_loss(name, own)


# ---------------------------------------------------------------------------------------------
# validation (same protocol as evaluation: full ranking for the retriever, sampled for the ranker)


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def encode_items(model: BertRecommender, items: ItemTable, special, device, batch_size: int) -> torch.Tensor:
    """Every catalogue item's vector (I, H), computed once per validation."""
    return encode_batched(model, items.tokens, special, device, batch_size)


@torch.no_grad()
def validate(model: BertRecommender, rows: list[dict], items: ItemTable, special, device, cfg: TrainConfig) -> dict:
    """Ranks of each row's target -> metrics; rows are sharded over ranks and gathered."""
    rank, world = _distributed()
    mine = rows[rank::world]
    was_training = model.training
    model.eval()
    ranks: list[int] = []
    ctx_cut = cfg.max_context_tokens or None
    if model.cfg.kind == "retriever":
        sequence = model.cfg.history == "items"
        if sequence:
            item_vecs = model.item_vectors().cpu()
        else:
            item_vecs = encode_items(model, items, special, device, max(cfg.eval.batch_size, 64))
        for s in range(0, len(mine), cfg.eval.batch_size):
            chunk = mine[s : s + cfg.eval.batch_size]
            if sequence:
                ctxs = [history_context(r.get("profile_ids"), [items.index[i] for i in r["seen_item_ids"]],
                                        model.item_offset, model.cfg.history_len, special) for r in chunk]
            else:
                ctxs = [list(r["context_ids"])[:ctx_cut] for r in chunk]
            b = build_user_batch(model, ctxs, special)
            u = model.encode(b["input_ids"].to(device), b["attention_mask"].to(device)).float().cpu()
            scores = model.score(u, item_vecs).numpy()  # (b, I)
            target = np.array([items.index[r["target_item_id"]] for r in chunk])
            seen = np.zeros_like(scores, dtype=bool)
            for j, r in enumerate(chunk):
                seen[j, [items.index[i] for i in r["seen_item_ids"]]] = True
            seen[np.arange(len(chunk)), target] = False  # a repeated item is still the target
            ranks.extend(target_ranks(scores, target, seen).tolist())
        protocol = "full"
    else:
        n = cfg.eval.ranker_candidates
        for r in mine:
            pos = items.index[r["target_item_id"]]
            seen = {items.index[i] for i in r["seen_item_ids"]} | {pos}
            negs = sample_unseen(r["user_id"], np.fromiter(seen, dtype=np.int64), len(items), n - 1, cfg.eval.seed)
            cands = [pos, *negs.tolist()]
            ctx = list(r["context_ids"])[:ctx_cut]
            scores = []
            for s in range(0, len(cands), cfg.eval.batch_size):
                part = cands[s : s + cfg.eval.batch_size]
                b = build_pair_batch([ctx] * len(part), [items.tokens[i] for i in part], special)
                scores.append(model.forward_pairs(*(b[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids"))).float().cpu())
            sc = torch.cat(scores).numpy()
            ranks.append(int(sampled_ranks(sc[:1], sc[None, 1:])[0]))
        protocol = f"sampled_1+{n - 1}"
    if world > 1:
        gathered: list[list[int]] = [None] * world  # type: ignore[list-item]
        torch.distributed.all_gather_object(gathered, ranks)
        ranks = [x for part in gathered for x in part]
    model.train(was_training)
    acc = MetricAccumulator(ks=(5, 10, 20, 50)).update(np.asarray(ranks, dtype=np.int64))
    res = acc.result()
    res["protocol"] = protocol
    return res


# ---------------------------------------------------------------------------------------------
# the loop


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def _rows(batch: dict) -> list[dict]:
    """numpy batch (dict of arrays) -> list of row dicts with plain lists."""
    names = list(batch)
    n = len(batch[names[0]])
    cols = {k: (v.tolist() if hasattr(v, "tolist") else list(v)) for k, v in batch.items()}
    return [{k: cols[k][i] for k in names} for i in range(n)]


def read_rows(data_dir: str, split: str) -> list[dict]:
    """A small split (valid / test) as row dicts."""
    path = f"{data_dir.rstrip('/')}/examples/split={split}"
    return pads.dataset(path, format="parquet").to_table().to_pylist()


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker. ``config`` = ``{"train": TrainConfig as dict, "run": {...}}``."""
    import ray.train
    import ray.train.torch

    cfg = build_config(TrainConfig, config["train"])
    run = config["run"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.torch_threads or int(cfg.resources_per_worker.get("CPU", 1))
    torch.set_num_threads(max(1, threads))
    _set_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()

    # small tables, read straight from the data directory (shared path or s3://) by every worker
    items = ItemTable.from_data_dir(run["data"])
    valid_rows = read_rows(run["data"], "valid")
    if cfg.eval.max_users:
        valid_rows = valid_rows[: cfg.eval.max_users]
    tokenizer = load_tokenizer(cfg.model.encoder)
    special = special_ids(tokenizer)

    # the model: fresh, or from the latest checkpoint when Ray Train restarts / resumes the run
    checkpoint = ray.train.get_checkpoint()
    progress = {"global_step": 0, "epoch": 0, "step_in_epoch": 0}
    torch.manual_seed(cfg.seed)  # same initial head on every rank
    if checkpoint:
        with checkpoint.as_directory() as d:
            model = BertRecommender.from_checkpoint(d)
    else:
        model = BertRecommender.from_config(cfg.model, tokenizer, item_tokens=items.tokens)
    model.train()
    step_module = ray.train.torch.prepare_model(ScoreStep(model))
    params = [p for p in model.parameters() if p.requires_grad]
    # two groups: the pretrained encoder at lr, the new parameters (head, item embeddings) at new_lr
    new = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder.")]
    old = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("encoder.")]
    groups = [g for g in ({"params": old, "lr": cfg.optim.lr},
                          {"params": new, "lr": cfg.optim.new_lr or cfg.optim.lr}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.optim.weight_decay)
    spe = run["steps_per_epoch"]
    total = spe * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total, int(cfg.optim.warmup_ratio * total)))
    if checkpoint:
        from recsys_ray.train_state import load_train_state

        with checkpoint.as_directory() as d:
            progress = load_train_state(d, optimizer, scheduler)
        _set_seed(cfg.seed + rank + 7919 * progress["global_step"])  # fresh, reproducible stream after resume
        if rank == 0:
            log.info("resumed from step %d (epoch %d)", progress["global_step"], progress["epoch"])

    sequence = model.cfg.history == "items"
    if sequence:
        seq_collate = SequenceCollator(items, special, model.item_offset, model.cfg.history_len, cfg.negatives,
                                       tokenizer, cfg.seed + rank)
        collate = lambda rows: seq_collate(rows, sampled=cfg.loss != "softmax")  # noqa: E731
    else:
        collate = Collator(items, special, model.cfg.kind, cfg.negatives, cfg.max_context_tokens, cfg.seed + rank)
    bucket_key = "item_ids" if sequence else "context_ids"
    bucket_rng = random.Random(cfg.seed + rank)
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    shard = ray.train.get_dataset_shard("train")
    micro = cfg.batch_size
    accum = cfg.optim.grad_accum

    def micro_batches():
        """Endless stream of length-bucketed micro-batches over this worker's shard."""
        while True:
            for chunk in shard.iter_batches(
                batch_size=micro * cfg.bucket_batches,
                batch_format="numpy",
                local_shuffle_buffer_size=micro * cfg.bucket_batches * 4,
                local_shuffle_seed=bucket_rng.randrange(1 << 30),
            ):
                yield from length_buckets(_rows(chunk), micro, bucket_rng, key=bucket_key)

    stream = micro_batches()
    global_step = progress["global_step"]
    metrics: dict = {}
    for epoch in range(progress["epoch"], cfg.epochs):
        start_step = progress["step_in_epoch"] if epoch == progress["epoch"] else 0
        for _ in range(start_step * accum):  # a mid-epoch resume skips what the epoch already saw
            next(stream)
        t0, seen_examples, seen_tokens, loss_sum = time.perf_counter(), 0, 0, 0.0
        for step_in_epoch in range(start_step, spe):
            for a in range(accum):
                rows = next(stream)
                cpu_batch = collate(rows)
                seen_tokens += int(cpu_batch["tokens"])  # counted on the CPU: no device sync
                batch = {k: v.to(device) for k, v in cpu_batch.items()}
                sync = a == accum - 1 or not hasattr(step_module, "no_sync")
                with (contextlib.nullcontext() if sync else step_module.no_sync()), autocast:
                    own, inbatch = step_module(batch)
                    loss = batch_loss(cfg.loss, own, inbatch, batch) / accum
                loss.backward()
                loss_sum += float(loss.detach()) * accum
                seen_examples += len(rows)
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            if cfg.fail_at_step and global_step == cfg.fail_at_step and not checkpoint and rank == 0:
                raise RuntimeError(f"injected failure at step {global_step} (fail_at_step)")
            if rank == 0 and (global_step % cfg.log_every == 0 or step_in_epoch == spe - 1):
                dt = time.perf_counter() - t0
                log.info(
                    "epoch %d step %d/%d loss %.4f lr %.2e %.1f samples/s %.0f tokens/s (rank 0)",
                    epoch, global_step, total, loss_sum / max(1, (step_in_epoch - start_step + 1) * accum),
                    scheduler.get_last_lr()[0], seen_examples / dt, seen_tokens / dt,
                )
            mid = cfg.checkpoint_every_steps and global_step % cfg.checkpoint_every_steps == 0 and step_in_epoch < spe - 1
            if mid:
                state = {"global_step": global_step, "epoch": epoch, "step_in_epoch": step_in_epoch + 1}
                _report(model, tokenizer, optimizer, scheduler, state, {**metrics, "global_step": global_step,
                        "epoch": epoch, METRIC: metrics.get(METRIC, 0.0)}, run, cfg, rank)
        dt = time.perf_counter() - t0
        metrics = validate(model, valid_rows, items, special, device, cfg)
        metrics.update(
            {
                "epoch": epoch + 1,
                "global_step": global_step,
                "train_loss": loss_sum / max(1, (spe - start_step) * accum),
                "samples_per_s": seen_examples * world / dt,
                "tokens_per_s": seen_tokens * world / dt,
            }
        )
        if rank == 0:
            log.info("epoch %d validation: %s", epoch + 1, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()})
        state = {"global_step": global_step, "epoch": epoch + 1, "step_in_epoch": 0}
        _report(model, tokenizer, optimizer, scheduler, state, metrics, run, cfg, rank)


def _report(model, tokenizer, optimizer, scheduler, state: dict, metrics: dict, run: dict, cfg: TrainConfig, rank: int) -> None:
    """Rank 0 writes the checkpoint directory; every rank reports the same metrics (a barrier)."""
    import ray.train

    from recsys_ray.train_state import save_train_state

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            extra = {
                "metrics": metrics,
                "step": state["global_step"],
                "epoch": state["epoch"],
                "loss": cfg.loss,
                "train_config": to_dict(cfg),
                "data_fingerprint": run["data_fingerprint"],
                "text": run["text"],
            }
            model.save(tmp, extra=extra, tokenizer=tokenizer)
            save_train_state(tmp, optimizer, scheduler, state)
            # the catalogue (ids, texts, token ids, train counts): serving needs nothing but the checkpoint
            from recsys_ray.predict import CATALOGUE_FILE, Catalogue

            Catalogue.from_data_dir(run["data"]).save(os.path.join(tmp, CATALOGUE_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


# ---------------------------------------------------------------------------------------------
# the driver


def plan(cfg: TrainConfig) -> dict:
    """Checks that need only the driver (before any worker starts): data, manifest, tokenizer."""
    data = Path(cfg.data)
    manifest = read_manifest(data)
    sequence = cfg.model.history == "items"
    for part in ("items", "sequences" if sequence else "examples/split=train", "examples/split=valid"):
        if not (data / part).is_dir():
            raise DataError(f"{data}: missing {part}/ (prepare the data again)")
    if sequence and "profile_ids" not in pads.dataset(str(data / "examples/split=valid"), format="parquet").schema.names:
        raise DataError(f"{data}: prepared by an older recsys_ray (no profile_ids); prepare the data again")
    tokenizer = load_tokenizer(cfg.model.encoder)
    check_data_matches_model(manifest, tokenizer, str(data))
    prepared_k = manifest.get("config", {}).get("negatives", cfg.negatives)
    if cfg.negatives > prepared_k and not sequence:  # history="items" samples its negatives per step
        raise ConfigError([f"negatives={cfg.negatives} but {data} was prepared with {prepared_k} per positive"])
    # history="items" trains on user sequences (one row per user, a window drawn per step)
    n_train = manifest["counts"]["users"] if sequence else manifest["counts"]["examples_by_split"]["train"]
    per_step = cfg.num_workers * cfg.batch_size * cfg.optim.grad_accum
    spe = n_train // per_step
    if spe < 1:
        what = "users" if sequence else "train examples"
        raise DataError(f"{data}: {n_train} {what} are fewer than one step ({per_step} = workers x batch x accum)")
    if cfg.max_steps_per_epoch:
        spe = min(spe, cfg.max_steps_per_epoch)
    return {
        "steps_per_epoch": spe,
        "data_fingerprint": manifest["fingerprint"],
        "text": manifest.get("text", {}),
        "train_examples": n_train,
    }


def build_trainer(cfg: TrainConfig, run_plan: dict | None = None, name: str | None = None, extra_callbacks=None):
    """The TorchTrainer for ``cfg`` (Tune calls this too, with its own run name and callbacks)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    run_plan = run_plan or plan(cfg)
    data = Path(cfg.data).resolve()
    if cfg.model.history == "items":  # one row per user; several blocks so every worker gets a share
        cols = ["user_id", "item_ids", "n_train"]
        if "profile_text" in pads.dataset(str(data / "sequences"), format="parquet").schema.names:
            cols.append("profile_text")
        train = ray.data.read_parquet(str(data / "sequences"), columns=cols)
        train = train.repartition(4 * cfg.num_workers).randomize_block_order(seed=cfg.seed)
    else:
        train = ray.data.read_parquet(str(data / "examples" / "split=train"), shuffle="files")
        train = train.randomize_block_order(seed=cfg.seed)
    cpus = ray.cluster_resources().get("CPU", 0)
    per_worker = float((cfg.resources_per_worker or {}).get("CPU", 1))
    if cpus - cfg.num_workers * per_worker < 1:
        # No CPU would be left for Ray Data's read tasks once the workers hold theirs (2 CPUs,
        # 2 workers): they would wait forever. Read the split now, while the CPUs are free;
        # the workers then stream their shards from the object store.
        train = train.materialize()
    datasets = {"train": train}
    resources = dict(cfg.resources_per_worker) or None
    storage = cfg.storage_path if "://" in cfg.storage_path else str(Path(cfg.storage_path).resolve())
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": to_dict(cfg), "run": {**run_plan, "data": str(data)}},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name or cfg.name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute=METRIC, checkpoint_score_order="max"
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            callbacks=extra_callbacks,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def _worker_error(exc: BaseException) -> str:
    """The first line of the most useful error inside a Ray Train failure (ours if there is one)."""
    from recsys_ray.runtime import unwrap_task_error

    failures = list(getattr(exc, "worker_failures", {}).values())
    for cause in [*failures, getattr(exc, "controller_failure", None), exc]:
        if cause is None:
            continue
        inner = unwrap_task_error(cause)
        if isinstance(inner, RecsysError):
            return str(inner).splitlines()[0]
    for cause in failures:
        lines = [ln for ln in str(cause).strip().splitlines() if ln.strip()]
        if lines:
            return lines[-1].strip()
    return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__


def run_trainer(trainer, what: str = "training") -> object:
    """``trainer.fit()`` with worker failures turned into one-line RecsysErrors."""
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray Train raises WorkerGroupError / ControllerError
        raise RecsysError(f"{what} failed: {_worker_error(exc)}") from exc
    if result.error:
        raise RecsysError(f"{what} failed: {_worker_error(result.error)}")
    return result


def fit(cfg: TrainConfig) -> dict:
    """Train (or resume a run of the same name) and return the summary the job prints."""
    from recsys_ray.runtime import init_ray

    run_plan = plan(cfg)
    init_ray()
    t0 = time.perf_counter()
    result = run_trainer(build_trainer(cfg, run_plan))
    best = result.get_best_checkpoint(METRIC, "max") if result.best_checkpoints else result.checkpoint
    metrics = result.metrics or {}
    return {
        "run": str(result.path),
        "best_checkpoint": best.path if best else None,
        "metrics": {k: metrics.get(k) for k in (METRIC, "hr@10", "mrr@10", "mrr", "protocol", "epoch", "global_step", "train_loss", "samples_per_s")},
        "steps_per_epoch": run_plan["steps_per_epoch"],
        "seconds": round(time.perf_counter() - t0, 1),
    }




def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or a run directory -> its best checkpoint (by ``METRIC``).

    A run directory is what ``storage_path/name`` holds: ``checkpoint_manager_snapshot.json``
    lists every kept checkpoint with its reported metrics.
    """
    if str(path).startswith("s3://"):
        return str(path)
    p = Path(path)
    if (p / "model.safetensors").is_file() or not p.is_dir():
        return str(p)  # a checkpoint (or a missing path: the loader names it)
    snapshot = p / "checkpoint_manager_snapshot.json"
    if snapshot.is_file():
        try:
            results = json.loads(snapshot.read_text()).get("checkpoint_results", [])
        except ValueError as exc:
            raise RecsysError(f"{snapshot}: unreadable ({exc})") from None
        scored = [r for r in results if (p / r.get("checkpoint_dir_name", "")).is_dir()]
        if scored:
            best = max(scored, key=lambda r: (r.get("metrics", {}).get(METRIC, float("-inf")), r.get("version", 0)))
            return str(p / best["checkpoint_dir_name"])
    found = sorted(d for d in p.glob("checkpoint_*") if (d / "model.safetensors").is_file())
    if not found:
        raise RecsysError(f"{path}: neither a checkpoint nor a run directory with checkpoints")
    return str(found[-1])
