"""Benchmark: the model in fp32 eager vs its compressed forms (``int8``: PyTorch dynamic quantization;
``onnx`` / ``onnx-int8``: the encoder run by ONNX Runtime, fp32 or int8), measured in one run, one
thread (a CPU replica's share), on the test users of a prepared data directory.

    python -m recsys_ray.bench.precision --retriever artifacts/models/retriever --data artifacts/ml-100k
    python -m recsys_ray.bench.precision --ranker artifacts/models/ranker --data artifacts/ml-100k

Retriever: users/s of ``Predictor.retrieve`` (encode the user, score the whole catalogue, top 10)
one user per call and ``batch`` per call; ranker: pairs/s of ``score_pairs``. Prints one JSON line
with each precision's figures, their ratio to fp32 and how far their scores are from fp32's.
Quality is ``jobs/evaluate.py --precision P`` (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from recsys_ray.bench.serve import _best_seconds
from recsys_ray.data.layout import read_split_rows
from recsys_ray.predict import Predictor, PredictorConfig


def _measure(p: Predictor, batch_rows: dict, batch: int, candidates: int, scores: dict, precision: str) -> dict:
    res: dict = {}
    if p.retriever is not None:
        ctx = p.example_contexts(batch_rows, "retriever")
        p.retrieve(ctx[:batch], 10)  # warm-up
        res["users_per_s_one_per_call"] = round(len(ctx) / _best_seconds("cpu", lambda: [p.retrieve([c], 10) for c in ctx], repeats=3), 2)
        res["users_per_s_batched"] = round(len(ctx) / _best_seconds(
            "cpu", lambda: [p.retrieve(ctx[i:i + batch], 10) for i in range(0, len(ctx), batch)], repeats=3), 2)
        scores[(precision, "retriever")] = p.retrieval_scores(ctx, with_prior=False)
    if p.ranker is not None:
        ctx = p.example_contexts(batch_rows, "ranker")
        pairs_ctx = [c for c in ctx for _ in range(candidates)]
        pairs = [cand for j in range(len(ctx)) for cand in p.candidate_ids(list(range(j, j + candidates)))]
        p.score_pairs(pairs_ctx[:64], pairs[:64])  # warm-up
        res["pairs_per_s"] = round(len(pairs) / _best_seconds("cpu", lambda: p.score_pairs(pairs_ctx, pairs)), 2)
        scores[(precision, "ranker")] = p.score_pairs(pairs_ctx, pairs)
    return res


def compare(retriever: str | None, ranker: str | None, data: str, users: int = 64, batch: int = 16,
            candidates: int = 20, precisions: tuple[str, ...] = ("int8", "onnx", "onnx-int8")) -> dict:
    torch.set_num_threads(1)
    rows = read_split_rows(data, "test")[:users]
    batch_rows = {k: [r[k] for r in rows] for k in ("context_ids", "seen_item_ids", "profile_ids")}
    out: dict = {"users": len(rows), "torch_threads": 1}
    scores: dict = {}
    for precision in ("fp32", *[p for p in precisions if p != "fp32"]):
        p = Predictor(PredictorConfig(retriever=retriever, ranker=ranker, items=data, precision=precision))
        out[precision] = _measure(p, batch_rows, batch, candidates, scores, precision)
        if precision == "fp32":
            continue
        out[f"{precision}_over_fp32"] = {k: round(out[precision][k] / out["fp32"][k], 3) for k in out["fp32"]}
        for role in ("retriever", "ranker"):
            if ("fp32", role) in scores:
                a, b = np.asarray(scores[("fp32", role)]), np.asarray(scores[(precision, role)])
                diff = {"max_abs_over_range": round(float(np.abs(a - b).max() / (a.max() - a.min())), 4),
                        "correlation": round(float(np.corrcoef(a.ravel(), b.ravel())[0, 1]), 5)}
                if a.ndim == 2:  # full-catalogue retrieval scores: how much of fp32's top 10 survives
                    diff["top10_overlap"] = round(float(np.mean([len(set(np.argsort(-a[j])[:10]) & set(np.argsort(-b[j])[:10]))
                                                                 for j in range(len(a))]) / 10), 3)
                out[f"{precision}_{role}_score_diff"] = diff
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--retriever")
    parser.add_argument("--ranker")
    parser.add_argument("--data", required=True)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--precisions", default="int8,onnx,onnx-int8", help="compared with fp32, comma-separated")
    args = parser.parse_args(argv)
    if not args.retriever and not args.ranker:
        parser.error("give --retriever and/or --ranker")
    out = compare(args.retriever, args.ranker, args.data, args.users, precisions=tuple(args.precisions.split(",")))
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
