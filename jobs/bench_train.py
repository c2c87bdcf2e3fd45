"""Benchmark: training throughput of a plain PyTorch loop vs Ray Train (1 and 2 workers).

    python jobs/bench_train.py --set data=artifacts/syn-tiny --set model=tiny --set steps=20
    python jobs/bench_train.py --set data=artifacts/ml-100k --set model=minilm --set output=artifacts/bench_train
    ray job submit --working-dir . -- python jobs/bench_train.py --set data=... --set gpu=true

Same model, data and per-worker batch in every run; reports samples/s and non-padding tokens/s,
Ray 1 worker / plain 1 thread (target >= 0.9), 2 workers / 1 worker, dynamic vs fixed padding and
MFU against a matmul peak measured in the same run. Every field of recsys_ray.bench.train.BenchConfig
via --config FILE.yaml or --set key=value. Results: OUTPUT/results.json and results.md; the last
stdout line is a JSON summary.
"""

from __future__ import annotations

from recsys_ray.bench.train import BenchConfig, run_benchmark
from recsys_ray.cli import command_line, job_config, job_parser, run_job


def main(argv: list[str] | None = None) -> dict:
    args = job_parser(__doc__).parse_args(argv)
    command = command_line("jobs/bench_train.py", argv)
    return run_job(lambda: run_benchmark(job_config(BenchConfig, args), command))


if __name__ == "__main__":
    main()
