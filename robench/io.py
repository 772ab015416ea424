"""Atomic file writes: a crash never leaves a half-written record, cache entry or checkpoint."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path`` then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    def _w(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True, default=_jsonable)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, _w)


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    def _w(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(path, _w)


def write_npy(path: Path, array: np.ndarray) -> None:
    def _w(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save on a path would append ".npy"
            np.save(f, array)

    atomic_write(path, _w)


def human_size(n: float, base: int = 1024) -> str:
    """``n`` bytes for people: binary units (KiB, MiB, ...) for base 1024, decimal (KB, MB, ...)
    for base 1000, one decimal above bytes."""
    units = ("B", "KiB", "MiB", "GiB", "TiB") if base == 1024 else ("B", "KB", "MB", "GB", "TB")
    for unit in units:
        if n < base or unit == units[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= base
    raise AssertionError("unreachable")


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
