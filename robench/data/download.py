"""``robench data download``: fetch a dataset's released archive, explicitly, once.

Never called implicitly (a run never downloads data). Standard library only:

- canonical sources, Hugging Face hub mirrors first where they exist, the original host as a
  fallback; no Google Drive. ImageNet val and ImageNet-Sketch need manual steps: asking for them
  prints the instructions (a manually downloaded archive can then be installed with
  ``--archive FILE``, which goes through the same safe extraction);
- streaming into ``<data_root>/.robench-downloads/<file>.part`` with a tqdm progress bar; an
  interrupted transfer is resumed with an HTTP ``Range`` request (automatically a few times,
  and again on the next call), a server that ignores ``Range`` restarts it from zero;
- size and sha256 / md5 verification against checksums pinned here (their origin is noted);
- safe extraction into a staging folder beside the target: absolute names, ``..`` components,
  links pointing outside, device files and FIFOs are refused before anything is written (tar
  additionally extracts under Python's ``data`` filter); compression is detected from the bytes,
  not the file name (the ImageNet-V2 ``.tar.gz`` files are plain tars);
- an existing dataset folder is never overwritten without ``force``; the extracted folder
  replaces the target with a rename (atomic on one file system).
"""

from __future__ import annotations

import http.client
import os
import platform
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from robench.errors import RobenchError, unknown
from robench.io import TMP_SUFFIX, file_digest, human_size, process_tag, sweep_stale
from robench.registry import DatasetSpec, dataset_root, get_dataset

USER_AGENT = "robench-data-download/1 (+https://github.com; python-urllib)"
CHUNK = 1 << 20
WORK_DIR = ".robench-downloads"


@dataclass(frozen=True)
class Archive:
    """A released archive: where to get it, what it must hash to, and which of its top folders
    becomes the dataset root (``top=None``: its content goes into the root as is)."""

    urls: tuple[str, ...]
    filename: str
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    top: str | None = None
    checksum_origin: str = ""


@dataclass(frozen=True)
class Manual:
    """A dataset robench cannot fetch (licence, login); ``instructions`` may use ``{target}``."""

    why: str
    instructions: str
    top: str | None = None  # for ``--archive``: the archive's folder that becomes the root


_HF_V2 = "https://huggingface.co/datasets/vaishaal/ImageNetV2/resolve/main/"
_S3_V2 = "https://imagenetv2public.s3-us-west-2.amazonaws.com/"
_TFDS = "tensorflow/datasets url_checksums (sha256 and size of the same release file)"


def _v2(archive: str, top: str, sha256: str, size: int) -> Archive:
    return Archive((_HF_V2 + archive, _S3_V2 + archive), archive, sha256=sha256, size=size,
                   top=top, checksum_origin=_TFDS + "; the HF hub copy is the authors' mirror")


_CIFAR10 = Archive(("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
                   "cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
                   checksum_origin="torchvision.datasets.CIFAR10.tgz_md5")
_CIFAR100 = Archive(("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
                    "cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85",
                    checksum_origin="torchvision.datasets.CIFAR100.tgz_md5")

SOURCES: dict[str, Archive | Manual] = {
    "cifar10": _CIFAR10,
    "cifar10-train": _CIFAR10,
    "cifar100": _CIFAR100,
    "cifar100-train": _CIFAR100,
    "cifar10-c": Archive(
        ("https://zenodo.org/records/2535967/files/CIFAR-10-C.tar?download=1",), "CIFAR-10-C.tar",
        sha256="c72763e101c723b7c507b96205f7e938912a5d587376173b825850cf3cb876a7",
        size=2918471680, top="CIFAR-10-C", checksum_origin=_TFDS),
    "cifar100-c": Archive(
        ("https://zenodo.org/records/3555552/files/CIFAR-100-C.tar?download=1",),
        "CIFAR-100-C.tar",
        sha256="30ee6543a1bfd049fa33834b7c1ada301e7064b7fbe8fc38340eb8b62ced4b33",
        size=2918473216, top="CIFAR-100-C", checksum_origin=_TFDS),
    "imagenet-r": Archive(
        ("https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",), "imagenet-r.tar",
        sha256="18c6bf493b39a0d975d48e587437f562caab9c52ae6327dcfa9dd8eb54aa1b52",
        size=2191079936, top="imagenet-r", checksum_origin=_TFDS),
    "imagenet-a": Archive(
        ("https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar",), "imagenet-a.tar",
        sha256="3bb3632277e6ba6392ea64c02ddbf4dd2266c9caffd6bc09c9656d28f012589e",
        size=687552512, top="imagenet-a", checksum_origin=_TFDS),
    "imagenet-v2-matched-frequency": _v2(
        "imagenetv2-matched-frequency.tar.gz", "imagenetv2-matched-frequency-format-val",
        "a32004f9e773279307499059d320336a23ccdc62cb32063da29bae9bd04c122c", 1253959680),
    "imagenet-v2-threshold-0.7": _v2(
        "imagenetv2-threshold0.7.tar.gz", "imagenetv2-threshold0.7-format-val",
        "bf2e2d9b625ae29c6e44982928f36220af62359b74602a995518a06840d0d76e", 605399040),
    "imagenet-v2-top-images": _v2(
        "imagenetv2-top-images.tar.gz", "imagenetv2-top-images-format-val",
        "1ced1ef684934a84af854658bc8ff9adbbec553631e6eef3535ef816c3d3b98f", 606351360),
    "imagenet": Manual(
        "the ImageNet terms of access require a login at image-net.org",
        "1) accept the terms at https://image-net.org/download-images and download "
        "ILSVRC2012_img_val.tar (6.3 GB) and ILSVRC2012_devkit_t12.tar.gz into a folder DIR; "
        "2) sort the 50,000 flat images into <wnid>/ folders, e.g. `python -c \"import "
        "torchvision; torchvision.datasets.ImageNet('DIR', split='val')\"` (writes DIR/val/"
        "<wnid>/*.JPEG); 3) move DIR/val to {target} or set data.imagenet.root=DIR/val; "
        "4) check it: robench data verify imagenet"),
    "imagenet-c": Manual(
        "ImageNet-C comes as five archives (about 65 GB) on Zenodo; robench installs them one by "
        "one from files you downloaded",
        "1) download blur.tar, digital.tar, noise.tar and weather.tar (extra.tar for the four "
        "extra corruptions) from https://zenodo.org/record/2235448; 2) extract each into "
        "{target} so that it holds <corruption>/<1..5>/<wnid>/*.JPEG (`tar -xf blur.tar -C "
        "{target}`), or set data.imagenet-c.root to where they are; 3) robench data verify "
        "imagenet-c --sample 2000. To generate a -C set from ImageNet val instead (not the "
        "released ImageNet-C, so keep it out of {target} and declare it under its own name): "
        "robench data corrupt --from imagenet --out DIR"),
    "imagenet-sketch": Manual(
        "ImageNet-Sketch is distributed by its authors through Google Drive / Kaggle, which "
        "robench does not script",
        "1) download ImageNet-Sketch.zip (8.4 GB) from https://github.com/HaohanWang/"
        "ImageNet-Sketch (Kaggle: wanghaohan/imagenetsketch) or the Hugging Face hub dataset "
        "songweig/imagenet_sketch (file data/ImageNet-Sketch.zip); 2) install it with "
        "`robench data download imagenet-sketch --archive ImageNet-Sketch.zip` (safe "
        "extraction of its sketch/ folder to {target}), or unzip it yourself and set "
        "data.imagenet-sketch.root to the folder holding sketch/; 3) robench data verify "
        "imagenet-sketch",
        top="sketch"),
}


# -- helpers ------------------------------------------------------------------------------------
def _need_space(folder: Path, nbytes: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise RobenchError(f"{what} needs {human_size(nbytes, 1000)} but {folder} has "
                           f"{human_size(free, 1000)} free",
                           "free some space or download to another data_root (--data-root)")


class _Interrupted(Exception):
    """The transfer stopped early; the .part file is kept for a resume."""

    def __init__(self, have: int, total: int | None, why: str) -> None:
        self.have, self.total, self.why = have, total, why
        super().__init__(why)


# -- transfer -----------------------------------------------------------------------------------
def fetch(urls: tuple[str, ...], dest: Path, size: int | None = None, progress: bool = True,
          retries: int = 2, timeout: float = 60.0) -> Path:
    """Download the first working URL to ``dest`` through ``dest.part``, resuming a partial
    file with HTTP Range. Raises RobenchError (keeping the .part) when every attempt failed."""
    part = dest.with_name(dest.name + ".part")
    failures: list[str] = []
    for url in urls:
        for _attempt in range(retries + 1):
            try:
                _fetch_once(url, part, size, progress, timeout)
                os.replace(part, dest)
                return dest
            except _Interrupted as e:
                have = human_size(e.have, 1000)
                if e.total:
                    have += f" of {human_size(e.total, 1000)}"
                failures.append(f"{url}: interrupted after {have} ({e.why})")
                continue  # resume from the .part
            except urllib.error.HTTPError as e:
                failures.append(f"{url}: HTTP {e.code} {e.reason}")
                break  # next mirror
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", None) or e
                failures.append(f"{url}: {reason}")
                break
    have = part.stat().st_size if part.exists() else 0
    kept = f"; {human_size(have, 1000)} kept in {part}" if have else ""
    raise RobenchError(
        f"download of {dest.name} failed{kept}: " + " | ".join(failures[-4:]),
        "re-run the same command: it resumes the partial file (check the network or proxy "
        "settings if nothing arrives)")


def _fetch_once(url: str, part: Path, size: int | None, progress: bool, timeout: float) -> None:
    from robench.progress import progress_bar

    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                      timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing after `have`: the part is complete
            e.close()
            return
        raise
    with resp:
        total: int | None
        if have and resp.status == 206:
            m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                raise _Interrupted(0, None, "the server answered the resume with another range")
            total = int(m.group(3)) if m.group(3) != "*" else None
            mode = "ab"
        else:  # 200: a fresh transfer (the server may have ignored Range)
            have, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if size is not None and total is not None and total != size:
            part.unlink(missing_ok=True)
            raise RobenchError(
                f"{url} offers {total} bytes, but the pinned release is {size} bytes",
                "the mirror serves a different file: try again later or report it; robench "
                "will not install an unverified archive")
        total = total or size
        if total:
            _need_space(part.parent, total - have, f"downloading {part.name[:-5]}")
        got = have
        try:
            with open(part, mode) as f, progress_bar(
                    total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=part.name[:-5], disable=not progress, dynamic_ncols=True) as bar:
                while True:
                    chunk = resp.read(CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:  # timeouts and resets included
            raise _Interrupted(got, total, f"{type(e).__name__}: {e}") from e
    if total is not None and got < total:
        raise _Interrupted(got, total, "connection closed early")
    if total is not None and got > total:
        part.unlink(missing_ok=True)
        raise _Interrupted(0, total, f"received {got} bytes for a {total}-byte file")


def verify_checksum(path: Path, archive: Archive, sha256: str | None = None,
                    delete_on_mismatch: bool = True) -> str:
    """Check ``path`` against the pinned (or user-given) checksum; return a one-line summary."""
    expected = [("sha256", sha256.lower())] if sha256 else \
        [(a, v) for a, v in (("sha256", archive.sha256), ("md5", archive.md5)) if v]
    if not expected:
        return "no checksum pinned for this archive (size and structure checked only)"
    if archive.size is not None and not sha256 and path.stat().st_size != archive.size:
        got_size = path.stat().st_size
        if delete_on_mismatch:
            path.unlink()
        raise RobenchError(
            f"{path.name} is {got_size} bytes, the pinned release is {archive.size} bytes",
            "download it again (re-run the command)" if delete_on_mismatch else
            "this is not the released archive: download it again")
    for algo, want in expected:
        got = file_digest(path, algo)
        if got != want:
            if delete_on_mismatch:
                path.unlink()
            origin = "given with --sha256" if sha256 else f"pinned from {archive.checksum_origin}"
            raise RobenchError(
                f"{algo} of {path.name} is {got}, expected {want} ({origin})"
                + ("; the file was deleted" if delete_on_mismatch else ""),
                "re-run to download it again; if it fails again the server delivers other bytes "
                "than the release: do not use them (report it)")
    return f"{expected[0][0]} verified ({expected[0][1][:16]}...)"


# -- safe extraction ----------------------------------------------------------------------------
def _bad(archive: Path, member: str, why: str) -> RobenchError:
    return RobenchError(f"refusing to extract {archive.name}: member '{member}' {why}",
                        "the archive is not the released one (or was tampered with): delete it "
                        "and download it again; nothing was extracted")


def _check_name(archive: Path, name: str) -> str:
    """A normalised, relative, inside-the-destination member path (else raise)."""
    if not name or "\x00" in name:
        raise _bad(archive, name, "has an empty or NUL name")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise _bad(archive, name, "is an absolute path")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise _bad(archive, name, "climbs out of the destination with '..'")
    return posixpath.normpath(name.replace("\\", "/"))


def _check_tar(archive: Path, tf: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Every member checked against the tree the archive itself builds: a path may not pass
    through a symbolic link of the archive, and a link's target is resolved through the links
    extracted before it (``a -> .`` then ``a/a/b -> ../../..`` climbs out: refused)."""
    try:
        members = tf.getmembers()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise _damaged(archive, e) from e
    links = {_check_name(archive, m.name): m.linkname for m in members if m.issym()}
    for m in members:
        norm = _check_name(archive, m.name)
        parents = norm.split("/")[:-1]
        for i in range(1, len(parents) + 1):
            if "/".join(parents[:i]) in links:
                raise _bad(archive, m.name, f"lies beneath the symbolic link "
                           f"'{'/'.join(parents[:i])}' of the archive")
        if m.ischr() or m.isblk() or m.isfifo():
            raise _bad(archive, m.name, "is a device file or FIFO")
        if m.issym():
            if m.linkname.startswith("/") or re.match(r"^[A-Za-z]:", m.linkname):
                raise _bad(archive, m.name, f"is a link to the absolute path {m.linkname}")
            if _resolve(parents + m.linkname.replace("\\", "/").split("/"), links) is None:
                raise _bad(archive, m.name, f"is a link pointing outside ({m.linkname})")
        elif m.islnk():
            _check_name(archive, m.linkname)
        elif not (m.isreg() or m.isdir()):
            raise _bad(archive, m.name, "has an unsupported type")
    _check_end_marker(archive, tf)  # after the members: a hostile member is named first
    return members


def _check_end_marker(archive: Path, tf: tarfile.TarFile) -> None:
    """A plain tar cut at a header boundary reads as a shorter valid archive (tarfile stops at
    the first incomplete header); the two zero blocks that end every tar tell the difference.
    (A compressed tar cut anywhere fails in the decompressor instead.)"""
    with open(archive, "rb") as f:
        if f.read(6)[:3] in (b"\x1f\x8b\x08", b"BZh", b"\xfd7z"):
            return
        f.seek(tf.offset)
        tail = f.read(2 * tarfile.BLOCKSIZE)
    if len(tail) < 2 * tarfile.BLOCKSIZE or tail.strip(b"\0"):
        raise _damaged(archive, EOFError(f"no end-of-archive marker after byte {tf.offset}"))


def _resolve(parts: list[str], links: dict[str, str], depth: int = 0) -> list[str] | None:
    """``parts`` resolved inside the archive's own tree (following its symbolic links ``links``,
    member path -> target); None when it leaves the destination or loops."""
    if depth > 40:  # as the kernel's ELOOP limit
        return None
    out: list[str] = []
    for part in parts:
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                return None
            out.pop()
            continue
        here = "/".join([*out, part])
        if here in links:
            target = links[here]
            if target.startswith("/"):
                return None
            resolved = _resolve([*out, *target.split("/")], links, depth + 1)
            if resolved is None:
                return None
            out = resolved
        else:
            out.append(part)
    return out


def _damaged(archive: Path, e: BaseException) -> RobenchError:
    return RobenchError(f"{archive.name} is truncated or damaged ({type(e).__name__}: {e})",
                        "delete it and download it again (robench data download ... resumes or "
                        "restarts it and checks its checksum)")


def _check_zip(archive: Path, zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    for info in infos:
        _check_name(archive, info.filename)
        ftype = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip records no type
        if ftype not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise _bad(archive, info.filename, "is a link or special file")
    return infos


def extract_safely(archive: Path, dest: Path) -> None:
    """Extract a tar (any compression) or zip into the empty folder ``dest`` after checking
    every member; nothing is written when one member is unsafe."""
    if tarfile.is_tarfile(archive):
        if not hasattr(tarfile, "data_filter"):
            raise RobenchError(
                f"this Python ({platform.python_version()}) has no tarfile.data_filter, without "
                f"which extracting {archive.name} is not safe",
                "use Python 3.10.12+, 3.11.4+ or 3.12+, or extract the archive yourself and set "
                "data.<dataset>.root to it")
        try:
            with tarfile.open(archive, "r:*") as tf:
                members = _check_tar(archive, tf)
                _need_space(dest, sum(m.size for m in members if m.isreg()),
                            f"extracting {archive}")
                tf.extractall(dest, members=members, filter="data")
        except tarfile.FilterError as e:  # what the checks above let through, the filter stops
            raise _bad(archive, getattr(getattr(e, "tarinfo", None), "name", "?"), str(e)) from e
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise _damaged(archive, e) from e
    elif zipfile.is_zipfile(archive):
        try:
            with zipfile.ZipFile(archive) as zf:
                infos = _check_zip(archive, zf)
                _need_space(dest, sum(i.file_size for i in infos), f"extracting {archive}")
                zf.extractall(dest, members=infos)
        except (zipfile.BadZipFile, EOFError, zlib.error) as e:
            raise _damaged(archive, e) from e
    else:
        raise RobenchError(f"{archive} is neither a tar nor a zip archive",
                           "it is damaged or an HTML error page: delete it and download again")


def install(archive: Path, target: Path, top: str | None, force: bool = False) -> Path:
    """Extract ``archive`` beside ``target`` and move its ``top`` folder (or all of it) to
    ``target`` with a rename; an existing target is replaced only with ``force``."""
    _check_target(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target.parent, recursive=False)  # staging folders of killed installs
    # named by this process (robench.io.process_tag), so a later sweep knows when it is stale
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.extract."
                                    f"{process_tag()}.", suffix=TMP_SUFFIX))
    try:
        extract_safely(archive, staging)
        payload = staging
        if top is not None:
            payload = staging / top
            if not payload.is_dir():
                tops = sorted(p.name for p in staging.iterdir())
                if len(tops) == 1 and (staging / tops[0]).is_dir():
                    payload = staging / tops[0]  # a re-packed archive with another top name
                else:
                    raise RobenchError(
                        f"{archive.name} has no top folder '{top}' (it holds {', '.join(tops)})",
                        "this is not the released archive: delete it and download it again")
        old = None
        if target.exists():
            if target.is_dir() and not any(target.iterdir()):
                target.rmdir()
            else:  # force: keep the old copy until the new one is in place
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.rename(target, old)
        try:
            os.rename(payload, target)
        except OSError:
            if old is not None:
                os.rename(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _check_target(target: Path, force: bool) -> None:
    if target.exists() and not force and not (target.is_dir() and not any(target.iterdir())):
        raise RobenchError(f"{target} already exists; robench does not overwrite data",
                           "check it with `robench data verify`, or pass --force to replace it")


# -- the command --------------------------------------------------------------------------------
def downloadable(name: str, spec: DatasetSpec) -> Archive | Manual:
    """The source of a registered dataset, or an error saying why there is none."""
    if name in SOURCES:
        return SOURCES[name]
    if spec.family == "generated-c":
        raise RobenchError(f"{name} is generated from {spec.options.get('base')} on first use "
                           "(nothing to download)", f"just run a suite that uses {name}")
    if spec.root.startswith("assets:"):
        raise RobenchError(f"{name} ships with robench (nothing to download)",
                           f"use it directly: 'datasets=[{name}]'")
    raise unknown("downloadable dataset", name, SOURCES)


def download(name: str, data_root: str | Path, root: Path | None = None, force: bool = False,
             archive: Path | None = None, sha256: str | None = None, keep_archive: bool = False,
             progress: bool = True, retries: int = 2, timeout: float = 60.0) -> tuple[Path, str]:
    """Fetch (or take ``archive``), verify and install dataset ``name``; return (root, note)."""
    spec = get_dataset(name)
    src = downloadable(name, spec)
    target = Path(root) if root is not None else dataset_root(name, spec, str(data_root), {})
    if isinstance(src, Manual) and archive is None:
        raise RobenchError(f"{name} cannot be downloaded by robench: {src.why}",
                           src.instructions.format(target=target))
    _check_target(target, force)  # before spending bandwidth
    if archive is not None:
        archive = Path(archive)
        if not archive.is_file():
            raise RobenchError(f"--archive {archive} does not exist", "give the archive's path")
        pinned = src if isinstance(src, Archive) else Archive((), archive.name)
        note = verify_checksum(archive, pinned, sha256, delete_on_mismatch=False)
        return install(archive, target, src.top, force), note
    assert isinstance(src, Archive)
    work = target.parent / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    path = work / src.filename
    if path.is_file():  # a finished download from an earlier call that did not get installed
        try:
            note = verify_checksum(path, src, sha256)
        except RobenchError:
            path = fetch(src.urls, path, None if sha256 else src.size, progress, retries, timeout)
            note = verify_checksum(path, src, sha256)
    else:
        path = fetch(src.urls, path, None if sha256 else src.size, progress, retries, timeout)
        note = verify_checksum(path, src, sha256)
    install(path, target, src.top, force)
    if not keep_archive:
        path.unlink(missing_ok=True)
        try:
            work.rmdir()
        except OSError:
            pass  # other downloads in progress
    return target, note
