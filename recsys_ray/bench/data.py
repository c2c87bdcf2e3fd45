"""Benchmark: the Ray Data preparation vs the same transformation in one pandas process.

    python jobs/bench_data.py --set "sizes=[1000000, 10000000]" --set output=artifacts/bench_data

For each size it generates a synthetic log (users = events / 10, a fixed 20k-item catalogue),
then runs each implementation in a fresh child process (``python -m recsys_ray.bench.data
--child ...``) and reports events/s, examples/s, the ratio Ray / pandas, and the driver's own peak
RSS (the Ray driver must stay flat as the log grows; the pandas process holds the whole log).
Results: OUTPUT/results.json and results.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import ray

from recsys_ray.bench.common import publish, work_dir
from recsys_ray.bench.data_reference import prepare_pandas
from recsys_ray.config import build_config
from recsys_ray.data.config import DataConfig, SyntheticConfig
from recsys_ray.data.pipeline import prepare
from recsys_ray.data.synthetic import write_synthetic


@dataclasses.dataclass
class BenchDataConfig:
    """One data benchmark run (jobs/bench_data.py --config/--set)."""

    RANGES: ClassVar[dict[str, str]] = {"max_history": ">= 1"}

    sizes: list[int] = dataclasses.field(default_factory=lambda: [1_000_000, 10_000_000])  # events per log
    output: str = "artifacts/bench_data"  # logs, both outputs, results.json and results.md
    max_history: int = 10  # history items per example context
    seed: int = 0  # of the synthetic logs
    skip_pandas: bool = False  # only the Ray pipeline

    def problems(self) -> list[str]:
        if not self.sizes or min(self.sizes) < 1:
            return [f"sizes must be a non-empty list of integers >= 1, got {self.sizes}"]
        return []


def _data_config(source: Path, output: Path, max_history: int) -> DataConfig:
    return build_config(
        DataConfig,
        {
            "dataset": str(source / "events"),
            "items": str(source / "items.parquet"),
            "users": str(source / "users"),
            "output": str(output),
            "columns": {"event": "event"},
            "item_text_columns": ["title", "description"],
            "user_profile_columns": ["age", "country"],
            "max_history": max_history,
            "negatives": 4,
        },
    )


def child(kind: str, source: Path, output: Path, max_history: int) -> None:
    """Run one implementation and print its numbers as JSON (peak RSS of this process only)."""
    cfg = _data_config(source, output, max_history)
    t = time.perf_counter()
    if kind == "ray":
        m = prepare(cfg)
        c = m["counts"]
        res = {"events": c["rows_read"], "examples": sum(c["examples_by_split"].values()), "stages": m["timings"]}
    else:
        r = prepare_pandas(cfg)
        res = {"events": r["rows_read"], "examples": r["examples"]}
    res["seconds"] = round(time.perf_counter() - t, 2)
    res["driver_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("RESULT " + json.dumps(res), flush=True)


def generate(size: int, folder: Path, seed: int) -> Path:
    """The synthetic log for ``size`` events (reused when already generated)."""
    source = folder / f"syn-{size}"
    if (source / "DONE").exists():
        return source
    cfg = SyntheticConfig(num_users=max(1, size // 10), num_items=20_000, num_events=size, shard_users=20_000)
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        write_synthetic(cfg, seed, source)
    finally:
        ray.shutdown()
    (source / "DONE").write_text("ok")
    return source


def run_child(kind: str, source: Path, output: Path, max_history: int) -> dict:
    cmd = [sys.executable, "-m", "recsys_ray.bench.data", "--child", kind, "--source", str(source),
           "--output", str(output), "--max-history", str(max_history)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RECSYS_RAY_LOG": "WARNING"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{kind} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def results_markdown(rows: list[dict]) -> str:
    md = ["| events | impl | seconds | events/s | examples/s | driver peak RSS (MB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        for kind in ("ray", "pandas"):
            if kind in r:
                x = r[kind]
                md.append(
                    f"| {r['size']:,} | {kind} | {x['seconds']} | {x['events'] / x['seconds']:,.0f} | "
                    f"{x['examples'] / x['seconds']:,.0f} | {x['driver_peak_rss_mb']} |"
                )
    return "\n".join(md) + "\n"


def run_bench_data(cfg: BenchDataConfig) -> dict:
    """Every size: generate, Ray pipeline, pandas pipeline; OUTPUT/results.json + results.md."""
    out = work_dir(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in cfg.sizes:
        source = generate(size, out / "logs", cfg.seed)
        res = {"size": size, "ray": run_child("ray", source, out / f"ray-{size}", cfg.max_history)}
        print(f"size {size:>10,}: ray {res['ray']}", file=sys.stderr, flush=True)
        if not cfg.skip_pandas:
            res["pandas"] = run_child("pandas", source, out / f"pandas-{size}", cfg.max_history)
            print(f"size {size:>10,}: pandas {res['pandas']}", file=sys.stderr, flush=True)
            res["speedup"] = round(res["pandas"]["seconds"] / res["ray"]["seconds"], 2)
        rows.append(res)
    (out / "results.json").write_text(json.dumps({"cpus": os.cpu_count(), "runs": rows}, indent=2))
    md = results_markdown(rows)
    (out / "results.md").write_text(md)
    print(md, file=sys.stderr)
    return {"output": publish(cfg.output, out), "runs": rows}


def main() -> None:
    """The child process of one measurement (``--child ray|pandas``)."""
    p = argparse.ArgumentParser(description="one measurement of the data benchmark (internal)")
    p.add_argument("--child", choices=["ray", "pandas"], required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--max-history", type=int, required=True)
    args = p.parse_args()
    child(args.child, Path(args.source), Path(args.output), args.max_history)


if __name__ == "__main__":
    main()
