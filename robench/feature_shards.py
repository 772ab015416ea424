"""Sharded feature extraction for multi-rank runs (``torchrun``; see :mod:`robench.distributed`).

The samples ``[0, n)`` of a dataset are cut into contiguous shards of whole batches
(:func:`robench.distributed.shard_ranges`, independent of the rank count); the shards are dealt
to the ranks (contiguous blocks of shards by default, ``$ROBENCH_SHARD_MODE=strided`` for
round-robin). Each rank encodes only its shards, exactly the batches a single process would, and
writes each one atomically as it completes:

    <cache>/features/<key>.shards/<start>-<stop>.npy    rows start..stop-1 (storage dtype)
    <cache>/features/<key>.shards/<start>-<stop>.json   {"start", "stop", "rows", "bad"}

(the ``.json`` is written last and marks the shard done). A killed run leaves its finished
shards; the next run, with any number of ranks, encodes only the missing ones. After every rank
is done, the lead rank reads the shards back (:func:`read_shards`) once it has verified that
their indices cover ``[0, n)`` exactly once, and writes the cache entry from them through the
single-process code path (:func:`robench.features.extract_features`); the shard folder is then
removed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from robench.distributed import World, assign, shard_ranges, verify_cover
from robench.errors import RobenchError
from robench.io import CorruptEntry, load_npy, read_json, verify_file, write_json, write_npy
from robench.models.backbone import Backbone
from robench.progress import progress_bar as tqdm

log = logging.getLogger(__name__)
Shard = tuple[Path, int, int]  # (folder, start, stop)


def shard_files(folder: Path, start: int, stop: int) -> tuple[Path, Path]:
    """(rows, metadata) files of shard ``[start, stop)``."""
    stem = f"{start:010d}-{stop:010d}"
    return folder / f"{stem}.npy", folder / f"{stem}.json"


def bound(path: Path) -> str:
    """What a shard file is (its seal's binding): ``features/<key>.shards/<range>.npy|json``."""
    return f"features/{path.parent.name}/{path.name}"


def is_done(folder: Path, start: int, stop: int) -> bool:
    """Whether a shard was completed: its metadata (written last) and rows are there, intact,
    bound to this shard of this entry, and agree."""
    npy, meta = shard_files(folder, start, stop)
    if not (npy.is_file() and meta.is_file()):
        return False
    try:
        info = read_json(meta, bound(meta))
        verify_file(npy, bound(npy))
    except CorruptEntry:
        return False  # damaged, foreign or unsealed: extracted again
    return (info.get("start"), info.get("stop"), info.get("rows")) == (start, stop, stop - start)


def shard_mode() -> str:
    return os.environ.get("ROBENCH_SHARD_MODE", "contiguous")


def extract_shards(backbone: Backbone, dataset: Dataset, folder: Path, world: World,
                   stored: np.dtype, batch_size: int, num_workers: int, strict: bool,
                   progress: bool, name: str) -> list[Shard]:
    """Encode this rank's missing shards of ``dataset`` into ``folder``; return every shard of
    the dataset (all ranks'), in index order."""
    from robench.features import encoded_batches, loader, note_undecodable

    n = len(dataset)
    ranges = shard_ranges(n, batch_size)
    mine = [ranges[i] for i in assign(len(ranges), world, shard_mode())]
    todo = [(s, e) for s, e in mine if not is_done(folder, s, e)]
    log.info("features %s: rank %d extracts %d of its %d shard(s)", name, world.rank,
             len(todo), len(mine))
    folder.mkdir(parents=True, exist_ok=True)
    batches = [list(range(b, min(b + batch_size, e))) for s, e in todo
               for b in range(s, e, batch_size)]
    bar = tqdm(total=sum(e - s for s, e in todo), unit="img", leave=False, dynamic_ncols=True,
               desc=f"features {name} (rank {world.rank}: {len(todo)}/{len(mine)} shards)",
               disable=not (progress and world.is_lead))
    if batches:
        rows: list[np.ndarray] = []
        bad: list[int] = []
        current = iter(todo)
        start, stop = next(current)
        done = start
        for idx, f, ok in encoded_batches(backbone, loader(dataset, backbone, batch_size,
                                                           num_workers, batches), stored):
            if idx[0] != done:  # batches come in order; anything else is a bug
                raise AssertionError(f"shard batch at {idx[0]}, expected {done}")
            note_undecodable(bad, idx, ok, strict, dataset.source)
            rows.append(f)
            done += len(idx)
            bar.update(len(idx))
            if done == stop:  # the shard is complete: write it, metadata last
                npy, meta = shard_files(folder, start, stop)
                write_npy(npy, np.concatenate(rows), bound=bound(npy))
                write_json(meta, {"start": start, "stop": stop, "rows": stop - start,
                                  "bad": sorted(bad), "rank": world.rank}, bound=bound(meta))
                rows, bad = [], []
                start, stop = next(current, (stop, stop))
                done = start
    bar.close()
    return [(folder, s, e) for s, e in ranges]


def read_shards(shards: list[Shard], n: int) -> Iterator[tuple[np.ndarray, np.ndarray,
                                                                np.ndarray]]:
    """(indices, rows, decoded?) of each shard, after checking that every shard is complete and
    that their indices cover ``[0, n)`` exactly once (no padding, no duplicates)."""
    infos = []
    for folder, s, e in shards:
        npy, meta = shard_files(folder, s, e)
        if not is_done(folder, s, e):
            raise RobenchError(f"feature shard {npy.name} is missing or incomplete",
                               "re-run: the missing shards are extracted again")
        infos.append((npy, read_json(meta, bound(meta))))
    verify_cover((np.arange(i["start"], i["start"] + i["rows"]) for _, i in infos), n,
                 what="feature shards")
    for npy, info in infos:
        rows = load_npy(npy, bound=bound(npy))
        if rows.shape[0] != info["rows"]:
            raise RobenchError(f"feature shard {npy.name} holds {rows.shape[0]} rows, its "
                               f"metadata says {info['rows']}",
                               f"delete {npy.parent} and re-run (the shards are recomputed)")
        idx = np.arange(info["start"], info["stop"])
        ok = np.ones(len(idx), dtype=bool)
        ok[np.asarray(info["bad"], dtype=np.int64) - info["start"]] = False
        yield idx, rows, ok
