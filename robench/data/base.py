"""What every dataset family returns: an indexable source of labelled images plus a manifest."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")


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
    loader: object  # callable(i) -> PIL.Image
    groups: dict[str, np.ndarray] | None = None
    summary_groups: list[str] | None = None  # groups averaged into the headline numbers
    class_subset: list[int] | None = None
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def load_image(self, i: int) -> Image.Image:
        return self.loader(i)  # type: ignore[operator]


def hash_manifest(entries: list[tuple]) -> str:
    """sha256 of a sorted, JSON-encoded list of (relative path, size, label, ...) entries.

    Path + size + label identifies a file set without decoding any image, so a second run can
    find its cached features without touching the pixels.
    """
    h = hashlib.sha256()
    for e in sorted(entries):
        h.update(json.dumps(e).encode())
        h.update(b"\n")
    return h.hexdigest()


def hash_files(paths: list[Path]) -> str:
    """sha256 over file contents (for a handful of pickles / .npy files)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def open_rgb(path: Path) -> Image.Image:
    """Decode an image file fully (so truncation surfaces here, not later) as RGB."""
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")
