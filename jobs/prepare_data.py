"""Prepare behaviour logs: read, validate, split by time and tokenize examples.

    python jobs/prepare_data.py --dataset movielens-100k --output artifacts/ml-100k
    python jobs/prepare_data.py --dataset synthetic --output artifacts/syn --set synthetic.num_events=100000
    python jobs/prepare_data.py --dataset s3://bucket/logs/ --set items=s3://bucket/items.parquet --output out/

Every field of recsys_ray.data.config.DataConfig via --config FILE.yaml or --set key=value.
"""

from __future__ import annotations

from recsys_ray.cli import job_config, job_parser, run_job
from recsys_ray.data.config import DataConfig
from recsys_ray.data.pipeline import prepare, summary_line


def main(argv: list[str] | None = None) -> dict:
    parser = job_parser(__doc__, "YAML file with DataConfig fields")
    parser.add_argument("--dataset", help="movielens-100k | synthetic | path, folder, glob or s3:// URI")
    parser.add_argument("--output", help="output directory")
    args = parser.parse_args(argv)
    return run_job(lambda: summary_line(prepare(
        job_config(DataConfig, args, {"dataset": args.dataset, "output": args.output}))))


if __name__ == "__main__":
    main()
