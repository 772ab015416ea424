"""What every dataset family returns: an indexable source of labelled images plus a manifest."""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from robench.data.content import FileStats, content_digests

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")


class ArrayRows(ABC):
    """A loader whose images are rows of uint8 (N, H, W, 3) arrays (CIFAR, the CIFAR-C npy
    layout): image ``i`` as PIL (``__call__``, what every loader does), or the rows ``idx`` as
    one array (``batch``), which feature extraction converts a whole batch at a time
    (``robench.features.array_normalization``)."""

    @abstractmethod
    def __call__(self, i: int) -> Image.Image: ...

    @abstractmethod
    def batch(self, idx: np.ndarray) -> np.ndarray: ...


@dataclass
class ImageSource:
    """A dataset as robench sees it.

    ``labels`` index ``classnames``; ``groups`` (optional) split the rows into named sub-cells
    (e.g. ``gaussian_noise/3`` of a -C set), each scored separately. ``class_subset`` lists the
    label-space indices a model is scored over (ImageNet-R/-A score 200 of 1000 classes).
    """

    name: str
    labels: np.ndarray
    classnames: list[str]
    manifest_hash: str
    loader: object  # callable(i) -> PIL.Image; an ArrayRows also gives whole batches
    groups: dict[str, np.ndarray] | None = None
    summary_groups: list[str] | None = None  # groups averaged into the headline numbers
    class_subset: list[int] | None = None
    info: dict = field(default_factory=dict)
    base_index: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.labels = check_labels(self.name, self.labels, len(self.classnames))
        if self.base_index is not None and np.shape(self.base_index) != self.labels.shape:
            raise ValueError(f"{self.name}: base_index has shape {np.shape(self.base_index)}, "
                             f"the labels {self.labels.shape}")
        if len(self.classnames) == 1:
            log.warning("%s has a single class (%s): every prediction is right by "
                        "construction; check the dataset root", self.name, self.classnames[0])

    def __len__(self) -> int:
        return len(self.labels)

    def load_image(self, i: int) -> Image.Image:
        return self.loader(i)  # type: ignore[operator]


@dataclass(frozen=True)
class LoadSettings:
    """How a run reads a dataset: its settings, not the dataset's options (those are the
    family's typed ``Options``). ``cache_dir`` holds the content index, ``workers`` the processes
    that generate a -C set, ``source_of`` reads another dataset by name (a generated -C set's
    base)."""

    cache_dir: str | Path = ""
    progress: bool = False
    workers: int = 1
    source_of: Callable[[str], ImageSource] | None = None


def check_labels(name: str, labels: Sequence[int] | np.ndarray, n_classes: int) -> np.ndarray:
    """``labels`` as int64 class indices in ``[0, n_classes)``, or a named error: a float, a
    negative or an out-of-range label would index the wrong class (or crash) far downstream."""
    from robench.errors import RobenchError

    arr = np.asarray(labels)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise RobenchError(f"{name}: labels are {arr.dtype}{tuple(arr.shape)}, not integer class "
                           "indices of shape (N,)", "store labels as integers (e.g. int64)")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        bad = sorted(set(arr[(arr < 0) | (arr >= n_classes)].tolist()))[:5]
        hint = " (is this CIFAR-100-C under a CIFAR-10-C name?)" if n_classes == 10 and \
            arr.min() >= 0 and arr.max() < 100 else ""
        raise RobenchError(f"{name}: labels {bad} are outside 0..{n_classes - 1} (it has "
                           f"{n_classes} classes){hint}",
                           "point the root at the right dataset, or check the labels against "
                           "the class list")
    return arr


def hash_manifest(entries: list[tuple], chunk: int = 10_000) -> str:
    """sha256 of the sorted entries, JSON-encoded ``chunk`` at a time (one ``json.dumps`` per
    10,000 entries: ~1 s per million instead of ~3 s with one call per entry)."""
    h = hashlib.sha256()
    ordered = sorted(entries)
    for s in range(0, len(ordered), chunk):
        h.update(json.dumps(ordered[s:s + chunk]).encode())
        h.update(b"\n")
    return h.hexdigest()


def content_manifest(root: Path, files: FileStats, labels: Sequence[int],
                     cache_dir: str | Path | None = None, progress: bool = False,
                     desc: str = "") -> tuple[str, int]:
    """(manifest hash, files hashed now) of a labelled file set: sha256 over the sorted
    (relative path, size, label, content sha256) entries. The content digests come from the
    side index of :mod:`robench.data.content`, so a warm run reads no file; a file regenerated in
    place (same name and size, other pixels) changes the hash, a ``touch`` does not."""
    d = content_digests(root, files, cache_dir, progress=progress, desc=desc)
    entries = [(r, s, int(y), h) for r, s, y, h in
               zip(files.rel, files.sizes, labels, d.hex(), strict=True)]
    return hash_manifest(entries), d.n_hashed


def file_digests(paths: Sequence[Path], cache_dir: str | Path | None = None,
                 progress: bool = False) -> dict[Path, tuple[int, str]]:
    """path -> (size, content sha256) for a handful of large files (CIFAR pickles, -C ``.npy``
    files), through the side index of their folder: hashed in full once, then only stat-ed.
    Callers pass every such file of the folder (not only the split they read) so that two
    datasets sharing a folder (CIFAR test and train) keep one stable index."""
    out: dict[Path, tuple[int, str]] = {}
    by_folder: dict[Path, list[Path]] = {}
    for p in paths:
        by_folder.setdefault(p.parent, []).append(p)
    for folder, members in by_folder.items():
        files = FileStats()
        for p in sorted(members):
            files.add(p.name, p.stat())
        d = content_digests(folder, files, cache_dir, progress=progress, desc=folder.name)
        for p, size, h in zip(sorted(members), files.sizes, d.hex(), strict=True):
            out[p] = (size, h)
    return out


def open_rgb(path: Path) -> Image.Image:
    """Decode an image file fully (so truncation surfaces here, not later) as RGB."""
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")
