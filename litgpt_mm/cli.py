"""Command-line entry points: jsonargparse's `CLI`, with bad input reported in one line instead of a traceback."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil
from jsonargparse import CLI

DEBUG_ENV = "LITGPT_MM_DEBUG"
# What bad input raises here (a missing or unreadable file, a malformed field, a refused setting). Anything else is a
# bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


_command_start: float | None = None


def command_started() -> float:
    """When the running command started (`time.time()`): the process start for the first `run_cli` of a process
    (its imports count), the call for a later one in the same process (`scripts/demo.py` runs every stage in one)."""
    return _command_start or psutil.Process().create_time()


def run_cli(component: Callable | list[Callable], **kwargs: Any) -> Any:
    """Run `jsonargparse.CLI(component, **kwargs)`; a `ValueError`, an `OSError` or a `SystemExit("message")` prints
    `error: <message>` on stderr and exits with status 2. Set `LITGPT_MM_DEBUG=1` to see the full traceback instead."""
    global _command_start
    _command_start = psutil.Process().create_time() if _command_start is None else time.time()
    try:
        return CLI(component, **kwargs)
    except (*USER_ERRORS, SystemExit) as err:
        if isinstance(err, SystemExit) and not isinstance(err.code, str):
            raise  # a status (jsonargparse's usage errors print their own message)
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        message = (err.code if isinstance(err, SystemExit) else str(err)) or type(err).__name__
        if isinstance(err, OSError) and err.filename and str(err.filename) not in message:
            message = f"{err.filename}: {message}"
        print(f"error: {message}", file=sys.stderr)
        print(f"(set {DEBUG_ENV}=1 for the full traceback)", file=sys.stderr)
        raise SystemExit(2) from None
