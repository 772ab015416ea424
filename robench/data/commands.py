"""The ``robench data`` command: explicit data management (see :data:`USAGE`).

Wired into ``robench/cli.py`` by :func:`add_data_commands`, which returns the ``data``
sub-parsers so more actions (``corrupt``) can be added beside ``verify`` and ``download``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

USAGE = """explicit data management (robench never downloads data on its own):

  robench data verify NAME... [--root DIR] [--sample N] [--accept]
  robench data verify --suite S [NAME...] [key=value ...]
  robench data download [NAME] [--root DIR] [--force] [--archive FILE] [--sha256 HEX]

Dataset folders come from the same place as a run's: --root for one dataset, else the registered
root under --data-root (default: $ROBENCH_DATA, else ./data); --suite S takes suite S's data_root
and data.<name>.root instead."""


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
    v.add_argument("--root", type=Path, help="the dataset's folder (one NAME only)")
    v.add_argument("--data-root", help="folder holding the datasets (default: $ROBENCH_DATA or "
                   "./data)")
    v.add_argument("--suite", help="verify this suite's datasets, with its data_root and "
                   "data.<name>.root")
    v.add_argument("--sample", type=int, metavar="N",
                   help="decode a seeded random sample of N images instead of all (0: none)")
    v.add_argument("--seed", type=int, default=0, help="seed of --sample")
    v.add_argument("--accept", action="store_true",
                   help="record the current file listing after an intended change")
    v.add_argument("--workers", type=int, help="decoding threads (default: CPU count, max 8)")
    v.add_argument("--cache-dir", type=Path,
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
    d.add_argument("--root", type=Path, help="install here instead of <data-root>/<default>")
    d.add_argument("--data-root", help="folder holding the datasets (default: $ROBENCH_DATA or "
                   "./data)")
    d.add_argument("--force", action="store_true", help="replace an existing dataset folder")
    d.add_argument("--archive", type=Path, metavar="FILE",
                   help="install a manually downloaded archive instead of downloading")
    d.add_argument("--sha256", metavar="HEX",
                   help="expect this sha256 instead of the pinned checksum (only a value you "
                   "trust)")
    d.add_argument("--keep-archive", action="store_true",
                   help="keep the downloaded archive in <data-root>/.robench-downloads")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_download)
    return dsub


def _targets(args: argparse.Namespace) -> list[tuple[str, object, Path]]:
    """(name, spec, root) of each dataset to act on."""
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
            declared[name] = spec
        names = args.names or list(declared)
        roots = OmegaConf.to_container(cfg.data)
        out = []
        for n in names:
            spec = declared.get(n) or get_dataset(n)
            out.append((n, spec, args.root or dataset_root(n, spec, cfg.data_root, roots)))
        return out
    if not args.names:
        raise RobenchError("no dataset named", "give NAME(s) (see `robench list datasets`) or "
                           "--suite SUITE")
    data_root = args.data_root or default_data_root()
    out = []
    for n in args.names:
        spec = get_dataset(n)
        out.append((n, spec, args.root or dataset_root(n, spec, data_root, {})))
    return out


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
                                accept=args.accept, seed=args.seed)
        print(report.render(), flush=True)
        failed += not report.ok
    return 1 if failed else 0


def cmd_download(args: argparse.Namespace) -> int:
    from robench.data import family_loader
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
        source = family_loader(spec.family)(target, name=args.name, **spec.options)
    except RobenchError as e:
        print(f"  but it does not load: {e}")
        return 1
    expected = f" (expected {spec.n_expected})" if spec.n_expected else ""
    print(f"  {len(source)} samples{expected}; decode-check it with "
          f"`robench data verify {args.name}`")
    return 0 if spec.n_expected in (None, len(source)) else 1
