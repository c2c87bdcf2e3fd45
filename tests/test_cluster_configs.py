"""cluster/: every YAML loads, the launcher config passes Ray's own schema, the KubeRay manifests
have the shape KubeRay needs, and local-multinode.sh really brings up a 2-node cluster and tears
it down without touching any other Ray on the machine."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
LOCAL_SCRIPT = CLUSTER / "local-multinode.sh"

CLUSTER_YAMLS = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def ray_version() -> str:
    import ray

    return ray.__version__


def project_requirement_names() -> set[str]:
    """Distribution names in pyproject's dependencies, normalized (PEP 503), without extras."""
    with open(REPO / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return {normalize(d) for d in deps}


def normalize(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


# --------------------------------------------------------------------------- all YAML


def test_cluster_dir_has_the_expected_yaml_files():
    names = {p.relative_to(CLUSTER).as_posix() for p in CLUSTER_YAMLS}
    assert {
        "aws-gpu.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob-train.yaml",
        "kuberay/rayservice.yaml",
    } <= names


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_every_cluster_yaml_loads_to_a_mapping(path: Path):
    doc = load(path)
    assert isinstance(doc, dict) and doc, f"{path} is empty or not a mapping"


# --------------------------------------------------------------------------- AWS launcher


def ray_launcher_schema() -> dict:
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert schema_path.is_file(), f"Ray ships no launcher schema at {schema_path}"
    return json.loads(schema_path.read_text())


def test_aws_config_validates_against_rays_launcher_schema():
    jsonschema.validate(load(CLUSTER / "aws-gpu.yaml"), ray_launcher_schema())


def test_launcher_schema_check_is_not_vacuous():
    # The same validation must reject what `ray up` rejects, or the test above proves nothing.
    schema = ray_launcher_schema()
    for mutate in (
        lambda c: c["available_node_types"]["head"]["resources"].update(CPU=-1),
        lambda c: c.update(max_wokers=3),  # misspelt top-level key
        lambda c: c["available_node_types"]["gpu_1x"].update(min_workers="0"),
    ):
        cfg = load(CLUSTER / "aws-gpu.yaml")
        mutate(cfg)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(cfg, schema)


def test_aws_config_survives_rays_own_prepare_and_validate():
    # What `ray up` does offline before calling AWS: merge the provider defaults, check docker,
    # node-type min/max against max_workers. (Private API: ray.autoscaler._private.util.)
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(load(CLUSTER / "aws-gpu.yaml")))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_aws_head_takes_no_tasks_and_gpu_workers_autoscale_from_zero():
    cfg = load(CLUSTER / "aws-gpu.yaml")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert "GPU" not in head["resources"]

    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no worker type offers a GPU"
    for name, t in gpu_types.items():
        assert t.get("min_workers", 0) == 0, f"{name} keeps GPU nodes up while idle"
        assert t["max_workers"] >= 1, name
        assert re.match(r"(g|p)\d", t["node_config"]["InstanceType"]), name
    assert cfg["max_workers"] >= max(t["max_workers"] for t in gpu_types.values())


def test_aws_setup_installs_pinned_torch_then_the_synced_repo():
    cfg = load(CLUSTER / "aws-gpu.yaml")
    commands = cfg["setup_commands"]
    torch_at = next(i for i, c in enumerate(commands) if "pip install torch==2.13.0" in c)
    editable_at = next(i for i, c in enumerate(commands) if "pip install -e ." in c)
    assert torch_at < editable_at, "torch must be pinned before the project resolves its range"

    # The directory the editable install runs in is the one file_mounts fills with the repo.
    repo_mounts = [remote for remote, local in cfg["file_mounts"].items() if local in (".", "./")]
    assert len(repo_mounts) == 1
    assert f"cd {repo_mounts[0]}" in commands[editable_at]


def test_aws_image_and_start_commands_match_installed_ray_and_token_auth():
    cfg = load(CLUSTER / "aws-gpu.yaml")
    assert cfg["docker"]["image"] == f"rayproject/ray:{ray_version()}-py311-gpu"
    # Extra nodes only join a token-auth head when RAY_AUTH_MODE=token is set explicitly.
    assert any("RAY_AUTH_MODE=token ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any(
        "RAY_AUTH_MODE=token ray start --address=$RAY_HEAD_IP:6379" in c
        for c in cfg["worker_start_ray_commands"]
    )
    assert "~/.ray/auth_token" in cfg["file_mounts"]


# --------------------------------------------------------------------------- KubeRay


KUBERAY_KINDS = {
    "raycluster.yaml": "RayCluster",
    "rayjob-train.yaml": "RayJob",
    "rayservice.yaml": "RayService",
}


def ray_cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


@pytest.mark.parametrize("name,kind", sorted(KUBERAY_KINDS.items()))
def test_kuberay_manifest_kind_and_api_version(name: str, kind: str):
    doc = load(KUBERAY / name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    assert doc["metadata"]["name"]


@pytest.mark.parametrize("name", sorted(KUBERAY_KINDS))
def test_kuberay_cluster_spec_gpu_workers_autoscale_and_head_takes_no_tasks(name: str):
    spec = ray_cluster_spec(load(KUBERAY / name))
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["rayVersion"] == ray_version()

    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert not any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in containers(head))

    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if any(c["resources"]["limits"].get("nvidia.com/gpu", 0) >= 1 for c in containers(g))
    ]
    assert gpu_groups, f"{name}: no worker group with an nvidia.com/gpu limit"
    for g in gpu_groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        assert g["maxReplicas"] > g["minReplicas"], f"{g['groupName']} cannot scale"
        for c in containers(g):
            res = c["resources"]
            # Extended resources: Kubernetes rejects a GPU request that differs from the limit.
            assert res["requests"].get("nvidia.com/gpu") == res["limits"]["nvidia.com/gpu"]
            assert {"cpu", "memory"} <= res["requests"].keys() <= res["limits"].keys()

    for group in [head, *spec["workerGroupSpecs"]]:
        # map[string]string in the CRD: an unquoted number is rejected by the API server.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        for c in containers(group):
            assert c["image"] == f"rayproject/ray:{ray_version()}-py311-gpu"


def test_rayjob_runs_the_training_job_and_cleans_up():
    doc = load(KUBERAY / "rayjob-train.yaml")
    spec = doc["spec"]
    assert spec["entrypoint"] == "python jobs/train.py --config configs/gpu.yaml"
    script = spec["entrypoint"].split()[1]
    # jobs/train.py is the planned entry script; until it lands, the name itself is the contract.
    assert (REPO / script).is_file() or script == "jobs/train.py"
    assert spec["shutdownAfterJobFinishes"] is True


def runtime_envs() -> dict[str, dict]:
    job = load(KUBERAY / "rayjob-train.yaml")
    service = load(KUBERAY / "rayservice.yaml")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    return {
        "rayjob-train.yaml": yaml.safe_load(job["spec"]["runtimeEnvYAML"]),
        "rayservice.yaml": serve_config["applications"][0]["runtime_env"],
    }


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayservice.yaml"])
def test_kuberay_runtime_env_is_valid_and_matches_pyproject(name: str):
    from ray.runtime_env import RuntimeEnv

    env = runtime_envs()[name]
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert env["working_dir"].startswith("s3://") and env["working_dir"].endswith(".zip")
    packages = env["pip"]["packages"]
    assert "torch==2.13.0" in packages
    # The image provides Ray; everything else pyproject needs must be installed, and nothing more.
    wanted = project_requirement_names() - {"ray"}
    have = {normalize(p) for p in packages}
    assert have == wanted, (
        f"{name}: pip list out of step with pyproject.toml; "
        f"add {sorted(wanted - have)}, remove {sorted(have - wanted)}"
    )


def test_rayservice_serves_the_planned_app_from_an_s3_checkpoint():
    from ray.serve.schema import ServeDeploySchema

    doc = load(KUBERAY / "rayservice.yaml")
    raw = doc["spec"]["serveConfigV2"]
    assert isinstance(raw, str), "serveConfigV2 is a YAML string in the CRD, not a mapping"
    config = ServeDeploySchema.model_validate(yaml.safe_load(raw))
    (app,) = config.applications
    assert app.import_path == "recsys_ray.serve:build_app"
    assert app.args["checkpoint"].startswith("s3://")


# --------------------------------------------------------------------------- local multi-node


def script_env() -> dict[str, str]:
    """The test's environment minus anything that points at another Ray (e.g. the session's)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}
    }
    env["RAY_BIN"] = str(Path(sys.executable).parent / "ray")
    env["PYTHON"] = sys.executable
    return env


def run_script(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LOCAL_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=kw.pop("env", script_env()),
        **kw,
    )


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pids_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def is_running(pid: int) -> bool:
    """True while the process exists and is not a zombie (exited, not yet reaped by init)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_local_script_parses_and_rejects_unknown_commands():
    assert subprocess.run(["bash", "-n", str(LOCAL_SCRIPT)]).returncode == 0
    bad = run_script("sideways")
    assert bad.returncode == 2
    assert "unknown command 'sideways'" in bad.stderr


def test_local_down_leaves_a_directory_it_did_not_create():
    # `down` deletes its dir only when `up` marked it; a mistyped --dir must survive.
    with tempfile.TemporaryDirectory(prefix="rsr-", dir="/tmp") as d:
        keep = Path(d) / "precious.txt"
        keep.write_text("x")
        result = run_script("down", "--dir", d)
        assert result.returncode == 0, result.stderr
        assert "nothing running" in result.stderr
        assert keep.read_text() == "x"


DRIVER = """
import json
import ray

ray.init(logging_level="ERROR", log_to_driver=False)  # address and token from the environment
alive = [n for n in ray.nodes() if n["Alive"]]

@ray.remote(num_cpus=1)
def node_id():
    return ray.get_runtime_context().get_node_id()

placed = {r: ray.get(node_id.options(resources={r: 1}).remote()) for r in ("node_head", "node_worker_1")}
print(json.dumps({
    "nodes": [
        {"id": n["NodeID"], "custom": {k: v for k, v in n["Resources"].items() if k.startswith("node_")}}
        for n in alive
    ],
    "placed": placed,
}))
"""


@pytest.mark.slow
def test_local_multinode_up_connect_down():
    gcs_port, dash_port, client_port = free_ports(3)
    # Own short dir under /tmp (unix socket paths are capped), never the default /tmp/ray.
    cluster_dir = tempfile.mkdtemp(prefix="rsr-", dir="/tmp")
    ports = ["--port", str(gcs_port), "--dashboard-port", str(dash_port)]
    ports += ["--client-port", str(client_port), "--dir", cluster_dir]
    started_pids: list[int] = []
    try:
        up = run_script("up", "--workers", "1", "--timeout", "45", *ports, timeout=90)
        assert up.returncode == 0, f"up failed:\n{up.stdout}\n{up.stderr}"
        started_pids = [int(p.read_text()) for p in (Path(cluster_dir) / "pids").glob("*.pid")]
        assert len(started_pids) == 2

        exports = dict(re.findall(r"^export (\w+)=(\S+)$", up.stdout, re.M))
        assert exports["RAY_ADDRESS"] == f"127.0.0.1:{gcs_port}"
        assert exports["RAY_AUTH_MODE"] == "token"
        assert Path(exports["RAY_AUTH_TOKEN_PATH"]).stat().st_mode & 0o077 == 0

        # The driver runs in its own process: this pytest process may hold the session's Ray.
        driver = subprocess.run(
            [sys.executable, "-c", DRIVER],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tempfile.gettempdir(),
            env={**script_env(), **exports},
        )
        assert driver.returncode == 0, driver.stderr
        report = json.loads(driver.stdout.strip().splitlines()[-1])
        customs = sorted((n["custom"] for n in report["nodes"]), key=lambda c: sorted(c))
        assert customs == [{"node_head": 1.0}, {"node_worker_1": 1.0}]
        by_resource = {next(iter(n["custom"])): n["id"] for n in report["nodes"]}
        # Each node's own resource schedules work on that node and no other.
        assert report["placed"] == by_resource
        assert report["placed"]["node_head"] != report["placed"]["node_worker_1"]

        status = run_script("status", *ports)
        assert status.returncode == 0, status.stderr
        assert "head pid=" in status.stdout and "worker_1 pid=" in status.stdout
    finally:
        down = run_script("down", *ports, timeout=90)
        leftovers = pids_mentioning(cluster_dir)
        alive = [p for p in started_pids if is_running(p)]
        shutil.rmtree(cluster_dir, ignore_errors=True)
    assert down.returncode == 0, down.stderr
    assert "force-killing" not in down.stderr, down.stderr  # SIGTERM alone must stop a node
    assert not leftovers, f"processes of the test cluster still running: {leftovers}"
    assert not alive, f"node processes still running: {alive}"
    assert not Path(cluster_dir).exists() or not any(Path(cluster_dir).iterdir())
