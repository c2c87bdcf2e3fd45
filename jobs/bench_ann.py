"""Benchmark: the retriever's exact top k vs the approximate faiss IVF index, on synthetic catalogues
of 10^4, 10^5 and 10^6 items: ms per user, recall@100 against exact, build time and memory.

    python jobs/bench_ann.py                                   # the three sizes (a few minutes on 2 cores)
    python jobs/bench_ann.py --set "sizes=[10000]" --set users=50

Every field of recsys_ray.bench.ann.BenchAnnConfig via --config FILE.yaml or --set key=value.
Results: OUTPUT/results.json and results.md; the last stdout line is a JSON summary.
"""

from __future__ import annotations

from recsys_ray.bench.ann import BenchAnnConfig, run_bench_ann
from recsys_ray.cli import command_line, job_config, job_parser, run_job


def main(argv: list[str] | None = None) -> dict:
    args = job_parser(__doc__).parse_args(argv)
    command = command_line("jobs/bench_ann.py", argv)
    return run_job(lambda: run_bench_ann(job_config(BenchAnnConfig, args), command))


if __name__ == "__main__":
    main()
