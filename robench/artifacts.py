"""Trained heads and checkpoints as artifacts keyed by a hash of everything they depend on
(backbone weights, training-data manifest / feature key, config, seed): reused when unchanged,
retrained when anything changes, never silently stale.

An artifact lives in ``<cache>/artifacts/<kind>/<key>/`` (or a sub-folder of it, e.g. the
``model/`` of a fine-tuning run). Its files are each sealed (:mod:`robench.io` checksums), and
when the last one is written, :func:`seal_artifact` writes ``artifact.json``: the sha256 of every
file, itself sealed with the artifact's *binding* (its path below ``artifacts/``, which
:func:`artifact_dir` derives from the inputs). An artifact is used only when that manifest
verifies, is bound to the folder asked for, and every file it lists verifies against its own seal
and the manifest's digest: a damaged file, a file without its seal, a file swapped in from
another artifact, or a whole artifact copied over another (sidecars included) is named, removed
and rebuilt. Concurrent runs build an artifact once (a file lock); a complete, verified artifact
is read without the lock (a read-only cache works), and only a holder of the lock removes a
damaged one, so a reader never deletes an entry a writer is finishing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from robench.io import (
    LOCK_SUFFIX,
    SUM_SUFFIX,
    TMP_SUFFIX,
    CorruptEntry,
    discard,
    entry_lock,
    read_json,
    verify_file,
    write_json,
)

IDENT = "ident.json"
MANIFEST = "artifact.json"
ROOT = "artifacts"


def artifact_key(ident: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``ident`` (sorted keys)."""
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


def artifact_dir(cache_dir: str | Path, kind: str, ident: dict[str, Any]) -> Path:
    """``<cache>/artifacts/<kind>/<key>/``, with ``ident.json`` describing what it depends on."""
    d = Path(cache_dir).expanduser() / ROOT / kind / artifact_key(ident)
    d.mkdir(parents=True, exist_ok=True)
    ident_file = d / IDENT
    try:
        same = read_json(ident_file, binding(ident_file)) == json.loads(
            json.dumps(ident, sort_keys=True, default=str))
    except CorruptEntry:
        same = False
    if not same:  # absent, damaged or foreign: it only describes the key, so write it (again)
        write_json(ident_file, ident, bound=binding(ident_file))
    return d


def binding(path: Path) -> str:
    """What a path of the artifact store is: its path below the cache's ``artifacts/`` folder,
    ``<kind>/<key>[/<part>...]`` (the key is the hash of the artifact's inputs), so a whole
    cache can move; a folder outside a store (a fine-tuning run given its own folder) is bound
    to its absolute path."""
    parts = Path(path).parts
    if ROOT not in parts:
        return str(Path(path).expanduser().resolve())
    at = len(parts) - 1 - parts[::-1].index(ROOT)
    return "/".join(parts[at + 1:])


def _members(folder: Path) -> list[Path]:
    """The artifact's own files: not checksum sidecars, locks, temporaries, hidden files, its
    manifest or the key's description."""
    skip = (SUM_SUFFIX, LOCK_SUFFIX, TMP_SUFFIX)
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and not p.name.endswith(skip) and p.name not in (MANIFEST, IDENT))


def seal_artifact(folder: Path) -> None:
    """Mark ``folder`` complete: ``artifact.json`` lists the sha256 of every file (each verified
    against its own seal first), sealed and bound to the folder. Written last."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): verify_file(p)["sha256"] for p in _members(folder)}
    if not files:
        raise CorruptEntry(folder, "holds no file to seal as an artifact")
    write_json(folder / MANIFEST, {"binding": binding(folder), "files": files},
               bound=binding(folder / MANIFEST))


def problems(folder: Path) -> list[str] | None:
    """None while ``folder`` is incomplete (no manifest yet); else what is wrong with it ([] for
    an intact artifact)."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        listed = read_json(manifest, binding(manifest))["files"]
    except (CorruptEntry, KeyError, TypeError) as e:
        return [e.problem if isinstance(e, CorruptEntry) else f"{manifest} lists no files"]
    found = []
    for rel, digest in listed.items():
        try:
            if verify_file(folder / rel)["sha256"] != digest:
                found.append(f"{folder / rel} is not the file this artifact was sealed with "
                             "(swapped in from elsewhere)")
        except CorruptEntry as e:
            found.append(e.problem)
    extra = [p.relative_to(folder).as_posix() for p in _members(folder)
             if p.relative_to(folder).as_posix() not in listed]
    if extra:
        found.append(f"{folder} holds files its manifest does not list: {', '.join(extra[:5])}")
    return found


def intact(folder: Path, repair: bool = False) -> bool:
    """Whether the artifact in ``folder`` is complete and every file verifies (see the module
    docstring). ``repair`` (only under the artifact's lock): a damaged one is removed, but for
    the key's description."""
    found = problems(folder)
    if found is None:
        return False
    if found and repair:
        folder = Path(folder)
        discard(*(p for p in folder.iterdir() if p.name not in (IDENT, IDENT + SUM_SUFFIX)
                  and not p.name.endswith(LOCK_SUFFIX)),
                reason=f"artifact {folder}: {'; '.join(found)}")
    return not found


def ensure(folder: Path, build: Callable[[], None], what: str) -> None:
    """Run ``build()`` (which writes and seals ``folder``'s files) and seal the artifact, unless
    it is intact. A complete, verified artifact is read without a lock; otherwise under the
    lock a concurrent run waits for the first to finish instead of building it again."""
    if intact(folder):
        return
    # the lock sits beside the folder (hidden), not in it: a build may replace the folder
    folder = Path(folder)
    with entry_lock(folder.parent / f".{folder.name}", what):
        if not intact(folder, repair=True):
            build()
            seal_artifact(folder)
