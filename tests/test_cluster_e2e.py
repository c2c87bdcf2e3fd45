"""The cluster path end to end: a simulated 3-node cluster with a local S3 server; prepare_data,
train (which loses a whole worker node mid-run and finishes on the two left) and tune submitted
with `ray job submit --working-dir .`, data / checkpoints / sweep results
/ reports in the bucket, Serve loading the checkpoint from S3. Assertions read the records the jobs
leave (the manifest, the checkpoint metadata), not timings. Loopback only; `down` must leave
nothing behind. (evaluate's S3 path runs in-process in tests/evaluate: a fourth job here would
add ~50 s of process start-up on 2 cores.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from recsys_ray.runtime import free_port_block, port_free

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "local-multinode.sh"
BUCKET = "e2e"
REPLICA_NODES = """
import json
import sys
from ray.util.state import list_actors
alive = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
print(json.dumps([a.node_id for a in alive if a.class_name == "ServeReplica:recsys:" + sys.argv[1]]))
"""


def _env_from(exports: str) -> dict[str, str]:
    env = dict(os.environ)
    for line in exports.splitlines():
        if line.startswith("export "):
            for assignment in line[len("export "):].split():
                key, _, value = assignment.partition("=")
                env[key] = value
        elif line.startswith("unset "):
            for key in line[len("unset "):].split():
                env.pop(key, None)
    env["PATH"] = f"{REPO / '.venv' / 'bin'}:{env['PATH']}"
    return env


def _submit(env: dict, *args: str, timeout: int = 300) -> dict:
    """`ray job submit --working-dir . -- python jobs/...`; the job's last JSON line."""
    t0 = time.monotonic()
    proc = subprocess.run(["ray", "job", "submit", "--working-dir", ".", "--", "python", *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    print(f"{args[0]}: {time.monotonic() - t0:.0f} s")  # shown with -s, and when the test fails
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and re.search(r"Job '\S+' succeeded", out), out[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, out[-4000:]
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    port = free_port_block()
    cdir = f"/tmp/rr-e2e-{port}"
    # 2 CPUs a node: when a node is lost, the two that are left still hold both Train workers
    # and a whole CPU for Ray Data's read tasks (see the node-loss test)
    up = subprocess.run([str(SCRIPT), "up", "--workers", "2", "--cpus-per-node", "2", "--s3", "--port", str(port),
                         "--dir", cdir],
                        capture_output=True, text=True, timeout=240)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        yield {"env": _env_from(up.stdout), "port": port, "dir": cdir}
    finally:
        down = subprocess.run([str(SCRIPT), "down", "--port", str(port), "--dir", cdir],
                              capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr[-2000:]
        # nothing of it is left: no process names its dir, the S3 server and the head are gone
        left = subprocess.run(["pgrep", "-f", cdir], capture_output=True, text=True).stdout.split()
        assert not left, left
        assert port_free(port) and port_free(port + 3) and not Path(cdir).exists()


def _s3(env: dict):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


@pytest.fixture(scope="module")
def prepared(cluster, tmp_path_factory):
    """A synthetic log of many parquet files (and a catalogue, and user profiles) in the bucket,
    prepared by ``jobs/prepare_data.py`` submitted to the cluster: its summary line."""
    from recsys_ray.data.config import SyntheticConfig
    from recsys_ray.data.synthetic import write_synthetic

    env, src = cluster["env"], tmp_path_factory.mktemp("src")
    s3 = _s3(env)
    s3.create_bucket(Bucket=BUCKET)
    write_synthetic(SyntheticConfig(num_users=192, num_items=150, num_events=4000, shard_users=24), 0, src)
    for path in src.rglob("*.parquet"):
        s3.upload_file(str(path), BUCKET, f"logs/{path.relative_to(src)}")
    shutil.rmtree(src, ignore_errors=True)
    return _submit(env, "jobs/prepare_data.py", "--dataset", f"s3://{BUCKET}/logs/events/",
                   "--set", f"items=s3://{BUCKET}/logs/items.parquet", "--set", f"users=s3://{BUCKET}/logs/users/",
                   "--set", "columns.event=event", "--set", "item_text_columns=[title, description]",
                   "--set", "user_profile_columns=[age, country]", "--output", f"s3://{BUCKET}/prepared")


@pytest.mark.slow
def test_jobs_on_a_three_node_cluster_with_s3(cluster, prepared, tmp_path):
    env = cluster["env"]
    s3 = _s3(env)
    prep = prepared
    assert prep["output"] == f"s3://{BUCKET}/prepared" and prep["rows_read"] == 4000 and prep["users"] == 192
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key="prepared/manifest.json")["Body"].read())
    by_node = manifest["ray"]["rows_read_by_node"]
    assert manifest["ray"]["nodes"] == 3 and len(by_node) > 1 and sum(by_node.values()) == 4000, by_node

    # training loses a worker node and finishes on the two that are left
    train = _train_losing_a_node(cluster, s3)
    best = train["best_checkpoint"]
    assert best.startswith(f"s3://{BUCKET}/runs/cluster-cpu/checkpoint_"), train
    key = best.removeprefix(f"s3://{BUCKET}/")
    files = {o["Key"].rsplit("/", 1)[-1] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=key + "/")["Contents"]}
    assert {"model.safetensors", "train_state.safetensors", "recsys_ray.json", "items.parquet"} <= files
    assert not any(f.endswith((".pkl", ".pt", ".bin")) for f in files)
    workers = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{key}/recsys_ray.json")["Body"].read())["extra"]["workers"]
    assert len({w["node"] for w in workers}) == 2, workers  # SPREAD: two workers, two nodes (of the two left)
    assert sum(w["shard_rows"] for w in workers) == 192, workers  # disjoint shards covering the split

    sweep = _submit(env, "jobs/tune.py", "--config", "configs/tune-tiny.yaml",
                    "--set", f"train.data=s3://{BUCKET}/prepared", "--set", f"tune.storage_path=s3://{BUCKET}/tune",
                    "--set", "tune.num_samples=1", "--set", "tune.scheduler=fifo", "--set", "train.epochs=1",
                    "--set", "train.max_steps_per_epoch=5")
    assert sweep["trials"]["completed"] == 1 and sweep["report"] == f"s3://{BUCKET}/tune/tune-tiny/report/report.md"
    s3.head_object(Bucket=BUCKET, Key="tune/tune-tiny/report/report.md")


    # Serve on the cluster, the checkpoint loaded from S3 by each replica
    config = yaml.safe_load((REPO / "serve_configs" / "local.yaml").read_text())
    http_port = free_port_block(1)
    config["http_options"]["port"] = http_port
    app = config["applications"][0]
    app["args"].update(checkpoint=f"s3://{BUCKET}/runs/cluster-cpu", popularity_weight=0.0)
    app["args"].pop("demo_data")  # local.yaml's demo page reads make demo's data, not this test's
    # the deployment that holds the retriever (local.yaml: the ingress itself, RetrieverAPI)
    (holder,) = [d for d in app["deployments"] if d["name"] in ("Retriever", "RetrieverAPI")]
    holder.update(num_replicas=2, ray_actor_options={"num_cpus": 0.25})
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    dashboard = env["RAY_API_SERVER_ADDRESS"]
    deploy = subprocess.run(["serve", "deploy", str(tmp_path / "serve.yaml"), "-a", dashboard],
                            capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert deploy.returncode == 0, deploy.stderr[-2000:]
    try:
        deadline, ready = time.monotonic() + 180, None
        while time.monotonic() < deadline:
            try:
                ready = requests.get(f"http://127.0.0.1:{http_port}/readyz", timeout=5)
                if ready.status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(2)
        assert ready is not None and ready.status_code == 200, ready.text if ready is not None else "no answer"
        info = ready.json()["models"]["retriever"]
        assert info["checkpoint"] == f"s3://{BUCKET}/runs/cluster-cpu" and info["resolved"] == best, info
        rec = requests.post(f"http://127.0.0.1:{http_port}/v1/recommend", timeout=30,
                            json={"user": {"history": ["i1", "i2"]}, "k": 3})
        assert rec.status_code == 200 and len(rec.json()["items"]) == 3, rec.text
        # the two replicas holding the retriever run on two nodes (the cluster's State API says where), once
        # Serve reports both running (readiness needs one)
        deadline, states = time.monotonic() + 120, {}
        while time.monotonic() < deadline:
            status = subprocess.run(["serve", "status", "-a", dashboard], capture_output=True, text=True,
                                    env=env, timeout=60)
            apps = (yaml.safe_load(status.stdout) or {}).get("applications") or {}
            states = ((apps.get("recsys") or {}).get("deployments") or {}).get(holder["name"], {}).get("replica_states") or {}
            if states.get("RUNNING") == 2:
                break
            time.sleep(2)
        assert states.get("RUNNING") == 2, states
        where = subprocess.run(["python", "-c", REPLICA_NODES, holder["name"]], capture_output=True, text=True, env=env, timeout=120)
        nodes = json.loads(where.stdout.strip().splitlines()[-1])
        assert len(nodes) == 2 and len(set(nodes)) == 2, (nodes, where.stderr[-1000:])
    finally:
        subprocess.run(["serve", "shutdown", "-a", dashboard, "-y"], capture_output=True, env=env, timeout=120)


TRAIN_NODES = """
import json
import ray
from ray._private import state
ray.init(logging_level="ERROR", log_to_driver=False)
name = {n["NodeID"]: next((r[len("node_"):] for r in n["Resources"] if r.startswith("node_")), "?") for n in ray.nodes()}
print(json.dumps(sorted(name.get(a["Address"]["NodeID"], "?") for a in state.actors().values()
                        if a["State"] == "ALIVE" and a["ActorClassName"].startswith("RayTrainWorker"))))
"""



def _train_losing_a_node(cluster: dict, s3) -> dict:
    """``jobs/train.py`` of the cluster preset, submitted; a whole worker *node* (its raylet,
    object store, agents and the Train worker on it) is SIGKILLed at once after the run's first
    checkpoint reached S3, as when a machine is lost.
    FailureConfig restarts the worker group on the nodes that are left, from that checkpoint, and
    the job ends as an uninterrupted one would: same steps, epochs and kind of final checkpoint.
    The nodes have 2 CPUs: the new group takes one on each node that is left and Ray Data's read
    tasks (1 CPU each) the other. (With 1-CPU nodes and 0.5-CPU workers the restarted run hangs
    silently: no node has a whole CPU for the read tasks; found by this test.)"""
    env = cluster["env"]
    run = "runs/cluster-cpu"
    cmd = ["ray", "job", "submit", "--working-dir", ".", "--", "python", "jobs/train.py",
           "--config", "configs/cluster-cpu.yaml", "--set", f"data=s3://{BUCKET}/prepared",
           "--set", f"storage_path=s3://{BUCKET}/runs", "--set", "epochs=2",
           "--set", "batch_size=4", "--set", "checkpoint_every_steps=5", "--set", "max_failures=1",
           "--set", "log_every=100"]
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0, killed = time.monotonic(), None
    try:
        while time.monotonic() - t0 < 240 and job.poll() is None:
            try:
                snap = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{run}/checkpoint_manager_snapshot.json")["Body"].read())
                if snap["checkpoint_results"]:
                    break
            except s3.exceptions.NoSuchKey:
                pass
            time.sleep(0.2)
        assert job.poll() is None, "the run ended before a node could be lost:\n" + job.stdout.read()[-3000:]
        where = subprocess.run([sys.executable, "-c", TRAIN_NODES], capture_output=True, text=True, env=env, timeout=60)
        nodes = json.loads(where.stdout.strip().splitlines()[-1])
        victims = [n for n in nodes if n.startswith("worker_")]
        assert len(nodes) == 2 and victims, (nodes, where.stderr[-1000:])
        lost = subprocess.run([str(SCRIPT), "kill", victims[0], "--dir", cluster["dir"], "--port", str(cluster["port"])],
                              capture_output=True, text=True, timeout=30)
        assert lost.returncode == 0, lost.stderr
        killed = time.monotonic() - t0
        out, _ = job.communicate(timeout=400)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait(timeout=30)
    assert job.returncode == 0 and re.search(r"Job '\S+' succeeded", out), out[-4000:]
    summary = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    final = summary["final"]
    print(f"FAULT worker node {victims[0]} SIGKILLed {killed:.1f} s into the job: restarts {final['restarts']}, "
          f"resumed from step {final['resumed_from_step']}, ended at step {final['global_step']} "
          f"({time.monotonic() - t0:.0f} s in all)")
    assert final["restarts"] == 1 and final["resumed_from_step"] >= 5, final
    assert final["global_step"] == 2 * summary["steps_per_epoch"] and final["epoch"] == 2, summary
    assert re.search(r"resumed from the checkpoint of step \d+", out), out[-4000:]  # the log says so
    best = summary["best_checkpoint"]
    assert best.startswith(f"s3://{BUCKET}/{run}/checkpoint_"), summary
    key = best.removeprefix(f"s3://{BUCKET}/")
    meta = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{key}/recsys_ray.json")["Body"].read())
    assert meta["extra"]["metrics"]["validated"] is True and len(meta["extra"]["workers"]) == 2, meta["extra"]
    return summary
