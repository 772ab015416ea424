"""ImageNet-family datasets in their released on-disk layouts.

Two families (registered in ``robench/data/__init__.py``):

``imagenet-folder`` -- ``<root>/<wnid>/<image>``: ImageNet val (1000 folders), ImageNet-R and
ImageNet-A (200 folders each, ``subset=imagenet-r|imagenet-a``), ImageNet-Sketch (1000 folders,
often under ``sketch/``). Label rule: label = index of the folder's wnid in the 1000 ImageNet wnids
(``metadata/imagenet_wnids.txt``, sorted, so "sorted wnid" and "1k index" agree). For val this is
torchvision ImageFolder's rule; for R and A it is not (ImageFolder numbers their 200 folders
0..199), so their labels stay in the 1k space and ``ImageSource.class_subset`` lists the 200
1k-indices the logits are restricted to (each set its own list; 86 wnids are common to both).

``imagenet-v2`` -- ``<root>/<k>/<image>`` with k = 0..999 (the released tars extract to
``imagenetv2-<variant>-format-val/``): label = ``int(k)``. Sorting these folder names as strings
(ImageFolder) puts "10" third and mislabels 990 of the 1000 classes.

Every source carries the 1000 CLIP ImageNet class names (open_clip's ``IMAGENET_CLASSNAMES``), so
one zero-shot head serves the whole family; ``class_subset`` is None except for R and A.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

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
from robench.options import Options, option

log = logging.getLogger(__name__)

METADATA = Path(__file__).resolve().parent / "metadata"
WNID_RE = re.compile(r"^n\d{8}$")
SUBSETS = {"imagenet-r": "imagenet_r_wnids.txt", "imagenet-a": "imagenet_a_wnids.txt"}
SUBSET_TITLES = {"imagenet-r": "ImageNet-R", "imagenet-a": "ImageNet-A"}
FLAT_VAL_PREFIX = "ILSVRC2012_val_"


@dataclass(frozen=True)
class V2Options(Options):
    """Options of the ``imagenet-v2`` family."""

    nested: list[str] = option([], "sub-folders the class folders may sit in (the released "
                               "archive's top folder)")


@dataclass(frozen=True)
class ImageNetFolderOptions(Options):
    """Options of the ``imagenet-folder`` family."""

    nested: list[str] = option([], "sub-folders the class folders may sit in (the released "
                               "archives add one: sketch/, imagenet-r/, ...)")
    subset: Literal["", "imagenet-r", "imagenet-a"] = option(
        "", "score over the 200 classes of ImageNet-R or -A ('': all 1000)")


# -- metadata -----------------------------------------------------------------------------------
def _read_lines(filename: str) -> tuple[str, ...]:
    return tuple((METADATA / filename).read_text().split())


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in 1k-index order (line i of ``imagenet_wnids.txt``)."""
    wnids = _read_lines("imagenet_wnids.txt")
    if len(wnids) != 1000 or list(wnids) != sorted(wnids):
        raise RobenchError(f"{METADATA / 'imagenet_wnids.txt'} is damaged ({len(wnids)} lines)",
                           "reinstall robench (the file ships with it)")
    return wnids


@functools.cache
def wnid_index() -> dict[str, int]:
    """wnid -> 1k index."""
    return {w: i for i, w in enumerate(imagenet_wnids())}


@functools.cache
def subset_wnids(subset: str) -> tuple[str, ...]:
    """The 200 wnids of ImageNet-R (``imagenet-r``) or ImageNet-A (``imagenet-a``)."""
    if subset not in SUBSETS:
        from robench.errors import unknown

        raise unknown("ImageNet class subset", subset, SUBSETS,
                      fix="set options.subset to imagenet-r or imagenet-a (or leave it out)")
    wnids = _read_lines(SUBSETS[subset])
    index = wnid_index()
    if len(wnids) != 200 or any(w not in index for w in wnids):
        raise RobenchError(f"{METADATA / SUBSETS[subset]} is damaged",
                           "reinstall robench (the file ships with it)")
    return wnids


def subset_indices(subset: str) -> list[int]:
    """The 1k indices of a 200-class subset, ascending (the order of its logit columns)."""
    index = wnid_index()
    return sorted(index[w] for w in subset_wnids(subset))


@functools.cache
def imagenet_classnames() -> tuple[str, ...]:
    """The 1000 CLIP ImageNet class names, from ``open_clip.zero_shot_metadata``.

    The module is pure data; it is executed on its own (without importing the ``open_clip``
    package, which pulls in torch and costs seconds) so ``robench data verify`` stays fast.
    """
    mod = sys.modules.get("open_clip.zero_shot_metadata")
    if mod is None:
        spec = importlib.util.find_spec("open_clip")
        origin = spec.origin if spec is not None else None
        path = Path(origin).with_name("zero_shot_metadata.py") if origin else None
        mspec = (importlib.util.spec_from_file_location("_robench_zero_shot_metadata", path)
                 if path is not None and path.is_file() else None)
        if mspec is not None and mspec.loader is not None:
            mod = importlib.util.module_from_spec(mspec)
            mspec.loader.exec_module(mod)
        else:  # unusual install layout: import it the ordinary way
            from open_clip import zero_shot_metadata as mod
    names = tuple(mod.IMAGENET_CLASSNAMES)
    if len(names) != 1000:
        raise RobenchError(f"open_clip's IMAGENET_CLASSNAMES has {len(names)} entries, not 1000",
                           "install a released open_clip_torch (pip install -U open_clip_torch)")
    return names


# -- scanning -----------------------------------------------------------------------------------
def _fix_root(name: str, layout: str) -> str:
    return (f"set data.{name}.root to the folder holding {layout} (data_root=DIR or "
            f"$ROBENCH_DATA sets the parent folder of all datasets); `robench data download "
            f"{name}` fetches it or explains how to get it")


def _require_dir(root: Path, name: str, layout: str) -> None:
    if root.is_file():
        hint = (" -- it looks like the downloaded archive: extract it first"
                if root.name.endswith((".tar", ".tar.gz", ".tgz", ".zip")) else "")
        raise RobenchError(f"{name}: {root} is a file, not a folder{hint}", _fix_root(name, layout))
    if not root.is_dir():
        raise RobenchError(f"{name}: dataset folder {root} does not exist",
                           _fix_root(name, layout))


def _child_dirs(root: Path) -> list[str]:
    """Names of the visible sub-folders of ``root`` (hidden ones such as .ipynb_checkpoints are
    not classes)."""
    with os.scandir(root) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _images_in(folder: Path) -> tuple[list[tuple[str, os.stat_result]], list[str]]:
    """(image file name, stat) pairs sorted by name, and the names of skipped non-image entries.
    The stat (size, mtime, ctime) keys the content index (``robench.data.content``)."""
    images, skipped = [], []
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                images.append((e.name, e.stat()))
            else:
                skipped.append(e.name)
    return sorted(images, key=lambda x: x[0]), sorted(skipped)


def _locate(root: Path, nested: Sequence[str], looks_right: Callable[[list[str]], bool]) -> Path:
    """``root`` itself, or the first of ``root/<nested>`` whose class folders look right (the
    released archives add a top folder: ``sketch/``, ``imagenet-r/``, ...). When none does,
    ``root`` is returned and the caller's diagnosis explains what is there instead."""
    if looks_right(_child_dirs(root)):
        return root
    for sub in nested:
        cand = root / sub
        if cand.is_dir() and looks_right(_child_dirs(cand)):
            return cand
    return root


def _flat_images(root: Path) -> list[str]:
    with os.scandir(root) as it:
        return [e.name for e in it
                if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS]


def _short(items: Sequence[object], k: int = 5) -> str:
    shown = ", ".join(str(x) for x in list(items)[:k])
    return shown + (f", ... ({len(items)} in all)" if len(items) > k else "")


def _scan(root: Path, folders: list[tuple[str, int]]) -> tuple[list[Path], np.ndarray,
                                                               FileStats, list[str]]:
    """Image paths, labels, file stats and skipped entries of ``(folder, label)`` pairs."""
    paths: list[Path] = []
    labels: list[int] = []
    files = FileStats()
    skipped: list[str] = []
    for folder, label in folders:
        images, other = _images_in(root / folder)
        skipped += [f"{folder}/{s}" for s in other]
        for fname, st in images:
            paths.append(root / folder / fname)
            labels.append(label)
            files.add(f"{folder}/{fname}", st)
    return paths, np.asarray(labels, dtype=np.int64), files, skipped


def _open(paths: list[Path], i: int):
    return open_rgb(paths[i])


def _source(name: str, root: Path, paths: list[Path], labels: np.ndarray, files: FileStats,
            skipped: list[str], missing: list[str], layout: str, rule: str,
            class_subset: list[int] | None, settings: LoadSettings) -> ImageSource:
    if not paths:
        raise RobenchError(f"{name}: the class folders under {root} hold no images "
                           f"(extensions {', '.join(IMAGE_EXTENSIONS)})",
                           "the extraction is incomplete: extract the archive again")
    if missing:
        log.warning("%s: %d class folder(s) missing under %s: %s", name, len(missing), root,
                    _short(missing))
    manifest, hashed = content_manifest(root, files, labels, settings.cache_dir,
                                        settings.progress, desc=name)
    return ImageSource(
        name=name,
        labels=labels,
        classnames=list(imagenet_classnames()),
        manifest_hash=manifest,
        loader=partial(_open, paths),
        class_subset=class_subset,
        info={"root": str(root), "layout": layout, "label_rule": rule,
              "paths": files.rel, "missing_classes": missing,
              "skipped_files": skipped, "files_hashed": hashed},
    )


# -- imagenet-folder ----------------------------------------------------------------------------
def load_folder(root: Path, name: str, options: ImageNetFolderOptions | None = None,
                settings: LoadSettings | None = None) -> ImageSource:
    """``<root>/<wnid>/<image>``; label = 1k index of the wnid (= index in sorted wnids).

    ``subset`` (``imagenet-r`` / ``imagenet-a``): the folders must be that set's 200 classes and
    the source is scored over them (``class_subset``). ``nested``: sub-folders the class folders
    may sit in (``sketch`` for ImageNet-Sketch's zip, ``val`` for an ``imagenet/`` root).
    """
    options, settings = options or ImageNetFolderOptions(), settings or LoadSettings()
    subset, nested = options.subset, options.nested
    layout = "<wnid>/*.JPEG class folders"
    _require_dir(root, name, layout)
    root = _locate(root, nested, lambda dirs: any(WNID_RE.match(d) for d in dirs))
    dirs = _child_dirs(root)
    wnids = [d for d in dirs if WNID_RE.match(d)]
    if not wnids:
        _no_wnid_folders(root, name, dirs)
    other = [d for d in dirs if not WNID_RE.match(d)]
    if other:
        raise RobenchError(
            f"{name}: {root} mixes wnid class folders with other folders: {_short(other)}",
            "move the extra folders out of the dataset folder (every folder is a class)")
    index = wnid_index()
    not_1k = [w for w in wnids if w not in index]
    if not_1k:
        raise RobenchError(
            f"{name}: {len(not_1k)} folder(s) under {root} are not ImageNet-1k wnids: "
            f"{_short(not_1k)}", "this is not an ImageNet-1k-labelled folder; check the root")
    class_subset = None
    if subset:
        allowed = set(subset_wnids(subset))
        title = SUBSET_TITLES[subset]
        outside = [w for w in wnids if w not in allowed]
        if outside:
            hint = ""
            for other_subset, other_title in SUBSET_TITLES.items():
                if other_subset != subset and set(wnids) <= set(subset_wnids(other_subset)):
                    hint = f" (all {len(wnids)} folders are {other_title} classes: is this " \
                           f"{other_title}?)"
            if not hint and len(wnids) > 200:
                hint = f" ({len(wnids)} class folders: is this a 1000-class set?)"
            raise RobenchError(
                f"{name}: {len(outside)} folder(s) under {root} are not among the 200 {title} "
                f"classes: {_short(outside)}{hint}",
                f"point data.{name}.root at the extracted {title} folder "
                f"({subset}/<wnid>/*.jpg, 200 folders)")
        expected = sorted(allowed)
        class_subset = subset_indices(subset)
        rule = (f"label = 1k index of the wnid folder; scored over the 200 {title} classes "
                "of 1000 (logits restricted to class_subset)")
    else:
        expected = list(imagenet_wnids())
        rule = "label = index of the wnid folder in the 1000 sorted ImageNet wnids"
    missing = sorted(set(expected) - set(wnids))
    paths, labels, files, skipped = _scan(root, [(w, index[w]) for w in wnids])
    return _source(name, root, paths, labels, files, skipped, missing,
                   "imagenet-folder: <root>/<wnid>/<image>", rule, class_subset, settings)


def _no_wnid_folders(root: Path, name: str, dirs: list[str]) -> None:
    """Explain why ``root`` holds no wnid folders, and raise."""
    expected = "<root>/<wnid>/*.JPEG (folders named like n01440764)"
    if not dirs:
        flat = _flat_images(root)
        if flat and any(f.startswith(FLAT_VAL_PREFIX) for f in flat):
            raise RobenchError(
                f"{name}: {root} holds {len(flat)} images directly (the flat "
                f"{FLAT_VAL_PREFIX}*.JPEG release), not one folder per wnid",
                "sort the images into <wnid>/ folders with the devkit's ground truth, e.g. "
                "torchvision.datasets.ImageNet(root, split='val') (needs "
                "ILSVRC2012_devkit_t12.tar.gz beside ILSVRC2012_img_val.tar) or the widely used "
                f"valprep.sh; then set data.{name}.root to the sorted folder")
        what = f"{len(flat)} loose images and no folders" if flat else "no folders"
        raise RobenchError(f"{name}: {root} has {what}; expected {expected}",
                           _fix_root(name, "one folder per wnid"))
    if all(d.isdigit() for d in dirs):
        raise RobenchError(
            f"{name}: the folders of {root} are integers ({_short(dirs)}) -- the ImageNet-V2 "
            f"layout (<root>/<0..999>/); {name} expects {expected}",
            f"if this is ImageNet-V2, use an imagenet-v2-* dataset; otherwise set data.{name}.root "
            "to the wnid-folder copy")
    for d in dirs:  # one level down? (e.g. root = imagenet/ holding train/ and val/)
        below = _child_dirs(root / d)
        if any(WNID_RE.match(x) for x in below):
            raise RobenchError(
                f"{name}: no wnid folders directly under {root}, but {root / d} has them",
                f"set data.{name}.root={root / d}")
        if below and all(x.isdigit() for x in below):
            raise RobenchError(
                f"{name}: {root / d} holds integer class folders (the ImageNet-V2 layout), not "
                f"the {expected} that {name} expects",
                f"if this is ImageNet-V2, use an imagenet-v2-* dataset; otherwise set "
                f"data.{name}.root to the wnid-folder copy")
    raise RobenchError(f"{name}: no wnid class folders under {root} (found {_short(dirs)}); "
                       f"expected {expected}", _fix_root(name, "one folder per wnid"))


# -- imagenet-v2 --------------------------------------------------------------------------------
def _decimal(name: str) -> bool:
    """ASCII digits only: ``str.isdigit`` is also true of '¹' or '٣', which ``int`` refuses or
    reads as another number."""
    return name.isascii() and name.isdigit()


def load_v2(root: Path, name: str, options: V2Options | None = None,
            settings: LoadSettings | None = None) -> ImageSource:
    """ImageNet-V2: ``<root>/<k>/*.jpeg`` for k in 0..999; label = ``int(k)`` (NOT the position
    of "k" among the folder names sorted as strings, which is what ImageFolder would use).

    ``nested``: the released tar's top folder (``imagenetv2-matched-frequency-format-val``...),
    so the root may point at the folder it was extracted into as well as at that folder itself.
    """
    options, settings = options or V2Options(), settings or LoadSettings()
    nested = options.nested
    layout = "<0..999>/*.jpeg class folders"
    _require_dir(root, name, layout)
    auto = [d for d in _child_dirs(root) if d.startswith("imagenetv2-") and d.endswith("-val")]
    root = _locate(root, [*nested, *auto], lambda dirs: any(_decimal(d) for d in dirs))
    dirs = _child_dirs(root)
    numeric = [d for d in dirs if _decimal(d)]
    if not numeric:
        wnids = [d for d in dirs if WNID_RE.match(d)]
        if wnids:
            raise RobenchError(
                f"{name}: imagenet-v2 folders are wnids; expected 0..999 (found {_short(wnids)} "
                f"under {root}). The released ImageNet-V2 names its class folders by 1k index",
                f"re-extract the released tar (`robench data download {name}`), or declare the "
                "dataset inline with family: imagenet-folder, which maps wnid folders to 1k "
                "indices")
        raise RobenchError(f"{name}: no class folders 0..999 under {root} "
                           f"(found {_short(dirs) if dirs else 'no folders'})",
                           _fix_root(name, "the folders 0 .. 999"))
    bad = [d for d in numeric if str(int(d)) != d or int(d) >= 1000]
    other = [d for d in dirs if not _decimal(d)]
    if bad or other:
        raise RobenchError(
            f"{name}: folder names under {root} are not all class indices 0..999 "
            f"(unexpected: {_short(bad + other)})",
            "the ImageNet-V2 folders are named 0, 1, ..., 999 (no padding); move other folders "
            "out or re-extract the released tar")
    folders = sorted(((d, int(d)) for d in numeric), key=lambda f: f[1])  # numeric order
    missing = [str(k) for k in sorted(set(range(1000)) - {k for _, k in folders})]
    paths, labels, files, skipped = _scan(root, folders)
    return _source(name, root, paths, labels, files, skipped, missing,
                   "imagenet-v2: <root>/<0..999>/<image>",
                   "label = int(folder name) (not the string-sorted folder position)", None,
                   settings)
