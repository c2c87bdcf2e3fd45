"""Errors that jobs turn into a one-line message and a non-zero exit (never a traceback)."""

from __future__ import annotations


class RecsysError(Exception):
    """Base class: bad input or configuration, reported to the user in one line."""


class ConfigError(RecsysError):
    """A configuration with one or more problems; the message lists every one of them."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid config: " + "; ".join(self.problems))


class DataError(RecsysError):
    """Input data that cannot be processed: missing file or column, empty input, bad catalogue."""
