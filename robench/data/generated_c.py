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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from robench.data import cifar_c
from robench.data.base import ImageSource, LoadSettings
from robench.data.corrupt_set import generate_c_set, resolve_generation
from robench.data.corruptions import CORRUPTIONS, STANDARD_CORRUPTIONS
from robench.errors import RobenchError
from robench.options import Options, option


@dataclass(frozen=True)
class GeneratedCOptions(Options):
    """Options of the ``generated-c`` family (see the module docstring)."""

    base: str = option("", "the dataset whose images are corrupted", required=True)
    stride: int = option(1, "every k-th image of the base (1: all)", minimum=1)
    corruptions: Literal["standard", "all"] = option(
        "standard", "the 15 standard corruptions, or all 19")
    seed: int = option(0, "seed of the corruptions' random draws (a property of the set: every "
                       "run and model sees the same pixels)", minimum=0, maximum=2**32 - 1)
    protocol: Literal["auto", "cifar-c", "imagenet-c"] = option(
        "auto", "whose severity constants: cifar-c (make_cifar_c.py's, 32x32 only), "
        "imagenet-c (imagecorruptions'), auto (cifar-c for 32x32 images)")


def load(root: Path, name: str, options: GeneratedCOptions | None = None,
         settings: LoadSettings | None = None) -> ImageSource:
    """Generate the set into the cache if it is not there yet, then read it (``root`` is
    unused: the set lives in the cache)."""
    opts, settings = options or GeneratedCOptions(), settings or LoadSettings()
    src = base_source(name, opts.base, settings.source_of)
    opts = replace(opts, protocol=resolved_protocol(src, opts.protocol))
    out = output_dir(src, opts, settings.cache_dir)
    generate_c_set(src, out, rows=list(range(0, len(src), opts.stride)),
                   corruptions=corruption_names(opts.corruptions), seed=opts.seed,
                   workers=settings.workers, progress=settings.progress, protocol=opts.protocol)
    return read_generated(out, name, src, opts, settings)


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


def output_dir(src: ImageSource, opts: GeneratedCOptions, cache_dir: str | Path) -> Path:
    """Where the set of ``src`` with these options lives in the cache (content-addressed by the
    base's manifest, so changed base images make a new set; the resolved ``protocol`` is in
    the key, so a set made with other severity constants is never reused)."""
    names = corruption_names(opts.corruptions)
    key = hashlib.sha256(repr((src.manifest_hash, opts.stride, tuple(names), opts.seed,
                               resolved_protocol(src, opts.protocol))).encode())
    return Path(cache_dir).expanduser() / "corrupted" / key.hexdigest()[:24]


def is_generated(out: Path, corruptions: str) -> bool:
    """All corruption files and the labels are in place (generation finished)."""
    files = ["labels.npy", *(f"{c}.npy" for c in corruption_names(corruptions))]
    return all((out / f).is_file() for f in files)


def read_generated(out: Path, name: str, src: ImageSource, opts: GeneratedCOptions,
                   settings: LoadSettings | None = None) -> ImageSource:
    c = cifar_c.load(out, name, cifar_c.CifarCOptions(corruptions=opts.corruptions,
                                                      classnames=list(src.classnames)),
                     settings)
    c.info.update({"base": opts.base, "stride": opts.stride, "seed": opts.seed,
                   "generated": {**(c.info.get("generated") or {}), "stride": opts.stride}})
    return c
