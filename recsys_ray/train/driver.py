"""The training driver: checks on the driver (:func:`plan`), the ``TorchTrainer``
(:func:`build_trainer`), and :func:`fit`, what ``jobs/train.py`` runs. Ray Tune wraps
:func:`build_trainer` / :func:`run_trainer` for each trial, never a copy of them.
"""

from __future__ import annotations

import logging
import time

import ray
import ray.train
from ray.train.torch import TorchTrainer

from recsys_ray import storage
from recsys_ray.checkpoint import SCORE, best_checkpoint, resolve
from recsys_ray.config import to_dict
from recsys_ray.data import layout
from recsys_ray.errors import ConfigError, DataError, RecsysError, one_line
from recsys_ray.model import kinds
from recsys_ray.model.tokenizer import load_tokenizer, vocab_digest
from recsys_ray.runtime import init_ray, unwrap_task_error
from recsys_ray.train.config import TrainConfig
from recsys_ray.train.loop import StepHook, train_loop_per_worker

log = logging.getLogger(__name__)

SUMMARY_METRICS = (SCORE, "hr@10", "mrr@10", "mrr", "protocol", "epoch", "global_step", "train_loss", "samples_per_s")
SEARCH_SUMMARY = ("search_ndcg@10", "search_hr@10")  # a search model's runs only
REFIT_SUMMARY = ("refit", "validated")  # a refit run's (TrainConfig.refit): not validated


def check_vocab(manifest: dict, tokenizer, data_dir: str) -> None:
    """Refuse data tokenized with another vocabulary than the model's."""
    want = manifest.get("tokenizer", {}).get("vocab_sha256")
    have = vocab_digest(tokenizer)
    if want != have:
        raise DataError(
            f"{data_dir} was tokenized with {manifest.get('tokenizer', {}).get('name')!r} "
            f"(vocab {str(want)[:12]}), but the model's tokenizer has vocab {have[:12]}: "
            "prepare the data again with --set tokenizer=<the model's encoder>"
        )


def check_init_from(cfg: TrainConfig):
    """The model a warm start begins from, loaded once on the driver so that a bad checkpoint or
    one of another kind fails before any worker starts (the workers load it again themselves)."""
    try:
        model = kinds.start_model(resolve(cfg.init_from), cfg.model)
    except RecsysError as exc:
        raise ConfigError([f"init_from {cfg.init_from!r}: {one_line(exc)}"]) from None
    log.info("warm start from %s (%s/%s, step %s): its weights and model config; the config's model section "
             "other than kind, history (and an items ranker's freeze and ranker fields) is not used", cfg.init_from,
             model.cfg.kind, model.cfg.history, model.extra.get("step"))
    return model


def plan(cfg: TrainConfig) -> dict:
    """Checks that need only the driver (before any worker starts): data, manifest, tokenizer;
    returns what the workers need to know (steps per epoch, data fingerprint, text config)."""
    data = cfg.data
    manifest = layout.read_manifest(data)
    kind = kinds.kind_class(cfg.model)
    layout.require_parts(data, (layout.ITEMS, kind.train_part, layout.split_part("valid")))
    problem = kind.data_problem(data)
    if problem:
        raise DataError(problem)
    if cfg.model.search_mix and "queries" not in layout.columns(data, layout.SEQUENCES):
        raise DataError(f"{data}: model.search_mix={cfg.model.search_mix} needs search events, but these logs "
                        "carry no queries (prepare them with columns.query, or --set queries=metadata for MovieLens)")
    init = check_init_from(cfg) if cfg.init_from else None
    check_vocab(manifest, init.tokenizer if init else load_tokenizer(cfg.model.encoder), data)
    prepared = manifest.get("config", {}).get("negatives", cfg.negatives)
    if kind.prepared_negatives and cfg.negatives > prepared:
        raise ConfigError([f"negatives={cfg.negatives} but {data} was prepared with {prepared} per positive"])
    n_train, what = kind.train_rows(manifest)
    per_step = cfg.num_workers * cfg.batch_size * cfg.optim.grad_accum
    spe = n_train // per_step
    if spe < 1:
        raise DataError(f"{data}: {n_train} {what} are fewer than one step ({per_step} = workers x batch x accum)")
    if cfg.max_steps_per_epoch:
        spe = min(spe, cfg.max_steps_per_epoch)
    return {
        "steps_per_epoch": spe,
        "init_from": storage.absolute(cfg.init_from) if cfg.init_from else "",  # workers run in other directories
        "data_fingerprint": manifest["fingerprint"],
        "text": manifest.get("text", {}),
        "train_examples": n_train,
    }


def build_trainer(cfg: TrainConfig, run_plan: dict | None = None, name: str | None = None, extra_callbacks=None,
                  step_hooks: list[StepHook] | None = None) -> TorchTrainer:
    """The TorchTrainer for ``cfg`` (Tune calls this too, with its own run name and callbacks).

    ``step_hooks``: picklable callables each worker calls after every optimizer step
    (``hook(global_step=, rank=, resumed=)``); tests inject faults with them.
    """
    run_plan = run_plan or plan(cfg)
    data = storage.absolute(cfg.data)
    storage_path, storage_fs = storage.ray_target(cfg.storage_path)
    kind = kinds.kind_class(cfg.model)
    if kind.train_part == layout.SEQUENCES:  # one row per user; several blocks so every worker gets a share
        train = layout.read_dataset(data, kind.train_part, columns=kind.train_columns(data))
        train = train.repartition(4 * cfg.num_workers)
    else:
        train = layout.read_dataset(data, kind.train_part, columns=kind.train_columns(data), shuffle="files")
    train = train.randomize_block_order(seed=cfg.seed)
    cpus = ray.cluster_resources().get("CPU", 0)
    per_worker = float((cfg.resources_per_worker or {}).get("CPU", 1))
    if cpus - cfg.num_workers * per_worker < 1:
        # No CPU would be left for Ray Data's read tasks once the workers hold theirs (2 CPUs,
        # 2 workers): they would wait forever. Read the split now, while the CPUs are free;
        # the workers then stream their shards from the object store.
        train = train.materialize()
    resources = dict(cfg.resources_per_worker) or None
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": to_dict(cfg), "run": {**run_plan, "data": data},
                           "step_hooks": list(step_hooks or [])},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=cfg.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name or cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            callbacks=extra_callbacks,
        ),
        datasets={"train": train},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def _worker_error(exc: BaseException) -> str:
    """The first line of the most useful error inside a Ray Train failure (ours if there is one)."""
    failures = list(getattr(exc, "worker_failures", {}).values())
    for cause in [*failures, getattr(exc, "controller_failure", None), exc]:
        if cause is None:
            continue
        inner = unwrap_task_error(cause)
        if isinstance(inner, RecsysError):
            return one_line(inner)
    for cause in failures:
        lines = [ln for ln in str(cause).strip().splitlines() if ln.strip()]
        if lines:
            return lines[-1].strip()
    return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__


def run_trainer(trainer: TorchTrainer, what: str = "training"):
    """``trainer.fit()`` with worker failures turned into one-line RecsysErrors."""
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray Train raises WorkerGroupError / ControllerError
        raise RecsysError(f"{what} failed: {_worker_error(exc)}") from exc
    if result.error:
        raise RecsysError(f"{what} failed: {_worker_error(result.error)}")
    return result


def summary(result, run_plan: dict, seconds: float, storage_path: str = "") -> dict:
    """What ``jobs/train.py`` prints: the best checkpoint and ITS validation metrics (Ray Train's
    ``result.metrics`` is the last report, which need not be the best), and where the run ended.
    Paths are URIs when ``storage_path`` is one (Ray reports them inside its filesystem)."""
    kept = [(c.path, m) for c, m in (result.best_checkpoints or [])]
    best = best_checkpoint(kept)
    best_path, best_metrics = best if best else ((result.checkpoint.path if result.checkpoint else None), {})
    last = result.metrics or {}
    return {
        "run": storage.uri_of(storage_path, str(result.path)),
        "best_checkpoint": storage.uri_of(storage_path, best_path) if best_path else None,
        "metrics": {**{k: best_metrics.get(k) for k in SUMMARY_METRICS},
                    **{k: best_metrics[k] for k in SEARCH_SUMMARY if k in best_metrics},
                    **{k: best_metrics[k] for k in REFIT_SUMMARY if best_metrics.get("refit")}},
        "final": {k: last.get(k) for k in ("epoch", "global_step", "train_loss", "samples_per_s", "restarts",
                                           "resumed_from_step", "stopped_early")},
        "steps_per_epoch": run_plan["steps_per_epoch"],
        "seconds": round(seconds, 1),
    }


def wait_for_resources(cfg: TrainConfig) -> None:
    """Until the cluster offers what the workers need (an autoscaler may still be adding nodes),
    at most ``cfg.resource_wait_s``; then a one-line error instead of Ray Train waiting forever."""
    per_worker = {k: float(v) for k, v in (cfg.resources_per_worker or {}).items()}
    per_worker.setdefault("CPU", 1.0)
    if cfg.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    need = {k: v * cfg.num_workers for k, v in per_worker.items() if v > 0}
    deadline = time.monotonic() + cfg.resource_wait_s
    while True:
        have = ray.cluster_resources()
        missing = {k: v for k, v in need.items() if have.get(k, 0.0) < v}
        if not missing:
            return
        if time.monotonic() >= deadline:
            shown = ", ".join(f"{v:g} {k}" for k, v in missing.items())
            offered = ", ".join(f"{have.get(k, 0.0):g} {k}" for k in missing)
            raise RecsysError(f"{cfg.num_workers} workers need {shown} but the cluster offers {offered} "
                              f"(waited {cfg.resource_wait_s:g} s; use_gpu={cfg.use_gpu}, "
                              f"resources_per_worker={cfg.resources_per_worker or {}})")
        log.info("waiting for %s (the cluster has %s)", missing, {k: have.get(k, 0.0) for k in missing})
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


def fit(cfg: TrainConfig, step_hooks: list[StepHook] | None = None) -> dict:
    """Train (or resume a run of the same name) and return the summary the job prints."""
    storage.use_endpoint(cfg.s3_endpoint)
    run_plan = plan(cfg)
    storage.check_writable(cfg.storage_path, "storage_path")
    init_ray()
    wait_for_resources(cfg)
    t0 = time.perf_counter()
    result = run_trainer(build_trainer(cfg, run_plan, step_hooks=step_hooks))
    return summary(result, run_plan, time.perf_counter() - t0, cfg.storage_path)
