"""Methods: what turns a backbone into a classifier head (the *heads* step of a run).

``METHODS`` maps a model spec's ``method`` to its class (``module:Class``); a method is one file
here (a :class:`robench.methods.base.Method` subclass with its options dataclass) plus one line
below. ``robench list methods`` shows each one's options with their types, defaults and meaning.
The training and fitting code the methods call lives in :mod:`robench.models` and is imported
only when a head is built, so loading a suite never imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import import_module
from typing import Any

from robench.errors import unknown
from robench.methods.base import Method

METHODS: dict[str, str] = {
    "zeroshot": "robench.methods.zeroshot:ZeroShot",
    "linear-probe": "robench.methods.linear_probe:LinearProbe",
    "lp-clip": "robench.methods.lp_clip:LPCLIP",
    "finetune": "robench.methods.finetune:FineTune",
    "car-ft": "robench.methods.finetune:CarFT",
    "lp-ft": "robench.methods.lp_ft:LPFT",
    "flyp": "robench.methods.flyp:FLYP",
    "wise-ft": "robench.methods.wise_ft:WiseFT",
    "temperature-scaling": "robench.methods.temperature:TemperatureScaling",
    "classifier": "robench.methods.classifier:Classifier",  # robench.CustomModel(classifier=)
}


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``."""
    if name not in METHODS:
        raise unknown("method", name, METHODS, fix="see `robench list methods`")
    module, _, cls = METHODS[name].partition(":")
    return getattr(import_module(module), cls)


def make_method(name: str, declared: Mapping[str, Any] | None, model: str = "?") -> Method:
    """The method ``name`` with a model's declared options parsed and checked."""
    return method_class(name).from_declared(declared, model=model)
