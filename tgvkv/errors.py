"""Unexpected errors: the traceback goes to the operator's log, the user gets one short line with an error id.

Expected problems (bad input, unloadable models) are ``ValueError`` with a message for the user; anything else is a
bug or an environment failure. ``report_unexpected`` logs its traceback under a fresh id (the app's server log) and
``write_error_report`` writes it to a file (the command-line tools, whose stderr is the user's terminal); the message
the user sees names the id so the two can be matched.
"""
from __future__ import annotations

import logging
import tempfile
import traceback
import uuid
from pathlib import Path

#: where the command-line tools write tracebacks of unexpected errors (one file per error id)
ERROR_REPORT_DIR = Path(tempfile.gettempdir()) / "tgvkv-errors"


def new_error_id() -> str:
    return uuid.uuid4().hex[:10]


def report_unexpected(exc: BaseException, logger: logging.Logger, context: str) -> str:
    """Log `exc` with its traceback under a new id; returns the id."""
    error_id = new_error_id()
    logger.error("unexpected error %s in %s: %s: %s", error_id, context, type(exc).__name__, exc, exc_info=exc)
    return error_id


def write_error_report(exc: BaseException, context: str) -> tuple[str, Path | None]:
    """Write `exc`'s traceback to ERROR_REPORT_DIR/<id>.txt; returns (id, path), path None if it could not be written."""
    error_id = new_error_id()
    text = f"{context}\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        ERROR_REPORT_DIR.mkdir(parents=True, exist_ok=True)
        path = ERROR_REPORT_DIR / f"{error_id}.txt"
        path.write_text(text)
    except OSError:
        return error_id, None
    return error_id, path


def cli_unexpected_message(exc: BaseException, context: str) -> str:
    """One line for a command-line user (after "error: "), the traceback saved to a file."""
    error_id, path = write_error_report(exc, context)
    first = str(exc).splitlines()[0] if str(exc) else ""
    where = f"the traceback is in {path}" if path is not None else "the traceback could not be saved"
    return (f"unexpected {type(exc).__name__}{': ' + first if first else ''} (error id {error_id}; {where}; "
            "please report it)")
