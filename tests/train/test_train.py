"""Training: in-process pieces (losses, freezes, collation) and real Ray Train runs (2 workers)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.dataset as pads
import pytest
import ray
import torch
import yaml

from recsys_ray.checkpoint import UNVALIDATED_SCORE, resolve
from recsys_ray.data.catalogue import Catalogue
from recsys_ray.data.layout import read_split_rows
from recsys_ray.errors import ConfigError, DataError, RecsysError
from recsys_ray.model.base import TrainSettings
from recsys_ray.model.config import ModelConfig
from recsys_ray.model.kinds import from_config, load_model
from recsys_ray.model.tokenizer import load_tokenizer, special_ids
from recsys_ray.train.config import load_train_config
from recsys_ray.train.driver import fit, plan, wait_for_resources
from recsys_ray.train.loop import ScoreStep, micro_batches, validate

REPO = Path(__file__).resolve().parents[2]
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def test_a_workers_shard_size_is_known_when_its_first_pass_is_used_up(monkeypatch):
    """An epoch is exactly the micro-batches of one pass, so the shard's size (the record that
    the workers' shards are disjoint and cover the split) must be known by the pass's last step,
    not only when the next pass starts."""
    class Shard:
        def iter_batches(self, batch_size, **_):
            ids = np.arange(40)
            for i in range(0, 40, batch_size):
                yield {"context": [[1] * (1 + j % 5) for j in ids[i:i + batch_size]], "id": ids[i:i + batch_size]}

    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: Shard())
    w = SimpleNamespace(cfg=SimpleNamespace(batch_size=4, bucket_batches=3, seed=0), rank=0,
                        model=SimpleNamespace(bucket_key="context"), shard_rows=None)
    stream = micro_batches(w)
    first_pass = [next(stream) for _ in range(3 * 3 + 1)]  # chunks of 12, 12, 12, 4 rows -> 3+3+3+1 batches
    assert w.shard_rows == 40 and sum(len(b) for b in first_pass) == 40
    next(stream)  # the second pass does not count again
    assert w.shard_rows == 40


def _cfg(data: str, tmp: Path, **over) -> object:
    base = {
        "data": data,
        "model": {"kind": "retriever", "tiny": TINY, "dropout": 0.0, "temperature": 0.1},
        "loss": "softmax",
        "batch_size": 16,
        "epochs": 2,
        "max_steps_per_epoch": 12,
        "optim": {"lr": 0.003, "warmup_ratio": 0.0},
        "num_workers": 2,
        "storage_path": str(tmp / "runs"),
        "name": "t",
        "log_every": 5,
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return load_train_config(base)


# ---------------------------------------------------------------------------------------------
# in-process: every loss and freeze strategy trains


def _train_in_process(data: str, kind: str, loss_name: str, freeze: str, steps: int = 40) -> tuple[float, float, dict]:
    torch.manual_seed(0)
    tok = load_tokenizer("default")
    model = from_config(ModelConfig(kind=kind, tiny=TINY, dropout=0.0, temperature=0.1, freeze=freeze), tok)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    items = Catalogue.from_data_dir(data)
    rows = pads.dataset(f"{data}/examples/split=train").to_table().slice(0, 32).to_pylist()
    collate = model.collator(items, special_ids(tok), TrainSettings(loss_name, 4, 48, 0), tok, rank=0)
    batch = collate(rows)
    step = ScoreStep(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses_seen = []
    for _ in range(steps):
        own, inbatch = step(batch)
        loss = model.train_loss(loss_name, own, inbatch, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses_seen.append(float(loss.detach()))
    after = dict(model.named_parameters())
    moved = {n: not torch.equal(before[n], after[n]) for n in before}
    return losses_seen[0], losses_seen[-1], moved


@pytest.mark.parametrize("loss", ["bce", "softmax", "bpr", "lambdarank"])
@pytest.mark.parametrize("kind", ["ranker", "retriever"])
def test_each_loss_lowers_the_loss_on_a_fixed_batch(syn_data, kind, loss):
    first, last, _ = _train_in_process(syn_data, kind, loss, "none")
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("freeze", ["embeddings", "bottom:1", "encoder", "lora:4"])
def test_each_freeze_strategy_trains_only_what_it_should(syn_data, freeze):
    first, last, moved = _train_in_process(syn_data, "retriever", "softmax", freeze, steps=25)
    assert last < first
    if freeze == "embeddings":
        assert not any(m for n, m in moved.items() if ".embeddings." in n)
    if freeze == "bottom:1":
        assert not any(m for n, m in moved.items() if ".layer.0." in n or ".embeddings." in n)
        assert any(m for n, m in moved.items() if ".layer.1." in n)
    if freeze == "encoder":
        assert not any(m for n, m in moved.items() if n.startswith("encoder."))
        assert moved["head.weight"]
    if freeze == "lora:4":
        assert any(m for n, m in moved.items() if "lora_" in n)
        assert not any(m for n, m in moved.items() if n.startswith("encoder.") and "lora_" not in n)


# ---------------------------------------------------------------------------------------------
# config and data checks happen before Ray starts


def test_every_shipped_preset_validates():
    from recsys_ray.tune.config import load_sweep_file

    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.stem.startswith("tune-"):  # sweep configs: a `train:` base plus a `tune:` section
            assert load_sweep_file(path).tune.name == path.stem
            continue
        cfg = load_train_config(yaml.safe_load(path.read_text()))
        assert cfg.name == path.stem


def test_bad_config_lists_every_problem_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: hinge\nbatch_size: 0\nmodel: {freeze: 'bottom:x'}\nlearning_rate: 1\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train.py"), "--config", str(bad)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: invalid config:")
    for part in ("learning_rate: unknown key", "loss: expected one of"):
        assert part in line
    assert "Started a local Ray instance" not in proc.stderr
    with pytest.raises(ConfigError) as info:
        load_train_config({"batch_size": 0, "epochs": 0, "model": {"freeze": "bottom:x"}})
    assert len(info.value.problems) == 3
    with pytest.raises(ConfigError) as info:
        load_train_config({"early_stopping": {"metric": "auc", "patience": -1}})
    text = str(info.value)
    assert "early_stopping.metric: 'auc' is not a validation metric (one of ndcg@5" in text
    assert "early_stopping.patience" in text


def test_data_from_another_tokenizer_is_refused(syn_data, tmp_path):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "tok" / "vocab.txt"
    vocab.parent.mkdir()
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(str(vocab.parent))
    (vocab.parent / "config.json").write_text(json.dumps({"model_type": "bert"}))
    cfg = _cfg(syn_data, tmp_path, model={"encoder": str(vocab.parent)})
    with pytest.raises(DataError, match="was tokenized with 'default'"):
        plan(cfg)
    with pytest.raises(DataError, match="no manifest.json"):
        plan(_cfg(str(tmp_path), tmp_path))


# ---------------------------------------------------------------------------------------------
# Ray Train runs


def test_two_worker_run_learns_and_its_checkpoint_reloads_to_the_reported_scores(syn_data, tmp_path):
    cfg = _cfg(syn_data, tmp_path, epochs=3, max_steps_per_epoch=30, optim={"lr": 0.005})
    res = fit(cfg)
    m = res["metrics"]  # the best checkpoint's validation metrics, not the last report's
    assert res["final"]["global_step"] == 3 * res["steps_per_epoch"] == 90
    assert m["global_step"] == 30 * m["epoch"]
    # a planted structure: the tiny model beats random ranking of the ~140 unseen items (~0.07)
    assert m["hr@10"] > 10 / 150, m
    assert m["train_loss"] < math.log(16 + 16 * 4)  # below the loss of uniform scores
    ckpt = Path(res["best_checkpoint"])
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "train_state.safetensors").is_file()
    meta = json.loads((ckpt / "recsys_ray.json").read_text())
    assert m["ndcg@10"] == meta["extra"]["metrics"]["ndcg@10"]
    kept = [json.loads((c / "recsys_ray.json").read_text())["extra"]["metrics"] for c in Path(res["run"]).glob("checkpoint_*") if c.is_dir()]
    assert m["ndcg@10"] == max(k["ndcg@10"] for k in kept)
    assert meta["extra"]["data_fingerprint"] == json.loads((Path(syn_data) / "manifest.json").read_text())["fingerprint"]
    model = load_model(ckpt, map_location="cpu")
    tok = model.tokenizer
    again = validate(model, read_split_rows(syn_data, "valid"), Catalogue.from_data_dir(syn_data), special_ids(tok), torch.device("cpu"), cfg.eval_settings())
    assert again["ndcg@10"] == pytest.approx(meta["extra"]["metrics"]["ndcg@10"], abs=1e-9)
    assert not any(p.name.endswith(".pkl") or p.name.endswith(".pt") for p in ckpt.iterdir())
    # and the same architecture untrained ranks far worse
    torch.manual_seed(0)
    fresh = from_config(cfg.model, tok)
    untrained = validate(fresh, read_split_rows(syn_data, "valid"), Catalogue.from_data_dir(syn_data), special_ids(tok), torch.device("cpu"), cfg.eval_settings())
    print("hr@10 trained", m["hr@10"], "untrained", untrained["hr@10"])
    # measured alone: 0.135 vs 0.085; after the serving tests in one session it once reached only
    # 0.09 (same code, same seed: data order over the streaming split differs) - see the issue note
    assert m["ndcg@10"] > untrained["ndcg@10"] and m["hr@10"] > untrained["hr@10"], (m, untrained)


def test_early_stopping_ends_a_run_whose_validation_stops_improving(syn_data, tmp_path):
    """A learning rate of ~0 leaves validation flat: with patience 2 the run ends after epoch 3
    of 8 (epoch 1 sets the best, epochs 2 and 3 fail to beat it by min_delta), says so, and keeps
    a validated best checkpoint; the counter travels in the train state."""
    cfg = _cfg(syn_data, tmp_path, epochs=8, max_steps_per_epoch=2, num_workers=1, name="es",
               optim={"lr": 1e-12, "new_lr": 1e-12}, early_stopping={"patience": 2, "min_delta": 0.001})
    res = fit(cfg)
    final = res["final"]
    assert final["epoch"] == 3 and final["global_step"] == 6 and final["stopped_early"] is True, final
    assert res["metrics"]["epoch"] in (1, 2, 3) and res["metrics"]["ndcg@10"] > 0
    last = max((p for p in Path(res["run"]).glob("checkpoint_*") if p.is_dir()), key=lambda p: p.name)
    state = json.loads((last / "train_state.json").read_text())
    assert state["progress"]["early_stopping"]["bad_epochs"] == 2, state
    # the same command again resumes the run from that checkpoint and trains nothing more: a run
    # that ended itself stays ended (before, it went on to epoch 4 and stopped again)
    checkpoints = sorted(p.name for p in Path(res["run"]).glob("checkpoint_*"))
    again = fit(cfg)
    assert sorted(p.name for p in Path(again["run"]).glob("checkpoint_*")) == checkpoints
    assert again["best_checkpoint"] == res["best_checkpoint"], (again, res)
    assert (again["final"]["epoch"], again["final"]["global_step"]) in ((3, 6), (None, None)), again


# the hook travels to the Train workers by value: they cannot import this test module
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_a_train_worker_killed_from_outside_restarts_from_the_latest_checkpoint(syn_data, tmp_path, ray_session):
    """SIGKILL of a Train worker *process* (from outside, not an exception of ours) after the first
    mid-epoch checkpoint: Ray Train's FailureConfig restarts the group from that checkpoint by
    itself and the run ends as an uninterrupted one would: same steps, epochs and kind of final
    checkpoint. Mid-epoch checkpoints (every 5 steps) are reported unvalidated, never "best"."""
    from fault_helpers import alive_actor_pids

    cfg = _cfg(syn_data, tmp_path, epochs=2, max_steps_per_epoch=10, max_failures=1, name="ft",
               checkpoint_every_steps=5, keep_checkpoints=4)
    run_dir = tmp_path / "runs" / "ft"
    killed: dict = {}

    def kill_a_worker_after_the_first_checkpoint():
        # the controller lists a checkpoint in its snapshot once the report is registered (the
        # files appear earlier, while they are still being written)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not registered_checkpoints(run_dir):
            time.sleep(0.1)
        workers = alive_actor_pids("RayTrainWorker")
        if workers:
            os.kill(workers[-1], signal.SIGKILL)
            killed.update(pid=workers[-1], at=time.monotonic())

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    t0 = time.monotonic()
    res = fit(cfg, step_hooks=[SlowFirstRun(0.4)])
    killer.join(timeout=5)
    assert killed, "no Train worker process was found to kill"
    final = res["final"]
    print(f"FAULT train worker SIGKILL {killed['at'] - t0:.1f} s into the run: restarts {final['restarts']}, "
          f"resumed from step {final['resumed_from_step']}, ended at step {final['global_step']}, run {res['seconds']} s")
    assert final["restarts"] == 1 and final["resumed_from_step"] in (5, 10, 15), final
    assert res["final"]["global_step"] == 20 and res["final"]["epoch"] == 2
    snapshot = json.loads((Path(res["run"]) / "checkpoint_manager_snapshot.json").read_text())
    steps = {r["metrics"]["global_step"]: r["metrics"] for r in snapshot["checkpoint_results"]}
    assert sorted(steps) == [5, 10, 15, 20]
    assert all(steps[s]["ndcg@10"] == UNVALIDATED_SCORE and steps[s]["validated"] is False for s in (5, 15))
    assert res["metrics"]["global_step"] in (10, 20) and res["metrics"]["ndcg@10"] > 0
    assert resolve(res["run"]) == res["best_checkpoint"]
    # a new job with the same name continues from the latest checkpoint instead of step 0
    cfg2 = _cfg(syn_data, tmp_path, epochs=3, max_steps_per_epoch=10, name="ft")
    res2 = fit(cfg2)
    assert res2["final"]["global_step"] == 30 and res2["final"]["epoch"] == 3
    assert res2["final"]["restarts"] == 2 and res2["final"]["resumed_from_step"] == 20  # the run's record goes on
    # a corrupt checkpoint on resume is a clear error
    latest = max((p for p in Path(res2["run"]).glob("checkpoint_*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    (latest / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RecsysError, match="unreadable safetensors"):
        fit(_cfg(syn_data, tmp_path, epochs=4, max_steps_per_epoch=10, name="ft"))


def registered_checkpoints(run_dir: Path) -> list[dict]:
    try:
        return json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []


class SlowFirstRun:
    """A step hook: steps of the first attempt take ``seconds`` more, leaving a fault time to land."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, global_step: int, rank: int, resumed: bool) -> None:
        if not resumed:
            time.sleep(self.seconds)


def test_a_killed_training_driver_is_continued_by_the_same_command_from_s3(syn_data, tmp_path, ray_session, s3_server):
    """The driver of a job (``python jobs/train.py`` joined to the cluster, as ``ray job submit``
    runs it) is SIGKILLed after its first checkpoint reached ``s3://``; the same command again
    continues from that checkpoint and ends where an uninterrupted run ends. (A new job after a
    finished local run is the test above: the code path is the same, ``storage_path`` local.)"""
    import boto3

    from recsys_ray import storage

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="jobs")
    run = "s3://jobs/runs/driver-kill"
    cmd = [sys.executable, "jobs/train.py", "--config", "configs/tiny.yaml", "--set", f"data={syn_data}",
           "--set", "storage_path=s3://jobs/runs", "--set", "name=driver-kill", "--set", "epochs=2",
           "--set", "max_steps_per_epoch=15", "--set", "checkpoint_every_steps=5", "--set", "num_workers=1",
           "--set", "log_every=100"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    snapshot = storage.join(run, "checkpoint_manager_snapshot.json")
    try:
        while time.monotonic() - t0 < 240 and first.poll() is None:
            text = storage.read_text(snapshot)
            if text and json.loads(text)["checkpoint_results"]:
                break
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before it could be killed:\n" + first.stdout.read()[-2000:]
        first.send_signal(signal.SIGKILL)
        killed_at = time.monotonic() - t0
    finally:
        first.kill()
        first.wait(timeout=30)
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    final = summary["final"]
    print(f"FAULT train driver SIGKILL {killed_at:.1f} s in; the same command again: restarts {final['restarts']}, "
          f"resumed from step {final['resumed_from_step']}, ended at step {final['global_step']} ({summary['seconds']} s)")
    assert final["global_step"] == 30 and final["epoch"] == 2, final  # as an uninterrupted run
    assert final["restarts"] == 1 and final["resumed_from_step"] >= 5, final
    assert summary["best_checkpoint"].startswith(run + "/checkpoint_")


def test_missing_resources_end_the_job_instead_of_waiting_forever(syn_data, tmp_path, ray_session):
    with pytest.raises(RecsysError, match=r"2 workers need 2 GPU but the cluster offers 0 GPU \(waited 0 s"):
        wait_for_resources(_cfg(syn_data, tmp_path, use_gpu=True, resource_wait_s=0))
    wait_for_resources(_cfg(syn_data, tmp_path, resource_wait_s=0))  # 2 CPUs: there
    with pytest.raises(RecsysError, match="storage_path: cannot write"):
        (tmp_path / "a_file").write_text("x")
        fit(_cfg(syn_data, tmp_path, storage_path=str(tmp_path / "a_file" / "runs")))
