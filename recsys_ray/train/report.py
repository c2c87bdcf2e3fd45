"""Print a training summary (the JSON line of jobs/train.py) as a small readable table.

    python -m recsys_ray.train.report artifacts/demo-train.json
    python -m recsys_ray.train.report --best-checkpoint artifacts/demo-train.json   # its path only
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def format_summary(summary: dict) -> str:
    """Validation metrics of the best checkpoint, one per line, plus where the run ended."""
    m = summary.get("metrics", {})
    final = summary.get("final", {})
    rows = [
        ("protocol", m.get("protocol")),
        ("NDCG@10", m.get("ndcg@10")),
        ("HR@10", m.get("hr@10")),
        ("MRR@10", m.get("mrr@10")),
        ("MRR", m.get("mrr")),
        *((("search NDCG@10", m["search_ndcg@10"]), ("search HR@10", m.get("search_hr@10")))
          if "search_ndcg@10" in m else ()),
        ("epoch", m.get("epoch")),
        ("step", m.get("global_step")),
        ("train loss", m.get("train_loss")),
        ("samples/s", m.get("samples_per_s")),
        ("run ended at", f"epoch {final.get('epoch')}, step {final.get('global_step')}"
         + (" (early stopping: validation stopped improving)" if final.get("stopped_early") else "")),
        ("restarts", f"{final['restarts']} (the last resumed from step {final.get('resumed_from_step')})"
         if final.get("restarts") else "none"),
        ("seconds", summary.get("seconds")),
        ("best checkpoint", summary.get("best_checkpoint")),
    ]
    if m.get("refit"):  # trained on the validation events: nothing to validate, the last epoch is kept
        rows = [(k, v) for k, v in rows if k not in ("protocol", "NDCG@10", "HR@10", "MRR@10", "MRR")]
    width = max(len(k) for k, _ in rows)
    lines = ["refit run (trained on the validation events too): not validated, the last epoch is kept:" if m.get("refit")
             else "validation metrics of the best checkpoint (leave-last-out; protocol full = every item ranked):"]
    for k, v in rows:
        shown = f"{v:.4f}" if isinstance(v, float) else str(v)
        lines.append(f"  {k:<{width}}  {shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    best_only = bool(args) and args[0] == "--best-checkpoint"
    args = args[1:] if best_only else args
    if len(args) != 1:
        raise SystemExit("usage: python -m recsys_ray.train.report [--best-checkpoint] SUMMARY.json")
    text = Path(args[0]).read_text().strip().splitlines()
    if not text:
        raise SystemExit(f"{args[0]}: empty (did training fail? see its log above)")
    summary = json.loads(text[-1])
    if best_only:
        if not summary.get("best_checkpoint"):
            raise SystemExit(f"{args[0]}: no best_checkpoint in the summary")
        print(summary["best_checkpoint"])
        return
    print(format_summary(summary))


if __name__ == "__main__":
    main()
