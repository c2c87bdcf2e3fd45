"""Security defaults that must not silently change: weights only through safetensors (nothing a
user can swap is unpickled), request strings never reach a filesystem call, local configs bind
to 127.0.0.1, prod configs check API keys, Ray's token authentication is never switched off."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(REPO / "recsys_ray").rglob("*.py"), *(REPO / "jobs").glob("*.py")])
# what would deserialize code or objects from a file: torch.load (pickle unless weights_only),
# pickle / dill / joblib / cloudpickle loads, numpy's allow_pickle, yaml's unsafe loaders
UNSAFE = re.compile(
    r"torch\.load\(|\bpickle\.loads?\(|\bdill\.|\bjoblib\.load|cloudpickle\.loads?\(|allow_pickle\s*=\s*True"
    r"|yaml\.load\((?![^)]*SafeLoader)|yaml\.unsafe_load|yaml\.full_load"
)


def test_no_source_file_unpickles_or_loads_unsafe_yaml():
    hits = [f"{p.relative_to(REPO)}:{n}: {line.strip()}"
            for p in SOURCES for n, line in enumerate(p.read_text().splitlines(), 1)
            if UNSAFE.search(line) and not line.lstrip().startswith("#")]
    assert not hits, "\n".join(hits)


def test_the_pattern_itself_catches_what_it_should():
    for bad in ("state = torch.load(path)", "pickle.load(f)", "np.load(p, allow_pickle=True)", "yaml.load(text)"):
        assert UNSAFE.search(bad), bad
    for fine in ("load_file(path)", "yaml.safe_load(text)", "safe_open(p)", "json.loads(s)"):
        assert not UNSAFE.search(fine), fine


def test_request_strings_never_reach_a_filesystem_call(checkpoints, catalogue_ids):
    """Every file-system call made while the routes answer hostile requests (audit events: open,
    listdir, scandir, remove, rename, mkdir, ...) is checked for the request's strings."""
    from fastapi.testclient import TestClient

    from recsys_ray.bench.serve_plain import build_plain_app
    from recsys_ray.serve.api import AppArgs

    app, _ = build_plain_app(AppArgs(checkpoint=checkpoints["retriever"], ranker_checkpoint=checkpoints["ranker"],
                                     device="cpu"))
    client = TestClient(app, raise_server_exceptions=False)
    marker = "ZZsecretZZ"
    hostile = [f"../../../../etc/{marker}", f"/tmp/{marker}", f"s3://bucket/{marker}", f"{marker}\x00.parquet",
               f"file:///{marker}", f"~/{marker}"]
    seen: list[tuple[str, str]] = []
    watching = {"on": False}

    def hook(event: str, args: tuple) -> None:
        if watching["on"] and (event == "open" or event.startswith(("os.", "shutil.", "glob."))):
            if any(marker in str(a) for a in args):
                seen.append((event, str(args)[:200]))

    sys.addaudithook(hook)  # cannot be removed: it only records while watching
    watching["on"] = True
    try:
        statuses = set()
        for s in hostile:
            for route, body in (
                ("/v1/score", {"user": {"history": [s], "profile": {s: s}}, "item_ids": [catalogue_ids[0], s]}),
                ("/v1/score", {"user": {"profile": s}, "texts": [s]}),
                ("/v1/recommend", {"user": {"history": [catalogue_ids[0], s], "profile": {"city": s}}, "k": 3}),
                ("/v1/recommend", {"user": {"history": [catalogue_ids[1]], "profile": s}, "k": 2}),
            ):
                statuses.add(client.post(route, json=body).status_code)
    finally:
        watching["on"] = False
    assert not seen, seen
    assert statuses <= {200, 422} and 200 in statuses and 422 in statuses, statuses  # served and refused


def test_local_configs_bind_to_loopback_and_prod_checks_api_keys():
    for name in ("local.yaml", "local-ranker.yaml"):
        doc = yaml.safe_load((REPO / "serve_configs" / name).read_text())
        assert doc["http_options"]["host"] == "127.0.0.1", name
    prod = yaml.safe_load((REPO / "serve_configs/prod.yaml").read_text())
    args = prod["applications"][0]["args"]
    assert prod["http_options"]["host"] == "0.0.0.0" and (args.get("api_keys_env") or args.get("api_keys_file"))
    service = yaml.safe_load((REPO / "cluster/kuberay/rayservice.yaml").read_text())
    served = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert served.get("api_keys_file") or served.get("api_keys_env")
    assert service["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"
    script = (REPO / "cluster/local-multinode.sh").read_text()
    assert "--dashboard-host=127.0.0.1" in script and "0.0.0.0" not in script


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO).as_posix() for p in [
    *(REPO / "cluster").rglob("*.yaml"), *(REPO / ".ci").glob("*"), *(REPO / "serve_configs").glob("*.yaml"),
    *(REPO / "configs").glob("*.yaml"), REPO / "Makefile"]))
def test_ray_token_authentication_is_never_switched_off(path):
    text = (REPO / path).read_text()
    assert not re.search(r"RAY_AUTH_MODE\s*[=:]\s*['\"]?(disabled|none|off)", text, re.I), path
    assert not re.search(r"mode:\s*(disabled|none)\b", text), path


def test_the_local_cluster_script_turns_token_authentication_on_unless_told_otherwise():
    script = (REPO / "cluster/local-multinode.sh").read_text()
    assert '"${RAY_AUTH_MODE:-token}"' in script  # on by default; RAY_AUTH_MODE=disabled is the opt-out
    assert "umask 077" in script and "secrets.token_hex(32)" in script  # a fresh token, owner-only
