"""Trained heads and checkpoints as artifacts keyed by a hash of everything they depend on
(backbone weights, training-data manifest / feature key, config, seed): reused when unchanged,
retrained when anything changes, never silently stale."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def artifact_key(ident: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``ident`` (sorted keys)."""
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


def artifact_dir(cache_dir: str | Path, kind: str, ident: dict[str, Any]) -> Path:
    """``<cache>/artifacts/<kind>/<key>/``, with ``ident.json`` describing what it depends on."""
    d = Path(cache_dir).expanduser() / "artifacts" / kind / artifact_key(ident)
    d.mkdir(parents=True, exist_ok=True)
    ident_file = d / "ident.json"
    if not ident_file.is_file():
        from robench.io import write_json

        write_json(ident_file, ident)
    return d
