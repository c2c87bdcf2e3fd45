"""Hyperparameter search (learning rate x loss x freeze strategy) on Ray Tune, ASHA on NDCG@10.

    python jobs/tune.py --config configs/tune-tiny.yaml
    python jobs/tune.py --config configs/tune-minilm.yaml --set tune.num_samples=8 --set train.epochs=2
    python jobs/tune.py --resume artifacts/tune/tune-tiny          # continue an interrupted sweep
    python jobs/tune.py --report-only artifacts/tune/tune-tiny     # rewrite its report, run nothing
    ray job submit --working-dir . -- python jobs/tune.py --config configs/tune-minilm.yaml

The sweep config has a `train:` section (TrainConfig fields, optionally `base: <preset.yaml>`) and
a `tune:` section (recsys_ray.tune.config.TuneSettings). Results, TensorBoard logs and report/ go
under <tune.storage_path>/<tune.name>; --resume and --report-only take that folder (or just the
name, looked up under --storage-path, default artifacts/tune).
"""

from __future__ import annotations

import argparse

from recsys_ray.cli import run_job
from recsys_ray.tune.config import load_sweep_file
from recsys_ray.tune.sweep import report_only, resume_sweep, run_sweep


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="sweep YAML (configs/tune-*.yaml); starts a new sweep")
    what.add_argument("--resume", metavar="PATH_OR_NAME", help="continue the sweep stored there")
    what.add_argument("--report-only", metavar="PATH_OR_NAME", help="write the report of a stored sweep")
    parser.add_argument("--storage-path", help="where a sweep given by name lives (default: artifacts/tune)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of a new sweep: train.optim.lr=1e-4, tune.num_samples=6")
    args = parser.parse_args(argv)

    def job() -> dict:
        if args.resume:
            return resume_sweep(args.resume, args.storage_path)
        if args.report_only:
            return report_only(args.report_only, args.storage_path)
        # config, space, data and metric are checked before any trial starts
        return run_sweep(load_sweep_file(args.config, args.set))

    return run_job(job)


if __name__ == "__main__":
    main()
