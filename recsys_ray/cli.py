"""What every job does at its edges: arguments, logging set-up, one-line errors, one JSON line.

A job is ``jobs/X.py``: it parses ``--config FILE.yaml`` and ``--set key=value`` (plus a few
flags of its own), calls one library function and prints that function's result as one line of
JSON on stdout; bad input exits with status 2 and a one-line ``error: ...`` on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable
from typing import TypeVar

from recsys_ray.config import build_config, load_yaml
from recsys_ray.errors import RecsysError, one_line

T = TypeVar("T")


def setup_logging() -> None:
    """Readable progress lines on stderr (stdout is kept for the final JSON line)."""
    level = os.environ.get("RECSYS_RAY_LOG", "INFO").upper()
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")


def job_parser(doc: str | None, config_help: str = "YAML file with the job's config fields") -> argparse.ArgumentParser:
    """An argument parser with the two options every job has: ``--config`` and ``--set``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=config_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (dotted keys for nested fields), repeatable")
    return parser


def job_config(cls: type[T], args: argparse.Namespace, fields: dict | None = None) -> T:
    """``cls`` from ``--config`` (if given), then ``fields`` (flags of the job), then ``--set``."""
    data = load_yaml(args.config) if getattr(args, "config", None) else {}
    data.update({k: v for k, v in (fields or {}).items() if v is not None})
    return build_config(cls, data, getattr(args, "set", None) or [])


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that ran this job (``argv`` given: as if ``python script ARGV``), for a
    benchmark's "reproduce with" line."""
    return shlex.join(["python", *(sys.argv if argv is None else [script, *argv])])


def run_job(job: Callable[[], dict]) -> dict:
    """Run ``job``; print its result as one JSON line, or a one-line error and exit 2."""
    setup_logging()
    try:
        result = job()
    except RecsysError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result, default=str), flush=True)
    return result
