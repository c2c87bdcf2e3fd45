"""The plain alternative to the Serve app: the same routes in one FastAPI + uvicorn process.

    python -m recsys_ray.bench.serve_plain --checkpoint artifacts/models/retriever [--ranker-checkpoint ...] --port 8001

One :class:`~recsys_ray.predict.Predictor` (retriever + optional ranker) in the process, the same
:func:`recsys_ray.serve.api.create_api` routes, request models and limits; requests are scored one
at a time in one worker thread (no cross-request batching, no replicas). This is the baseline the
serving benchmark compares Ray Serve with; it is not meant for production.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import time

import numpy as np
import uvicorn

from recsys_ray.cli import setup_logging
from recsys_ray.errors import RecsysError
from recsys_ray.predict import Predictor, PredictorConfig
from recsys_ray.serve.api import (
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
    record_stage,
    refusal,
    refusal_detail,
)
from recsys_ray.serve.app import check_args, resolve_device


class PlainBackend:
    """Routes' backend around one in-process Predictor; one request scored at a time."""

    def __init__(self, predictor: Predictor, args: AppArgs):
        self.predictor, self.args = predictor, args
        # one thread: torch already uses every core for one request; more would just contend
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")

    async def _run(self, fn, *args):
        """``fn(*args)`` in the model thread; its time is the request's ``model`` stage (queue included)."""
        t0 = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        finally:
            record_stage("model", (time.perf_counter() - t0) * 1000)

    def _inputs(self, user: dict, item_ids=None, texts=None, with_candidates: bool = True, kind: str | None = None):
        t0 = time.perf_counter()
        try:
            ctx = self.predictor.user_inputs(user, kind)
            cands = self.predictor.candidates(item_ids, texts) if with_candidates else None
            exclude = self.predictor.items.rows(user.get("history") or [])
        except RecsysError as exc:
            raise ApiError(422, refusal_detail(refusal(exc))) from None
        record_stage("prep", (time.perf_counter() - t0) * 1000)
        return ctx, cands, exclude

    async def score(self, req: ScoreRequest) -> tuple[ScoreResponse, int]:
        ctx, cands, _ = self._inputs(req.user.model_dump(), req.item_ids, req.texts,
                                     kind="ranker" if self.predictor.ranker is not None else None)
        scores = await self._run(self.predictor.score, ctx, cands)
        model = "ranker" if self.predictor.ranker is not None else "retriever"
        return ScoreResponse(model=model, scores=np.asarray(scores).tolist()), 1

    async def recommend(self, req: RecommendRequest) -> tuple[RecommendResponse, int]:
        user = req.user.model_dump()
        ctx, _, exclude = self._inputs(user, with_candidates=False)
        # the ranker reads text even when the retriever reads item tokens
        rank_ctx = self.predictor.user_inputs(user, kind="ranker") if self.predictor.ranker is not None else None
        ((rows, scores),) = await self._run(self.predictor.recommend, [ctx], req.k, [exclude if req.exclude_history else []],
                                            [rank_ctx] if rank_ctx is not None else None)
        items = self.predictor.items
        out = [RecommendedItem(item_id=items.ids[r], text=items.texts[r], score=float(s))
               for r, s in zip(rows, scores, strict=True)]
        model = "retriever+ranker" if self.predictor.ranker is not None else "retriever"
        return RecommendResponse(model=model, items=out), 1

    async def search(self, req: SearchRequest) -> tuple[RecommendResponse, int]:
        p, user = self.predictor, req.user.model_dump() if req.user is not None else None
        t0 = time.perf_counter()
        try:
            ctx = p.search_context(p.user_inputs(user) if user is not None else None, req.query)
            exclude = p.items.rows(user.get("history") or []) if user is not None and req.exclude_history else []
        except RecsysError as exc:
            raise ApiError(422, refusal_detail(refusal(exc))) from None
        record_stage("prep", (time.perf_counter() - t0) * 1000)
        ((rows, scores),) = await self._run(p.retrieve, [ctx], req.k, [exclude])
        out = [RecommendedItem(item_id=p.items.ids[r], text=p.items.texts[r], score=float(s))
               for r, s in zip(rows, scores, strict=True)]
        return RecommendResponse(model="retriever", items=out), 1

    async def add_items(self, req: AddItemsRequest) -> AddItemsResponse:
        try:
            size = await self._run(self.predictor.add_items, [it.item_id for it in req.items],
                                   [it.text for it in req.items])
        except RecsysError as exc:
            raise ApiError(422, refusal_detail(refusal(exc))) from None
        return AddItemsResponse(added=len(req.items), items=size)

    async def ready(self) -> tuple[bool, dict]:
        return True, {"models": {k: {"kind": k} for k in self.predictor.roles}}


def build_plain_app(args: AppArgs) -> tuple:
    """(FastAPI app, Predictor) for :class:`~recsys_ray.serve.api.AppArgs` (the Serve app's checks)."""
    args = check_args(args)
    predictor = Predictor(PredictorConfig(
        retriever=args.checkpoint, ranker=args.ranker_checkpoint, items=args.items or args.checkpoint,
        device=resolve_device(args.device), batch_size=args.forward_batch_size, rerank_top=args.rerank_top,
        popularity_weight=args.popularity_weight, max_context_tokens=args.max_context_tokens,
        torch_threads=args.torch_threads, precision=args.precision, index=args.index, index_nprobe=args.index_nprobe,
    ))
    predictor.item_vectors()  # like the Retriever replica: loaded before the first request
    predictor.build_index()
    return create_api(PlainBackend(predictor, args), title="recsys_ray (plain)"), predictor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="retriever checkpoint or run dir")
    parser.add_argument("--ranker-checkpoint", default=None)
    parser.add_argument("--items", default=None)
    parser.add_argument("--rerank-top", type=int, default=50)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--precision", default="fp32", help="fp32 | int8 | bf16 | fp16 | onnx | onnx-int8 (both models)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    a = parser.parse_args(argv)
    setup_logging()
    try:
        app, _ = build_plain_app(AppArgs(checkpoint=a.checkpoint, ranker_checkpoint=a.ranker_checkpoint, items=a.items,
                                         rerank_top=a.rerank_top, device=a.device, torch_threads=a.torch_threads,
                                         precision=a.precision))
    except RecsysError as exc:
        raise SystemExit(f"error: {exc}") from None
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
