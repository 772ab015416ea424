"""Dataset families. Each family module exposes a loader
``load(root, name, options, settings) -> ImageSource`` and its typed, frozen ``Options``
(:mod:`robench.options`): the options a dataset declares are parsed and checked when a suite is
loaded (:func:`dataset_options`: unknown names with the closest valid one, types, bounds), and
the loader receives them parsed.

The registry (``robench/registry.py``) maps a dataset name to a family plus options, so adding a
dataset is one entry there; adding a new on-disk layout is one module here plus one line below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robench.options import Declarer, Options

if TYPE_CHECKING:
    from robench.data.base import ImageSource, LoadSettings
    from robench.registry import DatasetSpec


@dataclass(frozen=True)
class Family:
    """A dataset family: its loader and its options class, as ``module:name`` (imported lazily
    so a CLI call pays only for what it uses), and what it reads."""

    loader: str
    options: str
    summary: str

    def load_function(self) -> Callable[..., ImageSource]:
        return _attribute(self.loader)

    def options_class(self) -> type[Options]:
        return _attribute(self.options)


FAMILIES: dict[str, Family] = {
    "folder": Family("robench.data.folder:load", "robench.data.folder:FolderOptions",
                     "<root>/<class>/<image>, classes sorted by folder name"),
    "cifar": Family("robench.data.cifar:load", "robench.data.cifar:CifarOptions",
                    "CIFAR-10/100 in torchvision's python-pickle layout"),
    "cifar-c": Family("robench.data.cifar_c:load", "robench.data.cifar_c:CifarCOptions",
                      "<root>/<corruption>.npy uint8 (5N, 32, 32, 3) + labels.npy"),
    "generated-c": Family("robench.data.generated_c:load",
                          "robench.data.generated_c:GeneratedCOptions",
                          "a -C set generated from another dataset on first use, in the cache"),
    "imagenet-folder": Family("robench.data.imagenet:load_folder",
                              "robench.data.imagenet:ImageNetFolderOptions",
                              "<root>/<wnid>/<image>; label = 1k index of the wnid"),
    "imagenet-v2": Family("robench.data.imagenet:load_v2", "robench.data.imagenet:V2Options",
                          "<root>/<0..999>/<image>; label = int(folder name)"),
    "imagenet-c": Family("robench.data.imagenet_c:load", "robench.data.imagenet_c:ImageNetCOptions",
                         "<root>/<corruption>/<1..5>/<class>/<image>"),
}


def _attribute(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(import_module(module), name)


def family(name: str) -> Family:
    """The family ``name``, or a named error listing the valid ones (closest first)."""
    from robench.errors import unknown

    if name not in FAMILIES:
        raise unknown("dataset family", name, FAMILIES,
                      fix="use one of the families (robench list datasets)")
    return FAMILIES[name]


def family_options(name: str, given: Mapping[str, Any] | None, dataset: str = "?") -> Options:
    """A dataset's declared options for family ``name``, parsed and checked."""
    return family(name).options_class().parse_as(given, Declarer.family(dataset, name))


def dataset_options(name: str, spec: DatasetSpec) -> Options:
    """The declared options of dataset ``name``, parsed and checked (when a suite is loaded,
    before any data is read)."""
    return family_options(spec.family, spec.options, name)


def load_dataset(family_name: str, root: Path, name: str,
                 options: Options | Mapping[str, Any] | None = None,
                 settings: LoadSettings | None = None) -> ImageSource:
    """Read dataset ``name`` of family ``family_name`` at ``root`` with its options (parsed, or
    a declared mapping, which is parsed here)."""
    fam = family(family_name)
    if not isinstance(options, Options):
        options = family_options(family_name, options, name)
    elif type(options) is not fam.options_class():
        raise TypeError(f"family {family_name} takes {fam.options_class().__name__}, not "
                        f"{type(options).__name__}")
    return fam.load_function()(root, name, options, settings)


def family_listing() -> list[str]:
    """The lines ``robench list datasets`` prints after the datasets: each family, what it
    reads, and its options (name, type, default, meaning), as ``robench list methods`` does."""
    import json

    lines = ["", "families (a suite declares a dataset inline as {name: x, family: F, root: DIR, "
             "options: {...}}):"]
    for name, fam in FAMILIES.items():
        lines.append(f"{name}: {fam.summary}")
        infos = fam.options_class().describe()
        lines += [f"    {o.name:18s} {o.type:32s} {json.dumps(o.default):12s} {o.help}"
                  for o in infos] or ["    (no options)"]
    return lines
