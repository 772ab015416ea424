"""robench: robustness benchmark suite for CLIP models.

Data flows suite -> runner -> backbone -> features (cached) -> heads -> metrics -> records ->
report/check; each step lives in its own module (see README).

The Python API (:mod:`robench.api`): :func:`run`, :func:`evaluate`, :func:`load_results`,
:class:`CustomModel`; errors are :class:`RobenchError`. They are imported on first use, so
``import robench`` (and the CLI) stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from robench.api import evaluate, load_results, run
    from robench.errors import RobenchError
    from robench.models.custom import CustomModel
    from robench.preprocess import Preprocess
    from robench.registry import DatasetSpec, ModelSpec

_EXPORTS = {
    "run": "robench.api", "evaluate": "robench.api", "load_results": "robench.api",
    "CustomModel": "robench.models.custom", "RobenchError": "robench.errors",
    "ModelSpec": "robench.registry", "DatasetSpec": "robench.registry",
    "Preprocess": "robench.preprocess",
}
__all__ = ["CustomModel", "DatasetSpec", "ModelSpec", "Preprocess", "RobenchError", "__version__",
           "evaluate", "load_results", "run"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'robench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
