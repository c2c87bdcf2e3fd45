"""The HTTP edge of the Serve application: arguments, request/response models, errors, routes.

The same :func:`create_api` routes run inside Ray Serve (``recsys_ray.serve.app``) and in the
benchmark's plain one-process server (``recsys_ray.bench.serve_plain``). Bad requests are 4xx
(422 bad fields / unknown ids, 413 too many candidates or too big a body), overload is 503 with
``Retry-After``, never a 500.
"""


import collections
from typing import Any, Literal, Protocol

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
    model_validator,
)

from recsys_ray.errors import UnknownItems
from recsys_ray.predict import MAX_TEXT_TOKENS

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
    s3_endpoint: str | None = Field(None, description="S3-compatible store for s3:// checkpoints (default: AWS_ENDPOINT_URL(_S3), else AWS)")


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
    texts: list[StrictStr] | None = Field(None, description=f"candidate texts (cut to {MAX_TEXT_TOKENS} tokens, never refused)")

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
    """What the routes call: Ray Serve handles (``recsys_ray.serve.app.ServeBackend``) or one
    in-process Predictor (the benchmark's plain server)."""

    args: AppArgs  # the application's arguments: the limits the routes enforce

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
    limits = backend.args
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


def refusal(exc: Exception) -> dict:
    """A bad-input error as a value (``{"error", "unknown_item_ids"?}``): it crosses a deployment
    handle as data, since a 422 is not a replica fault."""
    out: dict = {"error": str(exc)}
    if isinstance(exc, UnknownItems):
        out["unknown_item_ids"] = exc.ids
    return out


def refusal_detail(out: dict) -> dict:
    """The 422 body of a :func:`refusal`: ``{"message", "unknown_item_ids"?}``."""
    detail = {"message": out["error"]}
    if "unknown_item_ids" in out:
        detail["unknown_item_ids"] = out["unknown_item_ids"]
    return detail
