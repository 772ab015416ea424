"""Progress reporting that suits where the output goes.

On a terminal, :func:`progress_bar` is an ordinary tqdm bar (in a Jupyter notebook tqdm's
notebook bar). In a pipe, a file or a CI log
(stderr is not a TTY) a bar's carriage-return frames would be kilobytes of noise, so it is a
:class:`LineProgress` instead: one line when the step ends (count, time, rate), and, for a long
step, a line every ~10% at most every :data:`LINE_INTERVAL` seconds (the first after that long,
so a slow step is never silent for long). ``progress=false`` (``disable=True``) shows nothing.

The verbosity level (``verbosity=quiet|normal|verbose``, or ``robench -q`` / ``-v``) is process
wide: ``quiet`` drops bars, step lines and per-cell lines (:func:`echo`), keeping the final
table, warnings and errors.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

from tqdm import tqdm

LEVELS = ("quiet", "normal", "verbose")
LINE_INTERVAL = 10.0  # seconds between two lines of one step in a pipe
_state = {"verbosity": "normal"}


def set_verbosity(level: str) -> None:
    """``quiet`` | ``normal`` | ``verbose`` (``verbose`` also turns on robench's info logs)."""
    if level not in LEVELS:
        raise ValueError(f"verbosity must be one of {LEVELS}, not {level!r}")
    _state["verbosity"] = level
    logging.getLogger("robench").setLevel(logging.INFO if level == "verbose" else logging.NOTSET)


def verbosity() -> str:
    return _state["verbosity"]


@contextlib.contextmanager
def verbosity_level(level: str) -> Iterator[None]:
    """Set the verbosity for a block (the Python API's runs), restoring it and the ``robench``
    logger's level afterwards."""
    before, log_level = verbosity(), logging.getLogger("robench").level
    set_verbosity(level)
    try:
        yield
    finally:
        _state["verbosity"] = before
        logging.getLogger("robench").setLevel(log_level)


def in_notebook() -> bool:
    """Running in a Jupyter kernel (which renders tqdm's notebook bars)."""
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"


def is_tty(stream: IO | None = None) -> bool:
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", disable: bool = False, **kwargs: Any) -> Any:
    """A progress bar for a step of ``total`` ``unit``: tqdm on a terminal, a
    :class:`LineProgress` elsewhere, a disabled tqdm when ``disable`` or ``verbosity=quiet``.

    Takes tqdm's arguments (``initial``, ``leave``, ``unit_scale``, ``unit_divisor``,
    ``dynamic_ncols``, ...), so ``tqdm(...)`` calls become ``progress_bar(...)`` unchanged.
    """
    if iterable is not None and total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if disable or verbosity() == "quiet":
        return tqdm(iterable, total=total, disable=True)
    if in_notebook():
        from tqdm.auto import tqdm as auto  # a widget bar where ipywidgets is installed

        return auto(iterable, total=total, desc=desc, unit=unit, **kwargs)
    if is_tty():
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(iterable, total=total, desc=desc, unit=unit, **kwargs)
    return LineProgress(iterable, total=total, desc=desc, unit=unit,
                        initial=kwargs.get("initial", 0), unit_scale=kwargs.get("unit_scale"),
                        unit_divisor=kwargs.get("unit_divisor", 1000))


def echo(message: str) -> None:
    """A per-step line of a run (stdout), unless ``quiet``; does not break an active tqdm bar."""
    if verbosity() != "quiet":
        tqdm.write(message, file=sys.stdout)


class LineProgress:
    """tqdm's interface (``update``, ``set_postfix``, ``close``, iteration, ``with``) writing
    plain lines: never a carriage return, never more than ~12 lines per step."""

    def __init__(self, iterable: Iterable | None = None, total: float | None = None,
                 desc: str = "", unit: str = "it", initial: float = 0,
                 unit_scale: bool | float | None = None, unit_divisor: int = 1000,
                 file: IO | None = None, clock: Any = time.monotonic) -> None:
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.initial = initial
        self.unit_scale, self.unit_divisor = unit_scale, unit_divisor
        self.file = file
        self.clock = clock
        self.start = self.last_line = clock()
        self.decile = self._decile()
        self.postfix = ""
        self.closed = False

    # -- tqdm's interface ---------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = self.clock()
        decile = self._decile()
        # a new tenth, or the first sign of life of a long step; never two lines within
        # LINE_INTERVAL; the end is the closing line's
        due = decile > self.decile or self.last_line == self.start
        if due and now - self.last_line >= LINE_INTERVAL and not self._finished():
            self.decile = decile
            self.last_line = now
            self._print(self._status(now))

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        done = self.n - self.initial
        if done <= 0 and not self.total:
            return  # nothing happened (e.g. everything was cached)
        elapsed = self.clock() - self.start
        rate = f", {self._size(done / elapsed)}{self._unit}/s" if elapsed > 0 else ""
        count = self._size(self.n) + (f"/{self._size(self.total)}" if self.total and
                                      not self._finished() else "")
        stopped = "" if self._finished() or not self.total else " (stopped)"
        self._print(f"{count}{self._unit} in {_duration(elapsed)}{rate}{stopped}")

    @staticmethod
    def write(message: str, file: IO | None = None) -> None:
        print(message, file=file or sys.stdout, flush=True)

    # -- helpers ------------------------------------------------------------------------------
    def _finished(self) -> bool:
        return bool(self.total) and self.n >= self.total  # type: ignore[operator]

    def _decile(self) -> int:
        return int(10 * self.n / self.total) if self.total else 0

    def _status(self, now: float) -> str:
        elapsed = now - self.start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        head = (f"{100 * self.n / self.total:3.0f}% {self._size(self.n)}/"
                f"{self._size(self.total)}" if self.total else self._size(self.n))
        left = ""
        if self.total and rate > 0:
            left = f", ~{_duration((self.total - self.n) / rate)} left"
        return f"{head}{self._unit}, {_duration(elapsed)}, {self._size(rate)}{self._unit}/s{left}"

    @property
    def _unit(self) -> str:
        """The unit as printed after a number: ``2000 img``, but ``1.00MB`` when scaled."""
        return self.unit if self.unit_scale else f" {self.unit}"

    def _size(self, x: float | None) -> str:
        if x is None:
            return "?"
        if self.unit_scale:
            return tqdm.format_sizeof(x, divisor=self.unit_divisor)
        return f"{x:.0f}" if x >= 10 or float(x).is_integer() else f"{x:.1f}"

    def _print(self, text: str) -> None:
        suffix = f" ({self.postfix})" if self.postfix else ""
        print(f"{self.desc}: {text}{suffix}" if self.desc else text + suffix,
              file=self.file or sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"
