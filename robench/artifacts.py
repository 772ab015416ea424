"""Trained heads and checkpoints as artifacts keyed by a hash of everything they depend on
(backbone weights, training-data manifest / feature key, config, seed): reused when unchanged,
retrained when anything changes, never silently stale.

An artifact is a folder whose files are all sealed (:mod:`robench.io` checksums) and whose
*marker* file is written last; it is used only when the marker is there and every file verifies.
A damaged artifact is removed and rebuilt, and concurrent runs build it once (a file lock).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from robench.io import LOCK_SUFFIX, SUM_SUFFIX, CorruptEntry, discard, entry_lock, verify_file

IDENT = "ident.json"


def artifact_key(ident: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``ident`` (sorted keys)."""
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


def artifact_dir(cache_dir: str | Path, kind: str, ident: dict[str, Any]) -> Path:
    """``<cache>/artifacts/<kind>/<key>/``, with ``ident.json`` describing what it depends on."""
    d = Path(cache_dir).expanduser() / "artifacts" / kind / artifact_key(ident)
    d.mkdir(parents=True, exist_ok=True)
    ident_file = d / IDENT
    try:
        verify_file(ident_file)
    except CorruptEntry:  # absent or damaged: it only describes the key, so write it (again)
        from robench.io import write_json

        write_json(ident_file, ident)
    return d


def intact(folder: Path, marker: str) -> bool:
    """Whether the artifact in ``folder`` is complete (``marker`` written, sealed) and every
    sealed file in it verifies. A damaged one is removed (but for ``ident.json``) and False."""
    folder = Path(folder)
    if not (folder / marker).is_file():
        return False
    sealed = {folder / marker} | {side.with_name(side.name.removesuffix(SUM_SUFFIX))
                                  for side in folder.rglob(f"*{SUM_SUFFIX}")}
    problems = []
    for f in sorted(sealed):
        if f.name != IDENT:  # rewritten by artifact_dir when damaged
            try:
                verify_file(f)
            except CorruptEntry as e:
                problems.append(e.problem)
    if problems:
        keep = {IDENT, IDENT + SUM_SUFFIX}
        discard(*(p for p in folder.iterdir() if p.name not in keep
                  and not p.name.endswith(LOCK_SUFFIX) and not p.name.endswith(SUM_SUFFIX)),
                reason=f"artifact {folder}: {'; '.join(problems)}")
        return False
    return True


def ensure(folder: Path, marker: str, build: Callable[[], None], what: str) -> None:
    """Run ``build()`` (which writes ``folder``'s files, ``marker`` last) unless the artifact is
    intact; under a lock, so a concurrent run waits for it instead of building it again."""
    if intact(folder, marker):
        return
    with entry_lock(Path(folder) / marker, what):
        if not intact(folder, marker):
            build()
