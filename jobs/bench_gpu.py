"""The one GPU check: training (bf16 vs fp32, MFU, Ray Train vs a plain loop), the retriever and the
ranker offline per precision, and the Serve app with GPU replicas, in one run under 8 minutes.

    python jobs/bench_gpu.py --set data=artifacts/ml-100k                      # on a machine with a GPU
    python jobs/bench_gpu.py --set data=artifacts/ml-100k --set weights=random # no weight files at hand
    python jobs/bench_gpu.py --set data=artifacts/ml-100k --set dry_run=true   # CPU: checks the wiring
    ray job submit --working-dir . -- python jobs/bench_gpu.py --set output=s3://bucket/bench_gpu

Every field of recsys_ray.bench.gpu.BenchGpuConfig via --config FILE.yaml or --set key=value.
Results: OUTPUT/results.json and results.md; the last stdout line is one JSON summary with the
card's name, torch / CUDA / Ray versions and the headline numbers (docs/benchmarks.md).
"""

from __future__ import annotations

from recsys_ray.bench.gpu import BenchGpuConfig, dry_config, run_bench_gpu
from recsys_ray.cli import command_line, job_config, job_parser, run_job


def main(argv: list[str] | None = None) -> dict:
    args = job_parser(__doc__).parse_args(argv)
    command = command_line("jobs/bench_gpu.py", argv)
    return run_job(lambda: run_bench_gpu(dry_config(job_config(BenchGpuConfig, args)), command))


if __name__ == "__main__":
    main()
