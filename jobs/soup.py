"""A model soup: average the weights of several fine-tuned checkpoints into one checkpoint.

    python jobs/soup.py --checkpoint artifacts/runs/cpu-s1 artifacts/runs/cpu-s2 artifacts/runs/cpu-s3 \\
        --output artifacts/runs/cpu-soup --data artifacts/ml-100k

Ingredients: the same model config and catalogue (usually the same config trained with other
seeds); a run directory means its best checkpoint (--pick last: its latest).
With --data, the validation NDCG@10 of each ingredient and of the soup is measured (retrievers).
The soup is served and evaluated like any checkpoint (recsys_ray/train/soup.py). Ends with a
one-line JSON summary; exit 2 with a one-line error on bad input.
"""

from __future__ import annotations

import argparse

from recsys_ray.cli import run_job
from recsys_ray.train.soup import SoupSettings, soup


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", required=True, help="checkpoints, run directories or s3:// URIs")
    parser.add_argument("--output", required=True, help="new local directory for the soup's checkpoint")
    parser.add_argument("--data", help="prepared data: validate the ingredients and the soup on its valid split")
    parser.add_argument("--pick", default="best", choices=["best", "last"],
                        help="a run directory's best checkpoint (validation NDCG@10) or its last")
    parser.add_argument("--max-users", type=int, default=0, help="validation users (0: all)")
    args = parser.parse_args(argv)
    return run_job(lambda: soup(SoupSettings(checkpoints=args.checkpoint, output=args.output, data=args.data,
                                             max_users=args.max_users, pick=args.pick)))


if __name__ == "__main__":
    main()
