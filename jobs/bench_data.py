"""Benchmark: the Ray Data preparation vs the same transformation in one pandas process.

    python jobs/bench_data.py                                            # 1M and 10M events
    python jobs/bench_data.py --set "sizes=[100000]" --set skip_pandas=true

Every field of recsys_ray.bench.data.BenchDataConfig via --config FILE.yaml or --set key=value.
Results: OUTPUT/results.json and results.md; the last stdout line is a JSON summary.
"""

from __future__ import annotations

from recsys_ray.bench.data import BenchDataConfig, run_bench_data
from recsys_ray.cli import job_config, job_parser, run_job


def main(argv: list[str] | None = None) -> dict:
    args = job_parser(__doc__).parse_args(argv)
    return run_job(lambda: run_bench_data(job_config(BenchDataConfig, args)))


if __name__ == "__main__":
    main()
