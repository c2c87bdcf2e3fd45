"""A model soup: one checkpoint whose weights are the mean of several fine-tuned checkpoints.

Models fine-tuned from the same pretrained weights with the same recipe and different seeds
usually land in one basin, where the average of their weights scores like an ensemble of them
while costing one model at serving time (Wortsman et al., "Model soups", ICML 2022: the
"uniform soup"). Here the ingredients must share the model config, the catalogue and the
vocabulary; their training configs may differ (the seed, usually: the summary lists what did).

    python jobs/soup.py --checkpoint artifacts/runs/cpu-s1 artifacts/runs/cpu-s2 artifacts/runs/cpu-s3 \\
        --output artifacts/runs/cpu-soup --data artifacts/ml-100k

The soup is an ordinary checkpoint (evaluate, serve, ``init_from`` read it) without a training
state: it cannot be resumed. With ``--data`` the summary gives the validation NDCG@10 of every
ingredient and of the soup (retrievers; with the popularity prior at the best beta as well), so
a soup that left the basin (ingredients too far apart: another init, another learning rate) is
seen before it is served. Refused: LoRA checkpoints (the mean of the adapters is not the mean
of the products) and mixing refit and non-refit ingredients.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from recsys_ray import checkpoint, storage
from recsys_ray.data import layout
from recsys_ray.data.catalogue import CATALOGUE_FILE, Catalogue
from recsys_ray.errors import ConfigError, RecsysError
from recsys_ray.model.config import parse_freeze
from recsys_ray.model.kinds import load_model
from recsys_ray.model.tokenizer import vocab_digest

log = logging.getLogger(__name__)


@dataclass
class SoupSettings:
    checkpoints: list[str] = field(default_factory=list)  # checkpoints, run directories (their best) or s3:// URIs
    output: str = ""  # a new local directory: the soup's checkpoint
    data: str | None = None  # prepared data: validate the ingredients and the soup on its valid split
    max_users: int = 0  # validation users (0: all)
    # which checkpoint of a run directory: best (by validation NDCG@10, as everywhere) or last (its latest)
    pick: str = "best"

    def problems(self) -> list[str]:
        out = []
        if len(self.checkpoints) < 2:
            out.append(f"--checkpoint: a soup needs at least 2 checkpoints, got {len(self.checkpoints)}")
        if not self.output:
            out.append("--output: give the directory the soup is written to")
        elif storage.is_remote(self.output):
            out.append(f"--output {self.output}: a local directory (copy the soup to S3 afterwards)")
        elif Path(self.output).exists() and any(Path(self.output).iterdir()):
            out.append(f"--output {self.output}: exists and is not empty (a checkpoint is written once)")
        if self.pick not in ("best", "last"):
            out.append(f"--pick {self.pick!r}: best or last")
        if self.data is not None and not layout.is_prepared(self.data):
            out.append(f"--data {self.data}: not a prepared data directory (no manifest.json)")
        return out


def _train_config(meta: dict) -> dict:
    return dict(meta.get("extra", {}).get("train_config") or {})


def check_ingredients(paths: Sequence[str]) -> list[str]:
    """Why these local checkpoints cannot be averaged (one line each, naming the checkpoint), or []."""
    problems: list[str] = []
    metas = [checkpoint.read_meta(p) for p in paths]
    first, first_meta = paths[0], metas[0]
    for p, meta in zip(paths, metas, strict=True):
        kind, _ = parse_freeze(str(meta["model_config"].get("freeze", "")))
        if kind == "lora":
            problems.append(f"{p}: a LoRA checkpoint (freeze={meta['model_config']['freeze']}): the mean of the "
                            "adapters is not the mean of their products; soup full or partly frozen fine-tunes")
    for p, meta in zip(paths[1:], metas[1:], strict=True):
        if meta["model_config"] != first_meta["model_config"]:
            diff = sorted(k for k in {*meta["model_config"], *first_meta["model_config"]}
                          if meta["model_config"].get(k) != first_meta["model_config"].get(k))
            problems.append(f"{p}: model_config differs from {first}'s in {diff}: ingredients share one architecture")
    refits = {bool(_train_config(m).get("refit")) for m in metas}
    if len(refits) > 1:
        problems.append("ingredients mix refit and non-refit runs (TrainConfig.refit): their validation means "
                        "different things; soup one kind")
    ids = []
    for p in paths:
        if not (Path(p) / CATALOGUE_FILE).is_file():
            problems.append(f"{p}: no {CATALOGUE_FILE}: the catalogue of every ingredient must be known")
            ids.append(None)
        else:
            ids.append(Catalogue.load(p).ids)
    for p, own in zip(paths[1:], ids[1:], strict=True):
        if own is not None and ids[0] is not None and own != ids[0]:
            problems.append(f"{p}: its catalogue ({len(own)} items) is not {first}'s ({len(ids[0])}): item rows "
                            "would be averaged with other items' rows")
    return problems


def average_state(states: Sequence[dict[str, torch.Tensor]], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating tensors (accumulated in float64, stored in each tensor's
    own dtype); other tensors (integer buffers) must be equal. RecsysError naming the first key
    that cannot be averaged."""
    keys = list(states[0])
    for state, name in zip(states[1:], names[1:], strict=True):
        if set(state) != set(keys):
            missing = sorted(set(keys) ^ set(state))[:3]
            raise RecsysError(f"{name}: its weights have other tensors than {names[0]}'s (e.g. {missing})")
    out = {}
    for k in keys:
        ts = [s[k] for s in states]
        for t, name in zip(ts[1:], names[1:], strict=True):
            if t.shape != ts[0].shape or t.dtype != ts[0].dtype:
                raise RecsysError(f"{name}: tensor {k} is {tuple(t.shape)} {t.dtype}, {names[0]}'s "
                                  f"{tuple(ts[0].shape)} {ts[0].dtype}")
        if ts[0].is_floating_point():
            out[k] = (sum(t.to(torch.float64) for t in ts) / len(ts)).to(ts[0].dtype)
        else:
            for t, name in zip(ts[1:], names[1:], strict=True):
                if not torch.equal(t, ts[0]):
                    raise RecsysError(f"{name}: integer tensor {k} differs from {names[0]}'s: it cannot be averaged")
            out[k] = ts[0].clone()
    return out


def _validation(settings: SoupSettings, paths: Sequence[str]) -> list[dict]:
    """Validation NDCG@10 of each checkpoint (raw, and + prior at its best beta)."""
    from recsys_ray.evaluate.evaluate import EvalSettings, best_beta, metrics_of, rank_split
    from recsys_ray.runtime import init_ray

    init_ray()
    ev = EvalSettings(data=settings.data, max_users=settings.max_users)
    rows = []
    for p in paths:
        ranks = rank_split(ev, "valid", p, None, None)
        beta, curve = best_beta(ranks, ev.betas)
        rows.append({"checkpoint": p, "valid_ndcg@10": round(metrics_of(ranks["rank_retriever"])["ndcg@10"], 5),
                     "valid_ndcg@10+prior": round(curve[beta], 5), "beta": beta})
    return rows


def _pick(path: str, pick: str) -> str:
    """The local checkpoint ``path`` means: a run directory's best, or with ``last`` its latest."""
    if pick == "last":
        latest = checkpoint.latest_result(path)  # None for a checkpoint directory (no run snapshot)
        if latest is not None:
            path = latest["checkpoint_path"]
    return checkpoint.resolve(path)


def soup(settings: SoupSettings) -> dict:
    """Write the uniform soup of ``settings.checkpoints`` to ``settings.output``; returns the summary."""
    problems = settings.problems()
    if problems:
        raise ConfigError(problems)
    t0 = time.perf_counter()
    paths = [_pick(p, settings.pick) for p in settings.checkpoints]
    for p in paths:
        checkpoint.require_files(Path(p))
    if len(set(paths)) < len(paths):
        raise ConfigError([f"--checkpoint: the same checkpoint twice ({', '.join(paths)})"])
    problems = check_ingredients(paths)
    if problems:
        raise ConfigError(problems)
    models = [load_model(p) for p in paths]
    digests = {vocab_digest(m.tokenizer) for m in models}
    if len(digests) > 1:
        raise ConfigError(["ingredients use different vocabularies: they were not fine-tuned from one model"])
    configs = [dict(m.extra.get("train_config") or {}) for m in models]  # the checkpoints' extra, loaded
    refit = bool(configs[0].get("refit"))
    storage.check_writable(settings.output, "--output")
    base = models[0]
    base.load_state_dict(average_state([m.state_dict() for m in models], paths))
    differs = sorted(k for k in set().union(*configs) if len({repr(c.get(k)) for c in configs}) > 1)
    extra = dict(base.extra)
    extra.update({"step": None, "epoch": None, "loss": None, "metrics": {},
                  "soup": {"ingredients": paths, "train_config_differs": differs,
                           "seeds": [c.get("seed") for c in configs],
                           "data_fingerprints": sorted({str(m.extra.get("data_fingerprint")) for m in models})}})
    out = Path(settings.output)
    try:
        base.save(out, extra=extra)
        shutil.copyfile(Path(paths[0]) / CATALOGUE_FILE, out / CATALOGUE_FILE)
    except OSError as exc:
        raise RecsysError(f"--output {out}: cannot write the soup ({exc})") from None
    summary = {"output": str(out), "ingredients": paths, "kind": base.cfg.kind, "history": base.cfg.history,
               "train_config_differs": differs, "refit": refit}
    if settings.data is not None and base.cfg.kind == "retriever" and not refit:
        rows = _validation(settings, [*paths, str(out)])
        summary["validation"] = rows
        soup_row, best = rows[-1], max(r["valid_ndcg@10+prior"] for r in rows[:-1])
        summary["soup_beats_every_ingredient"] = soup_row["valid_ndcg@10+prior"] > best
        extra["metrics"] = {"ndcg@10": soup_row["valid_ndcg@10"]}
        extra["soup"]["validation"] = rows
        (out / checkpoint.META_FILE).write_text(checkpoint.meta_text(dataclasses.asdict(base.cfg), extra))
    elif settings.data is not None:
        summary["validation"] = ("not measured: " + ("refit ingredients trained on the validation events"
                                                     if refit else f"a {base.cfg.kind} (retrievers only)"))
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    log.info("soup of %d -> %s", len(paths), out)
    return summary
