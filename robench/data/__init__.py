"""Dataset families. Each family module exposes ``load(root, spec) -> ImageSource``.

The registry (``robench/registry.py``) maps a dataset name to a family plus options, so adding a
dataset is one entry there; adding a new on-disk layout is one module here plus one line below.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

# family name -> "module:function" (imported lazily so a CLI call pays only for what it uses)
FAMILIES: dict[str, str] = {
    "folder": "robench.data.folder:load",
    "cifar": "robench.data.cifar:load",
    "cifar-c": "robench.data.cifar_c:load",
    "generated-c": "robench.data.generated_c:load",
    "imagenet-folder": "robench.data.imagenet:load_folder",
    "imagenet-v2": "robench.data.imagenet:load_v2",
    "imagenet-c": "robench.data.imagenet_c:load",
}


def family_loader(family: str) -> Callable:
    """The ``load`` function of a dataset family."""
    from robench.errors import unknown

    if family not in FAMILIES:
        raise unknown("dataset family", family, FAMILIES)
    module, func = FAMILIES[family].split(":")
    return getattr(import_module(module), func)
