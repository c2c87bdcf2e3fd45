"""Benchmark: Ray Serve (batched, autoscaling) vs a plain FastAPI process vs the offline predictor.

    python jobs/bench_serve.py                                   # untrained MiniLM checkpoints, ML-100K users
    python jobs/bench_serve.py --quick --model tiny              # smoke run (seconds per point)
    python jobs/bench_serve.py --retriever artifacts/models/retriever --ranker artifacts/models/ranker
    ray job submit --working-dir . -- python jobs/bench_serve.py --gpu

Closed loop at --concurrency clients, @serve.batch off vs on, open loop at fractions of the best
rate, /v1/recommend at one client, replica counts over time. All load goes to 127.0.0.1.
Results: OUTPUT/results.json and results.md; the last stdout line is a JSON summary. See
recsys_ray/bench_serve.py for what each number means.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from recsys_ray.cli import run_job


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="artifacts/ml-100k", help="prepared data dir: catalogue + users for requests")
    parser.add_argument("--retriever", default=None, help="retriever checkpoint or run dir (default: untrained, made here)")
    parser.add_argument("--ranker", default=None, help="ranker checkpoint or run dir (default: untrained, made here)")
    parser.add_argument("--model", choices=["minilm", "tiny"], default="minilm", help="encoder of made checkpoints")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--batch-compare-concurrency", type=int, default=32)
    parser.add_argument("--open-loop", type=float, nargs="+", default=[0.5, 3.0], help="x the best closed-loop req/s")
    parser.add_argument("--candidates", type=int, default=20, help="candidates per /v1/score request")
    parser.add_argument("--offline-pairs", type=int, default=640, help="pairs per offline score_pairs measurement")
    parser.add_argument("--offline-batch-sizes", type=int, nargs="+", default=[16, 64, 256], help="pairs per pass, offline")
    parser.add_argument("--rerank-top", type=int, default=20)
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before each point")
    parser.add_argument("--cooldown", type=float, default=45.0, help="quiet seconds at the end (scale-down)")
    parser.add_argument("--no-single-candidate", action="store_true", help="skip batch off/on with 1 candidate per request")
    parser.add_argument("--fixed-replicas", type=int, default=2, help="last point: Ranker pinned at N replicas (0 = skip)")
    parser.add_argument("--quick", action="store_true", help="short points, fewer of them (smoke run)")
    parser.add_argument("--gpu", action="store_true", help="model replicas, plain server and offline predictor on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="artifacts/bench_serve")
    args = parser.parse_args(argv)
    command = shlex.join(["python", *(sys.argv if argv is None else ["jobs/bench_serve.py", *argv])])

    def job() -> dict:
        from recsys_ray.bench_serve import load_bench_serve_config, run_bench_serve

        cfg = load_bench_serve_config({
            "data": args.data, "retriever": args.retriever, "ranker": args.ranker, "model": args.model,
            "concurrency": args.concurrency, "batch_compare_concurrency": args.batch_compare_concurrency,
            "open_loop": args.open_loop, "candidates": args.candidates, "rerank_top": args.rerank_top,
            "offline_pairs": args.offline_pairs, "offline_batch_sizes": args.offline_batch_sizes,
            "duration_s": args.duration, "warmup_s": args.warmup, "cooldown_s": args.cooldown,
            "single_candidate_compare": not args.no_single_candidate, "fixed_replicas": args.fixed_replicas,
            "quick": args.quick, "gpu": args.gpu, "seed": args.seed, "output": args.output,
        })
        return run_bench_serve(cfg, command)

    return run_job(job)


if __name__ == "__main__":
    main()
