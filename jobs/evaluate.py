"""Offline evaluation on the test split: fine-tuned models vs popularity, EASE and the
sequential Markov and SASRec baselines (their knobs chosen on validation).

    python jobs/evaluate.py --data artifacts/ml-100k --checkpoint RUN/checkpoint_... --output artifacts/eval
    python jobs/evaluate.py --data DIR --checkpoint SEED0 SEED1 SEED2 --ranker RANKER --output DIR

Full ranking over the whole catalogue (history masked), Ray Data batch inference with the same
predictor class Ray Serve wraps. Writes metrics.json, report.md and PNG plots into --output,
prints the table (stderr), and ends with a one-line JSON summary. A run directory (with
checkpoint_manager_snapshot.json) or an s3:// URI may be given instead of a checkpoint: its best
one is used.

    python jobs/evaluate.py --merge EVAL_SEED0/metrics.json EVAL_SEED1/metrics.json --output DIR
combines separate runs (one job per seed, e.g. in parallel on a cluster) into one report.
"""

from __future__ import annotations

import argparse
import sys

from recsys_ray.cli import run_job
from recsys_ray.evaluate.evaluate import EvalSettings, evaluate, merge_results
from recsys_ray.evaluate.report import format_table
from recsys_ray.evaluate.sequential import SequentialSettings
from recsys_ray.model.compress import PRECISIONS


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="prepared data directory (jobs/prepare_data.py output)")
    parser.add_argument("--merge", nargs="+", metavar="METRICS_JSON",
                        help="instead of scoring: combine metrics.json files of separate runs (e.g. one per seed)")
    parser.add_argument("--checkpoint", nargs="*", default=[], help="retriever checkpoint(s) or run dir(s), one per seed")
    parser.add_argument("--ranker", nargs="*", default=[], help="ranker checkpoint(s): one, or one per --checkpoint")
    parser.add_argument("--output", default="artifacts/eval")
    parser.add_argument("--rerank-top", type=int, default=50, help="two-stage: how many retrieved items the ranker rescores")
    parser.add_argument("--beta", type=float, default=None,
                        help="the popularity prior's beta for retriever+prior instead of choosing it on validation "
                             "(required for a refit checkpoint, whose validation split is in sample)")
    parser.add_argument("--sampled", action="store_true", help="also report the (labelled) sampled 1+99 protocol")
    parser.add_argument("--max-users", type=int, default=0, help="evaluate the first N test users only (smoke runs)")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--sasrec-seeds", type=int, default=3,
                        help="SASRec rows over seeds 1..N after its knobs are chosen with seed 0 (0: no SASRec; "
                             "a few CPU minutes each on MovieLens-100K)")
    parser.add_argument("--no-sasrec-refit", action="store_true",
                        help="score the test split with SASRec's best validation epoch instead of refitting it on "
                             "everything before the test event for that many epochs (as EASE and Markov are refitted)")
    parser.add_argument("--no-sequential", action="store_true", help="no Markov / SASRec rows")
    parser.add_argument("--targets", default="all", choices=["all", "cold", "warm", "cold_users"],
                        help="test events on the data's held-out cold items only, on the others, or all "
                             "(data prepared with --set cold_items=F); cold_users: the held-out users' rows "
                             "(--set cold_users=F), one row per number of known events")
    parser.add_argument("--task", default="recommend", choices=["recommend", "search"],
                        help="search: the personalised-search table (BM25, zero-shot, query-filtered popularity, "
                             "the checkpoints' recommendation route, search with and without the user)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="score with the models in this precision (int8: dynamic quantization, CPU; bf16/fp16: half-precision encoders, for GPUs)")
    parser.add_argument("--s3-endpoint", help="S3-compatible store (default: AWS_ENDPOINT_URL(_S3), else AWS)")
    args = parser.parse_args(argv)
    if not args.merge and not args.data:
        parser.error("--data is required (or --merge)")

    def job() -> dict:
        if args.merge:
            out = merge_results(args.merge, args.output)
        else:
            out = evaluate(EvalSettings(
                data=args.data, checkpoints=args.checkpoint, rankers=args.ranker, output=args.output,
                rerank_top=args.rerank_top, beta=args.beta, sampled=args.sampled, max_users=args.max_users,
                baselines=not args.no_baselines, s3_endpoint=args.s3_endpoint, precision=args.precision,
                targets=args.targets, task=args.task,
                sequential=None if args.no_sequential else SequentialSettings(
                    sasrec_seeds=args.sasrec_seeds, sasrec_refit=not args.no_sasrec_refit),
            ))
        print(format_table(out["result"]), file=sys.stderr)
        return out["summary"]

    return run_job(job)


if __name__ == "__main__":
    main()
