"""CIFAR-10-C / CIFAR-100-C layout (Hendrycks & Dietterich 2019): ``<root>/<corruption>.npy``,
uint8 (5N, 32, 32, 3), plus ``labels.npy`` (5N,); severity s is rows [(s-1)N, sN).

Each (corruption, severity) is a group scored separately; the headline numbers are the mean over
the 15 standard corruptions x 5 severities (the 4 extra ones are kept per group when present).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from robench.data.base import (
    ArrayRows,
    ImageSource,
    LoadSettings,
    check_pixel_array,
    file_digests,
    hash_manifest,
)
from robench.data.corrupt_set import bound, generation_info, read_manifest
from robench.data.corruptions import CORRUPTIONS, SEVERITIES, STANDARD_CORRUPTIONS
from robench.errors import RobenchError
from robench.io import CorruptEntry, verify_file
from robench.options import Options, option

CIFAR_CLASSNAMES = {
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck"],
    # torchvision's order (the release's fine_label_names), '_' -> ' ' as CLIP's prompts use them
    "cifar100": [c.replace("_", " ") for c in
                 (Path(__file__).resolve().parent / "metadata" / "cifar100_classes.txt")
                 .read_text().split()],
}


@dataclass(frozen=True)
class CifarCOptions(Options):
    """Options of the ``cifar-c`` family."""

    variant: Literal["cifar10", "cifar100"] = option(
        "cifar10", "whose class names, when the folder's manifest does not name them")
    corruptions: Literal["standard", "all"] = option(
        "all", "the 15 standard corruptions, or all 19 files present (the 4 extra ones "
        "are kept per group, never in the headline mean)")
    classnames: list[str] | None = option(None, "class names in label order (null: the "
                                          "manifest's, else the variant's)")


class NpyRows(ArrayRows):
    """Row i of the concatenated corruption files, memory-mapped lazily in each process (a
    DataLoader worker opens its own maps instead of receiving a pickled copy of the arrays)."""

    def __init__(self, paths: list[Path], rows_per_file: int) -> None:
        self.paths, self.rows = [str(p) for p in paths], rows_per_file
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {"paths": self.paths, "rows": self.rows, "_maps": {}}

    def __call__(self, i: int) -> Image.Image:
        f, r = divmod(int(i), self.rows)
        return Image.fromarray(np.ascontiguousarray(self._map(f)[r]))

    def _map(self, f: int) -> np.ndarray:
        if f not in self._maps:
            self._maps[f] = np.load(self.paths[f], mmap_mode="r")
        return self._maps[f]

    def batch(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` as one (B, H, W, 3) uint8 array, the files' row shape."""
        f, r = np.divmod(np.asarray(idx, dtype=np.int64), self.rows)
        out = np.empty((len(f), *self._map(0).shape[1:]), np.uint8)
        for file in np.unique(f):
            at = f == file
            out[at] = self._map(int(file))[r[at]]
        return out


def load(root: Path, name: str, options: CifarCOptions | None = None,
         settings: LoadSettings | None = None) -> ImageSource:
    """Load a -C set in the CIFAR-10-C npy layout; ``corruptions`` = ``standard`` or ``all``.

    The manifest hashes the full content of ``labels.npy`` and each corruption file read, through
    the content index (a full read of CIFAR-10-C's 2.9 GB once, then only ``stat`` calls)."""
    options, settings = options or CifarCOptions(), settings or LoadSettings()
    corruptions, variant = options.corruptions, options.variant
    if not root.is_dir():
        raise RobenchError(f"{name}: folder {root} does not exist",
                           f"set data.{name}.root to the folder holding <corruption>.npy files")
    labels_path = root / "labels.npy"
    if not labels_path.is_file():
        raise RobenchError(f"{name}: {labels_path} is missing (CIFAR-10-C layout: "
                           "<root>/<corruption>.npy + labels.npy)",
                           "point the root at the extracted CIFAR-10-C folder")
    # a set made by `robench data corrupt` says which corruptions it holds and its class names
    meta = read_manifest(root)
    wanted = STANDARD_CORRUPTIONS if corruptions == "standard" else CORRUPTIONS
    present = [c for c in wanted if (root / f"{c}.npy").is_file()]
    required = [c for c in (meta.get("corruptions") or STANDARD_CORRUPTIONS) if c in wanted]
    missing = [c for c in required if c not in present]
    if missing:
        raise RobenchError(f"{name}: {root} lacks {', '.join(f'{c}.npy' for c in missing)}",
                           "re-extract the archive (or regenerate with robench data corrupt)")
    labels5 = _load(labels_path, name)
    if labels5.ndim != 1 or labels5.dtype.kind not in "iu":
        raise RobenchError(f"{name}: labels.npy is {labels5.dtype}{tuple(labels5.shape)}, "
                           "expected integer class indices of shape (N,)",
                           "re-extract the archive (or regenerate with robench data corrupt)")
    if len(labels5) % len(SEVERITIES):
        raise RobenchError(f"{name}: labels.npy has {len(labels5)} rows, not a multiple of 5",
                           "the file is truncated; re-extract it")
    rows = len(labels5)
    check_generated(root, meta, ["labels.npy", *(f"{c}.npy" for c in present)], name)
    groups, files = {}, []
    for f_idx, c in enumerate(present):
        # uint8 (rows, 32, 32, 3), or a named error: a float file is refused, never cast
        check_pixel_array(f"{name}: {c}.npy", _load(root / f"{c}.npy", name, mmap_mode="r"),
                          rows=rows)
        files.append(root / f"{c}.npy")
        per = rows // len(SEVERITIES)
        for s in SEVERITIES:
            groups[f"{c}/{s}"] = np.arange(f_idx * rows + (s - 1) * per, f_idx * rows + s * per)
    # index every .npy of the folder, so a `standard` and an `all` view of it share one index
    digests = file_digests(sorted({*root.glob("*.npy"), labels_path}), settings.cache_dir,
                           settings.progress)
    names = options.classnames or meta.get("classnames") or CIFAR_CLASSNAMES[variant]
    return ImageSource(
        name=name,
        labels=np.tile(labels5.astype(np.int64), len(files)),
        classnames=list(names),
        manifest_hash=hash_manifest([(p.name, *digests[p]) for p in [labels_path, *files]]),
        loader=NpyRows(files, rows),
        groups=groups,
        summary_groups=[f"{c}/{s}" for c in
                        ([c for c in present if c in STANDARD_CORRUPTIONS] or present)
                        for s in SEVERITIES],
        # a generated set says so (protocol, resize, base); None for the released CIFAR-10-C
        info={"root": str(root), "corruptions": present, "rows_per_file": rows,
              "generated": generation_info(meta)},
        # row j of every severity block of every file is (a corruption of) base image j
        base_index=np.tile(np.arange(rows // len(SEVERITIES), dtype=np.int64),
                           len(SEVERITIES) * len(files)),
    )


def check_generated(root: Path, meta: dict, names: list[str], dataset: str) -> None:
    """A set robench generated (its manifest names the set) is read only if every file is
    intact, sealed and sealed as this file of this set: a swapped ``fog.npy`` / ``snow.npy``
    would give one corruption's groups the other's numbers. The released CIFAR-10-C has no
    seals and no manifest, and is identified by its content hash instead."""
    if not meta.get("set_id"):
        return
    for f in names:
        try:
            verify_file(root / f, bound(meta, f))
        except CorruptEntry as e:
            raise RobenchError(f"{dataset}: {e.problem}",
                               f"delete {root / f} and regenerate it with robench data corrupt "
                               f"(--out {root}; it resumes and rewrites only that file)") from e


def _load(path: Path, name: str, mmap_mode: str | None = None) -> np.ndarray:
    """An array of the set; a truncated, pickled (object) or foreign file is named, not raised."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise RobenchError(f"{name}: {path} is not a readable uint8 array ({e})",
                           "re-extract the archive (or regenerate with robench data corrupt)"
                           ) from e
