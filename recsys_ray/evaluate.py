"""Offline evaluation: fine-tuned models vs popularity and EASE, on the same split and protocol.

Protocol (DESIGN.md): leave-last-out by time; each test user's held-out item is ranked against
the WHOLE catalogue, the user's train+validation items masked (the target itself never is);
NDCG/HR/MRR/Recall @ 5, 10, 20, 50; ties pessimistic. A sampled protocol (1 positive + 99
uniform unseen items, fixed seed) is only computed on request and always labelled "sampled".

Model scoring is Ray Data batch inference: the test split is read with ``read_parquet`` and
mapped by :class:`RankUDF`, an actor class wrapping :class:`recsys_ray.predict.Predictor`
(the class Ray Serve wraps too), so offline and served scores come from the same code.

Per retriever checkpoint (one per training seed) it reports
- ``retriever``: its own scores;
- ``retriever+prior``: plus ``beta * log(1 + train count)``, beta chosen on the validation
  split (in-batch softmax learns scores with item popularity divided out; the prior puts it back);
- ``two-stage``: with ``--ranker``: the retriever's top N (at the chosen beta) rescored by the
  ranker, everything below keeps the retriever's order (a retrieval miss stays a miss for K <= N);
  plus ``retriever_recall@N`` on its own.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads

from recsys_ray.errors import RecsysError
from recsys_ray.metrics import MetricAccumulator, sample_unseen, sampled_ranks, target_ranks

log = logging.getLogger(__name__)

KS = (5, 10, 20, 50)
HEADLINE = ("ndcg@10", "hr@10")
DEFAULT_BETAS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


@dataclass
class EvalSettings:
    data: str
    checkpoints: list[str] = field(default_factory=list)  # retrievers, one per training seed
    rankers: list[str] = field(default_factory=list)  # none, one, or one per retriever
    output: str = "artifacts/eval"
    rerank_top: int = 50
    betas: tuple[float, ...] = DEFAULT_BETAS
    sampled: bool = False
    sampled_negatives: int = 99
    seed: int = 0
    batch_size: int = 64
    actors: int = 0  # 0: one per CPU of the cluster, at most 2
    max_users: int = 0  # 0: every test user
    baselines: bool = True

    def problems(self) -> list[str]:
        out = []
        if not self.checkpoints and not self.rankers:
            out.append("give at least one --checkpoint (retriever) or --ranker")
        if self.rankers and self.checkpoints and len(self.rankers) not in (1, len(self.checkpoints)):
            out.append(f"--ranker: give one ranker or one per checkpoint ({len(self.checkpoints)}), got {len(self.rankers)}")
        for p in [*self.checkpoints, *self.rankers]:
            if not str(p).startswith("s3://") and not Path(p).is_dir():
                out.append(f"checkpoint not found: {p}")
        if not (Path(self.data) / "manifest.json").is_file():
            out.append(f"--data {self.data}: not a prepared data directory (no manifest.json)")
        if self.rerank_top < 1:
            out.append("rerank_top must be >= 1")
        if not self.betas or any(b < 0 for b in self.betas):
            out.append("betas must be a non-empty list of values >= 0")
        return out


# --- reading the split ---------------------------------------------------------------------------


def split_path(data: str, split: str) -> str:
    return f"{str(data).rstrip('/')}/examples/split={split}"


def _seen_rows(items_index: dict, seen: Sequence[str], target: int) -> np.ndarray:
    rows = np.fromiter((items_index[i] for i in seen), dtype=np.int64, count=len(seen))
    return rows[rows != target]  # a repeat of a history item is still a legitimate hit


# --- the Ray Data UDF ----------------------------------------------------------------------------


class RankUDF:
    """Ray Data actor: test rows -> ranks of each row's target under every scoring variant.

    Output columns: ``user_id``, ``rank_b{j}`` (retriever + betas[j] * prior, full ranking),
    ``rank_two_stage``, ``in_shortlist`` (with a ranker), ``rank_sampled_*`` (when asked).
    """

    def __init__(self, predictor: dict, betas: Sequence[float], rerank_beta: float | None,
                 sampled: int, seed: int, torch_threads: int = 1):
        from recsys_ray.predict import Predictor, PredictorConfig

        self.p = Predictor(PredictorConfig(**predictor, torch_threads=torch_threads))
        self.betas = list(betas)
        self.rerank_beta = rerank_beta
        self.sampled, self.seed = sampled, seed
        counts = self.p.items.counts
        self.prior = np.log1p(counts).astype(np.float32) if counts is not None else np.zeros(len(self.p.items), np.float32)

    def __call__(self, batch: dict) -> dict:
        p, items = self.p, self.p.items
        n = len(batch["user_id"])
        targets = np.array([items.index[t] for t in batch["target_item_id"]], dtype=np.int64)
        seen = [_seen_rows(items.index, list(s), int(t)) for s, t in zip(batch["seen_item_ids"], targets, strict=True)]
        contexts = p.example_contexts(batch, "retriever") if p.retriever is not None else None
        rank_contexts = p.example_contexts(batch, "ranker") if p.ranker is not None else None
        mask = np.zeros((n, len(items)), dtype=bool)
        for j, s in enumerate(seen):
            mask[j, s] = True
        out: dict[str, np.ndarray] = {"user_id": np.asarray(batch["user_id"])}
        if p.retriever is not None:
            raw = p.retrieval_scores(contexts, with_prior=False)  # (n, I)
            for j, b in enumerate(self.betas):
                out[f"rank_b{j}"] = target_ranks(raw + b * self.prior[None, :], targets, mask)
            if self.sampled:
                out["rank_sampled_retriever"] = self._sampled(batch, raw, targets, seen)
        if p.retriever is not None and p.ranker is not None and self.rerank_beta is not None:
            scores = raw + self.rerank_beta * self.prior[None, :]
            full = target_ranks(scores, targets, mask)
            n_top = p.cfg.rerank_top
            two, hit = np.empty(n, np.int64), np.zeros(n, bool)
            for j in range(n):
                s = scores[j].copy()
                s[seen[j]] = -np.inf
                top = np.argpartition(-s, n_top - 1)[:n_top]
                if targets[j] in top:
                    hit[j] = True
                    r = p.rerank(rank_contexts[j], top)
                    t = r[int(np.flatnonzero(top == targets[j])[0])]
                    two[j] = int(np.count_nonzero(r >= t)) - 1  # pessimistic ties
                else:
                    two[j] = full[j]  # below the reranked top N, in retriever order: >= N
            out["rank_two_stage"], out["in_shortlist"] = two, hit
        if p.ranker is not None and self.sampled:
            ranks = np.empty(n, np.int64)
            for j in range(n):
                negs = sample_unseen(batch["user_id"][j], np.append(seen[j], targets[j]), len(items), self.sampled, self.seed)
                sc = p.rerank(rank_contexts[j], np.concatenate([[targets[j]], negs]))
                ranks[j] = int(sampled_ranks(sc[:1], sc[None, 1:])[0])
            out["rank_sampled_ranker"] = ranks
        return out

    def _sampled(self, batch, raw, targets, seen) -> np.ndarray:
        ranks = np.empty(len(targets), np.int64)
        for j in range(len(targets)):
            negs = sample_unseen(batch["user_id"][j], np.append(seen[j], targets[j]), raw.shape[1], self.sampled, self.seed)
            ranks[j] = int(sampled_ranks(raw[j, targets[j]][None], raw[j, negs][None])[0])
        return ranks


def rank_split(settings: EvalSettings, split: str, retriever: str | None, ranker: str | None,
               rerank_beta: float | None, sampled: int = 0) -> dict[str, np.ndarray]:
    """Run :class:`RankUDF` over one split with Ray Data; returns the rank columns (by user)."""
    import ray

    from recsys_ray.runtime import cluster_cpus

    cpus = max(1, int(cluster_cpus()))
    actors = settings.actors or min(2, cpus)
    columns = ["user_id", "target_item_id", "context_ids", "seen_item_ids"]
    if "profile_ids" in pads.dataset(split_path(settings.data, split), format="parquet").schema.names:
        columns.append("profile_ids")  # item-token retrievers read the profile's ids
    ds = ray.data.read_parquet(split_path(settings.data, split)).select_columns(columns)
    if settings.max_users:  # the first N users by id: the same users the baselines score
        ids = pads.dataset(split_path(settings.data, split), format="parquet").to_table(columns=["user_id"])
        keep = set(sorted(ids["user_id"].to_pylist())[: settings.max_users])
        ds = ds.filter(lambda row: row["user_id"] in keep)
    # read before the actors start: actors holding every CPU would leave the read tasks none
    ds = ds.materialize()
    # a small split is one block: split it so every actor gets a share
    ds = ds.repartition(max(1, min(ds.count() // settings.batch_size, 4 * actors))).materialize()
    predictor = {"retriever": retriever, "ranker": ranker, "items": settings.data,
                 "batch_size": settings.batch_size, "rerank_top": settings.rerank_top}
    ranked = ds.map_batches(
        RankUDF,
        fn_constructor_kwargs={"predictor": predictor, "betas": list(settings.betas), "rerank_beta": rerank_beta,
                               "sampled": sampled, "seed": settings.seed,
                               "torch_threads": max(1, cpus // actors)},
        batch_size=settings.batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=min(1.0, cpus / actors) * 0.9,  # leave a sliver for the reader and the driver
    )
    rows = ranked.to_pandas()
    rows = rows.sort_values("user_id", kind="stable").reset_index(drop=True)
    return {c: rows[c].to_numpy() for c in rows.columns}


# --- baselines -----------------------------------------------------------------------------------


def baseline_ranks(data: str, max_users: int = 0) -> dict[str, dict]:
    """Popularity and EASE (L2 tuned on validation) ranks of every test user's target."""
    from recsys_ray.baselines import (
        ItemIndex,
        ease_fit,
        ease_scores,
        interactions_matrix,
        popularity_scores,
        tune_ease_l2,
    )

    root = str(data).rstrip("/")
    items = ItemIndex(pads.dataset(f"{root}/items", format="parquet").to_table(columns=["item_id"])["item_id"].to_pylist())
    seq = pads.dataset(f"{root}/sequences", format="parquet").to_table(columns=["user_id", "item_ids", "n_train"]).to_pylist()
    seq.sort(key=lambda r: r["user_id"])
    train_rows, full_rows, valid_t, test_t, test_users = [], [], [], [], []
    for r in seq:
        ids, n = r["item_ids"], r["n_train"]
        train_rows.append(ids[:n])
        valid_t.append(items.index_of(ids[n]) if len(ids) > n else -1)
        has_test = len(ids) > n + 1
        full_rows.append(ids[: n + 1] if has_test else ids)
        test_t.append(items.index_of(ids[n + 1]) if has_test else -1)
        if has_test:
            test_users.append(r["user_id"])
    X_train = interactions_matrix(train_rows, items)
    X_full = interactions_matrix(full_rows, items)  # everything before each user's test event
    users = np.flatnonzero(np.asarray(test_t) >= 0)
    if max_users:
        users, test_users = users[:max_users], test_users[:max_users]
    targets = np.asarray(test_t)[users]
    history = X_full[users]
    coo = history.tocoo()
    keep = coo.col != targets[coo.row]
    import scipy.sparse as sp

    mask = sp.csr_matrix((np.ones(int(keep.sum()), bool), (coo.row[keep], coo.col[keep])), shape=history.shape)
    out: dict[str, dict] = {}
    pop = popularity_scores(X_full.tocoo().col, len(items))
    out["popularity"] = {"ranks": target_ranks(np.tile(pop, (len(users), 1)), targets, mask), "params": {}}
    l2, curve = tune_ease_l2(X_train, np.asarray(valid_t))
    B = ease_fit(X_full, l2)
    out["EASE"] = {"ranks": target_ranks(ease_scores(history, B), targets, mask),
                   "params": {"l2": l2, "valid_ndcg@10_by_l2": {str(k): round(v, 5) for k, v in curve.items()}}}
    out["_users"] = {"ids": test_users}
    return out


# --- aggregation and the report ------------------------------------------------------------------


def metrics_of(ranks: np.ndarray) -> dict:
    return MetricAccumulator(ks=KS).update(np.asarray(ranks, dtype=np.int64)).result()


def aggregate(per_seed: list[dict]) -> dict:
    """Mean and sample std over seeds of every metric."""
    keys = [k for k in per_seed[0] if isinstance(per_seed[0][k], float)]
    mean = {k: float(np.mean([m[k] for m in per_seed])) for k in keys}
    std = {k: (float(np.std([m[k] for m in per_seed], ddof=1)) if len(per_seed) > 1 else 0.0) for k in keys}
    return {"mean": mean, "std": std, "seeds": len(per_seed), "num_users": per_seed[0].get("num_users")}


def _fmt(model: dict, key: str) -> str:
    m, s = model["mean"].get(key), model["std"].get(key)
    if m is None:
        return "-"
    return f"{m:.4f} ± {s:.4f}" if model["seeds"] > 1 else f"{m:.4f}"


def write_report(result: dict, out: Path) -> dict[str, str]:
    """metrics.json, report.md and the PNG plots; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    files = {"metrics": str(out / "metrics.json"), "report": str(out / "report.md")}
    (out / "metrics.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    models = result["models"]
    full = {k: v for k, v in models.items() if v["protocol"] == "full"}
    cols = [f"{m}@{k}" for m in ("ndcg", "hr", "mrr", "recall") for k in KS]
    lines = [
        f"# Offline evaluation: {result['data']}",
        "",
        f"Protocol: leave-last-out, **full ranking** over {result['num_items']} items, each user's "
        f"train+validation items masked; {result['num_users']} test users; ties pessimistic. "
        "Mean ± sample std over training seeds where a model has several.",
        "",
        "| model | seeds | NDCG@10 | HR@10 | MRR | " + " | ".join(cols) + " |",
        "|---|---|---|---|---|" + "---|" * len(cols),
    ]
    for name, m in full.items():
        lines.append(f"| {name} | {m['seeds']} | {_fmt(m, 'ndcg@10')} | {_fmt(m, 'hr@10')} | {_fmt(m, 'mrr')} | "
                     + " | ".join(_fmt(m, c) for c in cols) + " |")
    sampled = {k: v for k, v in models.items() if v["protocol"] != "full"}
    if sampled:
        lines += ["", "Sampled protocol (1 positive + 99 uniform unseen items; inflates every number, "
                  "not comparable with the table above):", "",
                  "| model | protocol | seeds | NDCG@10 | HR@10 |", "|---|---|---|---|---|"]
        for name, m in sampled.items():
            lines.append(f"| {name} | {m['protocol']} | {m['seeds']} | {_fmt(m, 'ndcg@10')} | {_fmt(m, 'hr@10')} |")
    if result.get("notes"):
        lines += ["", *[f"- {n}" for n in result["notes"]]]
    lines += ["", "Per seed:", ""]
    for name, m in models.items():
        for i, ps in enumerate(m.get("per_seed", [])):
            lines.append(f"- {name} [{m.get('checkpoints', ['-'] * 99)[i] if m.get('checkpoints') else '-'}]: "
                         f"NDCG@10 {ps['ndcg@10']:.4f}, HR@10 {ps['hr@10']:.4f}")
    lines += ["", "![NDCG@K](ndcg_at_k.png) ![HR@K](hr_at_k.png) ![headline](headline.png)", ""]
    (out / "report.md").write_text("\n".join(lines))

    for metric in ("ndcg", "hr"):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for name, m in full.items():
            ys = [m["mean"][f"{metric}@{k}"] for k in KS]
            es = [m["std"][f"{metric}@{k}"] for k in KS]
            ax.errorbar(KS, ys, yerr=es if m["seeds"] > 1 else None, marker="o", capsize=3, label=name)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(KS, [str(k) for k in KS])
        ax.set_xlabel("K")
        ax.set_ylabel(f"{metric.upper()}@K")
        ax.set_title(f"{metric.upper()}@K, full ranking ({result['num_users']} test users)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{metric}_at_k.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files[f"{metric}_at_k"] = str(path)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.3 * len(full) + 2), 4.2))
    names = list(full)
    x = np.arange(len(names))
    for i, key in enumerate(HEADLINE):
        ys = [full[n]["mean"][key] for n in names]
        es = [full[n]["std"][key] if full[n]["seeds"] > 1 else 0.0 for n in names]
        bars = ax.bar(x + (i - 0.5) * 0.38, ys, 0.38, yerr=es if any(es) else None, capsize=3, label=key.upper())
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_xticks(x, names, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("test metric")
    ax.set_title("Headline metrics, full ranking (error bars: std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "headline.png", dpi=110)
    plt.close(fig)
    files["headline_png"] = str(out / "headline.png")
    return files


def format_table(result: dict) -> str:
    """The headline table as plain text (what `make demo` prints)."""
    rows = [(n, m) for n, m in result["models"].items()]
    width = max(len(n) for n, _ in rows)
    lines = [f"test metrics, {result['num_users']} users, leave-last-out ({'; '.join(sorted({m['protocol'] for _, m in rows}))}):",
             f"  {'model':<{width}}  {'protocol':<14} {'NDCG@10':>17} {'HR@10':>17} {'MRR':>8}"]
    for n, m in rows:
        lines.append(f"  {n:<{width}}  {m['protocol']:<14} {_fmt(m, 'ndcg@10'):>17} {_fmt(m, 'hr@10'):>17} "
                     f"{m['mean'].get('mrr', float('nan')):>8.4f}")
    return "\n".join(lines)


# --- the job -------------------------------------------------------------------------------------


def _best_beta(valid: dict[str, np.ndarray], betas: Sequence[float]) -> tuple[float, dict]:
    curve = {float(b): metrics_of(valid[f"rank_b{j}"])["ndcg@10"] for j, b in enumerate(betas)}
    best = max(curve, key=lambda b: (curve[b], -b))  # ties: the smaller prior
    return best, curve


def evaluate(settings: EvalSettings) -> dict:
    """Score every model, write metrics.json / report.md / PNGs; returns the summary."""
    problems = settings.problems()
    if problems:
        from recsys_ray.errors import ConfigError

        raise ConfigError(problems)
    from recsys_ray.runtime import init_ray
    from recsys_ray.train import read_manifest

    t0 = time.perf_counter()
    manifest = read_manifest(settings.data)
    init_ray()
    models: dict[str, dict] = {}
    notes: list[str] = []

    def add(name: str, protocol: str, per_seed: list[dict], extra: dict | None = None):
        models[name] = {**aggregate(per_seed), "protocol": protocol, "per_seed": per_seed, **(extra or {})}

    num_users = None
    if settings.baselines:
        base = baseline_ranks(settings.data, settings.max_users)
        for name in ("popularity", "EASE"):
            add(name, "full", [metrics_of(base[name]["ranks"])], {"params": base[name]["params"]})
        num_users = len(base["_users"]["ids"])
    rankers = settings.rankers
    if rankers and len(rankers) == 1 and len(settings.checkpoints) > 1:
        rankers = rankers * len(settings.checkpoints)
    per: dict[str, list[dict]] = {}
    betas_chosen, recalls = [], []
    for i, ckpt in enumerate(settings.checkpoints or [None] * len(rankers)):
        ranker = rankers[i] if rankers else None
        beta = None
        if ckpt is not None:
            valid = rank_split(settings, "valid", ckpt, None, None)
            beta, curve = _best_beta(valid, settings.betas)
            betas_chosen.append({"checkpoint": ckpt, "beta": beta, "valid_ndcg@10_by_beta": curve})
        test = rank_split(settings, "test", ckpt, ranker, beta,
                          sampled=settings.sampled_negatives if settings.sampled else 0)
        num_users = num_users or len(test["user_id"])
        if ckpt is not None:
            per.setdefault("retriever", []).append(metrics_of(test["rank_b0"]))
            j = list(settings.betas).index(beta)
            per.setdefault("retriever+prior", []).append(metrics_of(test[f"rank_b{j}"]))
        if "rank_two_stage" in test:
            per.setdefault("two-stage", []).append(metrics_of(test["rank_two_stage"]))
            recalls.append(float(np.mean(test["in_shortlist"])))
        for col, name in (("rank_sampled_retriever", "retriever (sampled)"), ("rank_sampled_ranker", "ranker (sampled)")):
            if col in test:
                per.setdefault(name, []).append(metrics_of(test[col]))
    for name, ps in per.items():
        protocol = f"sampled_1+{settings.sampled_negatives}" if "sampled" in name else "full"
        extra = {"checkpoints": list(settings.checkpoints) if "ranker" not in name else list(rankers)}
        if name == "two-stage":
            extra["rerank_top"] = settings.rerank_top
            extra["retriever_recall@N"] = {"mean": float(np.mean(recalls)), "per_seed": recalls}
            notes.append(f"two-stage: retriever top {settings.rerank_top} rescored by the ranker; the retriever's "
                         f"recall@{settings.rerank_top} alone is {np.mean(recalls):.4f} (an upper bound on HR@K of the pipeline)")
        if name == "retriever+prior":
            extra["betas"] = betas_chosen
            notes.append("retriever+prior: score + beta * log(1 + train count); beta chosen per checkpoint on the "
                         f"validation split from {list(settings.betas)}: " + ", ".join(str(b["beta"]) for b in betas_chosen))
        add(name, protocol, ps, extra)
    result = {
        "data": settings.data,
        "dataset": manifest.get("dataset"),
        "data_fingerprint": manifest.get("fingerprint"),
        "num_items": manifest.get("counts", {}).get("items"),
        "num_users": num_users,
        "protocol": "leave-last-out, full ranking, history masked, ties pessimistic",
        "ks": list(KS),
        "models": models,
        "notes": notes,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    files = write_report(result, Path(settings.output))
    summary = {"output": settings.output, **files, "seconds": result["seconds"],
               "headline": {n: {k: round(m["mean"][k], 4) for k in HEADLINE} for n, m in models.items()}}
    return {"summary": summary, "result": result}


def merge_results(paths: Sequence[str], output: str) -> dict:
    """Combine metrics.json files of separate runs over the same data (e.g. one per seed, run as
    separate jobs): each model's per-seed rows are concatenated; deterministic baselines kept once."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    first = results[0]
    for p, r in zip(paths, results, strict=True):
        if r.get("data_fingerprint") != first.get("data_fingerprint") or r.get("num_users") != first.get("num_users"):
            raise RecsysError(f"{p}: evaluated on other data or users than {paths[0]}; cannot merge")
    models: dict[str, dict] = {}
    for r in results:
        for name, m in r["models"].items():
            if name not in models:
                models[name] = {k: v for k, v in m.items() if k not in ("mean", "std", "seeds")}
                models[name]["per_seed"] = list(m["per_seed"])
                models[name]["checkpoints"] = list(m.get("checkpoints") or [])
            elif m.get("checkpoints"):  # a model row (baselines have no checkpoints: kept once)
                models[name]["per_seed"] += m["per_seed"]
                models[name]["checkpoints"] += m["checkpoints"]
                if "betas" in m:
                    models[name]["betas"] = models[name].get("betas", []) + m["betas"]
    for m in models.values():
        m.update(aggregate(m["per_seed"]))
    notes = list(dict.fromkeys(n for r in results for n in r.get("notes", [])))
    result = {**first, "models": models, "notes": notes, "merged_from": list(paths),
              "seconds": round(sum(r.get("seconds", 0) for r in results), 1)}
    files = write_report(result, Path(output))
    return {"summary": {"output": output, **files, "merged": len(paths),
                        "headline": {n: {k: round(m["mean"][k], 4) for k in HEADLINE} for n, m in models.items()}},
            "result": result}


def main_table(path: str | os.PathLike) -> str:
    """The table of a metrics.json (``python -m recsys_ray.evaluate artifacts/eval/metrics.json``)."""
    return format_table(json.loads(Path(path).read_text()))


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m recsys_ray.evaluate METRICS.json")
    print(main_table(sys.argv[1]))
