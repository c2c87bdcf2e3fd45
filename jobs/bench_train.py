"""Benchmark: training throughput of a plain PyTorch loop vs Ray Train (1 and 2 workers).

    python jobs/bench_train.py --data artifacts/syn-tiny --model tiny --steps 20 --batch-size 16
    python jobs/bench_train.py --data artifacts/ml-100k --model minilm --steps 20 --output artifacts/bench_train
    ray job submit --working-dir . -- python jobs/bench_train.py --data ... --gpu

Same model, data and per-worker batch in every run; reports samples/s and non-padding tokens/s,
Ray 1 worker / plain 1 thread (target >= 0.9), 2 workers / 1 worker, dynamic vs fixed padding and
MFU against a matmul peak measured in the same run. Results: OUTPUT/results.json and results.md;
the last stdout line is a JSON summary. See recsys_ray/bench.py for what each number means.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from recsys_ray.cli import run_job


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared data directory (jobs/prepare_data.py output)")
    parser.add_argument("--model", choices=["tiny", "minilm"], default="tiny")
    parser.add_argument("--kind", choices=["retriever", "ranker"], default="retriever")
    parser.add_argument("--loss", choices=["bce", "softmax", "bpr", "lambdarank"], default="softmax")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps before the plain loop's timer")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per worker per step")
    parser.add_argument("--max-context-tokens", type=int, default=0, help="cut contexts at batch time (0 = as prepared)")
    parser.add_argument("--matmul-size", type=int, default=0, help="n of the peak matmul (0 = 2048 CPU, 8192 GPU)")
    parser.add_argument("--gpu", action="store_true", help="CUDA + bf16 autocast; 1 GPU per Ray worker")
    parser.add_argument("--output", default="artifacts/bench_train")
    args = parser.parse_args(argv)
    command = shlex.join([sys.executable, *(sys.argv if argv is None else ["jobs/bench_train.py", *argv])])

    def job() -> dict:
        from recsys_ray.bench import load_bench_config, run_benchmark

        cfg = load_bench_config({
            "data": args.data, "model": args.model, "kind": args.kind, "loss": args.loss,
            "steps": args.steps, "warmup_steps": args.warmup_steps, "batch_size": args.batch_size,
            "max_context_tokens": args.max_context_tokens, "matmul_size": args.matmul_size,
            "gpu": args.gpu, "output": args.output,
        })
        return run_benchmark(cfg, command)

    return run_job(job)


if __name__ == "__main__":
    main()
