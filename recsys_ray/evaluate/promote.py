"""The promotion gate: a candidate model replaces the served one only if it ranks better.

Both retrievers are scored on the same held-out split of the same prepared window (full
ranking, history masked, the protocol of :mod:`recsys_ray.evaluate.evaluate`). The current
model usually knows an older catalogue: it takes the window's catalogue the way a served model
takes new items (:meth:`~recsys_ray.model.base.BertRecommender.adopt_catalogue`: new items from
their text, removed ones dropped), so it is judged as it would serve today. The candidate is
promoted when ``candidate > current * (1 + margin)`` on ``metric``; then (and only then) the
serving config's retriever checkpoint is pointed at it, and ``serve deploy`` of that file
replaces the replicas, which drain their in-flight requests (tests/serve/test_serve_faults.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from recsys_ray import checkpoint, storage
from recsys_ray.data import layout
from recsys_ray.errors import ConfigError, RecsysError, one_line
from recsys_ray.evaluate.evaluate import EvalSettings, metrics_of, rank_split
from recsys_ray.evaluate.metrics import METRIC_NAMES
from recsys_ray.runtime import init_ray

log = logging.getLogger(__name__)


@dataclass
class PromoteSettings:
    candidate: str  # checkpoint, run directory (its best checkpoint) or s3:// URI
    current: str | None  # the served one, same forms; None: serve_config's checkpoint
    data: str  # prepared window both are judged on
    decision: str = "artifacts/promote/decision.json"  # where the decision is written
    serve_config: str | None = None  # the serving config to point at the candidate when it wins
    app: str | None = None  # which application of serve_config (default: its only one)
    split: str = "test"
    metric: str = "ndcg@10"
    margin: float = 0.0  # relative: the candidate must beat current * (1 + margin)
    popularity_weight: float = 0.0  # the served prior beta, applied to both
    max_users: int = 0
    batch_size: int = 64
    actors: int = 0

    def problems(self) -> list[str]:
        out = []
        if self.metric not in METRIC_NAMES:
            out.append(f"--metric {self.metric!r}: one of {', '.join(METRIC_NAMES)}")
        if self.margin < 0 or self.popularity_weight < 0:
            out.append("--margin and --popularity-weight must be >= 0")
        if self.split not in ("valid", "test"):
            out.append(f"--split {self.split!r}: valid or test")
        if not layout.is_prepared(self.data):
            out.append(f"--data {self.data}: not a prepared data directory (no manifest.json)")
        if self.serve_config is not None:
            try:
                _, app = serve_application(self.serve_config, self.app)
                if self.current is None:
                    self.current = str(app["args"]["checkpoint"])
            except RecsysError as exc:
                out.append(one_line(exc))
        elif self.current is None:
            out.append("give --current, or --serve-config (whose checkpoint is the current model)")
        for name in ("candidate", "current"):
            path = getattr(self, name)
            if path is not None and not storage.is_remote(path) and not Path(path).exists():
                out.append(f"--{name} {path}: not found")
        return out


def serve_application(path: str, app: str | None) -> tuple[dict, dict]:
    """(the whole serving config, the application entry whose args name the retriever)."""
    p = Path(path)
    try:
        config = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RecsysError(f"--serve-config {path}: unreadable ({one_line(exc)})") from None
    apps = (config or {}).get("applications") if isinstance(config, dict) else None
    if not isinstance(apps, list) or not apps:
        raise RecsysError(f"--serve-config {path}: no applications list")
    chosen = [a for a in apps if isinstance(a, dict) and (app is None or a.get("name") == app)]
    if len(chosen) != 1:
        names = [a.get("name") for a in apps if isinstance(a, dict)]
        raise RecsysError(f"--serve-config {path}: give --app, one of {names}" if app is None
                          else f"--serve-config {path}: no application {app!r} (has {names})")
    if not isinstance(chosen[0].get("args"), dict) or "checkpoint" not in chosen[0]["args"]:
        raise RecsysError(f"--serve-config {path}: application {chosen[0].get('name')!r} has no args.checkpoint")
    _checkpoint_line(p.read_text(), str(chosen[0]["args"]["checkpoint"]), path)
    return config, chosen[0]


def _checkpoint_line(text: str, value: str, path: str) -> re.Match:
    """The one ``checkpoint: VALUE`` line of the file (edited in place, so comments survive)."""
    found = list(re.finditer(rf"^(\s*checkpoint:\s*)['\"]?{re.escape(value)}['\"]?(\s*(#.*)?)$", text, re.MULTILINE))
    if len(found) != 1:
        raise RecsysError(f"--serve-config {path}: 'checkpoint: {value}' is on {len(found)} lines, not one: "
                          "cannot point it at the candidate safely (edit the file by hand)")
    return found[0]


def _score(settings: PromoteSettings, model: str) -> dict:
    ev = EvalSettings(data=settings.data, checkpoints=[model], batch_size=settings.batch_size,
                      actors=settings.actors, max_users=settings.max_users,
                      betas=(settings.popularity_weight,), adopt_items=True)
    ranks = rank_split(ev, settings.split, model, None, None)
    return {"checkpoint": checkpoint.locate(model), **metrics_of(ranks["rank_b0"])}


def promote(settings: PromoteSettings) -> dict:
    """Score both, decide, write the decision JSON; rewrite the serving config only on a win."""
    problems = settings.problems()
    if problems:
        raise ConfigError(problems)
    storage.check_writable(str(Path(settings.decision).parent), "--decision")
    init_ray()
    candidate, current = _score(settings, settings.candidate), _score(settings, settings.current)
    c, b = candidate[settings.metric], current[settings.metric]
    needed = b * (1 + settings.margin)
    promoted = c > needed
    reason = (f"candidate {settings.metric} {c:.4f} {'>' if promoted else '<='} current {b:.4f} x (1 + margin "
              f"{settings.margin:g}) = {needed:.4f}")
    decision = {
        "promoted": promoted, "reason": reason, "metric": settings.metric, "margin": settings.margin,
        "split": settings.split, "data": settings.data, "popularity_weight": settings.popularity_weight,
        "num_users": candidate.get("num_users"), "candidate": candidate, "current": current,
        "serve_config": None,
    }
    if settings.serve_config is not None:
        decision["serve_config"] = {"path": settings.serve_config, "updated": False}
        if promoted:
            _, app = serve_application(settings.serve_config, settings.app)
            old, path = str(app["args"]["checkpoint"]), Path(settings.serve_config)
            text = path.read_text()
            line = _checkpoint_line(text, old, settings.serve_config)
            new_line = f"{line.group(1)}{json.dumps(candidate['checkpoint'])}{line.group(2)}"
            _write_atomically(path, text[: line.start()] + new_line + text[line.end():])
            decision["serve_config"].update(updated=True, previous_checkpoint=old, checkpoint=candidate["checkpoint"])
    _write_atomically(Path(settings.decision), json.dumps(decision, indent=2) + "\n")
    log.info("promotion: %s", reason)
    return decision


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
