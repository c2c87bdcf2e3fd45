"""Hyperparameter search on Ray Tune: ASHA over the same training driver that jobs/train.py runs.

Each trial runs :func:`trial_driver`: base config + the trial's sampled values ->
:func:`recsys_ray.train.driver.build_trainer` (run name = the trial id, ``TuneReportCallback``
forwards every epoch's validation metrics to Tune) -> fit. The driver is the one jobs/train.py
uses, never a copy. The trial actor itself reserves no CPU (a memory-only bundle): Ray Train's
workers hold the CPUs, and ``data_cpus`` per trial stay free for Ray Data's read tasks. Both
matter on small machines: with 2 CPUs, a trial holding even 0.01 CPU next to a 1-CPU worker
leaves 0.99 CPU, and the 1-CPU read task of the train split waits forever; two concurrent
1-worker trials leave none.

Three more things Tune + Train V2 (Ray 2.60) need here, each explained where it is done: a
:class:`PlacementGroupGuard` frees the workers' CPUs of a trial ASHA killed; a callback refills
ASHA's rungs on ``--resume`` (Tune does not save the scheduler); a trial whose Train run already
finished reports that result instead of training.

Everything lives under ``<storage_path>/<name>/``: ``sweep.yaml`` (the validated sweep, what
``--resume`` restarts), Tune's trial folders (``trial_<id>/``: result.json, progress.csv,
TensorBoard events), ``train/trial_<id>/`` (each trial's Ray Train run and checkpoints) and
``report/`` (report.md, plots, best_config.yaml; :mod:`recsys_ray.tune.report`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time

import ray
import ray.data
from ray import tune
from ray.tune import Callback, ExperimentAnalysis, Tuner
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.logger import TBXLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.util.placement_group import remove_placement_group

from recsys_ray import storage
from recsys_ray.checkpoint import latest_result
from recsys_ray.config import to_dict
from recsys_ray.errors import RecsysError
from recsys_ray.ray_compat import worker_group_callback
from recsys_ray.runtime import init_ray
from recsys_ray.train.config import load_train_config
from recsys_ray.train.driver import build_trainer, run_trainer
from recsys_ray.tune.config import (
    TRAIN_RUNS,
    SweepConfig,
    apply_params,
    check_sweep,
    holds_sweep,
    load_saved_sweep,
    resolve_sweep_path,
    save_sweep,
    tune_space,
)
from recsys_ray.tune.report import write_report

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# the trial: the training driver under Tune


def train_run_name(trial_id: str) -> str:
    """The Ray Train run of a trial is named after the trial (a resumed trial resumes its run)."""
    return f"trial_{trial_id}"


def trial_dirname(trial) -> str:
    """Short trial folders (Tune's default spells out every sampled value)."""
    return f"trial_{trial.trial_id}"


def recorded_steps(path: str) -> dict[str, int]:
    """Trial id -> the ``global_step`` of the last result Tune stored for it (its result.json)
    under the sweep at ``path``: read before a resume, so that a trial whose finished result Tune
    had already written, but whose end it never saved, does not report that result twice."""
    import pyarrow.fs as pafs

    fs, root = storage.filesystem(path)
    out = {}
    for entry in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if entry.type != pafs.FileType.Directory or not entry.base_name.startswith("trial_"):
            continue
        text = storage.read_text(storage.join(path, entry.base_name, "result.json")) or ""
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if lines:
            with contextlib.suppress(ValueError, TypeError):
                out[entry.base_name.removeprefix("trial_")] = int(json.loads(lines[-1]).get("global_step"))
    return out


def trial_driver(config: dict, base_train: dict | None = None, guard=None,
                 recorded: dict[str, int] | None = None) -> None:
    """One Tune trial: base config + sampled values -> the TorchTrainer of jobs/train.py -> fit.

    Metrics reach Tune through ``TuneReportCallback`` (one result per epoch, with the checkpoint
    path). A restarted trial (``--resume``, ``max_failures``) rebuilds the same run name, so Ray
    Train continues from that run's latest checkpoint instead of from step 0.
    """
    trial_id = tune.get_context().get_trial_id()
    cfg = load_train_config(apply_params(base_train or {}, config))
    name = train_run_name(trial_id)
    finished = finished_run_result(storage.join(cfg.storage_path, name), cfg.epochs)
    if finished is not None:
        # The run saved its last epoch (or stopped itself), but the sweep was interrupted before
        # Tune saved the trial's end: hand Tune that result instead of starting workers that have
        # nothing left to do - unless Tune had stored it already (then the trial just ends).
        if (recorded or {}).get(trial_id) != finished.get("global_step"):
            tune.report(finished)
        return
    # one progress bar per trial's data stream would drown Tune's own status lines
    ray.data.DataContext.get_current().enable_progress_bars = False
    callbacks = [TuneReportCallback()]
    if guard is not None:
        callbacks.append(worker_group_callback(lambda pg, controller: guard.watch.remote(pg, controller)))
    trainer = build_trainer(cfg, name=name, extra_callbacks=callbacks)
    run_trainer(trainer, what=f"trial {trial_id}")


def finished_run_result(run_path: str, epochs: int) -> dict | None:
    """The last result of a Ray Train run that already finished: all ``epochs``, or stopped by
    its own early stopping; else None (read from the checkpoint Ray Train would resume from)."""
    latest = latest_result(run_path)
    if not latest or latest.get("validated") is False:
        return None
    if int(latest.get("epoch", 0)) < epochs and not latest.get("stopped_early"):
        return None
    return latest


class PlacementGroupGuard:
    """Frees a trial's Train workers' placement group once the trial's Train controller is gone.

    When ASHA stops a trial, Tune kills the trial actor; the Train controller it owns dies with it,
    but the workers' placement group lives as long as the job: its CPUs stay reserved until the
    sweep ends, and on a small machine the next trial waits forever. Ray Train's own
    PlacementGroupCleaner asks the State API whether the controller lives; that API needs a
    dashboard (the test fixture's Ray has none) and answers from whichever Ray instance the
    State API address names, so on a machine with several instances it can miss. This guard,
    an actor owned by the sweep's driver, pings each controller instead.
    """

    def __init__(self, interval_s: float = 1.0):
        self._watched: dict[str, tuple] = {}  # placement group id -> (placement group, controller)
        self._interval_s = interval_s
        self._loop = None

    async def watch(self, placement_group, controller) -> None:
        self._watched[placement_group.id.hex()] = (placement_group, controller)
        if self._loop is None:
            self._loop = asyncio.get_running_loop().create_task(self._watch_loop())

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.check()

    async def check(self) -> int:
        """Remove the placement groups whose controller is dead now; returns how many."""
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


def start_guard():
    """The sweep's placement-group guard (an actor owned by this process, no resources)."""
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
    class RefillAshaRungs(Callback):
        def setup(self, **info) -> None:
            brackets = getattr(scheduler, "_brackets", None)
            if not brackets or len(brackets) != 1:
                return  # not ASHA, or several brackets (whose trial split is not stored)
            try:
                target, fs = storage.ray_target(path)
                frames = ExperimentAnalysis(target, storage_filesystem=fs).trial_dataframes
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


def _trainable(sweep: SweepConfig, guard=None, recorded: dict[str, int] | None = None):
    base = to_dict(sweep.train)
    base["storage_path"] = storage.join(sweep.experiment_path, TRAIN_RUNS)
    fn = tune.with_parameters(trial_driver, base_train=base, guard=guard, recorded=recorded)
    return tune.with_resources(fn, trial_resources(sweep))


def _tuner(sweep: SweepConfig, concurrency: int, callbacks: list | None, guard=None):
    t = sweep.tune
    if t.search_alg == "optuna":
        import optuna  # optional dependency: only the TPE searcher needs it
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
            storage_path=storage.ray_target(t.storage_path)[0],
            storage_filesystem=storage.ray_target(t.storage_path)[1],
            # Tune adds TensorBoard logging by itself only while TUNE_DISABLE_AUTO_CALLBACK_LOGGERS
            # is unset; the dashboards are part of the job, so ask for it explicitly
            callbacks=[TBXLoggerCallback(), *extra],
            failure_config=tune.FailureConfig(max_failures=t.max_failures),
            verbose=1,
        ),
    )


# ---------------------------------------------------------------------------------------------
# running


def _fit(tuner, guard) -> None:
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
    storage.use_endpoint(sweep.train.s3_endpoint)
    check_sweep(sweep)
    path = sweep.experiment_path
    storage.check_writable(path, "tune.storage_path")
    if holds_sweep(path):
        raise RecsysError(f"{path} already holds a sweep: continue it with --resume {path}, or pick another tune.name")
    init_ray()
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
    path = resolve_sweep_path(path_or_name, storage_path)
    sweep = load_saved_sweep(path)
    check_sweep(sweep)
    init_ray()
    t0 = time.perf_counter()
    log.info("resuming sweep %s", path)
    guard = start_guard()
    target, fs = storage.ray_target(path)
    recorded = recorded_steps(path)  # before Tune appends to the trials' results
    tuner = Tuner.restore(target, trainable=_trainable(sweep, guard, recorded), resume_unfinished=True, resume_errored=True,
                          storage_filesystem=fs)
    _fit(tuner, guard)
    summary = write_report(path)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def report_only(path_or_name: str, storage_path: str | None = None) -> dict:
    """Write the report of an existing sweep from its stored results (runs no trial, no Ray)."""
    path = resolve_sweep_path(path_or_name, storage_path)
    load_saved_sweep(path)  # the same clear refusal as --resume for a folder without a sweep
    t0 = time.perf_counter()
    summary = write_report(path)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary
