"""The command lines: `python -m service explain` (explain.py) and `python -m service compare` (compare.py),
and what they share: exit codes, the refusal they print, atomic writes."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

from service.client import DEADLINE_S  # noqa: F401 - --deadline's default with --server: the client's own

OK, USAGE, UNREACHABLE, REFUSED, FAILED = 0, 2, 3, 4, 5


def positive(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text!r}")
    return value


class Refused(Exception):
    """An input or parameter the service or the engine refused: (exit code, message)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def write_atomically(target: Path, data: bytes) -> None:
    """data -> target through a temporary file beside it, renamed when complete: a failure never
    leaves a partial file under the target's name."""
    fd, part = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(part, target)
    except BaseException:
        Path(part).unlink(missing_ok=True)
        raise
