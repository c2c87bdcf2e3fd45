"""jobs/soup.py: the uniform model soup (recsys_ray/train/soup.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys_ray.data.catalogue import CATALOGUE_FILE
from recsys_ray.errors import ConfigError
from recsys_ray.model.kinds import load_model
from recsys_ray.predict import Predictor
from recsys_ray.train.soup import SoupSettings, soup

REPO = Path(__file__).resolve().parents[2]


def _ingredient(src: str, out: Path, seed: int, scale: float = 0.05, **train_config) -> str:
    """Another 'seed' of ``src``: its floating weights moved by seeded noise, saved like train saves."""
    model = load_model(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(scale * torch.randn(t.shape, generator=gen, dtype=t.dtype))
    extra = dict(model.extra)
    extra["train_config"] = {**extra.get("train_config", {}), "seed": seed, **train_config}
    model.save(out, extra=extra)
    shutil.copyfile(Path(src) / CATALOGUE_FILE, out / CATALOGUE_FILE)
    return str(out)


@pytest.fixture(scope="module")
def ingredients(checkpoints, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("soup")
    return [_ingredient(checkpoints["retriever"], root / f"s{s}", s) for s in (1, 2, 3)]


def test_the_soup_is_the_mean_of_its_ingredients_and_serves_like_a_checkpoint(ingredients, syn_data, tmp_path):
    out = tmp_path / "soup"
    summary = soup(SoupSettings(checkpoints=ingredients, output=str(out), data=syn_data))
    states = [load_model(p).state_dict() for p in ingredients]
    mixed = load_model(str(out)).state_dict()
    for k, v in mixed.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, sum(s[k] for s in states) / 3, rtol=0, atol=1e-6)
        else:
            assert torch.equal(v, states[0][k]), k
    assert summary["ingredients"] == ingredients and summary["train_config_differs"] == ["seed"]
    # validated: every ingredient and the soup, on the data's validation split
    rows = summary["validation"]
    assert [r["checkpoint"] for r in rows] == [*ingredients, str(out)]
    assert all(0.0 <= r["valid_ndcg@10"] <= 1.0 for r in rows)
    meta = json.loads((out / "recsys_ray.json").read_text())["extra"]
    assert meta["soup"]["seeds"] == [1, 2, 3] and meta["metrics"]["ndcg@10"] == rows[-1]["valid_ndcg@10"]
    assert not (out / "train_state.json").exists()  # not resumable, and says nothing it cannot
    # served like any checkpoint: the Predictor's scores are the soup model's own
    p = Predictor(retriever=str(out))
    rows, scores = p.recommend([p.user_inputs({"history": list(p.items.ids[:3])})], k=5, exclude=[[0, 1, 2]])[0]
    assert len(rows) == 5 and not {0, 1, 2} & set(rows.tolist()) and np.all(np.diff(scores) <= 0)


def test_ingredients_that_cannot_be_averaged_are_refused_with_the_reason(ingredients, checkpoints, tmp_path):
    def refused(paths, output=None) -> str:
        with pytest.raises(ConfigError) as err:
            soup(SoupSettings(checkpoints=paths, output=str(output or tmp_path / "out")))
        return str(err.value)

    assert "at least 2" in refused(ingredients[:1])
    assert "the same checkpoint twice" in refused([ingredients[0], ingredients[0]])
    assert "model_config differs" in refused([ingredients[0], checkpoints["ranker"]])
    # another catalogue: items dropped from the second ingredient's catalogue
    other = tmp_path / "other"
    shutil.copytree(ingredients[1], other)
    import pyarrow.parquet as pq

    table = pq.read_table(other / CATALOGUE_FILE)
    pq.write_table(table.slice(0, table.num_rows - 1), other / CATALOGUE_FILE)
    assert "is not" in refused([ingredients[0], str(other)]) and "catalogue" in refused([ingredients[0], str(other)])
    # refit and non-refit together
    refit = _ingredient(ingredients[0], tmp_path / "refit", 7, refit=True)
    assert "mix refit and non-refit" in refused([ingredients[0], refit])
    # a written checkpoint is not overwritten
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert "not empty" in refused(ingredients[:2], full)


def test_the_job_fails_with_one_line_on_bad_input(ingredients, tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "jobs" / "soup.py"), "--checkpoint", ingredients[0],
                          str(tmp_path / "missing"), "--output", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 2, res.stderr
    err = [line for line in res.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "missing" in err[0], res.stderr
    assert not (tmp_path / "o").exists()  # nothing written


def test_pick_last_takes_each_runs_latest_checkpoint_and_best_its_best(ingredients, tmp_path):
    from recsys_ray.train.soup import _pick

    runs = []
    for i in range(2):  # two run folders, each: a better early checkpoint and a latest one
        run = tmp_path / f"run{i}"
        run.mkdir()
        shutil.copytree(ingredients[0], run / "checkpoint_a")
        shutil.copytree(ingredients[1 + i], run / "checkpoint_b")
        results = [{"checkpoint_dir_name": "checkpoint_b", "metrics": {"ndcg@10": 0.1}},
                   {"checkpoint_dir_name": "checkpoint_a", "metrics": {"ndcg@10": 0.2}}]
        (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(
            {"checkpoint_results": results, "latest_checkpoint_result": results[0]}))
        runs.append(str(run))
    assert _pick(runs[0], "best").endswith("checkpoint_a") and _pick(runs[0], "last").endswith("checkpoint_b")
    summary = soup(SoupSettings(checkpoints=runs, output=str(tmp_path / "soup"), pick="last"))
    assert [Path(p).parent.name + "/" + Path(p).name for p in summary["ingredients"]] == [
        "run0/checkpoint_b", "run1/checkpoint_b"]
    with pytest.raises(ConfigError, match="the same checkpoint twice"):
        soup(SoupSettings(checkpoints=[runs[0], runs[0]], output=str(tmp_path / "soup2"), pick="last"))
    with pytest.raises(ConfigError, match="--pick 'first'"):
        soup(SoupSettings(checkpoints=runs, output=str(tmp_path / "soup3"), pick="first"))
