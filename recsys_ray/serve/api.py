"""The HTTP edge of the Serve application: arguments, request/response models, errors, routes.

The same :func:`create_api` routes run inside Ray Serve (``recsys_ray.serve.app``) and in the
benchmark's plain one-process server (``recsys_ray.bench.serve_plain``). Bad requests are 4xx
(422 bad fields / unknown ids, 413 too many candidates or too big a body), overload is 503 with
``Retry-After``, never a 500.

Bodies are parsed strictly (:func:`parse_json_body`): UTF-8 only, standard JSON only (no
``NaN`` / ``Infinity``, no number that overflows to infinity), bounded nesting, no unpaired
surrogate in a string. What passes can always be rendered back (an error that echoes an id must
not itself fail), and every validation error is rendered without echoing its input
(:func:`validation_body`): FastAPI's default handler echoes it, and an input such as ``inf`` or
raw bytes then failed to render and became a 500.
"""


import collections
import contextvars
import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute
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

from recsys_ray.errors import ConfigError, UnknownItems
from recsys_ray.model.compress import PRECISIONS
from recsys_ray.predict import MAX_TEXT_TOKENS
from recsys_ray.serve.page import page_html, sample_users

BATCH_HEADER = "X-Batch-Size"  # how many requests the replica merged into this one's batch
TIMING_HEADER = "Server-Timing"  # per-stage milliseconds of this request (W3C Server Timing; browsers show it)
MODEL_MS_HEADER = "X-Model-Ms"  # milliseconds inside the models' forward passes (the *-model stages)
_stages: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("recsys_stages", default=None)


def record_stage(name: str, ms: float) -> None:
    """Add ``ms`` to stage ``name`` of the request the current task answers (nothing outside a route)."""
    stages = _stages.get()
    if stages is not None:
        stages[name] = stages.get(name, 0.0) + ms


def timing_headers(batch: int, stages: dict[str, float], total_ms: float) -> dict[str, str]:
    """``X-Batch-Size``, ``Server-Timing`` (each stage, then ``total``) and ``X-Model-Ms``.

    Stage names: ``<model>-prep`` (tokenizing the user and candidates in the replica),
    ``<model>-wait`` (queued for its batch), ``<model>-model`` (the batch's forward pass
    and top k: shared by every request of the batch), ``<model>-hops`` (the rest of the handle
    call: routing, serialization, the replica's queue); ``total`` = the route's own time (the HTTP
    proxy's time is outside it)."""
    parts = [f"{name};dur={ms:.2f}" for name, ms in stages.items()] + [f"total;dur={total_ms:.2f}"]
    model = sum(ms for name, ms in stages.items() if name.endswith("model"))
    return {BATCH_HEADER: str(batch), TIMING_HEADER: ", ".join(parts), MODEL_MS_HEADER: f"{model:.2f}"}


async def timed(call) -> tuple[Any, int, dict[str, str]]:
    """Await ``call`` (a backend coroutine returning ``(response, batch)``) with a fresh stage record."""
    t0 = time.perf_counter()
    token = _stages.set({})
    try:
        out, batch = await call
        stages = dict(_stages.get() or {})
    finally:
        _stages.reset(token)
    return out, batch, timing_headers(batch, stages, (time.perf_counter() - t0) * 1000)
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
    max_new_items: int = Field(1000, ge=1, description="items per POST /v1/items request; more -> 413")
    rerank_top: int = Field(50, ge=1, description="/v1/recommend: retriever shortlist the ranker rescores")
    device: str = Field("auto", description="auto (cuda when the replica has a GPU, else cpu), cpu, cuda, cuda:N")
    forward_batch_size: int = Field(128, ge=1, description="rows (pairs or texts) per encoder forward pass")
    max_context_tokens: int | None = Field(None, ge=8, description="default: what the checkpoint trained with")
    popularity_weight: float = Field(0.0, ge=0.0, description="retriever popularity prior beta")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per model replica (default: torch's)")
    precision: Literal[PRECISIONS] = Field("fp32", description="int8: dynamic quantization of the encoders' linear layers (CPU replicas); bf16 / fp16: half-precision encoders (GPU replicas); onnx / onnx-int8: the encoders run by ONNX Runtime, fp32 or int8 (CPU replicas)")
    index: Literal["exact", "ivf"] = Field("exact", description="retriever top k: exact (every item scored) or ivf (approximate faiss IVF index built when a replica loads; from about 10^5 items, docs/benchmarks.md)")
    index_nprobe: int = Field(32, ge=1, le=65536, description="ivf: index groups searched per user (more = closer to exact, slower)")
    retriever_in_ingress: bool = Field(False, description="the HTTP ingress replicas (deployment RetrieverAPI) hold the retriever themselves instead of calling a Retriever deployment: one process and no handle call per request (docs/benchmarks.md); a ranker stays its own deployment")
    s3_endpoint: str | None = Field(None, description="S3-compatible store for s3:// checkpoints (default: AWS_ENDPOINT_URL(_S3), else AWS)")
    api_keys_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="name of an environment variable (on the ingress replicas' nodes) holding the accepted API keys, comma or whitespace separated; with it or api_keys_file every route but /healthz needs a key")
    demo_data: str | None = Field(None, description="a prepared data directory: GET /demo offers its first users (train history) as sample users; without it the page searches for nobody")
    api_keys_file: str | None = Field(None, description="a file on the ingress replicas' nodes (e.g. a mounted Kubernetes secret) with the accepted API keys, one per line; read at replica start")


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


class SearchRequest(BaseModel):
    """A typed query, for this user (personalised) or for nobody (plain search)."""

    model_config = ConfigDict(extra="forbid")

    user: User | None = Field(None, description="who searches (history, profile); none = plain search")
    query: StrictStr = Field(description="what the user typed (cut by the tokenizer when long, never refused)")
    k: StrictInt = Field(10, ge=1, description="how many items")
    exclude_history: StrictBool = Field(True, description="leave the user's history items out")

    @model_validator(mode="after")
    def _query_not_blank(self) -> "SearchRequest":
        if not self.query.strip():
            raise ValueError("query is empty")
        return self


class RecommendedItem(BaseModel):
    item_id: str
    text: str
    score: float = Field(description="ranker logit when reranked, else retriever scaled cosine")


class RecommendResponse(BaseModel):
    model: Literal["retriever+ranker", "retriever"]
    items: list[RecommendedItem]


class NewItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: StrictStr = Field(min_length=1, max_length=256, pattern=r"^\S(.*\S)?$",
                               description="a new catalogue id (no surrounding whitespace)")
    text: StrictStr = Field(min_length=1, max_length=10_000, description="the item's text, as the catalogue renders it")


class AddItemsRequest(BaseModel):
    """Catalogue items to add to the running app from their text (no retraining)."""

    model_config = ConfigDict(extra="forbid")

    items: list[NewItem] = Field(min_length=1, description="ids not yet in the catalogue, each once")


class AddItemsResponse(BaseModel):
    added: int = Field(description="items added")
    items: int = Field(description="catalogue size of the replica that added them")


# ---------------------------------------------------------------------------------------------
# strict request bodies and renderable errors

MAX_JSON_DEPTH = 32  # nesting levels a body may have (ours need 4)
_SURROGATE = re.compile("[\ud800-\udfff]")


def _bad_json(message: str, doc: str = "", pos: int = 0) -> json.JSONDecodeError:
    err = json.JSONDecodeError(message, doc, pos)
    err.msg = message  # shown as the reason (FastAPI puts .msg in the 422's ctx.error)
    return err


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _bad_json(f"number {text[:40]} is out of range (JSON numbers here must be finite)")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > 40:
        raise _bad_json(f"integer with {len(text)} digits is out of range")
    return int(text)


def _non_standard(token: str) -> float:
    raise _bad_json(f"{token} is not standard JSON (numbers must be finite)")


def _check_tree(value: Any, depth: int = 0) -> None:
    """Depth and string checks over a parsed body (iterative enough: depth is bounded first)."""
    if depth > MAX_JSON_DEPTH:
        raise _bad_json(f"body nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise _bad_json("string with an unpaired UTF-16 surrogate escape (\\ud800-\\udfff)")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_tree(k, depth + 1)
            _check_tree(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_tree(v, depth + 1)


def parse_json_body(body: bytes) -> Any:
    """The request body as JSON, or ``json.JSONDecodeError`` with the reason (FastAPI answers it 422)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad_json(f"body is not UTF-8 (byte 0x{body[exc.start]:02x} at offset {exc.start})", "", exc.start) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        value = json.loads(text, parse_constant=_non_standard, parse_float=_finite_float, parse_int=_bounded_int)
    except RecursionError:
        raise _bad_json(f"body nested deeper than {MAX_JSON_DEPTH} levels") from None
    _check_tree(value)
    return value


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """Routes whose JSON bodies go through :func:`parse_json_body`."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def strict(request: Request):
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict


def validation_body(exc: RequestValidationError) -> dict:
    """422 body: where and what, never the offending input (it may not even be renderable)."""
    errors = []
    for e in exc.errors():
        loc = [x if isinstance(x, (int, str)) else str(x) for x in e.get("loc", ())]
        msg = str(e.get("msg", "invalid"))
        if e.get("type") == "json_invalid":
            reason = str((e.get("ctx") or {}).get("error", "")) or "not JSON"
            msg = f"invalid JSON: {reason}"
            loc = ["body"]
        elif e.get("type") == "model_attributes_type" and loc == ["body"]:
            msg = "the body must be a JSON object (Content-Type: application/json)"
        errors.append({"loc": loc, "msg": msg, "type": str(e.get("type", ""))})
    first = errors[0] if errors else {"loc": ["body"], "msg": "invalid request"}
    where = ".".join(str(x) for x in first["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return {"message": f"{where}: {first['msg']}{more}", "detail": errors}


class ApiError(Exception):
    """A request the API refuses: HTTP status, message, extra headers."""

    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None):
        super().__init__(str(detail))
        self.status, self.detail, self.headers = status, detail, headers or {}


def overloaded(what: str = "the service is at capacity") -> ApiError:
    return ApiError(503, f"{what}; retry later", {"Retry-After": str(RETRY_AFTER_S)})


# ---------------------------------------------------------------------------------------------
# API keys


# liveness probes carry no key; nor does a browser opening the demo page (static HTML: its calls send the key)
OPEN_PATHS = frozenset({"/healthz", "/demo"})
MIN_KEY_CHARS = 16


def load_api_keys(args: AppArgs) -> tuple[bytes, ...] | None:
    """The accepted keys' SHA-256 digests, or None when the app has no key check (local configs).

    Keys come from the environment variable ``args.api_keys_env`` and/or the file
    ``args.api_keys_file`` (one per line, ``#`` comments), read where the ingress replica runs.
    Several keys let a rotation overlap. A check that is configured but finds no usable key fails
    the replica's start-up (:class:`ConfigError`, naming the variable or file, never a key).
    """
    if args.api_keys_env is None and args.api_keys_file is None:
        return None
    keys: list[str] = []
    problems: list[str] = []
    if args.api_keys_env is not None:
        env_keys = os.environ.get(args.api_keys_env, "").replace(",", " ").split()
        if not env_keys:
            problems.append(f"api_keys_env: environment variable {args.api_keys_env} is not set (or empty) on this node")
        keys += env_keys
    if args.api_keys_file is not None:
        try:
            lines = open(args.api_keys_file, encoding="utf-8").read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"api_keys_file: cannot read {args.api_keys_file}: {exc.__class__.__name__}")
        else:
            file_keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            if not file_keys:
                problems.append(f"api_keys_file: {args.api_keys_file} holds no key")
            keys += file_keys
    short = sum(len(k) < MIN_KEY_CHARS for k in keys)
    if short:
        problems.append(f"{short} API key(s) shorter than {MIN_KEY_CHARS} characters; use e.g. `openssl rand -hex 32`")
    if problems:
        raise ConfigError(problems)
    return tuple(hashlib.sha256(k.encode()).digest() for k in dict.fromkeys(keys))


def presented_key(headers: dict[bytes, bytes]) -> bytes | None:
    """The key a request carries: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""
    auth = headers.get(b"authorization", b"")
    if auth[:7].lower() == b"bearer ":
        return auth[7:].strip()
    return headers.get(b"x-api-key")


def key_matches(given: bytes, digests: tuple[bytes, ...]) -> bool:
    """Constant time in the key: both sides are compared as SHA-256 digests (equal length, so
    nothing about a key's length or prefix leaks), and every accepted key is compared."""
    candidate = hashlib.sha256(given).digest()
    ok = False
    for digest in digests:
        ok |= hmac.compare_digest(candidate, digest)
    return ok


class ApiKeyAuth:
    """ASGI middleware: 401 unless the request carries an accepted key (paths in
    :data:`OPEN_PATHS` stay open). Runs before the body is read; keys are never logged."""

    def __init__(self, app, digests: tuple[bytes, ...]):
        self.app, self.digests = app, digests

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = presented_key(dict(scope.get("headers") or []))
        if given is None or not key_matches(given, self.digests):
            detail = ("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
                      if given is None else "invalid API key")
            response = JSONResponse({"detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------------
# the routes (shared by the Serve ingress and the plain server)


class Backend(Protocol):
    """What the routes call: Ray Serve handles (``recsys_ray.serve.app.ServeBackend``) or one
    in-process Predictor (the benchmark's plain server)."""

    args: AppArgs  # the application's arguments: the limits the routes enforce

    async def score(self, req: ScoreRequest) -> tuple[ScoreResponse, int]: ...  # (response, batch size)

    async def recommend(self, req: RecommendRequest) -> tuple[RecommendResponse, int]: ...

    async def search(self, req: SearchRequest) -> tuple[RecommendResponse, int]: ...

    async def add_items(self, req: AddItemsRequest) -> AddItemsResponse: ...

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
    """The FastAPI app: routes, error mapping (4xx for bad input, 503 + Retry-After when full),
    the API-key check when the arguments configure one (:func:`load_api_keys`: raises
    :class:`ConfigError` at start-up when configured keys are missing)."""
    limits = backend.args
    digests = load_api_keys(limits)
    app = FastAPI(title=title, version="1", description="BERT recommender: score candidates, recommend from the catalogue, personalised search.")
    app.router.route_class = StrictJSONRoute
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if digests is not None:  # outermost: a request without a key is refused before its body is read
        app.add_middleware(ApiKeyAuth, digests=digests)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_body(exc), status_code=422)

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness: the ingress answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: 200 only when every model deployment has loaded its checkpoint."""
        ok, info = await backend.ready()
        return JSONResponse({"ready": ok, **info}, status_code=200 if ok else 503)

    demo_users = sample_users(limits.demo_data) if limits.demo_data else []

    @app.get("/demo", include_in_schema=False)
    async def demo() -> HTMLResponse:
        """The page to try search and recommendation in a browser (recsys_ray/serve/page)."""
        return HTMLResponse(page_html())

    @app.get("/demo/users")
    async def demo_sample_users() -> dict:
        """Sample users for the demo page: id, train history (oldest first), profile, recent titles."""
        return {"users": demo_users}

    @app.post("/v1/score", response_model=ScoreResponse)
    async def score(req: ScoreRequest) -> JSONResponse:
        """One score per candidate, in the request's order (ranker if loaded, else retriever)."""
        if len(req.candidates) > limits.max_candidates:
            raise ApiError(413, f"{len(req.candidates)} candidates; at most {limits.max_candidates} per request")
        out, _, headers = await timed(backend.score(req))
        return JSONResponse(out.model_dump(), headers=headers)

    @app.post("/v1/recommend", response_model=RecommendResponse)
    async def recommend(req: RecommendRequest) -> JSONResponse:
        """Top k of the catalogue: retrieve, rerank the shortlist with the ranker if there is one."""
        if req.k > limits.max_k:
            raise ApiError(422, f"k={req.k} is more than max_k={limits.max_k}")
        out, _, headers = await timed(backend.recommend(req))
        return JSONResponse(out.model_dump(), headers=headers)

    @app.post("/v1/search", response_model=RecommendResponse)
    async def search(req: SearchRequest) -> JSONResponse:
        """Top k of the catalogue for a typed query and this user (none: plain search), from a
        retriever trained for search (model.search_mix > 0; any other checkpoint -> 422)."""
        if req.k > limits.max_k:
            raise ApiError(422, f"k={req.k} is more than max_k={limits.max_k}")
        out, _, headers = await timed(backend.search(req))
        return JSONResponse(out.model_dump(), headers=headers)

    @app.post("/v1/items", response_model=AddItemsResponse)
    async def add_items(req: AddItemsRequest) -> JSONResponse:
        """Add catalogue items from their text, no retraining: scored at once, recommended by
        every replica within a second; an id already in the catalogue -> 422 naming it."""
        if len(req.items) > limits.max_new_items:
            raise ApiError(413, f"{len(req.items)} items; at most {limits.max_new_items} per request")
        return JSONResponse((await backend.add_items(req)).model_dump())

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
