"""The two newcomer commands: what `make demo` and `make test` run (a dry run, nothing executes)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _dry_run(target: str) -> list[str]:
    out = subprocess.run(["make", "-n", "-W", "pyproject.toml", target], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    return [ln for ln in out.splitlines() if ".venv/bin/python" in ln and "pip" not in ln]


def test_demo_trains_the_cpu_preset_evaluates_once_and_prints_one_table():
    lines = _dry_run("demo")
    assert any("jobs/train.py --config configs/cpu.yaml" in ln for ln in lines)
    assert sum("jobs/evaluate.py" in ln for ln in lines) == 1  # it prints the table as it ends
    assert not any("-m recsys_ray.evaluate " in ln for ln in lines)  # ... and nothing prints it again
    assert "~8 min" in (REPO / "Makefile").read_text()  # the cpu preset's measured time (docs/quality.md)


def test_test_runs_pytest_and_ci_runs_make_test():
    assert any("-m pytest" in ln for ln in _dry_run("test"))
    assert "make test" in (REPO / ".ci" / "run").read_text()
