"""Training state round trips: a resumed run continues bit for bit, and nothing is pickled."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from recsys_ray.checkpoint import (
    STATE_JSON,
    STATE_TENSORS,
    UNVALIDATED_SCORE,
    best_checkpoint,
    latest_result,
    load_train_state,
    resolve,
    save_train_state,
)
from recsys_ray.errors import RecsysError

PROGRESS = {"global_step": 3, "epoch": 1, "step_in_epoch": 1, "best": (0.25, "ndcg@10")}


def _model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    # dropout draws from the global torch stream, so a resume is exact only if RNG is restored
    return nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.3), nn.ReLU(), nn.Linear(8, 1))


def _adamw(model: nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)


def _sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)


def _warmup_linear(step: int, warmup: int = 2, total: int = 10) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / (total - warmup))


def _scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, _warmup_linear)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)  # fixed inputs, independent of the global stream
    return [(torch.randn(5, 6, generator=g), torch.randn(5, 1, generator=g)) for _ in range(n)]


def _train(model, opt, sched, batches) -> None:
    for x, y in batches:
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()


def _reseed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _assert_params_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def _saved_run(tmp_path, make_opt, with_scheduler=True):
    """3 steps, save, 3 more steps; returns what a resume needs and what it must reproduce."""
    _reseed(0)
    batches = _batches(6)
    model = _model(0)
    opt = make_opt(model)
    sched = _scheduler(opt) if with_scheduler else None
    _train(model, opt, sched, batches[:3])
    params_at_save = {k: v.clone() for k, v in model.state_dict().items()}
    lr_at_save = sched.get_last_lr() if sched else None
    save_train_state(tmp_path, opt, sched, PROGRESS)
    # SGD updates its momentum buffers in place: snapshot them before training on
    state_at_save = {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()}
    _train(model, opt, sched, batches[3:])
    final = {k: v.clone() for k, v in model.state_dict().items()}
    final_lr = sched.get_last_lr() if sched else None
    return batches, params_at_save, lr_at_save, final, final_lr, state_at_save


def _fresh(params, make_opt, with_scheduler=True):
    model = _model(1)  # other init, then the saved weights, as a new process would
    model.load_state_dict(params)
    opt = make_opt(model)
    return model, opt, _scheduler(opt) if with_scheduler else None


def test_adamw_lambdalr_resume_is_bit_identical(tmp_path):
    batches, params_at_save, lr_at_save, final, final_lr, _ = _saved_run(tmp_path, _adamw)
    assert not torch.equal(final["0.weight"], params_at_save["0.weight"])  # training moved on

    _reseed(123)  # a new process starts from other RNG streams
    model, opt, sched = _fresh(params_at_save, _adamw)
    progress = load_train_state(tmp_path, opt, sched)

    assert progress == PROGRESS
    assert isinstance(progress["best"], tuple)
    assert sched.get_last_lr() == lr_at_save
    assert sched.last_epoch == 3
    assert [g["lr"] for g in opt.param_groups] == lr_at_save
    betas = opt.param_groups[0]["betas"]
    assert betas == (0.8, 0.95) and isinstance(betas, tuple)
    assert opt.state[opt.param_groups[0]["params"][0]]["step"].item() == 3.0

    _train(model, opt, sched, batches[3:])
    _assert_params_equal(model, final)
    assert sched.get_last_lr() == final_lr


def test_resume_without_state_diverges(tmp_path):
    """Control for the test above: a fresh optimizer, schedule and RNG do not reproduce the run."""
    batches, params_at_save, _, final, _, _ = _saved_run(tmp_path, _adamw)
    _reseed(123)
    model, opt, sched = _fresh(params_at_save, _adamw)
    _train(model, opt, sched, batches[3:])
    assert not torch.equal(model.state_dict()["0.weight"], final["0.weight"])


def test_files_hold_tensors_and_json_apart(tmp_path):
    _saved_run(tmp_path, _adamw)
    with safe_open(str(tmp_path / STATE_TENSORS), framework="pt") as f:
        keys = set(f.keys())
        step = f.get_tensor("optimizer.state.0.step")
    assert {"optimizer.state.0.exp_avg", "optimizer.state.0.exp_avg_sq", "rng.torch"} <= keys
    assert step.item() == 3.0
    doc = json.loads((tmp_path / STATE_JSON).read_text())
    assert doc["format_version"] == 1
    assert doc["torch_version"] == torch.__version__
    assert doc["optimizer"]["param_groups"][0]["weight_decay"] == 0.1
    assert not list(tmp_path.glob(".train_state.*"))  # no temp files left behind


def test_sgd_momentum_round_trip_without_scheduler(tmp_path):
    batches, params_at_save, _, final, _, state_at_save = _saved_run(
        tmp_path, _sgd, with_scheduler=False)

    _reseed(123)
    model, opt, _ = _fresh(params_at_save, _sgd, with_scheduler=False)
    assert load_train_state(tmp_path, opt, None) == PROGRESS
    state = opt.state_dict()
    assert state["param_groups"][0]["momentum"] == 0.9
    assert state["param_groups"][0]["nesterov"] is True
    assert state["state"].keys() == state_at_save.keys() == {0, 1, 2, 3}
    for i, saved in state_at_save.items():
        assert saved["momentum_buffer"].abs().sum() > 0
        assert torch.equal(state["state"][i]["momentum_buffer"], saved["momentum_buffer"])

    _train(model, opt, None, batches[3:])
    _assert_params_equal(model, final)


def test_rng_streams_continue_after_load(tmp_path):
    model = _model(0)
    opt = _adamw(model)
    _reseed(5)
    random.gauss(0.0, 1.0)  # leaves a cached gaussian in both generators: a non-None gauss_next
    np.random.randn(1)
    save_train_state(tmp_path, opt, None, {})
    expected = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0.0, 1.0),
                np.random.randn(1))

    _reseed(99)
    assert load_train_state(tmp_path, opt, None) == {}
    got = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0.0, 1.0),
           np.random.randn(1))
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]
    assert got[3] == expected[3]
    np.testing.assert_array_equal(got[4], expected[4])


def test_no_pickle_on_save_or_load(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    for name in ("dump", "dumps", "load", "loads"):
        monkeypatch.setattr(pickle, name, forbidden)
    for module in (torch, torch.serialization):
        monkeypatch.setattr(module, "save", forbidden)
        monkeypatch.setattr(module, "load", forbidden)

    model = _model(0)
    opt = _adamw(model)
    sched = _scheduler(opt)
    _train(model, opt, sched, _batches(2))
    save_train_state(tmp_path, opt, sched, PROGRESS)

    fresh = _model(0)
    opt2 = _adamw(fresh)
    sched2 = _scheduler(opt2)
    assert load_train_state(tmp_path, opt2, sched2) == PROGRESS
    exp_avg = opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], exp_avg)


def _corrupt_tensors(path):
    (path / STATE_TENSORS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")


def _truncate_tensors(path):
    data = (path / STATE_TENSORS).read_bytes()
    (path / STATE_TENSORS).write_bytes(data[: len(data) // 2])


def _corrupt_json(path):
    (path / STATE_JSON).write_text('{"format_version": 1, "optim')


def _remove_json(path):
    (path / STATE_JSON).unlink()


def _future_version(path):
    doc = json.loads((path / STATE_JSON).read_text())
    doc["format_version"] = 2
    (path / STATE_JSON).write_text(json.dumps(doc))


def _mix_saves(path):
    """JSON from one save, tensors from another: what a crash between the two renames leaves."""
    model = _model(0)
    opt = _adamw(model)
    save_train_state(path / "other", opt, None, {})
    (path / "other" / STATE_TENSORS).replace(path / STATE_TENSORS)


@pytest.mark.parametrize("damage", [_corrupt_tensors, _truncate_tensors, _corrupt_json,
                                    _remove_json, _future_version, _mix_saves])
def test_damaged_state_raises_and_changes_nothing(tmp_path, damage):
    _saved_run(tmp_path, _adamw)
    damage(tmp_path)
    model = _model(1)
    opt = _adamw(model)
    sched = _scheduler(opt)
    with pytest.raises(RecsysError) as err:
        load_train_state(tmp_path, opt, sched)
    assert str(tmp_path) in str(err.value)
    assert "\n" not in str(err.value)
    assert opt.state_dict()["state"] == {}
    assert sched.last_epoch == 0


def test_missing_directory_raises(tmp_path):
    opt = _adamw(_model(0))
    with pytest.raises(RecsysError, match="not found") as err:
        load_train_state(tmp_path / "nope", opt, None)
    assert str(tmp_path / "nope") in str(err.value)


def test_state_of_another_model_raises(tmp_path):
    _saved_run(tmp_path, _adamw)
    other = nn.Linear(6, 1)  # 2 parameters where the saved optimizer had 4
    with pytest.raises(RecsysError, match="does not fit"):
        load_train_state(tmp_path, _adamw(other), None)


def test_scheduler_asked_for_but_not_saved_raises(tmp_path):
    _saved_run(tmp_path, _sgd, with_scheduler=False)
    opt = _sgd(_model(0))
    with pytest.raises(RecsysError, match="no scheduler state"):
        load_train_state(tmp_path, opt, _scheduler(opt))


# ---------------------------------------------------------------------------------------------
# which checkpoint a run means


def _run(tmp_path, results: list[tuple[str, dict]], latest: str | None = None):
    run = tmp_path / "run"
    for name, _ in results:
        (run / name).mkdir(parents=True, exist_ok=True)
        (run / name / "model.safetensors").write_bytes(b"x")
    doc = {"checkpoint_results": [{"version": 0, "checkpoint_dir_name": n, "metrics": m} for n, m in results]}
    if latest:
        doc["latest_checkpoint_result"] = {"checkpoint_dir_name": latest, "metrics": dict(results)[latest]}
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(doc))
    return run


def test_best_checkpoint_ties_go_to_the_later_report_and_unvalidated_ones_lose(tmp_path):
    # Ray's list: worst first, equal scores in report order (its `version` field is always 0)
    results = [("checkpoint_mid", {"ndcg@10": UNVALIDATED_SCORE, "validated": False, "global_step": 15}),
               ("checkpoint_e1", {"ndcg@10": 0.25, "global_step": 10}),
               ("checkpoint_e2", {"ndcg@10": 0.25, "global_step": 20}),
               ("checkpoint_none", {"ndcg@10": None, "global_step": 25})]  # JSON null: not a score
    assert best_checkpoint(results)[0] == "checkpoint_e2"
    assert best_checkpoint(results[:1])[0] == "checkpoint_mid"
    run = _run(tmp_path, results, latest="checkpoint_none")
    assert resolve(str(run)) == str(run / "checkpoint_e2")
    assert resolve(str(run / "checkpoint_e1")) == str(run / "checkpoint_e1")
    assert latest_result(str(run))["checkpoint_path"] == str(run / "checkpoint_none")


def test_a_folder_without_checkpoints_is_refused(tmp_path):
    with pytest.raises(RecsysError, match="neither a checkpoint nor a run directory"):
        resolve(str(tmp_path))
