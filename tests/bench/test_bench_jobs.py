"""The benchmark jobs take --config/--set like every other job and refuse bad config in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("job, bad, message", [
    ("bench_data.py", "sizes=[]", "sizes must be a non-empty list"),
    ("bench_train.py", "steps=0", "steps must be >= 1, got 0"),
    ("bench_serve.py", "duration_s=0", "duration_s must be > 0, got 0"),
    ("bench_gpu.py", "sections=[train, nope]", "sections: unknown 'nope'"),
    ("bench_ann.py", "sizes=[]", "sizes must be a non-empty list"),
])
def test_bench_jobs_refuse_bad_config_before_anything_runs(job, bad, message, tmp_path):
    (tmp_path / "extra.yaml").write_text("output: " + str(tmp_path / "out") + "\n")
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / job), "--config", str(tmp_path / "extra.yaml"),
                           "--set", bad], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: invalid config:") and message in line, line
    assert not (tmp_path / "out").exists()
