"""Errors a user can fix: bad input data, a bad configuration, a missing file. The CLI prints their message
as one line and exits 2 (a traceback only with ``--debug``); anything else is a bug and keeps its traceback."""

from __future__ import annotations


class DataError(ValueError):
    """Input data or configuration that cannot be used; the message names the file or item and the problem."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types the CLI reports without a traceback."""
    import tomllib

    from pydantic import ValidationError

    from features.store import FeatureValidationError

    return (DataError, FileNotFoundError, NotADirectoryError, ValidationError, tomllib.TOMLDecodeError,
            FeatureValidationError)
