"""``robench data verify``: is a dataset on disk what robench expects, and has it changed?

Checks, in order, each reported as ok / warn / FAIL with the fix:

- layout: the family's loader reads the index (same code as a run, so the same label rule); its
  error, when there is one, names what is there instead of the expected layout;
- count: number of samples against the registry's expected count (ImageNet val 50000, ...);
- classes: every class folder present and non-empty; labels inside the label space (and inside
  the scored sub-list for ImageNet-R/-A); stray non-image files;
- checksums (CIFAR pickles): md5 of every batch file against torchvision's table;
- readable: every image decoded (or a seeded random ``--sample N``), unreadable files named;
- manifest: the file listing (relative path + size) of the dataset folder, hashed and written to
  ``<root>/.robench_manifest.json`` (or, when the root is read-only, to
  ``<cache>/manifests/``); a later verify compares against it and reports added, removed and
  resized files. ``accept`` records the new listing after an intended change.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from robench.data import dataset_options, load_dataset
from robench.data.base import ImageSource, LoadSettings, UndecodableImage, read_image
from robench.errors import RobenchError
from robench.options import Options
from robench.registry import DatasetSpec

if TYPE_CHECKING:
    from robench.data.generated_c import GeneratedCOptions

MANIFEST_NAME = ".robench_manifest.json"
MANIFEST_FORMAT = 1
STATUS_WIDTH = 5


@dataclass
class Check:
    """One line of a verify report."""

    status: str  # "ok" | "warn" | "FAIL"
    what: str
    detail: str
    fix: str | None = None


@dataclass
class VerifyReport:
    name: str
    root: Path
    checks: list[Check] = field(default_factory=list)
    manifest_path: Path | None = None
    source: ImageSource | None = None

    def add(self, status: str, what: str, detail: str, fix: str | None = None) -> None:
        self.checks.append(Check(status, what, detail, fix))

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.status == "FAIL"]

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        lines = [f"{self.name}  (root {self.root})"]
        for c in self.checks:
            lines.append(f"  {c.status:<{STATUS_WIDTH}} {c.what:<9} {c.detail}")
            if c.fix:
                lines.append(f"  {'':<{STATUS_WIDTH}} {'':<9} fix: {c.fix}")
        n = len(self.problems)
        warns = sum(c.status == "warn" for c in self.checks)
        verdict = "OK" if n == 0 else f"{n} problem{'s' if n > 1 else ''}"
        lines.append(f"  => {self.name}: {verdict}"
                     + (f" ({warns} warning{'s' if warns > 1 else ''})" if warns else ""))
        return "\n".join(lines)


def verify_dataset(name: str, spec: DatasetSpec, root: Path, sample: int | None = None,
                   cache_dir: Path | None = None, workers: int | None = None,
                   progress: bool = True, accept: bool = False, seed: int = 0,
                   source_of: Callable[[str], ImageSource] | None = None) -> VerifyReport:
    """Verify the dataset ``name`` (declared by ``spec``) at ``root``; never raises for a problem
    in the data itself (that is a FAIL line), only for a problem of the call.

    A -C set generated on demand (family ``generated-c``) is verified in the cache once a run
    has made it; before that the report says so (``source_of`` reads its base dataset)."""
    report = VerifyReport(name, root)
    options = dataset_options(name, spec)  # a declaration error is the call's, not the data's
    if spec.family == "cifar":  # checksums before a batch file is read at all
        _check_cifar_md5(report, options.variant, root)  # type: ignore[attr-defined]
    try:
        if spec.family == "generated-c":
            source = _generated(report, options, cache_dir, source_of)  # type: ignore[arg-type]
            if source is None:
                return report
        else:
            source = load_dataset(spec.family, root, name, options,
                                  LoadSettings(cache_dir=str(cache_dir or ""), progress=progress,
                                               workers=workers or 1))
    except RobenchError as e:
        report.add("FAIL", "layout", e.problem, e.fix)
        _compare_only(report, report.root, cache_dir)
        return report
    report.source = source
    data_root = Path(source.info.get("root") or root)
    report.root = data_root
    _check_layout(report, spec, options, source)
    _check_count(report, spec, source)
    _check_classes(report, source)
    _check_readable(report, source, sample, workers, progress, seed)
    _check_manifest(report, spec, source, data_root, cache_dir, sample, accept)
    return report


def _generated(report: VerifyReport, opts: GeneratedCOptions, cache_dir: Path | None,
               source_of: Callable[[str], ImageSource] | None) -> ImageSource | None:
    """The generated -C set in the cache, or ``None`` (and a report line) if not made yet."""
    from dataclasses import replace

    from robench.data import generated_c

    if source_of is None:
        raise RobenchError(f"{report.name}: a generated -C set needs its base dataset",
                           "verify it with --suite SUITE, or verify the base dataset")
    src = generated_c.base_source(report.name, opts.base, source_of)
    opts = replace(opts, protocol=generated_c.resolved_protocol(src, opts.protocol))
    out = generated_c.output_dir(src, opts, cache_dir or "")
    report.root = out
    if not generated_c.is_generated(out, opts.corruptions):
        report.add("ok", "generated", f"not generated yet: `robench run` makes it on first use "
                   f"from {_rows(len(src), opts.stride)} of {opts.base}, into the cache")
        return None
    report.add("ok", "generated", f"from {_rows(len(src), opts.stride)} of {opts.base} (seed "
               f"{opts.seed}, protocol {opts.protocol}), in the cache; not a released -C set")
    return generated_c.read_generated(out, report.name, src, opts)


# -- the checks ---------------------------------------------------------------------------------
def _check_layout(report: VerifyReport, spec: DatasetSpec, options: Options,
                  source: ImageSource) -> None:
    info = source.info
    scored = (f"scored over {len(source.class_subset)} of {len(source.classnames)} classes"
              if source.class_subset else f"{len(source.classnames)} classes")
    if "layout" in info:
        detail = f"{info['layout']}; {info.get('label_rule', '')}"
        if not source.class_subset:
            detail += f"; {scored}"
    elif source.groups:
        cs = info.get("corruptions", [])
        per = info.get("rows_per_file", 0) // 5
        detail = (f"{spec.family}: {len(cs)} corruption files x 5 severities x {per} images "
                  f"(labels from labels.npy); {scored}")
    else:
        detail = f"{spec.family}: {scored}"
    report.add("ok", "layout", detail)
    if info.get("generated") and spec.family != "generated-c":  # that one says so already
        report.add("ok", "generated", str(info["generated"].get("note")))
    if source.groups and "corruptions" in info:
        from robench.data.corruptions import CORRUPTIONS

        absent = [c for c in CORRUPTIONS if c not in info["corruptions"]]
        if absent and getattr(options, "corruptions", None) == "all":
            report.add("warn", "layout",
                       f"{len(absent)} of the {len(CORRUPTIONS)} corruption files are absent: "
                       f"{', '.join(absent)} (the 15 standard ones are present)",
                       "re-extract the full archive if you want the extra corruptions")


def _check_count(report: VerifyReport, spec: DatasetSpec, source: ImageSource) -> None:
    n, expected, note = len(source), spec.n_expected, ""
    present = source.info.get("corruptions")
    if expected is not None and source.groups and present:
        from robench.data.corruptions import CORRUPTIONS

        if expected % len(CORRUPTIONS) == 0 and len(present) < len(CORRUPTIONS):
            # the extra corruptions are optional: count what the present files should hold
            expected = expected // len(CORRUPTIONS) * len(present)
            note = f" for the {len(present)} corruption files present"
    if expected is None:
        report.add("ok", "count", f"{n} samples (no expected count registered)")
    elif n == expected:
        report.add("ok", "count", f"{n} samples (expected {expected}{note})")
    else:
        how = "missing" if n < expected else "extra"
        report.add("FAIL", "count",
                   f"{n} samples, expected {expected}{note} ({abs(expected - n)} {how})",
                   "the copy is incomplete (an interrupted extraction?): "
                   f"{_reinstall(report.name)}"
                   if n < expected else
                   "remove files that are not part of the release (duplicates from a second "
                   "extraction, copies with other extensions)")


def _check_classes(report: VerifyReport, source: ImageSource) -> None:
    labels, k = source.labels, len(source.classnames)
    info = source.info
    # labels outside 0..k-1 are refused when the source is built (data.base.check_labels)
    expected = source.class_subset if source.class_subset is not None else list(range(k))
    if source.class_subset is not None:
        outside = sorted(set(np.unique(labels).tolist()) - set(source.class_subset))
        if outside:
            report.add("FAIL", "labels", f"{len(outside)} label(s) outside the scored sub-list",
                       "the loader and the sub-list disagree: report this as a bug")
            return
    counts = np.bincount(labels, minlength=k)[expected]
    missing = info.get("missing_classes") or []
    empty = [c for c, n in zip(expected, counts, strict=True) if n == 0]
    if missing:
        report.add("FAIL", "classes",
                   f"{len(missing)} of {len(expected)} class folders missing: {_short(missing)}",
                   f"the copy is incomplete: {_reinstall(report.name)}")
    elif empty:
        names = [f"{c} '{source.classnames[c]}'" for c in empty]
        report.add("FAIL", "classes",
                   f"{len(empty)} of {len(expected)} classes have no images: {_short(names)}",
                   f"a class without images cannot be scored: {_reinstall(report.name)}")
    else:
        report.add("ok", "classes", f"{len(expected)} of {len(expected)} classes present, "
                   f"{counts.min()}..{counts.max()} samples per class")
    skipped = info.get("skipped_files") or []
    if skipped:
        report.add("warn", "files", f"{len(skipped)} non-image entries in class folders "
                   f"ignored: {_short(skipped)}",
                   "harmless if intended; a stray archive or folder means an odd extraction")


def _check_cifar_md5(report: VerifyReport, variant: str, root: Path) -> None:
    from robench.data.cifar import RELEASES, md5_mismatches

    cls = RELEASES[variant]
    folder = (root if root.name == cls.base_folder else root / cls.base_folder)
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    present = [f for f in files if (folder / f).is_file()]
    if not present:
        return  # the layout check says what is missing
    if bad := md5_mismatches(cls, folder, present):
        report.add("FAIL", "checksum", f"md5 mismatch for {', '.join(bad)} in {folder}",
                   f"the files are damaged: {_reinstall(report.name)}")
    else:
        report.add("ok", "checksum", f"md5 of all {len(present)} files match torchvision's "
                   "table")


def _check_readable(report: VerifyReport, source: ImageSource, sample: int | None,
                    workers: int | None, progress: bool, seed: int) -> None:
    n = len(source)
    if sample == 0:
        report.add("warn", "readable", "not checked (--sample 0)")
        return
    if sample is not None and sample < n:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=sample, replace=False))
        what = f"a random sample of {sample} (seed {seed})"
    else:
        rows = np.arange(n)
        what = "all"
    bad = decode_all(source, rows, workers=workers, progress=progress)
    if bad:
        paths = source.info.get("paths")
        named = [f"{paths[i] if paths else f'#{i}'} ({err})" for i, err in bad]
        report.add("FAIL", "readable",
                   f"{len(bad)} of {len(rows)} images could not be decoded: {_short(named, 3)}",
                   f"replace those files ({_reinstall(report.name)}); until then a run skips "
                   "and counts them (or fails with strict=true)")
    else:
        report.add("ok", "readable", f"{len(rows)} of {len(rows)} images decoded ({what})")


def decode_all(source: ImageSource, rows: np.ndarray, workers: int | None = None,
               progress: bool = True) -> list[tuple[int, str]]:
    """Decode rows of ``source`` (threads: PIL releases the GIL while decoding); return the
    (row, error) pairs that failed."""
    from robench.progress import progress_bar

    def one(i: int) -> tuple[int, str] | None:
        try:
            read_image(source, int(i))  # what a run reads: both skip the same images
        except UndecodableImage as e:
            return int(i), str(e)
        return None

    workers = workers or min(8, os.cpu_count() or 1)
    bad = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for r in progress_bar(pool.map(one, rows, chunksize=64), total=len(rows), unit="img",
                              desc=f"decoding {source.name}", disable=not progress):
            if r is not None:
                bad.append(r)
    return bad


# -- the manifest -------------------------------------------------------------------------------
def file_listing(root: Path) -> list[tuple[str, int]]:
    """(relative path, size) of every regular file under ``root`` (symlinks followed), without
    robench's own manifest and hidden files."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if f.startswith("."):
                continue
            p = Path(dirpath) / f
            try:
                out.append((p.relative_to(root).as_posix(), p.stat().st_size))
            except OSError:  # a dangling symlink: listed with size -1, decode reports it
                out.append((p.relative_to(root).as_posix(), -1))
    return sorted(out)


def listing_hash(listing: list[tuple[str, int]]) -> str:
    h = hashlib.sha256()
    for rel, size in listing:
        h.update(f"{rel}\t{size}\n".encode())
    return h.hexdigest()


def manifest_locations(root: Path, cache_dir: Path | None) -> list[Path]:
    """Where a manifest may sit: in the root, else in the cache (read-only roots)."""
    places = [root / MANIFEST_NAME]
    if cache_dir is not None:
        key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
        places.append(Path(cache_dir) / "manifests" / f"{root.name}-{key}.json")
    return places


def read_manifest(root: Path, cache_dir: Path | None) -> tuple[dict | None, Path | None]:
    for p in manifest_locations(root, cache_dir):
        if p.is_file():
            try:
                return json.loads(p.read_text()), p
            except (OSError, ValueError):
                return {"unreadable": True}, p
    return None, None


def _write_json(path: Path, obj: dict) -> None:
    from robench.io import write_json

    write_json(path, obj)


def write_manifest(root: Path, cache_dir: Path | None, obj: dict,
                   writer: Callable[[Path, dict], None] | None = None) -> Path:
    """Write into the root; fall back to the cache dir when the root is not writable."""
    writer = writer or _write_json
    errors = []
    for p in manifest_locations(root, cache_dir):
        try:
            writer(p, obj)
            return p
        except OSError as e:
            errors.append(f"{p}: {e.strerror or e}")
    raise RobenchError(f"cannot write the manifest ({'; '.join(errors)})",
                       "make the dataset folder or the cache dir (ROBENCH_CACHE) writable")


def _diff(old: list, new: list) -> str:
    o, n = dict(map(tuple, old)), dict(new)
    added = sorted(set(n) - set(o))
    removed = sorted(set(o) - set(n))
    resized = sorted(k for k in set(o) & set(n) if o[k] != n[k])
    parts = []
    for label, items in (("added", added), ("removed", removed), ("changed size", resized)):
        if items:
            parts.append(f"{len(items)} file(s) {label} ({_short(items, 3)})")
    return "; ".join(parts) or "the listing differs"


def _compare_only(report: VerifyReport, root: Path, cache_dir: Path | None) -> None:
    """After a failed load: say whether the folder changed since it was last verified."""
    if not root.is_dir():
        return
    old, path = read_manifest(root, cache_dir)
    if old and "files" in old:
        listing = file_listing(root)
        if listing_hash(listing) != old.get("files_hash"):
            report.add("FAIL", "manifest", f"the folder changed since it was verified on "
                       f"{old.get('created', '?')} ({path}): {_diff(old['files'], listing)}",
                       "restore the data, or fix the layout problem above")


def _check_manifest(report: VerifyReport, spec: DatasetSpec, source: ImageSource, root: Path,
                    cache_dir: Path | None, sample: int | None, accept: bool) -> None:
    listing = file_listing(root)
    digest = listing_hash(listing)
    old, old_path = read_manifest(root, cache_dir)
    entry = {"n": len(source), "source_manifest_hash": source.manifest_hash,
             "family": spec.family, "decoded": "all" if sample is None else f"sample {sample}",
             "verified": _now(), "ok": report.ok}
    if old and not old.get("unreadable") and old.get("files_hash") == digest:
        datasets = {**old.get("datasets", {}), report.name: entry}
        if report.ok and old_path is not None:
            try:  # note this verification where the manifest already is
                _write_json(old_path, {**old, "datasets": datasets})
            except OSError:
                pass  # a read-only copy: the comparison above is what matters
        report.manifest_path = old_path
        report.add("ok", "manifest", f"unchanged since {old.get('created', '?')} "
                   f"({len(listing)} files, sha256 {digest[:16]}; {old_path})")
        return
    if old and not accept:
        what = ("is unreadable" if old.get("unreadable") else
                f"was recorded on {old.get('created', '?')}; now: "
                f"{_diff(old.get('files', []), listing)}")
        report.manifest_path = old_path
        report.add("FAIL", "manifest", f"the data changed: the manifest {old_path} {what}",
                   "if the change is intended, re-run with --accept to record the new listing; "
                   "otherwise restore the data (records made before carry the old "
                   "data.manifest_hash)")
        return
    if not report.ok:
        report.add("warn", "manifest", "not written: fix the problems above first")
        return
    obj = {"format": MANIFEST_FORMAT, "created": _now(), "root": str(root),
           "files_hash": digest, "n_files": len(listing), "files": [list(x) for x in listing],
           "datasets": {report.name: entry}}
    path = write_manifest(root, cache_dir, obj)
    report.manifest_path = path
    where = "" if path.parent == root else " (the dataset folder is read-only)"
    verb = "re-recorded after --accept" if old else "written"
    report.add("ok", "manifest",
               f"{verb}: {path}{where} ({len(listing)} files, sha256 {digest[:16]})")


def _reinstall(name: str) -> str:
    """How to get a clean copy of ``name``."""
    from robench.data.download import SOURCES, Archive

    if isinstance(SOURCES.get(name), Archive):
        return (f"extract the archive again, or `robench data download {name} --force` "
                "(downloads, verifies and replaces it)")
    if name in SOURCES:
        return f"redo the manual install (`robench data download {name}` lists the steps)"
    return "copy the dataset again from its source"


def _rows(n: int, stride: int) -> str:
    return f"all {n} images" if stride == 1 else f"every {stride}th of the {n} images"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _short(items: list, k: int = 5) -> str:
    shown = ", ".join(str(x) for x in items[:k])
    return shown + (f", ... ({len(items)} in all)" if len(items) > k else "")
