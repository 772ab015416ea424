"""The Python API: the same runs as the CLI, returning pandas DataFrames.

    import robench
    df = robench.run("quickstart", overrides=["models=[tiny-clip-cifar10]"])
    df = robench.evaluate(model="tiny-clip-cifar10", datasets=["cifar10-subset-val"])
    df = robench.evaluate(model=robench.CustomModel(name="mine", classifier=net,
                                                    preprocess=tf), datasets=[...])
    df = robench.load_results("runs/quickstart")

Each returns one row per (model, dataset) cell: ``suite``, ``model``, ``dataset``, ``method``,
``n``, every headline metric and its interval bounds (``acc1_ci_low`` ...), as ``robench results
--format csv`` prints them. Records are written as by ``robench run`` (``results_dir``, default
``runs``), so a second call reuses finished cells and cached features; bad input raises
:class:`robench.RobenchError`, naming the problem and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from os import PathLike
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from robench.config import build_config, load_suite, preflight
from robench.errors import RobenchError
from robench.models.custom import CustomModel
from robench.registry import ModelSpec
from robench.results import load_frame, read_record, to_frame

ModelLike = str | dict[str, Any] | ModelSpec | CustomModel


def run(suite: str = "quickstart", overrides: Sequence[str] = ()) -> pd.DataFrame:
    """Run a suite (a name from ``robench list suites`` or a YAML path) with ``key=value``
    overrides, exactly as ``robench run suite=SUITE key=value ...``; return its cells."""
    return _run(load_suite(_suite_arg(suite), _overrides_arg(overrides)))


def evaluate(model: ModelLike, datasets: Sequence[str | dict[str, Any]],
             overrides: Sequence[str] = (), suite: str = "evaluate",
             **config: Any) -> pd.DataFrame:
    """Score one model on ``datasets`` (registry names or inline declarations).

    ``model``: a registered name, an inline declaration (``{"name": ..., "arch": ...,
    "pretrained": ..., "method": ...}``), a :class:`~robench.registry.ModelSpec` (named after its
    architecture and method), or a :class:`CustomModel` (your own ``nn.Module``). Config keys
    are keyword arguments (``device="cpu"``, ``metrics={"bootstrap": 0}``, ``id_dataset=...``)
    and/or ``key=value`` strings in ``overrides`` (the ``model`` section only there, e.g.
    ``overrides=["model.batch_size=64"]``: ``model=`` is the model); records go to
    ``results_dir/suite``.
    """
    datasets = _datasets_arg(datasets)
    overrides = _overrides_arg(overrides)
    suite = _suite_arg(suite, "suite (the name records are filed under)")
    backbones = {}
    if isinstance(model, CustomModel):
        declaration: Any = model.declaration()
    elif isinstance(model, ModelSpec):
        name = model.arch if model.method == "zeroshot" else f"{model.arch}-{model.method}"
        declaration = {"name": name, **asdict(model)}
    elif isinstance(model, (str, dict)):
        declaration = model
    else:
        raise RobenchError(f"model must be a name, a declaration dict, a ModelSpec or a "
                           f"CustomModel, not {type(model).__name__}",
                           "wrap an nn.Module as robench.CustomModel(name=..., classifier=... "
                           "or image_encoder=..., preprocess=...)")
    for key in ("models", "datasets"):
        if key in config:
            raise RobenchError(f"evaluate() takes the model and datasets as arguments, not "
                               f"{key}=", "use robench.run() for a suite of several models")
    cfg = build_config({"models": [declaration], "datasets": list(datasets), **config},
                       list(overrides), default_name=suite)
    if isinstance(model, CustomModel):
        backbone = model.backbone(cfg.device, cfg.model.precision)
        backbones[(backbone.arch, backbone.pretrained)] = backbone
    return _run(cfg, backbones)


def load_results(results_dir: str | Path = "runs") -> pd.DataFrame:
    """The cells of every record under ``results_dir`` (e.g. ``results/quickstart``, the
    committed reference records)."""
    fix = ("pass the folder that holds the records (robench.run writes runs/<suite>/; the "
           "committed ones are in results/<suite>/)")
    return load_frame(_path_arg(results_dir, "results_dir", fix), fix=fix)


def _path_arg(value: Any, what: str, fix: str, noun: str = "a folder path") -> str | Path:
    """A name or path argument: a non-empty str or path-like."""
    if isinstance(value, (str, PathLike)) and str(value).strip():
        return value
    raise RobenchError(f"{what} must be {noun} (str or pathlib.Path), not {value!r}", fix)


def _suite_arg(value: Any, what: str = "suite") -> str:
    """A suite name or a YAML path (str or path-like)."""
    return str(_path_arg(value, what, "pass a suite name of `robench list suites` (e.g. "
                         "\"quickstart\") or the path of a suite YAML file",
                         noun="a suite name or a YAML path"))


def _overrides_arg(value: Any) -> list[str]:
    """``key=value`` strings, as on the command line."""
    if isinstance(value, str):
        raise RobenchError("overrides must be a list of key=value strings, not one string",
                           f'pass overrides=["{value}"]')
    if not isinstance(value, Sequence) or not all(isinstance(o, str) for o in value):
        raise RobenchError(f"overrides must be a list of key=value strings, not {value!r}",
                           'e.g. overrides=["model.batch_size=64", "device=cpu"]')
    return list(value)


def _datasets_arg(value: Any) -> list[str | dict[str, Any]]:
    """One dataset name, or a list of names and inline declarations."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and value and all(isinstance(d, (str, dict))
                                                     for d in value):
        return list(value)
    raise RobenchError(f"datasets must be a dataset name or a non-empty list of names / "
                       f"declarations, not {value!r}",
                       'e.g. datasets=["cifar10-subset-val"] (see `robench list datasets`)')


def _run(cfg: DictConfig, backbones: dict | None = None) -> pd.DataFrame:
    from robench.progress import verbosity_level
    from robench.runner import Runner

    preflight(cfg)
    with verbosity_level(cfg.verbosity):
        paths = Runner(cfg, backbones=backbones or {}).run()
    return to_frame([read_record(p) for p in paths])
