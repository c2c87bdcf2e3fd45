"""Fine-tune the BERT recommender on Ray Train.

    python jobs/train.py --config configs/tiny.yaml
    python jobs/train.py --config configs/cpu.yaml --set optim.lr=3e-5 --set epochs=2
    ray job submit --working-dir . -- python jobs/train.py --config configs/gpu.yaml

Plain `python` starts a local Ray; under `ray job submit` (RAY_ADDRESS set) it joins the cluster.
Running again with the same `name` and `storage_path` resumes from the latest checkpoint.
Every field of recsys_ray.train.config.TrainConfig via --config FILE.yaml or --set key=value.
"""

from __future__ import annotations

from recsys_ray.cli import job_config, job_parser, run_job
from recsys_ray.train.config import TrainConfig
from recsys_ray.train.driver import fit


def main(argv: list[str] | None = None) -> dict:
    args = job_parser(__doc__, "YAML file with TrainConfig fields (configs/*.yaml)").parse_args(argv)
    return run_job(lambda: fit(job_config(TrainConfig, args)))  # the config fails before Ray starts


if __name__ == "__main__":
    main()
