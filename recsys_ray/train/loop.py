"""What runs on every Ray Train worker: :func:`train_loop_per_worker` and its pieces.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` rows per worker. Every rank runs
exactly ``steps_per_epoch`` steps per epoch (derived from the train part's size on the driver), so
no rank runs short and DDP never waits on a missing all-reduce. Validation (NDCG@10, HR@10, MRR on
the validation split) runs at the end of every epoch, then rank 0 writes a checkpoint and all ranks
call ``ray.train.report`` with the same metrics. What differs between model kinds (batches, score
step, loss form, validation) is the kind's (:mod:`recsys_ray.model.kinds`); this loop is shared.
"""

from __future__ import annotations

import contextlib
import logging
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import ray.train
import ray.train.torch
import torch
from torch import nn

from recsys_ray.checkpoint import (
    SCORE,
    UNVALIDATED_SCORE,
    load_train_state,
    resolve,
    write_training_checkpoint,
)
from recsys_ray.config import build_config, to_dict
from recsys_ray.data import layout
from recsys_ray.data.catalogue import Catalogue
from recsys_ray.evaluate.metrics import (
    DEFAULT_KS,
    SEARCH_PREFIX,
    MetricAccumulator,
    repeats_history,
)
from recsys_ray.model import kinds
from recsys_ray.model.base import BertRecommender, ValidationSettings
from recsys_ray.model.config import ModelConfig
from recsys_ray.model.tokenizer import load_tokenizer, special_ids
from recsys_ray.train.config import TrainConfig

log = logging.getLogger(__name__)

# Called after every optimizer step as hook(global_step=, rank=, resumed=): a picklable callable
# handed to build_trainer (tests inject worker faults this way); none in normal runs.
StepHook = Callable[..., None]


class ScoreStep(nn.Module):
    """What DDP wraps: one forward per micro-batch through the model kind's own score step, so
    DDP sees one forward and one backward per step."""

    def __init__(self, model: BertRecommender):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.model.train_scores(batch)


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@torch.no_grad()
def validate(model: BertRecommender, rows: list[dict], catalogue: Catalogue, special, device,
             settings: ValidationSettings) -> dict:
    """Ranks of each row's target by the model's kind -> metrics; rows are sharded over the
    ranks of a DDP group and gathered (same protocol as evaluation: full ranking for retrievers,
    a labelled sampled list for rankers)."""
    rank, world = _distributed()
    was_training = model.training
    model.eval()
    ranks, protocol = model.validation_ranks(rows[rank::world], catalogue, special, device, settings)
    res = MetricAccumulator(ks=DEFAULT_KS).update(_gathered(ranks, world)).result()
    res["protocol"] = protocol
    if model.searches:  # the rows with a query once more, as searches: search_ndcg@10, ...
        queried = [r for r in rows[rank::world] if r.get("query_ids") is not None and len(r["query_ids"])]
        search = _gathered(model.search_validation_ranks(queried, catalogue, special, device, settings), world)
        if len(search):
            res.update({SEARCH_PREFIX + k: v for k, v in MetricAccumulator(ks=DEFAULT_KS).update(search).result().items()})
    model.train(was_training)
    return res


def _gathered(ranks: list[int], world: int) -> np.ndarray:
    """Every DDP rank's ranks, concatenated (the same array on every rank)."""
    if world > 1:
        gathered: list[list[int]] = [None] * world  # type: ignore[list-item]
        torch.distributed.all_gather_object(gathered, ranks)
        ranks = [x for part in gathered for x in part]
    return np.asarray(ranks, dtype=np.int64)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def lr_lambda(total: int, warmup: int):
    """Linear warmup over ``warmup`` steps, then linear decay to 0 at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def rows_of(batch: dict) -> list[dict]:
    """numpy batch (dict of arrays) -> list of row dicts with plain lists."""
    names = list(batch)
    n = len(batch[names[0]])
    cols = {k: (v.tolist() if hasattr(v, "tolist") else list(v)) for k, v in batch.items()}
    return [{k: cols[k][i] for k in names} for i in range(n)]


def length_buckets(rows: list[dict], batch_size: int, rng: random.Random, key: str) -> list[list[dict]]:
    """Split a chunk of rows into batches of similar length (less padding), in random order."""
    rows = sorted(rows, key=lambda r: len(r[key]))
    batches = [rows[i : i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass
class Worker:
    """One rank's model, optimizer and data, set up once per (re)start."""

    cfg: TrainConfig
    run: dict  # the driver's plan: steps_per_epoch, data path, fingerprint, text config
    rank: int
    world: int
    device: torch.device
    catalogue: Catalogue
    valid_rows: list[dict]
    tokenizer: object
    special: tuple[int, int, int]
    model: BertRecommender
    step_module: nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    progress: dict = field(default_factory=lambda: {"global_step": 0, "epoch": 0, "step_in_epoch": 0})
    resumed: bool = False
    shard_rows: int | None = None  # rows of one full pass over this worker's shard (once one ended)


def setup_worker(cfg: TrainConfig, run: dict) -> Worker:
    """Data, model (fresh or from the checkpoint Ray Train restarts from), optimizer, scheduler."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.torch_threads or int(cfg.resources_per_worker.get("CPU", 1))
    torch.set_num_threads(max(1, threads))
    set_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()

    # small tables, read straight from the data directory (shared path or s3://) by every worker
    catalogue = Catalogue.from_data_dir(run["data"])
    valid_rows = layout.read_split_rows(run["data"], "valid")
    # the evaluation protocol: a held-out repeat of a history item is not scored
    valid_rows = [r for r in valid_rows if not repeats_history(r["target_item_id"], r["seen_item_ids"])]
    if cfg.eval.max_users:
        valid_rows = valid_rows[: cfg.eval.max_users]
    tokenizer = load_tokenizer(cfg.model.encoder)

    checkpoint = ray.train.get_checkpoint()
    torch.manual_seed(cfg.seed)  # same initial head on every rank
    warm_start = None
    if checkpoint:
        with checkpoint.as_directory() as d:
            model = kinds.load_model(d)
    elif run.get("init_from"):
        model, warm_start = warm_start_model(run["init_from"], catalogue, rank, cfg.model)
    else:
        model = kinds.from_config(cfg.model, tokenizer, item_tokens=catalogue.tokens)
    if model.tokenizer is not None:
        tokenizer = model.tokenizer  # a checkpoint's own (the driver checked it has the data's vocabulary)
    model.train()
    step_module = ray.train.torch.prepare_model(ScoreStep(model))
    params = [p for p in model.parameters() if p.requires_grad]
    # two groups: the pretrained encoder at lr, the new parameters (head, item embeddings) at new_lr
    new = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder.")]
    old = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("encoder.")]
    groups = [g for g in ({"params": old, "lr": cfg.optim.lr},
                          {"params": new, "lr": cfg.optim.new_lr or cfg.optim.lr}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.optim.weight_decay)
    total = run["steps_per_epoch"] * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, int(cfg.optim.warmup_ratio * total)))
    special = special_ids(tokenizer)
    collate = model.collator(catalogue, special, cfg.train_settings(), tokenizer, rank)
    w = Worker(cfg, run, rank, world, device, catalogue, valid_rows, tokenizer, special, model,
               step_module, params, optimizer, scheduler, collate)
    if warm_start is not None:
        w.progress["warm_start"] = warm_start  # travels in every checkpoint of the run
    if checkpoint:
        with checkpoint.as_directory() as d:
            w.progress = load_train_state(d, optimizer, scheduler)
        w.resumed = True
        # every restart (a worker or node lost, a new job of the same run) is recorded in the
        # checkpoints that follow and in each report: the summary says what was resumed from where
        w.progress["resumed_from"] = [*w.progress.get("resumed_from", []), w.progress["global_step"]]
        set_seed(cfg.seed + rank + 7919 * w.progress["global_step"])  # fresh, reproducible stream after resume
        if rank == 0:
            log.info("resumed from the checkpoint of step %d (epoch %d, step %d of it); restart %d of this run",
                     w.progress["global_step"], w.progress["epoch"], w.progress["step_in_epoch"],
                     len(w.progress["resumed_from"]))
    return w


def warm_start_model(source: str, catalogue: Catalogue, rank: int, cfg: ModelConfig) -> tuple[BertRecommender, dict]:
    """The model of checkpoint ``source`` (local, run directory or s3://; :func:`kinds.start_model`
    for the run's model config ``cfg``) moved onto this run's catalogue
    (:meth:`BertRecommender.adopt_catalogue`); returns it and what happened to the items."""
    path = resolve(source)
    model = kinds.start_model(path, cfg)
    counts = model.adopt_catalogue(Catalogue.load(path), catalogue)
    if rank == 0:
        log.info("warm start from %s (step %s): %d items kept their learned vectors, %d new items initialised "
                 "from their text, %d removed", source, model.extra.get("step"), counts["kept"], counts["new"],
                 counts["dropped"])
    return model, {"source": source, "step": model.extra.get("step"), **counts}


def micro_batches(w: Worker) -> Iterator[list[dict]]:
    """Endless stream of length-bucketed micro-batches (rows) over this worker's shard."""
    cfg = w.cfg
    bucket_rng = random.Random(cfg.seed + w.rank)
    shard = ray.train.get_dataset_shard("train")
    chunk = cfg.batch_size * cfg.bucket_batches
    while True:
        rows_this_pass = 0
        batches = iter(shard.iter_batches(batch_size=chunk, batch_format="numpy",
                                          local_shuffle_buffer_size=chunk * 4,
                                          local_shuffle_seed=bucket_rng.randrange(1 << 30)))
        batch = next(batches, None)
        while batch is not None:
            following = next(batches, None)  # one chunk ahead: the pass's end is known before its last rows train
            rows = rows_of(batch)
            rows_this_pass += len(rows)
            if following is None and w.shard_rows is None:
                w.shard_rows = rows_this_pass
            yield from length_buckets(rows, cfg.batch_size, bucket_rng, key=w.model.bucket_key)
            batch = following


def train_step(w: Worker, stream: Iterator[list[dict]], autocast) -> tuple[list[float], int, int]:
    """One optimizer step over ``grad_accum`` micro-batches: (their losses, rows, tokens)."""
    cfg, accum = w.cfg, w.cfg.optim.grad_accum
    losses, examples, tokens = [], 0, 0
    for a in range(accum):
        rows = next(stream)
        cpu_batch = w.collate(rows)
        tokens += int(cpu_batch["tokens"])  # counted on the CPU: no device sync
        batch = {k: v.to(w.device) for k, v in cpu_batch.items()}
        sync = a == accum - 1 or not hasattr(w.step_module, "no_sync")
        with (contextlib.nullcontext() if sync else w.step_module.no_sync()), autocast:
            scores, extra = w.step_module(batch)
            loss = w.model.train_loss(cfg.loss, scores, extra, batch) / accum
        loss.backward()
        losses.append(float(loss.detach()) * accum)  # a sync point, once per micro-batch
        examples += len(rows)
    if cfg.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(w.params, cfg.optim.grad_clip)
    w.optimizer.step()
    w.scheduler.step()
    w.optimizer.zero_grad(set_to_none=True)
    return losses, examples, tokens


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker. ``config`` = ``{"train": TrainConfig as dict, "run": {...},
    "step_hooks": [...]}`` (see :func:`recsys_ray.train.driver.build_trainer`)."""
    cfg = build_config(TrainConfig, config["train"])
    hooks: list[StepHook] = list(config.get("step_hooks") or [])
    w = setup_worker(cfg, config["run"])
    spe, accum = w.run["steps_per_epoch"], cfg.optim.grad_accum
    total = spe * cfg.epochs
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16) if w.device.type == "cuda" else contextlib.nullcontext()
    )
    if stopped_before(w):
        # a run that ended itself must not train on when it is resumed (the same command again,
        # a restored Tune trial): its last checkpoint and report already are the run's end
        if w.rank == 0:
            log.info("this run stopped early after epoch %d (early_stopping): nothing left to train",
                     w.progress["epoch"])
        return
    stream = micro_batches(w)
    global_step = w.progress["global_step"]
    for epoch in range(w.progress["epoch"], cfg.epochs):
        start_step = w.progress["step_in_epoch"] if epoch == w.progress["epoch"] else 0
        for _ in range(start_step * accum):  # a mid-epoch resume skips what the epoch already saw
            next(stream)
        t0, seen_examples, seen_tokens, loss_sum = time.perf_counter(), 0, 0, 0.0
        for step_in_epoch in range(start_step, spe):
            losses, examples, tokens = train_step(w, stream, autocast)
            for value in losses:  # summed one micro-batch at a time: the same float sum whatever accum
                loss_sum += value
            seen_examples, seen_tokens = seen_examples + examples, seen_tokens + tokens
            global_step += 1
            for hook in hooks:
                hook(global_step=global_step, rank=w.rank, resumed=w.resumed)
            if w.rank == 0 and (global_step % cfg.log_every == 0 or step_in_epoch == spe - 1):
                dt = time.perf_counter() - t0
                log.info(
                    "epoch %d step %d/%d loss %.4f lr %.2e %.1f samples/s %.0f tokens/s (rank 0)",
                    epoch, global_step, total, loss_sum / max(1, (step_in_epoch - start_step + 1) * accum),
                    w.scheduler.get_last_lr()[0], seen_examples / dt, seen_tokens / dt,
                )
            if cfg.checkpoint_every_steps and global_step % cfg.checkpoint_every_steps == 0 and step_in_epoch < spe - 1:
                # not validated: reported below any validated score, so it is never kept as "best"
                state = {"global_step": global_step, "epoch": epoch, "step_in_epoch": step_in_epoch + 1}
                save_and_report(w, state, {"global_step": global_step, "epoch": epoch, "validated": False,
                                           SCORE: UNVALIDATED_SCORE})
        dt = time.perf_counter() - t0
        if cfg.refit:  # trained on the validation events: no out-of-sample score, the last epoch is kept
            metrics = {SCORE: UNVALIDATED_SCORE, "refit": True}
        else:
            metrics = validate(w.model, w.valid_rows, w.catalogue, w.special, w.device, cfg.eval_settings())
        metrics.update({
            "epoch": epoch + 1,
            "global_step": global_step,
            "validated": not cfg.refit,
            "train_loss": loss_sum / max(1, (spe - start_step) * accum),
            "samples_per_s": seen_examples * w.world / dt,
            "tokens_per_s": seen_tokens * w.world / dt,
        })
        stop = early_stopping_update(w, metrics)
        metrics["stopped_early"] = stop
        if w.rank == 0:
            log.info("epoch %d %s: %s", epoch + 1, "(refit, not validated)" if cfg.refit else "validation",
                     {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()})
        save_and_report(w, {"global_step": global_step, "epoch": epoch + 1, "step_in_epoch": 0}, metrics)
        if stop:
            if w.rank == 0:
                es = w.progress["early_stopping"]
                log.info("early stopping after epoch %d of %d: %s has not improved on %.4f (epoch %d) by more than "
                         "%g for %d epochs", epoch + 1, cfg.epochs, cfg.early_stopping.metric, es["best"],
                         es["best_epoch"], cfg.early_stopping.min_delta, es["bad_epochs"])
            break


def stopped_before(w: Worker) -> bool:
    """True when the checkpoint this worker resumed from was saved by the epoch that stopped the
    run early (the counter it carries has reached this config's patience)."""
    es, patience = w.progress.get("early_stopping"), w.cfg.early_stopping.patience
    return bool(w.resumed and patience and es and es["bad_epochs"] >= patience)


def early_stopping_update(w: Worker, metrics: dict) -> bool:
    """Track the best validation score in ``w.progress`` (it travels in every checkpoint, so a
    restarted run goes on counting); True when the run should stop. Every rank validates the
    same weights on the same rows, so every rank takes the same decision."""
    es_cfg = w.cfg.early_stopping
    if not es_cfg.patience:
        return False
    es = w.progress.setdefault("early_stopping", {"best": None, "best_epoch": 0, "bad_epochs": 0})
    score = float(metrics[es_cfg.metric])
    if es["best"] is None or score > es["best"] + es_cfg.min_delta:
        es.update(best=score, best_epoch=metrics["epoch"], bad_epochs=0)
    else:
        es["bad_epochs"] += 1
    return es["bad_epochs"] >= es_cfg.patience


def worker_records(w: Worker) -> list[dict]:
    """Where every rank runs and how many rows its shard held (a full pass; None until the last
    chunk of the first pass was read), gathered from all ranks: the record that the work spread
    over the nodes."""
    mine = {"rank": w.rank, "node": ray.get_runtime_context().get_node_id(), "shard_rows": w.shard_rows}
    if w.world == 1:
        return [mine]
    gathered: list[dict] = [None] * w.world  # type: ignore[list-item]
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def save_and_report(w: Worker, state: dict, metrics: dict) -> None:
    """Rank 0 writes the checkpoint directory; every rank reports the same metrics (a barrier).
    Both carry the run's restarts so far (``resumed_from``: the step each restart resumed at)."""
    resumed_from = list(w.progress.get("resumed_from", []))
    state = {**state, "resumed_from": resumed_from}
    for key in ("early_stopping", "warm_start"):
        if key in w.progress:
            state[key] = dict(w.progress[key])
    metrics = {**metrics, "restarts": len(resumed_from), "resumed_from_step": resumed_from[-1] if resumed_from else -1}
    workers = worker_records(w)  # a collective: every rank takes part
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if w.rank == 0:
            extra = {
                "metrics": metrics,
                "step": state["global_step"],
                "epoch": state["epoch"],
                "loss": w.cfg.loss,
                "train_config": to_dict(w.cfg),
                "data_fingerprint": w.run["data_fingerprint"],
                "text": w.run["text"],
                "workers": workers,
                "warm_start": w.progress.get("warm_start"),
            }
            # the catalogue travels in the checkpoint: serving needs nothing but the checkpoint
            write_training_checkpoint(tmp, w.model, w.tokenizer, extra, w.optimizer, w.scheduler, state, w.catalogue)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)
