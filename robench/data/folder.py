"""Generic image-folder layout: ``<root>/<class>/<image>``, classes sorted by folder name."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from robench.data.base import (
    IMAGE_EXTENSIONS,
    ImageSource,
    LoadSettings,
    content_manifest,
    open_rgb,
)
from robench.data.content import FileStats
from robench.errors import RobenchError
from robench.options import NoOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FolderOptions(NoOptions):
    """The folder family takes no options: the classes are the folder names, sorted."""


def scan(root: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """Class folders (sorted), image paths and integer labels under ``root``.

    Not classes, and said so: hidden folders (``.ipynb_checkpoints``, ``.git``), folders without
    images, and folders that are links back to ``root`` or above it (``selfdir -> .``); hidden
    files (``._x.jpg`` of macOS) are not images.
    """
    if not root.is_dir():
        raise RobenchError(
            f"dataset folder {root} does not exist",
            "set data_root=/path/to/data or data.<dataset>.root=/path (or ROBENCH_DATA)",
        )
    skipped: dict[str, str] = {}
    found: dict[str, list[Path]] = {}
    real_root = root.resolve()
    for p in sorted(_entries(root)):
        if p.is_symlink() and not p.exists():
            skipped[p.name] = "a broken or looping link"
            continue
        if not _is_dir(p):
            continue
        if p.name.startswith("."):
            skipped[p.name] = "hidden"
        elif p.is_symlink() and (real_root == _real(p) or real_root.is_relative_to(_real(p))):
            skipped[p.name] = "a link to the dataset folder itself or above it"
        elif not (files := sorted(f for f in _entries(p) if f.suffix.lower() in IMAGE_EXTENSIONS
                                  and not f.name.startswith(".") and f.is_file())):
            skipped[p.name] = "no images"
        else:
            found[p.name] = files
    if skipped:
        log.warning("%s: not class folders, skipped: %s", root,
                    "; ".join(f"{k} ({why})" for k, why in skipped.items()))
    classes = sorted(found)
    if not classes:
        raise RobenchError(f"{root} has no class folders with images; expected "
                           "<root>/<class>/<image>"
                           + (f" (skipped: {', '.join(skipped)})" if skipped else ""),
                           "point the root at the folder that contains one folder per class")
    paths: list[Path] = []
    labels: list[int] = []
    for idx, c in enumerate(classes):
        paths += found[c]
        labels += [idx] * len(found[c])
    return classes, paths, np.asarray(labels, dtype=np.int64)


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError as e:  # a symlink loop (ELOOP), a folder we may not read (EACCES)
        raise RobenchError(f"cannot list {folder}: {e.strerror}",
                           "fix or remove the link / the folder's permissions") from e


def _is_dir(p: Path) -> bool:
    try:
        return p.is_dir()
    except OSError:
        return False


def _real(p: Path) -> Path:
    try:
        return p.resolve(strict=True)
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop on Python < 3.13
        raise RobenchError(f"{p} is a broken or looping link", "fix or remove the link") from e


def _load(paths: list[Path], i: int):
    return open_rgb(paths[i])


def load(root: Path, name: str, options: FolderOptions | None = None,
         settings: LoadSettings | None = None) -> ImageSource:
    """Load an image folder; class names are folder names with ``_`` turned into spaces.

    The manifest hashes each file's relative path, size, label and content (see
    :func:`robench.data.base.content_manifest`)."""
    settings = settings or LoadSettings()
    classes, paths, labels = scan(root)
    files = FileStats()
    for p in paths:
        files.add(p.relative_to(root).as_posix(), p.stat())
    manifest, hashed = content_manifest(root, files, labels, settings.cache_dir,
                                        settings.progress, desc=name)
    return ImageSource(
        name=name,
        labels=labels,
        classnames=[c.replace("_", " ") for c in classes],
        manifest_hash=manifest,
        loader=partial(_load, paths),
        info={"root": str(root), "paths": files.rel, "files_hashed": hashed},
    )
