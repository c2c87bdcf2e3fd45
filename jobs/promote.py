"""The promotion gate: score a candidate and the served retriever on the same held-out window;
promote the candidate only if it wins by the margin.

    python jobs/promote.py --candidate artifacts/runs/refresh --data artifacts/ml-100k --margin 0.01 \\
        --popularity-weight 1.0 --serve-config serve_configs/local.yaml   # current = the config's checkpoint

Writes the decision JSON (both models' metrics side by side, promoted or not, and why) to
--decision, and only when the candidate wins points --serve-config's retriever checkpoint at it
(the file is edited in place; comments survive). ``serve deploy`` of that file then replaces the
replicas, which drain their in-flight requests. Ends with the decision as one JSON line; exit 0
either way (a refusal is a decision, not an error), 2 on bad input.
"""

from __future__ import annotations

import argparse

from recsys_ray.cli import run_job
from recsys_ray.evaluate.promote import PromoteSettings, promote


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidate", required=True, help="checkpoint, run directory or s3:// URI")
    parser.add_argument("--current", help="the served retriever (same forms); default: --serve-config's checkpoint")
    parser.add_argument("--data", required=True, help="prepared window both are scored on")
    parser.add_argument("--decision", default="artifacts/promote/decision.json")
    parser.add_argument("--serve-config", help="serving config whose retriever checkpoint a winner replaces")
    parser.add_argument("--app", help="application of --serve-config (default: its only one)")
    parser.add_argument("--split", default="test", choices=["valid", "test"])
    parser.add_argument("--metric", default="ndcg@10")
    parser.add_argument("--margin", type=float, default=0.0, help="relative: the candidate must beat current x (1 + margin)")
    parser.add_argument("--popularity-weight", type=float, default=0.0, help="the served prior beta, for both")
    parser.add_argument("--max-users", type=int, default=0)
    args = parser.parse_args(argv)
    return run_job(lambda: promote(PromoteSettings(
        candidate=args.candidate, current=args.current, data=args.data, decision=args.decision,
        serve_config=args.serve_config, app=args.app, split=args.split, metric=args.metric, margin=args.margin,
        popularity_weight=args.popularity_weight, max_users=args.max_users)))


if __name__ == "__main__":
    main()
