"""Benchmark: scale-out on a simulated multi-node cluster (data pipeline on 1/2/3 nodes, Train 1 vs 2 nodes).

    python jobs/bench_cluster.py                          # 1M events, nodes 1, 2, 3, 1 CPU per node
    python jobs/bench_cluster.py --set events=200000 --set "nodes=[1, 2]"

Starts its own clusters with cluster/local-multinode.sh and submits every point with
`ray job submit --working-dir .`. Every field of recsys_ray.bench.cluster.BenchClusterConfig via
--config FILE.yaml or --set key=value. Results: OUTPUT/results.json and results.md; the last
stdout line is a JSON summary.
"""

from __future__ import annotations

from recsys_ray.bench.cluster import BenchClusterConfig, run_bench_cluster
from recsys_ray.cli import command_line, job_config, job_parser, run_job


def main(argv: list[str] | None = None) -> dict:
    args = job_parser(__doc__).parse_args(argv)
    command = command_line("jobs/bench_cluster.py", argv)
    return run_job(lambda: run_bench_cluster(job_config(BenchClusterConfig, args), command))


if __name__ == "__main__":
    main()
