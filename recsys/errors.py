"""Errors a user can fix: bad input data, a bad configuration, a missing file. The CLI prints their message
as one line and exits 2 (a traceback only with ``--debug``); anything else is a bug and keeps its traceback."""

from __future__ import annotations


class DataError(ValueError):
    """Input data or configuration that cannot be used; the message names the file or item and the problem."""


class FeatureValidationError(ValueError):
    """A batch was rejected before writing; ``ids`` names the offending entities."""

    def __init__(self, what: str, problems: dict[str, list[str]]):
        self.problems = problems
        self.ids = sorted({i for ids in problems.values() for i in ids})
        detail = "; ".join(f"{p}: {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''} ({len(ids)})" for p, ids in problems.items())
        super().__init__(f"{what}: batch rejected, nothing written ({detail})")


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types the CLI reports without a traceback."""
    import tomllib

    from pydantic import ValidationError

    return (DataError, FileNotFoundError, NotADirectoryError, ValidationError, tomllib.TOMLDecodeError,
            FeatureValidationError)
