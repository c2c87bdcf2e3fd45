"""Ray Serve application: a FastAPI ingress in front of a Retriever and an optional Ranker.

    serve run serve_configs/local.yaml      # CPU, 127.0.0.1:8000
    serve run serve_configs/prod.yaml       # GPU replicas, autoscaling, s3:// checkpoints

``import_path: recsys_ray.serve:build_app`` with ``args`` = :class:`~recsys_ray.serve.api.AppArgs`.
Three deployments:

- ``Retriever``: a :class:`~recsys_ray.predict.Predictor` over the retriever checkpoint; holds the
  item-vector matrix of the whole catalogue (computed in the constructor, so a replica is only
  routed to once it is loaded). User encodings from concurrent requests are merged (a
  :class:`~recsys_ray.serve.batching.Batcher`) into one encoder pass, then one matrix product (or
  the IVF index) gives every user's top N.
  Without a ranker it also answers ``/v1/score`` (scaled cosine).
- ``Ranker`` (optional): a Predictor over the ranker checkpoint; the (context, candidate) pairs of
  every request of a batch go through ``Predictor.score_many`` together (sorted by
  length, cut into ``forward_batch_size`` rows per encoder pass) and each request gets its own
  slice back, in its order.
- ``RecsysAPI``: the HTTP ingress (routes of :func:`recsys_ray.serve.api.create_api`).
- ``RetrieverAPI`` (``retriever_in_ingress: true``) replaces ``RecsysAPI`` + ``Retriever``: the
  ingress replica holds the retriever, so a request is parsed, encoded and ranked in one process
  (the routes call it through :class:`InProcess`, the same interface as a handle). The ranker, when
  there is one, stays its own deployment (scaled on its own, e.g. on GPUs).

Batch size and wait are the model deployments' ``user_config`` (:class:`BatchConfig`), applied by
``reconfigure`` without restarting replicas. Scoring is the offline Predictor's own code, so served
scores equal offline ones. A request whose model replica died under it (a scale-down past its
grace period) is retried once on another replica, then answered 503 + ``Retry-After``. A missing
or mismatched checkpoint fails :func:`build_app` (local paths) or the replica constructor
(``s3://``) with the reason.
"""

import asyncio
import collections
import logging
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from recsys_ray import checkpoint, storage
from recsys_ray.data import layout
from recsys_ray.data.catalogue import CATALOGUE_FILE
from recsys_ray.errors import ConfigError, RecsysError, UnknownItems, one_line
from recsys_ray.model.kinds import checkpoint_config
from recsys_ray.predict import Predictor, PredictorConfig, rerank_order
from recsys_ray.ray_compat import RUN_SNAPSHOT, deploy_serve_config
from recsys_ray.serve.api import (
    RETRY_AFTER_S,
    AddItemsRequest,
    AddItemsResponse,
    ApiError,
    AppArgs,
    RecommendedItem,
    RecommendRequest,
    RecommendResponse,
    ScoreRequest,
    ScoreResponse,
    SearchRequest,
    create_api,
    overloaded,
    record_stage,
    refusal,
    refusal_detail,
)
from recsys_ray.serve.batching import Batcher
from recsys_ray.serve.items import ItemSync

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_BATCH_WAIT_S = 0.005


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


class ReplicaMetrics:
    """Ray metrics of a model replica (exported with Ray's own on each node's metrics port; Serve
    adds its request latency and counts): the size and forward-pass time of every batch."""

    def __init__(self, kind: str):
        from ray.util.metrics import Histogram

        tags = {"model": kind}
        self.batch_size = Histogram("recsys_batch_size", "requests merged into one forward pass",
                                    boundaries=[1, 2, 4, 8, 16, 32, 64, 128], tag_keys=("model",))
        self.model_ms = Histogram("recsys_model_ms", "milliseconds of one batch's forward pass and top k",
                                  boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000], tag_keys=("model",))
        self.batch_size.set_default_tags(tags)
        self.model_ms.set_default_tags(tags)

    def record(self, size: int, model_s: float) -> None:
        self.batch_size.observe(size)
        self.model_ms.observe(model_s * 1000)


class BatchConfig(BaseModel):
    """``user_config`` of the Ranker and Retriever deployments (changeable at runtime)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(DEFAULT_MAX_BATCH_SIZE, ge=1, description="requests merged into one batch (1 = no batching)")
    batch_wait_timeout_s: float = Field(DEFAULT_BATCH_WAIT_S, ge=0.0, description="how long a batch waits to fill")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when this process sees a GPU (Serve gives one to num_gpus replicas)."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


class _ModelReplica:
    """Loads one Predictor (one model role) and applies the batch settings."""

    kind = "retriever"

    def _load(self, checkpoint_path: str, items: str | None, device: str, forward_batch_size: int,
              max_context_tokens: int | None, popularity_weight: float, torch_threads: int | None,
              s3_endpoint: str | None = None, precision: str = "fp32", index: str = "exact",
              index_nprobe: int = 32) -> None:
        # check_args resolved local paths once, on the driver; the Predictor copies an s3:// one
        # here (once per node, credentials from this node's own chain); an s3:// catalogue is the
        # retriever's checkpoint (the Ranker's items)
        storage.use_endpoint(s3_endpoint)
        if items is not None and storage.is_remote(items):
            items = checkpoint.resolve(items)
        cfg = PredictorConfig(
            **{self.kind: checkpoint_path}, items=items, device=resolve_device(device),
            batch_size=forward_batch_size, max_context_tokens=max_context_tokens,
            popularity_weight=popularity_weight if self.kind == "retriever" else 0.0,
            torch_threads=torch_threads, precision=precision, index=index, index_nprobe=index_nprobe,
        )
        self.predictor = Predictor(cfg)
        self.checkpoint = checkpoint_path
        self.batches = collections.Counter()  # batch size -> how many batches
        self.metrics = ReplicaMetrics(self.kind)
        # concurrent requests merged into one model call (serve/batching.py says why not @serve.batch)
        self.score_batcher = Batcher(self._score_batch, DEFAULT_MAX_BATCH_SIZE, DEFAULT_BATCH_WAIT_S)
        # items added to the running app (POST /v1/items), the ones logged before this replica included
        self.item_sync = ItemSync(self.predictor, serve.get_replica_context().app_name)
        self.item_sync.apply_now()

    async def _with_items(self, fn):
        """``fn()`` once the item log is applied; an unknown item id syncs at once, then ``fn()`` again."""
        await self.item_sync.sync()
        try:
            return fn()
        except UnknownItems:
            await self.item_sync.sync(force=True)
            return fn()

    async def add_items(self, items: list[dict]) -> dict:
        """Add catalogue items from their text here and record them for every replica (or a refusal)."""
        try:
            return await self.item_sync.add(items)
        except RecsysError as exc:
            return refusal(exc)

    def _batch_handlers(self) -> list:
        return []

    def reconfigure(self, user_config: dict) -> None:
        """``user_config`` -> batch size / wait of every batcher, live."""
        cfg = BatchConfig.model_validate(user_config or {})
        for handler in self._batch_handlers():
            handler.set_max_batch_size(cfg.max_batch_size)
            handler.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.batch_config = cfg
        log.info("%s: %s", self.kind, cfg)

    async def ready(self) -> dict:
        """Answered only once the constructor finished: the checkpoint is loaded."""
        await self.item_sync.sync()
        model = self.predictor.retriever if self.kind == "retriever" else self.predictor.ranker
        return {"kind": self.kind, "checkpoint": self.checkpoint, "resolved": self.predictor.origins[self.kind],
                "loaded_from": str(model.source),
                "items": len(self.predictor.items), "index": self.predictor.cfg.index,
                "device": str(self.predictor.device), "replica": serve.get_replica_context().replica_id.unique_id,
                **self.batch_config.model_dump()}

    def stats(self) -> dict:
        """Batches served by this replica so far, by size."""
        return {"batches": dict(sorted(self.batches.items()))}

    async def _score(self, user: dict, item_ids: list[str] | None, texts: list[str] | None) -> dict:
        t0 = time.perf_counter()
        try:
            ctx, cands = await self._with_items(
                lambda: (self.predictor.user_inputs(user), self.predictor.candidates(item_ids, texts)))
        except RecsysError as exc:
            return refusal(exc)
        t1 = time.perf_counter()
        scores, batch, timing = await self.score_batcher((ctx, cands, t1))
        return {"scores": scores.tolist(), "batch_size": batch, "timing": {"prep": _ms(t1 - t0), **timing}}

    def _batch_done(self, size: int, queued: list[float], started: float, model_s: float) -> list[dict]:
        """Per request of a batch: its wait for the batch and the batch's model time (ms); metrics."""
        self.batches[size] += 1
        self.metrics.record(size, model_s)
        return [{"wait": _ms(started - q), "model": _ms(model_s)} for q in queued]

    async def _score_batch(self, requests: list[tuple[list[int], list[list[int]], float]]) -> list:
        """Every request's candidates in one ``score_many`` call; each gets its slice back."""
        started = time.perf_counter()
        # a worker thread: the event loop keeps accepting requests (the next batch) meanwhile
        out = await asyncio.to_thread(self.predictor.score_many, [r[0] for r in requests], [r[1] for r in requests])
        timing = self._batch_done(len(requests), [r[2] for r in requests], started, time.perf_counter() - started)
        return [(s, len(requests), t) for s, t in zip(out, timing, strict=True)]


# defaults of both model deployments (a Serve config file overrides any of them)
MODEL_DEPLOYMENT_OPTIONS = dict(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=32,
    max_queued_requests=128,
    backpressure_config=BackpressureConfig(retry_after_s=RETRY_AFTER_S),
    user_config=BatchConfig().model_dump(),
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_wait_loop_s=2,
    graceful_shutdown_timeout_s=20,
)


@serve.deployment(**MODEL_DEPLOYMENT_OPTIONS)
class Ranker(_ModelReplica):
    """Cross-encoder: (context, candidate) pairs of concurrent requests scored in one batch."""

    kind = "ranker"

    def __init__(self, checkpoint: str, items: str | None = None, device: str = "auto",
                 forward_batch_size: int = 128, max_context_tokens: int | None = None,
                 torch_threads: int | None = None, s3_endpoint: str | None = None, precision: str = "fp32"):
        self._load(checkpoint, items, device, forward_batch_size, max_context_tokens, 0.0, torch_threads, s3_endpoint,
                   precision)

    def _batch_handlers(self) -> list:
        return [self.score_batcher]

    async def score(self, user: dict, item_ids: list[str] | None = None, texts: list[str] | None = None) -> dict:
        """``{"scores": [...], "batch_size": n}`` or ``{"error": ...}`` for bad input."""
        return await self._score(user, item_ids, texts)

    async def score_rows(self, user: dict, rows: list[int]) -> dict:
        """Ranker scores of catalogue rows (the retriever's shortlist) for one user."""
        t0 = time.perf_counter()
        try:
            ctx = await self._with_items(lambda: self.predictor.user_inputs(user))
            if rows and max(rows) >= len(self.predictor.items):  # items the retriever has and this replica not yet
                await self.item_sync.sync(force=True)
            cands = self.predictor.candidate_ids(rows)
        except RecsysError as exc:
            return refusal(exc)
        t1 = time.perf_counter()
        scores, batch, timing = await self.score_batcher((ctx, cands, t1))
        return {"scores": scores.tolist(), "batch_size": batch, "timing": {"prep": _ms(t1 - t0), **timing}}


class RetrieverReplica(_ModelReplica):
    """Dual encoder: the catalogue's item vectors in memory; user encodings batched. Deployed on
    its own (``Retriever``) or inside the HTTP ingress (``RetrieverAPI``)."""

    kind = "retriever"

    def __init__(self, checkpoint: str, items: str | None = None, device: str = "auto",
                 forward_batch_size: int = 128, max_context_tokens: int | None = None,
                 popularity_weight: float = 0.0, torch_threads: int | None = None, s3_endpoint: str | None = None,
                 precision: str = "fp32", index: str = "exact", index_nprobe: int = 32):
        self._load(checkpoint, items, device, forward_batch_size, max_context_tokens, popularity_weight,
                   torch_threads, s3_endpoint, precision, index, index_nprobe)
        self.retrieve_batcher = Batcher(self._retrieve_batch, DEFAULT_MAX_BATCH_SIZE, DEFAULT_BATCH_WAIT_S)
        self.predictor.item_vectors()  # (I, H), before the first request: readiness means loaded
        self.predictor.build_index()  # index="ivf": the approximate index too (None for exact)

    def _batch_handlers(self) -> list:
        return [self.score_batcher, self.retrieve_batcher]

    async def score(self, user: dict, item_ids: list[str] | None = None, texts: list[str] | None = None) -> dict:
        """Scaled cosine per candidate (used when the app has no ranker)."""
        return await self._score(user, item_ids, texts)

    async def retrieve(self, user: dict | None, n: int, exclude_history: bool = True, query: str | None = None) -> dict:
        """Top ``n`` catalogue rows for one user: ``{"rows", "item_ids", "texts", "scores", "batch_size", "timing"}``;
        with ``query``, for that query typed by the user (``user`` None: by nobody)."""
        t0 = time.perf_counter()
        p = self.predictor

        def inputs():
            ctx = p.user_inputs(user) if user is not None else None
            if query is not None:
                ctx = p.search_context(ctx, query)
            return ctx, p.items.rows((user or {}).get("history") or []) if exclude_history else []

        try:
            ctx, exclude = await self._with_items(inputs)
        except RecsysError as exc:
            return refusal(exc)
        t1 = time.perf_counter()
        (rows, scores), batch, timing = await self.retrieve_batcher((ctx, int(n), exclude, t1))
        items = self.predictor.items
        return {"rows": rows.tolist(), "item_ids": [items.ids[r] for r in rows],
                "texts": [items.texts[r] for r in rows], "scores": scores.tolist(), "batch_size": batch,
                "timing": {"prep": _ms(t1 - t0), **timing}}

    async def _retrieve_batch(self, requests: list[tuple[list[int], int, list[int], float]]) -> list:
        """One encoder pass for all users, one (B, I) matrix product, a top n per user."""
        started = time.perf_counter()
        n = max(r[1] for r in requests)
        out = await asyncio.to_thread(self.predictor.retrieve, [r[0] for r in requests], n, [r[2] for r in requests])
        timing = self._batch_done(len(requests), [r[3] for r in requests], started, time.perf_counter() - started)
        # the top n of a user's top max-n list is its own top n (same order, ties by row)
        return [((rows[: r[1]], s[: r[1]]), len(requests), t)
                for r, (rows, s), t in zip(requests, out, timing, strict=True)]


Retriever = serve.deployment(name="Retriever", **MODEL_DEPLOYMENT_OPTIONS)(RetrieverReplica)


class InProcess:
    """A model replica object in this process, called the way a :class:`DeploymentHandle` is:
    ``h.method.remote(...)`` is the awaitable of ``method(...)`` - no routing, no serialization,
    no second process. How the ``RetrieverAPI`` ingress reaches the retriever it holds."""

    def __init__(self, obj):
        self._obj = obj

    def __getattr__(self, name: str):
        return _InProcessMethod(getattr(self._obj, name))


class _InProcessMethod:
    def __init__(self, fn):
        self.remote = fn


class ServeBackend:
    """The routes' backend inside Serve: calls the model deployments through their handles."""

    def __init__(self, retriever: DeploymentHandle, ranker: DeploymentHandle | None, args: AppArgs):
        self.retriever, self.ranker, self.args = retriever, ranker, args

    async def _call(self, stage: str, method, *args, **kwargs) -> dict:
        """``method.remote(*args, **kwargs)`` of a model deployment; its time goes to the request's
        Server-Timing as ``<stage>-prep / -wait / -model`` (what the replica measured) and
        ``<stage>-hops`` (the rest of the call: routing, serialization, the replica's queue)."""
        t0 = time.perf_counter()
        for attempt in (1, 2):
            try:
                out = await method.remote(*args, **kwargs)
                break
            except BackPressureError:
                raise overloaded("the model deployment's queue is full") from None
            except DeploymentUnavailableError as exc:
                raise ApiError(503, exc.message) from None
            except RayActorError as exc:
                # the replica died under the request (scale-down past its grace period, a crash):
                # scoring is idempotent, so try another replica once, then tell the client to retry
                log.warning("model replica lost (attempt %d): %s", attempt, one_line(exc))
                if attempt == 2:
                    raise overloaded("a model replica went away") from None
        if "error" in out:
            raise ApiError(422, refusal_detail(out))
        inside = out.get("timing") or {}
        for name, ms in inside.items():
            record_stage(f"{stage}-{name}", ms)
        record_stage(f"{stage}-hops", max(0.0, _ms(time.perf_counter() - t0) - sum(inside.values())))
        return out

    async def score(self, req: ScoreRequest) -> tuple[ScoreResponse, int]:
        target, model = (self.ranker, "ranker") if self.ranker is not None else (self.retriever, "retriever")
        out = await self._call(model, target.score, req.user.model_dump(), req.item_ids, req.texts)
        return ScoreResponse(model=model, scores=out["scores"]), out["batch_size"]

    async def recommend(self, req: RecommendRequest) -> tuple[RecommendResponse, int]:
        user = req.user.model_dump()
        n = max(req.k, self.args.rerank_top) if self.ranker is not None else req.k
        got = await self._call("retriever", self.retriever.retrieve, user, n, req.exclude_history)
        if self.ranker is None or not got["rows"]:
            items = [RecommendedItem(item_id=i, text=t, score=s)
                     for i, t, s in zip(got["item_ids"], got["texts"], got["scores"], strict=True)]
            return RecommendResponse(model="retriever", items=items), got["batch_size"]
        ranked = await self._call("ranker", self.ranker.score_rows, user, got["rows"])
        scores = np.asarray(ranked["scores"])
        items = [RecommendedItem(item_id=got["item_ids"][j], text=got["texts"][j], score=float(scores[j]))
                 for j in rerank_order(scores, req.k)]
        return RecommendResponse(model="retriever+ranker", items=items), ranked["batch_size"]

    async def search(self, req: SearchRequest) -> tuple[RecommendResponse, int]:
        """The retriever alone: the ranker (when the app has one) does not read queries."""
        user = req.user.model_dump() if req.user is not None else None
        got = await self._call("retriever", self.retriever.retrieve, user, req.k, req.exclude_history, req.query)
        items = [RecommendedItem(item_id=i, text=t, score=s)
                 for i, t, s in zip(got["item_ids"], got["texts"], got["scores"], strict=True)]
        return RecommendResponse(model="retriever", items=items), got["batch_size"]

    async def add_items(self, req: AddItemsRequest) -> AddItemsResponse:
        out = await self._call("retriever", self.retriever.add_items, [it.model_dump() for it in req.items])
        return AddItemsResponse(added=out["added"], items=out["items"])

    async def ready(self) -> tuple[bool, dict]:
        handles = {"retriever": self.retriever, **({"ranker": self.ranker} if self.ranker is not None else {})}

        async def ask(h: DeploymentHandle) -> dict:
            return await h.ready.remote()

        try:
            infos = await asyncio.wait_for(asyncio.gather(*(ask(h) for h in handles.values())), timeout=3)
        except Exception as exc:  # not up yet, failed, or timed out: all mean "not ready"
            problems = await asyncio.to_thread(_deployment_problems)
            return False, {"reason": problems or f"{type(exc).__name__}: {exc}"}
        return True, {"models": dict(zip(handles, infos, strict=True))}


def _deployment_problems() -> str:
    """Why this app's model deployments are not healthy, from the Serve controller (best effort)."""
    try:
        ctx = serve.get_replica_context()
        app = serve.status().applications[ctx.app_name]
    except Exception:
        return ""
    return "; ".join(f"{name}: {d.status.value} ({_last_error_line(d.message)})"
                     for name, d in app.deployments.items() if d.status.value != "HEALTHY")


def _last_error_line(message: str) -> str:
    """The exception line at the end of a Serve status message (which carries a whole traceback)."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", message or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def admission_limits(capacity_rps: float, budget_s: float, ingress_replicas: int) -> dict:
    """``RecsysAPI`` options that bound how long an admitted request can wait: Little's law, at
    most ``budget_s * capacity_rps`` requests in the app at once (``capacity_rps``: what the whole
    app serves, measured: ``jobs/bench_serve.py`` or a closed loop). Three quarters of them may be
    in the ingress replicas (``max_ongoing_requests``, split over the replicas), a quarter waiting
    in each proxy (``max_queued_requests``); everything beyond is refused by the proxy at once with
    503 + Retry-After. The model deployments' own queues are left larger, so refusals happen at
    the door, before any work is spent on them."""
    if capacity_rps <= 0 or budget_s <= 0 or ingress_replicas < 1:
        raise ValueError("capacity_rps and budget_s must be > 0, ingress_replicas >= 1")
    admitted = max(2, int(budget_s * capacity_rps))
    return {"max_ongoing_requests": max(1, math.ceil(0.75 * admitted / ingress_replicas)),
            "max_queued_requests": max(1, math.ceil(0.25 * admitted))}


@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=256,  # async routes that mostly await the model deployments
    max_queued_requests=512,
    backpressure_config=BackpressureConfig(retry_after_s=RETRY_AFTER_S),
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_wait_loop_s=2,
    graceful_shutdown_timeout_s=20,
)
@serve.ingress()
class RecsysAPI:
    """HTTP ingress; routes from :func:`~recsys_ray.serve.api.create_api`, models behind handles."""

    def __init__(self, retriever: DeploymentHandle, ranker: DeploymentHandle | None, args: dict):
        self.backend = ServeBackend(retriever, ranker, AppArgs.model_validate(args))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.backend)


# the ingress that holds the retriever: what RecsysAPI's replicas take (0 CPU) plus what a model
# replica needs (a CPU share, the batch user_config, a loading grace)
RETRIEVER_API_OPTIONS = dict(MODEL_DEPLOYMENT_OPTIONS, max_ongoing_requests=64, max_queued_requests=256)


@serve.deployment(name="RetrieverAPI", **RETRIEVER_API_OPTIONS)
@serve.ingress()
class RetrieverAPI(RetrieverReplica):
    """HTTP ingress that holds the retriever itself (``retriever_in_ingress: true``): a request is
    answered by the replica that parsed it, with no handle call to a second process (the ranker,
    when there is one, stays its own deployment behind a handle). Scale it like a model
    deployment: each replica loads the checkpoint and the item vectors."""

    def __init__(self, ranker: DeploymentHandle | None, args: dict):
        parsed = AppArgs.model_validate(args)
        RetrieverReplica.__init__(self, **retriever_kwargs(parsed))
        self.backend = ServeBackend(InProcess(self), ranker, parsed)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.backend)


# ---------------------------------------------------------------------------------------------
# the builder


def check_args(args: AppArgs) -> AppArgs:
    """Local checkpoints exist and are of the right kind, a catalogue exists: every problem at once.

    Paths come back absolute (replicas do not share the caller's working directory); run
    directories come back as their best checkpoint, resolved here once. ``s3://`` paths are
    loaded (and checked) by the replicas; one that is certainly missing is refused here, but a
    builder without storage credentials (they may live on the cluster's nodes only) defers to them.
    """
    storage.use_endpoint(args.s3_endpoint)
    problems: list[str] = []
    resolved: dict[str, str | None] = {}
    for field, kind in (("checkpoint", "retriever"), ("ranker_checkpoint", "ranker")):
        path = getattr(args, field)
        resolved[field] = path
        if path is not None and storage.is_remote(path):
            problem = _remote_checkpoint_problem(path)
            if problem:
                problems.append(f"{field}: {problem}")
            continue
        if path is None:
            continue
        try:
            local = os.path.abspath(checkpoint.resolve(path))
            cfg, _ = checkpoint_config(local)
        except RecsysError as exc:
            problems.append(f"{field}: {exc}")
            continue
        if cfg.kind != kind:
            problems.append(f"{field}: {path} is a {cfg.kind} checkpoint, expected a {kind}")
        resolved[field] = local
    if args.items is not None:
        if storage.is_remote(args.items):
            problems.append("items: must be a local path (an s3:// catalogue travels inside the checkpoint)")
        elif not Path(args.items).exists():
            problems.append(f"items: not found: {args.items}")
        else:
            resolved["items"] = os.path.abspath(args.items)
    elif not storage.is_remote(args.checkpoint) and not any(p.startswith("checkpoint:") for p in problems):
        if not (Path(resolved["checkpoint"]) / CATALOGUE_FILE).is_file():
            problems.append(f"checkpoint: {args.checkpoint} has no {CATALOGUE_FILE}; pass items= (a prepared data dir)")
    if args.demo_data is not None and not storage.is_remote(args.demo_data):
        if not layout.is_prepared(args.demo_data):
            problems.append(f"demo_data: {args.demo_data} is not a prepared data directory (no manifest.json)")
        else:
            resolved["demo_data"] = os.path.abspath(args.demo_data)
    if problems:
        raise ConfigError(problems)
    return args.model_copy(update=resolved)


def _remote_checkpoint_problem(uri: str) -> str | None:
    """Why an ``s3://`` checkpoint (or run folder) certainly cannot load, or None (found, or
    not checkable from here)."""
    try:
        if storage.info(storage.join(uri, checkpoint.META_FILE)).type != pafs.FileType.NotFound:
            return None
        if storage.read_text(storage.join(uri, RUN_SNAPSHOT)) is not None:
            return None
    except RecsysError as exc:
        log.warning("cannot check %s from here (%s); the replicas will", uri, exc)
        return None
    return f"{uri}: neither a checkpoint (no {checkpoint.META_FILE}) nor a training run (no {RUN_SNAPSHOT})"


def app_from_args(args: AppArgs, options: dict[str, dict] | None = None) -> Application:
    """The application for ``args``; ``options`` = per-deployment ``.options()`` overrides
    (tests and the benchmark; a Serve config file uses its ``deployments:`` list instead)."""
    args = check_args(args)
    options = options or {}

    def opts(deployment):
        return deployment.options(**options[deployment.name]) if deployment.name in options else deployment

    ranker = None
    if args.ranker_checkpoint:
        # the retriever's catalogue for both: a row means the same item in both deployments
        ranker = opts(Ranker).bind(args.ranker_checkpoint, items=args.items or args.checkpoint, **_model_kwargs(args))
    if args.retriever_in_ingress:
        return opts(RetrieverAPI).bind(ranker, args.model_dump())
    retriever = opts(Retriever).bind(**retriever_kwargs(args))
    return opts(RecsysAPI).bind(retriever, ranker, args.model_dump())


def _model_kwargs(args: AppArgs) -> dict:
    """Constructor arguments both model roles share."""
    return {"device": args.device, "forward_batch_size": args.forward_batch_size,
            "max_context_tokens": args.max_context_tokens, "torch_threads": args.torch_threads,
            "s3_endpoint": args.s3_endpoint, "precision": args.precision}


def retriever_kwargs(args: AppArgs) -> dict:
    """:class:`RetrieverReplica`'s constructor arguments from checked app arguments."""
    return {"checkpoint": args.checkpoint, "items": args.items, "popularity_weight": args.popularity_weight,
            "index": args.index, "index_nprobe": args.index_nprobe, **_model_kwargs(args)}


def build_app(args: AppArgs) -> Application:
    """Typed app builder for ``import_path: recsys_ray.serve:build_app`` (Serve validates ``args``)."""
    if isinstance(args, dict):  # called directly with a dict
        try:
            args = AppArgs.model_validate(args)
        except ValidationError as exc:
            raise ConfigError([f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]) from None
    return app_from_args(args)


# ---------------------------------------------------------------------------------------------
# deploying a config from Python (tests, the benchmark)


def deploy_config(config: dict, timeout_s: float = 600) -> None:
    """Deploy a Serve config dict (a ``serve_configs/*.yaml``) the way ``serve run CONFIG`` and
    ``serve deploy`` do, and wait until its applications run.

    Unlike ``serve.run(app)``, a config keeps each deployment's code version, so a change
    confined to ``user_config`` reconfigures the running replicas in place. Raises
    :class:`RecsysError` with the failing deployment's reason.
    """
    for name in deploy_serve_config(config):
        wait_for_app(name, timeout_s)


def wait_for_app(name: str, timeout_s: float = 600) -> None:
    """Block until application ``name`` is RUNNING; a failed one raises with its reason."""
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(name)
        state = app.status.value if app is not None else "NOT_STARTED"
        if state == "RUNNING":
            return
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            reasons = [f"{dep}: {_last_error_line(d.message)}" for dep, d in app.deployments.items()
                       if d.status.value != "HEALTHY"]
            raise RecsysError(f"Serve application {name!r} {state}: " + ("; ".join(reasons) or _last_error_line(app.message)))
        if time.monotonic() > deadline:
            raise RecsysError(f"Serve application {name!r} not running after {timeout_s:.0f} s (status {state})")
        time.sleep(0.5)
