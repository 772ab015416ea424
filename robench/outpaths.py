"""Where a command writes (``report --out``, ``check --summary``, ``rescore --out``, ``data
corrupt --out``, a run's ``results_dir`` / ``cache_dir``): checked before any work, so a path at
a file, under a file or on a read-only mount is a named error with the fix, not a traceback
after minutes of computing; :func:`writing` names what failed if the disk refuses later (full,
remounted read-only).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from robench.errors import RobenchError


def _existing_ancestor(path: Path) -> Path:
    """The nearest of ``path``'s ancestors (or ``path``) that exists (at worst the cwd's
    root)."""
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path(path.anchor or ".")


def _check_ancestors(path: Path, what: str, fix: str) -> None:
    """The folders to create for ``path`` can be created: nothing on the way is a file, and the
    nearest existing folder is writable."""
    base = _existing_ancestor(path.parent)
    if not base.is_dir():
        raise RobenchError(f"{what} {path} lies under {base}, which is a file, not a folder",
                           fix)
    if not os.access(base, os.W_OK | os.X_OK):
        raise RobenchError(f"{what} {path}: {base} is not writable (read-only or another "
                           "user's)", fix)


def output_folder(path: str | os.PathLike, what: str, fix: str,
                  read_only_ok: bool = False) -> Path:
    """``path`` as a folder robench may create and write into; ``what`` names it in the
    message (e.g. ``--out``), ``fix`` says how to choose another. ``read_only_ok``: an existing
    folder that cannot be written is accepted (a finished cache on a read-only mount is read
    without writing; an entry that must be built then fails by name when it is written)."""
    if not str(path).strip():
        raise RobenchError(f"{what} is empty", fix)
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise RobenchError(f"{what} {out} is a file, not a folder", fix)
    if out.is_dir():
        if not read_only_ok and not os.access(out, os.W_OK | os.X_OK):
            raise RobenchError(f"{what} {out} is not writable (read-only or another user's)",
                               fix)
        return out
    _check_ancestors(out, what, fix)
    return out


def output_file(path: str | os.PathLike, what: str, fix: str) -> Path:
    """``path`` as a file robench may create or append to (its folders created if needed)."""
    if not str(path).strip():
        raise RobenchError(f"{what} is empty", fix)
    out = Path(path).expanduser()
    if out.is_dir():
        raise RobenchError(f"{what} {out} is a folder, not a file", fix)
    if out.exists():
        if not os.access(out, os.W_OK):
            raise RobenchError(f"{what} {out} is not writable (read-only or another user's)",
                               fix)
        return out
    _check_ancestors(out, what, fix)
    return out


@contextmanager
def writing(path: str | os.PathLike, what: str, fix: str) -> Iterator[None]:
    """Turn a write that the system refuses (disk full, read-only file system, permission,
    a path component that became a file) into a named error."""
    try:
        yield
    except OSError as e:
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(path) else ""
        raise RobenchError(f"cannot write {what} {path}{where}: {e.strerror or e}", fix) from e
