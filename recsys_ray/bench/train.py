"""Training throughput: a plain PyTorch loop vs Ray Train (1 and 2 workers), measured in one run.

All runs use the same model, data and per-worker batch, and the pieces Ray Train's workers use
(the model kind's collator, score step and loss form, ``ScoreStep``, AdamW, gradient clipping):

- ``plain_1t``: one process, one torch thread (the per-core baseline Ray's 1 worker is held to);
- ``plain_1t_fixed_pad``: the same steps, every input padded to the data's maximum length;
- ``plain_2t``: one process, two threads (the plain alternative on the whole 2-core machine);
- ``ray_1w`` / ``ray_2w``: :func:`recsys_ray.train.driver.build_trainer`, 1 and 2 workers, 1 CPU and 1
  torch thread each (GPU mode: 1 GPU each).

Ray numbers are what ``train_loop_per_worker`` reports per epoch (``samples_per_s`` =
rank-0 samples x world size / rank-0 time over the steps of the epoch, validation excluded).
Its first epoch includes the cold start (first forward/backward, the first blocks streamed from
the object store), so the Ray runs train 2 epochs of ``steps`` steps and the second is quoted
(the first is kept as ``cold_samples_per_s``); the plain loop times ``steps`` steps after
``warmup_steps`` untimed ones. Both collate inside the timed loop; the plain loop selects its rows
(a seeded sample of the train split, length-bucketed exactly like the workers do) beforehand.

FLOPs (MFU = achieved FLOP/s / peak FLOP/s of an n x n matmul timed in the same process):
per encoder call of R rows padded to L tokens (padding counts: it is computed),

    forward = 2 * P_layers * R * L      (every Linear of the transformer layers, one MAC per weight)
            + 4 * layers * H * L^2 * R  (attention scores QK^T and the weighted sum AV)
            + 2 * P_head * R            (the head, once per row)

and a training step = 3 x forward (backward ~ 2 x forward: input and weight gradients), summed
over the step's encoder calls (retriever: users + candidate items; ranker: the pairs). Embedding
lookups, layer norms, softmax and the (B, B + B*K) score matrix are left out (no matmul FLOPs
worth counting). Ray's FLOP/s are estimated as its samples/s x the plain loop's FLOPs per sample.
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
from typing import ClassVar, Literal

import ray
import torch
import torch.nn.functional as F

from recsys_ray.bench.common import busy_cpus, publish, remove_tree, work_dir
from recsys_ray.config import build_config, to_dict
from recsys_ray.data import layout
from recsys_ray.data.catalogue import Catalogue
from recsys_ray.errors import RecsysError
from recsys_ray.model import kinds
from recsys_ray.model.base import BertRecommender
from recsys_ray.model.config import ModelConfig
from recsys_ray.model.losses import LossName
from recsys_ray.model.tokenizer import load_tokenizer, special_ids
from recsys_ray.runtime import init_ray
from recsys_ray.train.config import TrainConfig, load_train_config
from recsys_ray.train.driver import build_trainer, plan, run_trainer
from recsys_ray.train.loop import ScoreStep, length_buckets

log = logging.getLogger(__name__)

# the `tiny` preset's encoder (configs/tiny.yaml): random weights, seconds per run on a laptop
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
RATIO_TARGET = 0.9  # Ray 1 worker / plain 1 thread, samples/s
INPUTS = ("", "user_", "item_", "pair_")  # prefixes of the encoder inputs a collated batch can hold ("": the item-token retriever's sequences)


@dataclasses.dataclass
class BenchConfig:
    """One benchmark run (jobs/bench_train.py --config/--set)."""

    RANGES: ClassVar[dict[str, str]] = {
        **dict.fromkeys(("steps", "batch_size", "matmul_reps", "eval_users"), ">= 1"),
        **dict.fromkeys(("warmup_steps", "negatives", "max_context_tokens", "matmul_size"), ">= 0"),
    }

    data: str = "artifacts/syn-tiny"  # prepared data directory (jobs/prepare_data.py output)
    model: Literal["tiny", "minilm"] = "tiny"  # tiny random BERT, or the packaged MiniLM-L6
    kind: Literal["retriever", "ranker"] = "retriever"  # which head trains
    loss: LossName = "softmax"  # as in TrainConfig
    negatives: int = 4  # negatives per positive (<= prepared)
    steps: int = 20  # timed optimizer steps per run (Ray: per epoch, 2 epochs)
    warmup_steps: int = 3  # untimed steps before the plain loop's timer starts
    batch_size: int = 16  # examples per worker per step
    max_context_tokens: int = 0  # cut contexts at batch time (0 = as prepared), as in TrainConfig
    gpu: bool = False  # CUDA + bf16 autocast; Ray workers take 1 GPU each
    matmul_size: int = 0  # n of the n x n peak matmul (0 = 2048 on CPU, 8192 on GPU)
    matmul_reps: int = 5  # timed matmuls per peak measurement (the best one counts)
    eval_users: int = 8  # validation users of the Ray runs (validation is not timed)
    seed: int = 0  # model init and data order
    output: str = "artifacts/bench_train"  # results.json and results.md go here

    def problems(self) -> list[str]:
        out = []
        if self.loss != "softmax" and self.negatives < 1:
            out.append(f"loss {self.loss!r} needs negatives >= 1")
        if not self.output:
            out.append("output must not be empty")
        return out


def load_bench_config(data: dict) -> BenchConfig:
    """Validate a benchmark config; every problem in one ConfigError."""
    return build_config(BenchConfig, data)


def model_config(cfg: BenchConfig) -> ModelConfig:
    if cfg.model == "tiny":
        return ModelConfig(kind=cfg.kind, tiny=dict(TINY), dropout=0.0, temperature=0.1)
    return ModelConfig(kind=cfg.kind, encoder="default", temperature=0.05)


def train_config(cfg: BenchConfig, workers: int, storage: str, name: str) -> TrainConfig:
    """The TrainConfig every run shares (the plain loop reads its optimizer and cut from it)."""
    resources = {"CPU": 1, "GPU": 1} if cfg.gpu else {"CPU": 1}
    return load_train_config({
        "data": cfg.data,
        "model": to_dict(model_config(cfg)),
        "loss": cfg.loss,
        "negatives": cfg.negatives,
        "batch_size": cfg.batch_size,
        "epochs": 2,  # epoch 1 warms up, epoch 2 is quoted (see the module docstring)
        "max_steps_per_epoch": cfg.steps,
        "max_context_tokens": cfg.max_context_tokens,
        "optim": {"lr": 2e-3 if cfg.model == "tiny" else 5e-5},
        "eval": {"max_users": cfg.eval_users},
        "num_workers": workers,
        "use_gpu": cfg.gpu,
        "resources_per_worker": resources,
        "torch_threads": 1,
        "storage_path": storage,
        "name": name,
        "keep_checkpoints": 2,  # both epochs' metrics come back with their checkpoints
        "log_every": max(cfg.steps, 1),
        "seed": cfg.seed,
    })


def _device(cfg: BenchConfig) -> torch.device:
    # The plain loop has no Ray Train to pick its device: this is the one place that names one.
    return torch.device("cuda" if cfg.gpu else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # kernels are async: time only finished work


# ---------------------------------------------------------------------------------------------
# peak and FLOPs


def matmul_peak(n: int, reps: int, device: torch.device, dtype: torch.dtype) -> float:
    """Best FLOP/s of ``reps`` n x n matmuls (2 n^3 FLOPs each) with the current thread count."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.matmul(a, b)  # first call: allocation, kernel selection
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


@dataclasses.dataclass
class FlopModel:
    """The sizes the FLOP estimate needs (see the module docstring for the formula)."""

    layers: int
    hidden: int
    layer_params: int  # parameters of the transformer layers (embeddings excluded)
    head_params: int
    params_total: int  # every parameter value, frozen ones included
    catalogue: int = 0  # item-token retriever: items every position is scored against (full softmax)

    @classmethod
    def of(cls, model: BertRecommender) -> FlopModel:
        return cls(
            catalogue=model.num_items if model.history == "items" else 0,
            layers=model.encoder.config.num_hidden_layers,
            hidden=model.encoder.config.hidden_size,
            layer_params=sum(p.numel() for p in model.encoder.encoder.parameters()),
            head_params=sum(p.numel() for p in model.head.parameters()),
            params_total=model.total_parameters(),
        )

    def step_flops(self, batch: dict[str, torch.Tensor]) -> float:
        """Training FLOPs of one collated batch (padding included: it is computed)."""
        fwd = 0.0
        for prefix in INPUTS:
            ids = batch.get(f"{prefix}input_ids")
            if ids is None:
                continue
            rows, length = ids.shape
            fwd += 2.0 * self.layer_params * rows * length
            fwd += 4.0 * self.layers * self.hidden * length * length * rows
            fwd += 2.0 * self.head_params * rows
        targets = batch.get("targets")
        if self.catalogue and targets is not None:
            # (M, H) x (H, N) scores of every predicting position against the catalogue (or its K + 1 candidates)
            cols = batch["candidates"].shape[1] if "candidates" in batch else self.catalogue
            fwd += 2.0 * int((targets >= 0).sum()) * cols * self.hidden
        return 3.0 * fwd


# ---------------------------------------------------------------------------------------------
# padding


def fixed_widths(tc: TrainConfig, manifest: dict) -> dict[str, int]:
    """The longest input each prefix can have under the data's token budgets (+ special tokens)."""
    text = manifest.get("text", {})
    ctx = tc.max_context_tokens or int(text.get("max_context_tokens", 256))
    item = int(text.get("max_item_tokens", 64))
    return {"user_": ctx + 2, "item_": item + 2, "pair_": ctx + item + 3}  # [CLS] .. [SEP] (.. [SEP])


def pad_batch(batch: dict[str, torch.Tensor], widths: dict[str, int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad every encoder input to a fixed width (what a collator without dynamic padding does)."""
    out = dict(batch)
    for prefix, width in widths.items():
        ids = batch.get(f"{prefix}input_ids")
        if ids is None or ids.shape[1] >= width:
            continue
        extra = (0, width - ids.shape[1])
        out[f"{prefix}input_ids"] = F.pad(ids, extra, value=pad_id)
        for name in ("attention_mask", "token_type_ids"):
            if f"{prefix}{name}" in batch:
                out[f"{prefix}{name}"] = F.pad(batch[f"{prefix}{name}"], extra, value=0)
    return out


def token_counts(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(non-padding tokens = sum of attention masks, all tokens incl. padding) of a batch."""
    real = total = 0
    for prefix in INPUTS:
        mask = batch.get(f"{prefix}attention_mask")
        if mask is not None:
            real += int(mask.sum())
            total += mask.numel()
    return real, total


# ---------------------------------------------------------------------------------------------
# the plain loop


def sample_rows(data: str, n: int, seed: int, model: ModelConfig | None = None) -> list[dict]:
    """A seeded random sample of ``n`` rows of what ``model``'s kind trains from (the columns its
    collator reads; default: the text kinds' train split)."""
    if model is None:
        table = layout.read_split(data, "train", ["context_ids", "target_item_id", "negative_item_ids"])
    else:
        kind = kinds.kind_class(model)
        table = layout.read_table(data, kind.train_part, kind.train_columns(data))
    idx = list(range(table.num_rows))
    random.Random(seed).shuffle(idx)
    return table.take(sorted(idx[:n])).to_pylist()


def plain_batches(rows: list[dict], n: int, batch_size: int, bucket_batches: int, seed: int,
                  key: str = "context_ids") -> list[list[dict]]:
    """``n`` batches, shuffled and length-bucketed as train_loop_per_worker does; cycles the rows."""
    if len(rows) < batch_size:
        raise RecsysError(f"{len(rows)} train rows are fewer than one batch of {batch_size}")
    rng = random.Random(seed)
    chunk = batch_size * bucket_batches
    out: list[list[dict]] = []
    while len(out) < n:
        order = rows[:]
        rng.shuffle(order)
        for s in range(0, len(order), chunk):
            out.extend(length_buckets(order[s : s + chunk], batch_size, rng, key=key))
    return out[:n]


def run_plain(cfg: BenchConfig, tc: TrainConfig, batches: list[list[dict]], items: Catalogue, tokenizer,
              threads: int, peak: float, widths: dict[str, int] | None = None, bf16: bool | None = None) -> dict:
    """Time ``cfg.steps`` training steps after ``cfg.warmup_steps`` in this process (``bf16``:
    autocast, default on GPU only, as train_loop_per_worker does)."""
    device = _device(cfg)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(cfg.seed)
        model = kinds.from_config(tc.model, tokenizer, item_tokens=items.tokens).to(device)
        model.train()
        flop_model = FlopModel.of(model)
        step = ScoreStep(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=tc.optim.lr, weight_decay=tc.optim.weight_decay)
        special = special_ids(tokenizer)
        collate = model.collator(items, special, tc.train_settings(), tokenizer, 0)
        bf16 = device.type == "cuda" if bf16 is None else bf16
        autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16
                    else contextlib.nullcontext())
        samples = real = total = train_tokens = 0
        flops = 0.0
        losses: list[float] = []
        t0 = time.perf_counter()
        for i, rows in enumerate(batches):
            if i == cfg.warmup_steps:
                _sync(device)
                t0 = time.perf_counter()
            batch = collate(rows)
            if widths:
                batch = pad_batch(batch, widths, special[2])
            if i >= cfg.warmup_steps:  # counted on the CPU copy: no device sync
                r, t = token_counts(batch)
                samples, real, total = samples + len(rows), real + r, total + t
                train_tokens += int(batch["tokens"])
                flops += flop_model.step_flops(batch)
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast:
                scores, extra = step(batch)
                loss = model.train_loss(tc.loss, scores, extra, batch)
            loss.backward()
            losses.append(float(loss.detach()))  # a sync point, as in train_loop_per_worker
            if tc.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, tc.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _sync(device)
        dt = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    return {
        "workers": 1,
        "threads": threads,
        "steps": len(batches) - cfg.warmup_steps,
        "samples": samples,
        "seconds": dt,
        "samples_per_s": samples / dt,
        "tokens_per_s": real / dt,  # non-padding tokens (sum of attention masks, specials included)
        "train_tokens_per_s": train_tokens / dt,  # train.py's `tokens` (see notes)
        "padded_tokens_per_s": total / dt,
        "pad_fraction": 1.0 - real / total,
        "tokens_per_sample": real / samples,
        "flops_per_sample": flops / samples,
        "flop_per_s": flops / dt,
        "peak_flop_per_s": peak,
        "mfu": flops / dt / peak,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "fixed_padding": bool(widths),
        "bf16": bf16,
    }


# ---------------------------------------------------------------------------------------------
# Ray Train


def run_ray(cfg: BenchConfig, workers: int, storage: str) -> dict:
    """Fit the project's TorchTrainer (2 epochs of ``cfg.steps``) and read what the loop reported."""
    return fit_two_epochs(train_config(cfg, workers, storage, f"bench-{workers}w"))


def fit_two_epochs(tc: TrainConfig) -> dict:
    """Fit the project's TorchTrainer for ``tc`` (2 epochs, ``keep_checkpoints`` >= 2) and read
    what the loop reported: epoch 2's rates, epoch 1's as the cold start."""
    workers = tc.num_workers
    run_plan = plan(tc)
    t = time.perf_counter()
    result = run_trainer(build_trainer(tc, run_plan), f"ray run with {workers} worker(s)")
    wall = time.perf_counter() - t
    epochs = sorted((m for _, m in result.best_checkpoints), key=lambda m: m["epoch"])
    if len(epochs) < 2:
        raise RecsysError(f"ray run with {workers} worker(s) reported {len(epochs)} epoch(s), expected 2")
    cold, warm = epochs[0], epochs[-1]
    return {
        "workers": workers,
        "threads": 1,
        "steps": run_plan["steps_per_epoch"],
        "samples": run_plan["steps_per_epoch"] * workers * tc.batch_size,
        "seconds": run_plan["steps_per_epoch"] * workers * tc.batch_size / warm["samples_per_s"],
        "samples_per_s": warm["samples_per_s"],
        "train_tokens_per_s": warm["tokens_per_s"],
        "cold_samples_per_s": cold["samples_per_s"],
        "train_loss": warm["train_loss"],
        "wall_seconds": wall,  # whole fit(): worker start-up, both epochs, validation, checkpoints
    }


# ---------------------------------------------------------------------------------------------
# the benchmark


def matmul_peaks(cfg: BenchConfig, device: torch.device) -> tuple[dict[str, float], int, torch.dtype]:
    """Peak FLOP/s per core count on CPU (1 thread; 2 threads = the whole machine), one GPU in
    GPU mode; returns (peaks by thread count, matmul size, dtype)."""
    n = cfg.matmul_size or (8192 if cfg.gpu else 2048)
    dtype = torch.bfloat16 if cfg.gpu else torch.float32
    cpus = os.cpu_count() or 1
    peaks: dict[str, float] = {}
    before = torch.get_num_threads()
    try:
        for threads in ([1] if cfg.gpu else sorted({1, min(2, cpus)})):
            torch.set_num_threads(threads)
            peaks[str(threads)] = matmul_peak(n, cfg.matmul_reps, device, dtype)
    finally:
        torch.set_num_threads(before)
    log.info("matmul peak (%s, n=%d): %s", dtype, n, {k: f"{v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()})
    return peaks, n, dtype


def plain_runs(cfg: BenchConfig, tc: TrainConfig, peaks: dict[str, float], manifest: dict) -> dict[str, dict]:
    """The plain loop at 1 thread (dynamic and fixed padding) and at 2 threads."""
    tokenizer = load_tokenizer(tc.model.encoder)
    items = Catalogue.from_data_dir(cfg.data)
    n_batches = cfg.warmup_steps + cfg.steps
    rows = sample_rows(cfg.data, max(4 * n_batches * cfg.batch_size, cfg.batch_size * tc.bucket_batches), cfg.seed)
    batches = plain_batches(rows, n_batches, cfg.batch_size, tc.bucket_batches, cfg.seed)
    runs: dict[str, dict] = {}
    runs["plain_1t"] = run_plain(cfg, tc, batches, items, tokenizer, 1, peaks["1"])
    log.info("plain 1 thread: %.1f samples/s", runs["plain_1t"]["samples_per_s"])
    runs["plain_1t_fixed_pad"] = run_plain(cfg, tc, batches, items, tokenizer, 1, peaks["1"],
                                           widths=fixed_widths(tc, manifest))
    log.info("plain 1 thread, fixed padding: %.1f samples/s", runs["plain_1t_fixed_pad"]["samples_per_s"])
    if not cfg.gpu and (os.cpu_count() or 1) >= 2:
        runs["plain_2t"] = run_plain(cfg, tc, batches, items, tokenizer, 2, peaks["2"])
        log.info("plain 2 threads: %.1f samples/s", runs["plain_2t"]["samples_per_s"])
    return runs


def ray_runs(cfg: BenchConfig, peaks: dict[str, float], per_sample: dict) -> tuple[dict[str, dict], dict[str, str]]:
    """Ray Train at 1 and 2 workers (those the cluster has room for); (runs, skipped with why).

    Ray reports samples/s; tokens and FLOPs per sample come from the plain loop's batches."""
    init_ray()
    runs: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    have = ray.cluster_resources().get("GPU" if cfg.gpu else "CPU", 0)
    for workers in (1, 2):
        name = f"ray_{workers}w"
        if have < workers:
            skipped[name] = f"the cluster has {have:g} {'GPU' if cfg.gpu else 'CPU'}(s), {workers} needed"
            continue
        storage = tempfile.mkdtemp(prefix="bench_train_runs.")  # run storage: checkpoints are not kept
        try:
            res = run_ray(cfg, workers, storage)
        finally:
            remove_tree(storage)
        peak = peaks["1"] * workers  # each worker is one process with one thread (one GPU)
        res.update({
            "tokens_per_s": res["samples_per_s"] * per_sample["tokens_per_sample"],
            "flop_per_s": res["samples_per_s"] * per_sample["flops_per_sample"],
            "peak_flop_per_s": peak,
            "mfu": res["samples_per_s"] * per_sample["flops_per_sample"] / peak,
            "estimated": ["tokens_per_s", "flop_per_s", "mfu"],
        })
        runs[name] = res
        log.info("ray %d worker(s): %.1f samples/s (cold epoch %.1f)", workers, res["samples_per_s"], res["cold_samples_per_s"])
    return runs, skipped


def run_benchmark(cfg: BenchConfig, command: str = "") -> dict:
    """Run every measurement, write OUTPUT/results.json + results.md, return the job's summary."""
    if cfg.gpu and not torch.cuda.is_available():
        raise RecsysError("--gpu: no CUDA GPU is visible to this process (torch.cuda.is_available() is False)")
    out = work_dir(cfg.output)
    busy_before = busy_cpus()  # other work on the machine skews every number below
    device = _device(cfg)
    tc = train_config(cfg, 1, str(out / "runs"), "plain")  # the plain loop never writes there
    plan(tc)  # data, manifest, tokenizer and negatives checked before anything is timed
    manifest = layout.read_manifest(cfg.data)
    peaks, n, dtype = matmul_peaks(cfg, device)
    runs = plain_runs(cfg, tc, peaks, manifest)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand the plain loop's cached blocks back before the workers start
    more, skipped = ray_runs(cfg, peaks, runs["plain_1t"])
    runs.update(more)
    ratios = _ratios(runs)
    fm = FlopModel.of(kinds.from_config(tc.model, load_tokenizer(tc.model.encoder)))
    results = {
        "command": command,
        "config": to_dict(cfg),
        "environment": {
            "device": torch.cuda.get_device_name(0) if cfg.gpu else "cpu",
            "cpus": os.cpu_count() or 1,
            "torch": torch.__version__,
            "ray": ray.__version__,
            "busy_cpus_at_start": busy_before,
            "load_avg_1min": os.getloadavg()[0],
        },
        "model": {
            "name": cfg.model, "kind": cfg.kind, "layers": fm.layers, "hidden": fm.hidden,
            "params_total": fm.params_total, "params_layers": fm.layer_params, "params_head": fm.head_params,
        },
        "peak": {"dtype": str(dtype).removeprefix("torch."), "matmul_size": n, "flop_per_s": peaks,
                 "keyed_by": "GPUs" if cfg.gpu else "torch threads"},
        "fixed_pad_widths": fixed_widths(tc, manifest),
        "runs": runs,
        "skipped": skipped,
        "ratios": ratios,
        "notes": _notes(cfg, busy_before),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(render_markdown(results))
    where = publish(cfg.output, out)
    return {
        "output": where,
        "results": f"{where}/results.json",
        "samples_per_s": {k: round(v["samples_per_s"], 2) for k, v in runs.items()},
        "ratios": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in ratios.items()},
        "skipped": skipped,
    }


def _ratios(runs: dict[str, dict]) -> dict:
    def ratio(a: str, b: str, key: str = "samples_per_s") -> float | None:
        return runs[a][key] / runs[b][key] if a in runs and b in runs else None

    out: dict = {
        "ray_1w_over_plain_1t": ratio("ray_1w", "plain_1t"),
        "ray_1w_over_plain_1t_train_tokens": ratio("ray_1w", "plain_1t", "train_tokens_per_s"),
        "ray_2w_over_ray_1w": ratio("ray_2w", "ray_1w"),
        "ray_2w_over_plain_2t": ratio("ray_2w", "plain_2t"),
        "plain_2t_over_plain_1t": ratio("plain_2t", "plain_1t"),
        "dynamic_over_fixed_padding": ratio("plain_1t", "plain_1t_fixed_pad"),
        "target": RATIO_TARGET,
    }
    r = out["ray_1w_over_plain_1t"]
    out["meets_target"] = None if r is None else r >= RATIO_TARGET
    return out


def _notes(cfg: BenchConfig, busy: float | None) -> list[str]:
    warn = [] if busy is None or busy < 0.25 else [
        f"WARNING: other processes kept {busy:.1f} CPUs busy when the benchmark started: they shared "
        "the CPUs with every run, so these numbers (multi-threaded runs most of all) are not "
        "representative. Rerun on an idle machine."
    ]
    return [*warn,
        "Ray samples/s are train_loop_per_worker's own metric for epoch 2 of 2: rank-0 samples x world "
        "/ rank-0 time over the epoch's steps (validation and checkpoints excluded). Epoch 1 "
        "(cold_samples_per_s) includes the first forward/backward and the start of streaming.",
        "The plain loop times steps after warm-up steps; rows are sampled and bucketed before the timer "
        "(Ray streams and buckets inside it); both collate inside the timed loop.",
        "tokens_per_s = non-padding tokens (sum of attention masks, [CLS]/[SEP] included). For Ray it is "
        "estimated: its samples/s x the plain loop's non-padding tokens per sample. train_tokens_per_s "
        "is train.py's own count of the non-padding tokens it encodes ([CLS]/[SEP] included; a ranker's "
        "context once per candidate pair).",
        "FLOPs: 3 x forward, forward = 2*P_layers*R*L + 4*layers*H*L^2*R + 2*P_head*R per encoder call "
        "(padding included). MFU counts padding FLOPs as work: compare samples/s for useful throughput. "
        "Peak: plain runs, the matmul with the run's thread count; Ray runs, workers x the 1-thread "
        "(1-GPU) matmul, as each worker is one single-threaded process.",
        "Ray 1 worker holds 1 CPU; with 2 CPUs in the cluster the other one stays free for Ray Data "
        "(with 2 workers the train split is materialized before the workers start).",
        f"Per-worker batch {cfg.batch_size}: 2 workers train 2 x {cfg.batch_size} samples per step.",
    ]


def render_markdown(res: dict) -> str:
    """results.md: every number of results.json in two tables, plus the command line."""
    cfg, env = res["config"], res["environment"]
    lines = [
        "# Training throughput: plain PyTorch vs Ray Train",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Device {env['device']} ({env['cpus']} CPUs), torch {env['torch']}, ray {env['ray']}. "
        f"Model {cfg['model']} {cfg['kind']} ({res['model']['layers']} layers, hidden {res['model']['hidden']}, "
        f"{res['model']['params_total']:,} parameters), loss {cfg['loss']}, batch {cfg['batch_size']} per worker, "
        f"{cfg['steps']} timed steps. Matmul peak: {res['peak']['dtype']} n={res['peak']['matmul_size']}.",
        "",
        "| run | workers | threads | steps | samples/s | non-pad tokens/s | train.py tokens/s | pad fraction "
        "| GFLOP/s | peak GFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["runs"].items():
        est = "~" if "estimated" in r else ""
        pad = f"{r['pad_fraction']:.3f}" if "pad_fraction" in r else "-"
        lines.append(
            f"| {name} | {r['workers']} | {r['threads']} | {r['steps']} | {r['samples_per_s']:.1f} "
            f"| {est}{r['tokens_per_s']:,.0f} | {r['train_tokens_per_s']:,.0f} | {pad} "
            f"| {est}{r['flop_per_s'] / 1e9:.2f} | {r['peak_flop_per_s'] / 1e9:.1f} | {est}{r['mfu']:.4f} |"
        )
    for name, why in res["skipped"].items():
        lines.append(f"| {name} | skipped: {why} | | | | | | | | | |")
    lines += ["", "~ estimated from the plain loop's tokens / FLOPs per sample.", "",
              "| ratio (samples/s) | value |", "|---|---|"]
    for key, value in res["ratios"].items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown} |")
    for name, r in res["runs"].items():
        if "cold_samples_per_s" in r:
            lines.append(f"| {name} cold epoch (samples/s) | {r['cold_samples_per_s']:.1f} |")
    lines += ["", "Notes:", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"
