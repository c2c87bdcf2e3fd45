"""Hyperparameter search on Ray Tune: ASHA over the same training driver that jobs/train.py runs.

A sweep config has two sections (``configs/tune-*.yaml``):

- ``train:`` the training config every trial starts from: the fields of
  :class:`recsys_ray.train.TrainConfig`, optionally on top of a preset named by ``base:`` (a YAML
  path, looked up from the working directory, then next to the sweep file);
- ``tune:`` how to search (:class:`TuneSettings`): the search space, the metric, random or
  Optuna TPE search, ASHA's grace period and reduction factor, where results go.

Each trial runs :func:`trial_driver`: base config + the trial's sampled values ->
:func:`recsys_ray.train.build_trainer` (run name = the trial id, ``TuneReportCallback`` forwards
every epoch's validation metrics to Tune) -> fit. The driver is the one jobs/train.py uses, never
a copy. The trial actor itself reserves no CPU (a memory-only bundle): Ray Train's workers hold
the CPUs, and ``data_cpus`` per trial stay free for Ray Data's read tasks. Both matter on small
machines: with 2 CPUs, a trial holding even 0.01 CPU next to a 1-CPU worker leaves 0.99 CPU, and
the 1-CPU read task of the train split waits forever; two concurrent 1-worker trials leave none.

Three more things Tune + Train V2 (Ray 2.60) need here, each explained where it is done: a
:class:`PlacementGroupGuard` frees the workers' CPUs of a trial ASHA killed (Ray's own cleaner
needs the dashboard); a callback refills ASHA's rungs on ``--resume`` (Tune does not save the
scheduler); a trial whose Train run already finished reports that result instead of training.

Everything lives under ``<storage_path>/<name>/``: ``sweep.yaml`` (the validated sweep, what
``--resume`` restarts), Tune's trial folders (``trial_<id>/``: result.json, progress.csv,
TensorBoard events), ``train/trial_<id>/`` (each trial's Ray Train run and checkpoints) and
``report/`` (report.md, plots, best_config.yaml; :mod:`recsys_ray.hpo_report`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from recsys_ray.config import build_config, load_yaml, merge_overrides, to_dict
from recsys_ray.errors import ConfigError, RecsysError
from recsys_ray.losses import LOSSES
from recsys_ray.train import TrainConfig, load_train_config, plan

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.yaml"  # the validated sweep, next to Tune's experiment state
TRAIN_RUNS = "train"  # folder of the per-trial Ray Train runs inside the experiment folder
REPORT_DIR = "report"

# What train_loop_per_worker reports each epoch besides the ranking metrics of validate().
TRAINING_KEYS = ("epoch", "global_step", "train_loss", "samples_per_s", "tokens_per_s")
LOWER_IS_BETTER = ("train_loss",)
VALIDATION_KS = (5, 10, 20, 50)  # the cut-offs validate() reports

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
    "loss": {"choice": ["bce", "softmax", "bpr", "lambdarank"]},
    "freeze": {"choice": ["none", "embeddings", "bottom:2", "encoder", "lora:8"]},
}
MAX_COMBINATIONS = 512  # categorical combinations checked one by one; beyond that, one value at a time


def reported_metrics() -> list[str]:
    """Every numeric key a trial reports per epoch (what ``tune.metric`` may name)."""
    from recsys_ray.metrics import MetricAccumulator

    ranking = MetricAccumulator(ks=VALIDATION_KS).update(np.zeros(1, dtype=np.int64)).result()
    return sorted(k for k in ranking if k != "num_users") + list(TRAINING_KEYS)


@dataclasses.dataclass
class TuneSettings:
    """The ``tune:`` section: what to search, how, and where the results go."""

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
        for name in ("num_samples", "grace_period", "driver_memory_mb"):
            if getattr(self, name) < 1:
                out.append(f"tune.{name} must be >= 1, got {getattr(self, name)}")
        if self.reduction_factor < 2:
            out.append(f"tune.reduction_factor must be >= 2, got {self.reduction_factor}")
        for name in ("max_concurrent_trials", "max_failures"):
            if getattr(self, name) < 0:
                out.append(f"tune.{name} must be >= 0, got {getattr(self, name)}")
        if self.data_cpus < 0:
            out.append(f"tune.data_cpus must be >= 0, got {self.data_cpus}")
        if not self.storage_path:
            out.append("tune.storage_path must not be empty")
        if not self.name or "/" in self.name:
            out.append(f"tune.name must be a non-empty folder name, got {self.name!r}")
        return out

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
        if _tree_problems(self.train):
            return out  # the base config's own problems are reported once, not per space value
        out.extend(space_problems(self.tune.search_space, to_dict(self.train), self.tune.search_alg))
        return out

    @property
    def experiment_path(self) -> str:
        return join_path(self.tune.storage_path, self.tune.name)


def _tree_problems(obj: Any) -> list[str]:
    out = list(obj.problems()) if callable(getattr(obj, "problems", None)) else []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.extend(_tree_problems(value))
    return out


def join_path(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI (``s3://bucket/x``)."""
    return "/".join([base.rstrip("/"), *parts])


# ---------------------------------------------------------------------------------------------
# search space: validation and translation to Ray Tune


def _leaf_fields(cls: type, prefix: str = "") -> set[str]:
    import typing

    hints = typing.get_type_hints(cls)
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out |= _leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.add(f"{prefix}{f.name}")
    return out


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
    leaves = _leaf_fields(TrainConfig)
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
    from ray import tune

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


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


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
    return _deep_merge(load_yaml(found), rest)


def absolute_path(value: str) -> str:
    """A local path made absolute (trials run elsewhere); URIs pass through."""
    return value if "://" in value else str(Path(value).expanduser().resolve())


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
    train.data = absolute_path(train.data)
    train.storage_path = absolute_path(train.storage_path)
    enc = Path(train.model.encoder).expanduser()
    if train.model.encoder != "default" and "://" not in train.model.encoder and enc.exists():
        train.model.encoder = str(enc.resolve())
    sweep.tune.storage_path = absolute_path(sweep.tune.storage_path)
    return sweep


def load_sweep_file(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """A sweep YAML (``configs/tune-*.yaml``) -> validated :class:`SweepConfig`."""
    return load_sweep_config(load_yaml(path), overrides, Path(path).parent)


def check_sweep(sweep: SweepConfig) -> None:
    """Checks that need the data and the encoder (still before Ray): every trial's shape can plan.

    Runs :func:`recsys_ray.train.plan` for each distinct (negatives, batch_size, grad_accum) the
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
    from recsys_ray.model import resolve_encoder_path

    cfg_file = Path(resolve_encoder_path(sweep.train.model.encoder)) / "config.json"
    if not cfg_file.is_file():
        return []  # a hub name: its depth is only known once downloaded
    layers = json.loads(cfg_file.read_text()).get("num_hidden_layers", 0)
    return [f"tune.space.freeze={v!r}: the encoder has only {layers} layers" for v, k in deep if k > layers]


# ---------------------------------------------------------------------------------------------
# the trial: the training driver under Tune


def train_run_name(trial_id: str) -> str:
    """The Ray Train run of a trial is named after the trial (a resumed trial resumes its run)."""
    return f"trial_{trial_id}"


def trial_dirname(trial) -> str:
    """Short trial folders (Tune's default spells out every sampled value)."""
    return f"trial_{trial.trial_id}"


def trial_driver(config: dict, base_train: dict | None = None, guard=None) -> None:
    """One Tune trial: base config + sampled values -> the TorchTrainer of jobs/train.py -> fit.

    Metrics reach Tune through ``TuneReportCallback`` (one result per epoch, with the checkpoint
    path). A restarted trial (``--resume``, ``max_failures``) rebuilds the same run name, so Ray
    Train continues from that run's latest checkpoint instead of from step 0.
    """
    import ray.data
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from recsys_ray.train import build_trainer, run_trainer

    trial_id = tune.get_context().get_trial_id()
    cfg = load_train_config(apply_params(base_train or {}, config))
    name = train_run_name(trial_id)
    finished = finished_run_result(join_path(cfg.storage_path, name), cfg.epochs)
    if finished is not None:
        # The run saved its last epoch, but the sweep was interrupted before Tune heard of it:
        # hand Tune that result instead of starting workers that have nothing left to do.
        tune.report(finished)
        return
    # one progress bar per trial's data stream would drown Tune's own status lines
    ray.data.DataContext.get_current().enable_progress_bars = False
    callbacks = [TuneReportCallback()]
    if guard is not None:
        callbacks.append(_guard_callback(guard))
    trainer = build_trainer(cfg, name=name, extra_callbacks=callbacks)
    run_trainer(trainer, what=f"trial {trial_id}")


def finished_run_result(run_path: str, epochs: int) -> dict | None:
    """The last result of a Ray Train run that already finished all ``epochs``, else None.

    Read from the run's checkpoint manager snapshot: the checkpoint Ray Train would resume from.
    """
    text = read_text(join_path(run_path, "checkpoint_manager_snapshot.json"))
    try:
        latest = json.loads(text)["latest_checkpoint_result"] if text else None
        metrics = dict(latest["metrics"]) if latest else None
    except (ValueError, KeyError, TypeError):
        return None  # another layout (another Ray version): let Ray Train decide
    if not metrics or int(metrics.get("epoch", 0)) < epochs:
        return None
    return {**metrics, "checkpoint_path": join_path(run_path, latest["checkpoint_dir_name"])}


class PlacementGroupGuard:
    """Frees a trial's Train workers' placement group once the trial's Train controller is gone.

    When ASHA stops a trial, Tune kills the trial actor; the Train controller it owns dies with it,
    but the workers' placement group lives as long as the job: its CPUs stay reserved until the
    sweep ends, and on a small machine the next trial waits forever. Ray Train's own
    PlacementGroupCleaner asks the State API whether the controller lives; that API needs the
    dashboard (off in ``init_ray`` and in tests) and one Ray instance per machine, else it never
    answers. This guard, an actor owned by the sweep's driver, pings each controller instead.
    """

    def __init__(self, interval_s: float = 1.0):
        self._watched: dict[str, tuple] = {}  # placement group id -> (placement group, controller)
        self._interval_s = interval_s
        self._loop = None

    async def watch(self, placement_group, controller) -> None:
        import asyncio

        self._watched[placement_group.id.hex()] = (placement_group, controller)
        if self._loop is None:
            self._loop = asyncio.get_running_loop().create_task(self._watch_loop())

    async def _watch_loop(self) -> None:
        import asyncio

        while True:
            await asyncio.sleep(self._interval_s)
            await self.check()

    async def check(self) -> int:
        """Remove the placement groups whose controller is dead now; returns how many."""
        import asyncio

        import ray
        from ray.util.placement_group import remove_placement_group

        removed = 0
        for key, (pg, controller) in list(self._watched.items()):
            try:
                await asyncio.wait_for(controller.__ray_ready__.remote(), timeout=10)
                continue  # alive: it removes its own placement group when it ends
            except TimeoutError:
                continue  # busy, not dead
            except ray.exceptions.RayActorError:
                pass
            del self._watched[key]
            with contextlib.suppress(Exception):  # already removed by a controller that ended well
                remove_placement_group(pg)
                removed += 1
        return removed


def _guard_callback(guard):
    """A Train callback (runs in the controller) that hands each worker group's placement group
    to the guard. Ray Train passes non-user callbacks from RunConfig to its controller as they are,
    "so custom workarounds built on top of internal callbacks" work; the base class is internal."""
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class GuardWorkerPlacementGroup(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group) -> None:
            import ray

            pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
            guard.watch.remote(pg, ray.get_runtime_context().current_actor)

    return GuardWorkerPlacementGroup()


def start_guard():
    """The sweep's placement-group guard (an actor owned by this process, no resources)."""
    import ray

    return ray.remote(num_cpus=0)(PlacementGroupGuard).remote()


def trial_resources(sweep: SweepConfig) -> dict:
    """What a trial's driver actor reserves: memory only, so every CPU goes to workers and data."""
    return {"CPU": 0, "memory": sweep.tune.driver_memory_mb * 2**20}


def derive_concurrency(sweep: SweepConfig, cluster: dict[str, float]) -> int:
    """Trials that fit at once: each needs its workers' resources plus ``data_cpus`` for reads."""
    if sweep.tune.max_concurrent_trials:
        return sweep.tune.max_concurrent_trials
    train = sweep.train
    per_worker = {k: float(v) for k, v in (train.resources_per_worker or {}).items()}
    per_worker.setdefault("CPU", 1.0)
    if train.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    need = {k: v * train.num_workers for k, v in per_worker.items() if v > 0}
    need["CPU"] = need.get("CPU", 0.0) + sweep.tune.data_cpus
    fits = [cluster.get(k, 0.0) / v for k, v in need.items() if v > 0]
    n = int(min(fits) + 1e-9) if fits else 1
    if n < 1:
        log.warning("one trial needs %s but the cluster has %s: trials will wait for resources", need, cluster)
    return max(1, n)


def _asha_refill_callback(scheduler, path: str, metric: str, mode: str):
    """A Tune callback that refills ASHA's rungs from the stored results when a sweep resumes.

    Tune checkpoints a sweep's searcher and callbacks, not its scheduler: a restored sweep gets
    the ASHA of tuner.pkl with empty rungs, and the first trials after a resume would pass every
    cut-off. The rungs are rebuilt from what every trial reported: ASHA records, per milestone,
    the metric at a trial's first result at or past it. (The callback and the scheduler are
    pickled together in tuner.pkl, so the restored callback holds the restored scheduler.)
    """
    from ray.tune import Callback

    class RefillAshaRungs(Callback):
        def setup(self, **info) -> None:
            brackets = getattr(scheduler, "_brackets", None)
            if not brackets or len(brackets) != 1:
                return  # not ASHA, or several brackets (whose trial split is not stored)
            try:
                from ray.tune import ExperimentAnalysis

                frames = ExperimentAnalysis(path).trial_dataframes
            except Exception:  # a fresh sweep: nothing stored yet
                return
            sign = 1.0 if mode == "max" else -1.0
            filled = 0
            for milestone, recorded in brackets[0]._rungs:
                for trial_id, df in frames.items():
                    if df.empty or "epoch" not in df or metric not in df:
                        continue
                    past = df[df["epoch"] >= milestone]
                    if len(past) and trial_id not in recorded:
                        recorded[trial_id] = sign * float(past[metric].iloc[0])
                        filled += 1
            if filled:
                log.info("ASHA: %d rung records restored from the stored results", filled)

    return RefillAshaRungs()


def _trainable(sweep: SweepConfig, guard=None):
    from ray import tune

    base = to_dict(sweep.train)
    base["storage_path"] = join_path(sweep.experiment_path, TRAIN_RUNS)
    fn = tune.with_parameters(trial_driver, base_train=base, guard=guard)
    return tune.with_resources(fn, trial_resources(sweep))


def _tuner(sweep: SweepConfig, concurrency: int, callbacks: list | None, guard=None):
    from ray import tune
    from ray.tune.logger import TBXLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    t = sweep.tune
    if t.search_alg == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=t.seed))
        limit = concurrency
    else:
        # a SearchGenerator ignores TuneConfig.max_concurrent_trials: it takes the limit itself
        search_alg = BasicVariantGenerator(max_concurrent=concurrency, random_state=t.seed)
        limit = None
    extra = list(callbacks or [])
    if t.scheduler == "asha":
        # time_attr = our epoch counter, not Tune's result count: a resumed trial continues it
        scheduler = ASHAScheduler(time_attr="epoch", max_t=sweep.train.epochs,
                                  grace_period=t.grace_period, reduction_factor=t.reduction_factor)
        extra.append(_asha_refill_callback(scheduler, sweep.experiment_path, t.metric, t.mode))
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        _trainable(sweep, guard),
        param_space=tune_space(t.search_space),
        tune_config=tune.TuneConfig(
            metric=t.metric, mode=t.mode, search_alg=search_alg, scheduler=scheduler,
            num_samples=t.num_samples, max_concurrent_trials=limit, trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=t.name,
            storage_path=t.storage_path,
            # Tune adds TensorBoard logging by itself only while TUNE_DISABLE_AUTO_CALLBACK_LOGGERS
            # is unset; the dashboards are part of the job, so ask for it explicitly
            callbacks=[TBXLoggerCallback(), *extra],
            failure_config=tune.FailureConfig(max_failures=t.max_failures),
            verbose=1,
        ),
    )


# ---------------------------------------------------------------------------------------------
# storage helpers (local folders and s3:// alike)


def filesystem(path: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    import pyarrow.fs as pafs

    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def read_text(path: str) -> str | None:
    """A small file's text, or None when it does not exist."""
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    if fs.get_file_info(p).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(p) as f:
        return f.read().decode("utf-8")


def write_text(path: str, text: str) -> None:
    fs, p = filesystem(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode("utf-8"))


def holds_sweep(path: str) -> bool:
    """Whether ``path`` holds Tune experiment state (what Tuner.restore needs)."""
    from ray.tune import Tuner

    try:
        return bool(Tuner.can_restore(path))
    except Exception:  # an unreachable bucket, a file instead of a folder, ...
        return False


def save_sweep(sweep: SweepConfig) -> str:
    path = join_path(sweep.experiment_path, SWEEP_FILE)
    header = "# The validated sweep (recsys_ray.tune); `python jobs/tune.py --resume <this folder>` continues it.\n"
    write_text(path, header + yaml.safe_dump(to_dict(sweep), sort_keys=False))
    return path


def load_saved_sweep(path: str) -> SweepConfig:
    """The sweep stored in an experiment folder; a folder without one is refused with the reason."""
    path = absolute_path(path)
    text = read_text(join_path(path, SWEEP_FILE))
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
        raise RecsysError(f"{path}/{SWEEP_FILE}: unreadable ({str(exc).splitlines()[0]})") from None
    return load_sweep_config(data)


def resolve_sweep_path(path_or_name: str, storage_path: str | None = None) -> str:
    """``--resume`` / ``--report-only`` accept a folder or a sweep name (under the storage path)."""
    if "/" in path_or_name or Path(path_or_name).exists():
        return absolute_path(path_or_name)
    return join_path(absolute_path(storage_path or TuneSettings.storage_path), path_or_name)


# ---------------------------------------------------------------------------------------------
# running


def _fit(tuner, guard) -> None:
    import ray

    try:
        # Tune prints its progress table on stdout; a job's stdout carries only its JSON line
        with contextlib.redirect_stdout(sys.stderr):
            tuner.fit()
    finally:
        with contextlib.suppress(Exception):
            ray.get(guard.check.remote(), timeout=30)  # the last stopped trial's workers
        ray.kill(guard)


def run_sweep(sweep: SweepConfig, callbacks: list | None = None) -> dict:
    """Run a new sweep and write its report; returns the summary the job prints.

    Everything that can be checked without running a trial is checked first (config, space,
    data, results already under the same name). ``callbacks`` are extra Tune callbacks.
    """
    from recsys_ray.hpo_report import write_report
    from recsys_ray.runtime import init_ray

    check_sweep(sweep)
    path = sweep.experiment_path
    if holds_sweep(path):
        raise RecsysError(f"{path} already holds a sweep: continue it with --resume {path}, or pick another tune.name")
    init_ray()
    import ray

    t0 = time.perf_counter()
    concurrency = derive_concurrency(sweep, ray.cluster_resources())
    log.info("sweep %s: %d samples, %d trial(s) at a time, results under %s",
             sweep.tune.name, sweep.tune.num_samples, concurrency, path)
    save_sweep(sweep)
    guard = start_guard()
    _fit(_tuner(sweep, concurrency, callbacks, guard), guard)
    summary = write_report(path)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def resume_sweep(path_or_name: str, storage_path: str | None = None) -> dict:
    """Continue an interrupted sweep: finished trials stay, unfinished and errored ones go on.

    Errored trials resume (``resume_errored``), not restart: their driver rebuilds the same Train
    run name, so training continues from the trial's latest checkpoint. The searcher, the
    scheduler and the concurrency limit come back from the saved experiment state.
    """
    from ray.tune import Tuner

    from recsys_ray.hpo_report import write_report
    from recsys_ray.runtime import init_ray

    path = resolve_sweep_path(path_or_name, storage_path)
    sweep = load_saved_sweep(path)
    check_sweep(sweep)
    init_ray()
    t0 = time.perf_counter()
    log.info("resuming sweep %s", path)
    guard = start_guard()
    tuner = Tuner.restore(path, trainable=_trainable(sweep, guard), resume_unfinished=True, resume_errored=True)
    _fit(tuner, guard)
    summary = write_report(path)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def report_only(path_or_name: str, storage_path: str | None = None) -> dict:
    """Write the report of an existing sweep from its stored results (runs no trial, no Ray)."""
    from recsys_ray.hpo_report import write_report

    path = resolve_sweep_path(path_or_name, storage_path)
    load_saved_sweep(path)  # the same clear refusal as --resume for a folder without a sweep
    t0 = time.perf_counter()
    summary = write_report(path)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary
