"""What every job does at its edges: logging set-up, one-line errors, one-line JSON summary."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable

from recsys_ray.errors import RecsysError


def setup_logging() -> None:
    """Readable progress lines on stderr (stdout is kept for the final JSON line)."""
    level = os.environ.get("RECSYS_RAY_LOG", "INFO").upper()
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")


def run_job(job: Callable[[], dict]) -> dict:
    """Run ``job``; print its result as one JSON line, or a one-line error and exit 2."""
    setup_logging()
    try:
        result = job()
    except RecsysError as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result, default=str), flush=True)
    return result
