"""A Ray Tune sweep's config, checked before any trial starts: the ``train:`` section every trial
starts from, the ``tune:`` section (search space, metric, searcher, ASHA), and the sweep stored
in an experiment folder (``sweep.yaml``, what ``--resume`` restarts).

A sweep config (``configs/tune-*.yaml``):

- ``train:`` the training config every trial starts from: the fields of
  :class:`recsys_ray.train.config.TrainConfig`, optionally on top of a preset named by ``base:``
  (a YAML path, looked up from the working directory, then next to the sweep file);
- ``tune:`` how to search (:class:`TuneSettings`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import yaml
from ray import tune
from ray.tune import Tuner

from recsys_ray import storage
from recsys_ray.config import (
    build_config,
    deep_merge,
    leaf_fields,
    load_yaml,
    location_problems,
    merge_overrides,
    to_dict,
    value_problems,
)
from recsys_ray.errors import ConfigError, RecsysError, one_line
from recsys_ray.evaluate.metrics import DEFAULT_KS, SEARCH_PREFIX, MetricAccumulator
from recsys_ray.model.losses import LOSSES
from recsys_ray.model.tokenizer import resolve_encoder_path
from recsys_ray.train.config import TrainConfig, load_train_config
from recsys_ray.train.driver import plan

SWEEP_FILE = "sweep.yaml"  # the validated sweep, next to Tune's experiment state
TRAIN_RUNS = "train"  # folder of the per-trial Ray Train runs inside the experiment folder
REPORT_DIR = "report"

# What train_loop_per_worker reports each epoch besides the ranking metrics of validate().
TRAINING_KEYS = ("epoch", "global_step", "train_loss", "samples_per_s", "tokens_per_s")
LOWER_IS_BETTER = ("train_loss",)

# Short names for the parameters searched most; any other TrainConfig field by its dotted path.
ALIASES = {"lr": "optim.lr", "freeze": "model.freeze", "weight_decay": "optim.weight_decay"}
LORA_RANK = "lora_rank"  # replaces R of a lora:R freeze (a bare "lora" freeze needs it)
# Fields that describe the run, not the model: searching them breaks the sweep's bookkeeping.
NOT_SEARCHABLE = {
    "data": "every trial must train on the same data",
    "storage_path": "the sweep places each trial's run",
    "name": "the sweep names each trial's run after its trial id",
    "epochs": "it is ASHA's max_t; set train.epochs",
    "num_workers": "max_concurrent_trials is derived from it",
    "resources_per_worker": "max_concurrent_trials is derived from it",
    "use_gpu": "max_concurrent_trials is derived from it",
}
SPACE_KINDS = ("loguniform", "uniform", "choice", "grid")

DEFAULT_SPACE: dict[str, dict] = {
    "lr": {"loguniform": [1.0e-5, 3.0e-4]},
    "loss": {"choice": list(LOSSES)},
    "freeze": {"choice": ["none", "embeddings", "bottom:2", "encoder", "lora:8"]},
}
MAX_COMBINATIONS = 512  # categorical combinations checked one by one; beyond that, one value at a time


def reported_metrics() -> list[str]:
    """Every numeric key a trial reports per epoch (what ``tune.metric`` may name)."""
    ranking = MetricAccumulator(ks=DEFAULT_KS).update(np.zeros(1, dtype=np.int64)).result()
    names = sorted(k for k in ranking if k != "num_users")
    return names + [SEARCH_PREFIX + k for k in names] + list(TRAINING_KEYS)  # search_*: search models only


@dataclasses.dataclass
class TuneSettings:
    """The ``tune:`` section: what to search, how, and where the results go."""

    RANGES: ClassVar[dict[str, str]] = {
        "num_samples": ">= 1", "grace_period": ">= 1", "driver_memory_mb": ">= 1", "reduction_factor": ">= 2",
        "max_concurrent_trials": ">= 0", "max_failures": ">= 0", "data_cpus": ">= 0",
    }

    space: dict | None = None  # param -> {loguniform|uniform: [lo, hi]} or {choice|grid: [...]}; None = DEFAULT_SPACE
    metric: str = "ndcg@10"  # validation metric ASHA and the searcher optimise (a key the trainer reports)
    mode: Literal["max", "min"] = "max"  # max for ranking metrics, min for train_loss
    num_samples: int = 12  # trials (with grid values: repeats of the whole grid)
    search_alg: Literal["random", "optuna"] = "random"  # random sampling or Optuna TPE
    seed: int = 0  # seed of the searcher's sampling
    scheduler: Literal["asha", "fifo"] = "asha"  # asha = early stopping on the metric; fifo = run all to the end
    grace_period: int = 1  # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: int = 2  # ASHA: keep the top 1/reduction_factor at each rung
    max_concurrent_trials: int = 0  # 0 = derived from the cluster's resources and a trial's needs
    data_cpus: float = 1.0  # CPUs per running trial kept free for Ray Data's read tasks
    driver_memory_mb: int = 256  # what a trial's driver actor reserves instead of a CPU
    max_failures: int = 0  # Tune retries of a failed trial (its Train run resumes from its checkpoint)
    storage_path: str = "artifacts/tune"  # sweep storage: local path or s3:// URI
    name: str = "sweep"  # sweep name: results under storage_path/name

    def problems(self) -> list[str]:
        out = []
        known = reported_metrics()
        if self.metric not in known:
            out.append(f"tune.metric: the trainer does not report {self.metric!r} (it reports: {', '.join(known)})")
        elif self.metric in LOWER_IS_BETTER and self.mode == "max":
            out.append(f"tune.mode: {self.metric} is lower-is-better, set tune.mode: min")
        return out + location_problems(self.storage_path, self.name, "tune.")

    @property
    def search_space(self) -> dict:
        return DEFAULT_SPACE if self.space is None else self.space


@dataclasses.dataclass
class SweepConfig:
    """A whole sweep: the training config every trial starts from, and how to search around it."""

    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)  # base training config
    tune: TuneSettings = dataclasses.field(default_factory=TuneSettings)  # search settings

    def problems(self) -> list[str]:
        """Checks across the two sections: the space against the base config, ASHA against epochs."""
        out = []
        if self.tune.scheduler == "asha" and self.tune.grace_period >= self.train.epochs:
            out.append(
                f"tune.grace_period ({self.tune.grace_period}) must be < train.epochs ({self.train.epochs}): "
                "ASHA could never stop a trial early (or use tune.scheduler: fifo)"
            )
        if self.tune.metric.startswith(SEARCH_PREFIX) and not self.train.model.search_mix:
            out.append(f"tune.metric: {self.tune.metric!r} is reported by search models only: set "
                       "train.model.search_mix > 0")
        if self.train.refit or "refit" in self.tune.search_space:
            out.append("train.refit: a refit run trains on the validation events and reports no validation score, "
                       "so every trial would rank alike: tune without refit, then refit the winner (docs/quality.md)")
        if value_problems(self.train):
            return out  # the base config's own problems are reported once, not per space value
        out.extend(space_problems(self.tune.search_space, to_dict(self.train), self.tune.search_alg))
        return out

    @property
    def experiment_path(self) -> str:
        return storage.join(self.tune.storage_path, self.tune.name)


# ---------------------------------------------------------------------------------------------
# search space: validation and translation to Ray Tune


def param_path(name: str) -> str:
    """Space key -> dotted TrainConfig path (``lr`` -> ``optim.lr``)."""
    return ALIASES.get(name, name)


def _number(value: Any) -> float | None:
    """YAML reads ``1e-5`` (no dot) as text: accept it in ranges as the number it means."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _spec(value: Any) -> tuple[str, Any] | None:
    if isinstance(value, dict) and len(value) == 1:
        kind, arg = next(iter(value.items()))
        if kind in SPACE_KINDS:
            return kind, arg
    return None


def apply_params(train: dict, params: dict) -> dict:
    """A training config dict: ``train`` with one trial's sampled values written in."""
    out = copy.deepcopy(train)
    for key, value in params.items():
        if key == LORA_RANK:
            continue
        node = out
        *parents, leaf = param_path(key).split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value.item() if isinstance(value, np.generic) else value
    rank = params.get(LORA_RANK)
    if rank is not None:
        model = out.setdefault("model", {})
        freeze = str(model.get("freeze", "none"))
        if freeze == "lora" or freeze.startswith("lora:"):
            model["freeze"] = f"lora:{int(rank)}"
    return out


def _candidates(kind: str, arg: Any) -> list[Any]:
    """Values that stand for a dimension when checking configs: every category, a range's ends."""
    if kind in ("choice", "grid"):
        return list(arg)
    return [_number(arg[0]), _number(arg[1])]


def space_problems(space: Any, base: dict, search_alg: str = "random") -> list[str]:
    """Every problem of a search space against the base training config (empty = valid)."""
    if not isinstance(space, dict):
        return [f"tune.space: expected a mapping of parameter -> distribution, got {space!r}"]
    if not space:
        return ["tune.space: the search space is empty (name at least one parameter, e.g. lr: {loguniform: [1.0e-5, 3.0e-4]})"]
    out: list[str] = []
    leaves = leaf_fields(TrainConfig)
    dims: dict[str, list[Any]] = {}
    for key, value in space.items():
        where = f"tune.space.{key}"
        path = param_path(str(key))
        if key != LORA_RANK and path not in leaves:
            out.append(f"{where}: not a training config field (use lr, loss, freeze, {LORA_RANK} or a dotted field such as optim.weight_decay)")
            continue
        if path in NOT_SEARCHABLE:
            out.append(f"{where}: cannot be searched ({NOT_SEARCHABLE[path]})")
            continue
        spec = _spec(value)
        if spec is None:
            out.append(f"{where}: expected one of {{{': ..., '.join(SPACE_KINDS)}: ...}}, got {value!r}")
            continue
        kind, arg = spec
        if kind in ("choice", "grid"):
            if not isinstance(arg, list) or not arg:
                out.append(f"{where}: {kind} needs a non-empty list of values, got {arg!r}")
                continue
            if kind == "grid" and search_alg != "random":
                out.append(f"{where}: grid values need tune.search_alg: random (Optuna samples, it does not enumerate)")
        else:
            lo, hi = (_number(arg[0]), _number(arg[1])) if isinstance(arg, list) and len(arg) == 2 else (None, None)
            if lo is None or hi is None:
                out.append(f"{where}: {kind} needs [low, high] numbers, got {arg!r}")
                continue
            if not lo < hi:
                out.append(f"{where}: {kind} needs low < high, got [{lo}, {hi}]")
                continue
            if kind == "loguniform" and lo <= 0:
                out.append(f"{where}: loguniform needs low > 0, got {lo}")
                continue
        if key == LORA_RANK:
            bad = [v for v in _candidates(kind, arg) if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1 and float(v).is_integer())]
            if bad:
                out.append(f"{where}: LoRA ranks must be integers >= 1, got {bad}")
                continue
        if path == "loss":
            bad = [v for v in _candidates(kind, arg) if v not in LOSSES]
            if bad:
                out.append(f"{where}: unknown loss {', '.join(map(repr, bad))} (losses: {', '.join(LOSSES)})")
                continue
        dims[str(key)] = _candidates(kind, arg)
    out.extend(_value_problems(dims, base))
    if LORA_RANK in dims and not _has_lora(space, base):
        out.append(f"tune.space.{LORA_RANK}: no effect: neither train.model.freeze nor tune.space.freeze has a lora freeze")
    return out


def _has_lora(space: dict, base: dict) -> bool:
    spec = _spec(space.get("freeze"))
    values = list(spec[1]) if spec and spec[0] in ("choice", "grid") else []
    values.append(str(base.get("model", {}).get("freeze", "none")))
    return any(str(v) == "lora" or str(v).startswith("lora:") for v in values)


def _config_problems(base: dict, params: dict) -> list[str]:
    try:
        load_train_config(apply_params(base, params))
    except ConfigError as exc:
        return exc.problems
    return []


def _value_problems(dims: dict[str, list[Any]], base: dict) -> list[str]:
    """Each value alone against the base config, then every combination (a loss needing negatives...)."""
    out: list[str] = []
    seen: set[str] = set()
    # a bare "lora" freeze is completed by lora_rank: check freeze values with a rank in place
    rank = {LORA_RANK: dims[LORA_RANK][0]} if LORA_RANK in dims else {}
    for key, values in dims.items():
        for v in values:
            for p in _config_problems(base, {**rank, key: v}):
                if p not in seen:
                    seen.add(p)
                    out.append(f"tune.space.{key}={v!r}: {p}")
    if out or len(dims) < 2 or math.prod(len(v) for v in dims.values()) > MAX_COMBINATIONS:
        return out
    keys = list(dims)
    for combo in itertools.product(*(dims[k] for k in keys)):
        params = dict(zip(keys, combo, strict=True))
        for p in _config_problems(base, params):
            if p not in seen:
                seen.add(p)
                out.append(f"tune.space {params}: {p}")
    return out


def tune_space(space: dict) -> dict:
    """The search space as Ray Tune distributions (param_space of the Tuner)."""
    out = {}
    for key, value in space.items():
        kind, arg = _spec(value)  # type: ignore[misc]  # validated
        if kind == "loguniform":
            out[key] = tune.loguniform(_number(arg[0]), _number(arg[1]))
        elif kind == "uniform":
            out[key] = tune.uniform(_number(arg[0]), _number(arg[1]))
        elif kind == "choice":
            out[key] = tune.choice(list(arg))
        else:
            out[key] = tune.grid_search(list(arg))
    return out


# ---------------------------------------------------------------------------------------------
# loading and checking a sweep (all before Ray starts)


def _resolve_base(train: Any, config_dir: Path | None) -> Any:
    """``train: {base: preset.yaml, ...overrides}`` -> one training dict (other values pass through)."""
    if not isinstance(train, dict) or "base" not in train:
        return train
    rest = {k: v for k, v in train.items() if k != "base"}
    base = Path(str(train["base"])).expanduser()
    tried = [base] if base.is_absolute() else [base, *([config_dir / base] if config_dir else [])]
    found = next((p for p in tried if p.is_file()), None)
    if found is None:
        raise ConfigError([f"train.base: no such file {train['base']!r} (looked in {', '.join(str(p) for p in tried)})"])
    return deep_merge(load_yaml(found), rest)


def load_sweep_config(data: dict | None = None, overrides: list[str] | None = None,
                      config_dir: str | Path | None = None) -> SweepConfig:
    """Validate a sweep config (dict + ``--set`` overrides); every problem in one ConfigError.

    Local paths (``train.data``, storage paths, a local encoder folder) become absolute: trials run
    in other processes and other working directories.
    """
    merged = merge_overrides(data or {}, overrides or [])
    unknown = sorted(set(merged) - {"train", "tune"})
    if unknown:
        raise ConfigError([f"{k}: unknown section (a sweep config has train: and tune:)" for k in unknown])
    merged["train"] = _resolve_base(merged.get("train", {}), Path(config_dir) if config_dir else None)
    sweep = build_config(SweepConfig, merged)
    train = sweep.train
    train.data = storage.absolute(train.data)
    train.storage_path = storage.absolute(train.storage_path)
    enc = Path(train.model.encoder).expanduser()
    if train.model.encoder != "default" and "://" not in train.model.encoder and enc.exists():
        train.model.encoder = str(enc.resolve())
    sweep.tune.storage_path = storage.absolute(sweep.tune.storage_path)
    return sweep


def load_sweep_file(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """A sweep YAML (``configs/tune-*.yaml``) -> validated :class:`SweepConfig`."""
    return load_sweep_config(load_yaml(path), overrides, Path(path).parent)


def check_sweep(sweep: SweepConfig) -> None:
    """Checks that need the data and the encoder (still before Ray): every trial's shape can plan.

    Runs :func:`recsys_ray.train.driver.plan` for each distinct (negatives, batch_size, grad_accum) the
    space can produce, and checks ``bottom:K`` freezes against a pretrained encoder's depth.
    """
    base = to_dict(sweep.train)
    space = sweep.tune.search_space
    shape_keys = ("negatives", "batch_size", "optim.grad_accum")
    dims = {k: _candidates(*_spec(v)) for k, v in space.items() if param_path(k) in shape_keys}  # type: ignore[misc]
    problems: list[str] = []
    for combo in itertools.product(*dims.values()) if dims else [()]:
        params = dict(zip(dims, combo, strict=True))
        try:
            plan(load_train_config(apply_params(base, params)))
        except RecsysError as exc:
            msg = "; ".join(exc.problems) if isinstance(exc, ConfigError) else str(exc)
            problems.append(f"{'tune.space ' + json.dumps(params) + ': ' if params else ''}{msg}")
    problems.extend(_depth_problems(sweep))
    if problems:
        raise ConfigError(problems)


def _depth_problems(sweep: SweepConfig) -> list[str]:
    """``bottom:K`` deeper than a pretrained encoder fails inside a trial: say so now."""
    if sweep.train.model.tiny is not None:
        return []  # the tiny config's depth is checked by ModelConfig itself
    spec = _spec(sweep.tune.search_space.get("freeze"))
    values = list(spec[1]) if spec and spec[0] in ("choice", "grid") else []
    values.append(sweep.train.model.freeze)
    deep = [(v, int(str(v).split(":")[1])) for v in values if str(v).startswith("bottom:")]
    if not deep:
        return []
    cfg_file = Path(resolve_encoder_path(sweep.train.model.encoder)) / "config.json"
    if not cfg_file.is_file():
        return []  # a hub name: its depth is only known once downloaded
    layers = json.loads(cfg_file.read_text()).get("num_hidden_layers", 0)
    return [f"tune.space.freeze={v!r}: the encoder has only {layers} layers" for v, k in deep if k > layers]


# ---------------------------------------------------------------------------------------------
# the sweep stored in an experiment folder


def holds_sweep(path: str) -> bool:
    """Whether ``path`` holds Tune experiment state (what Tuner.restore needs)."""
    try:
        target, fs = storage.ray_target(path)
        return bool(Tuner.can_restore(target, storage_filesystem=fs))
    except Exception:  # an unreachable bucket, a file instead of a folder, ...
        return False


def save_sweep(sweep: SweepConfig) -> str:
    path = storage.join(sweep.experiment_path, SWEEP_FILE)
    header = "# The validated sweep (recsys_ray.tune); `python jobs/tune.py --resume <this folder>` continues it.\n"
    storage.write_text(path, header + yaml.safe_dump(to_dict(sweep), sort_keys=False))
    return path


def load_saved_sweep(path: str) -> SweepConfig:
    """The sweep stored in an experiment folder; a folder without one is refused with the reason."""
    path = storage.absolute(path)
    text = storage.read_text(storage.join(path, SWEEP_FILE))
    if text is None:
        if holds_sweep(path):
            raise RecsysError(f"{path}: a Ray Tune experiment, but not one started by jobs/tune.py (no {SWEEP_FILE})")
        raise RecsysError(f"{path}: no sweep there (no {SWEEP_FILE} and no Tune experiment state); "
                          "give the folder <tune.storage_path>/<tune.name> of a sweep started with jobs/tune.py")
    if not holds_sweep(path):
        raise RecsysError(f"{path}: the sweep never got as far as saving Tune's experiment state; start it again")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise RecsysError(f"{path}/{SWEEP_FILE}: unreadable ({one_line(exc)})") from None
    return load_sweep_config(data)


def resolve_sweep_path(path_or_name: str, storage_path: str | None = None) -> str:
    """``--resume`` / ``--report-only`` accept a folder or a sweep name (under the storage path)."""
    if "/" in path_or_name or Path(path_or_name).exists():
        return storage.absolute(path_or_name)
    return storage.join(storage.absolute(storage_path or TuneSettings.storage_path), path_or_name)
