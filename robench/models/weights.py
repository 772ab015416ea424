"""What identifies a model's weights before it is loaded, without importing torch or open_clip.

A run whose cells are all done must find that out cheaply: each cell's key holds the weights'
identity (:func:`weights_identity`: the content hash of the checkpoint files plus the
architecture config), and computing it must not cost the seconds that importing torch and
open_clip do. open_clip's architecture configs are plain JSON files, read here the way open_clip
reads them (``open_clip.factory._rescan_model_configs``: ``*.json`` files of its config folders,
in order, a later file of the same stem replacing an earlier one, only files with ``embed_dim``,
``vision_cfg`` and ``text_cfg``), from open_clip's own folder, robench's, and those registered
through :mod:`robench.models.arch_configs`. Once open_clip is imported (a model was loaded, or a
caller registered configs with open_clip directly) open_clip itself answers, and
``tests/test_backbone.py`` checks that both give the same config for every architecture.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from functools import lru_cache
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # robench's own architectures
ZOO_PREFIXES = ("timm:", "torchvision:")
CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def resolve_assets(pretrained: str | None) -> str | None:
    """``assets:<path>`` (weights shipped inside robench) -> the file's path."""
    if pretrained and pretrained.startswith("assets:"):
        from robench.registry import ASSETS

        return str(ASSETS / pretrained.removeprefix("assets:"))
    return pretrained


def config_paths() -> list[Path]:
    """open_clip's config folders in its order: its own, robench's, then registered ones."""
    from robench.models.arch_configs import registered_paths

    spec = importlib.util.find_spec("open_clip")
    builtin = [Path(p) / "model_configs" for p in (spec.submodule_search_locations or [])] \
        if spec else []
    return [*builtin, CONFIG_DIR, *registered_paths()]


@lru_cache(maxsize=8)
def _scan(paths: tuple[Path, ...]) -> dict[str, dict]:
    configs: dict[str, dict] = {}
    for path in paths:
        files = [path] if path.is_file() and path.suffix == ".json" else \
            sorted(path.glob("*.json")) if path.is_dir() else []
        for f in files:
            cfg = json.loads(f.read_text())
            if isinstance(cfg, dict) and all(k in cfg for k in CONFIG_KEYS):
                configs[f.stem] = cfg
    return configs


def model_configs() -> dict[str, dict]:
    """Architecture name -> open_clip model config, as open_clip would list them."""
    return _scan(tuple(config_paths()))


def model_config(arch: str) -> dict | None:
    """The open_clip model config of ``arch`` (None for timm / torchvision classifiers and
    unknown names)."""
    if arch.startswith(ZOO_PREFIXES):
        return None
    if "open_clip" in sys.modules:  # configs may have been registered with open_clip directly
        import open_clip

        from robench.models import backbone  # noqa: F401  (robench's configs registered)

        return open_clip.get_model_config(arch)
    cfg = model_configs().get(arch)
    return json.loads(json.dumps(cfg)) if cfg is not None else None  # a copy, as open_clip's


def _tag_file(arch: str, pretrained: str) -> str | None:
    """A local file registered for an open_clip pretrained tag (only a caller that imported
    open_clip can have registered one)."""
    if "open_clip" not in sys.modules:
        return None
    import open_clip

    return open_clip.get_pretrained_cfg(arch, pretrained).get("file")


def weights_identity(arch: str, pretrained: str | None, cache_dir: str | Path | None = None
                     ) -> dict:
    """What a model's numbers depend on before it is loaded: the content (sha256, through the
    dataset content index) of its checkpoint file or ``local-dir:`` folder, not its path, so a
    checkpoint replaced at the same path is a new model; plus the architecture config. A tag or
    ``hf-hub:`` model is identified by name (the hub cache stores immutable revisions)."""
    from robench.data.base import file_digests

    pretrained = resolve_assets(pretrained)
    files: list[Path] = []
    if pretrained and pretrained.startswith("local-dir:"):
        folder = Path(pretrained.removeprefix("local-dir:")).expanduser()
        files = sorted(p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin",
                                                                   ".pth", ".json", ".npz"))
    elif pretrained and os.path.isfile(pretrained):
        files = [Path(pretrained)]
    elif pretrained and not pretrained.startswith("hf-hub:") and (
            tag_file := _tag_file(arch, pretrained)):
        files = [Path(tag_file)]
    ident: dict = {"arch": arch, "arch_cfg": model_config(arch)}
    if files:
        ident["files"] = {p.name: h for p, (_, h) in file_digests(files, cache_dir).items()}
    else:
        ident["pretrained"] = pretrained
    return ident


def derived_info(pretrained: str | None) -> dict:
    """What :func:`save_derived` recorded about a derived checkpoint (its parent, and the world
    size its weights were trained under); ``{}`` for any other weights."""
    if not (pretrained and pretrained.startswith("local-dir:")):
        return {}
    path = Path(pretrained.removeprefix("local-dir:")).expanduser() / "open_clip_config.json"
    try:
        info = json.loads(path.read_text()).get("robench")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}
