"""What the benchmarks share: how busy the machine is, where results go, and removing a run's
scratch storage."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from recsys_ray import storage

log = logging.getLogger(__name__)


def busy_cpus(seconds: float = 1.0) -> float | None:
    """CPUs' worth of work other processes did over ``seconds`` (Linux /proc/stat; None elsewhere)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        return sum(ticks) - idle, sum(ticks)

    try:
        busy0, all0 = sample()
        time.sleep(seconds)
        busy1, all1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(1, all1 - all0) * (os.cpu_count() or 1)


def remove_tree(path: str, tries: int = 10) -> None:
    """Delete a run's scratch storage; Ray may still be cleaning up checkpoints in it for a moment."""
    for _ in range(tries):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            return
        time.sleep(0.5)
    log.warning("could not remove %s", path)


RESULTS = ("results.json", "results.md")


def work_dir(output: str) -> Path:
    """The local folder a benchmark works and writes in: ``output`` itself (checked writable now,
    and refused inside a Ray job's temporary working dir), or for an ``s3://`` output a local
    scratch folder whose results :func:`publish` uploads."""
    storage.check_writable(output, "output")
    if storage.is_remote(output):
        return Path(tempfile.mkdtemp(prefix="recsys_ray_bench_"))
    return Path(output).expanduser().resolve()


def publish(output: str, work: Path) -> str:
    """Upload the results in ``work`` to a remote ``output`` (local: already there); where they are."""
    if not storage.is_remote(output):
        return str(work)
    for name in RESULTS:
        if (work / name).exists():
            storage.write_text(storage.join(output, name), (work / name).read_text())
    remove_tree(str(work))
    return output.rstrip("/")
