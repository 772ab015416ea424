"""Checked types for command-line options (argparse ``type=``): a count within bounds, a finite
number within a range, a non-empty path. A bad value is refused while the command line is
parsed (``robench: error: argument --workers: ...`` + the fix, exit 2), before any work: a
negative worker count or ``--n-bins 1e30`` never reaches a process pool or an allocation.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path


def count(low: int, high: int) -> Callable[[str], int]:
    """An integer in ``[low, high]``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} must be between {low} and {high:,}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def number(low: float, high: float, *, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], float]:
    """A finite float in the interval from ``low`` to ``high`` (open at an end when asked)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"{text} must be a finite number in "
                                             f"{left}{low:g}, {high:g}{right}")
        return value

    parse.__name__ = "number"
    return parse


def path(text: str) -> Path:
    """A path that is not the empty string (``Path("")`` would silently be the current
    folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (it would mean the current folder); "
                                         "give the folder or file explicitly, e.g. '.'")
    return Path(text)


def nonempty(value: str) -> str:
    """A path or name kept as ``str``, not the empty string."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty value; give the folder or name explicitly "
                                         "(e.g. '.' for the current folder)")
    return value
