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
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray

from recsys_ray import checkpoint, storage
from recsys_ray.data import layout
from recsys_ray.data.catalogue import Catalogue
from recsys_ray.errors import ConfigError, RecsysError
from recsys_ray.evaluate.baselines import baseline_ranks
from recsys_ray.evaluate.metrics import (
    DEFAULT_KS,
    HEADLINE,
    aggregate,
    metrics_of,
    repeats_history,
    sample_unseen,
    sampled_ranks,
    target_ranks,
)
from recsys_ray.evaluate.report import finish_report, save_report
from recsys_ray.evaluate.search import search_report
from recsys_ray.evaluate.sequential import SequentialSettings
from recsys_ray.predict import Predictor, PredictorConfig
from recsys_ray.runtime import cluster_cpus, init_ray

log = logging.getLogger(__name__)

DEFAULT_BETAS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


@dataclass
class EvalSettings:
    data: str
    checkpoints: list[str] = field(default_factory=list)  # retrievers, one per training seed
    rankers: list[str] = field(default_factory=list)  # none, one, or one per retriever
    output: str = "artifacts/eval"
    rerank_top: int = 50
    betas: tuple[float, ...] = DEFAULT_BETAS
    # the prior's beta, given instead of chosen on validation: for a refit checkpoint (TrainConfig.refit),
    # whose validation split is in sample; choose it on the same config's run without refit
    beta: float | None = None
    sampled: bool = False
    sampled_negatives: int = 99
    seed: int = 0
    batch_size: int = 64
    actors: int = 0  # 0: one per CPU of the cluster, at most 2
    max_users: int = 0  # 0: every test user
    baselines: bool = True
    sequential: SequentialSettings | None = field(default_factory=SequentialSettings)  # None: no Markov/SASRec rows
    s3_endpoint: str | None = None  # S3-compatible store; default AWS_ENDPOINT_URL(_S3) or AWS
    adopt_items: bool = False  # models trained on another catalogue take this data's (PredictorConfig.adopt_items)
    precision: str = "fp32"  # fp32 | int8 | bf16 | fp16 (recsys_ray.model.compress)
    # all | cold | warm: test events on the data's held-out cold items, or on the others;
    # cold_users: the held-out users' rows instead of the test split (profile + first k events)
    targets: str = "all"
    # recommend: the tables above; search: the personalised-search table (recsys_ray/evaluate/search.py)
    task: str = "recommend"

    def cold_item_ids(self) -> list[str]:
        """The data's held-out cold items (none without): models score them from their text
        initialisation, as items added after training, in every row of the evaluation. A
        full-catalogue softmax trained their tokens as negatives; that is not "never seen"."""
        cold = layout.read_manifest(self.data).get("cold_items") if layout.is_prepared(self.data) else None
        return list(cold["ids"]) if cold else []

    def target_items(self) -> set[str] | None:
        """The item ids test targets must be among (None: all), from the manifest's cold items."""
        if self.targets in ("all", "cold_users"):
            return None
        cold = layout.read_manifest(self.data).get("cold_items")
        if not cold:
            raise ConfigError([f"--targets {self.targets}: {self.data} has no cold items (prepare it with "
                               "--set cold_items=0.1)"])
        if self.targets == "cold":
            return set(cold["ids"])
        ids = layout.read_items(self.data, ["item_id"])["item_id"].to_pylist()
        return set(ids) - set(cold["ids"])

    def problems(self) -> list[str]:
        out = []
        if not self.checkpoints and not self.rankers:
            out.append("give at least one --checkpoint (retriever) or --ranker")
        if self.rankers and self.checkpoints and len(self.rankers) not in (1, len(self.checkpoints)):
            out.append(f"--ranker: give one ranker or one per checkpoint ({len(self.checkpoints)}), got {len(self.rankers)}")
        for p in [*self.checkpoints, *self.rankers]:
            if not storage.is_remote(p) and not Path(p).is_dir():
                out.append(f"checkpoint not found: {p}")
        if not layout.is_prepared(self.data):
            out.append(f"--data {self.data}: not a prepared data directory (no manifest.json)")
        if self.sequential is not None:
            out.extend(self.sequential.problems())
        if self.rerank_top < 1:
            out.append("rerank_top must be >= 1")
        if self.task not in ("recommend", "search"):
            out.append(f"--task {self.task!r}: recommend or search")
        elif self.task == "search" and not self.checkpoints:
            out.append("--task search needs --checkpoint (a search checkpoint: model.search_mix > 0)")
        if self.targets not in ("all", "cold", "warm", "cold_users"):
            out.append(f"--targets {self.targets!r}: all, cold, warm or cold_users")
        elif self.targets == "cold_users" and layout.is_prepared(self.data) and not layout.has_part(
                self.data, layout.split_part(layout.COLD_USERS)):
            out.append(f"--targets cold_users: {self.data} has no cold users (prepare it with --set cold_users=0.1)")
        if self.beta is not None and self.beta < 0:
            out.append(f"--beta {self.beta}: must be >= 0")
        if not self.betas or any(b < 0 for b in self.betas):
            out.append("betas must be a non-empty list of values >= 0")
        return out


def _seen_rows(items_index: dict, seen: Sequence[str]) -> np.ndarray:
    return np.fromiter((items_index[i] for i in seen), dtype=np.int64, count=len(seen))


# --- the Ray Data UDF ----------------------------------------------------------------------------


class RankUDF:
    """Ray Data actor: test rows -> ranks of each row's target under every scoring variant.

    Output columns: ``user_id``, ``rank_retriever`` (its own scores), ``rank_b{j}`` (retriever +
    betas[j] * prior, full ranking), ``rank_two_stage``, ``in_shortlist`` (with a ranker),
    ``rank_sampled_*`` (when asked).
    """

    def __init__(self, predictor: dict, betas: Sequence[float], rerank_beta: float | None,
                 sampled: int, seed: int, torch_threads: int = 1, reinit_items: Sequence[str] = ()):
        self.p = Predictor(PredictorConfig(**predictor, torch_threads=torch_threads))
        if reinit_items:  # held-out cold items: the tokens training never gave them (Predictor.reinit_items)
            self.p.reinit_items(list(reinit_items))
        self.betas = list(betas)
        self.rerank_beta = rerank_beta
        self.sampled, self.seed = sampled, seed
        counts = self.p.items.counts
        self.prior = np.log1p(counts).astype(np.float32) if counts is not None else np.zeros(len(self.p.items), np.float32)

    def __call__(self, batch: dict) -> dict:
        p, items = self.p, self.p.items
        n = len(batch["user_id"])
        targets = np.array([items.index[t] for t in batch["target_item_id"]], dtype=np.int64)
        seen = [_seen_rows(items.index, list(s)) for s in batch["seen_item_ids"]]
        contexts = p.example_contexts(batch, "retriever") if p.retriever is not None else None
        rank_contexts = p.example_contexts(batch, "ranker") if p.ranker is not None else None
        mask = np.zeros((n, len(items)), dtype=bool)
        for j, s in enumerate(seen):
            mask[j, s] = True
        out: dict[str, np.ndarray] = {"user_id": np.asarray(batch["user_id"])}
        if "position" in batch:  # the cold-user rows are told apart by it
            out["position"] = np.asarray(batch["position"])
        if p.retriever is not None:
            raw = p.retrieval_scores(contexts, with_prior=False)  # (n, I)
            for j, b in enumerate(self.betas):
                out[f"rank_b{j}"] = target_ranks(raw + b * self.prior[None, :], targets, mask)
            zero = [j for j, b in enumerate(self.betas) if b == 0]
            out["rank_retriever"] = out[f"rank_b{zero[0]}"] if zero else target_ranks(raw, targets, mask)
            if self.sampled:
                out["rank_sampled_retriever"] = self._sampled(batch, raw, targets, seen)
        if p.retriever is not None and p.ranker is not None and self.rerank_beta is not None:
            out["rank_two_stage"], out["in_shortlist"] = self._two_stage(raw, targets, mask, seen, rank_contexts)
        if p.ranker is not None and self.sampled:
            ranks = np.empty(n, np.int64)
            for j in range(n):
                negs = sample_unseen(batch["user_id"][j], np.append(seen[j], targets[j]), len(items), self.sampled, self.seed)
                sc = p.rerank(rank_contexts[j], np.concatenate([[targets[j]], negs]))
                ranks[j] = int(sampled_ranks(sc[:1], sc[None, 1:])[0])
            out["rank_sampled_ranker"] = ranks
        return out

    def _two_stage(self, raw, targets, mask, seen, rank_contexts) -> tuple[np.ndarray, np.ndarray]:
        """The retriever's top N (with the prior) reranked; below N the retriever's own rank."""
        p, n = self.p, len(targets)
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
        return two, hit

    def _sampled(self, batch, raw, targets, seen) -> np.ndarray:
        ranks = np.empty(len(targets), np.int64)
        for j in range(len(targets)):
            negs = sample_unseen(batch["user_id"][j], np.append(seen[j], targets[j]), raw.shape[1], self.sampled, self.seed)
            ranks[j] = int(sampled_ranks(raw[j, targets[j]][None], raw[j, negs][None])[0])
        return ranks


def rank_split(settings: EvalSettings, split: str, retriever: str | None, ranker: str | None,
               rerank_beta: float | None, sampled: int = 0) -> dict[str, np.ndarray]:
    """Run :class:`RankUDF` over one split with Ray Data; returns the rank columns (by user)."""
    cpus = max(1, int(cluster_cpus()))
    actors = settings.actors or min(2, cpus)
    part = layout.split_part(split)
    columns = ["user_id", "target_item_id", "context_ids", "seen_item_ids", "position"]
    if "profile_ids" in layout.columns(settings.data, part):
        columns.append("profile_ids")  # item-token retrievers read the profile's ids
    ds = layout.read_dataset(settings.data, part).select_columns(columns)
    if settings.max_users:  # the first N users by id: the same users the baselines score
        ids = layout.read_split(settings.data, split, ["user_id"])
        keep = set(sorted(ids["user_id"].to_pylist())[: settings.max_users])
        ds = ds.filter(lambda row: row["user_id"] in keep)
    # read before the actors start: actors holding every CPU would leave the read tasks none
    ds = ds.materialize()
    total = ds.count()
    # held-out repeats are not scored (metrics.repeats_history); the baselines skip the same users
    ds = ds.filter(lambda row: not repeats_history(row["target_item_id"], row["seen_item_ids"])).materialize()
    repeats = total - ds.count()
    keep = settings.target_items() if split == "test" else None  # validation (beta) on every row
    if keep is not None:
        ds = ds.filter(lambda row: row["target_item_id"] in keep).materialize()
        if ds.count() == 0:
            raise RecsysError(f"--targets {settings.targets}: no test event of {settings.data} has such a target")
    # a small split is one block: split it so every actor gets a share
    ds = ds.repartition(max(1, min(ds.count() // settings.batch_size, 4 * actors))).materialize()
    predictor = {"retriever": retriever, "ranker": ranker, "items": settings.data,
                 "batch_size": settings.batch_size, "rerank_top": settings.rerank_top,
                 "adopt_items": settings.adopt_items, "precision": settings.precision}
    ranked = ds.map_batches(
        RankUDF,
        fn_constructor_kwargs={"predictor": predictor, "betas": list(settings.betas), "rerank_beta": rerank_beta,
                               "sampled": sampled, "seed": settings.seed,
                               "torch_threads": max(1, cpus // actors),
                               "reinit_items": settings.cold_item_ids()},
        batch_size=settings.batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=min(1.0, cpus / actors) * 0.9,  # leave a sliver for the reader and the driver
    )
    rows = ranked.to_pandas()
    rows = rows.sort_values(["user_id", "position"], kind="stable").reset_index(drop=True)
    return {**{c: rows[c].to_numpy() for c in rows.columns}, "repeats_left_out": repeats}


# --- aggregation ---------------------------------------------------------------------------------


def _headline(models: dict) -> dict:
    return {n: {k: round(m["mean"][k], 4) for k in HEADLINE} for n, m in models.items()}


# --- the job -------------------------------------------------------------------------------------


def best_beta(valid: dict[str, np.ndarray], betas: Sequence[float]) -> tuple[float, dict]:
    curve = {float(b): metrics_of(valid[f"rank_b{j}"])["ndcg@10"] for j, b in enumerate(betas)}
    best = max(curve, key=lambda b: (curve[b], -b))  # ties: the smaller prior
    return best, curve


def _check_refits(settings: EvalSettings) -> None:
    """A refit checkpoint trained on the validation events: nothing may be chosen on them for it
    (the prior's beta comes from ``--beta``; no two-stage gate). ConfigError naming the checkpoint."""
    problems = []
    for ckpt in settings.checkpoints:
        if not (checkpoint.read_meta(ckpt).get("extra", {}).get("train_config") or {}).get("refit"):
            continue
        if settings.beta is None:
            problems.append(f"{ckpt}: a refit checkpoint (trained on the validation events), so beta cannot be chosen "
                            "on validation: pass --beta (the value its run without refit chose)")
        if settings.rankers:
            problems.append(f"{ckpt}: a refit checkpoint: the two-stage gate runs on validation, which it trained on")
    if problems:
        raise ConfigError(problems)
    if settings.beta is not None and settings.beta not in settings.betas:
        settings.betas = (*settings.betas, settings.beta)


def evaluate(settings: EvalSettings) -> dict:
    """Score every model, write metrics.json / report.md / PNGs; returns the summary.

    Checkpoints may be checkpoint directories, run directories (their best checkpoint) or
    ``s3://`` URIs.
    """
    storage.use_endpoint(settings.s3_endpoint)
    problems = settings.problems()
    if problems:
        raise ConfigError(problems)
    storage.check_writable(settings.output, "--output")
    settings.checkpoints = [checkpoint.resolve(p) for p in settings.checkpoints]
    settings.rankers = [checkpoint.resolve(p) for p in settings.rankers]
    _check_refits(settings)
    t0 = time.perf_counter()
    manifest = layout.read_manifest(settings.data)
    init_ray()
    models: dict[str, dict] = {}
    notes: list[str] = []

    def add(name: str, protocol: str, per_seed: list[dict], extra: dict | None = None):
        models[name] = {**aggregate(per_seed), "protocol": protocol, "per_seed": per_seed, **(extra or {})}

    num_users = repeats_left_out = None
    if settings.targets == "cold_users":
        return _cold_user_rows(settings, manifest, t0)
    if settings.task == "search":
        return search_report(settings, manifest, t0)
    if settings.baselines:
        base = baseline_ranks(settings.data, settings.max_users, settings.sequential, settings.target_items())
        for name in ("popularity", "EASE", "Markov", "SASRec"):
            if name in base:
                add(name, "full", [metrics_of(r) for r in base[name]["ranks"]], {"params": base[name]["params"]})
        num_users = len(base["_users"]["ids"])
        repeats_left_out = base["_users"]["repeats_left_out"]
    rankers = settings.rankers
    if rankers and len(rankers) == 1 and len(settings.checkpoints) > 1:
        rankers = rankers * len(settings.checkpoints)
    per: dict[str, list[dict]] = {}
    betas_chosen, recalls, gates = [], [], []
    for i, ckpt in enumerate(settings.checkpoints or [None] * len(rankers)):
        ranker = rankers[i] if rankers else None
        beta = None
        if ckpt is not None and settings.beta is not None:
            beta = settings.beta
            betas_chosen.append({"checkpoint": ckpt, "beta": beta, "given": True})
        elif ckpt is not None:
            valid = rank_split(settings, "valid", ckpt, None, None)
            beta, curve = best_beta(valid, settings.betas)
            betas_chosen.append({"checkpoint": ckpt, "beta": beta, "valid_ndcg@10_by_beta": curve})
            if ranker is not None:  # the gate: two-stage only where it beats its retriever on validation
                two = metrics_of(rank_split(settings, "valid", ckpt, ranker, beta)["rank_two_stage"])["ndcg@10"]
                gates.append({"checkpoint": ckpt, "ranker": ranker, "valid_ndcg@10_retriever+prior": curve[beta],
                              "valid_ndcg@10_two-stage": two, "two_stage_on": two > curve[beta]})
        test = rank_split(settings, "test", ckpt, ranker, beta,
                          sampled=settings.sampled_negatives if settings.sampled else 0)
        num_users = num_users or len(test["user_id"])
        repeats_left_out = test["repeats_left_out"]
        if ckpt is not None:
            per.setdefault("retriever", []).append(metrics_of(test["rank_retriever"]))
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
            if gates:
                extra["gate"] = gates
                on = sum(g["two_stage_on"] for g in gates)
                notes.append(f"gate: two-stage beats retriever+prior on validation NDCG@10 for {on} of {len(gates)} "
                             "checkpoint(s) (" + ", ".join(f"{g['valid_ndcg@10_two-stage']:.4f} vs "
                                                          f"{g['valid_ndcg@10_retriever+prior']:.4f}" for g in gates)
                             + f"): serve the ranker {'on' if on == len(gates) else 'off'}")
            extra["retriever_recall@N"] = {"mean": float(np.mean(recalls)), "per_seed": recalls}
            notes.append(f"two-stage: retriever top {settings.rerank_top} rescored by the ranker; the retriever's "
                         f"recall@{settings.rerank_top} alone is {np.mean(recalls):.4f} (an upper bound on HR@K of the pipeline)")
        if name == "retriever+prior":
            extra["betas"] = betas_chosen
            notes.append("retriever+prior: score + beta * log(1 + train count); " + (
                f"beta given (--beta): {settings.beta}" if settings.beta is not None else
                f"beta chosen per checkpoint on the validation split from {list(settings.betas)}: "
                + ", ".join(str(b["beta"]) for b in betas_chosen)))
        add(name, protocol, ps, extra)
    result = {
        "data": settings.data,
        "dataset": manifest.get("dataset"),
        "data_fingerprint": manifest.get("fingerprint"),
        "num_items": manifest.get("counts", {}).get("items"),
        "num_users": num_users,
        "protocol": "leave-last-out, full ranking, history masked, repeated targets left out, ties pessimistic",
        "targets": settings.targets,
        "repeat_targets_left_out": repeats_left_out,
        "ks": list(DEFAULT_KS),
        "models": models,
        "notes": notes,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    files = save_report(result, settings.output)
    summary = {"output": settings.output, **files, "seconds": result["seconds"], "headline": _headline(models)}
    return {"summary": summary, "result": result}


def _cold_user_rows(settings: EvalSettings, manifest: dict, t0: float) -> dict:
    """Held-out users scored from their profile and first k events (k = 0, 1, 2; one row each):
    popularity (train counts) and each retriever with the prior beta chosen on validation."""
    models: dict[str, dict] = {}
    cold = layout.read_split(settings.data, layout.COLD_USERS, ["user_id", "position", "target_item_id", "seen_item_ids"])
    cold = cold.to_pandas().sort_values(["user_id", "position"], kind="stable").reset_index(drop=True)
    items = Catalogue.from_data_dir(settings.data)
    targets = np.asarray([items.index[t] for t in cold["target_item_id"]])
    mask = np.zeros((len(cold), len(items)), dtype=bool)
    for j, seen in enumerate(cold["seen_item_ids"]):
        mask[j, [items.index[i] for i in seen]] = True
    keep = ~mask[np.arange(len(cold)), targets]  # repeats left out, as everywhere
    pop = np.broadcast_to(np.asarray(items.counts, dtype=np.float64), mask.shape)
    pop_ranks = target_ranks(pop[keep], targets[keep], mask[keep])
    positions = cold["position"].to_numpy()[keep]
    # the stronger baseline for new users: how often each item was the other users' k-th event
    # (MovieLens users rate a few new releases first: its first events are far from overall popularity)
    firsts = layout.read_sequences(settings.data, ["item_ids"])["item_ids"].to_pylist()
    at_k = np.zeros((layout.COLD_USER_EVENTS, len(items)))
    for seq in firsts:
        for k, iid in enumerate(seq[: layout.COLD_USER_EVENTS]):
            at_k[k, items.index[iid]] += 1
    kth_ranks = target_ranks(at_k[positions], targets[keep], mask[keep])
    per: dict[str, list[dict]] = {}
    for ckpt in settings.checkpoints:
        beta, _ = best_beta(rank_split(settings, "valid", ckpt, None, None), settings.betas)
        ranks = rank_split(settings, layout.COLD_USERS, ckpt, None, None)
        j = list(settings.betas).index(beta)
        for k in sorted(set(positions)):
            at = ranks["position"] == k
            per.setdefault(f"retriever, {k} events", []).append(metrics_of(ranks["rank_retriever"][at]))
            per.setdefault(f"retriever+prior, {k} events", []).append(metrics_of(ranks[f"rank_b{j}"][at]))
    for k in sorted(set(positions)):
        models[f"popularity, {k} events"] = {**aggregate([metrics_of(pop_ranks[positions == k])]), "protocol": "full"}
        models[f"popularity of event {k + 1}, {k} events"] = {**aggregate([metrics_of(kth_ranks[positions == k])]),
                                                              "protocol": "full"}
        for name in (f"retriever, {k} events", f"retriever+prior, {k} events"):
            if name in per:
                models[name] = {**aggregate(per[name]), "protocol": "full", "per_seed": per[name],
                                "checkpoints": list(settings.checkpoints)}
    result = {
        "data": settings.data, "dataset": manifest.get("dataset"), "data_fingerprint": manifest.get("fingerprint"),
        "num_items": len(items), "num_users": int(cold["user_id"].nunique()),
        "protocol": "cold users: held out of training and validation; profile + first k events -> event k; "
                    "full ranking, the k events masked, ties pessimistic",
        "targets": "cold_users", "cold_users": manifest.get("cold_users"), "ks": list(DEFAULT_KS), "models": models,
        "notes": ["popularity: train counts of the other users; popularity of event k+1: how often each item "
                  "was the other users' (k+1)-th event; retriever+prior: beta chosen on the validation split"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return finish_report(result, settings.output)


def merge_results(paths: Sequence[str], output: str) -> dict:
    """Combine metrics.json files of separate runs over the same data (e.g. one per seed, run as
    separate jobs): each model's per-seed rows are concatenated; deterministic baselines kept once."""
    results = []
    for p in paths:
        text = storage.read_text(p)
        if text is None:
            raise RecsysError(f"{p}: not found")
        results.append(json.loads(text))
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
    files = save_report(result, output)
    return {"summary": {"output": output, **files, "merged": len(paths), "headline": _headline(models)},
            "result": result}
