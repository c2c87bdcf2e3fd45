"""Scale-out on a simulated cluster: the data pipeline on 1, 2 and 3 nodes, Train on 1 vs 2 nodes.

    python jobs/bench_cluster.py                       # 1M events; nodes 1, 2, 3; 1 CPU per node
    python jobs/bench_cluster.py --set events=200000   # a quicker curve

Each point starts its own `cluster/local-multinode.sh` cluster (a head plus N-1 worker nodes of
`cpus_per_node` CPUs, on this machine) and submits the work with `ray job submit --working-dir .`,
as a user would:

- data: the same synthetic log (users = events / 10, 20k items, on local disk every node can
  read) prepared by ``python -m recsys_ray.bench.data --child ray`` (the data benchmark's own
  child: events/s and the job driver's peak RSS); the manifest says which node read what;
- train: on the last cluster, the `cluster-cpu` preset over that prepared log with 1 and with 2
  workers placed SPREAD (one per node), 2 epochs of `train_steps` steps; the second epoch's
  samples/s is quoted (the first includes start-up).

Ratios are within one run. On a laptop the "nodes" share its cores: a curve that flattens when
nodes outnumber cores is the machine, not the pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

from recsys_ray.bench.common import publish, work_dir
from recsys_ray.bench.data import generate
from recsys_ray.data import layout
from recsys_ray.errors import RecsysError
from recsys_ray.runtime import free_port_block

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "cluster" / "local-multinode.sh"


@dataclasses.dataclass
class BenchClusterConfig:
    """One scale-out run (jobs/bench_cluster.py --config/--set)."""

    RANGES: ClassVar[dict[str, str]] = {"events": ">= 1000", "cpus_per_node": ">= 1", "train_steps": ">= 1"}

    events: int = 1_000_000  # events in the synthetic log
    nodes: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 3])  # cluster sizes for the data curve
    cpus_per_node: int = 1  # CPUs each simulated node advertises
    train_steps: int = 20  # steps per epoch of the Train points (2 epochs; the second is quoted)
    seed: int = 0
    output: str = "artifacts/bench_cluster"  # logs, prepared data, results.json and results.md

    def problems(self) -> list[str]:
        if not self.nodes or min(self.nodes) < 1:
            return [f"nodes must be a non-empty list of integers >= 1, got {self.nodes}"]
        return []


class Cluster:
    """`local-multinode.sh up` on enter (its exports become this object's env), `down` on exit."""

    def __init__(self, nodes: int, cpus: int):
        self.nodes, self.cpus = nodes, cpus
        self.port = free_port_block()
        self.dir = f"/tmp/rr-bench-{self.port}"

    def __enter__(self) -> Cluster:
        up = subprocess.run([str(SCRIPT), "up", "--workers", str(self.nodes - 1), "--cpus-per-node", str(self.cpus),
                             "--port", str(self.port), "--dir", self.dir], capture_output=True, text=True, timeout=300)
        if up.returncode != 0:
            raise RecsysError(f"cluster of {self.nodes} nodes did not start: {up.stderr.strip().splitlines()[-1:]}")
        self.env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        for line in up.stdout.splitlines():
            if line.startswith("export "):
                for assignment in line[len("export "):].split():
                    key, _, value = assignment.partition("=")
                    self.env[key] = value
            elif line.startswith("unset "):
                for key in line[len("unset "):].split():
                    self.env.pop(key, None)
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run([str(SCRIPT), "down", "--port", str(self.port), "--dir", self.dir],
                       capture_output=True, text=True, timeout=120)

    def submit(self, *entrypoint: str, timeout: int = 3600) -> str:
        """``ray job submit --working-dir . -- ENTRYPOINT``; its output (a failed job raises)."""
        proc = subprocess.run(["ray", "job", "submit", "--working-dir", ".", "--", *entrypoint],
                              capture_output=True, text=True, cwd=REPO, env=self.env, timeout=timeout)
        out = proc.stdout + proc.stderr
        if proc.returncode != 0 or not re.search(r"Job '\S+' succeeded", out):
            raise RecsysError(f"job {' '.join(entrypoint)} failed on {self.nodes} nodes: {out.strip().splitlines()[-1:]}")
        return proc.stdout


def _last_json(text: str, prefix: str = "{") -> dict:
    lines = [ln[len(prefix) - 1:] if prefix != "{" else ln for ln in text.splitlines() if ln.startswith(prefix)]
    if not lines:
        raise RecsysError("the job printed no result line")
    return json.loads(lines[-1])


def data_point(cfg: BenchClusterConfig, source: Path, out: Path, nodes: int) -> dict:
    """The preparation of ``source`` on a fresh cluster of ``nodes`` nodes."""
    with Cluster(nodes, cfg.cpus_per_node) as cluster:
        text = cluster.submit("python", "-m", "recsys_ray.bench.data", "--child", "ray", "--source", str(source),
                              "--output", str(out), "--max-history", "10")
    res = _last_json(text, "RESULT {")
    manifest = layout.read_manifest(str(out))
    res.update(nodes=nodes, cpus=nodes * cfg.cpus_per_node, events_per_s=res["events"] / res["seconds"],
               rows_read_by_node=sorted(manifest["ray"]["rows_read_by_node"].values(), reverse=True))
    log.info("data on %d node(s): %.0f events/s, driver peak RSS %.0f MB", nodes, res["events_per_s"],
             res["driver_peak_rss_mb"])
    return res


def train_points(cfg: BenchClusterConfig, data: Path, out: Path) -> dict[str, dict]:
    """The `cluster-cpu` preset over ``data`` with 1 and 2 workers (SPREAD) on a 3-node cluster."""
    points = {}
    with Cluster(3, cfg.cpus_per_node) as cluster:
        for workers in (1, 2):
            text = cluster.submit(
                "python", "jobs/train.py", "--config", "configs/cluster-cpu.yaml", "--set", f"data={data}",
                "--set", f"storage_path={out / 'runs'}", "--set", f"name=w{workers}", "--set", f"num_workers={workers}",
                "--set", f"max_steps_per_epoch={cfg.train_steps}", "--set", "epochs=2", "--set", "log_every=1000")
            res = _last_json(text)
            points[f"{workers}w"] = {"workers": workers, "samples_per_s": res["final"]["samples_per_s"],
                                     "seconds": res["seconds"]}
            log.info("train, %d worker(s): %.1f samples/s", workers, res["final"]["samples_per_s"])
    return points


def results_markdown(res: dict) -> str:
    lines = [f"Command: `{res['command']}`  ", f"{res['date']}, {res['machine_cpus']} CPU cores, "
             f"{res['config']['cpus_per_node']} CPU per simulated node, {res['config']['events']:,} events.", "",
             "| nodes | CPUs | seconds | events/s | x 1 node | driver peak RSS (MB) | rows read per node |",
             "|---|---|---|---|---|---|---|"]
    base = res["data"][0]["events_per_s"]
    for r in res["data"]:
        lines.append(f"| {r['nodes']} | {r['cpus']} | {r['seconds']:.1f} | {r['events_per_s']:,.0f} | "
                     f"{r['events_per_s'] / base:.2f} | {r['driver_peak_rss_mb']:.0f} | "
                     f"{', '.join(f'{n:,}' for n in r['rows_read_by_node'])} |")
    t = res["train"]
    lines += ["", "| Train workers (SPREAD, one per node) | samples/s (epoch 2) | x 1 worker |", "|---|---|---|"]
    for r in t.values():
        lines.append(f"| {r['workers']} | {r['samples_per_s']:.1f} | {r['samples_per_s'] / t['1w']['samples_per_s']:.2f} |")
    return "\n".join(lines) + "\n"


def run_bench_cluster(cfg: BenchClusterConfig, command: str = "") -> dict:
    """Every point above; OUTPUT/results.json + results.md; returns the job's summary."""
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # set by Ray for a submitted job's driver
        raise RecsysError("jobs/bench_cluster.py starts its own clusters on this machine and submits to them: "
                          "run it with python, not under ray job submit")
    out = work_dir(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    source = generate(cfg.events, out / "logs", cfg.seed)
    data = [data_point(cfg, source, out / f"prepared-{n}n", n) for n in cfg.nodes]
    train = train_points(cfg, out / f"prepared-{cfg.nodes[-1]}n", out)
    res = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "machine_cpus": os.cpu_count(),
           "config": dataclasses.asdict(cfg), "data": data, "train": train,
           "ratios": {**{f"data_{r['nodes']}n_over_1n": r["events_per_s"] / data[0]["events_per_s"] for r in data},
                      "train_2w_over_1w": train["2w"]["samples_per_s"] / train["1w"]["samples_per_s"]}}
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown(res))
    return {"output": publish(cfg.output, out), "ratios": {k: round(v, 3) for k, v in res["ratios"].items()}}
