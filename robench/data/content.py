"""Content digests of a dataset's files, cached in a side index so that a warm run only stats.

A dataset's manifest hash keys its cached features and its cells, so it must change when any
image's pixels change -- also when a set is regenerated in place with the same file names and
byte sizes. Listing path + size (what robench hashed before) cannot see that; hashing every byte
on every run would cost minutes at ImageNet scale (1.28M train files, 3.75M ImageNet-C files,
often on a network file system). The trade-off chosen here:

- **Full-content sha256 per file**, not a sampled hash: for the 10-200 KB images of these sets a
  sample (first + last 64 KiB) reads most of the file anyway, and the cost is dominated by one
  open + read round trip per file, not by bytes; a full hash cannot miss a change anywhere in
  the file (e.g. one severity block of a CIFAR-10-C ``.npy`` regenerated).
- **Computed once, cached by (relative path, size, mtime_ns, ctime_ns)** in
  ``<cache_dir>/content-index/<root name>-<hash of the resolved root>.npz``. A file whose size,
  mtime or ctime differs from the index is re-hashed; any other reuses its digest, so a warm run
  does only the ``stat()`` calls the directory scan makes anyway. ctime is part of the key because
  user space cannot set it: tools that restore an old mtime after writing (``cp -p``,
  ``tar -x``, ``rsync -a``, ``os.utime``) still change it. ``chmod``/``chown``/a copy of the whole
  folder change it too: those files are re-hashed once and keep their digest.
- **Racy entries are not trusted** (as git treats "racily clean" index entries): a file modified
  within ``RACY_NS`` before it was hashed could be rewritten again within the same timestamp tick,
  same size, leaving (size, mtime, ctime) unchanged; such entries are re-hashed on the next run.
  The window (2 s) covers coarse file-system clocks (FAT 2 s, old NFS servers 1 s); a file server
  whose clock lags the client's by more than that narrows this one protection, nothing else.
- Files are hashed by a thread pool (``hashlib`` and file reads release the GIL), which is what a
  network file system needs to hide its latency; a cold run reads each byte once more than the
  feature extraction does. ``tests/benchmarks/test_bench_content.py`` measures cold vs warm.

The index holds the files of the last scan of a root; an index that cannot be written (read-only
cache) only costs the next run a re-hash, never a wrong digest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from robench.io import CorruptEntry, discard, file_digest, load_npz, write_npz
from robench.progress import progress_bar as tqdm  # a bar on a TTY, lines in a log

log = logging.getLogger(__name__)

INDEX_FORMAT = 1
RACY_NS = 2_000_000_000
HASH_THREADS = 16
HASH_CHUNK = 64  # files per thread-pool task
DIGEST_BYTES = 32  # sha256


@dataclass
class FileStats:
    """The files of a dataset in scan order: relative paths and (size, mtime_ns, ctime_ns)."""

    rel: list[str] = field(default_factory=list)
    _stat: array = field(default_factory=lambda: array("q"))

    def add(self, rel: str, st: os.stat_result) -> None:
        self.rel.append(rel)
        self._stat.extend((st.st_size, st.st_mtime_ns, st.st_ctime_ns))

    def __len__(self) -> int:
        return len(self.rel)

    @property
    def stat(self) -> np.ndarray:
        """(N, 3) int64: size, mtime_ns, ctime_ns."""
        return np.frombuffer(self._stat, dtype=np.int64).reshape(-1, 3)

    @property
    def sizes(self) -> list[int]:
        return self.stat[:, 0].tolist()


def default_cache_dir() -> Path:
    return Path(os.environ.get("ROBENCH_CACHE", str(Path.home() / ".cache" / "robench")))


def index_path(root: Path, cache_dir: str | Path | None) -> Path:
    """Where the content index of ``root`` lives (one per resolved dataset root)."""
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return base / "content-index" / f"{Path(root).name or 'root'}-{key}.npz"


def sha256_file(path: Path) -> bytes:
    """sha256 of a file's bytes (streamed: flat memory for a 150 MB .npy)."""
    return bytes.fromhex(file_digest(path))


@dataclass
class Digests:
    """Per-file sha256 digests, aligned with the :class:`FileStats` they were asked for."""

    digests: np.ndarray  # (N, 32) uint8
    n_hashed: int  # files read this time (0 on a warm run)

    def hex(self) -> list[str]:
        flat = self.digests.tobytes().hex()
        w = 2 * DIGEST_BYTES
        return [flat[i:i + w] for i in range(0, len(flat), w)]


def bound(path: Path) -> str:
    """What an index file is (its seal's binding): the index of one folder, named by the
    folder's key (:func:`index_path`)."""
    return f"content-index/{path.name}"


def _load_index(path: Path) -> tuple[bytes, np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        z = load_npz(path, bound=bound(path))
        if int(z["format"]) != INDEX_FORMAT:
            return None
        return z["paths"].tobytes(), z["stat"], z["digest"]
    except CorruptEntry as e:  # a damaged index would hand out wrong digests: hash afresh
        discard(path, reason=f"content index: {e.problem}")
        return None
    except (ValueError, KeyError):
        return None  # from another version: hash afresh


def content_digests(root: Path, files: FileStats, cache_dir: str | Path | None = None,
                    progress: bool = False, desc: str = "") -> Digests:
    """sha256 of every file in ``files`` (paths relative to ``root``), reusing the side index for
    files whose (size, mtime_ns, ctime_ns) are unchanged and not racy (see the module docstring).
    """
    n = len(files)
    stat = files.stat
    joined = "\n".join(files.rel).encode()
    digests = np.zeros((n, DIGEST_BYTES), dtype=np.uint8)
    fresh = np.ones(n, dtype=bool)  # rows that must be (re-)hashed
    path = index_path(root, cache_dir)
    old = _load_index(path)
    if old is not None:
        old_paths, old_stat, old_digest = old
        if old_paths == joined:  # the usual case: same files, same order
            rows, old_rows = np.arange(n), np.arange(n)
        else:  # files added, removed or renamed: match by path
            where = {p: i for i, p in enumerate(old_paths.decode().split("\n"))} \
                if old_paths else {}
            pairs = [(i, where[p]) for i, p in enumerate(files.rel) if p in where]
            rows = np.asarray([i for i, _ in pairs], dtype=np.int64)
            old_rows = np.asarray([j for _, j in pairs], dtype=np.int64)
        same = (old_stat[old_rows] == stat[rows]).all(axis=1) if len(rows) else rows.astype(bool)
        digests[rows[same]] = old_digest[old_rows[same]]
        fresh[rows[same]] = False
    todo = np.flatnonzero(fresh)
    started = time.time_ns()
    unreadable = np.zeros(n, dtype=bool)
    if len(todo):
        # chunks of files per task: one future per file would cost more than hashing a small one
        chunks = [todo[s:s + HASH_CHUNK].tolist() for s in range(0, len(todo), HASH_CHUNK)]
        bar = tqdm(total=len(todo), unit="file", desc=f"hashing {desc or root.name}",
                   disable=not progress or len(todo) < 1000, dynamic_ncols=True, leave=False)
        with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
            for rows, found in zip(chunks, pool.map(
                    lambda rows: [_digest_or_none(root / files.rel[i]) for i in rows], chunks),
                    strict=True):
                for i, d in zip(rows, found, strict=True):
                    if d is None:  # the feature pass reports it as undecodable; retried next run
                        unreadable[i] = True
                        d = hashlib.sha256(b"unreadable\0" + files.rel[i].encode()).digest()
                    digests[i] = np.frombuffer(d, dtype=np.uint8)
                bar.update(len(rows))
        bar.close()
        _save_index(path, joined, stat, digests, started, unreadable)
    return Digests(digests, int(len(todo)))


def _digest_or_none(path: Path) -> bytes | None:
    try:
        return sha256_file(path)
    except OSError:  # vanished since the scan, or not readable
        return None


def _save_index(path: Path, joined: bytes, stat: np.ndarray, digests: np.ndarray,
                started: int, untrusted: np.ndarray) -> None:
    kept = stat.copy()
    racy = np.maximum(stat[:, 1], stat[:, 2]) >= started - RACY_NS
    kept[racy | untrusted, 1] = -1  # never matches a real mtime: hashed again on the next run
    try:
        write_npz(path, bound=bound(path), format=np.int64(INDEX_FORMAT),
                  paths=np.frombuffer(joined, np.uint8), stat=kept, digest=digests)
    except OSError as e:
        log.warning("cannot write the content index %s (%s): the next run hashes the files "
                    "again", path, e)
