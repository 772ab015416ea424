"""User-registered open_clip architectures: model config JSON files made open_clip model names.

An open_clip architecture is a JSON file ``<name>.json`` holding the model dict that open_clip's
own ``open_clip/model_configs/*.json`` hold: ``embed_dim``, ``vision_cfg``, ``text_cfg`` (and
optionally ``quick_gelu``, ``custom_text``, ...). Registering a file, or a folder of them, makes
``<name>`` usable as ``arch:`` exactly like a built-in name (``open_clip.add_model_config``).

Where configs come from, in this order:

- ``model_configs: [path, ...]`` in a suite (paths relative to the suite file's folder) or
  ``model_configs=[...]`` on the command line (relative to the working directory);
- ``$ROBENCH_MODEL_CONFIGS``: paths separated by ``os.pathsep`` (``:`` on Linux / macOS).

open_clip silently skips a JSON file that lacks one of the three keys; robench refuses it with
the key named instead, and refuses a name that would replace a different built-in (or already
registered) architecture, so ``arch: ViT-B-32`` always means open_clip's ViT-B-32.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from robench.errors import RobenchError

ENV = "ROBENCH_MODEL_CONFIGS"
REQUIRED = ("embed_dim", "vision_cfg", "text_cfg")
_registered: dict[Path, list[str]] = {}  # resolved path -> the architecture names it added
_applied: set[Path] = set()  # the registered paths open_clip has been given

HOW_TO_REGISTER = (
    "register its config: model_configs: [path/to/configs] in the suite (a folder of <arch>.json "
    "files or one file, relative to the suite file), or $ROBENCH_MODEL_CONFIGS=/path/to/configs; "
    "or load a folder with its own config and weights: pretrained=local-dir:/path "
    "(open_clip_config.json + open_clip_model.safetensors / open_clip_pytorch_model.bin)")


def config_paths(paths: Iterable[str | Path] = ()) -> list[Path]:
    """``paths`` followed by the entries of ``$ROBENCH_MODEL_CONFIGS``."""
    env = [p for p in os.environ.get(ENV, "").split(os.pathsep) if p.strip()]
    return [Path(str(p)).expanduser() for p in [*paths, *env]]


def register_model_configs(paths: Iterable[str | Path] = ()) -> list[str]:
    """Register the architecture configs at ``paths`` and ``$ROBENCH_MODEL_CONFIGS`` with
    open_clip (now if it is imported, else when a model is loaded); return the architecture
    names they provide. Registering a path again is free."""
    names: list[str] = []
    for path in config_paths(paths):
        key = path.resolve()
        if key not in _registered:
            _registered[key] = _register(path)
        names += _registered[key]
    if "open_clip" in sys.modules:
        apply_to_open_clip()
    return names


def registered_paths() -> list[Path]:
    """The config paths registered so far, in order."""
    return list(_registered)


def apply_to_open_clip() -> None:
    """Give open_clip the registered paths it does not have yet (called when open_clip is
    imported to load a model; registering does not import it)."""
    import open_clip

    for path in _registered:
        if path not in _applied:
            open_clip.add_model_config(path)
            _applied.add(path)


def _register(path: Path) -> list[str]:
    from robench.models.weights import model_configs

    files = _config_files(path)
    configs = {f.stem: _read_config(f) for f in files}
    known = model_configs()
    for name, cfg in configs.items():
        if name in known and known[name] != cfg:
            raise RobenchError(
                f"model config {path / (name + '.json') if path.is_dir() else path} is named "
                f"'{name}', which is already a different open_clip architecture",
                "rename the file (the architecture name is the file name without .json)")
    return sorted(configs)


def _config_files(path: Path) -> list[Path]:
    where = f"model config path {path} (from model_configs or ${ENV})"
    if path.is_file():
        if path.suffix != ".json":
            raise RobenchError(f"{where} is not a .json file",
                               "name a folder of <arch>.json files or one <arch>.json file")
        return [path]
    if not path.is_dir():
        raise RobenchError(f"{where} does not exist",
                           "fix the path (suite entries are relative to the suite file's folder, "
                           "command-line ones to the working directory)")
    files = sorted(path.glob("*.json"))  # open_clip reads one level, *.json only
    if not files:
        raise RobenchError(f"{where} holds no .json file",
                           "put <arch>.json files (open_clip model configs) in the folder")
    return files


def _read_config(file: Path) -> dict:
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise RobenchError(f"cannot read model config {file}: {e}", "fix the JSON") from e
    if isinstance(cfg, dict) and "model_cfg" in cfg:
        raise RobenchError(
            f"{file} is a local-dir config (its architecture sits under \"model_cfg\"); "
            "model_configs takes the architecture dict itself",
            f"write the \"model_cfg\" dict to <arch>.json, or load the folder as "
            f"pretrained=local-dir:{file.parent}")
    missing = [k for k in REQUIRED if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise RobenchError(
            f"model config {file} lacks {', '.join(missing)} (open_clip would skip it silently)",
            "an open_clip model config has embed_dim, vision_cfg and text_cfg, as in "
            "open_clip's model_configs/*.json")
    return cfg
