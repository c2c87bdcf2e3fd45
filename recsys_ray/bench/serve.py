"""Serving benchmark: Ray Serve (batched, autoscaling) vs one plain FastAPI process, in one run.

What runs (every load goes to 127.0.0.1, bounded in time and in count):

1. **offline**: ``Predictor.score_pairs`` on big batches in this process (all cores) - the best
   pairs/s the model gives with no serving at all; the ">= 0.8x" target compares Serve with it.
2. **plain**: ``python -m recsys_ray.bench.serve_plain`` (the same routes and Predictor in one uvicorn
   process, one request at a time, every core for it), closed loop at each concurrency.
3. **serve**: ``serve_configs/local-ranker.yaml`` (Ranker 1->2
   replicas of one torch thread each, Retriever 1 replica), deployed like ``serve run`` does:
   closed loop at each concurrency; batching off vs on at one concurrency (``user_config``
   ``max_batch_size`` 1 vs the config's, changed in place); open loop (Poisson arrivals) at
   fractions of the best closed-loop rate - above 1x the bounded queues fill and the excess is
   refused with 503; ``/v1/recommend`` (retrieve + rerank ``rerank_top``) at one client; then a
   quiet period. ``serve.status()`` is sampled every second throughout: the Ranker's replica
   count over time is the autoscaling record. The one change to local.yaml besides checkpoints
   and port: ``request_timeout_s`` is lifted to 300 s, so slow answers are measured, not cut.

Requests are MovieLens-100K users (the last 20 train items of each, oldest first, and their
age / gender / occupation) with ``candidates`` random catalogue items each. Closed loop: N clients
each send their next request when the last one is answered (a 503 waits ``Retry-After``, at most
1 s); the numbers cover responses that arrive in the measured window after ``warmup_s``; requests
still in flight at the end are awaited (not cancelled: the plain server could not cancel them and
they would slow the next point). Open loop: latency counts from the scheduled send time.

Without ``retriever`` / ``ranker`` checkpoints, untrained MiniLM ones are made for the run (the
real encoder with fresh heads and the catalogue of ``data``): throughput and latency depend on
the encoder's size and the token counts, not on what the weights learnt.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import ClassVar, Literal

import aiohttp
import numpy as np
import psutil  # comes with ray[default] (the dashboard needs it)
import pyarrow.parquet as pq
import ray
import requests
import torch
import yaml
from ray import serve

from recsys_ray import ray_compat
from recsys_ray.bench.common import busy_cpus, publish, work_dir
from recsys_ray.checkpoint import resolve
from recsys_ray.config import build_config, to_dict
from recsys_ray.data import layout
from recsys_ray.data.catalogue import CATALOGUE_FILE, Catalogue
from recsys_ray.errors import RecsysError
from recsys_ray.model import kinds
from recsys_ray.model.config import ModelConfig
from recsys_ray.model.tokenizer import load_tokenizer
from recsys_ray.predict import Predictor, PredictorConfig
from recsys_ray.runtime import free_port, init_ray
from recsys_ray.serve.app import deploy_config

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
LOCAL_CONFIG = REPO / "serve_configs" / "local-ranker.yaml"  # local.yaml + a Ranker deployment
RETRIEVER_CONFIG = REPO / "serve_configs" / "local.yaml"  # mode=recommend: the retriever alone
HOST = "127.0.0.1"  # the only address load is ever sent to
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
OFFLINE_TARGET = 0.8  # Serve pairs/s >= 0.8 x the offline predictor's best
MAX_REQUESTS_PER_POINT = 50_000
MAX_IN_FLIGHT = 2_000  # open loop: arrivals beyond this are counted as client drops, not sent
REQUEST_TIMEOUT_S = 300.0  # client side, and the bench app's http request_timeout_s (latency is measured, not cut)


@dataclasses.dataclass
class BenchServeConfig:
    """One serving benchmark run (jobs/bench_serve.py --config/--set)."""

    RANGES: ClassVar[dict[str, str]] = {
        **dict.fromkeys(("candidates", "rerank_top", "batch_compare_concurrency", "offline_pairs",
                         "max_context_tokens"), ">= 1"),
        "duration_s": "> 0", "warmup_s": ">= 0", "cooldown_s": ">= 0", "fixed_replicas": ">= 0",
    }

    data: str = "artifacts/ml-100k"  # prepared data: catalogue, user histories and profiles for requests
    retriever: str | None = None  # retriever checkpoint / run dir (None: untrained one made here)
    ranker: str | None = None  # ranker checkpoint / run dir (None: untrained one made here)
    model: Literal["minilm", "tiny", "minilm-random"] = "minilm"  # encoder of the made checkpoints (tiny: smoke runs; minilm-random: MiniLM's shape, random weights)
    max_context_tokens: int = 128  # made checkpoints: context cut (the `cpu` preset's)
    candidates: int = 20  # candidates per /v1/score request
    rerank_top: int = 20  # /v1/recommend shortlist the ranker rescores
    concurrency: list[int] = dataclasses.field(default_factory=lambda: [1, 8, 32, 64])  # closed-loop clients
    batch_compare_concurrency: int = 32  # batching off vs on at this many clients
    single_candidate_compare: bool = True  # also batch off vs on with ONE candidate per request
    fixed_replicas: int = 2  # last point: the Ranker pinned at this many replicas vs plain (0 = skip)
    open_loop: list[float] = dataclasses.field(default_factory=lambda: [0.5, 3.0])  # x best closed-loop req/s
    duration_s: float = 30.0  # measured seconds per point
    warmup_s: float = 5.0  # unmeasured seconds before each point's window
    cooldown_s: float = 45.0  # quiet seconds at the end (autoscaling down)
    offline_batch_sizes: list[int] = dataclasses.field(default_factory=lambda: [16, 64, 256])  # pairs per pass
    offline_pairs: int = 640  # pairs scored per offline measurement
    mode: Literal["ranker", "recommend"] = "ranker"  # recommend: local.yaml's retriever-only /v1/recommend vs offline
    recommend_concurrency: list[int] = dataclasses.field(default_factory=lambda: [1, 8])  # mode=recommend clients
    precision: Literal["fp32", "int8", "onnx", "onnx-int8"] = "fp32"  # both models', offline, plain and served (both modes)
    # mode=recommend: the app layouts measured one after the other (in_ingress: the ingress holds
    # the retriever, RetrieverAPI; separate: RecsysAPI -> a Retriever deployment through a handle;
    # direct: in_ingress, the clients calling the replica's own HTTP port, no proxy (Serve direct
    # ingress: the run's Ray then starts with RAY_SERVE_ENABLE_DIRECT_INGRESS=1, every layout alike))
    recommend_layouts: list[Literal["in_ingress", "separate", "direct"]] = dataclasses.field(
        default_factory=lambda: ["in_ingress", "separate"])
    quick: bool = False  # short points, fewer of them (a smoke run, not numbers to quote)
    gpu: bool = False  # model replicas / plain server / offline predictor on CUDA
    seed: int = 0
    output: str = "artifacts/bench_serve"  # results.json, results.md

    def problems(self) -> list[str]:
        out = []
        if not self.concurrency or min(self.concurrency) < 1:
            out.append(f"concurrency must be a non-empty list of integers >= 1, got {self.concurrency}")
        if any(f <= 0 for f in self.open_loop):
            out.append(f"open_loop fractions must be > 0, got {self.open_loop}")
        if not self.recommend_layouts or len(set(self.recommend_layouts)) != len(self.recommend_layouts):
            out.append(f"recommend_layouts must be a non-empty list without repeats, got {self.recommend_layouts}")
        if not self.offline_batch_sizes or min(self.offline_batch_sizes) < 1:
            out.append(f"offline_batch_sizes must be integers >= 1, got {self.offline_batch_sizes}")
        return out


def quick_config(cfg: BenchServeConfig) -> BenchServeConfig:
    """With ``quick``: short points, fewer of them (a smoke run, not numbers to quote)."""
    if not cfg.quick:
        return cfg
    return dataclasses.replace(cfg, duration_s=min(cfg.duration_s, 6.0), warmup_s=min(cfg.warmup_s, 2.0),
                               cooldown_s=min(cfg.cooldown_s, 5.0), concurrency=sorted({1, max(cfg.concurrency)}),
                               batch_compare_concurrency=max(cfg.concurrency), open_loop=cfg.open_loop[:1],
                               offline_batch_sizes=cfg.offline_batch_sizes[-1:], offline_pairs=min(cfg.offline_pairs, 128))


def load_bench_serve_config(data: dict) -> BenchServeConfig:
    """A validated config (every problem at once), with ``quick`` applied."""
    return quick_config(build_config(BenchServeConfig, data))


# ---------------------------------------------------------------------------------------------
# load generation and its statistics


@dataclasses.dataclass
class Sample:
    """One answered (or failed) request."""

    latency_s: float
    status: int  # HTTP status; 0 = no response (connection error, timeout)
    pairs: int = 0  # scored (context, candidate) pairs when the status is 200
    batch: int | None = None  # X-Batch-Size: requests merged in the replica's batch
    stages: dict[str, float] | None = None  # Server-Timing: ms per stage, as the app measured them


def percentile(values, q: float) -> float | None:
    """The q-th percentile (linear interpolation between closest ranks); None for no values."""
    arr = np.asarray(list(values), dtype=np.float64)
    return float(np.percentile(arr, q)) if arr.size else None


def summarize(samples: list[Sample], window_s: float, dropped: int = 0) -> dict:
    """Rates per second of window, latency percentiles of the 200s in ms, error and 503 shares."""
    if window_s <= 0:
        raise ValueError("window_s must be > 0")
    n = len(samples) + dropped
    ok = [s for s in samples if s.status == 200]
    shed = [s for s in samples if s.status == 503]
    errors = n - len(ok) - len(shed)  # everything else, client drops included

    def ms(q, group):
        v = percentile((s.latency_s for s in group), q)
        return None if v is None else round(v * 1000, 2)

    batches = [s.batch for s in ok if s.batch is not None]
    timed = [s.stages for s in ok if s.stages]
    stage_names = list(dict.fromkeys(name for st in timed for name in st))
    return {
        "requests": n,
        "ok": len(ok),
        "rps": round(len(ok) / window_s, 3),
        "pairs_per_s": round(sum(s.pairs for s in ok) / window_s, 2),
        "p50_ms": ms(50, ok),
        "p95_ms": ms(95, ok),
        "p99_ms": ms(99, ok),
        "error_rate": round(errors / n, 4) if n else 0.0,
        "rate_503": round(len(shed) / n, 4) if n else 0.0,
        "p50_503_ms": ms(50, shed),
        "p99_503_ms": ms(99, shed),
        "max_ms": ms(100, samples),  # the slowest answer of any status: nothing may hang
        "mean_batch": round(float(np.mean(batches)), 2) if batches else None,
        # mean ms per Server-Timing stage (a stage a request lacks counts 0 for it); what the
        # client saw beyond the route's total is the HTTP proxy, the network and the client
        "stages_ms": {name: round(float(np.mean([st.get(name, 0.0) for st in timed])), 2) for name in stage_names},
        "outside_route_ms": (round(float(np.mean([s.latency_s * 1000 - s.stages["total"] for s in ok
                                                  if s.stages and "total" in s.stages])), 2)
                             if any(s.stages and "total" in s.stages for s in ok) else None),
    }


def poisson_arrivals(rate: float, horizon_s: float, seed: int) -> list[float]:
    """Arrival times in [0, horizon_s) of a Poisson process of ``rate`` per second."""
    rng = np.random.default_rng(seed)
    out, t = [], 0.0
    while True:
        t += rng.exponential(1.0 / rate)
        if t >= horizon_s:
            return out
        out.append(t)


async def _post(session, url: str, body: dict) -> tuple[int, dict]:
    try:
        async with session.post(url, json=body) as r:
            await r.read()
            return r.status, {k.lower(): v for k, v in r.headers.items()}
    except (TimeoutError, aiohttp.ClientError, OSError):
        return 0, {}


def parse_server_timing(header: str | None) -> dict[str, float] | None:
    """``a;dur=1.5, b;dur=2`` -> ``{"a": 1.5, "b": 2.0}``; None without a (well-formed) header."""
    if not header:
        return None
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        try:
            out[name] = float(dur)
        except ValueError:
            return None
    return out


def _sample(status: int, headers: dict, latency: float, pairs: int) -> Sample:
    batch = headers.get("x-batch-size")  # header names arrive lower-cased
    return Sample(latency, status, pairs if status == 200 else 0, int(batch) if batch and batch.isdigit() else None,
                  parse_server_timing(headers.get("server-timing")) if status == 200 else None)


def _session(connections: int):
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections, force_close=False),
                                 timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S))


def _check_local(url: str) -> None:
    if not url.startswith(f"http://{HOST}:"):
        raise RecsysError(f"load is only sent to {HOST}, not {url}")


async def closed_loop(url: str, bodies: list[dict], concurrency: int, warmup_s: float, duration_s: float,
                      pairs_per_request: int, max_requests: int = MAX_REQUESTS_PER_POINT) -> dict:
    """``concurrency`` clients back to back for ``warmup_s + duration_s``; stats of the window."""
    _check_local(url)
    t0 = time.perf_counter()
    start, end = t0 + warmup_s, t0 + warmup_s + duration_s
    samples: list[Sample] = []
    issued = 0

    async def client(k: int, session) -> None:
        nonlocal issued
        j = k
        while time.perf_counter() < end and issued < max_requests:
            issued += 1
            sent = time.perf_counter()
            status, headers = await _post(session, url, bodies[j % len(bodies)])
            done = time.perf_counter()
            j += concurrency
            if start <= done <= end:
                samples.append(_sample(status, headers, done - sent, pairs_per_request))
            if status == 503:  # a polite client: wait what the server asks (at most 1 s)
                with contextlib.suppress(ValueError):
                    await asyncio.sleep(min(1.0, float(headers.get("retry-after", "1"))))

    async with _session(concurrency) as session:
        await asyncio.gather(*(client(k, session) for k in range(concurrency)))
    out = summarize(samples, duration_s)
    out["drain_s"] = round(max(0.0, time.perf_counter() - end), 2)
    return out


async def open_loop(url: str, bodies: list[dict], rate: float, warmup_s: float, duration_s: float,
                    pairs_per_request: int, seed: int, drain_s: float = 60.0) -> dict:
    """Poisson arrivals at ``rate``/s whatever the answers; latency from the scheduled send time."""
    _check_local(url)
    arrivals = poisson_arrivals(rate, warmup_s + duration_s, seed)[:MAX_REQUESTS_PER_POINT]
    samples: list[Sample] = []
    dropped = 0
    tasks = []
    in_flight = 0
    ok_in_window = 0  # 200s that arrive inside the window, whichever arrival they answer
    window: list[float] = []  # [start, end] once the clock starts

    async def one(body: dict, scheduled: float, measured: bool, session) -> None:
        nonlocal in_flight, ok_in_window
        status, headers = await _post(session, url, body)
        done = time.perf_counter()
        in_flight -= 1
        if status == 200 and window[0] <= done <= window[1]:
            ok_in_window += 1
        if measured:
            samples.append(_sample(status, headers, done - scheduled, pairs_per_request))

    async with _session(MAX_IN_FLIGHT) as session:
        t0 = time.perf_counter()
        window.extend([t0 + warmup_s, t0 + warmup_s + duration_s])
        for j, t in enumerate(arrivals):
            delay = t0 + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            measured = t >= warmup_s
            if in_flight >= MAX_IN_FLIGHT:
                dropped += measured
                continue
            in_flight += 1
            tasks.append(asyncio.create_task(one(bodies[j % len(bodies)], t0 + t, measured, session)))
        end = time.perf_counter()
        _, pending = await asyncio.wait(tasks, timeout=drain_s) if tasks else (set(), set())
        for task in pending:  # still unanswered after the drain: counted as failures
            task.cancel()
        late = len(pending)
    measured_n = sum(1 for t in arrivals if t >= warmup_s)
    # latency, 503 and error shares: the window's arrivals, however late they were answered;
    # throughput: 200s answered inside the window (as in the closed loop)
    out = summarize(samples, duration_s, dropped=dropped + late)
    out.update({"rps": round(ok_in_window / duration_s, 3),
                "pairs_per_s": round(ok_in_window * pairs_per_request / duration_s, 2),
                "offered_rps": round(rate, 3), "arrivals": measured_n, "unanswered": late,
                "drain_s": round(time.perf_counter() - end, 2)})
    return out


# ---------------------------------------------------------------------------------------------
# inputs: checkpoints and requests


def make_checkpoints(cfg: BenchServeConfig, root: Path) -> dict[str, str]:
    """Untrained retriever + ranker checkpoints over ``cfg.data``'s catalogue (see module doc)."""
    manifest = layout.read_manifest(cfg.data)
    catalogue = Catalogue.from_data_dir(cfg.data)
    tokenizer = load_tokenizer("default")
    out = {}
    for kind in ("retriever", "ranker"):
        # the retriever reads item tokens, as the `cpu` preset's does; the ranker reads text
        history = "items" if kind == "retriever" else "text"
        mc = ModelConfig(kind=kind, encoder="default", history=history,
                         tiny=encoder_shape(cfg.model))
        model = kinds.from_config(mc, tokenizer=tokenizer, item_tokens=catalogue.tokens)
        path = model.save(root / kind, extra={"text": manifest["text"], "untrained": True,
                                              "train_config": {"max_context_tokens": cfg.max_context_tokens}})
        catalogue.save(path / CATALOGUE_FILE)
        out[kind] = str(path)
    return out


def encoder_shape(model: str) -> dict | None:
    """``tiny``: TINY; ``minilm-random``: the default encoder's architecture (its config.json) with
    random weights - same speed as the pretrained one, no weight file needed; ``minilm``: None."""
    if model == "tiny":
        return dict(TINY)
    if model == "minilm-random":
        from transformers import BertConfig

        from recsys_ray.model.tokenizer import resolve_encoder_path

        full = BertConfig.from_pretrained(resolve_encoder_path("default")).to_dict()
        keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size", "hidden_act", "layer_norm_eps")
        return {k: full[k] for k in keys}
    return None


def request_bodies(data: str, catalogue_ids: list[str], candidates: int, seed: int, limit: int = 2000) -> list[dict]:
    """/v1/score bodies: each user's last 20 train items (oldest first), profile, random candidates."""
    seqs = layout.read_sequences(data, ["user_id", "item_ids", "n_train"])
    profiles: dict[str, dict] = {}
    users_file = Path(data) / layout.SOURCE / "users.parquet"
    if users_file.is_file():
        users = pq.read_table(users_file)
        cols = [c for c in ("age", "gender", "occupation") if c in users.column_names]
        for row in users.select(["user_id", *cols]).to_pylist():
            profiles[str(row["user_id"])] = {c: row[c] for c in cols if row[c] is not None}
    rng = random.Random(seed)
    known = set(catalogue_ids)
    out = []
    for row in seqs.to_pylist()[:limit]:
        history = [i for i in row["item_ids"][: row["n_train"]] if i in known][-20:]
        seen = set(row["item_ids"])
        pool = [i for i in rng.sample(catalogue_ids, min(len(catalogue_ids), candidates + len(seen))) if i not in seen]
        user = {"history": history}
        if str(row["user_id"]) in profiles:
            user["profile"] = profiles[str(row["user_id"])]
        out.append({"user": user, "item_ids": pool[:candidates]})
    rng.shuffle(out)
    if not out:
        raise RecsysError(f"{data}: no user sequences to build requests from")
    return out


def _ranker_pairs(p, bodies: list[dict], limit: int, per_body: int | None = None) -> list[tuple[list[int], list[list[int]]]]:
    """(context ids, [candidate ids ...]) per request body, at most ``limit`` pairs in all;
    ``per_body``: only each body's first candidates."""
    out, n = [], 0
    for b in bodies:
        if n >= limit:
            break
        ctx = p.context_ids(b["user"]["history"], b["user"].get("profile"))
        cands = p.candidate_ids(p.items.rows(b["item_ids"][:per_body]))[: limit - n]
        out.append((ctx, cands))
        n += len(cands)
    return out


def _best_seconds(device: str, fn, *args, repeats: int = 2) -> float:
    """The faster of ``repeats`` timed calls ``fn(*args)`` (its own best, as the targets ask)."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def offline_throughput(ckpt: dict[str, str], bodies: list[dict], cfg: BenchServeConfig, device: str) -> dict:
    """Best pairs/s of ``Predictor.score_pairs`` in this process over ``offline_batch_sizes``."""
    results = {}
    threads_before = torch.get_num_threads()
    # CPU: one thread (what each Ranker replica gets) and every core; GPU: as it comes
    thread_counts = [threads_before] if device.startswith("cuda") else sorted({1, os.cpu_count() or 1})
    for threads, bs in [(t, b) for t in thread_counts for b in cfg.offline_batch_sizes]:
        torch.set_num_threads(threads)
        p = Predictor(PredictorConfig(ranker=ckpt["ranker"], items=ckpt["retriever"], device=device, batch_size=bs,
                                      precision=cfg.precision))
        reqs = _ranker_pairs(p, bodies, cfg.offline_pairs)
        ctx = [c for c, cands in reqs for _ in cands]
        cands = [cand for _, cs in reqs for cand in cs]
        p.score_pairs(ctx[:bs], cands[:bs])  # warm-up (allocations, kernels)
        best = _best_seconds(device, p.score_pairs, ctx, cands)
        results[f"{threads} thread{'s' if threads > 1 else ''}, {bs} pairs per pass"] = round(len(ctx) / best, 2)
        log.info("offline score_pairs, %d threads, %d pairs per pass: %.1f pairs/s", threads, bs, len(ctx) / best)
    torch.set_num_threads(threads_before)
    return {"pairs_per_s": results, "best_pairs_per_s": max(results.values()), "pairs": cfg.offline_pairs}


def offline_single_candidate(ckpt: dict[str, str], bodies: list[dict], batch: int, device: str,
                             requests: int = 96, precision: str = "fp32") -> dict:
    """The model's own batching gain for one-candidate requests: ``score_many`` one request per call
    vs ``batch`` requests per call (what a Ranker replica's batcher does), one torch thread
    on CPU (a replica's share). No serving at all: the ceiling of Serve's batch on / off ratio."""
    threads_before = torch.get_num_threads()
    if not device.startswith("cuda"):
        torch.set_num_threads(1)
    try:
        p = Predictor(PredictorConfig(ranker=ckpt["ranker"], items=ckpt["retriever"], device=device, batch_size=128,
                                      precision=precision))
        reqs = _ranker_pairs(p, bodies, requests, per_body=1)
        out = {"requests": len(reqs), "batch": batch, "torch_threads": torch.get_num_threads()}

        def calls(size: int) -> None:
            for i in range(0, len(reqs), size):
                p.score_many([r[0] for r in reqs[i:i + size]], [r[1] for r in reqs[i:i + size]])

        for label, size in (("one_per_pass", 1), ("batched", batch)):
            p.score_many([r[0] for r in reqs[:size]], [r[1] for r in reqs[:size]])  # warm-up
            out[f"{label}_pairs_per_s"] = round(len(reqs) / _best_seconds(device, calls, size), 2)
        out["ratio"] = _ratio(out["batched_pairs_per_s"], out["one_per_pass_pairs_per_s"])
        log.info("offline one-candidate requests: %s", out)
        return out
    finally:
        torch.set_num_threads(threads_before)


# roles of the processes on this machine, by command line (Ray sets replica process titles)
CPU_ROLES = [
    ("Ranker replicas", re.compile(r"ServeReplica:[^:\s]+:Ranker")),
    ("ingress replica holding the retriever (RetrieverAPI)", re.compile(r"ServeReplica:[^:\s]+:RetrieverAPI")),
    ("Retriever replica", re.compile(r"ServeReplica:[^:\s]+:Retriever\b")),
    ("ingress replica (RecsysAPI)", re.compile(r"ServeReplica:[^:\s]+:RecsysAPI")),
    ("HTTP proxy", re.compile(r"ray::ProxyActor")),
    ("Serve controller", re.compile(r"ray::ServeController")),
    ("Ray system (raylet, GCS, dashboard, ...)", re.compile(r"raylet|gcs_server|dashboard|log_monitor|ray/_private|ray::")),
]
BENCH_ROLE = "benchmark process (load generator, monitor)"


def cpu_seconds_by_pid() -> dict[int, tuple[str, float]]:
    """pid -> (role, user + system CPU seconds so far) for every process psutil can read."""
    out = {}
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
        try:
            times = proc.info["cpu_times"]
            if times is None:
                continue
            cmd = " ".join(proc.info["cmdline"] or [])
            role = BENCH_ROLE if proc.info["pid"] == me else next(
                (name for name, pat in CPU_ROLES if pat.search(cmd)), "other")
            out[proc.info["pid"]] = (role, times.user + times.system)
        except Exception:  # a process that ended while we looked
            continue
    return out


class CpuAccount:
    """CPU used per process role between ``__enter__`` and ``__exit__``: cores busy on average.

    A process started in between counts from zero; one that ended in between is lost (its
    share shows only in ``machine_cores`` , psutil's whole-machine figure)."""

    def __enter__(self) -> CpuAccount:
        self._before = {pid: secs for pid, (_, secs) in cpu_seconds_by_pid().items()}
        self._t0, self._cpu0 = time.perf_counter(), psutil.cpu_times()
        return self

    def __exit__(self, *exc) -> None:
        after, wall, cpu1 = cpu_seconds_by_pid(), time.perf_counter() - self._t0, psutil.cpu_times()
        roles: dict[str, float] = {}
        for pid, (role, secs) in after.items():
            roles[role] = roles.get(role, 0.0) + secs - self._before.get(pid, 0.0)
        busy = sum(getattr(cpu1, f) - getattr(self._cpu0, f) for f in ("user", "system", "nice", "irq", "softirq"))
        self.result = {"wall_s": round(wall, 1), "machine_cores": round(busy / wall, 2),
                       "cores_by_role": {k: round(v / wall, 3) for k, v in sorted(roles.items(), key=lambda kv: -kv[1])}}

    def per_request_ms(self, rps: float) -> dict[str, float]:
        """Cores by role -> CPU milliseconds per answered request at ``rps``."""
        if not rps:
            return {}
        return {k: round(v * 1000 / rps, 1) for k, v in self.result["cores_by_role"].items()}


# ---------------------------------------------------------------------------------------------
# the Serve side


def bench_serve_config(cfg: BenchServeConfig, ckpt: dict[str, str], port: int, max_batch_size: int | None = None,
                       fixed_replicas: int = 0) -> dict:
    """local-ranker.yaml pointed at the run's checkpoints and port (GPU: 0.5 GPU per model replica).

    ``fixed_replicas``: the Ranker at that many replicas instead of autoscaling."""
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    config["http_options"].update(host=HOST, port=port, request_timeout_s=REQUEST_TIMEOUT_S)
    app = config["applications"][0]
    app["args"].update(checkpoint=ckpt["retriever"], ranker_checkpoint=ckpt["ranker"], rerank_top=cfg.rerank_top,
                       precision=cfg.precision)
    app["args"].pop("demo_data", None)  # the demo page's users: not part of what is measured
    deps = {d["name"]: d for d in app["deployments"]}
    if cfg.gpu:
        app["args"].update(device="auto", torch_threads=None, forward_batch_size=256)
        for name in ("Ranker", "Retriever", "RetrieverAPI"):
            if name in deps:
                deps[name]["ray_actor_options"] = {"num_cpus": 1, "num_gpus": 0.5}
    if max_batch_size is not None:
        deps["Ranker"]["user_config"] = {**deps["Ranker"]["user_config"], "max_batch_size": max_batch_size}
    if fixed_replicas:
        deps["Ranker"].pop("autoscaling_config", None)
        deps["Ranker"]["num_replicas"] = fixed_replicas
    return config


class ReplicaMonitor:
    """Samples ``serve.status()`` every ``period_s`` in a thread: replica counts per deployment."""

    def __init__(self, app: str, period_s: float = 1.0):
        self.app, self.period_s = app, period_s
        self.phase = "start"
        self.timeline: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.perf_counter()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                app = serve.status().applications.get(self.app)
                counts = {name: {state.value if hasattr(state, "value") else str(state): n
                                 for state, n in d.replica_states.items()}
                          for name, d in (app.deployments.items() if app else [])}
                self.timeline.append({"t": round(time.perf_counter() - self._t0, 1), "phase": self.phase,
                                      "ranker_running": counts.get("Ranker", {}).get("RUNNING", 0),
                                      "ranker_states": counts.get("Ranker", {})})
            except Exception as exc:  # a status hiccup must not end the benchmark
                log.debug("serve.status failed: %s", exc)
            self._stop.wait(self.period_s)

    def __enter__(self) -> ReplicaMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def replicas_during(self, phase: str) -> list[int]:
        seen = [s["ranker_running"] for s in self.timeline if s["phase"] == phase]
        return [min(seen), max(seen)] if seen else []

    def changes(self) -> list[dict]:
        """The timeline reduced to the samples where the running count changed (and the ends)."""
        out, last = [], None
        for s in self.timeline:
            key = json.dumps(s["ranker_states"], sort_keys=True)
            if key != last:
                out.append(s)
                last = key
        if self.timeline and out[-1] is not self.timeline[-1]:
            out.append(self.timeline[-1])
        return out


def _wait_ranker_batch(url: str, max_batch_size: int, timeout_s: float = 120) -> None:
    """Until /readyz shows the Ranker's new max_batch_size 5 times running (every replica, w.h.p.)."""
    deadline, streak = time.monotonic() + timeout_s, 0
    while streak < 5:
        if time.monotonic() > deadline:
            raise RecsysError(f"Ranker max_batch_size={max_batch_size} not applied within {timeout_s:.0f} s")
        try:
            got = requests.get(f"{url}/readyz", timeout=10).json()["models"]["ranker"]["max_batch_size"]
        except Exception:
            got = None
        streak = streak + 1 if got == max_batch_size else 0
        time.sleep(0.3)


def _wait_ranker_replicas(app: str, n: int, timeout_s: float = 180) -> None:
    """Until ``n`` Ranker replicas are RUNNING and none is starting or stopping."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dep = serve.status().applications[app].deployments.get("Ranker")
        states = {(st.value if hasattr(st, "value") else str(st)): k for st, k in (dep.replica_states.items() if dep else [])}
        if states.get("RUNNING", 0) == n and sum(states.values()) == n:
            return
        time.sleep(1)
    raise RecsysError(f"the Ranker did not settle at {n} running replicas within {timeout_s:.0f} s")


def ranker_batch_size(config: dict) -> int:
    """The Ranker's ``max_batch_size`` in a Serve config dict (its ``user_config``)."""
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == "Ranker")["user_config"]["max_batch_size"]


def run_serve(cfg: BenchServeConfig, ckpt: dict[str, str], bodies: list[dict], rec_bodies: list[dict]) -> dict:
    init_ray()
    port = free_port(HOST)
    config = bench_serve_config(cfg, ckpt, port)
    app_name = config["applications"][0]["name"]
    on_batch = ranker_batch_size(config)
    url = f"http://{HOST}:{port}"
    t0 = time.perf_counter()
    deploy_config(config)
    out: dict = {"startup_s": round(time.perf_counter() - t0, 1), "config": config, "closed": {}, "open": {}}
    log.info("serve app up in %.0f s at %s", out["startup_s"], url)
    pairs = cfg.candidates
    try:
        with ReplicaMonitor(app_name) as mon:
            for c in cfg.concurrency:
                mon.phase = f"closed c={c}"
                r = asyncio.run(closed_loop(f"{url}/v1/score", bodies, c, cfg.warmup_s, cfg.duration_s, pairs))
                r["ranker_replicas"] = mon.replicas_during(mon.phase)
                out["closed"][str(c)] = r
                log.info("serve %s: %s", mon.phase, _brief(r))

            c = cfg.batch_compare_concurrency

            def batch_off_on(name: str, reqs: list[dict], pairs_per_request: int) -> dict:
                """Closed loop at ``c`` clients with ``max_batch_size`` 1, then the config's, CPU accounted."""
                points = {}
                for label, size in (("off", 1), ("on", on_batch)):
                    deploy_config(bench_serve_config(cfg, ckpt, port, max_batch_size=size))  # user_config only: in place
                    _wait_ranker_batch(url, size)
                    mon.phase = f"{name}batch {label} c={c}"
                    with CpuAccount() as acct:
                        r = asyncio.run(closed_loop(f"{url}/v1/score", reqs, c, cfg.warmup_s, cfg.duration_s,
                                                    pairs_per_request))
                    r["cpu"] = {**acct.result, "ms_per_request": acct.per_request_ms(r["rps"])}
                    r["ranker_replicas"] = mon.replicas_during(mon.phase)
                    r["max_batch_size"] = size
                    points[label] = r
                    log.info("serve %s: %s", mon.phase, _brief(r))
                return points

            compare = out["batch_compare"] = batch_off_on("", bodies, pairs)
            if cfg.single_candidate_compare:
                # one candidate per request: each unbatched request is one tiny forward pass
                singles = [{**b, "item_ids": b["item_ids"][:1]} for b in bodies]
                out["batch_compare_single"] = batch_off_on("1-candidate ", singles, 1)

            best = max(v["rps"] for v in [*out["closed"].values(), *compare.values()])
            for frac in cfg.open_loop:
                rate = max(0.1, best * frac)
                mon.phase = f"open {frac:g}x"
                r = asyncio.run(open_loop(f"{url}/v1/score", bodies, rate, cfg.warmup_s, cfg.duration_s, pairs, cfg.seed))
                r["fraction_of_best"] = frac
                r["ranker_replicas"] = mon.replicas_during(mon.phase)
                out["open"][f"{frac:g}"] = r
                log.info("serve %s (%.2f req/s offered): %s", mon.phase, rate, _brief(r))

            mon.phase = "recommend c=1"
            r = asyncio.run(closed_loop(f"{url}/v1/recommend", rec_bodies, 1, cfg.warmup_s, cfg.duration_s, cfg.rerank_top))
            r["ranker_replicas"] = mon.replicas_during(mon.phase)
            out["recommend"] = r
            log.info("serve %s: %s", mon.phase, _brief(r))

            mon.phase = "quiet"
            time.sleep(cfg.cooldown_s)

            if cfg.fixed_replicas:
                # the capacity comparison without an autoscaling transient: Ranker pinned, warm
                mon.phase = f"redeploy: fixed {cfg.fixed_replicas} replicas"  # Serve replaces the replicas
                deploy_config(bench_serve_config(cfg, ckpt, port, fixed_replicas=cfg.fixed_replicas))
                _wait_ranker_replicas(app_name, cfg.fixed_replicas)
                mon.phase = f"fixed {cfg.fixed_replicas} replicas c={c}"
                r = asyncio.run(closed_loop(f"{url}/v1/score", bodies, c, cfg.warmup_s, cfg.duration_s, pairs))
                r["ranker_replicas"] = mon.replicas_during(mon.phase)
                out["fixed"] = r
                log.info("serve %s: %s", mon.phase, _brief(r))
        out["autoscaling"] = {"changes": mon.changes(), "timeline": mon.timeline}
    finally:
        serve.shutdown()
    return out


# ---------------------------------------------------------------------------------------------
# the plain side


@contextlib.contextmanager
def plain_server(ckpt: dict[str, str], cfg: BenchServeConfig, log_path: Path):
    """``python -m recsys_ray.bench.serve_plain`` on a free 127.0.0.1 port; yields its URL."""
    port = free_port(HOST)
    cmd = [sys.executable, "-m", "recsys_ray.bench.serve_plain", "--checkpoint", ckpt["retriever"],
           "--ranker-checkpoint", ckpt["ranker"], "--rerank-top", str(cfg.rerank_top),
           "--device", "auto" if cfg.gpu else "cpu", "--precision", cfg.precision, "--host", HOST, "--port", str(port)]
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=str(REPO))
        try:
            url = f"http://{HOST}:{port}"
            deadline = time.monotonic() + 600
            while True:
                if proc.poll() is not None:
                    raise RecsysError(f"plain server exited with {proc.returncode}; see {log_path}")
                with contextlib.suppress(requests.RequestException):
                    if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RecsysError(f"plain server not ready after 600 s; see {log_path}")
                time.sleep(1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_plain(cfg: BenchServeConfig, ckpt: dict[str, str], bodies: list[dict], out_dir: Path) -> dict:
    out: dict = {"closed": {}}
    t0 = time.perf_counter()
    with plain_server(ckpt, cfg, out_dir / "plain_server.log") as url:
        out["startup_s"] = round(time.perf_counter() - t0, 1)
        for c in cfg.concurrency:
            r = asyncio.run(closed_loop(f"{url}/v1/score", bodies, c, cfg.warmup_s, cfg.duration_s, cfg.candidates))
            out["closed"][str(c)] = r
            log.info("plain closed c=%d: %s", c, _brief(r))
    return out


# ---------------------------------------------------------------------------------------------
# the run


def _brief(r: dict) -> str:
    return (f"{r['rps']} req/s, {r['pairs_per_s']} pairs/s, p50 {r['p50_ms']} p99 {r['p99_ms']} ms, "
            f"503 {r['rate_503']:.1%}, errors {r['error_rate']:.1%}, batch {r['mean_batch']}")


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a and b else None


def offline_recommend(ckpt: str, bodies: list[dict], config: dict, batches: tuple[int, ...] = (1, 8, 16),
                      users: int = 96, precision: str = "fp32", threads: tuple[int, ...] = (1, 2)) -> dict:
    """users/s of ``Predictor.recommend`` (k 10, history excluded) with local.yaml's settings,
    ``b`` users per call for each b, on one torch thread (a Retriever replica's share: the
    ``best_users_per_s`` ceiling) and on every count in ``threads`` (``best_users_per_s_machine``:
    what the whole machine does offline, the ceiling of an app with a replica per core)."""
    args = config["applications"][0]["args"]
    threads_before = torch.get_num_threads()
    try:
        out = {}
        for t in sorted(set(threads) | {1}):
            # a Predictor per thread count: an ONNX session takes its thread count when it loads
            p = Predictor(PredictorConfig(retriever=ckpt, batch_size=args["forward_batch_size"], torch_threads=t,
                                          popularity_weight=args.get("popularity_weight", 0.0), precision=precision))
            ctx = [p.user_inputs(b["user"]) for b in bodies[:users]]
            excl = [p.items.rows(b["user"].get("history") or []) for b in bodies[:users]]
            p.recommend(ctx[:16], 10, excl[:16])  # warm-up: item vectors, kernels
            suffix = "" if t == 1 else f"_{t}_threads"
            for b in batches:
                secs = _best_seconds("cpu", lambda b=b, p=p, ctx=ctx, excl=excl: [
                    p.recommend(ctx[i:i + b], 10, excl[i:i + b]) for i in range(0, len(ctx), b)])
                out[f"users_per_s_{b}_per_call{suffix}"] = round(len(ctx) / secs, 2)
        one = [v for k, v in out.items() if "threads" not in k]
        out["best_users_per_s"] = max(one)
        out["best_users_per_s_machine"] = max(v for k, v in out.items() if k.startswith("users_per_s"))
        out["ms_per_user_alone"] = round(1000 / out["users_per_s_1_per_call"], 2)
        return out
    finally:
        torch.set_num_threads(threads_before)


def with_retriever_layout(config: dict, in_ingress: bool) -> dict:
    """A copy of a Serve config with the retriever inside the HTTP ingress (one RetrieverAPI
    deployment with the Retriever's options, the ingress's request limits) or as its own
    Retriever deployment behind a RecsysAPI ingress of 0 CPU: the same model settings either way."""
    config = copy.deepcopy(config)
    app = config["applications"][0]
    deps = {d["name"]: d for d in app.get("deployments", [])}
    app["args"]["retriever_in_ingress"] = in_ingress
    if in_ingress and "RetrieverAPI" not in deps:
        fused = {**deps.pop("Retriever"), "name": "RetrieverAPI"}
        ingress = deps.pop("RecsysAPI", {})
        for key in ("max_ongoing_requests", "max_queued_requests"):
            if key in ingress:
                fused[key] = ingress[key]
        deps["RetrieverAPI"] = fused
    elif not in_ingress and "RetrieverAPI" in deps:
        fused = deps.pop("RetrieverAPI")
        deps["RecsysAPI"] = {"name": "RecsysAPI", "ray_actor_options": {"num_cpus": 0},
                             **{k: fused[k] for k in ("max_ongoing_requests", "max_queued_requests",
                                                      "backpressure_config") if k in fused}}
        deps["Retriever"] = {**{k: v for k, v in fused.items() if k not in ("max_ongoing_requests", "max_queued_requests")},
                             "name": "Retriever", "max_ongoing_requests": 32, "max_queued_requests": 64}
    app["deployments"] = list(deps.values())
    return config


def run_recommend(cfg: BenchServeConfig, ckpt: dict[str, str], rec_bodies: list[dict]) -> dict:
    """mode=recommend: local.yaml (Retriever only) on the run's checkpoint in each of
    ``recommend_layouts``, closed loops on /v1/recommend at each of ``recommend_concurrency``,
    with each point's Server-Timing stages; one offline ceiling for all of them."""
    base = yaml.safe_load(RETRIEVER_CONFIG.read_text())
    base["applications"][0]["args"]["precision"] = cfg.precision
    out: dict = {"offline": offline_recommend(ckpt["retriever"], rec_bodies, base, precision=cfg.precision),
                 "layouts": {}, "precision": cfg.precision}
    log.info("offline recommend: %s", out["offline"])
    direct = "direct" in cfg.recommend_layouts
    if direct:  # read by every Serve process when it starts: the Ray this run starts must carry it
        if ray.is_initialized() and os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1":
            raise RecsysError("recommend_layouts direct: Ray is already running without RAY_SERVE_ENABLE_DIRECT_INGRESS=1")
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
        # an ingress replica drains 30 s before it stops by default: nothing to drain between layouts
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")
    out["direct_ingress_on"] = direct
    init_ray()
    for layout_name in cfg.recommend_layouts:
        config = with_retriever_layout(base, layout_name in ("in_ingress", "direct"))
        port = free_port(HOST)
        config["http_options"].update(host=HOST, port=port, request_timeout_s=REQUEST_TIMEOUT_S)
        config["applications"][0]["args"]["checkpoint"] = ckpt["retriever"]
        config["applications"][0]["args"].pop("demo_data", None)
        res: dict = {"closed": {}, "serve_config": config}
        t0 = time.perf_counter()
        deploy_config(config)
        res["startup_s"] = round(time.perf_counter() - t0, 1)
        try:
            base_url = f"http://{HOST}:{port}"
            if layout_name == "direct":
                urls = ray_compat.direct_ingress_urls(config["applications"][0]["name"])
                if len(urls) != 1:
                    raise RecsysError(f"recommend_layouts direct: expected one ingress replica serving HTTP itself, got {urls}")
                # the replica binds http_options.host (HOST) like the proxy; the target names the node's IP
                base_url = res["url"] = f"http://{HOST}:{urls[0].rsplit(':', 1)[1]}"
            for c in cfg.recommend_concurrency:
                with CpuAccount() as acct:
                    r = asyncio.run(closed_loop(f"{base_url}/v1/recommend", rec_bodies, c, cfg.warmup_s,
                                                cfg.duration_s, 1))
                r["cpu"] = {**acct.result, "ms_per_request": acct.per_request_ms(r["rps"])}
                r["over_offline_best"] = _ratio(r["rps"], out["offline"]["best_users_per_s"])
                r["over_offline_machine_best"] = _ratio(r["rps"], out["offline"]["best_users_per_s_machine"])
                res["closed"][str(c)] = r
                log.info("serve /v1/recommend (%s) c=%d: %s; stages %s, outside the route %s ms", layout_name, c,
                         _brief(r), r["stages_ms"], r["outside_route_ms"])
        finally:
            serve.shutdown()
            ray_compat.wait_serve_gone()
        out["layouts"][layout_name] = res
    return out


def recommend_markdown(res: dict) -> str:
    """mode=recommend: served vs offline users/s, and where a request's time went, per layout."""
    off, layouts = res["recommend"]["offline"], res["recommend"]["layouts"]
    closed = {(name, c): r for name, lay in layouts.items() for c, r in lay["closed"].items()}
    names = list(dict.fromkeys(k for r in closed.values() for k in (r.get("stages_ms") or {})))
    lines = [f"Command: `{res['command']}`  ", f"{res['date']}, {res['machine']['cpus']} CPUs, Ray {res['machine']['ray']}; "
             f"wall time {res['wall_s']:.0f} s."
             + (" Serve direct ingress on (RAY_SERVE_ENABLE_DIRECT_INGRESS=1) for every layout; `direct` calls the "
                "replica's own port, the others the proxy." if res["recommend"].get("direct_ingress_on") else ""), "",
             f"| offline Predictor.recommend (1 thread, {res['recommend'].get('precision', 'fp32')}) | users/s |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in off.items()]
    lines += ["", "| layout | /v1/recommend | req/s | x offline best (1 thread) | x offline best (machine) | p50 ms | p99 ms | "
              + " | ".join(names) + " | outside the route |", "|---|---|---|---|---|---|---|" + "---|" * (len(names) + 1)]
    for (name, c), r in closed.items():
        st = r.get("stages_ms") or {}
        lines.append(f"| {name} | {_clients(c)} | {_fmt(r['rps'], 2)} | {_fmt(r['over_offline_best'], 3)} "
                     f"| {_fmt(r.get('over_offline_machine_best'), 3)} | {_fmt(r['p50_ms'], 1)} "
                     f"| {_fmt(r['p99_ms'], 1)} | " + " | ".join(_fmt(st.get(k), 1) for k in names)
                     + f" | {_fmt(r.get('outside_route_ms'), 1)} |")
    roles = list(dict.fromkeys(k for r in closed.values() for k in (r.get("cpu") or {}).get("ms_per_request", {})))
    if roles:
        lines += ["", "CPU ms per answered request, by process:", "",
                  "| layout | clients | machine cores busy | " + " | ".join(roles) + " |", "|---|---|---|" + "---|" * len(roles)]
        for (name, c), r in closed.items():
            cpu = r.get("cpu") or {}
            per = cpu.get("ms_per_request", {})
            lines.append(f"| {name} | {c} | {_fmt(cpu.get('machine_cores'), 2)} | " + " | ".join(_fmt(per.get(k), 1) for k in roles) + " |")
    return "\n".join(lines) + "\n"


def run_bench_serve(cfg: BenchServeConfig, command: str = "") -> dict:
    """Every measurement above; OUTPUT/results.json + results.md; returns the job's summary."""
    if cfg.gpu and not torch.cuda.is_available():
        raise RecsysError("--gpu: no CUDA GPU is visible to this process")
    if not layout.is_prepared(cfg.data) or not layout.has_part(cfg.data, layout.SEQUENCES):
        raise RecsysError(f"{cfg.data}: not a prepared data directory (run jobs/prepare_data.py)")
    out_dir = work_dir(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    busy = busy_cpus()
    load_before = os.getloadavg()
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    try:
        if cfg.retriever and cfg.ranker:
            ckpt = {"retriever": resolve(cfg.retriever), "ranker": resolve(cfg.ranker)}
            made = False
        elif cfg.retriever or cfg.ranker:
            raise RecsysError("give both --retriever and --ranker checkpoints, or neither (untrained ones are made)")
        else:
            ckpt = make_checkpoints(cfg, tmp)
            made = True
        catalogue = Catalogue.load(ckpt["retriever"])
        bodies = request_bodies(cfg.data, catalogue.ids, cfg.candidates, cfg.seed)
        rec_bodies = [{"user": b["user"], "k": 10} for b in bodies]
        if cfg.mode == "recommend":
            rec = run_recommend(cfg, ckpt, rec_bodies)
            results = {"command": command, "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                       "machine": {"cpus": os.cpu_count(), "busy_cpus_before": busy, "ray": ray.__version__},
                       "config": to_dict(cfg), "recommend": rec, "wall_s": round(time.perf_counter() - started, 1)}
            (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
            (out_dir / "results.md").write_text(recommend_markdown(results))
            return {"output": publish(cfg.output, out_dir), "offline": rec["offline"],
                    "recommend": {f"{name} c={c}": {k: r[k] for k in ("rps", "p50_ms", "p99_ms", "over_offline_best", "stages_ms")}
                                  for name, lay in rec["layouts"].items() for c, r in lay["closed"].items()}}
        device = "cuda" if cfg.gpu else "cpu"
        offline = offline_throughput(ckpt, bodies, cfg, device)
        if cfg.single_candidate_compare:
            on_batch = ranker_batch_size(bench_serve_config(cfg, ckpt, 0))
            offline["single_candidate"] = offline_single_candidate(ckpt, bodies, on_batch, device, precision=cfg.precision)
        plain = run_plain(cfg, ckpt, bodies, out_dir)
        served = run_serve(cfg, ckpt, bodies, rec_bodies)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if ray.is_initialized():
            ray.shutdown()

    compare_c = str(cfg.batch_compare_concurrency)
    multi = [*served["closed"].values(), *served["batch_compare"].values(), *([served["fixed"]] if "fixed" in served else [])]
    best_serve = max(multi, key=lambda r: r["pairs_per_s"])
    single = served.get("batch_compare_single") or {}
    ratios = {
        "batch_on_over_off": _ratio(served["batch_compare"]["on"]["rps"], served["batch_compare"]["off"]["rps"]),
        "batch_on_over_off_single_candidate": _ratio(single["on"]["pairs_per_s"], single["off"]["pairs_per_s"]) if single else None,
        "serve_fixed_over_plain": _ratio(served["fixed"]["rps"], plain["closed"][compare_c]["rps"])
        if "fixed" in served and compare_c in plain["closed"] else None,
        "serve_over_plain_by_concurrency": {c: _ratio(served["closed"][c]["rps"], plain["closed"][c]["rps"])
                                            for c in served["closed"] if c in plain["closed"]},
        "offline_single_candidate_batched_over_one": (offline.get("single_candidate") or {}).get("ratio"),
        "serve_best_over_offline_pairs": _ratio(best_serve["pairs_per_s"], offline["best_pairs_per_s"]),
        "plain_best_over_offline_pairs": _ratio(max(r["pairs_per_s"] for r in plain["closed"].values()),
                                                offline["best_pairs_per_s"]),
    }
    results = {
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpus": os.cpu_count(), "gpu": cfg.gpu, "busy_cpus_before": busy, "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg(), "ray": ray.__version__},
        "config": to_dict(cfg),
        "checkpoints": {"made_untrained": True, "model": cfg.model} if made else {"made_untrained": False, **ckpt},
        "offline": offline, "plain": plain, "serve": {k: v for k, v in served.items() if k != "config"},
        "serve_config": served["config"],
        "ratios": ratios,
        "targets": {"serve_over_offline_target": OFFLINE_TARGET,
                    "serve_over_offline_met": (ratios["serve_best_over_offline_pairs"] or 0) >= OFFLINE_TARGET},
        "batch_compare_concurrency": int(compare_c),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out_dir / "results.md").write_text(results_markdown(results))
    return {"output": publish(cfg.output, out_dir), "ratios": ratios, "offline_pairs_per_s": offline["best_pairs_per_s"],
            "serve_best_rps": best_serve["rps"], "recommend_p99_ms": served["recommend"]["p99_ms"],
            "wall_s": results["wall_s"]}


def _fmt(v, nd=1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:,.{nd}f}" if isinstance(v, float) else str(v)


def _clients(c) -> str:
    return f"closed, {c} client{'s' if int(c) > 1 else ''}"


def _load_row(name: str, mode: str, r: dict) -> str:
    reps = r.get("ranker_replicas") or []
    rep = "-" if not reps else (str(reps[0]) if reps[0] == reps[1] else f"{reps[0]}-{reps[1]}")
    return (f"| {name} | {mode} | {_fmt(r['rps'], 2)} | {_fmt(r['pairs_per_s'])} | {_fmt(r['p50_ms'], 0)} | "
            f"{_fmt(r['p95_ms'], 0)} | {_fmt(r['p99_ms'], 0)} | {r['error_rate']:.1%} | {r['rate_503']:.1%} | "
            f"{_fmt(r['mean_batch'])} | {rep} |")


def _load_table(res: dict) -> list[str]:
    """Every load point: plain, Serve closed loops, batch off/on, pinned Ranker, open loops, recommend."""
    serve, plain, c = res["serve"], res["plain"], res["batch_compare_concurrency"]
    lines = ["| server | load | req/s | pairs/s | p50 ms | p95 ms | p99 ms | errors | 503 | mean batch | ranker replicas |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_load_row("plain FastAPI", _clients(n), r) for n, r in plain["closed"].items()]
    lines += [_load_row("Ray Serve", _clients(n), r) for n, r in serve["closed"].items()]
    lines += [_load_row(f"Ray Serve, batch {label} (max {r['max_batch_size']})", f"closed, {c} clients", r)
              for label, r in serve["batch_compare"].items()]
    lines += [_load_row(f"Ray Serve, 1 candidate/request, batch {label} (max {r['max_batch_size']})", f"closed, {c} clients", r)
              for label, r in (serve.get("batch_compare_single") or {}).items()]
    if "fixed" in serve:
        lines.append(_load_row(f"Ray Serve, Ranker fixed at {res['config']['fixed_replicas']} replicas",
                               f"closed, {c} clients", serve["fixed"]))
    lines += [_load_row("Ray Serve", f"open, {r['offered_rps']:.2f} req/s offered ({frac}x best)", r)
              for frac, r in serve["open"].items()]
    lines.append(_load_row("Ray Serve /v1/recommend", "closed, 1 client", serve["recommend"]))
    return lines


def _ratio_table(res: dict) -> list[str]:
    """The offline numbers and every ratio of one run (ours vs the plain alternative)."""
    ratios, off, c = res["ratios"], res["offline"], res["batch_compare_concurrency"]
    lines = [
        "Offline `Predictor.score_pairs` in the benchmark process: "
        + "; ".join(f"{k}: {v:,.1f} pairs/s" for k, v in off["pairs_per_s"].items()) + ".",
        "",
        "| ratio | value |",
        "|---|---|",
        f"| batching on / off, req/s at {c} clients | {_fmt(ratios['batch_on_over_off'], 2)} |",
        f"| batching on / off, 1 candidate per request, pairs/s at {c} clients "
        f"(target >= 2) | {_fmt(ratios.get('batch_on_over_off_single_candidate'), 2)} |",
        f"| offline `score_many`, 1-candidate requests, {(off.get('single_candidate') or {}).get('batch', '-')} per call / 1 per call, "
        f"pairs/s, 1 thread (the model's own ceiling for the ratio above) | "
        f"{_fmt(ratios.get('offline_single_candidate_batched_over_one'), 2)} |",
        f"| Ray Serve (Ranker fixed, warm) / plain, req/s at {c} clients (target >= 1) | "
        f"{_fmt(ratios.get('serve_fixed_over_plain'), 2)} |",
    ]
    lines += [f"| Ray Serve / plain, req/s at {_clients(n).removeprefix('closed, ')} | {_fmt(v, 2)} |"
              for n, v in ratios["serve_over_plain_by_concurrency"].items()]
    lines += [
        f"| Ray Serve best / offline best, pairs/s (target >= {res['targets']['serve_over_offline_target']}) | "
        f"{_fmt(ratios['serve_best_over_offline_pairs'], 2)} |",
        f"| plain best / offline best, pairs/s | {_fmt(ratios['plain_best_over_offline_pairs'], 2)} |",
    ]
    return lines


def _cpu_table(res: dict) -> list[str]:
    """CPU milliseconds per answered request by process role, during the batch off/on points."""
    serve = res["serve"]
    per_request = {"batch_compare": f"{res['config']['candidates']} candidates/request",
                   "batch_compare_single": "1 candidate/request"}
    cpu_rows = [(f"batch {label}, {what}", r) for key, what in per_request.items()
                for label, r in (serve.get(key) or {}).items() if "cpu" in r]
    if not cpu_rows:
        return []
    roles = list(dict.fromkeys(k for _, r in cpu_rows for k in r["cpu"]["cores_by_role"]))
    lines = [
        f"CPU per answered request by process (ms; cores busy on average x 1000 / req/s) at "
        f"{res['batch_compare_concurrency']} clients:",
        "",
        "| phase | req/s | machine cores busy | " + " | ".join(roles) + " |",
        "|---|---|---|" + "---|" * len(roles),
    ]
    for name, r in cpu_rows:
        ms = r["cpu"]["ms_per_request"]
        lines.append(f"| {name} | {_fmt(r['rps'], 2)} | {_fmt(r['cpu']['machine_cores'], 2)} | "
                     + " | ".join(_fmt(ms.get(k)) for k in roles) + " |")
    return lines


def _autoscaling_table(res: dict) -> list[str]:
    lines = ["Ranker replicas over time (samples where the running count changed):", "",
             "| t (s) | phase | running | all replica states |", "|---|---|---|---|"]
    for s in res["serve"]["autoscaling"]["changes"]:
        states = ", ".join(f"{k} {v}" for k, v in sorted(s["ranker_states"].items()))
        lines.append(f"| {s['t']:.0f} | {s['phase']} | {s['ranker_running']} | {states} |")
    return lines


def _stage_table(res: dict) -> list[str]:
    """Where a request's time went (mean ms per Server-Timing stage; 'outside' = proxy + client)."""
    points = [("plain FastAPI /v1/score", _clients(n), r) for n, r in res["plain"]["closed"].items()]
    points += [("Ray Serve /v1/score", _clients(n), r) for n, r in res["serve"]["closed"].items()]
    points.append(("Ray Serve /v1/recommend", "closed, 1 client", res["serve"]["recommend"]))
    names = list(dict.fromkeys(k for _, _, r in points for k in (r.get("stages_ms") or {})))
    if not names:
        return []
    lines = ["| server | load | p50 ms | " + " | ".join(names) + " | outside the route |",
             "|---|---|---|" + "---|" * (len(names) + 1)]
    for name, load, r in points:
        st = r.get("stages_ms") or {}
        lines.append(f"| {name} | {load} | {_fmt(r['p50_ms'], 1)} | " + " | ".join(_fmt(st.get(k), 1) for k in names)
                     + f" | {_fmt(r.get('outside_route_ms'), 1)} |")
    return lines


def results_markdown(res: dict) -> str:
    """The tables of docs/benchmarks.md's Serving section."""
    m = res["machine"]
    head = [
        f"Command: `{res['command']}`  ",
        f"{res['date']}, {m['cpus']} CPUs, GPU: {m['gpu']}, Ray {m['ray']}; "
        f"load average before {', '.join(f'{x:.2f}' for x in m['loadavg_before'])}, "
        f"after {', '.join(f'{x:.2f}' for x in m['loadavg_after'])}. Wall time {res['wall_s']:.0f} s.",
    ]
    sections = [head, _load_table(res), _stage_table(res), _ratio_table(res), _cpu_table(res), _autoscaling_table(res)]
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"
