"""The training summary: the best checkpoint's metrics, not Ray Train's last report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from recsys_ray.train.driver import summary
from recsys_ray.train.report import format_summary

REPO = Path(__file__).resolve().parents[2]


def _result():
    def ckpt(path):
        return SimpleNamespace(path=path)

    e1 = {"ndcg@10": 0.30, "hr@10": 0.5, "epoch": 1, "global_step": 10, "protocol": "full"}
    e2 = {"ndcg@10": 0.20, "hr@10": 0.4, "epoch": 2, "global_step": 20, "protocol": "full", "train_loss": 1.5}
    # Ray Train V2: result.metrics is the LAST report; best_checkpoints lists the kept ones
    return SimpleNamespace(path="/runs/x", metrics=e2, checkpoint=ckpt("/runs/x/c2"),
                           best_checkpoints=[(ckpt("/runs/x/c2"), e2), (ckpt("/runs/x/c1"), e1)])


def test_the_summary_reports_the_best_checkpoint_and_where_the_run_ended(tmp_path):
    s = summary(_result(), {"steps_per_epoch": 10}, 12.34)
    assert s["best_checkpoint"] == "/runs/x/c1"
    assert s["metrics"]["ndcg@10"] == 0.30 and s["metrics"]["epoch"] == 1
    assert s["final"] == {"epoch": 2, "global_step": 20, "train_loss": 1.5, "samples_per_s": None,
                          "restarts": None, "resumed_from_step": None, "stopped_early": None}  # (a run of an older version)
    text = format_summary(s)
    assert "0.3000" in text and "0.2000" not in text and "epoch 2, step 20" in text
    assert "early stopping" not in text
    assert "epoch 2, step 20 (early stopping" in format_summary({**s, "final": {**s["final"], "stopped_early": True}})
    (tmp_path / "s.json").write_text("log line\n" + json.dumps(s) + "\n")
    best = subprocess.run([sys.executable, "-m", "recsys_ray.train.report", "--best-checkpoint", str(tmp_path / "s.json")],
                          capture_output=True, text=True, cwd=REPO, check=True)
    assert best.stdout.strip() == "/runs/x/c1"
