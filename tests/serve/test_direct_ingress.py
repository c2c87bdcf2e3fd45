"""Serve's direct ingress (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``, experimental in Ray 2.60) with the
shipped ``serve_configs/local.yaml``: the RetrieverAPI replica answers on its own HTTP port, with
the same answers as through the proxy, and :func:`recsys_ray.ray_compat.direct_ingress_urls`
finds it. Every Serve process reads the flag when it starts, so this runs in a Ray of its own
(a subprocess), not the session's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys
import ray, requests, yaml
from ray import serve
from recsys_ray import ray_compat
from recsys_ray.runtime import free_port
from recsys_ray.serve.app import deploy_config

config, history = yaml.safe_load(sys.argv[1]), json.loads(sys.argv[2])
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
port = free_port()
config["http_options"].update(host="127.0.0.1", port=port)
deploy_config(config, timeout_s=240)
urls = ray_compat.direct_ingress_urls(config["applications"][0]["name"])
body = {"user": {"history": history}, "k": 10}
out = {"urls": urls, "proxy_port": port}
for name, base in (("proxy", f"http://127.0.0.1:{port}"), ("direct", f"http://127.0.0.1:{urls[0].rsplit(':', 1)[1]}")):
    r = requests.post(f"{base}/v1/recommend", json=body, timeout=60)
    bad = requests.post(f"{base}/v1/recommend", json={"user": {"history": 3}}, timeout=60)
    out[name] = {"status": r.status_code, "items": [it["item_id"] for it in r.json()["items"]],
                 "timing": r.headers.get("Server-Timing", ""), "bad_status": bad.status_code}
serve.shutdown()
ray.shutdown()
print("RESULT " + json.dumps(out))
"""


def test_the_ingress_replica_answers_on_its_own_port_as_through_the_proxy(checkpoints, catalogue_ids):
    config = yaml.safe_load((ROOT / "serve_configs" / "local.yaml").read_text())
    args = config["applications"][0]["args"]
    args["checkpoint"] = checkpoints["retriever"]
    args.pop("demo_data", None)
    env = {**os.environ, "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, yaml.safe_dump(config), json.dumps(catalogue_ids[:12])],
                          capture_output=True, text=True, timeout=420, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert len(out["urls"]) == 1, out
    port = int(out["urls"][0].rsplit(":", 1)[1])
    assert 30000 <= port <= 31000 and port != out["proxy_port"], out
    for name in ("proxy", "direct"):
        assert out[name]["status"] == 200 and len(out[name]["items"]) == 10, out
        assert "retriever-model" in out[name]["timing"], out  # the app's own Server-Timing, on both paths
        assert out[name]["bad_status"] == 422, out  # bad input: the same 4xx without the proxy
    assert out["direct"]["items"] == out["proxy"]["items"]
