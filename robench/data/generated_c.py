"""A -C set generated on demand from another registered dataset and kept in the cache.

Options: ``base`` (dataset name), ``stride`` (every k-th image of the base, for a quick set),
``corruptions`` (``standard`` or ``all``), ``seed`` (a property of the dataset, not of the run, so
every run and every model sees the same corrupted pixels).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from robench.data import cifar_c
from robench.data.base import ImageSource
from robench.data.corrupt_set import generate_c_set
from robench.data.corruptions import CORRUPTIONS, STANDARD_CORRUPTIONS
from robench.errors import RobenchError


def load(root: Path, name: str, base: str = "", stride: int = 1, corruptions: str = "standard",
         seed: int = 0, cache_dir: str = "", source_of: Callable | None = None,
         progress: bool = True, workers: int = 2, **_: object) -> ImageSource:
    if not base or source_of is None:
        raise RobenchError(f"{name}: a generated -C dataset needs options.base",
                           "declare options: {base: <dataset name>}")
    src = source_of(base)
    rows = list(range(0, len(src), stride))
    names = STANDARD_CORRUPTIONS if corruptions == "standard" else CORRUPTIONS
    key = hashlib.sha256(repr((src.manifest_hash, stride, tuple(names), seed)).encode())
    out = Path(cache_dir).expanduser() / "corrupted" / key.hexdigest()[:24]
    generate_c_set(src, out, rows=rows, corruptions=names, seed=seed, workers=workers,
                   progress=progress)
    c = cifar_c.load(out, name=name, corruptions=corruptions, classnames=src.classnames,
                     cache_dir=cache_dir, progress=progress)
    c.info.update({"base": base, "stride": stride, "seed": seed, "generated": True})
    return c
