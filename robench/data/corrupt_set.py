"""Generate a -C set from any dataset: every image x corruption x severity, deterministic per
image (seeded by :func:`robench.data.corruptions.image_seed`), parallel across processes,
resumable per corruption file, written atomically.

32x32 sources are written in the CIFAR-10-C npy layout (``<out>/<corruption>.npy`` +
``labels.npy``), so a generated set is read by the same code as the released one. Larger images
are written in the ImageNet-C folder layout, ``<out>/<corruption>/<severity>/<class>/<file>``,
as JPEG at quality 85 as in ImageNet-C (PIL's encoder is deterministic, so the files are
bit-identical across runs).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from robench.data.base import ImageSource
from robench.data.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    STANDARD_CORRUPTIONS,
    corrupt,
    image_seed,
)
from robench.errors import RobenchError
from robench.io import CorruptEntry, load_npy, write_json, write_npy
from robench.progress import progress_bar

MANIFEST = "robench_c.json"
_SOURCE: ImageSource | None = None  # set in each worker by _init (fork: shared, not pickled)


def _init(source: ImageSource) -> None:
    global _SOURCE
    _SOURCE = source


def _task(args: tuple) -> tuple[str, int, np.ndarray, np.ndarray]:
    """Corrupt rows ``rows`` of the source with one corruption at one severity."""
    name, severity, rows, seed, key = args
    out = np.empty((len(rows), 32, 32, 3), dtype=np.uint8)
    for j, i in enumerate(rows):
        img = np.asarray(_SOURCE.load_image(int(i)), dtype=np.uint8)  # type: ignore[union-attr]
        if img.shape != (32, 32, 3):
            raise RobenchError(f"image {i} of {key} is {img.shape}, the npy layout needs 32x32x3",
                               "resize the source or use the folder layout")
        out[j] = corrupt(img, name, severity, image_seed(seed, key, int(i), name, severity))
    return name, severity, np.asarray(rows), out


def _folder_task(args: tuple) -> int:
    """Corrupt rows into ``<out>/<corruption>/<severity>/<relative path>.JPEG``; existing files
    are kept (resume), new ones written atomically."""
    from PIL import Image

    name, severity, rows, seed, key, out, rel_paths = args
    written = 0
    for i, rel in zip(rows, rel_paths, strict=True):
        dest = Path(out) / name / str(severity) / Path(rel).with_suffix(".JPEG")
        if dest.is_file():
            continue
        img = np.asarray(_SOURCE.load_image(int(i)), dtype=np.uint8)  # type: ignore[union-attr]
        px = corrupt(img, name, severity, image_seed(seed, key, int(i), name, severity))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        Image.fromarray(px).save(tmp, format="JPEG", quality=85)
        os.replace(tmp, dest)
        written += 1
    return written


def read_manifest(folder: Path) -> dict:
    """The manifest of a -C set written here (parameters, corruptions, class table); ``{}`` for a
    released set, which has none."""
    man = folder / MANIFEST
    return json.loads(man.read_text()) if man.is_file() else {}


def _claim(out: Path, params: dict, corruptions: Sequence[str], extra: dict) -> None:
    """Write ``out``'s manifest, refusing a folder that holds a set made with other ``params``
    (a resume must not mix two sets); the corruption list grows with each call."""
    old = read_manifest(out)
    if old and {k: old.get(k) for k in params} != params:
        raise RobenchError(f"{out} holds a -C set made from other data or parameters",
                           "choose another --out folder, or delete it to regenerate")
    done = old.get("corruptions") or []
    names = [c for c in CORRUPTIONS if c in done or c in corruptions]
    manifest = {**params, "corruptions": names, **extra}
    if json.loads(json.dumps(manifest)) != old:  # unchanged: a finished set is not rewritten
        write_json(out / MANIFEST, manifest)


def generate_c_folders(source: ImageSource, out: Path, corruptions: Sequence[str] =
                       STANDARD_CORRUPTIONS, severities: Sequence[int] = SEVERITIES,
                       seed: int = 0, workers: int = 2, chunk: int = 50,
                       progress: bool = True) -> Path:
    """Write the -C set of an image-folder source in the ImageNet-C folder layout."""
    paths = source.info.get("paths")
    if not paths:
        raise RobenchError(f"{source.name} has no file paths to mirror in a folder layout",
                           "use the npy layout (32x32 images) or a folder-based dataset")
    out.mkdir(parents=True, exist_ok=True)
    params = {"base": source.name, "base_manifest": source.manifest_hash, "seed": seed,
              "severities": list(severities), "layout": "imagenet-c folders"}
    folders: dict[str, int] = {}
    for rel, y in zip(paths, source.labels, strict=True):
        folder = Path(rel).parts[0] if len(Path(rel).parts) > 1 else ""
        if folders.setdefault(folder, int(y)) != int(y):
            raise RobenchError(f"{source.name}: folder {folder!r} holds images of two labels",
                               "the folder layout needs one class per folder")
    # the class table lets robench.data.imagenet_c read the set back with the source's labels
    _claim(out, params, corruptions, {"class_folders": folders,
                                      "classnames": list(source.classnames)})
    n = len(source)
    tasks = [(c, s, list(range(a, min(n, a + chunk))), seed, source.manifest_hash[:16], str(out),
              paths[a:a + chunk]) for c in corruptions for s in severities
             for a in range(0, n, chunk)]
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(max(1, workers), initializer=_init, initargs=(source,)) as pool:
        for _ in progress_bar(pool.imap_unordered(_folder_task, tasks), total=len(tasks),
                              unit="chunk", desc=f"corrupting {source.name}",
                              disable=not progress):
            pass
    return out


def generate_c_set(source: ImageSource, out: Path, rows: Sequence[int] | None = None,
                   corruptions: Sequence[str] = STANDARD_CORRUPTIONS,
                   severities: Sequence[int] = SEVERITIES, seed: int = 0, workers: int = 2,
                   chunk: int = 100, progress: bool = True) -> Path:
    """Write the -C set of ``source`` (optionally only ``rows`` of it) to ``out``.

    Finished corruption files are kept, so an interrupted generation resumes where it stopped.
    The manifest file records the base dataset's manifest hash and the parameters; a folder made
    with other parameters is refused rather than silently mixed.
    """
    rows = np.arange(len(source)) if rows is None else np.asarray(rows)
    params = {"base": source.name, "base_manifest": source.manifest_hash, "seed": seed,
              "rows": [int(r) for r in rows], "severities": list(severities),
              "generator": "imagecorruptions via robench.data.corruptions"}
    out.mkdir(parents=True, exist_ok=True)
    _claim(out, params, corruptions, {"classnames": list(source.classnames)})
    labels = np.tile(source.labels[rows], len(severities))
    try:
        same = np.array_equal(load_npy(out / "labels.npy"), labels)
    except CorruptEntry:
        same = False
    if not same:
        write_npy(out / "labels.npy", labels)
    todo = [c for c in corruptions if not (out / f"{c}.npy").is_file()]
    if not todo:
        return out
    n = len(rows)
    tasks = [(c, s, rows[a:a + chunk], seed, source.manifest_hash[:16])
             for c in todo for s in severities for a in range(0, n, chunk)]
    buffers = {c: np.empty((n * len(severities), 32, 32, 3), np.uint8) for c in todo}
    remaining = {c: sum(1 for t in tasks if t[0] == c) for c in todo}
    position = {int(r): k for k, r in enumerate(rows)}
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    bar = progress_bar(total=len(tasks), unit="chunk", desc=f"corrupting {source.name}",
                       disable=not progress, dynamic_ncols=True)
    with ctx.Pool(max(1, workers), initializer=_init, initargs=(source,)) as pool:
        for name, s, idx, imgs in pool.imap_unordered(_task, tasks):
            base = list(severities).index(s) * n
            buffers[name][[base + position[int(i)] for i in idx]] = imgs
            remaining[name] -= 1
            if remaining[name] == 0:  # a whole corruption file is ready: write it atomically
                write_npy(out / f"{name}.npy", buffers.pop(name))
            bar.update(1)
    bar.close()
    return out


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))
