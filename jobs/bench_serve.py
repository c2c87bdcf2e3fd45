"""Benchmark: Ray Serve (batched, autoscaling) vs a plain FastAPI process vs the offline predictor.

    python jobs/bench_serve.py                                   # untrained MiniLM checkpoints, ML-100K users
    python jobs/bench_serve.py --set quick=true --set model=tiny  # smoke run (seconds per point)
    python jobs/bench_serve.py --set retriever=artifacts/models/retriever --set ranker=artifacts/models/ranker
    ray job submit --working-dir . -- python jobs/bench_serve.py --set gpu=true

Closed loop at `concurrency` clients, @serve.batch off vs on, open loop at fractions of the best
rate, /v1/recommend at one client, replica counts over time. All load goes to 127.0.0.1. Every
field of recsys_ray.bench.serve.BenchServeConfig via --config FILE.yaml or --set key=value.
Results: OUTPUT/results.json and results.md; the last stdout line is a JSON summary.
"""

from __future__ import annotations

from recsys_ray.bench.serve import BenchServeConfig, quick_config, run_bench_serve
from recsys_ray.cli import command_line, job_config, job_parser, run_job


def main(argv: list[str] | None = None) -> dict:
    args = job_parser(__doc__).parse_args(argv)
    command = command_line("jobs/bench_serve.py", argv)
    return run_job(lambda: run_bench_serve(quick_config(job_config(BenchServeConfig, args)), command))


if __name__ == "__main__":
    main()
