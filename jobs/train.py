"""Fine-tune the BERT recommender on Ray Train.

    python jobs/train.py --config configs/tiny.yaml
    python jobs/train.py --config configs/cpu.yaml --set optim.lr=3e-5 --set epochs=2
    ray job submit --working-dir . -- python jobs/train.py --config configs/gpu.yaml

Plain `python` starts a local Ray; under `ray job submit` (RAY_ADDRESS set) it joins the cluster.
Running again with the same `name` and `storage_path` resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse

from recsys_ray.cli import run_job
from recsys_ray.config import load_yaml


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with TrainConfig fields (configs/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    args = parser.parse_args(argv)

    def job() -> dict:
        from recsys_ray.train import fit, load_train_config

        cfg = load_train_config(load_yaml(args.config) if args.config else {}, args.set)  # fails before Ray starts
        return fit(cfg)

    return run_job(job)


if __name__ == "__main__":
    main()
