"""The two newcomer commands: what `make demo` and `make test` run (a dry run, nothing executes)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _dry_run(target: str) -> list[str]:
    out = subprocess.run(["make", "-n", "-W", "pyproject.toml", target], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    return [ln for ln in out.splitlines() if ".venv/bin/python" in ln and "pip" not in ln]


def test_demo_trains_the_search_preset_and_evaluates_both_routes_once_each():
    lines = _dry_run("demo")
    assert any("jobs/prepare_data.py" in ln and "queries=metadata" in ln for ln in lines)
    assert any("jobs/train.py --config configs/cpu-search.yaml" in ln for ln in lines)
    evals = [ln for ln in lines if "jobs/evaluate.py" in ln]  # each prints its table as it ends
    assert len(evals) == 2 and sum("--task search" in ln for ln in evals) == 1
    assert not any("-m recsys_ray.evaluate " in ln for ln in lines)  # ... and nothing prints them again
    assert "~12 min" in (REPO / "Makefile").read_text()  # the cpu-search preset's measured time (docs/quality.md)


def test_test_runs_pytest_and_ci_runs_make_test():
    assert any("-m pytest" in ln for ln in _dry_run("test"))
    assert "make test" in (REPO / ".ci" / "run").read_text()
