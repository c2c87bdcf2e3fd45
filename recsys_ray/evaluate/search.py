"""Personalised search, scored like recommendation (``jobs/evaluate.py --task search``).

The test (and validation) rows whose event carries a query: the user's last event *with its
query*. Every row below ranks the whole catalogue for the same rows and the same queries, the
user's history masked, repeated targets left out, ties against the target:

1. ``BM25``: the query against each item's text (the ``bm25s`` package, English stop words);
2. ``MiniLM zero-shot``: cosine of the pretrained encoder's mean-pooled query and item-text
   vectors (the search checkpoint's encoder before fine-tuning);
3. ``query-filtered popularity``: items whose metadata match every genre / decade the query names
   (:func:`recsys_ray.data.queries.matching_items`), by train popularity, then the others;
4. ``recommendation (query ignored)``: the checkpoint's recommendation route, the user alone;
5. ``personalised search``: query + user, one row per checkpoint (seeds: mean +- std), and
   ``search, query only``: the same checkpoints without the user (what personalisation adds).

Rows 4-5 add ``beta * log(1 + train count)``, beta chosen per checkpoint and per row on the
validation rows, as the recommendation report does.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from recsys_ray import checkpoint
from recsys_ray.data import layout
from recsys_ray.data.queries import item_attributes, matching_items
from recsys_ray.errors import ConfigError
from recsys_ray.evaluate.metrics import (
    DEFAULT_KS,
    aggregate,
    metrics_of,
    repeats_history,
    target_ranks,
)
from recsys_ray.evaluate.report import finish_report
from recsys_ray.model import kinds
from recsys_ray.model.config import ModelConfig
from recsys_ray.predict import Predictor, PredictorConfig

log = logging.getLogger(__name__)

COLUMNS = ["user_id", "target_item_id", "seen_item_ids", "profile_ids", "query", "query_ids"]


class SearchRows:
    """One split's rows with a query (repeats of a seen item left out), as arrays over a catalogue."""

    def __init__(self, data: str, split: str, items, max_users: int = 0):
        present = layout.columns(data, layout.split_part(split))
        if "query" not in present:
            raise ConfigError([f"--task search: {data} was prepared without queries (prepare it again; "
                               "MovieLens: --set queries=metadata, other logs: columns.query)"])
        rows = [r for r in layout.read_split(data, split, COLUMNS).to_pylist() if r["query"]]
        rows.sort(key=lambda r: r["user_id"])
        if max_users:
            rows = rows[:max_users]
        before = len(rows)
        rows = [r for r in rows if not repeats_history(r["target_item_id"], r["seen_item_ids"])]
        if not rows:
            raise ConfigError([f"--task search: no {split} row of {data} carries a query"])
        self.rows, self.repeats_left_out = rows, before - len(rows)
        self.queries = [r["query"] for r in rows]
        self.targets = np.array([items.index[r["target_item_id"]] for r in rows], dtype=np.int64)
        self.mask = np.zeros((len(rows), len(items)), dtype=bool)
        for j, r in enumerate(rows):
            self.mask[j, [items.index[i] for i in r["seen_item_ids"]]] = True

    def batch(self) -> dict:
        return {"seen_item_ids": [r["seen_item_ids"] for r in self.rows],
                "profile_ids": [r["profile_ids"] for r in self.rows]}

    def ranks(self, scores: np.ndarray) -> np.ndarray:
        return target_ranks(scores, self.targets, self.mask)


def bm25_scores(item_texts: list[str], queries: list[str]) -> np.ndarray:
    """(Q, I) BM25 of each query against every item text."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(item_texts, stopwords="en", show_progress=False), show_progress=False)
    distinct = sorted(set(queries))
    tokens = bm25s.tokenize(distinct, stopwords="en", show_progress=False, return_ids=False)
    by_query = {q: retriever.get_scores(t) if t else np.zeros(len(item_texts)) for q, t in zip(distinct, tokens,
                                                                                                   strict=True)}
    return np.stack([by_query[q] for q in queries]).astype(np.float64)


@torch.no_grad()
def zero_shot_scores(p: Predictor, queries: list[str]) -> np.ndarray:
    """(Q, I) cosine of the pretrained (not fine-tuned) encoder's query and item-text vectors."""
    cfg = p.retriever.cfg
    model = kinds.from_config(ModelConfig(kind="retriever", history="text", encoder=cfg.encoder, tiny=cfg.tiny),
                              p.tokenizer).eval()
    distinct = sorted(set(queries))
    q = model.encode_batched(p.text_ids(distinct), p.special, "cpu", 64)
    items = model.encode_batched(p.items.tokens, p.special, "cpu", 64)
    sims = (q @ items.T).numpy().astype(np.float64)
    at = {s: j for j, s in enumerate(distinct)}
    return sims[[at[x] for x in queries]]


def filtered_popularity_scores(p: Predictor, data: str, queries: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(Q, I): matching items first, each group by train popularity; and each query's matching rows."""
    table = layout.read_items(data)
    if "genres" not in table.column_names or "title" not in table.column_names:
        raise ConfigError([f"{data}: query-filtered popularity needs the catalogue's genres and title columns"])
    attrs = [item_attributes(g, t) for g, t in zip(table["genres"].to_pylist(), table["title"].to_pylist(),
                                                    strict=True)]
    pop = np.asarray(p.items.counts, dtype=np.float64)
    pop = pop / (pop.max() + 1.0)  # < 1: a match always outranks a non-match
    distinct = sorted(set(queries))
    match = {q: matching_items(q, attrs) for q in distinct}
    out = np.broadcast_to(pop, (len(queries), len(pop))).copy()
    for j, q in enumerate(queries):
        out[j, match[q]] += 1.0
    return out, [match[q] for q in queries]


def _choose_beta(valid_raw: np.ndarray, valid: SearchRows, prior: np.ndarray, betas) -> tuple[float, float]:
    """(beta, validation NDCG@10 at that beta): the best of ``betas`` on the validation rows."""
    best, best_ndcg = 0.0, -1.0
    for b in betas:
        ndcg = metrics_of(valid.ranks(valid_raw + b * prior[None, :]))["ndcg@10"]
        if ndcg > best_ndcg + 1e-12:
            best, best_ndcg = b, ndcg
    return best, best_ndcg


def checkpoint_rows(p: Predictor, valid: SearchRows, test: SearchRows, betas) -> dict[str, dict]:
    """Ranks of rows 4-5 for one search checkpoint's Predictor: {row name: {"ranks", "beta", "valid_ndcg@10"}}."""
    prior = np.log1p(np.asarray(p.items.counts, dtype=np.float64))
    out = {}
    variants = {
        "recommendation (query ignored)": lambda ctx, q: ctx,
        "personalised search": lambda ctx, q: p.search_context(ctx, q),
        "search, query only (no user)": lambda ctx, q: p.search_context(None, q),
    }
    for name, make in variants.items():
        raw = {}
        for split, rows in (("valid", valid), ("test", test)):
            contexts = p.example_contexts(rows.batch(), "retriever")
            raw[split] = p.retrieval_scores([make(c, q) for c, q in zip(contexts, rows.queries, strict=True)],
                                            with_prior=False).astype(np.float64)
        beta, valid_ndcg = _choose_beta(raw["valid"], valid, prior, betas)
        out[name] = {"ranks": test.ranks(raw["test"] + beta * prior[None, :]), "beta": beta, "valid_ndcg@10": valid_ndcg}
    return out


def search_report(settings, manifest: dict, t0: float) -> dict:
    """The search table of ``settings`` (an EvalSettings with ``task="search"``)."""
    data = settings.data
    ckpts = [checkpoint.resolve(c) for c in settings.checkpoints]
    predictors = [Predictor(PredictorConfig(retriever=c, items=data, precision=settings.precision)) for c in ckpts]
    lost = [c for c, p in zip(ckpts, predictors, strict=True) if not p.searches]
    if lost:
        raise ConfigError([f"{c}: not a search checkpoint (model.search_mix is 0)" for c in lost])
    first = predictors[0]
    items = first.items
    valid = SearchRows(data, "valid", items, settings.max_users)
    test = SearchRows(data, "test", items, settings.max_users)
    models: dict[str, dict] = {}

    def add(name: str, per_seed: list[dict], extra: dict | None = None) -> None:
        models[name] = {**aggregate(per_seed), "protocol": "full", "per_seed": per_seed, **(extra or {})}

    timings = {}
    t = time.perf_counter()
    add("BM25 (query vs item text)", [metrics_of(test.ranks(bm25_scores(items.texts, test.queries)))])
    timings["bm25"] = time.perf_counter() - t
    t = time.perf_counter()
    add("MiniLM zero-shot (query vs item text)", [metrics_of(test.ranks(zero_shot_scores(first, test.queries)))])
    timings["zero_shot"] = time.perf_counter() - t
    matches = None
    try:
        scores, matches = filtered_popularity_scores(first, data, test.queries)
        add("query-filtered popularity", [metrics_of(test.ranks(scores))])
    except ConfigError as exc:
        log.warning("no query-filtered popularity row: %s", exc)
    per: dict[str, list] = {}
    for p in predictors:
        t = time.perf_counter()
        for name, r in checkpoint_rows(p, valid, test, settings.betas).items():
            per.setdefault(name, []).append((metrics_of(r["ranks"]), r["beta"], r["valid_ndcg@10"]))
        timings.setdefault("checkpoints", []).append(round(time.perf_counter() - t, 1))
    for name, runs in per.items():
        add(name, [m for m, _, _ in runs], {"checkpoints": ckpts, "betas": [b for _, b, _ in runs],
                                            "valid_ndcg@10": [v for _, _, v in runs]})
    notes = ["rows 4-5 add beta * log(1 + train count), beta chosen per checkpoint and row on the validation "
             f"search rows from {list(settings.betas)}"]
    query_stats = None
    if matches is not None:
        m = np.array([len(x) for x in matches])
        hit = np.array([t in set(x.tolist()) for t, x in zip(test.targets, matches, strict=True)])
        query_stats = {"distinct_queries": len(set(test.queries)), "matching_items_median": float(np.median(m)),
                       "matching_items_p90": float(np.percentile(m, 90)), "matching_items_min": int(m.min()),
                       "targets_matching_their_query": float(hit.mean())}
    result = {
        "data": data, "dataset": manifest.get("dataset"), "data_fingerprint": manifest.get("fingerprint"),
        "num_items": len(items), "num_users": len(test.rows),
        "protocol": "search: the last event with a query per user; full ranking, history masked, repeated targets "
                    "left out, ties pessimistic",
        "targets": "search", "repeat_targets_left_out": test.repeats_left_out, "queries": query_stats,
        "ks": list(DEFAULT_KS), "models": models, "notes": notes,
        "timings_s": {k: (round(v, 1) if isinstance(v, float) else v) for k, v in timings.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return finish_report(result, settings.output)
