"""Generic image-folder layout: ``<root>/<class>/<image>``, classes sorted by folder name."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from robench.data.base import IMAGE_EXTENSIONS, ImageSource, content_manifest, open_rgb
from robench.data.content import FileStats
from robench.errors import RobenchError


def scan(root: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """Class folders (sorted), image paths and integer labels under ``root``."""
    if not root.is_dir():
        raise RobenchError(
            f"dataset folder {root} does not exist",
            "set data_root=/path/to/data or data.<dataset>.root=/path (or ROBENCH_DATA)",
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise RobenchError(f"{root} has no class folders; expected <root>/<class>/<image>",
                           "point the root at the folder that contains one folder per class")
    paths: list[Path] = []
    labels: list[int] = []
    for idx, c in enumerate(classes):
        files = sorted(p for p in (root / c).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += files
        labels += [idx] * len(files)
    if not paths:
        raise RobenchError(f"no images under {root}/<class>/", "check the dataset root")
    return classes, paths, np.asarray(labels, dtype=np.int64)


def _load(paths: list[Path], i: int):
    return open_rgb(paths[i])


def load(root: Path, name: str, cache_dir: str = "", progress: bool = False,
         **_: object) -> ImageSource:
    """Load an image folder; class names are folder names with ``_`` turned into spaces.

    The manifest hashes each file's relative path, size, label and content (see
    :func:`robench.data.base.content_manifest`)."""
    classes, paths, labels = scan(root)
    files = FileStats()
    for p in paths:
        files.add(p.relative_to(root).as_posix(), p.stat())
    manifest, hashed = content_manifest(root, files, labels, cache_dir, progress, desc=name)
    return ImageSource(
        name=name,
        labels=labels,
        classnames=[c.replace("_", " ") for c in classes],
        manifest_hash=manifest,
        loader=partial(_load, paths),
        info={"root": str(root), "paths": files.rel, "files_hashed": hashed},
    )
