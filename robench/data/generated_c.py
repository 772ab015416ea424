"""A -C set generated on demand from another registered dataset and kept in the cache.

Options: ``base`` (dataset name), ``stride`` (every k-th image of the base, for a quick set),
``corruptions`` (``standard`` or ``all``), ``seed`` (a property of the dataset, not of the run, so
every run and every model sees the same corrupted pixels), ``protocol`` (``auto``, ``cifar-c``
or ``imagenet-c``: whose severity constants, see :mod:`robench.data.corrupt_set`; ``auto`` is
``cifar-c`` for the 32x32 images this npy-layout family holds). The resolved protocol is part
of the cache key and of the set's ``info["generated"]``, which the result record carries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from robench.data import cifar_c
from robench.data.base import ImageSource
from robench.data.corrupt_set import generate_c_set, resolve_generation
from robench.data.corruptions import CORRUPTIONS, STANDARD_CORRUPTIONS
from robench.errors import RobenchError


def load(root: Path, name: str, base: str = "", stride: int = 1, corruptions: str = "standard",
         seed: int = 0, cache_dir: str = "", source_of: Callable | None = None,
         progress: bool = True, workers: int = 2, protocol: str = "auto",
         **_: object) -> ImageSource:
    """Generate the set into the cache if it is not there yet, then read it."""
    src = base_source(name, base, source_of)
    protocol = resolved_protocol(src, protocol)
    out = output_dir(src, stride, corruptions, seed, cache_dir, protocol)
    generate_c_set(src, out, rows=list(range(0, len(src), stride)),
                   corruptions=corruption_names(corruptions), seed=seed, workers=workers,
                   progress=progress, protocol=protocol)
    return read_generated(out, name, src, base, stride, corruptions, seed, cache_dir, progress)


def resolved_protocol(src: ImageSource, protocol: str) -> str:
    """``auto`` -> ``cifar-c`` for 32x32 base images; an explicit protocol checked."""
    return resolve_generation(src, 0, protocol, "none", "npy")[0]


def base_source(name: str, base: str, source_of: Callable | None) -> ImageSource:
    if not base or source_of is None:
        raise RobenchError(f"{name}: a generated -C dataset needs options.base",
                           "declare options: {base: <dataset name>}")
    return source_of(base)


def corruption_names(corruptions: str) -> tuple[str, ...]:
    return STANDARD_CORRUPTIONS if corruptions == "standard" else CORRUPTIONS


def output_dir(src: ImageSource, stride: int, corruptions: str, seed: int,
               cache_dir: str | Path, protocol: str) -> Path:
    """Where the set of ``src`` with these options lives in the cache (content-addressed by the
    base's manifest, so changed base images make a new set; the resolved ``protocol`` is in
    the key, so a set made with other severity constants is never reused)."""
    names = corruption_names(corruptions)
    key = hashlib.sha256(repr((src.manifest_hash, stride, tuple(names), seed,
                               resolved_protocol(src, protocol))).encode())
    return Path(cache_dir).expanduser() / "corrupted" / key.hexdigest()[:24]


def is_generated(out: Path, corruptions: str) -> bool:
    """All corruption files and the labels are in place (generation finished)."""
    files = ["labels.npy", *(f"{c}.npy" for c in corruption_names(corruptions))]
    return all((out / f).is_file() for f in files)


def read_generated(out: Path, name: str, src: ImageSource, base: str, stride: int,
                   corruptions: str, seed: int, cache_dir: str | Path = "",
                   progress: bool = False) -> ImageSource:
    c = cifar_c.load(out, name=name, corruptions=corruptions, classnames=src.classnames,
                     cache_dir=cache_dir, progress=progress)
    c.info.update({"base": base, "stride": stride, "seed": seed,
                   "generated": {**(c.info.get("generated") or {}), "stride": stride}})
    return c
