"""Method options checked when the suite is loaded, before any model or feature work: unknown
keys (closest valid one first) and wrongly typed values (``epochs: abc``, ``alphas: 0.5``).

A method module declares ``DEFAULTS`` (option -> default); the type of each option is that of
its default, or ``OPTION_TYPES[key]`` where the default (``None``) says nothing.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from robench.errors import RobenchError, unknown


def list_of(kind: type) -> tuple[str, type]:
    """The type of an option that is a list of ``kind`` values."""
    return ("list", kind)


def _kind_of(default: Any) -> Any:
    if isinstance(default, list):
        return list_of(type(default[0]) if default else object)
    return type(default)


def _fits(value: Any, kind: Any) -> bool:
    if isinstance(kind, tuple):  # ("list", element type)
        return isinstance(value, list) and all(_fits(v, kind[1]) for v in value)
    if kind is object or value is None:
        return True
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def _name(kind: Any) -> str:
    if isinstance(kind, tuple):
        return f"a list of {_name(kind[1])} values"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            dict: "a mapping"}.get(kind, kind.__name__)


def check_options(model: str, method: str, options: dict, module: ModuleType) -> None:
    """Raise a :class:`RobenchError` naming the model, the option and the expected type."""
    defaults = getattr(module, "DEFAULTS", None)
    if defaults is None:
        if options:
            raise RobenchError(f"model {model}: method {method} takes no options (given "
                               f"{', '.join(sorted(options))})", "remove its options")
        return
    types = getattr(module, "OPTION_TYPES", {})
    for key, value in options.items():
        if key not in defaults:
            raise unknown(f"{method} option", key, defaults,
                          fix=f"use one of the {method} options (robench list methods)")
        kind = types.get(key, _kind_of(defaults[key]))
        if not _fits(value, kind):
            raise RobenchError(f"model {model}: option {key}={value!r} of {method} must be "
                               f"{_name(kind)}",
                               f"e.g. {key}: {defaults[key]!r}" if defaults[key] is not None
                               else f"give {key} as {_name(kind)}")
    if base := getattr(module, "BASE", None):  # a wrapper (temperature scaling): its base too
        from importlib import import_module

        from robench.models import METHODS

        method_key, options_key = base
        inner = str(options.get(method_key, defaults[method_key]))
        if inner not in METHODS:
            raise unknown("method", inner, METHODS, fix=f"set options.{method_key} to a method")
        check_options(model, inner, dict(options.get(options_key) or {}),
                      import_module(METHODS[inner]))
