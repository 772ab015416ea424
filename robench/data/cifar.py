"""CIFAR-10 / CIFAR-100 in torchvision's python-pickle layout, read with torchvision's loader."""

from __future__ import annotations

import pickle
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100

from robench.data.base import ImageSource, file_digests, hash_manifest
from robench.errors import RobenchError

_CLASSES = {"cifar10": CIFAR10, "cifar100": CIFAR100}


def _unverified(cls: type) -> type:
    # torchvision verifies the md5 of every batch file on each load (~0.2 s) and cannot tell a
    # missing file from a wrong one; robench checks presence here and checksums in `data verify`.
    class Unverified(cls):  # type: ignore[valid-type, misc]
        def _check_integrity(self) -> bool:
            folder = Path(self.root) / self.base_folder
            return all((folder / f).is_file() for f, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:  # same as torchvision's, minus the md5 check
            with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
                meta = pickle.load(f, encoding="latin1")
            self.classes = meta[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    return Unverified


def _pixel(data: np.ndarray, i: int) -> Image.Image:
    return Image.fromarray(data[i])


def load(root: Path, name: str, variant: str = "cifar10", train: bool = False,
         cache_dir: str = "", progress: bool = False, **_: object) -> ImageSource:
    """Load the CIFAR test (or train) split; ``root`` holds ``cifar-10-batches-py`` (or is it)."""
    cls = _CLASSES[variant]
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
    ds = _unverified(cls)(str(root), train=train, download=False)
    files = [folder / f for f, _ in (cls.train_list if train else cls.test_list)]
    # every batch file is indexed (not only this split's) so that the test and train splits,
    # which share the folder, share one stable content index
    digests = file_digests([folder / f for f, _ in cls.train_list + cls.test_list], cache_dir,
                           progress)
    return ImageSource(
        name=name,
        labels=np.asarray(ds.targets, dtype=np.int64),
        # CLIP's CIFAR class names are torchvision's with '_' replaced by spaces
        classnames=[c.replace("_", " ") for c in ds.classes],
        manifest_hash=hash_manifest([(p.name, *digests[p]) for p in files]),
        loader=partial(_pixel, ds.data),
        info={"root": str(root), "split": "train" if train else "test"},
    )
