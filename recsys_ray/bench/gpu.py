"""The one GPU check (jobs/bench_gpu.py): every GPU number the project quotes, in one run of a few
minutes on one GPU, ending with one JSON line.

Sections (each timed and isolated: one that fails records its error and the next one runs):

- ``train``: the plain training loop of each preset's model (``configs/cpu.yaml``, ``configs/gpu.yaml``:
  the item-token retriever with 50 / 200 history items, their batch sizes) with bf16 autocast and
  in fp32: samples/s, tokens/s, MFU against a bf16 (fp32) matmul peak measured in the same process
  (FLOPs as in :mod:`recsys_ray.bench.train`, the catalogue scores included);
- ``ray_train``: the first preset under Ray Train, 1 GPU worker, 2 epochs of ``steps`` (epoch 2
  quoted, as :mod:`recsys_ray.bench.train` does) vs the plain bf16 loop of the same model and batch;
- ``retriever``: ``Predictor.retrieve`` (encode the user, score the whole catalogue, top 10) users/s,
  one user per call and ``retrieve_batch`` per call, in each of ``precisions``, with how far each
  precision's scores are from fp32's (int8 is CPU-only: not measured here);
- ``ranker``: the cross-encoder's ``score_pairs`` pairs/s per precision and pairs per pass, and the
  model's own batching gain for one-candidate requests (``score_many`` 1 vs ``batch`` per call);
- ``serve``: the served app (``serve_configs/local-ranker.yaml`` with GPU replicas, 0.5 GPU each):
  ``/v1/score`` closed loop at each of ``concurrency``; batching off vs on with 20 and with
  ONE candidate per request; ``/v1/recommend`` at one client; then the plain one-process FastAPI
  server with the same routes at the same concurrencies.

``weights: random`` builds the default encoder's architecture with random weights (speed does
not depend on the values; used where the 87 MB of weights cannot travel); ``dry_run`` checks the
wiring on CPU with a tiny random BERT in a minute or two (tests/bench/test_bench_gpu.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
import yaml

from recsys_ray.bench import serve as bserve
from recsys_ray.bench import train as btrain
from recsys_ray.bench.common import publish, remove_tree, work_dir
from recsys_ray.config import build_config, to_dict
from recsys_ray.data import layout
from recsys_ray.data.catalogue import Catalogue
from recsys_ray.errors import RecsysError, one_line
from recsys_ray.model import kinds
from recsys_ray.model.tokenizer import load_tokenizer
from recsys_ray.predict import Predictor, PredictorConfig
from recsys_ray.train.config import TrainConfig, load_train_config

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("train", "retriever", "ranker", "ray_train", "serve")


@dataclasses.dataclass
class BenchGpuConfig:
    """One GPU check (jobs/bench_gpu.py --config/--set)."""

    RANGES: ClassVar[dict[str, str]] = {
        **dict.fromkeys(("steps", "users", "pairs", "retrieve_batch", "single_batch"), ">= 1"),
        "warmup_steps": ">= 0", "serve_duration_s": "> 0", "serve_warmup_s": ">= 0", "budget_s": "> 0",
    }

    data: str = "artifacts/ml-100k"  # prepared data (jobs/prepare_data.py); the ranker needs no train examples
    weights: Literal["pretrained", "random"] = "pretrained"  # random: the default encoder's shape, random values
    presets: list[str] = dataclasses.field(default_factory=lambda: ["cpu", "gpu"])  # configs/<name>.yaml (item-token retrievers)
    sections: list[str] = dataclasses.field(default_factory=lambda: list(SECTIONS))
    steps: int = 30  # timed training steps (plain loop; Ray: per epoch)
    warmup_steps: int = 5  # untimed steps before the plain loop's timer
    precisions: list[str] = dataclasses.field(default_factory=lambda: ["fp32", "bf16", "fp16"])
    users: int = 512  # test users per retriever measurement
    retrieve_batch: int = 64  # users per retrieve call in the batched measurement
    pairs: int = 4096  # ranker pairs per offline measurement
    single_batch: int = 32  # one-candidate requests per score_many call (the Ranker's max_batch_size)
    concurrency: list[int] = dataclasses.field(default_factory=lambda: [1, 32, 128])  # Serve closed-loop clients
    serve_duration_s: float = 10.0  # measured seconds per Serve point
    serve_warmup_s: float = 2.0
    plain_server: bool = True  # also the plain FastAPI process at the same concurrencies
    budget_s: float = 450.0  # sections not started by then are skipped (the whole check fits in 8 minutes)
    dry_run: bool = False  # CPU, tiny random BERT, a few steps, 1-second points: checks the wiring only
    output: str = "artifacts/bench_gpu"  # results.json + results.md

    def problems(self) -> list[str]:
        out = [f"sections: unknown {s!r} (one of {', '.join(SECTIONS)})" for s in self.sections if s not in SECTIONS]
        out += [f"presets: no configs/{p}.yaml" for p in self.presets if not (REPO / "configs" / f"{p}.yaml").is_file()]
        out += [f"precisions: unknown {p!r} (fp32, bf16, fp16)" for p in self.precisions if p not in ("fp32", "bf16", "fp16")]
        if not self.concurrency or min(self.concurrency) < 1:
            out.append(f"concurrency must be a non-empty list of integers >= 1, got {self.concurrency}")
        if "ray_train" in self.sections and not self.presets:
            out.append("ray_train needs a preset")
        return out


def dry_config(cfg: BenchGpuConfig) -> BenchGpuConfig:
    """``dry_run``: the same sections, sized to check the wiring on a CPU in a minute or two."""
    if not cfg.dry_run:
        return cfg
    return dataclasses.replace(cfg, steps=2, warmup_steps=1, users=8, retrieve_batch=4, pairs=32, single_batch=4,
                               concurrency=[1, 4], serve_duration_s=1.0, serve_warmup_s=0.5,
                               precisions=[p for p in cfg.precisions if p != "fp16"] or ["fp32"])


def load_bench_gpu_config(data: dict) -> BenchGpuConfig:
    return dry_config(build_config(BenchGpuConfig, data))


# ---------------------------------------------------------------------------------------------
# models


def model_shape(cfg: BenchGpuConfig) -> str:
    """The made checkpoints' encoder, in :func:`recsys_ray.bench.serve.encoder_shape`'s names."""
    return "tiny" if cfg.dry_run else ("minilm-random" if cfg.weights == "random" else "minilm")


def preset_config(cfg: BenchGpuConfig, preset: str, device: str, **changes) -> TrainConfig:
    """``configs/<preset>.yaml`` on ``cfg.data`` with the bench's encoder (its model otherwise as is)."""
    data = yaml.safe_load((REPO / "configs" / f"{preset}.yaml").read_text())
    model = dict(data.get("model") or {})
    model["tiny"] = bserve.encoder_shape(model_shape(cfg))
    data.update(data=cfg.data, model=model, **changes)
    if device == "cpu":
        data.update(use_gpu=False, resources_per_worker={"CPU": 1})
    return load_train_config(data)


def _bench_train_config(cfg: BenchGpuConfig, tc: TrainConfig, device: str) -> btrain.BenchConfig:
    return btrain.BenchConfig(data=cfg.data, steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                              batch_size=tc.batch_size, gpu=device == "cuda", output=cfg.output)


# ---------------------------------------------------------------------------------------------
# sections


def section_train(cfg: BenchGpuConfig, device: str, state: dict) -> dict:
    """The plain loop of each preset's model: bf16 autocast vs fp32 (CPU: fp32 only in a dry run)."""
    n = 256 if cfg.dry_run else 8192
    dev = torch.device(device)
    peaks = {"bf16": btrain.matmul_peak(n, 3, dev, torch.bfloat16), "fp32": btrain.matmul_peak(n, 3, dev, torch.float32)}
    out: dict = {"peak_flop_per_s": peaks, "matmul_size": n, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                 "presets": {}}
    items = Catalogue.from_data_dir(cfg.data)
    for preset in cfg.presets:
        tc = preset_config(cfg, preset, device)
        bc = _bench_train_config(cfg, tc, device)
        kind = kinds.kind_class(tc.model)
        tokenizer = load_tokenizer(tc.model.encoder)
        need = cfg.warmup_steps + cfg.steps
        rows = btrain.sample_rows(cfg.data, max(4 * need * tc.batch_size, tc.batch_size * tc.bucket_batches), 0, tc.model)
        batches = btrain.plain_batches(rows, need, tc.batch_size, tc.bucket_batches, 0, key=kind.bucket_key)
        runs = {}
        for label in ("bf16", "fp32"):
            runs[label] = btrain.run_plain(bc, tc, batches, items, tokenizer, torch.get_num_threads(), peaks[label],
                                           bf16=label == "bf16")
            log.info("train %s %s: %.1f samples/s, MFU %.3f", preset, label, runs[label]["samples_per_s"], runs[label]["mfu"])
            if device == "cuda":
                runs[label]["max_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.empty_cache()
        out["presets"][preset] = {
            "model": {"kind": tc.model.kind, "history": tc.model.history, "history_len": tc.model.history_len,
                      "freeze": tc.model.freeze, "batch_size": tc.batch_size, "loss": tc.loss},
            "runs": runs, "bf16_over_fp32": round(runs["bf16"]["samples_per_s"] / runs["fp32"]["samples_per_s"], 3),
        }
    state["plain_bf16"] = {p: v["runs"]["bf16"] for p, v in out["presets"].items()}
    return out


def section_ray_train(cfg: BenchGpuConfig, device: str, state: dict) -> dict:
    """Ray Train, one worker (1 GPU), the first preset, vs the plain bf16 loop of the same batch."""
    from recsys_ray.runtime import init_ray

    init_ray()
    preset = cfg.presets[0]
    storage = tempfile.mkdtemp(prefix="bench_gpu_runs.")
    try:
        tc = preset_config(cfg, preset, device, num_workers=1, epochs=2, max_steps_per_epoch=cfg.steps,
                           eval={"max_users": 64, "batch_size": 64}, storage_path=storage, name="bench-gpu",
                           keep_checkpoints=2, log_every=max(cfg.steps, 1), placement_strategy="PACK",
                           **({"resources_per_worker": {"CPU": 1, "GPU": 1}, "use_gpu": True} if device == "cuda" else {}))
        ray_run = btrain.fit_two_epochs(tc)
    finally:
        remove_tree(storage)
    plain = (state.get("plain_bf16") or {}).get(preset)
    ratio = round(ray_run["samples_per_s"] / plain["samples_per_s"], 3) if plain else None
    log.info("ray train 1 worker: %.1f samples/s (plain %s): ratio %s", ray_run["samples_per_s"],
             plain and round(plain["samples_per_s"], 1), ratio)
    return {"preset": preset, "ray_1w": ray_run, "plain_bf16_samples_per_s": plain and plain["samples_per_s"],
            "ray_over_plain": ratio}


def _checkpoints(cfg: BenchGpuConfig, state: dict) -> dict[str, str]:
    """Untrained retriever (item tokens) + ranker checkpoints over the data's catalogue, made once."""
    if "ckpt" not in state:
        root = Path(tempfile.mkdtemp(prefix="bench_gpu_ckpt."))
        state["tmp"].append(root)
        state["ckpt"] = bserve.make_checkpoints(_serve_config(cfg, "cpu"), root)
    return state["ckpt"]


def _test_contexts(p: Predictor, cfg: BenchGpuConfig) -> list[list[int]]:
    rows = layout.read_split_rows(cfg.data, "test")[: cfg.users]
    return p.example_contexts({k: [r[k] for r in rows] for k in ("context_ids", "seen_item_ids", "profile_ids")})


def section_retriever(cfg: BenchGpuConfig, device: str, state: dict) -> dict:
    """users/s of retrieve() per precision, one user per call and batched, and scores vs fp32."""
    ck = _checkpoints(cfg, state)
    out: dict = {"users": None, "batch": cfg.retrieve_batch, "precisions": {}}
    ref = None
    for precision in cfg.precisions:
        p = Predictor(PredictorConfig(retriever=ck["retriever"], device=device, precision=precision, batch_size=256))
        ctx = _test_contexts(p, cfg)
        out["users"] = len(ctx)
        p.retrieve(ctx[: cfg.retrieve_batch], 10)  # warm-up: item vectors, kernels
        one = ctx[: min(len(ctx), 128)]
        t_one = bserve._best_seconds(device, _retrieve_all, p, [[c] for c in one])
        t_batch = bserve._best_seconds(device, _retrieve_all, p, [ctx[i:i + cfg.retrieve_batch]
                                                                  for i in range(0, len(ctx), cfg.retrieve_batch)])
        scores = p.retrieval_scores(ctx, with_prior=False)
        res = {"users_per_s_one_per_call": round(len(one) / t_one, 1), "users_per_s_batched": round(len(ctx) / t_batch, 1)}
        if ref is None:
            ref = scores
        else:
            res["vs_fp32"] = score_diff(ref, scores)
        out["precisions"][precision] = res
        log.info("retriever %s: %s", precision, res)
    return out


def _retrieve_all(p: Predictor, chunks: list[list[list[int]]]) -> None:
    for chunk in chunks:
        p.retrieve(chunk, 10)


def score_diff(a: np.ndarray, b: np.ndarray) -> dict:
    """How far scores ``b`` are from ``a`` (rows = users): max |diff| over the range, top-10 overlap."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    overlap = np.mean([len(set(np.argsort(-x)[:10]) & set(np.argsort(-y)[:10])) / 10 for x, y in zip(a, b, strict=True)])
    return {"max_abs_over_range": round(float(np.abs(a - b).max() / (a.max() - a.min() or 1.0)), 5),
            "top10_overlap": round(float(overlap), 4)}


def section_ranker(cfg: BenchGpuConfig, device: str, state: dict) -> dict:
    """pairs/s of score_pairs per precision and pass size; one-candidate requests batched vs not."""
    ck = _checkpoints(cfg, state)
    catalogue = Catalogue.load(ck["retriever"])
    bodies = bserve.request_bodies(cfg.data, catalogue.ids, 20, 0)
    state["bodies"] = bodies
    out: dict = {"pairs": cfg.pairs, "precisions": {}}
    ref = None
    for precision in cfg.precisions:
        res: dict = {}
        for bs in (64, 256):
            p = Predictor(PredictorConfig(ranker=ck["ranker"], items=ck["retriever"], device=device,
                                          precision=precision, batch_size=bs))
            reqs = bserve._ranker_pairs(p, bodies, cfg.pairs)
            ctx = [c for c, cands in reqs for _ in cands]
            cands = [cand for _, cs in reqs for cand in cs]
            p.score_pairs(ctx[:bs], cands[:bs])  # warm-up
            res[f"pairs_per_s_{bs}_per_pass"] = round(len(ctx) / bserve._best_seconds(device, p.score_pairs, ctx, cands), 1)
            if bs == 256:
                scores = p.score_pairs(ctx, cands)
                if ref is None:
                    ref = scores
                else:
                    res["vs_fp32"] = {"max_abs_over_range": round(float(np.abs(ref - scores).max() / (ref.max() - ref.min() or 1.0)), 5),
                                      "correlation": round(float(np.corrcoef(ref, scores)[0, 1]), 5)}
            out["precisions"][precision] = res
        log.info("ranker %s: %s", precision, res)
    out["single_candidate_fp32"] = bserve.offline_single_candidate(ck, bodies, cfg.single_batch, device,
                                                                   requests=max(cfg.single_batch * 4, 16))
    return out


def _serve_config(cfg: BenchGpuConfig, device: str) -> bserve.BenchServeConfig:
    return bserve.BenchServeConfig(
        data=cfg.data, model=model_shape(cfg), concurrency=list(cfg.concurrency),
        batch_compare_concurrency=max(cfg.concurrency), single_candidate_compare=True, fixed_replicas=0,
        open_loop=[], duration_s=cfg.serve_duration_s, warmup_s=cfg.serve_warmup_s, cooldown_s=0.0,
        gpu=device == "cuda", output=cfg.output)


def section_serve(cfg: BenchGpuConfig, device: str, state: dict) -> dict:
    """The served app with GPU replicas, then the plain FastAPI process, at the same concurrencies."""
    ck = _checkpoints(cfg, state)
    scfg = _serve_config(cfg, device)
    bodies = state.get("bodies") or bserve.request_bodies(cfg.data, Catalogue.load(ck["retriever"]).ids, 20, 0)
    rec_bodies = [{"user": b["user"], "k": 10} for b in bodies]
    served = bserve.run_serve(scfg, ck, bodies, rec_bodies)
    out = {k: v for k, v in served.items() if k not in ("config", "open")}
    single = served.get("batch_compare_single") or {}
    out["batch_on_over_off"] = bserve._ratio(served["batch_compare"]["on"]["rps"], served["batch_compare"]["off"]["rps"])
    out["batch_on_over_off_single_candidate"] = (
        bserve._ratio(single["on"]["rps"], single["off"]["rps"]) if single else None)
    if cfg.plain_server:
        out_dir = Path(tempfile.mkdtemp(prefix="bench_gpu_plain."))
        state["tmp"].append(out_dir)
        plain = bserve.run_plain(scfg, ck, bodies, out_dir)
        out["plain"] = plain
        out["serve_over_plain_by_concurrency"] = {
            c: bserve._ratio(served["closed"][c]["rps"], plain["closed"][c]["rps"])
            for c in served["closed"] if c in plain["closed"]}
    return out


RUNNERS = {"train": section_train, "retriever": section_retriever, "ranker": section_ranker,
           "ray_train": section_ray_train, "serve": section_serve}


# ---------------------------------------------------------------------------------------------
# the run


def environment(device: str) -> dict:
    env = {"device": device, "cpus": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": ".".join(map(str, __import__("sys").version_info[:3]))}
    try:
        import ray

        env["ray"] = ray.__version__
    except ImportError as exc:  # the sections that need Ray record their own error
        env["ray"] = f"not importable: {one_line(exc)}"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(card=torch.cuda.get_device_name(0), memory_gb=round(props.total_memory / 2**30, 1),
                   sm_count=props.multi_processor_count, cudnn=torch.backends.cudnn.version(),
                   bf16_supported=torch.cuda.is_bf16_supported())
    else:
        env["card"] = "none (CPU dry run)"
    return env


def run_bench_gpu(cfg: BenchGpuConfig, command: str = "") -> dict:
    """Every section above (isolated, timed, within ``budget_s``); results.json/.md; the summary."""
    if cfg.dry_run:
        device = "cpu"
    elif not torch.cuda.is_available():
        raise RecsysError("no CUDA GPU is visible to this process (torch.cuda.is_available() is False); "
                          "--set dry_run=true checks the wiring on CPU")
    else:
        device = "cuda"
    if not layout.is_prepared(cfg.data) or not layout.has_part(cfg.data, layout.SEQUENCES):
        raise RecsysError(f"{cfg.data}: not a prepared data directory (run jobs/prepare_data.py)")
    out_dir = work_dir(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict = {"command": command, "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                     "environment": environment(device), "config": to_dict(cfg), "sections": {}}
    state: dict = {"tmp": []}
    ray_before = _ray_running()
    try:
        for name in cfg.sections:
            elapsed = time.perf_counter() - started
            if elapsed > cfg.budget_s:
                results["sections"][name] = {"skipped": f"time budget: {elapsed:.0f} s of {cfg.budget_s:.0f} s spent"}
                continue
            t0 = time.perf_counter()
            log.info("section %s (%.0f s in)", name, elapsed)
            try:
                res = RUNNERS[name](cfg, device, state)
            except Exception as exc:  # recorded; the other sections still run (one device call, all numbers)
                log.error("section %s failed:\n%s", name, traceback.format_exc())
                res = {"error": one_line(exc)}
            res["seconds"] = round(time.perf_counter() - t0, 1)
            results["sections"][name] = res
            # written after every section: a run cut short by its time limit keeps what it measured
            (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
            if device == "cuda":
                torch.cuda.empty_cache()
    finally:
        for path in state["tmp"]:
            shutil.rmtree(path, ignore_errors=True)
        if not ray_before:
            _shutdown_ray()  # only a Ray this run started (a test session's or a job's stays)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    results["headline"] = headline(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out_dir / "results.md").write_text(results_markdown(results))
    return {"output": publish(cfg.output, out_dir), **{k: results["environment"].get(k) for k in ("card", "torch", "cuda", "ray")},
            **results["headline"], "wall_s": results["wall_s"]}


def _ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _shutdown_ray() -> None:
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()


def headline(res: dict) -> dict:
    """The numbers the summary line and docs/benchmarks.md quote (None where a section did not run)."""
    s = res["sections"]

    def get(*path):
        cur = s
        for p in path:
            if not isinstance(cur, dict) or p not in cur:
                return None
            cur = cur[p]
        return cur

    out: dict = {}
    for preset in (get("train", "presets") or {}):
        for label in ("bf16", "fp32"):
            r = get("train", "presets", preset, "runs", label) or {}
            out[f"train_{preset}_{label}_samples_per_s"] = r.get("samples_per_s") and round(r["samples_per_s"], 1)
            out[f"train_{preset}_{label}_mfu"] = r.get("mfu") and round(r["mfu"], 4)
    out["ray_train_over_plain"] = get("ray_train", "ray_over_plain")
    for precision in (get("retriever", "precisions") or {}):
        out[f"retriever_{precision}_users_per_s"] = get("retriever", "precisions", precision, "users_per_s_batched")
    for precision in (get("ranker", "precisions") or {}):
        out[f"ranker_{precision}_pairs_per_s"] = get("ranker", "precisions", precision, "pairs_per_s_256_per_pass")
    for c, r in (get("serve", "closed") or {}).items():
        out[f"serve_c{c}_pairs_per_s"] = r["pairs_per_s"]
        out[f"serve_c{c}_p99_ms"] = r["p99_ms"]
    out["serve_batch_on_over_off"] = get("serve", "batch_on_over_off")
    out["serve_batch_on_over_off_single_candidate"] = get("serve", "batch_on_over_off_single_candidate")
    out["errors"] = {k: v["error"] for k, v in s.items() if "error" in v}
    return out


def results_markdown(res: dict) -> str:
    env = res["environment"]
    lines = ["# GPU check (jobs/bench_gpu.py)", "", f"Command: `{res['command']}`", "",
             f"{env.get('card')} ({env.get('memory_gb', '-')} GB), torch {env['torch']}, CUDA {env.get('cuda')}, "
             f"ray {env.get('ray')}, {env['cpus']} CPUs, {res['date']}, {res['wall_s']} s in all.", "",
             "| number | value |", "|---|---|"]
    for k, v in res["headline"].items():
        if k != "errors":
            lines.append(f"| {k} | {v} |")
    for k, v in res["headline"]["errors"].items():
        lines.append(f"| section {k} failed | {v} |")
    lines += ["", "Every figure with its context: results.json."]
    return "\n".join(lines) + "\n"

