"""The ``robench data`` command: explicit data management (see :data:`USAGE`).

Wired into ``robench/cli.py`` by :func:`add_data_commands`, which returns the ``data``
sub-parsers so more actions (``corrupt``) can be added beside ``verify`` and ``download``.
"""

from __future__ import annotations

import argparse
import os
import textwrap
from pathlib import Path

USAGE = """explicit data management (robench never downloads data on its own):

  robench data verify NAME... [--root DIR] [--sample N] [--accept]
  robench data verify --suite S [NAME...] [key=value ...]
  robench data download [NAME] [--root DIR] [--force] [--archive FILE] [--sha256 HEX]
  robench data corrupt --from NAME --out DIR [--protocol auto|cifar-c|imagenet-c]
                       [--resize auto|256-crop-224|none] [--corruptions standard|all|a,b]

Dataset folders come from the same place as a run's: --root for one dataset, else the registered
root under --data-root (default: $ROBENCH_DATA, else ./data); --suite S takes suite S's data_root
and data.<name>.root instead."""


CORRUPT_DESCRIPTION = "\n\n".join(textwrap.fill(p, 79) for p in (
    "Generate a -C set: every image of a registered dataset with each corruption at severities "
    "1-5 (Hendrycks & Dietterich 2019, via imagecorruptions), deterministically per image "
    "(seeded by dataset, image, corruption and severity: the same pixels for any worker count), "
    "in parallel processes. 32x32 images are written in the CIFAR-10-C npy layout, larger ones "
    "in the ImageNet-C folder layout (JPEG, quality 85). An interrupted run resumes: finished "
    "files are kept.",
    "The result is a GENERATED set, not the released CIFAR-10-C or ImageNet-C (other random "
    "draws; a numpy motion blur instead of ImageMagick's). Its robench_c.json manifest, every "
    "record scored on it and the report say so, with its protocol and resize rule. Declare it "
    "under its own name (the command prints <source>-generated-c), never 'imagenet-c' or "
    "'cifar10-c'. AlexNet-normalised mCE is computed for it only with protocol imagenet-c, "
    "resize 256-crop-224 and all 15 corruptions x 5 severities.",
    "Defaults (--protocol auto --resize auto): a 32x32 source gets CIFAR-10-C's constants at "
    "its native size, a larger one ImageNet-C's constants after ImageNet-C's resize to 256 and "
    "centre crop to 224."))


def default_data_root() -> str:
    """``$ROBENCH_DATA``, else the config's default ``data_root``."""
    from robench.config import RunConfig

    return os.environ.get("ROBENCH_DATA") or RunConfig.data_root


def default_cache_dir() -> Path:
    """``$ROBENCH_CACHE``, else ``~/.cache/robench`` (as a run's ``cache_dir``)."""
    return Path(os.environ.get("ROBENCH_CACHE") or Path.home() / ".cache" / "robench")


def add_data_commands(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add ``data verify`` and ``data download`` to the CLI's sub-parsers; return the ``data``
    action's sub-parsers (``dsub.add_parser("corrupt", ...)`` adds another action)."""
    from robench.argtypes import count, nonempty, path
    from robench.config import MAX_WORKERS

    data = sub.add_parser("data", help="verify or download datasets (never implicit)",
                          description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    v = dsub.add_parser(
        "verify", help="check layout, counts, class folders, readability and the manifest",
        description="Check a dataset on disk: layout and label rule, sample count, class "
        "folders, decoding of every image (or --sample N), and the file-listing manifest "
        "(written to <root>/.robench_manifest.json, or the cache dir when the root is "
        "read-only; later runs report any change). Exit status 1 when a problem was found.")
    v.add_argument("names", nargs="*", metavar="NAME",
                   help="registered dataset name(s); with --suite also key=value overrides "
                   "(data.imagenet.root=/mnt/val)")
    v.add_argument("--root", type=path, help="the dataset's folder (one NAME only)")
    v.add_argument("--data-root", type=nonempty,
                   help="folder holding the datasets (default: $ROBENCH_DATA or ./data)")
    v.add_argument("--suite", help="verify this suite's datasets, with its data_root and "
                   "data.<name>.root")
    v.add_argument("--sample", type=count(0, 2**62), metavar="N",
                   help="decode a seeded random sample of N images instead of all (0: none)")
    v.add_argument("--seed", type=count(0, 2**32 - 1), default=0, help="seed of --sample")
    v.add_argument("--accept", action="store_true",
                   help="record the current file listing after an intended change")
    v.add_argument("--workers", type=count(1, MAX_WORKERS),
                   help="decoding threads (default: CPU count, max 8)")
    v.add_argument("--cache-dir", type=path,
                   help="manifests of read-only roots go here (default: $ROBENCH_CACHE or "
                   "~/.cache/robench)")
    v.add_argument("--no-progress", action="store_true")
    v.set_defaults(func=cmd_verify)

    d = dsub.add_parser(
        "download", help="download, verify and install a dataset's released archive",
        description="Download a dataset's released archive from its canonical source (resumable, "
        "checksum-verified, safely extracted, atomically installed). Without NAME: list what "
        "can be downloaded.")
    d.add_argument("name", nargs="?", metavar="NAME", help="registered dataset name")
    d.add_argument("--root", type=path, help="install here instead of <data-root>/<default>")
    d.add_argument("--data-root", type=nonempty,
                   help="folder holding the datasets (default: $ROBENCH_DATA or ./data)")
    d.add_argument("--force", action="store_true", help="replace an existing dataset folder")
    d.add_argument("--archive", type=path, metavar="FILE",
                   help="install a manually downloaded archive instead of downloading")
    d.add_argument("--sha256", metavar="HEX",
                   help="expect this sha256 instead of the pinned checksum (only a value you "
                   "trust)")
    d.add_argument("--keep-archive", action="store_true",
                   help="keep the downloaded archive in <data-root>/.robench-downloads")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_download)

    c = dsub.add_parser(
        "corrupt", help="generate a -C set of any registered dataset (never the released "
        "CIFAR-10-C / ImageNet-C)",
        description=CORRUPT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--from", dest="source", required=True, metavar="NAME",
                   help="registered dataset to corrupt")
    c.add_argument("--out", type=path, required=True, help="folder to write the -C set into")
    c.add_argument("--root", type=path, help="the source dataset's folder")
    c.add_argument("--data-root", type=nonempty,
                   help="folder holding the datasets (default: $ROBENCH_DATA or ./data)")
    c.add_argument("--corruptions", default="standard",
                   help="standard (15), all (19) or a comma-separated list (default: standard)")
    c.add_argument("--protocol", default="auto", metavar="P",
                   help="whose severity constants: cifar-c (make_cifar_c.py's, with which "
                   "CIFAR-10-C was made; 32x32 images only), imagenet-c (imagecorruptions', "
                   "those of make_imagenet_c.py) or auto (default): cifar-c for 32x32 images, "
                   "else imagenet-c. The resolved value is recorded")
    c.add_argument("--resize", default="auto", metavar="R",
                   help="before corrupting, folder layout only: 256-crop-224 (shorter side to "
                   "256, centre crop 224x224: ImageNet-C's preparation, torchvision Resize(256) + "
                   "CenterCrop(224)), none (native resolution) or auto (default): 256-crop-224 "
                   "under imagenet-c, none under cifar-c. Recorded in the manifest")
    c.add_argument("--layout", choices=["auto", "npy", "folders"], default="auto",
                   help="auto: npy for 32x32 images, else folders")
    c.add_argument("--stride", type=count(1, 2**62), default=1,
                   help="corrupt every k-th image only (npy layout; a quick smaller set)")
    c.add_argument("--seed", type=count(0, 2**32 - 1), default=0,
                   help="base seed of the per-image seeds")
    c.add_argument("--workers", type=count(1, MAX_WORKERS),
                   help="processes (default: CPU count, max 8)")
    c.add_argument("--cache-dir", type=path,
                   help="for sources generated on demand (default: $ROBENCH_CACHE)")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cmd_corrupt)
    return dsub


def _targets(args: argparse.Namespace) -> list[tuple[str, object, Path]]:
    """(name, spec, root) of each dataset to act on; sets ``args.source_of`` (reads a dataset
    by name with the same roots, for -C sets generated from a base)."""
    from robench.data import dataset_options
    from robench.errors import RobenchError
    from robench.registry import dataset_root, get_dataset, resolve_dataset

    overrides = [n for n in args.names if "=" in n]
    args.names = [n for n in args.names if "=" not in n]
    if overrides and not args.suite:
        raise RobenchError(f"key=value arguments ({', '.join(overrides)}) need --suite",
                           "give --suite SUITE, or --root DIR / --data-root DIR")
    if args.root is not None and len(args.names) != 1:
        raise RobenchError("--root applies to exactly one dataset",
                           "give one NAME with --root, or set data_root for several")
    if args.suite:
        from omegaconf import OmegaConf

        from robench.config import load_suite

        extra = [f"data_root={args.data_root}"] if args.data_root else []
        cfg = load_suite(args.suite, extra + overrides)
        declared = {}
        for item in cfg.datasets:
            item = OmegaConf.to_container(item) if OmegaConf.is_config(item) else item
            name, spec = resolve_dataset(item)
            dataset_options(name, spec)  # checked as a run checks them, before any data is read
            declared[name] = spec
        names = args.names or list(declared)
        roots = OmegaConf.to_container(cfg.data)
        args.source_of = _source_reader(cfg.data_root, roots, declared, args)
        out = []
        for n in names:
            spec = declared.get(n) or get_dataset(n)
            out.append((n, spec, args.root or dataset_root(n, spec, cfg.data_root, roots)))
        return out
    if not args.names:
        raise RobenchError("no dataset named", "give NAME(s) (see `robench list datasets`) or "
                           "--suite SUITE")
    data_root = args.data_root or default_data_root()
    args.source_of = _source_reader(data_root, {}, {}, args)
    out = []
    for n in args.names:
        spec = get_dataset(n)
        out.append((n, spec, args.root or dataset_root(n, spec, data_root, {})))
    return out


def _source_reader(data_root: str, roots: dict, declared: dict, args: argparse.Namespace):
    """name -> ImageSource, read as a run reads it (the suite's declarations and roots)."""
    from robench.data import load_dataset
    from robench.data.base import LoadSettings
    from robench.registry import dataset_root, get_dataset

    cache_dir = str(args.cache_dir or default_cache_dir())

    def source_of(name: str):
        spec = declared.get(name) or get_dataset(name)
        settings = LoadSettings(cache_dir=cache_dir, progress=not args.no_progress,
                                workers=args.workers or 1, source_of=source_of)
        return load_dataset(spec.family, dataset_root(name, spec, data_root, roots), name,
                            spec.options, settings)

    return source_of


def cmd_verify(args: argparse.Namespace) -> int:
    from robench.data.verify import verify_dataset

    if args.sample is not None and args.sample < 0:
        from robench.errors import RobenchError

        raise RobenchError(f"--sample {args.sample} is negative", "give N >= 0")
    failed = 0
    for name, spec, root in _targets(args):
        report = verify_dataset(name, spec, Path(root), sample=args.sample,  # type: ignore[arg-type]
                                cache_dir=args.cache_dir or default_cache_dir(),
                                workers=args.workers, progress=not args.no_progress,
                                accept=args.accept, seed=args.seed, source_of=args.source_of)
        print(report.render(), flush=True)
        failed += not report.ok
    return 1 if failed else 0


def cmd_download(args: argparse.Namespace) -> int:
    from robench.data import load_dataset
    from robench.data.download import SOURCES, Archive, download
    from robench.errors import RobenchError
    from robench.registry import dataset_root, get_dataset

    data_root = args.data_root or default_data_root()
    if not args.name:
        print(f"datasets robench can download (into {data_root}/<root>):")
        for name, src in SOURCES.items():
            spec = get_dataset(name)
            if isinstance(src, Archive):
                algos = ", ".join(a for a in ("sha256", "md5") if getattr(src, a))
                how = f"{src.urls[0]}  ({algos})"
            else:
                how = f"manual: {src.why}"
            print(f"  {name:30s} -> {spec.root:40s} {how}")
        return 0
    target, note = download(args.name, data_root, root=args.root, force=args.force,
                            archive=args.archive, sha256=args.sha256,
                            keep_archive=args.keep_archive, progress=not args.no_progress)
    spec = get_dataset(args.name)
    print(f"{args.name}: installed at {target} ({note})")
    if target != dataset_root(args.name, spec, data_root, {}):
        print(f"  not the default location: run with data.{args.name}.root={target}")
    try:
        source = load_dataset(spec.family, target, args.name, spec.options)
    except RobenchError as e:
        print(f"  but it does not load: {e}")
        return 1
    expected = f" (expected {spec.n_expected})" if spec.n_expected else ""
    print(f"  {len(source)} samples{expected}; decode-check it with "
          f"`robench data verify {args.name}`")
    return 0 if spec.n_expected in (None, len(source)) else 1


def _corruption_list(value: str) -> tuple[str, ...]:
    from robench.data.corruptions import CORRUPTIONS, STANDARD_CORRUPTIONS
    from robench.errors import unknown

    if value == "standard":
        return STANDARD_CORRUPTIONS
    if value == "all":
        return CORRUPTIONS
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    if not names:
        from robench.errors import RobenchError

        raise RobenchError(f"--corruptions {value!r} names no corruption",
                           "give standard, all, or a comma-separated list, e.g. fog,snow")
    for n in names:
        if n not in CORRUPTIONS:
            raise unknown("corruption", n, ["standard", "all", *CORRUPTIONS])
    return names


def cmd_corrupt(args: argparse.Namespace) -> int:
    import numpy as np

    from robench.data import load_dataset
    from robench.data.base import LoadSettings
    from robench.data.corrupt_set import (
        RESIZE_RULES,
        base_image,
        default_workers,
        generate_c_folders,
        generate_c_set,
        read_manifest,
        resolve_resize,
    )
    from robench.data.corruptions import check_protocol
    from robench.errors import RobenchError
    from robench.outpaths import output_folder
    from robench.registry import dataset_root, get_dataset

    output_folder(args.out, "--out", "give --out a new or writable folder for the -C set")
    corruptions = _corruption_list(args.corruptions)
    check_protocol(args.protocol, auto=True)  # both named before any data is read
    if args.resize not in ("auto", *RESIZE_RULES):
        resolve_resize(args.resize, "imagenet-c")  # raises, naming the valid rules
    if args.stride < 1:
        raise RobenchError(f"--stride {args.stride} must be >= 1", "give --stride 1 (every image)")
    data_root = args.data_root or default_data_root()
    cache_dir = args.cache_dir or default_cache_dir()
    workers = args.workers or default_workers()

    def source_of(name: str, root: Path | None = None):
        spec = get_dataset(name)
        settings = LoadSettings(cache_dir=str(cache_dir), progress=not args.no_progress,
                                workers=workers, source_of=source_of)
        return load_dataset(spec.family, root or dataset_root(name, spec, data_root, {}), name,
                            spec.options, settings)

    base = get_dataset(args.source)
    if base.family in ("cifar-c", "generated-c", "imagenet-c"):
        of = f" (of {base.options['base']})" if base.options.get("base") else ""
        raise RobenchError(f"{args.source} is itself a -C set{of}",
                           "corrupt its clean base dataset instead")
    source = source_of(args.source, args.root)
    if args.out.resolve() == Path(source.info.get("root", "")).resolve():
        raise RobenchError(f"--out {args.out} is the source dataset's folder",
                           "write the -C set to a new folder")
    layout = args.layout
    if layout == "auto":
        layout = "npy" if np.asarray(base_image(source, 0)).shape == (32, 32, 3) else "folders"
    if layout == "npy":
        if args.resize != "auto":  # the npy layout holds the native 32x32 images
            resolve_resize(args.resize, "imagenet-c", "npy")
        rows = list(range(0, len(source), args.stride))
        generate_c_set(source, args.out, rows=rows, corruptions=corruptions, seed=args.seed,
                       workers=workers, progress=not args.no_progress, protocol=args.protocol)
        family, n = "cifar-c", len(rows) * 5 * len(corruptions)
    else:
        if args.stride != 1:
            raise RobenchError("--stride applies to the npy layout only",
                               "drop --stride, or corrupt a smaller registered dataset")
        generate_c_folders(source, args.out, corruptions=corruptions, seed=args.seed,
                           workers=workers, progress=not args.no_progress,
                           protocol=args.protocol, resize=args.resize)
        family, n = "imagenet-c", len(source) * 5 * len(corruptions)
    made = read_manifest(args.out)
    print(f"{args.source}: {len(corruptions)} corruption(s) x 5 severities -> {args.out} "
          f"({layout} layout, {n} images, protocol {made['protocol']}, resize {made['resize']})")
    print(f"  {made['note']}")
    # its own name: a generated set must never pass for the released one ('imagenet-c')
    decl = (f"{{name: {args.source}-generated-c, family: {family}, "
            f"root: {args.out.resolve()}, templates: {base.templates}}}")
    print(f'  score it: robench run suite=SUITE "datasets=[{decl}]"')
    return 0
