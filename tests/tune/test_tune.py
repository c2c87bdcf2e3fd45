"""Ray Tune sweeps: config and space validation (no Ray), then real tiny sweeps on the session Ray.

The sweeps use the tiny random BERT on the session's synthetic log, one 1-CPU Train worker per
trial and one trial at a time (2 CPUs: the worker's + one for Ray Data's reads). Learning rates
come from a grid, so the order of trials - and with it ASHA's decisions - is fixed: a trial with
lr 1e-6 barely moves from its random start and ranks below the trained ones after epoch 1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recsys_ray.errors import ConfigError, RecsysError
from recsys_ray.train.config import load_train_config
from recsys_ray.tune.config import (
    SweepConfig,
    apply_params,
    check_sweep,
    load_sweep_config,
    load_sweep_file,
    reported_metrics,
    space_problems,
    tune_space,
)
from recsys_ray.tune.sweep import (
    derive_concurrency,
    finished_run_result,
    recorded_steps,
    resume_sweep,
    run_sweep,
)

REPO = Path(__file__).resolve().parents[2]
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def _sweep_dict(data: str, tmp: Path, name: str, space: dict | None, train: dict | None = None, **tune) -> dict:
    base = {
        "data": data,
        "model": {"kind": "retriever", "tiny": TINY, "dropout": 0.0, "temperature": 0.1},
        "loss": "softmax",
        "batch_size": 16,
        "epochs": 2,
        "max_steps_per_epoch": 8,
        "max_context_tokens": 48,
        "optim": {"lr": 2e-3, "warmup_ratio": 0.0},
        "eval": {"max_users": 0},
        "num_workers": 1,
        "resources_per_worker": {"CPU": 1},
        "storage_path": str(tmp / "runs"),
        "name": "unused",
        "log_every": 100,
    }
    base.update(train or {})
    settings = {"name": name, "storage_path": str(tmp / "tune"), "num_samples": 1, "grace_period": 1,
                "reduction_factor": 2, **tune}
    if space is not None:
        settings["space"] = space
    return {"train": base, "tune": settings}


def _sweep(data: str, tmp: Path, name: str, space: dict | None, train: dict | None = None, **tune) -> SweepConfig:
    return load_sweep_config(_sweep_dict(data, tmp, name, space, train, **tune))


def _results(path: str) -> dict[str, list[dict]]:
    """trial id -> its reported results, read straight from Tune's result.json files."""
    out = {}
    for trial_dir in Path(path).glob("trial_*"):
        if not (trial_dir / "result.json").is_file():  # a trial that has not reported yet
            continue
        rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]
        out[trial_dir.name.removeprefix("trial_")] = rows
    return out


# ---------------------------------------------------------------------------------------------
# no Ray: configs, spaces, resources


def test_shipped_sweep_configs_validate():
    for path in sorted((REPO / "configs").glob("tune-*.yaml")):
        sweep = load_sweep_file(path)
        assert sweep.tune.name == path.stem
        assert sweep.tune.num_samples >= (12 if "tiny" in path.stem else 6)
        assert sweep.tune.scheduler == "asha" and sweep.tune.grace_period < sweep.train.epochs
        assert Path(sweep.train.data).is_absolute()  # trials run in other working directories


def test_bad_sweep_config_lists_every_problem(tmp_path):
    bad = _sweep_dict("/nowhere", tmp_path, "bad", {
        "lr": {"loguniform": [0.0, 1e-3]},
        "loss": {"choice": ["softmax", "hinge"]},
        "freeze": {"grid": ["none", "bottom:5"]},
        "epochs": {"choice": [1, 2]},
        "warmup": {"uniform": [0, 0.1]},
    }, metric="ndcg@7", search_alg="optuna")
    with pytest.raises(ConfigError) as info:
        load_sweep_config(bad)
    text = "\n".join(info.value.problems)
    print(text)
    for part in (
        "tune.metric: the trainer does not report 'ndcg@7'",
        "tune.space.lr: loguniform needs low > 0",
        "tune.space.loss: unknown loss 'hinge'",
        "tune.space.freeze: grid values need tune.search_alg: random",
        "tune.space.freeze='bottom:5': model.freeze 'bottom:5': the tiny encoder has only 2 layers",
        "tune.space.epochs: cannot be searched",
        "tune.space.warmup: not a training config field",
    ):
        assert part in text
    assert len(info.value.problems) == 7


def test_empty_space_unknown_metric_and_impossible_combinations_are_refused(syn_data, tmp_path):
    with pytest.raises(ConfigError, match="search space is empty"):
        _sweep(syn_data, tmp_path, "e", {})
    with pytest.raises(ConfigError, match="does not report 'auc'"):
        _sweep(syn_data, tmp_path, "m", None, metric="auc")
    with pytest.raises(ConfigError, match="train_loss is lower-is-better"):
        _sweep(syn_data, tmp_path, "m", None, metric="train_loss")
    # every loss is valid for the retriever, but bce / bpr / lambdarank need sampled negatives
    with pytest.raises(ConfigError, match=r"loss 'bpr' needs negatives >= 1"):
        _sweep(syn_data, tmp_path, "n", {"loss": {"choice": ["softmax", "bpr"]}, "negatives": {"choice": [0, 2]}})
    # a refit run reports no validation score: a sweep of them could not rank its trials
    with pytest.raises(ConfigError, match="every trial would rank alike"):
        _sweep(syn_data, tmp_path, "r", None, train={"refit": True, "model": {"kind": "retriever", "history": "items"}})
    # checks that need the data: more negatives than were prepared, more layers than the encoder has
    sweep = _sweep(syn_data, tmp_path, "d", {"negatives": {"choice": [2, 9]}})
    with pytest.raises(ConfigError, match=r"negatives=9 but .* was prepared with 4"):
        check_sweep(sweep)
    minilm = _sweep(syn_data, tmp_path, "p", {"freeze": {"choice": ["none", "bottom:8"]}}, train={"model": {"kind": "retriever"}})
    with pytest.raises(ConfigError, match=r"bottom:8.*only 6 layers"):
        check_sweep(minilm)
    # the default space is valid against the tiny preset, and its names map onto TrainConfig
    assert not space_problems({"lr": {"loguniform": ["1e-5", 3e-4]}}, _sweep_dict(syn_data, tmp_path, "x", None)["train"])
    cfg = load_train_config(apply_params(_sweep_dict(syn_data, tmp_path, "x", None)["train"],
                                         {"lr": 1e-4, "freeze": "lora", "lora_rank": 8, "optim.weight_decay": 0.0}))
    assert (cfg.optim.lr, cfg.model.freeze, cfg.optim.weight_decay) == (1e-4, "lora:8", 0.0)
    assert {"ndcg@10", "hr@10", "mrr@10", "recall@50", "mrr", "train_loss", "epoch"} <= set(reported_metrics())
    assert tune_space({"loss": {"grid": ["bce", "bpr"]}}) == {"loss": {"grid_search": ["bce", "bpr"]}}


def test_concurrency_comes_from_the_cluster_and_a_trials_needs(tmp_path):
    def sweep(**train):
        return load_sweep_config({"train": {"model": {"tiny": TINY}, "epochs": 3, **train}, "tune": {}})

    # each trial: its workers' CPUs + 1 CPU for its data reads; the trial driver itself holds none
    assert derive_concurrency(sweep(num_workers=1), {"CPU": 2.0}) == 1
    assert derive_concurrency(sweep(num_workers=2), {"CPU": 16.0}) == 5
    assert derive_concurrency(sweep(num_workers=4, use_gpu=True), {"CPU": 64.0, "GPU": 8.0}) == 2
    assert derive_concurrency(sweep(num_workers=8), {"CPU": 2.0}) == 1  # never 0: the trial waits
    explicit = load_sweep_config({"train": {"model": {"tiny": TINY}, "epochs": 3}, "tune": {"max_concurrent_trials": 3}})
    assert derive_concurrency(explicit, {"CPU": 2.0}) == 3


def test_a_trial_whose_run_already_finished_is_not_trained_again(tmp_path):
    # the sweep was interrupted after the run saved its last epoch but before Tune heard of it
    run = tmp_path / "trial_x"
    run.mkdir()
    latest = {"checkpoint_dir_name": "checkpoint_2", "metrics": {"epoch": 2, "ndcg@10": 0.07, "global_step": 16}}
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps({"latest_checkpoint_result": latest}))
    assert finished_run_result(str(run), epochs=2) == {**latest["metrics"], "checkpoint_path": str(run / "checkpoint_2")}
    assert finished_run_result(str(run), epochs=3) is None  # not finished: Ray Train resumes it
    # a run that stopped itself (early_stopping) before its last epoch is finished too
    stopped = {**latest, "metrics": {**latest["metrics"], "stopped_early": True}}
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps({"latest_checkpoint_result": stopped}))
    assert finished_run_result(str(run), epochs=3)["stopped_early"] is True
    assert finished_run_result(str(tmp_path / "never-started"), epochs=2) is None
    # what Tune had stored of each trial before a resume: the last result's step
    (tmp_path / "trial_x" / "result.json").write_text(json.dumps({"epoch": 1, "global_step": 8}) + "\n"
                                                      + json.dumps({"epoch": 2, "global_step": 16}) + "\n")
    (tmp_path / "trial_y").mkdir()  # not reported yet
    assert recorded_steps(str(tmp_path)) == {"x": 16}


def test_the_job_refuses_bad_input_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"base": "configs/tiny.yaml"}, "tune": {"space": {}, "metric": "ndcg@7"}}))
    for args, want in (
        (["--config", str(bad)], ["error: invalid config:", "tune.space: the search space is empty",
                                  "tune.metric: the trainer does not report 'ndcg@7'"]),
        (["--resume", str(tmp_path / "no-such-sweep")], [f"error: {tmp_path / 'no-such-sweep'}: no sweep there"]),
    ):
        proc = subprocess.run([sys.executable, str(REPO / "jobs" / "tune.py"), *args],
                              capture_output=True, text=True, timeout=180, cwd=REPO)
        assert proc.returncode == 2, proc.stderr[-2000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith(want[0]) and all(part in line for part in want), line
        assert "Started a local Ray instance" not in proc.stderr
        assert proc.stdout == ""


# ---------------------------------------------------------------------------------------------
# a real sweep: interrupted, resumed, early-stopped, reported


def _kill_when_a_trial_reports(proc: subprocess.Popen, path: str, timeout_s: float = 300) -> str:
    """SIGKILL the sweep driver once a trial has reported epoch 1 and Tune has saved its
    experiment state; returns that trial's id."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        reported = [tid for tid, rows in _results(path).items() if any(r.get("epoch") == 1 for r in rows)]
        if reported and list(Path(path).glob("experiment_state*.json")):
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            return reported[0]
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no trial reported before the sweep ended or the wait ran out:\n" + proc.stdout.read()[-3000:])


def test_sweep_driver_killed_then_resumed_runs_every_trial_once_stops_weak_ones_and_reports(
        ray_session, syn_data, tmp_path):
    # measured in-process on this log: 80 steps at lr 1e-3..2e-3 lift ndcg@10 from 0.041 (random
    # init, all 200 validation users) to 0.056-0.069 after epoch 1 and ~0.095 after epoch 2; lr
    # 1e-6 stays at 0.041. The grid runs in order: good, bad, good, bad. Each run also has its own
    # early stopping, set so that no epoch after the first counts as an improvement (min_delta 1):
    # a run that ASHA lets through epoch 1 ends itself after epoch 2 of 3, and ASHA works on top.
    import ray

    space = {"lr": {"grid": [2e-3, 1e-6, 1e-3, 1e-6]}, "loss": {"choice": ["softmax"]}}
    doc = _sweep_dict(syn_data, tmp_path, "asha", space, train={
        "max_steps_per_epoch": 40, "epochs": 3, "early_stopping": {"patience": 1, "min_delta": 1.0}})
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(doc))
    sweep = load_sweep_config(doc)
    path = sweep.experiment_path
    # the sweep's driver, joined to the cluster as `ray job submit` runs it, SIGKILLed mid-sweep
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "jobs/tune.py", "--config", str(config)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    interrupted = _kill_when_a_trial_reports(driver, path)
    before = _results(path)
    assert len(before[interrupted]) >= 1
    # often the killed trial's Train run still saves (and Tune still writes) its epoch 2 before it
    # dies: resumed, such a trial must neither train on nor report that epoch twice
    print("interrupted trial's epochs recorded before the resume:", [r["epoch"] for r in before[interrupted]])

    # a fresh start under the same name is refused: a sweep is continued, not redone
    with pytest.raises(RecsysError, match="already holds a sweep"):
        run_sweep(sweep)
    summary = resume_sweep(path)  # what `jobs/tune.py --resume PATH` runs
    print(json.dumps(summary, indent=1))
    results = _results(path)
    assert len(results) == 4
    counts = summary["trials"]
    assert counts["total"] == 4 and counts["errored"] == 0 and counts["unfinished"] == 0
    assert counts["early_stopped"] >= 1 and counts["stopped_by_patience"] >= 1 and counts["completed"] == 0
    assert counts["early_stopped"] + counts["stopped_by_patience"] == 4

    # every trial ran each of its epochs once: the interrupted one went on from its epoch-1
    # checkpoint (its Train run is named after the trial) instead of starting over
    for tid, rows in results.items():
        epochs = [r["epoch"] for r in rows]
        assert epochs == list(range(1, len(epochs) + 1)), (tid, epochs)
        assert [r["global_step"] for r in rows] == [40 * e for e in epochs]
        assert (Path(path) / "train" / f"trial_{tid}").is_dir()
    assert results[interrupted][0] == before[interrupted][0]

    # ASHA (its rungs refilled from the stored results on resume) cut both near-untrained trials
    # after epoch 1; trained ones were cut after one or stopped themselves after epoch 2 (the
    # interrupted one too: its early-stopping state came back with its epoch-1 checkpoint)
    lrs = {tid: rows[0]["config"]["lr"] for tid, rows in results.items()}
    last_epoch = {tid: rows[-1]["epoch"] for tid, rows in results.items()}
    assert all(last_epoch[t] == 1 for t in lrs if lrs[t] == 1e-6), (last_epoch, lrs)
    assert last_epoch[interrupted] == 2 and max(last_epoch.values()) == 2
    for tid, rows in results.items():
        assert [r["stopped_early"] for r in rows] == [False] * (len(rows) - 1) + [len(rows) == 2], (tid, rows)

    # the best trial is the one with the highest ndcg@10 reported at any epoch
    best_per_trial = {tid: max(r["ndcg@10"] for r in rows) for tid, rows in results.items()}
    best_id = max(best_per_trial, key=best_per_trial.get)
    assert summary["best_trial"] == best_id
    assert summary["best_metric"] == pytest.approx(best_per_trial[best_id])
    assert lrs[best_id] in (2e-3, 1e-3)
    ckpt = Path(summary["best_checkpoint"])
    meta = json.loads((ckpt / "recsys_ray.json").read_text())
    assert meta["extra"]["metrics"]["ndcg@10"] == pytest.approx(summary["best_metric"])

    # dashboards: TensorBoard event files for every trial
    assert all(list((Path(path) / f"trial_{tid}").glob("events.out.tfevents*")) for tid in results)

    # the report lists every trial, best first, and its plots are real PNGs
    report = Path(summary["report"]).read_text()
    rows = [ln for ln in report.splitlines() if ln.startswith("| ") and "`" in ln]
    assert len(rows) == 4
    order = [next(t for t in results if t in row) for row in rows]
    assert order == sorted(results, key=lambda t: (-best_per_trial[t], t))  # ties (same seed, lr 1e-6) by id
    assert sum("stopped early (ASHA)" in row for row in rows) == counts["early_stopped"]
    assert sum("stopped early (own early_stopping)" in row for row in rows) == counts["stopped_by_patience"]
    assert "each run's own early stopping on `ndcg@10` (patience 1, min_delta 1)" in report
    for plot in summary["plots"].values():
        data = Path(plot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, plot

    # the best config trains as it is
    best = load_train_config(yaml.safe_load(Path(summary["best_config"]).read_text()))
    assert best.optim.lr == lrs[best_id] and best.name == "asha-best"
    assert best.storage_path == sweep.train.storage_path

    # --report-only reads the stored results again and runs nothing
    from recsys_ray.tune.sweep import report_only

    again = report_only(path)
    assert again["best_trial"] == best_id and again["trials"] == counts
    assert _results(path) == results
