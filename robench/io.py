"""Everything robench writes goes through here: atomic writes (a crash never leaves a
half-written record, cache entry or checkpoint), checksums written with each cache entry and
verified when it is read (a flipped byte or a truncation is named, removed and rebuilt, never
scored), per-entry file locks (two runs on one cache do each piece of work once), and named
errors for a full disk or a read-only folder.

Checksums are sha256 (hardware-accelerated on x86 and ARM, ~1.7 GB/s here), kept in a sidecar
``<file>.sha256`` (JSON: digest, size, and the array's shape and dtype where there is one).
A file is hashed once per process: the verified (inode, size, mtime) is remembered.

A seal proves the bytes are intact; the *binding* inside it proves they are the ones asked for.
Every cache entry is sealed with ``bound=<what it is>`` (its store and key, e.g.
``features/<key>``, ``corrupted/<set key>/fog.npy``), and every read passes the binding it
expects: an intact entry copied or swapped in from another key (a sealed ``fog.npy`` moved over
``snow.npy`` with its sidecar) is named, removed and rebuilt like a damaged one. A missing seal is
never a pass: an entry without its sidecar is unverified and rebuilt.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from robench.errors import RobenchError

log = logging.getLogger(__name__)
SUM_SUFFIX = ".sha256"
LOCK_SUFFIX = ".lock"
TMP_SUFFIX = ".tmp"  # atomic_write's temporaries: .<name>.<process_tag>.<random>.tmp
# errnos of a write that cannot succeed however often it is retried: say which, and the fix
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
_verified: dict[str, tuple[int, int, int]] = {}
_FULL_BYTES = 1 << 20  # a folder with less room than this counts as full after a failed write


class CorruptEntry(RobenchError):
    """A cache entry that fails its checksum (or is missing, truncated or unreadable): the caller
    removes it and rebuilds it; uncaught, it tells the user what to delete."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cache entry {path} {reason}",
                         f"delete {path} (robench rebuilds it on the next run)")


class WriteError(RobenchError, OSError):
    """A write that failed for a reason the user must fix (full disk, read-only folder); an
    ``OSError`` too, so code that tolerates a failed optional write (an index) still does."""

    def __init__(self, problem: str, fix: str, cause: OSError) -> None:
        super().__init__(problem, fix)
        self.errno, self.strerror = cause.errno, cause.strerror

    def __str__(self) -> str:  # the message, not OSError's "[Errno 28] ..." form
        return str(self.args[0])


# -- writing ---------------------------------------------------------------------------------
def umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    old = os.umask(0)
    os.umask(old)
    return old


def write_error(path: Path, e: OSError) -> WriteError:
    """A failed write as the user's problem: a full disk or a read-only folder, named."""
    where = Path(path).parent
    if isinstance(e, WriteError):
        return e
    if e.errno in _NO_SPACE:
        return WriteError(f"no space left on the device holding {where} while writing "
                          f"{Path(path).name}",
                          "free space there, or point cache_dir / results_dir at a folder "
                          "with room (nothing partial was kept)", e)
    if e.errno in _NOT_WRITABLE:
        return WriteError(f"cannot write to {where}: {e.strerror}",
                          "make the folder writable, or point cache_dir / results_dir at a "
                          "writable folder", e)
    return WriteError(f"cannot write {path}: {e}", "check the folder and the disk", e)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path`` then rename it over ``path``.

    The file gets the user's umask (``mkstemp`` makes it 0600, which would break a shared
    cache); a full disk or a read-only folder is a :class:`RobenchError`, and the temporary file
    is gone either way.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{process_tag()}.",
                                   suffix=TMP_SUFFIX)
    except OSError as e:
        raise write_error(path, e) from e
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~umask())
        write(Path(tmp))
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, e) from e
    except Exception as e:
        Path(tmp).unlink(missing_ok=True)
        if (full := disk_full(path, e)) is not None:
            raise full from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _verified.pop(str(path), None)


def disk_full(path: Path, e: BaseException) -> WriteError | None:
    """A writer's own exception for a failed write, when the disk is full: torch.save reports it
    as ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``, safetensors as
    ``SafetensorError ... No space left on device``, neither an ``OSError``. Named as the full
    disk it is when the folder has (almost) no room left, else None (not ours to name)."""
    free = _free_bytes(Path(path).parent)
    if free is None or free > _FULL_BYTES:
        return None
    return write_error(path, OSError(errno.ENOSPC, f"{type(e).__name__}: {e}"))


def write_json(path: Path, obj: Any, seal: bool = True, bound: str | None = None) -> None:
    """``obj`` as JSON (sorted keys), with its checksum (bound to ``bound``) unless
    ``seal=False`` (a file that carries its own, e.g. a result record)."""
    def _w(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True, default=jsonable)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, _w)
    if seal:
        seal_file(path, bound=bound)


def write_npz(path: Path, seal: bool = True, bound: str | None = None,
              **arrays: np.ndarray) -> None:
    def _w(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(path, _w)
    if seal:
        seal_file(path, bound=bound)


def write_npy(path: Path, array: np.ndarray, seal: bool = True, bound: str | None = None) -> None:
    def _w(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save on a path would append ".npy"
            np.save(f, array)

    atomic_write(path, _w)
    if seal:
        seal_file(path, bound=bound, shape=list(array.shape), dtype=array.dtype.str)


# -- checksums -------------------------------------------------------------------------------
def sum_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + SUM_SUFFIX)


def file_digest(path: Path, algo: str = "sha256") -> str:
    """Hex digest of a file's bytes, streamed (flat memory for a multi-GB array)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algo).hexdigest()


def file_sha256(path: Path) -> str:
    return file_digest(path, "sha256")


def seal_file(path: Path, bound: str | None = None, **extra: Any) -> str:
    """Write ``path``'s checksum sidecar (sha256, size, the binding ``bound`` -- what the entry is,
    compared by every read -- and ``extra`` such as shape and dtype); returns the digest. Written
    after the file: a crash between the two leaves a file without a valid checksum, which is
    rebuilt, never trusted."""
    path = Path(path)
    digest = file_sha256(path)
    meta = {"sha256": digest, "bytes": path.stat().st_size, **extra}
    if bound is not None:
        meta["bound"] = bound

    def _w(tmp: Path) -> None:
        tmp.write_text(json.dumps(meta, sort_keys=True) + "\n")

    atomic_write(sum_path(path), _w)
    _remember(path)
    return digest


def _remember(path: Path) -> None:
    st = path.stat()
    _verified[str(path)] = (st.st_ino, st.st_size, st.st_mtime_ns)


def verify_file(path: Path, bound: str | None = None) -> dict:
    """Check ``path`` against its sidecar, and (``bound``) that the sidecar binds it to the entry
    asked for; return the sidecar's fields. Raises :class:`CorruptEntry` naming what is wrong: a
    missing sidecar, other bytes, or an intact entry of another key."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise CorruptEntry(path, f"cannot be read ({e.strerror})") from e
    side = sum_path(path)
    try:
        meta = json.loads(side.read_text())
        digest, size = str(meta["sha256"]), int(meta["bytes"])
    except FileNotFoundError as e:
        raise CorruptEntry(path, "has no checksum (an interrupted write or an older robench)"
                           ) from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptEntry(path, f"has an unreadable checksum file {side.name}") from e
    if bound is not None and meta.get("bound") != bound:
        was = meta.get("bound")
        raise CorruptEntry(path, f"is sealed as {was!r}, not {bound!r}: an entry copied or "
                           "swapped in from elsewhere" if was else "has a checksum bound to no "
                           f"key (an older robench), not to {bound!r}")
    if st.st_size != size:
        raise CorruptEntry(path, f"is {st.st_size} bytes, its checksum says {size} (truncated "
                           "or overwritten)")
    if _verified.get(str(path)) == (st.st_ino, st.st_size, st.st_mtime_ns):
        return meta
    if file_sha256(path) != digest:
        raise CorruptEntry(path, "fails its sha256 checksum (the file changed on disk)")
    _remember(path)
    return meta


def read_json(path: Path, bound: str | None = None) -> Any:
    """A sealed JSON file, verified (and its binding, see :func:`verify_file`)."""
    verify_file(path, bound)
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CorruptEntry(path, f"cannot be parsed ({e})") from e


def load_npy(path: Path, mmap_mode: str | None = None, bound: str | None = None) -> np.ndarray:
    """A sealed ``.npy`` array, verified (content, binding, shape and dtype); never unpickles."""
    meta = verify_file(path, bound)
    try:
        arr = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise CorruptEntry(path, f"is not a readable array ({e})") from e
    if "shape" in meta and (list(arr.shape) != meta["shape"] or arr.dtype.str != meta["dtype"]):
        raise CorruptEntry(path, f"holds {arr.dtype}{list(arr.shape)}, its checksum says "
                           f"{meta['dtype']}{meta['shape']}")
    return arr


def load_npz(path: Path, bound: str | None = None) -> dict[str, np.ndarray]:
    """A sealed ``.npz`` archive, verified (and its binding), read whole into memory; never
    unpickles."""
    verify_file(path, bound)
    return read_npz(path)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """An ``.npz`` archive's arrays (no checksum of its own: e.g. per-sample outputs, whose
    digest is in their record); a damaged archive is a :class:`CorruptEntry`."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError) as e:
        raise CorruptEntry(path, f"is not a readable archive ({e})") from e
    except Exception as e:  # zipfile.BadZipFile, zlib.error: damage inside the archive
        raise CorruptEntry(path, f"is damaged ({type(e).__name__}: {e})") from e


def discard(*paths: Path, reason: str = "") -> None:
    """Remove a bad cache entry (its files and their checksums) so it is rebuilt; says so."""
    for p in paths:
        p = Path(p)
        for f in (p, sum_path(p)):
            with contextlib.suppress(FileNotFoundError):
                if f.is_dir() and not f.is_symlink():
                    import shutil

                    shutil.rmtree(f)
                else:
                    f.unlink()
        _verified.pop(str(p), None)
    if reason:
        log.warning("%s; removed, rebuilding it", reason)


def sweep_stale(*folders: Path, recursive: bool = True) -> int:
    """Remove what killed runs left in ``folders`` (recursively, unless ``recursive=False``):
    temporaries of :func:`atomic_write`, partial feature files (``<key>.<tag>.partial.npy``),
    derived checkpoint folders and download staging folders, when the process named by their
    tag (:func:`process_tag`) is gone. A live process's files are kept, so a concurrent run is
    not disturbed. Returns the number removed."""
    removed = 0
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        find = Path(folder).rglob if recursive else Path(folder).glob
        for f in [*find(f".*{TMP_SUFFIX}"), *find("*.partial.npy")]:
            pid = _pid_of(f.name)
            if pid is not None and not _alive(pid):
                with contextlib.suppress(OSError):
                    if f.is_dir():
                        import shutil

                        shutil.rmtree(f)
                    else:
                        f.unlink()
                    removed += 1
    if removed:
        log.info("removed %d file(s) left by interrupted runs", removed)
    return removed


def process_tag() -> str:
    """``<pid>-<host hash>``: names a temporary file's writer, so a sweep removes only those of
    dead processes *of this machine* (a cache shared by several nodes has others' files too)."""
    return f"{os.getpid()}-{_host_tag()}"


@functools.cache
def _host_tag() -> str:
    import socket

    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _pid_of(name: str) -> int | None:
    """The pid in a temporary file's name if this machine wrote it (see :func:`process_tag`)."""
    host = _host_tag()
    for part in name.split("."):
        pid, _, tag = part.partition("-")
        if pid.isdigit() and tag == host:
            return int(pid)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


# -- locks -----------------------------------------------------------------------------------
@contextlib.contextmanager
def entry_lock(path: Path, what: str | None = None) -> Iterator[None]:
    """An exclusive lock on the cache entry ``path`` (a ``<path>.lock`` file, ``filelock``), held
    while it is built, so a concurrent run waits and then reads the finished entry instead of
    building it too. Says what it waits for after a few seconds."""
    from filelock import FileLock, Timeout

    path = Path(path)
    lock_file = path.with_name(path.name + LOCK_SUFFIX)
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(lock_file, e) from e
    lock = FileLock(lock_file, mode=0o666 & ~umask())
    try:
        try:
            lock.acquire(timeout=5)
        except Timeout:
            log.warning("waiting for another robench process to finish %s", what or path.name)
            lock.acquire()
    except OSError as e:
        raise write_error(lock_file, e) from e
    try:
        yield
    finally:
        lock.release()


# -- space -----------------------------------------------------------------------------------
def reserve(fd: int, nbytes: int, path: Path) -> None:
    """Allocate ``nbytes`` for the file open on ``fd`` now, so that a full disk is an error here
    rather than a SIGBUS later when a page of a memory map over a sparse file is first written
    (Linux cannot report ENOSPC to a store instruction)."""
    free = _free_bytes(Path(path).parent)
    if free is not None and free < nbytes:
        raise RobenchError(
            f"{human_size(nbytes)} are needed in {Path(path).parent} but only "
            f"{human_size(free)} are free",
            "free space there or set cache_dir to a folder with room (model.features_dtype="
            "float16 halves the size of feature caches)")
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # e.g. some network filesystems
                return
            raise write_error(path, e) from e


def _free_bytes(folder: Path) -> int | None:
    import shutil

    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def human_size(n: float, base: int = 1024) -> str:
    """``n`` bytes for people: binary units (KiB, MiB, ...) for base 1024, decimal (KB, MB, ...)
    for base 1000, one decimal above bytes."""
    units = ("B", "KiB", "MiB", "GiB", "TiB") if base == 1024 else ("B", "KB", "MB", "GB", "TB")
    for unit in units:
        if n < base or unit == units[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= base
    raise AssertionError("unreachable")


def jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
