"""Benchmark: the retriever's exact top k vs the faiss IVF index, on synthetic catalogues of growing
size, measured in one run (jobs/bench_ann.py).

Per catalogue size N: unit item vectors of the retriever's width around N / ``items_per_center``
random directions (a catalogue has topics; uniformly random vectors would be the worst case for any
index), a popularity prior ``beta * log(1 + count)`` with Zipf counts, and ``users`` user vectors
drawn the same way, each excluding ``exclude`` random rows (its history). Then, on ``threads``
threads (1 = a CPU replica's share):

- **exact**: what ``Predictor.retrieve`` does without an index (one (B, H) x (H, N) product, the
  prior, :func:`recsys_ray.index.top_k`), one user per call and ``batch`` per call;
- **ivf**: :class:`recsys_ray.index.IVFIndex` built once (train + add, timed, all threads), then
  per ``nprobe``: ms per user (one per call) and recall@k of its top k against the exact top k;
- **memory**: the exact matrix's bytes, the index's bytes as faiss serializes it, and the
  process's resident memory growth while the index was built.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import ClassVar

import numpy as np
import psutil
import torch

from recsys_ray.bench.common import busy_cpus, publish, work_dir
from recsys_ray.bench.serve import _best_seconds
from recsys_ray.config import build_config, to_dict
from recsys_ray.index import IVFIndex, default_nlist, top_k

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BenchAnnConfig:
    """One ANN benchmark run (jobs/bench_ann.py --config/--set)."""

    RANGES: ClassVar[dict[str, str]] = {
        **dict.fromkeys(("dim", "users", "k", "batch", "threads", "items_per_center"), ">= 1"),
        "exclude": ">= 0", "temperature": "> 0", "beta": ">= 0",
    }

    sizes: list[int] = dataclasses.field(default_factory=lambda: [10_000, 100_000, 1_000_000])
    dim: int = 384  # the MiniLM retriever's vector width
    items_per_center: int = 100  # items per topic: a catalogue of N items has N / 100 topics
    users: int = 200  # query users per size
    k: int = 100  # recall@k of the index against the exact top k
    exclude: int = 20  # history rows excluded per user
    batch: int = 32  # users per exact call in the batched measurement
    nprobes: list[int] = dataclasses.field(default_factory=lambda: [8, 32, 128])
    temperature: float = 0.05
    beta: float = 0.5  # popularity prior weight
    threads: int = 1  # torch / faiss threads for the timed searches (the build uses every core)
    seed: int = 0
    output: str = "artifacts/bench_ann"

    def problems(self) -> list[str]:
        out = []
        if not self.sizes or min(self.sizes) < 100:
            out.append(f"sizes must be a non-empty list of catalogue sizes >= 100, got {self.sizes}")
        if not self.nprobes or min(self.nprobes) < 1:
            out.append(f"nprobes must be a non-empty list of integers >= 1, got {self.nprobes}")
        return out


def clustered_unit_vectors(n: int, dim: int, centers: np.ndarray, rng: np.random.Generator,
                           noise: float = 0.35, chunk: int = 100_000) -> np.ndarray:
    """(n, dim) float32 unit vectors, each a random center plus Gaussian noise (built in chunks)."""
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x = centers[rng.integers(0, len(centers), m)] + noise * rng.standard_normal((m, dim), dtype=np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact_search(items: torch.Tensor, prior: np.ndarray, temperature: float, users: np.ndarray, k: int,
                 exclude: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The Predictor's exact path: scores of every item, the prior, top k without the excluded rows."""
    scores = (torch.from_numpy(users) @ items.T / temperature).numpy() + prior[None, :]
    return [top_k(scores[j], k, exclude[j]) for j in range(len(users))]


def recall(got: list, truth: list, at: int) -> float:
    """Mean share of each user's exact top ``at`` rows that the approximate top ``at`` holds."""
    return float(np.mean([len(set(g[0][:at].tolist()) & set(w[0][:at].tolist())) / at
                          for g, w in zip(got, truth, strict=True)]))


def bench_size(cfg: BenchAnnConfig, n: int, rng: np.random.Generator) -> dict:
    centers = rng.standard_normal((max(1, n // cfg.items_per_center), cfg.dim)).astype(np.float32)
    items_np = clustered_unit_vectors(n, cfg.dim, centers, rng)
    users = clustered_unit_vectors(cfg.users, cfg.dim, centers, rng)
    prior = (cfg.beta * np.log1p(rng.zipf(1.3, n).clip(max=100_000))).astype(np.float32)
    exclude = [rng.choice(n, cfg.exclude, replace=False).tolist() for _ in range(cfg.users)]
    items = torch.from_numpy(items_np)

    import faiss

    out: dict = {"items": n, "exact_matrix_bytes": int(items_np.nbytes)}
    torch.set_num_threads(cfg.threads)
    faiss.omp_set_num_threads(cfg.threads)
    truth = exact_search(items, prior, cfg.temperature, users, cfg.k, exclude)
    t_one = _best_seconds("cpu", lambda: [exact_search(items, prior, cfg.temperature, users[j:j + 1], cfg.k, exclude[j:j + 1])
                           for j in range(cfg.users)])
    t_batch = _best_seconds("cpu", lambda: [exact_search(items, prior, cfg.temperature, users[j:j + cfg.batch], cfg.k,
                                          exclude[j:j + cfg.batch]) for j in range(0, cfg.users, cfg.batch)])
    out["exact"] = {"ms_per_user": round(1000 * t_one / cfg.users, 3),
                    "ms_per_user_batched": round(1000 * t_batch / cfg.users, 3)}
    log.info("N=%d exact: %s", n, out["exact"])

    cpus = os.cpu_count() or 1
    faiss.omp_set_num_threads(cpus)
    rss0 = psutil.Process().memory_info().rss
    t = time.perf_counter()
    index = IVFIndex(items_np, cfg.temperature, prior, nprobe=1, seed=cfg.seed)
    build_s = time.perf_counter() - t
    out["ivf"] = {"nlist": index.nlist, "build_s": round(build_s, 2), "build_threads": cpus,
                  "index_bytes": index.memory_bytes(), "rss_growth_bytes": int(psutil.Process().memory_info().rss - rss0),
                  "nprobe": {}}
    faiss.omp_set_num_threads(cfg.threads)
    for nprobe in cfg.nprobes:
        index.index.nprobe = min(nprobe, index.nlist)
        got = index.search(users, cfg.k, exclude)
        t_one = _best_seconds("cpu", lambda: [index.search(users[j:j + 1], cfg.k, exclude[j:j + 1]) for j in range(cfg.users)])  # noqa: B023 (called at once)
        res = {"ms_per_user": round(1000 * t_one / cfg.users, 3), f"recall_at_{cfg.k}": round(recall(got, truth, cfg.k), 4),
               "recall_at_10": round(recall(got, truth, 10), 4),
               "speedup_vs_exact": round(out["exact"]["ms_per_user"] / (1000 * t_one / cfg.users), 2)}
        out["ivf"]["nprobe"][str(nprobe)] = res
        log.info("N=%d ivf nprobe=%d: %s", n, nprobe, res)
    return out


def run_bench_ann(cfg: BenchAnnConfig, command: str = "") -> dict:
    out_dir = work_dir(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    busy = busy_cpus()
    threads_before = torch.get_num_threads()
    rng = np.random.default_rng(cfg.seed)
    results: dict = {"command": command, "config": to_dict(cfg), "cpus": os.cpu_count(), "busy_cpus_before": busy,
                     "default_nlist": {str(n): default_nlist(n) for n in cfg.sizes}, "sizes": {}}
    try:
        for n in cfg.sizes:
            results["sizes"][str(n)] = bench_size(cfg, n, rng)
    finally:
        torch.set_num_threads(threads_before)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(results_markdown(results))
    return {"output": publish(cfg.output, out_dir),
            "exact_ms_per_user": {n: r["exact"]["ms_per_user"] for n, r in results["sizes"].items()},
            "ivf": {n: {p: (v["ms_per_user"], v[f"recall_at_{cfg.k}"]) for p, v in r["ivf"]["nprobe"].items()}
                    for n, r in results["sizes"].items()}}


def results_markdown(res: dict) -> str:
    cfg = res["config"]
    k = cfg["k"]
    lines = [f"Command: `{res['command']}`", "",
             f"{res['cpus']} CPUs; searches on {cfg['threads']} thread(s); {cfg['users']} users per size, "
             f"{cfg['exclude']} excluded rows each; vectors of width {cfg['dim']} around N / {cfg['items_per_center']} centers.", "",
             f"| items | exact ms/user | exact ms/user (batch {cfg['batch']}) | IVF lists | build s | nprobe | IVF ms/user "
             f"| speed-up | recall@{k} | recall@10 | exact matrix MB | index MB | RSS growth MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in res["sizes"].items():
        ivf = r["ivf"]
        for i, (p, v) in enumerate(ivf["nprobe"].items()):
            first = i == 0
            lines.append(
                f"| {int(n):,} | {r['exact']['ms_per_user'] if first else ''} | {r['exact']['ms_per_user_batched'] if first else ''} "
                f"| {ivf['nlist'] if first else ''} | {ivf['build_s'] if first else ''} | {p} | {v['ms_per_user']} "
                f"| {v['speedup_vs_exact']}x | {v[f'recall_at_{k}']} | {v['recall_at_10']} "
                f"| {r['exact_matrix_bytes'] / 2**20:.0f} | {ivf['index_bytes'] / 2**20:.0f} | {ivf['rss_growth_bytes'] / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def load_bench_ann_config(data: dict) -> BenchAnnConfig:
    return build_config(BenchAnnConfig, data)
