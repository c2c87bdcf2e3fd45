"""Prepare behaviour logs for training: validate, split by time, build and tokenize examples.

    python jobs/prepare_data.py --dataset movielens-100k --output artifacts/ml-100k
    python jobs/prepare_data.py --dataset synthetic --output artifacts/syn --set synthetic.num_events=100000
    python jobs/prepare_data.py --dataset s3://bucket/logs/ --set items=s3://bucket/items.parquet --output out/
"""

from __future__ import annotations

import argparse

from recsys_ray.cli import run_job
from recsys_ray.config import DataConfig, build_config, load_yaml


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with DataConfig fields")
    parser.add_argument("--dataset", help="movielens-100k | synthetic | path, folder, glob or s3:// URI")
    parser.add_argument("--output", help="output directory")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = parser.parse_args(argv)

    def job() -> dict:
        from recsys_ray.data.pipeline import prepare, summary_line

        data = load_yaml(args.config) if args.config else {}
        for key in ("dataset", "output"):
            if getattr(args, key):
                data[key] = getattr(args, key)
        cfg = build_config(DataConfig, data, args.set)
        return summary_line(prepare(cfg))

    return run_job(job)


if __name__ == "__main__":
    main()
