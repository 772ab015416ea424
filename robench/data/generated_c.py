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
from robench.io import CorruptEntry, discard, verify_file


def load(root: Path, name: str, base: str = "", stride: int = 1, corruptions: str = "standard",
         seed: int = 0, cache_dir: str = "", source_of: Callable | None = None,
         progress: bool = True, workers: int = 2, protocol: str = "auto",
         **_: object) -> ImageSource:
    """Generate the set into the cache if it is not there yet, then read it."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise RobenchError(f"{name}: options.stride={stride!r} must be an integer >= 1 (every "
                           "k-th image of the base)", "e.g. options: {stride: 8}, or 1 for all")
    src = base_source(name, base, source_of)
    protocol = resolved_protocol(src, protocol)
    out = output_dir(src, stride, corruptions, seed, cache_dir, protocol)
    drop_damaged(out)
    generate_c_set(src, out, rows=list(range(0, len(src), stride)),
                   corruptions=corruption_names(corruptions), seed=seed, workers=workers,
                   progress=progress, protocol=protocol)
    return read_generated(out, name, src, base, stride, corruptions, seed, cache_dir, progress)


def resolved_protocol(src: ImageSource, protocol: str) -> str:
    """``auto`` -> ``cifar-c`` for 32x32 base images; an explicit protocol checked."""
    return resolve_generation(src, 0, protocol, "none", "npy")[0]


_READING: list[str] = []  # generated sets whose base is being read (a cycle check)


def base_source(name: str, base: str, source_of: Callable | None) -> ImageSource:
    if not base or source_of is None:
        raise RobenchError(f"{name}: a generated -C dataset needs options.base",
                           "declare options: {base: <dataset name>}")
    if base == name or base in _READING:
        chain = " -> ".join([*_READING[_READING.index(base):], name, base]
                            if base in _READING else [name, base])
        raise RobenchError(f"{name}: options.base makes a cycle ({chain})",
                           "base a generated set on a clean dataset (e.g. options: {base: "
                           "cifar10-subset-test})")
    _READING.append(name)
    try:
        return source_of(base)
    finally:
        _READING.pop()


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


def drop_damaged(out: Path) -> None:
    """Remove every array of a generated set that fails its checksum (or has none), so the
    generation below rebuilds exactly those."""
    for f in sorted(out.glob("*.npy")) if out.is_dir() else []:
        try:
            verify_file(f)
        except CorruptEntry as e:
            discard(f, reason=f"generated -C set: {e.problem}")


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
