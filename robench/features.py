"""Image features, extracted once per (weights, preprocessing, precision, dataset manifest) and
kept in a content-addressed on-disk cache (``.npy``, memory-mapped on reuse), stored at the run's
precision: float32 for ``fp32`` runs (so an fp32 run scores exactly what the model computed),
float16 for ``fp16`` / ``bf16`` runs or when ``model.features_dtype=float16`` asks for half the
disk (top-1 is unchanged except on near-ties; the dtype is in the key and in the record).

Every head reads these features, so evaluating one more head costs a matrix product, not a pass
over the images; a second run of a suite decodes no image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from robench.data.base import DECODE_ERRORS, ImageSource, read_image
from robench.errors import RobenchError
from robench.io import (
    CorruptEntry,
    discard,
    entry_lock,
    load_npy,
    process_tag,
    read_json,
    reserve,
    seal_file,
    umask,
    write_error,
    write_json,
)
from robench.progress import progress_bar as tqdm  # a bar on a TTY, lines in a log

if TYPE_CHECKING:  # torch is imported only by extraction: reading cached features needs numpy
    import torch
    from torch.utils.data import DataLoader

    from robench.distributed import World
    from robench.models.backbone import Backbone

log = logging.getLogger(__name__)


FEATURE_DTYPES = ("auto", "float32", "float16")


def features_dtype(precision: str, requested: str = "auto") -> np.dtype:
    """The storage dtype of cached features: the run's precision unless asked otherwise."""
    if requested not in FEATURE_DTYPES:
        raise RobenchError(f"unknown model.features_dtype '{requested}'",
                           "use model.features_dtype=auto, float32 or float16")
    if requested == "auto":
        return np.dtype(np.float32 if precision == "fp32" else np.float16)
    return np.dtype(requested)


@dataclass
class FeatureSet:
    features: np.ndarray  # (N, D) float32/float16, L2-normalised, memory-mapped from the cache
    bad: list[int]  # rows whose image could not be decoded (their features are zeros)
    key: str
    cached: bool
    # wall time of the single-process extraction that wrote the entry (decode + encode), from
    # which methods estimate the cost of further passes; None when unknown (sharded, older)
    seconds: float | None = None


class _Preprocessed:
    """(preprocessed image or None, index): a corrupt image is reported, not raised. A
    map-style dataset for torch's DataLoader (``__len__`` + ``__getitem__``)."""

    def __init__(self, source: ImageSource, transform: object, seed: int | None = None) -> None:
        self.source, self.transform, self.seed = source, transform, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int]:
        if self.seed is not None:  # random views: the same view of image i whatever the worker
            import torch

            torch.manual_seed((self.seed * 1_000_003 + i) % (2**63))
        try:
            # read_image: what `robench data verify` reads, so both skip the same images
            return self.transform(read_image(self.source, i)), i  # type: ignore[operator]
        except DECODE_ERRORS:
            return None, i


class Collate:
    """A DataLoader batch of ``(tensor or None, index)`` items -> (stacked tensors, indices,
    decoded?): an undecodable item becomes zeros of ``shape`` (one image (3, H, W), or
    LP-CLIP's K views of one (K, 3, H, W))."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __call__(self, batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import torch

        good = next((x for x, _ in batch if x is not None), None)
        fill = torch.zeros_like(good) if good is not None else torch.zeros(self.shape)
        xs = torch.stack([fill if x is None else x for x, _ in batch])
        idx = torch.tensor([i for _, i in batch])
        ok = torch.tensor([x is not None for x, _ in batch])
        return xs, idx, ok


# how files become RGB pixels (robench.data.base.read_image); bumped when that changes, so
# features of 16-bit or transparent images decoded by older rules are not reused (2: 16-bit
# scaled by 1/257, transparency over white, bombs undecodable)
DECODE_RULES = 2


def feature_key(backbone: Backbone, source: ImageSource, view: str = "",
                dtype: str = "auto") -> str:
    """Content address: weights hash + preprocessing + precision + dataset manifest hash +
    storage dtype + the decoding rules (+ the name of an augmented view, for methods that train
    on several random views per image)."""
    stored = features_dtype(backbone.precision, dtype)
    parts = [backbone.id(), source.manifest_hash, len(source), stored.name, DECODE_RULES] + \
        ([view] if view else [])
    ident = json.dumps(parts)
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def extract_features(backbone: Backbone, source: ImageSource, cache_dir: str | Path,
                     batch_size: int = 256, num_workers: int = 2, progress: bool = True,
                     strict: bool = False, transform: object = None, view: str = "",
                     seed: int | None = None, dtype: str = "auto",
                     world: World | None = None) -> FeatureSet:
    """Features of every image of ``source``, from the cache when present.

    ``transform`` replaces the backbone's preprocessing (e.g. a random augmentation); ``view``
    names it in the cache key and ``seed`` makes its randomness a function of the image index.
    ``world`` (every rank of a multi-rank run calls this together) shards the extraction by
    sample index (:mod:`robench.feature_shards`); the lead rank then writes the entry from the
    verified shards, through the same code as a single process.
    """
    if transform is not None and not view:
        raise ValueError("a custom transform needs a view name for the cache key")
    cache = Path(cache_dir).expanduser() / "features"
    key = feature_key(backbone, source, view, dtype)
    stored = features_dtype(backbone.precision, dtype)
    npy, meta = cache / f"{key}.npy", cache / f"{key}.json"
    sharded = world is not None and world.distributed
    found = _cached(npy, meta, source)
    if sharded and not world.all_min(int(found is not None)):
        found = None  # every rank takes the same branch, whatever it sees on a shared disk
    if found is not None:
        return found
    dataset = _Preprocessed(source, transform or backbone.preprocess, seed)
    if sharded:
        from robench.feature_shards import extract_shards, read_shards

        shards = extract_shards(backbone, dataset, cache / f"{key}.shards", world, stored,
                                batch_size, num_workers, strict, progress, source.name)
        world.barrier()  # every shard is on disk
        if not world.is_lead:
            world.barrier()  # the lead merges them into the entry
            if (found := _cached(npy, meta, source)) is None:
                raise RobenchError(f"features of {source.name}: the lead rank wrote no entry",
                                   "see the lead rank's log; re-run to resume")
            return replace(found, cached=False)
        bad = _write_entry(backbone, source, npy, meta, read_shards(shards, len(source)),
                           strict, progress, stored)
        shutil.rmtree(cache / f"{key}.shards", ignore_errors=True)
        world.barrier()  # the entry is visible: the other ranks may read it
    else:
        with entry_lock(npy, f"the features of {source.name}"):
            if (found := _cached(npy, meta, source, repair=True)) is not None:  # built meanwhile
                return found
            started = time.perf_counter()
            batches = encoded_batches(backbone, loader(dataset, backbone, batch_size,
                                                       num_workers), stored)
            bad = _write_entry(backbone, source, npy, meta, batches, strict, progress, stored,
                               started)
    if bad:
        log.warning("%s: %d image(s) could not be decoded and are excluded: %s",
                    source.name, len(bad), describe(source, bad))
    seconds = None if sharded else read_json(meta, bound(meta)).get("seconds")
    return FeatureSet(load_npy(npy, mmap_mode="r", bound=bound(npy)), bad, key, cached=False,
                      seconds=seconds)


def bound(path: Path) -> str:
    """What a file of the feature store is (its seal's binding): ``features/<key>.npy`` or
    ``features/<key>.json``, the key being :func:`feature_key` of its inputs."""
    return f"features/{Path(path).name}"


def cached_features(backbone: Backbone, source: ImageSource, cache_dir: str | Path,
                    view: str = "", dtype: str = "auto") -> FeatureSet | None:
    """The cache entry :func:`extract_features` would return, if it is there; never extracts
    (to tell a user what a pass will cost before it starts)."""
    cache = Path(cache_dir).expanduser() / "features"
    key = feature_key(backbone, source, view, dtype)
    return _cached(cache / f"{key}.npy", cache / f"{key}.json", source)


def _cached(npy: Path, meta: Path, source: ImageSource, repair: bool = False
            ) -> FeatureSet | None:
    """The cache entry if it is complete, intact and bound to its key; else None. ``repair``
    (only under the entry's lock, where no writer is finishing it) removes a damaged or foreign
    one; without the lock a reader never deletes what a concurrent run may be sealing."""
    if not meta.is_file():
        return None
    try:
        info = read_json(meta, bound(meta))
        feats = load_npy(npy, mmap_mode="r", bound=bound(npy))
        if feats.ndim != 2 or feats.shape[0] != len(source) or info.get("n") != len(source):
            raise CorruptEntry(npy, f"holds {feats.shape[0]} rows for {len(source)} samples")
        if info.get("manifest") != source.manifest_hash:
            raise CorruptEntry(meta, "describes features of other images")
    except CorruptEntry as e:
        if repair:
            discard(npy, meta, reason=f"features of {source.name}: {e.problem}")
        return None
    return FeatureSet(feats, [int(i) for i in info["bad"]], npy.stem, cached=True,
                      seconds=info.get("seconds"))


def _write_entry(backbone: Backbone, source: ImageSource, npy: Path, meta: Path,
                 batches: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]], strict: bool,
                 progress: bool, stored: np.dtype, started: float | None = None) -> list[int]:
    """Write the encoded ``batches`` into ``npy`` through a reserved, memory-mapped partial file
    (renamed when complete, then sealed), then ``meta`` (its presence marks the entry complete);
    returns the rows that could not be decoded. Partial files of killed runs are removed first
    (the caller holds the entry's lock, or is the only writer of a sharded run). ``started``
    (``time.perf_counter()`` before the batches were made) records the wall time in ``meta``."""
    for stale in npy.parent.glob(f"{npy.stem}.*.partial.npy"):
        stale.unlink(missing_ok=True)
    bad: list[int] = []
    out: np.ndarray | None = None
    shape = (0, 0)
    tmp = npy.with_suffix(f".{process_tag()}.partial.npy")
    bar = tqdm(total=len(source), unit="img", desc=f"features {source.name}", disable=not progress,
               dynamic_ncols=True, leave=False)
    try:
        for idx, f, ok in batches:
            note_undecodable(bad, idx, ok, strict, source)
            if out is None:
                shape = (len(source), f.shape[1])
                out = _open_partial(tmp, stored, shape)
            out[idx] = f
            bar.update(len(idx))
        bar.close()
        if out is None:
            raise RobenchError(f"{source.name} is empty", "check the dataset root")
        out.flush()
        del out
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, npy)
    except OSError as e:
        raise write_error(tmp, e) from e
    finally:
        tmp.unlink(missing_ok=True)
    seal_file(npy, bound=bound(npy), shape=list(shape), dtype=stored.str)
    info = {"bad": sorted(bad), "dataset": source.name, "n": len(source),
            "manifest": source.manifest_hash, "backbone": backbone.id()}
    if started is not None:
        info["seconds"] = round(time.perf_counter() - started, 3)
    write_json(meta, info, bound=bound(meta))
    return sorted(bad)


def note_undecodable(bad: list[int], idx: np.ndarray, ok: np.ndarray, strict: bool,
                     source: ImageSource) -> None:
    """Add a batch's undecodable rows to ``bad``; under ``strict``, fail naming them."""
    if ok.all():
        return
    bad += idx[~ok].tolist()
    if strict:
        raise RobenchError(f"{source.name}: cannot decode image(s) {describe(source, bad)}",
                           "replace the files, or run with strict=false to count and skip them")


def _open_partial(tmp: Path, dtype: np.dtype, shape: tuple[int, int]) -> np.memmap:
    """A memory-mapped ``.npy`` whose blocks are allocated up front (see :func:`reserve`)."""
    tmp.parent.mkdir(parents=True, exist_ok=True)
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
    with open(tmp, "r+b") as f:
        reserve(f.fileno(), out.offset + out.nbytes, tmp)
    return out


def loader(dataset: _Preprocessed, backbone: Backbone, batch_size: int, num_workers: int,
           batch_sampler: list[list[int]] | None = None) -> DataLoader | _ArrayBatches:
    """The batches of an extraction, ``(images, indices, decoded?)``: ``batch_size``
    consecutive indices per batch, or the given ``batch_sampler`` (a shard's batches). Images
    held as one uint8 array whose preprocessing is only ToTensor + Normalize are converted a
    batch at a time (:class:`_ArrayBatches`); any other source is decoded by a DataLoader."""
    from torch.utils.data import DataLoader
    if (norm := array_normalization(dataset)) is not None:
        batches = batch_sampler if batch_sampler is not None else \
            [list(range(s, min(s + batch_size, len(dataset))))
             for s in range(0, len(dataset), batch_size)]
        return _ArrayBatches(dataset.source.loader.batch, batches, *norm)
    batching = {"batch_sampler": batch_sampler} if batch_sampler is not None \
        else {"batch_size": batch_size}
    size = backbone.image_size
    return DataLoader(
        dataset, **batching, num_workers=num_workers, collate_fn=Collate((3, size, size)),
        pin_memory=backbone.device.startswith("cuda"),
        persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None,
    )


class _ArrayBatches:
    """Batches of a source whose images are rows of one uint8 (N, H, W, 3) array (CIFAR,
    CIFAR-C), converted as ``normalize(rows / 255)`` a batch at a time in the main process.
    The per-image PIL path costs ~140 us an image on a CPU core, as much as a tiny model's
    forward, and a DataLoader worker competes with the forward for the cores; the arithmetic
    is the one ``ToTensor`` + ``Normalize`` do per image, so the result is bit-identical (a
    test checks it)."""

    def __init__(self, rows: Callable[[np.ndarray], np.ndarray], batches: list[list[int]],
                 mean: torch.Tensor, std: torch.Tensor) -> None:
        self.rows, self.batches, self.mean, self.std = rows, batches, mean, std

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        import torch

        for batch in self.batches:
            idx = np.asarray(batch, dtype=np.int64)
            x = _to_normalized(self.rows(idx), self.mean, self.std)
            yield x, torch.from_numpy(idx), torch.ones(len(idx), dtype=torch.bool)


def _to_normalized(rows: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 ``(x / 255 - mean) / std``, in the order of
    operations of torchvision's ``to_tensor`` and ``normalize``."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(rows)).permute(0, 3, 1, 2).contiguous()
    return x.to(torch.float32).div(255).sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


def array_normalization(dataset: _Preprocessed) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, std) when ``dataset``'s images are rows of a uint8 array (the source's loader has
    ``batch``) and its transform amounts, on images of their size, to ToTensor + Normalize:
    open_clip's eval preprocessing at the model's own resolution (Resize and CenterCrop to the
    size the images already have are identities in PIL, RGB conversion of an RGB image too).
    Checked on the first image against the transform itself; None (decode per image) otherwise.
    """
    from robench.data.base import ArrayRows

    rows = getattr(dataset.source, "loader", None)  # an ImageSource's (a wrapper has none)
    steps = getattr(dataset.transform, "transforms", None)
    if not isinstance(rows, ArrayRows) or steps is None or dataset.seed is not None \
            or not len(dataset):
        return None
    import torch
    from open_clip.transform import MaybeConvertMode, _convert_to_rgb
    from torchvision import transforms as T

    first = rows.batch(np.array([0]))
    if first.ndim != 4 or first.shape[3] != 3 or first.dtype != np.uint8:
        return None
    h, w = first.shape[1:3]
    norm, tensor = None, False
    for t in steps:
        if isinstance(t, T.Resize) and t.max_size is None and \
                list(np.atleast_1d(t.size)) in ([h, w], [h] if h == w else None):
            continue
        if isinstance(t, T.CenterCrop) and tuple(t.size) == (h, w):
            continue
        if (isinstance(t, MaybeConvertMode) and t.mode == "RGB") or t is _convert_to_rgb:
            continue
        if isinstance(t, T.ToTensor) and not tensor:
            tensor = True
            continue
        if isinstance(t, T.Normalize) and tensor and norm is None:
            norm = (torch.as_tensor(t.mean, dtype=torch.float32),
                    torch.as_tensor(t.std, dtype=torch.float32))
            continue
        return None  # anything else: the per-image path, which applies it
    if norm is None:
        return None
    expected = dataset.transform(dataset.source.load_image(0))
    if not torch.equal(_to_normalized(first, *norm)[0], expected):
        return None
    return norm


def encoded_batches(backbone: Backbone, batches: DataLoader, stored: np.dtype
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(indices, features in the storage dtype, decoded?) per batch; an undecodable image's
    row is zeros."""
    for xs, idx, ok in batches:
        f = backbone.encode_images(xs).cpu().numpy().astype(stored)
        f[~ok.numpy()] = 0
        yield idx.numpy(), f, ok.numpy()


def iter_row_blocks(features: np.ndarray, block: int, rows: np.ndarray | None = None
                    ) -> Iterator[tuple[slice, np.ndarray]]:
    """(positions, float32 rows) of ``features`` (or of ``features[rows]``) a block at a time.

    A memory-mapped cache file is read with plain file reads rather than through the map: pages
    touched through a map count towards the process's resident memory until the kernel evicts
    them, so streaming a 3.75M x 1024 file through it would make RSS grow to the file's size.
    """
    n = features.shape[0] if rows is None else len(rows)
    filename = getattr(features, "filename", None)
    contiguous = rows is None and isinstance(features, np.memmap) and filename \
        and features.flags.c_contiguous
    if not contiguous:
        for s in range(0, n, block):
            pos = slice(s, min(s + block, n))
            idx = pos if rows is None else rows[pos]
            yield pos, np.asarray(features[idx], dtype=np.float32)
        return
    row_bytes = features.dtype.itemsize * int(np.prod(features.shape[1:]))
    with open(filename, "rb") as f:
        for s in range(0, n, block):
            pos = slice(s, min(s + block, n))
            f.seek(features.offset + s * row_bytes)
            count = (pos.stop - s) * int(np.prod(features.shape[1:]))
            chunk = np.fromfile(f, dtype=features.dtype, count=count)
            yield pos, chunk.reshape((pos.stop - s, *features.shape[1:])).astype(np.float32)


def sample_names(source: ImageSource, rows: list[int], limit: int = 10) -> list[str]:
    """Names of the first ``limit`` rows: file paths where the source has them, else ``#row``."""
    paths = source.info.get("paths")
    return [paths[i] if paths else f"#{i}" for i in rows[:limit]]


def describe(source: ImageSource, rows: list[int], limit: int = 10) -> str:
    """Human names of rows, for messages."""
    more = f" (+{len(rows) - limit} more)" if len(rows) > limit else ""
    return ", ".join(sample_names(source, rows, limit)) + more

