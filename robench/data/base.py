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


# -- decoding: the one guarded path ---------------------------------------------------------------
class UndecodableImage(ValueError):
    """An image robench does not decode, and why: a run skips and counts it (``strict=true``
    fails naming it), ``robench data verify`` reports it. A ``ValueError``, so every reader that
    already skips what PIL cannot read (:data:`DECODE_ERRORS`) skips it too."""


#: What reading one image may raise when the file, not robench, is at fault.
DECODE_ERRORS = (OSError, ValueError, SyntaxError)

#: 16-bit greyscale modes (PIL opens 16-bit PNG / TIFF greyscale as one of them).
GREY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
#: Modes whose transparency is composited over white (see :func:`to_rgb`).
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
WHITE = (255, 255, 255, 255)


def max_pixels() -> int | None:
    """The most pixels robench decodes in one image: PIL's ``Image.MAX_IMAGE_PIXELS``
    (89,478,485 by default, about 9459 x 9459), read at each call. PIL only warns between that
    and twice it and refuses beyond; robench refuses both, before the pixels are decoded, so
    that a decompression bomb (a small file whose header claims e.g. 30000 x 30000) costs
    nothing. Whoever sets PIL's limit (None: no limit) sets robench's."""
    return Image.MAX_IMAGE_PIXELS


def open_rgb(path: Path) -> Image.Image:
    """Decode an image file fully (so truncation surfaces here, not later) as 8-bit RGB by the
    rules of :func:`to_rgb`, or raise :class:`UndecodableImage` naming why.

    Every file-based family reads its images through this function. Whatever PIL raises while
    reading the file counts as undecodable: its plugins raise ``OSError``, ``ValueError``,
    ``SyntaxError``, ``EOFError``, ``struct.error``, ``DecompressionBombError``, ... for files
    that are damaged or hostile, and a run must skip those, never stop with a traceback."""
    try:
        with Image.open(path) as im:
            _refuse_bomb(im)
            im.load()
            return to_rgb(im)
    except UndecodableImage:
        raise
    except Image.DecompressionBombError as e:
        raise UndecodableImage(f"decompression bomb: {e}") from e
    except Exception as e:  # any decoder failure is a fact about the file, not a crash
        raise UndecodableImage(f"{type(e).__name__}: {e}") from e


def _refuse_bomb(im: Image.Image) -> None:
    limit = max_pixels()
    w, h = im.size
    if limit is not None and w * h > limit:
        raise UndecodableImage(f"decompression bomb: {w}x{h} = {w * h} pixels, over the limit "
                               f"of {limit} (PIL.Image.MAX_IMAGE_PIXELS)")
    if w < 1 or h < 1:
        raise UndecodableImage(f"empty image ({w}x{h})")


def to_rgb(im: Image.Image) -> Image.Image:
    """An image of any mode as 8-bit RGB, by these rules:

    * 16-bit greyscale (``I;16``, ``I;16B``, ...) is scaled by 1/257, rounded
      (``(v + 128) // 257``): 0 -> 0, 65535 -> 255, 128 * 257 -> 128, the inverse of the usual
      8 -> 16 bit widening ``v * 257``. PIL's own conversion clips at 255, turning almost every
      16-bit image white.
    * 32-bit integer ``I`` images holding values in 0..65535 are 16-bit samples (how Pillow
      before 10 opens 16-bit PNGs) and are scaled the same way; other ``I`` images, signed 16-bit
      modes and floating-point ``F`` images have no defined 8-bit scale and are refused by name.
    * Transparency (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, and ``P`` / ``L`` / ``RGB``
      images with a ``transparency`` entry) is composited over white, as a browser or an image
      viewer shows the image on a page. Dropping the alpha instead (PIL's ``convert("RGB")``,
      what open_clip's preprocessing does) shows whatever colour the transparent pixels happen
      to store, usually black: a black drawing on a transparent background (line art, sketches,
      logos) becomes an all-black image. Opaque pixels are unchanged, so an opaque image
      decodes exactly as before.
    * Everything else (``L``, ``P``, ``1``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGB``) is
      converted by PIL.
    """
    mode = im.mode
    if mode in GREY16_MODES:
        return _grey16(np.asarray(im))
    if mode == "I":
        px = np.asarray(im)
        if px.size and (px.min() < 0 or px.max() > 65535):
            raise UndecodableImage(f"mode I image with values {px.min()}..{px.max()}: not "
                                   "16-bit samples, and no defined 8-bit scale")
        return _grey16(px)
    if mode == "F" or mode.startswith("I;"):
        raise UndecodableImage(f"mode {mode} image: {'floating-point' if mode == 'F' else 'signed'}"
                               " samples have no defined 8-bit scale")
    if mode in ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    return im.convert("RGB")


def _grey16(px: np.ndarray) -> Image.Image:
    """16-bit grey samples -> 8-bit RGB, ``(v + 128) // 257``."""
    grey = ((px.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def read_image(source: ImageSource, i: int) -> Image.Image:
    """Image ``i`` of ``source``, or :class:`UndecodableImage` naming why: the one function
    through which a run (feature extraction) and ``robench data verify`` read an image, so that
    both skip the same ones. A loader's own decode failure (one that does not go through
    :func:`open_rgb`) is named the same way."""
    try:
        im = source.load_image(i)
    except UndecodableImage:
        raise
    except (*DECODE_ERRORS, Image.DecompressionBombError) as e:
        raise UndecodableImage(f"{type(e).__name__}: {e}") from e
    if im.width < 1 or im.height < 1:
        raise UndecodableImage(f"empty image ({im.width}x{im.height})")
    return im


def check_pixel_array(what: str, pixels: np.ndarray, row_shape: tuple[int, ...] = (32, 32, 3),
                      rows: int | None = None) -> np.ndarray:
    """``pixels`` if it is a uint8 array of shape (N, *row_shape) (N = ``rows`` when given), else
    a named error: a float or wider integer array cast to uint8 wraps around (256 -> 0,
    1.0 -> 1), which would score noise as if it were the images."""
    from robench.errors import RobenchError

    arr = np.asarray(pixels)
    expected = f"uint8 ({rows if rows is not None else 'N'}, {', '.join(map(str, row_shape))})"
    if arr.dtype != np.uint8:
        raise RobenchError(f"{what} holds {arr.dtype} pixels {tuple(arr.shape)}, expected "
                           f"{expected}: robench reads 8-bit pixels as they are and does not "
                           "cast other types (a cast wraps around)",
                           "store the images as uint8 0..255 (or re-extract the released files)")
    if arr.ndim != 1 + len(row_shape) or arr.shape[1:] != row_shape or (
            rows is not None and arr.shape[0] != rows):
        raise RobenchError(f"{what} is {arr.dtype}{tuple(arr.shape)}, expected {expected}",
                           "re-extract or regenerate the file")
    return arr
