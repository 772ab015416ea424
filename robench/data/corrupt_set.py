"""Generate a -C set from any dataset: every image x corruption x severity, deterministic per
image (seeded by :func:`robench.data.corruptions.image_seed`), parallel across processes,
resumable per corruption file, written atomically.

32x32 sources are written in the CIFAR-10-C npy layout (``<out>/<corruption>.npy`` +
``labels.npy``), so a generated set is read by the same code as the released one. Larger images
are written in the ImageNet-C folder layout, ``<out>/<corruption>/<severity>/<class>/<file>``,
as JPEG at quality 85 as in ImageNet-C (PIL's encoder is deterministic, so the files are
bit-identical across runs).

What a generated set is, in its manifest (``robench_c.json``) and in every source read from it
(``info["generated"]``): the ``protocol`` (whose severity constants, see
:mod:`robench.data.corruptions`) and the ``resize`` rule applied before corrupting:

* protocol ``auto`` (the default) resolves to ``cifar-c`` for 32x32 sources and ``imagenet-c``
  otherwise, and the resolved value is recorded. That is the one choice that matches a released
  benchmark at each size: CIFAR-10-C is the only published -C set of 32x32 images, and its
  constants are the ones tuned for them (ImageNet-C's are about twice as strong there), while
  ImageNet-C's constants are tuned for 224x224 crops.
* resize ``auto`` resolves to ``256-crop-224`` under ``imagenet-c`` in the folder layout: the
  shorter side to 256 (bilinear) and the central 224x224, torchvision's ``Resize(256)`` +
  ``CenterCrop(224)`` with which Hendrycks' ``make_imagenet_c.py`` prepared every image before
  corrupting it; ``none`` keeps the native size (the npy layout and ``cifar-c`` always do).

A generated set is never the released CIFAR-10-C or ImageNet-C: other random draws, and
imagecorruptions' numpy motion blur instead of ImageMagick's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from robench.data.base import ImageSource, UndecodableImage, read_image
from robench.data.corruptions import (
    CIFAR_SIZE,
    CORRUPTIONS,
    SEVERITIES,
    STANDARD_CORRUPTIONS,
    check_cifar_size,
    check_protocol,
    corrupt,
    image_seed,
)
from robench.errors import RobenchError, unknown
from robench.io import (
    CorruptEntry,
    discard,
    entry_lock,
    load_npy,
    verify_file,
    write_json,
    write_npy,
)
from robench.progress import progress_bar

log = logging.getLogger(__name__)
MANIFEST = "robench_c.json"
#: Resize rules before corrupting (see the module docstring); ``auto`` picks one.
RESIZE_RULES: dict[str, str] = {
    "256-crop-224": "shorter side to 256 (bilinear), centre crop 224x224: torchvision's "
                    "Resize(256) + CenterCrop(224), as make_imagenet_c.py",
    "none": "none: the images at their native size",
}
_SOURCE: ImageSource | None = None  # set in each worker by _init (fork: shared, not pickled)


def _init(source: ImageSource) -> None:
    global _SOURCE
    _SOURCE = source


def _task(args: tuple) -> tuple[str, int, np.ndarray, np.ndarray]:
    """Corrupt rows ``rows`` of the source with one corruption at one severity."""
    name, severity, rows, seed, key, protocol = args
    out = np.empty((len(rows), 32, 32, 3), dtype=np.uint8)
    for j, i in enumerate(rows):
        img = np.asarray(base_image(_SOURCE, int(i)))  # type: ignore[arg-type]
        if img.shape != (32, 32, 3):
            raise RobenchError(f"image {i} of {key} is {img.shape}, the npy layout needs 32x32x3",
                               "resize the source or use the folder layout")
        out[j] = corrupt(img, name, severity, image_seed(seed, key, int(i), name, severity),
                         protocol)
    return name, severity, np.asarray(rows), out


def _folder_task(args: tuple) -> int:
    """Corrupt rows into ``<out>/<corruption>/<severity>/<relative path>.JPEG``; existing files
    are kept (resume), new ones written atomically."""
    name, severity, rows, seed, key, out, rel_paths, protocol, resize = args
    written = 0
    for i, rel in zip(rows, rel_paths, strict=True):
        dest = Path(out) / name / str(severity) / Path(rel).with_suffix(".JPEG")
        if dest.is_file():
            continue
        img = base_image(_SOURCE, int(i))  # type: ignore[arg-type]
        if resize == "256-crop-224":
            img = resize_256_crop_224(img.convert("RGB"))
        if protocol == "cifar-c":
            check_cifar_size(img.size[::-1], f"image {i} ({rel}) of {key}")
        px = corrupt(np.asarray(img, dtype=np.uint8), name, severity,
                     image_seed(seed, key, int(i), name, severity), protocol)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        Image.fromarray(px).save(tmp, format="JPEG", quality=85)
        os.replace(tmp, dest)
        written += 1
    return written


def base_image(source: ImageSource, i: int) -> Image.Image:
    """Image ``i`` of the set being corrupted (8-bit RGB), or a named error: the rows of a -C set
    are aligned with its base's, so an image that cannot be decoded stops the generation, naming
    the file, instead of being skipped."""
    try:
        return read_image(source, i)
    except UndecodableImage as e:
        paths = source.info.get("paths")
        where = paths[i] if paths else f"#{i}"
        raise RobenchError(f"{source.name}: image {where} cannot be decoded ({e}); a -C set is "
                           "made from every image of its base",
                           "replace or remove the file, then generate the set again") from None


def resolve_protocol(protocol: str, size: tuple[int, int], what: str) -> str:
    """``auto`` -> ``cifar-c`` for a 32x32 image (height, width) ``size``, else ``imagenet-c``;
    an explicit protocol is checked (``cifar-c`` refuses other sizes, naming ``what``)."""
    if protocol == "auto":
        return "cifar-c" if tuple(size) == CIFAR_SIZE else "imagenet-c"
    protocol = check_protocol(protocol)
    if protocol == "cifar-c":
        check_cifar_size(size, what)
    return protocol


def resolve_resize(resize: str, protocol: str, layout: str = "folders") -> str:
    """``auto`` -> ``256-crop-224`` under ``imagenet-c`` in the folder layout, else ``none``;
    an explicit rule is checked against the protocol and the layout."""
    if resize == "auto":
        return "256-crop-224" if protocol == "imagenet-c" and layout == "folders" else "none"
    if resize not in RESIZE_RULES:
        raise unknown("resize rule", str(resize), ["auto", *RESIZE_RULES],
                      fix="use --resize auto, 256-crop-224 (ImageNet-C's preparation) or none "
                      "(native size)")
    if resize != "none" and (protocol == "cifar-c" or layout != "folders"):
        why = "the cifar-c protocol" if protocol == "cifar-c" else f"the {layout} layout"
        raise RobenchError(f"resize {resize} makes 224x224 images, but {why} needs 32x32 ones",
                           "use --resize none (or auto), or the imagenet-c protocol with the "
                           "folder layout")
    return resize


def resize_256_crop_224(img: Image.Image) -> Image.Image:
    """What make_imagenet_c.py did to every image before corrupting it, torchvision's
    ``Resize(256)`` then ``CenterCrop(224)`` on a PIL image: the shorter side to 256 and the
    longer to ``int(256 * long / short)`` (PIL bilinear), then the 224x224 box whose top-left
    corner is ``(round((w - 224) / 2), round((h - 224) / 2))``."""
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_long = int(256 * long / short)
    size = (256, new_long) if w <= h else (new_long, 256)
    if size != (w, h):
        img = img.resize(size, Image.Resampling.BILINEAR)
    left, top = int(round((size[0] - 224) / 2.0)), int(round((size[1] - 224) / 2.0))
    return img.crop((left, top, left + 224, top + 224))


def describe(protocol: str, resize: str) -> str:
    """One sentence saying what a generated set is (and is not)."""
    if protocol == "cifar-c":
        return ("generated by robench with the cifar-c protocol (the severity constants of "
                "make_cifar_c.py), at the native 32x32 size: CIFAR-10-C's recipe, not the "
                "released CIFAR-10-C")
    return (f"generated by robench with the imagenet-c protocol (imagecorruptions' constants, "
            f"those of make_imagenet_c.py); resize before corrupting: {RESIZE_RULES[resize]}; "
            "not the released ImageNet-C")


def generation_info(meta: dict) -> dict | None:
    """What a set's manifest says about how it was generated, for ``ImageSource.info`` and the
    result record; ``None`` for a released set (no manifest). A manifest written before the
    protocol was recorded is of the only generator robench then had: imagecorruptions'
    constants at the native size."""
    if not meta:
        return None
    protocol = str(meta.get("protocol") or "imagenet-c")
    resize = str(meta.get("resize") or "none")
    return {"protocol": protocol, "resize": resize, "base": meta.get("base"),
            "seed": meta.get("seed"), "note": describe(protocol, resize)}


def read_manifest(folder: Path) -> dict:
    """The manifest of a -C set written here (parameters, corruptions, class table); ``{}`` for a
    released set, which has none. A damaged one is a named error: it says which images are which,
    so guessing would mislabel them."""
    man = folder / MANIFEST
    if not man.is_file():
        return {}
    try:
        manifest = json.loads(man.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
        return manifest
    except (OSError, ValueError) as e:
        raise RobenchError(
            f"the -C set manifest {man} is damaged ({e})",
            f"delete {man}: a run regenerates its own cached set's manifest, and robench data "
            f"corrupt --out {folder} rewrites the manifest of a set you generated (its "
            "corruption files are kept if they verify)") from e


def _manifest_or_none(folder: Path) -> dict:
    """The manifest, or ``{}`` when there is none or it is damaged: the generation rewrites it
    from its own parameters (the files are kept only if they are sealed as this set's)."""
    try:
        return read_manifest(folder)
    except RobenchError as e:
        log.warning("%s; it is written again", e.problem)
        return {}


def set_id(params: dict) -> str:
    """The identity of a generated set: a digest of the parameters that make its pixels."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def bound(manifest: dict, name: str) -> str:
    """What file ``name`` of a generated set is (its seal's binding): ``-C set <id>/<name>``,
    so a sealed ``fog.npy`` moved over ``snow.npy``, or a file copied from another set, is named
    and rebuilt instead of scored."""
    return f"-C set {manifest.get('set_id')}/{name}"


def _claim(out: Path, params: dict, corruptions: Sequence[str], extra: dict) -> dict:
    """Write ``out``'s manifest (with the set's identity, :func:`set_id`), refusing a folder
    that holds a set made with other ``params`` (a resume must not mix two sets); the corruption
    list grows with each call. Returns the manifest."""
    old = _manifest_or_none(out)
    if old and {k: old.get(k) for k in params} != params:
        raise RobenchError(f"{out} holds a -C set made from other data or parameters",
                           f"delete {out} and run again to regenerate it (or give robench data "
                           "corrupt another --out folder)")
    done = old.get("corruptions") or []
    names = [c for c in CORRUPTIONS if c in done or c in corruptions]
    manifest = {**params, "corruptions": names, **extra, "set_id": set_id(params)}
    if json.loads(json.dumps(manifest)) != old:  # unchanged: a finished set is not rewritten
        write_json(out / MANIFEST, manifest)
    return manifest


def generate_c_folders(source: ImageSource, out: Path, corruptions: Sequence[str] =
                       STANDARD_CORRUPTIONS, severities: Sequence[int] = SEVERITIES,
                       seed: int = 0, workers: int = 2, chunk: int = 50,
                       progress: bool = True, protocol: str = "auto",
                       resize: str = "auto") -> Path:
    """Write the -C set of an image-folder source in the ImageNet-C folder layout.

    ``protocol`` and ``resize`` (see the module docstring) are resolved from the first image
    and recorded in the manifest; by default an ImageNet-size source is resized to 256 and
    centre-cropped to 224 before corrupting, as ImageNet-C was."""
    paths = source.info.get("paths")
    if not paths:
        raise RobenchError(f"{source.name} has no file paths to mirror in a folder layout",
                           "use the npy layout (32x32 images) or a folder-based dataset")
    protocol, resize = resolve_generation(source, 0, protocol, resize, "folders")
    out.mkdir(parents=True, exist_ok=True)
    params = {"base": source.name, "base_manifest": source.manifest_hash, "seed": seed,
              "severities": list(severities), "layout": "imagenet-c folders",
              "protocol": protocol, "resize": resize}
    folders: dict[str, int] = {}
    for rel, y in zip(paths, source.labels, strict=True):
        folder = Path(rel).parts[0] if len(Path(rel).parts) > 1 else ""
        if folders.setdefault(folder, int(y)) != int(y):
            raise RobenchError(f"{source.name}: folder {folder!r} holds images of two labels",
                               "the folder layout needs one class per folder")
    # the class table lets robench.data.imagenet_c read the set back with the source's labels
    _claim(out, params, corruptions, {"class_folders": folders,
                                      "classnames": list(source.classnames),
                                      "note": describe(protocol, resize)})
    n = len(source)
    tasks = [(c, s, list(range(a, min(n, a + chunk))), seed, source.manifest_hash[:16], str(out),
              paths[a:a + chunk], protocol, resize) for c in corruptions for s in severities
             for a in range(0, n, chunk)]
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(max(1, workers), initializer=_init, initargs=(source,)) as pool:
        for _ in progress_bar(pool.imap_unordered(_folder_task, tasks), total=len(tasks),
                              unit="chunk", desc=f"corrupting {source.name}",
                              disable=not progress):
            pass
    return out


def generate_c_set(source: ImageSource, out: Path, rows: Sequence[int] | None = None,
                   corruptions: Sequence[str] = STANDARD_CORRUPTIONS,
                   severities: Sequence[int] = SEVERITIES, seed: int = 0, workers: int = 2,
                   chunk: int = 100, progress: bool = True, protocol: str = "auto") -> Path:
    """Write the -C set of ``source`` (optionally only ``rows`` of it) to ``out``.

    Finished corruption files are kept, so an interrupted generation resumes where it stopped.
    The manifest file records the base dataset's manifest hash and the parameters, among them
    the resolved ``protocol`` (``auto``: ``cifar-c``, as the npy layout holds 32x32 images) and
    ``resize: none``; a folder made with other parameters is refused rather than silently mixed.
    """
    rows = np.arange(len(source)) if rows is None else np.asarray(rows)
    protocol, resize = resolve_generation(source, int(rows[0]) if len(rows) else 0, protocol,
                                          "none", "npy")
    params = {"base": source.name, "base_manifest": source.manifest_hash, "seed": seed,
              "rows": [int(r) for r in rows], "severities": list(severities),
              "generator": "imagecorruptions via robench.data.corruptions",
              "protocol": protocol, "resize": resize}
    labels = np.tile(source.labels[rows], len(severities))
    if _complete(out, params, corruptions, labels):  # read without a lock (read-only caches)
        return out
    out.mkdir(parents=True, exist_ok=True)
    # one generation per set: a concurrent run waits here, then finds it complete
    with entry_lock(out / ".robench_c", f"the -C set of {source.name}"):
        manifest = _claim(out, params, corruptions, {"classnames": list(source.classnames),
                                                     "note": describe(protocol, resize)})
        _drop_damaged(out, manifest)
        _generate_npy(source, out, manifest, rows, labels, corruptions, severities, seed, workers,
                      chunk, progress, protocol)
    return out


def _complete(out: Path, params: dict, corruptions: Sequence[str], labels: np.ndarray) -> bool:
    """The set in ``out`` was made with ``params`` and every file it needs is intact and sealed
    as itself (nothing is removed here: a reader without the lock never deletes)."""
    manifest = _manifest_or_none(out) if out.is_dir() else {}
    if not manifest or {k: manifest.get(k) for k in params} != params:
        return False
    try:
        for name in ("labels.npy", *(f"{c}.npy" for c in corruptions)):
            verify_file(out / name, bound(manifest, name))
        return bool(np.array_equal(load_npy(out / "labels.npy",
                                            bound=bound(manifest, "labels.npy")), labels))
    except CorruptEntry:
        return False


def _drop_damaged(out: Path, manifest: dict) -> None:
    """Remove every array of the set that fails its checksum, has none, or is sealed as another
    file or another set's (a swapped ``fog.npy`` / ``snow.npy``), so that exactly those are
    generated again. Only under the set's lock."""
    for f in sorted(out.glob("*.npy")):
        try:
            verify_file(f, bound(manifest, f.name))
        except CorruptEntry as e:
            discard(f, reason=f"-C set {out}: {e.problem}")


def _generate_npy(source: ImageSource, out: Path, manifest: dict, rows: np.ndarray,
                  labels: np.ndarray, corruptions: Sequence[str], severities: Sequence[int],
                  seed: int, workers: int, chunk: int, progress: bool, protocol: str) -> None:
    """Write the labels and every corruption file not in ``out`` yet, each atomically and
    sealed as itself when all its rows are done."""
    try:
        same = np.array_equal(load_npy(out / "labels.npy",
                                       bound=bound(manifest, "labels.npy")), labels)
    except CorruptEntry:
        same = False
    if not same:
        write_npy(out / "labels.npy", labels, bound=bound(manifest, "labels.npy"))
    todo = [c for c in corruptions if not (out / f"{c}.npy").is_file()]
    if not todo:
        return
    n = len(rows)
    tasks = [(c, s, rows[a:a + chunk], seed, source.manifest_hash[:16], protocol)
             for c in todo for s in severities for a in range(0, n, chunk)]
    buffers = {c: np.empty((n * len(severities), 32, 32, 3), np.uint8) for c in todo}
    remaining = {c: sum(1 for t in tasks if t[0] == c) for c in todo}
    position = {int(r): k for k, r in enumerate(rows)}
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    bar = progress_bar(total=len(tasks), unit="chunk", desc=f"corrupting {source.name}",
                       disable=not progress, dynamic_ncols=True)
    with ctx.Pool(max(1, workers), initializer=_init, initargs=(source,)) as pool:
        for name, s, idx, imgs in pool.imap_unordered(_task, tasks):
            base = list(severities).index(s) * n
            buffers[name][[base + position[int(i)] for i in idx]] = imgs
            remaining[name] -= 1
            if remaining[name] == 0:  # a whole corruption file is ready: write it atomically
                write_npy(out / f"{name}.npy", buffers.pop(name),
                          bound=bound(manifest, f"{name}.npy"))
            bar.update(1)
    bar.close()


def resolve_generation(source: ImageSource, row: int, protocol: str, resize: str,
                       layout: str) -> tuple[str, str]:
    """(protocol, resize) of a generation: ``auto`` protocol from the size the corruptions see
    (image ``row`` of ``source``, or 224x224 after an explicit ``256-crop-224``), then the
    resize rule from the protocol; an unknown value, or the cifar-c protocol for images other
    than 32x32, is refused by name."""
    check_protocol(protocol, auto=True)
    if resize != "auto" and resize not in RESIZE_RULES:
        resolve_resize(resize, "imagenet-c", layout)  # raises, naming the valid rules
    if resize == "256-crop-224":  # the size the corruptions will see
        size, what = (224, 224), f"{source.name} resized by {resize}"
    else:
        size = base_image(source, row).size[::-1] if len(source) else CIFAR_SIZE
        what = f"{source.name} (image {row})"
    protocol = resolve_protocol(protocol, size, what)
    return protocol, resolve_resize(resize, protocol, layout)


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))
