"""CIFAR-10 / CIFAR-100 in torchvision's python-pickle layout, read with torchvision's loader."""

from __future__ import annotations

import logging
import pickle
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
from robench.errors import RobenchError
from robench.options import Options, option

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Release:
    """The files of a CIFAR release in the python-pickle layout and their md5 sums: the table
    torchvision's ``CIFAR10`` / ``CIFAR100`` classes carry (``base_folder``, ``train_list``,
    ``test_list``, ``meta``), as data here because importing torchvision costs seconds of
    start-up (it imports torch); ``tests/test_data.py`` checks it equals torchvision's."""

    base_folder: str
    train_list: tuple[tuple[str, str], ...]
    test_list: tuple[tuple[str, str], ...]
    meta: dict


RELEASES = {
    "cifar10": Release(
        "cifar-10-batches-py",
        (("data_batch_1", "c99cafc152244af753f735de768cd75f"),
         ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
         ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
         ("data_batch_4", "634d18415352ddfa80567beed471001a"),
         ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")),
        (("test_batch", "40351d587109b95175f43aff81a1287e"),),
        {"filename": "batches.meta", "key": "label_names",
         "md5": "5ff9c542aee3614f3951f8cda6e48888"}),
    "cifar100": Release(
        "cifar-100-python",
        (("train", "16019d7e3df5f24257cddd939b257f8d"),),
        (("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
        {"filename": "meta", "key": "fine_label_names",
         "md5": "7973b15100ade9c7d40fb424638fde48"}),
}


# The only globals a CIFAR batch may name: numpy's array reconstructors (its arrays) and nothing
# that can run code. torchvision's loader calls pickle.load, which runs whatever a crafted file's
# __reduce__ names (os.system, ...), before any checksum; robench reads the batches itself with
# this allow-list instead (the same idea as torch.load(weights_only=True)).
SAFE_GLOBALS = {
    (m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in
    ("_reconstruct", "scalar")} | {
    (m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")} | {
    ("numpy", "ndarray"), ("numpy", "dtype")}


@dataclass(frozen=True)
class CifarOptions(Options):
    """Options of the ``cifar`` family."""

    variant: Literal["cifar10", "cifar100"] = option("cifar10", "which release (its batch files "
                                                     "and class names)")
    train: bool = option(False, "read the train split instead of the test split")


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch never does")


def read_batch(path: Path) -> dict:
    """One CIFAR batch file (a pickled dict of arrays and lists), never running code from it."""
    try:
        with open(path, "rb") as f:
            entry = _ArraysOnly(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise RobenchError(f"{path} is not a CIFAR batch file, refused: {e}",
                           "replace it with the released file (robench data download cifar10 "
                           "re-fetches and md5-checks it)") from e
    if not isinstance(entry, dict):
        raise RobenchError(f"{path} is not a CIFAR batch file (a {type(entry).__name__}, not a "
                           "dict)", "replace it with the released file")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}


def md5_mismatches(cls: Release, folder: Path, files: list[str]) -> list[str]:
    """The files of ``files`` whose md5 differs from torchvision's table of the release."""
    from robench.io import file_digest

    table = {f: md5 for f, md5 in (*cls.train_list, *cls.test_list)} | \
        {cls.meta["filename"]: cls.meta["md5"]}
    return [f for f in files if file_digest(folder / f, "md5") != table[f]]


def _read_split(cls: Release, folder: Path, train: bool) -> tuple[np.ndarray, list[int], list[str]]:
    """(N, 32, 32, 3) uint8 pixels, labels and class names, as torchvision's CIFAR10 has them."""
    data, labels = [], []
    for f, _ in cls.train_list if train else cls.test_list:
        entry = read_batch(folder / f)
        key = "labels" if "labels" in entry else "fine_labels"
        try:
            rows = np.asarray(entry["data"])
            labels += [int(v) for v in entry[key]]
        except (KeyError, ValueError, TypeError) as e:
            raise RobenchError(f"{folder / f} does not hold CIFAR data and labels ({e})",
                               "replace it with the released file") from e
        # (N, 3072) uint8 rows of CHW planes; another dtype is refused, never cast
        data.append(check_pixel_array(f"{folder / f}", rows, (3 * 32 * 32,))
                    .reshape(-1, 3, 32, 32))
    meta = read_batch(folder / cls.meta["filename"])
    classes = [str(c) for c in meta.get(cls.meta["key"], [])]
    pixels = np.concatenate(data).transpose(0, 2, 3, 1)  # CHW planes -> HWC, as torchvision
    if len(pixels) != len(labels):
        raise RobenchError(f"{folder}: {len(pixels)} images but {len(labels)} labels",
                           "replace the batch files with the released ones")
    return np.ascontiguousarray(pixels), labels, classes


class PixelRows(ArrayRows):
    """The images of one in-memory (N, H, W, 3) uint8 array."""

    def __init__(self, pixels: np.ndarray, what: str = "pixels") -> None:
        self.pixels = check_pixel_array(what, pixels, tuple(np.shape(pixels)[1:3]) + (3,))

    def __call__(self, i: int) -> Image.Image:
        return Image.fromarray(self.pixels[i])

    def batch(self, idx: np.ndarray) -> np.ndarray:
        return self.pixels[idx]


def load(root: Path, name: str, options: CifarOptions | None = None,
         settings: LoadSettings | None = None) -> ImageSource:
    """Load the CIFAR test (or train) split; ``root`` holds ``cifar-10-batches-py`` (or is it)."""
    options, settings = options or CifarOptions(), settings or LoadSettings()
    variant, train = options.variant, options.train
    cls = RELEASES[variant]
    if root.name == cls.base_folder:  # user pointed at the batches folder itself
        root = root.parent
    folder = root / cls.base_folder
    needed = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise RobenchError(
            f"{variant} not found: {folder} lacks {', '.join(missing)} "
            f"(expected torchvision's layout {cls.base_folder}/{{{', '.join(needed)}}})",
            f"run `robench data download {variant}` or set data.{name}.root to the folder "
            f"containing {cls.base_folder}",
        )
    if bad := md5_mismatches(cls, folder, needed):
        log.warning("%s: %s differ from the released CIFAR files (md5); read as plain arrays "
                    "only, and numbers are not comparable to published ones", name,
                    ", ".join(bad))
    pixels, targets, classes = _read_split(cls, folder, train)
    files = [folder / f for f, _ in (cls.train_list if train else cls.test_list)]
    # every batch file is indexed (not only this split's) so that the test and train splits,
    # which share the folder, share one stable content index
    digests = file_digests([folder / f for f, _ in cls.train_list + cls.test_list],
                           settings.cache_dir, settings.progress)
    return ImageSource(
        name=name,
        labels=np.asarray(targets, dtype=np.int64),
        # CLIP's CIFAR class names are torchvision's with '_' replaced by spaces
        classnames=[c.replace("_", " ") for c in classes],
        manifest_hash=hash_manifest([(p.name, *digests[p]) for p in files]),
        loader=PixelRows(pixels, str(folder)),
        info={"root": str(root), "split": "train" if train else "test",
              "md5_matches_release": not bad},
    )
