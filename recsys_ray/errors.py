"""Errors that jobs turn into a one-line message and a non-zero exit (never a traceback)."""

from __future__ import annotations

from collections.abc import Sequence


class RecsysError(Exception):
    """Base class: bad input or configuration, reported to the user in one line."""


class ConfigError(RecsysError):
    """A configuration with one or more problems; the message lists every one of them."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid config: " + "; ".join(self.problems))


class DataError(RecsysError):
    """Input data that cannot be processed: missing file or column, empty input, bad catalogue."""


class UnknownItems(DataError):
    """Item ids not in the catalogue (the HTTP API turns this into a 422 naming them)."""

    def __init__(self, ids: Sequence[str]):
        self.ids = list(ids)
        shown = ", ".join(repr(i) for i in self.ids[:10]) + (" ..." if len(self.ids) > 10 else "")
        super().__init__(f"unknown item id(s): {shown}")


def one_line(exc: BaseException | str) -> str:
    """The first non-empty line of an error (or text), else the exception's class name."""
    text = str(exc).strip()
    if text:
        return text.splitlines()[0].strip()
    return type(exc).__name__ if isinstance(exc, BaseException) else ""
