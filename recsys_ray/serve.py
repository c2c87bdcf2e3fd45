"""Ray Serve application: a FastAPI ingress in front of a Retriever and an optional Ranker.

    serve run serve_configs/local.yaml      # CPU, 127.0.0.1:8000
    serve run serve_configs/prod.yaml       # GPU replicas, autoscaling, s3:// checkpoints

``import_path: recsys_ray.serve:build_app`` with ``args`` = :class:`AppArgs`. Three deployments:

- ``Retriever``: a :class:`~recsys_ray.predict.Predictor` over the retriever checkpoint; holds the
  item-vector matrix of the whole catalogue (computed in the constructor, so a replica is only
  routed to once it is loaded). User encodings from concurrent requests are merged by
  ``@serve.batch`` into one encoder pass, then one matrix product gives every user's top N.
  Without a ranker it also answers ``/v1/score`` (scaled cosine).
- ``Ranker`` (optional): a Predictor over the ranker checkpoint; the (context, candidate) pairs of
  every request in a ``@serve.batch`` go through ``Predictor.score_many`` together (sorted by
  length, cut into ``forward_batch_size`` rows per encoder pass) and each request gets its own
  slice back, in its order.
- ``RecsysAPI``: the HTTP ingress (FastAPI, routes built by :func:`create_api`):
  ``POST /v1/score``, ``POST /v1/recommend``, ``GET /healthz``, ``GET /readyz``, OpenAPI at
  ``/docs`` and ``/openapi.json``.

Batch size and wait are the model deployments' ``user_config`` (``max_batch_size``,
``batch_wait_timeout_s``), applied by ``reconfigure`` without restarting replicas. Scoring is the
offline Predictor's own code, so served scores equal offline ones. Bad requests are 4xx (422 bad
fields / unknown ids, 413 too many candidates or too big a body), overload is 503 with
``Retry-After`` (``max_queued_requests`` reached), never a 500; a request whose model replica
died under it (a scale-down past its grace period) is retried once on another replica, then
answered 503 + ``Retry-After``. A missing or mismatched checkpoint
fails :func:`build_app` (local paths) or the replica constructor (``s3://``) with the reason.

The same :func:`create_api` routes also run in one plain process (``recsys_ray.serve_plain``), the
benchmark's baseline.
"""

import asyncio
import collections
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from recsys_ray.errors import ConfigError, RecsysError

log = logging.getLogger(__name__)

BATCH_HEADER = "X-Batch-Size"  # how many requests the replica merged into this one's batch
RETRY_AFTER_S = 1  # what a 503 under overload tells the client to wait


# ---------------------------------------------------------------------------------------------
# application arguments (the YAML's `args`)


class AppArgs(BaseModel):
    """Arguments of :func:`build_app` (the Serve config's ``applications[].args``)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description="retriever: checkpoint dir, run dir (its best checkpoint) or s3:// checkpoint dir")
    ranker_checkpoint: str | None = Field(None, description="optional ranker (cross-encoder) checkpoint, same forms")
    items: str | None = Field(None, description="catalogue: prepared data dir or items parquet; default the retriever checkpoint's items.parquet")
    max_candidates: int = Field(200, ge=1, description="candidates per /v1/score request; more -> 413")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="request body size; larger -> 413")
    max_k: int = Field(100, ge=1, description="largest k of /v1/recommend; larger -> 422")
    rerank_top: int = Field(50, ge=1, description="/v1/recommend: retriever shortlist the ranker rescores")
    device: str = Field("auto", description="auto (cuda when the replica has a GPU, else cpu), cpu, cuda, cuda:N")
    forward_batch_size: int = Field(128, ge=1, description="rows (pairs or texts) per encoder forward pass")
    max_context_tokens: int | None = Field(None, ge=8, description="default: what the checkpoint trained with")
    popularity_weight: float = Field(0.0, ge=0.0, description="retriever popularity prior beta")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per model replica (default: torch's)")


class BatchConfig(BaseModel):
    """``user_config`` of the Ranker and Retriever deployments (changeable at runtime)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(16, ge=1, description="requests merged into one batch (1 = no batching)")
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, description="how long a batch waits to fill")


class Limits(BaseModel):
    """What the ingress enforces before any model runs."""

    max_candidates: int = 200
    max_body_bytes: int = 1_000_000
    max_k: int = 100
    rerank_top: int = 50


# ---------------------------------------------------------------------------------------------
# HTTP request / response models

ProfileValue = StrictStr | StrictInt | StrictFloat | StrictBool | None


class User(BaseModel):
    model_config = ConfigDict(extra="forbid")

    history: list[StrictStr] = Field(default_factory=list, description="catalogue item ids, oldest first (the last max_history are used)")
    profile: dict[str, ProfileValue] | StrictStr | None = Field(
        None, description="profile fields (rendered like the training data) or ready text")


class ScoreRequest(BaseModel):
    """A user and candidates: catalogue ``item_ids`` or free ``texts`` (exactly one of them)."""

    model_config = ConfigDict(extra="forbid")

    user: User
    item_ids: list[StrictStr] | None = Field(None, description="candidate catalogue item ids")
    texts: list[StrictStr] | None = Field(None, description="candidate texts (cut to 64 tokens, never refused)")

    @model_validator(mode="after")
    def _one_candidate_list(self) -> "ScoreRequest":
        given = [n for n in ("item_ids", "texts") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of item_ids or texts")
        cands = self.candidates
        if not cands:
            raise ValueError(f"{given[0]} is empty")
        dups = [c for c, n in collections.Counter(cands).items() if n > 1]
        if dups:
            shown = ", ".join(repr(d[:80]) for d in dups[:10]) + (" ..." if len(dups) > 10 else "")
            raise ValueError(f"duplicate candidates in {given[0]}: {shown}")
        return self

    @property
    def candidates(self) -> list[str]:
        return self.item_ids if self.item_ids is not None else (self.texts or [])


class ScoreResponse(BaseModel):
    model: Literal["ranker", "retriever"] = Field(description="which model scored (ranker logit or retriever scaled cosine)")
    scores: list[float] = Field(description="one per candidate, in the request's order")


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: User
    k: StrictInt = Field(10, ge=1, description="how many items")
    exclude_history: StrictBool = Field(True, description="leave the user's history items out")


class RecommendedItem(BaseModel):
    item_id: str
    text: str
    score: float = Field(description="ranker logit when reranked, else retriever scaled cosine")


class RecommendResponse(BaseModel):
    model: Literal["retriever+ranker", "retriever"]
    items: list[RecommendedItem]


class ApiError(Exception):
    """A request the API refuses: HTTP status, message, extra headers."""

    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None):
        super().__init__(str(detail))
        self.status, self.detail, self.headers = status, detail, headers or {}


def overloaded(what: str = "the service is at capacity") -> ApiError:
    return ApiError(503, f"{what}; retry later", {"Retry-After": str(RETRY_AFTER_S)})


# ---------------------------------------------------------------------------------------------
# the routes (shared by the Serve ingress and the plain server)


class Backend(Protocol):
    """What the routes call: Ray Serve handles (:class:`ServeBackend`) or one in-process Predictor."""

    limits: Limits

    async def score(self, req: ScoreRequest) -> tuple[ScoreResponse, int]: ...  # (response, batch size)

    async def recommend(self, req: RecommendRequest) -> tuple[RecommendResponse, int]: ...

    async def ready(self) -> tuple[bool, dict]: ...


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``max_bytes`` (by Content-Length, or while streaming)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse({"detail": self._message()}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # chunked upload without Content-Length
                    raise HTTPException(413, self._message())
            return message

        return await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"request body larger than {self.max_bytes} bytes"


def create_api(backend: Backend, title: str = "recsys_ray") -> FastAPI:
    """The FastAPI app: routes, error mapping (4xx for bad input, 503 + Retry-After when full)."""
    limits = backend.limits
    app = FastAPI(title=title, version="1", description="BERT recommender: score candidates, recommend from the catalogue.")
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness: the ingress answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: 200 only when every model deployment has loaded its checkpoint."""
        ok, info = await backend.ready()
        return JSONResponse({"ready": ok, **info}, status_code=200 if ok else 503)

    @app.post("/v1/score", response_model=ScoreResponse)
    async def score(req: ScoreRequest) -> JSONResponse:
        """One score per candidate, in the request's order (ranker if loaded, else retriever)."""
        if len(req.candidates) > limits.max_candidates:
            raise ApiError(413, f"{len(req.candidates)} candidates; at most {limits.max_candidates} per request")
        out, batch = await backend.score(req)
        return JSONResponse(out.model_dump(), headers={BATCH_HEADER: str(batch)})

    @app.post("/v1/recommend", response_model=RecommendResponse)
    async def recommend(req: RecommendRequest) -> JSONResponse:
        """Top k of the catalogue: retrieve, rerank the shortlist with the ranker if there is one."""
        if req.k > limits.max_k:
            raise ApiError(422, f"k={req.k} is more than max_k={limits.max_k}")
        out, batch = await backend.recommend(req)
        return JSONResponse(out.model_dump(), headers={BATCH_HEADER: str(batch)})

    return app


# ---------------------------------------------------------------------------------------------
# what the model deployments share with the plain server


def user_context(predictor, user: dict, kind: str | None = None) -> list[int]:
    """The user's model inputs for ``predictor``'s model of ``kind`` (default: its retriever if loaded)."""
    return predictor.context_ids(user.get("history") or [], user.get("profile"), kind=kind)


def candidate_ids(predictor, item_ids: Sequence[str] | None, texts: Sequence[str] | None) -> list[list[int]]:
    if item_ids is not None:
        return predictor.candidate_ids(predictor.items.rows(list(item_ids)))
    if not predictor.scores_texts:
        raise RecsysError("this model reads item tokens (history='items'): score catalogue item_ids, not texts")
    return predictor.text_ids(list(texts or []))


def refusal(exc: Exception) -> dict:
    """A bad-input error as a value: it crosses the handle as data (a 422 is not a replica fault)."""
    from recsys_ray.predict import UnknownItems

    out = {"error": str(exc)}
    if isinstance(exc, UnknownItems):
        out["unknown_item_ids"] = exc.ids
    return out


def merge_rerank(rows: Sequence[int], ranker_scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k of a reranked shortlist: ranker score descending, ties keep the retriever's order.

    Same rule as :meth:`recsys_ray.predict.Predictor.recommend` (stable argsort of the scores).
    """
    order = np.argsort(-np.asarray(ranker_scores), kind="stable")[:k]
    return np.asarray(rows)[order], np.asarray(ranker_scores)[order]


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when this process sees a GPU (Serve gives one to num_gpus replicas)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def local_checkpoint(path: str) -> str:
    """A local checkpoint directory for ``path``: s3:// copied to the cache, run dir -> best."""
    from recsys_ray.model import resolve_encoder_path
    from recsys_ray.train import resolve_checkpoint

    if str(path).startswith("s3://"):
        return resolve_encoder_path(str(path))
    return resolve_checkpoint(str(path))


class _ModelReplica:
    """Loads one Predictor (one model kind) and applies the batch settings."""

    kind = "retriever"

    def _load(self, checkpoint: str, items: str | None, device: str, forward_batch_size: int,
              max_context_tokens: int | None, popularity_weight: float, torch_threads: int | None) -> None:
        from recsys_ray.predict import Predictor, PredictorConfig

        local = local_checkpoint(checkpoint)
        if items is not None and items.startswith("s3://"):  # the retriever's checkpoint (the Ranker's catalogue)
            items = local_checkpoint(items)
        cfg = PredictorConfig(
            **{self.kind: local}, items=items or local, device=resolve_device(device),
            batch_size=forward_batch_size, max_context_tokens=max_context_tokens,
            popularity_weight=popularity_weight if self.kind == "retriever" else 0.0,
            torch_threads=torch_threads,
        )
        self.predictor = Predictor(cfg)
        self.checkpoint = checkpoint
        self.batches = collections.Counter()  # batch size -> how many batches

    def _batch_handlers(self) -> list:
        return []

    def reconfigure(self, user_config: dict) -> None:
        """``user_config`` -> batch size / wait of every ``@serve.batch`` method, live."""
        cfg = BatchConfig.model_validate(user_config or {})
        for handler in self._batch_handlers():
            handler.set_max_batch_size(cfg.max_batch_size)
            handler.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.batch_config = cfg
        log.info("%s: %s", self.kind, cfg)

    def ready(self) -> dict:
        """Answered only once the constructor finished: the checkpoint is loaded."""
        return {"kind": self.kind, "checkpoint": self.checkpoint, "items": len(self.predictor.items),
                "device": str(self.predictor.device), "replica": serve.get_replica_context().replica_id.unique_id,
                **self.batch_config.model_dump()}

    def stats(self) -> dict:
        """Batches served by this replica so far, by size."""
        return {"batches": dict(sorted(self.batches.items()))}

    async def _score(self, user: dict, item_ids: list[str] | None, texts: list[str] | None) -> dict:
        try:
            ctx = user_context(self.predictor, user)
            cands = candidate_ids(self.predictor, item_ids, texts)
        except RecsysError as exc:
            return refusal(exc)
        scores, batch = await self._score_batch((ctx, cands))
        return {"scores": scores.tolist(), "batch_size": batch}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _score_batch(self, requests: list[tuple[list[int], list[list[int]]]]) -> list[tuple[np.ndarray, int]]:
        """Every request's candidates in one ``score_many`` call; each gets its slice back."""
        self.batches[len(requests)] += 1
        # a worker thread: the event loop keeps accepting requests (the next batch) meanwhile
        out = await asyncio.to_thread(self.predictor.score_many, [r[0] for r in requests], [r[1] for r in requests])
        return [(s, len(requests)) for s in out]


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
                 torch_threads: int | None = None):
        self._load(checkpoint, items, device, forward_batch_size, max_context_tokens, 0.0, torch_threads)

    def _batch_handlers(self) -> list:
        return [self._score_batch]

    async def score(self, user: dict, item_ids: list[str] | None = None, texts: list[str] | None = None) -> dict:
        """``{"scores": [...], "batch_size": n}`` or ``{"error": ...}`` for bad input."""
        return await self._score(user, item_ids, texts)

    async def score_rows(self, user: dict, rows: list[int]) -> dict:
        """Ranker scores of catalogue rows (the retriever's shortlist) for one user."""
        try:
            ctx = user_context(self.predictor, user)
        except RecsysError as exc:
            return refusal(exc)
        cands = [self.predictor.items.tokens[r] for r in rows]
        scores, batch = await self._score_batch((ctx, cands))
        return {"scores": scores.tolist(), "batch_size": batch}


@serve.deployment(**MODEL_DEPLOYMENT_OPTIONS)
class Retriever(_ModelReplica):
    """Dual encoder: the catalogue's item vectors in memory; user encodings batched."""

    kind = "retriever"

    def __init__(self, checkpoint: str, items: str | None = None, device: str = "auto",
                 forward_batch_size: int = 128, max_context_tokens: int | None = None,
                 popularity_weight: float = 0.0, torch_threads: int | None = None):
        self._load(checkpoint, items, device, forward_batch_size, max_context_tokens, popularity_weight, torch_threads)
        self.predictor.item_vectors()  # (I, H), before the first request: readiness means loaded

    def _batch_handlers(self) -> list:
        return [self._score_batch, self._retrieve_batch]

    async def score(self, user: dict, item_ids: list[str] | None = None, texts: list[str] | None = None) -> dict:
        """Scaled cosine per candidate (used when the app has no ranker)."""
        return await self._score(user, item_ids, texts)

    async def retrieve(self, user: dict, n: int, exclude_history: bool = True) -> dict:
        """Top ``n`` catalogue rows for one user: ``{"rows", "item_ids", "texts", "scores", "batch_size"}``."""
        try:
            ctx = user_context(self.predictor, user)
            exclude = self.predictor.items.rows(user.get("history") or []) if exclude_history else []
        except RecsysError as exc:
            return refusal(exc)
        (rows, scores), batch = await self._retrieve_batch((ctx, int(n), exclude))
        items = self.predictor.items
        return {"rows": rows.tolist(), "item_ids": [items.ids[r] for r in rows],
                "texts": [items.texts[r] for r in rows], "scores": scores.tolist(), "batch_size": batch}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _retrieve_batch(self, requests: list[tuple[list[int], int, list[int]]]) -> list:
        """One encoder pass for all users, one (B, I) matrix product, a top n per user."""
        self.batches[len(requests)] += 1
        n = max(r[1] for r in requests)
        out = await asyncio.to_thread(self.predictor.retrieve, [r[0] for r in requests], n, [r[2] for r in requests])
        # the top n of a user's top max-n list is its own top n (same order, ties by row)
        return [((rows[: r[1]], s[: r[1]]), len(requests)) for r, (rows, s) in zip(requests, out, strict=True)]


class ServeBackend:
    """The routes' backend inside Serve: calls the model deployments through their handles."""

    def __init__(self, retriever: DeploymentHandle, ranker: DeploymentHandle | None, limits: Limits):
        self.retriever, self.ranker, self.limits = retriever, ranker, limits

    async def _call(self, method, *args, **kwargs) -> dict:
        from ray.exceptions import RayActorError

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
                log.warning("model replica lost (attempt %d): %s", attempt, str(exc).splitlines()[0])
                if attempt == 2:
                    raise overloaded("a model replica went away") from None
        if "error" in out:
            detail = {"message": out["error"]}
            if "unknown_item_ids" in out:
                detail["unknown_item_ids"] = out["unknown_item_ids"]
            raise ApiError(422, detail)
        return out

    async def score(self, req: ScoreRequest) -> tuple[ScoreResponse, int]:
        target, model = (self.ranker, "ranker") if self.ranker is not None else (self.retriever, "retriever")
        out = await self._call(target.score, req.user.model_dump(), req.item_ids, req.texts)
        return ScoreResponse(model=model, scores=out["scores"]), out["batch_size"]

    async def recommend(self, req: RecommendRequest) -> tuple[RecommendResponse, int]:
        user = req.user.model_dump()
        n = max(req.k, self.limits.rerank_top) if self.ranker is not None else req.k
        got = await self._call(self.retriever.retrieve, user, n, req.exclude_history)
        if self.ranker is None or not got["rows"]:
            items = [RecommendedItem(item_id=i, text=t, score=s)
                     for i, t, s in zip(got["item_ids"], got["texts"], got["scores"], strict=True)]
            return RecommendResponse(model="retriever", items=items), got["batch_size"]
        ranked = await self._call(self.ranker.score_rows, user, got["rows"])
        order, scores = merge_rerank(np.arange(len(got["rows"])), np.asarray(ranked["scores"]), req.k)
        items = [RecommendedItem(item_id=got["item_ids"][j], text=got["texts"][j], score=float(s))
                 for j, s in zip(order, scores, strict=True)]
        return RecommendResponse(model="retriever+ranker", items=items), ranked["batch_size"]

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
    """HTTP ingress; routes from :func:`create_api`, models behind deployment handles."""

    def __init__(self, retriever: DeploymentHandle, ranker: DeploymentHandle | None, limits: dict):
        self.backend = ServeBackend(retriever, ranker, Limits(**limits))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.backend)


# ---------------------------------------------------------------------------------------------
# the builder


def check_args(args: AppArgs) -> AppArgs:
    """Local checkpoints exist and are of the right kind, a catalogue exists: every problem at once.

    Paths come back absolute (replicas do not share the caller's working directory); run
    directories come back as their best checkpoint. ``s3://`` paths are checked by the replicas.
    """
    from recsys_ray.model import read_checkpoint_meta

    problems: list[str] = []
    resolved: dict[str, str | None] = {}
    for field, kind in (("checkpoint", "retriever"), ("ranker_checkpoint", "ranker")):
        path = getattr(args, field)
        resolved[field] = path
        if path is None or path.startswith("s3://"):
            continue
        try:
            local = os.path.abspath(local_checkpoint(path))
            meta = read_checkpoint_meta(local)
        except RecsysError as exc:
            problems.append(f"{field}: {exc}")
            continue
        got = (meta.get("model_config") or {}).get("kind")
        if got != kind:
            problems.append(f"{field}: {path} is a {got} checkpoint, expected a {kind}")
        resolved[field] = local
    if args.items is not None:
        if args.items.startswith("s3://"):
            problems.append("items: must be a local path (an s3:// catalogue travels inside the checkpoint)")
        elif not Path(args.items).exists():
            problems.append(f"items: not found: {args.items}")
        else:
            resolved["items"] = os.path.abspath(args.items)
    elif not args.checkpoint.startswith("s3://") and not any(p.startswith("checkpoint:") for p in problems):
        from recsys_ray.predict import CATALOGUE_FILE

        if not (Path(resolved["checkpoint"]) / CATALOGUE_FILE).is_file():
            problems.append(f"checkpoint: {args.checkpoint} has no {CATALOGUE_FILE}; pass items= (a prepared data dir)")
    if problems:
        raise ConfigError(problems)
    return args.model_copy(update=resolved)


def app_from_args(args: AppArgs, options: dict[str, dict] | None = None) -> Application:
    """The application for ``args``; ``options`` = per-deployment ``.options()`` overrides
    (tests and the benchmark; a Serve config file uses its ``deployments:`` list instead)."""
    args = check_args(args)
    options = options or {}

    def opts(deployment):
        return deployment.options(**options[deployment.name]) if deployment.name in options else deployment

    common = {"device": args.device, "forward_batch_size": args.forward_batch_size,
              "max_context_tokens": args.max_context_tokens, "torch_threads": args.torch_threads}
    retriever = opts(Retriever).bind(args.checkpoint, items=args.items,
                                     popularity_weight=args.popularity_weight, **common)
    ranker = None
    if args.ranker_checkpoint:
        # the retriever's catalogue for both: a row means the same item in both deployments
        ranker = opts(Ranker).bind(args.ranker_checkpoint, items=args.items or args.checkpoint, **common)
    limits = Limits(max_candidates=args.max_candidates, max_body_bytes=args.max_body_bytes,
                    max_k=args.max_k, rerank_top=args.rerank_top)
    return opts(RecsysAPI).bind(retriever, ranker, limits.model_dump())


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

    Unlike ``serve.run(app)``, a config path keeps each deployment's code version, so a change
    confined to ``user_config`` reconfigures the running replicas in place. Raises
    :class:`RecsysError` with the failing deployment's reason.
    """
    from ray.serve._private.api import serve_start  # Ray has no public Python call taking a config
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_start(http_options=schema.http_options.model_dump())
    client.deploy_apps(schema)
    for app in schema.applications:
        wait_for_app(app.name, timeout_s)


def wait_for_app(name: str, timeout_s: float = 600) -> None:
    """Block until application ``name`` is RUNNING; a failed one raises with its reason."""
    import time

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
