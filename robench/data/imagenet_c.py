"""ImageNet-C folder layout (Hendrycks & Dietterich 2019):
``<root>/<corruption>/<severity 1..5>/<class folder>/<image>``.

The released ImageNet-C has wnid class folders (label = index in the 1000 sorted wnids). A set
written by ``robench data corrupt`` from any other folder dataset carries its own class folders;
its ``robench_c.json`` manifest maps them to labels and class names, so both read the same way.
Each (corruption, severity) is a group scored separately; the headline numbers average the 15
standard corruptions x 5 severities (or, for a generated set, the standard ones it was made with).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np

from robench.data.base import ImageSource, LoadSettings, content_manifest
from robench.data.content import FileStats
from robench.data.corrupt_set import MANIFEST, generation_info, read_manifest
from robench.data.corruptions import CORRUPTIONS, SEVERITIES, STANDARD_CORRUPTIONS
from robench.data.imagenet import (
    _child_dirs,
    _images_in,
    _open,
    _short,
    imagenet_classnames,
    wnid_index,
)
from robench.errors import RobenchError
from robench.options import Options, option


@dataclass(frozen=True)
class ImageNetCOptions(Options):
    """Options of the ``imagenet-c`` family."""

    corruptions: Literal["standard", "all"] = option(
        "standard", "the 15 standard corruptions, or all 19 folders present (the 4 extra ones "
        "are kept per group, never in the headline mean)")


def _label_table(root: Path) -> tuple[dict[str, int], list[str], list[str] | None]:
    """(class folder -> label, class names, corruptions the set was generated with or None)."""
    meta = read_manifest(root)
    if meta.get("class_folders") and meta.get("classnames"):
        table = {str(c): int(i) for c, i in meta["class_folders"].items()}
        return table, list(meta["classnames"]), list(meta.get("corruptions") or []) or None
    return wnid_index(), list(imagenet_classnames()), None


def load(root: Path, name: str, options: ImageNetCOptions | None = None,
         settings: LoadSettings | None = None) -> ImageSource:
    """Load a -C set in the ImageNet-C folder layout; ``corruptions`` = ``standard`` or ``all``."""
    options, settings = options or ImageNetCOptions(), settings or LoadSettings()
    corruptions = options.corruptions
    if not root.is_dir():
        raise RobenchError(f"{name}: dataset folder {root} does not exist",
                           f"set data.{name}.root to the folder holding <corruption>/<1..5>/"
                           "<class>/<image> (the extracted ImageNet-C, or the --out folder of "
                           "robench data corrupt)")
    table, classnames, generated = _label_table(root)
    wanted = STANDARD_CORRUPTIONS if corruptions == "standard" else CORRUPTIONS
    present = [c for c in wanted if (root / c).is_dir()]
    required = [c for c in (generated or STANDARD_CORRUPTIONS) if c in wanted]
    missing = [c for c in required if c not in present]
    if missing:
        found = _child_dirs(root)
        raise RobenchError(
            f"{name}: {root} lacks the corruption folder(s) {_short(missing)} "
            f"(found: {_short(found) or 'none'})",
            "extract every ImageNet-C archive (blur, digital, extra, noise, weather) into this "
            "folder, or finish the generation with robench data corrupt (it resumes)")
    paths: list[Path] = []
    labels: list[int] = []
    files = FileStats()
    groups: dict[str, np.ndarray] = {}
    for c in present:
        for s in SEVERITIES:
            folder = root / c / str(s)
            if not folder.is_dir():
                raise RobenchError(f"{name}: {folder} is missing (layout: <corruption>/<1..5>/"
                                   "<class>/<image>)", "re-extract or regenerate this corruption")
            start = len(paths)
            for cls in _child_dirs(folder):
                if cls not in table:
                    known = "ImageNet wnids" if generated is None else f"the classes in {MANIFEST}"
                    raise RobenchError(
                        f"{name}: class folder {c}/{s}/{cls} is not a known class (expected "
                        f"{known})", "check that the root is the -C set's folder")
                images, _skipped = _images_in(folder / cls)
                for fname, st in images:
                    paths.append(folder / cls / fname)
                    labels.append(table[cls])
                    files.add(f"{c}/{s}/{cls}/{fname}", st)
            groups[f"{c}/{s}"] = np.arange(start, len(paths))
            if len(paths) == start:
                raise RobenchError(f"{name}: {folder} holds no images",
                                   "re-extract or regenerate this corruption")
    standard = [c for c in present if c in STANDARD_CORRUPTIONS] or present
    # the base image of a row is its path within the corruption/severity folder
    within = ["/".join(rel.split("/")[2:]) for rel in files.rel]
    _, base = np.unique(np.asarray(within), return_inverse=True)
    manifest, hashed = content_manifest(root, files, labels, settings.cache_dir,
                                        settings.progress, desc=name)
    return ImageSource(
        name=name,
        labels=np.asarray(labels, dtype=np.int64),
        classnames=classnames,
        manifest_hash=manifest,
        loader=partial(_open, paths),
        groups=groups,
        summary_groups=[f"{c}/{s}" for c in standard for s in SEVERITIES],
        info={"root": str(root), "layout": "imagenet-c: <corruption>/<severity>/<class>/<image>",
              "label_rule": ("label = index of the wnid folder in the 1000 sorted ImageNet wnids"
                             if generated is None else f"label from the class table in {MANIFEST}"),
              # protocol, resize and base of a generated set; None for the released ImageNet-C
              "corruptions": present, "generated": generation_info(read_manifest(root)),
              "files_hashed": hashed},
        base_index=base.astype(np.int64).ravel(),
    )
