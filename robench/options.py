"""One option machinery for declared options: a method's and a dataset family's (and, next,
the run's config).

Options are a frozen dataclass of :func:`option` fields::

    @dataclass(frozen=True)
    class ProbeOptions(Options):
        train_on: str = option("", "labelled training split", role="train", required=True)
        max_iter: int = option(1000, "L-BFGS iterations per C", minimum=1)

:meth:`Options.parse` turns the mapping a suite declares into an instance, or fails with a named
error: an unknown key (closest valid name first), a value of the wrong type, a number out of its
bounds, a required option left empty. Whose options they are (a model's method options, a
dataset's family options) is said by a :class:`Declarer`, so each message names the model or the
dataset and the command that lists the valid options.

This module imports neither torch nor numpy: a suite's options are checked when it is loaded,
before any data or model work.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from robench.errors import RobenchError, unknown


def option(default: Any, help: str, *, role: str | None = None, required: bool = False,
           minimum: float | None = None, maximum: float | None = None,
           scheduling: bool = False) -> Any:
    """A field of an options dataclass.

    ``help`` is shown by ``robench list methods`` / ``robench list datasets``. ``role`` marks
    an option that names a dataset a method learns from (``train``, ``val``, ``calibrate``): the
    runner refuses it when it is an evaluated set and keys the cell on its files. ``required``
    means the (string) option may not be left empty. ``minimum`` / ``maximum`` bound numbers
    (and the items of lists of numbers). ``scheduling`` marks options that change how the work
    is cut, not what is computed (worker counts, micro-batches): they stay out of artifact keys.
    """
    meta = {"help": help, "role": role, "required": required, "minimum": minimum,
            "maximum": maximum, "scheduling": scheduling}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionInfo:
    """One option as ``robench list methods`` / ``list datasets`` shows it."""

    name: str
    type: str
    default: Any
    help: str


@dataclass(frozen=True)
class Declarer:
    """Who declared a set of options, for messages: ``model m`` with ``method linear-probe``,
    or ``dataset d`` with ``family generated-c``."""

    noun: str  # "model" | "dataset"
    owner: str  # the model's / dataset's name
    kind: str  # "method" | "family"
    name: str  # the method's / family's name
    listing: str  # the command that lists the valid options

    @classmethod
    def method(cls, model: str, method: str) -> Declarer:
        return cls("model", model, "method", method, "robench list methods")

    @classmethod
    def family(cls, dataset: str, family: str) -> Declarer:
        return cls("dataset", dataset, "family", family, "robench list datasets")

    @property
    def who(self) -> str:
        return f"{self.noun} {self.owner}"


@dataclass(frozen=True)
class Options:
    """Base of every options dataclass; a subclass is a frozen dataclass of :func:`option`
    fields. :meth:`check` holds the checks that span several fields."""

    @classmethod
    def parse(cls, given: Mapping[str, Any] | None, *, model: str = "?",
              method: str = "?") -> Options:
        """A model's method options (see :meth:`parse_as`)."""
        return cls.parse_as(given, Declarer.method(model, method))

    @classmethod
    def parse_as(cls, given: Mapping[str, Any] | None, who: Declarer) -> Options:
        """Validated options from a suite's mapping: unknown keys, types, bounds, required."""
        given = dict(given or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if not fields and given:
            raise RobenchError(f"{who.who}: {who.kind} {who.name} takes no options (given "
                               f"{', '.join(sorted(given))})", "remove its options")
        hints = typing.get_type_hints(cls)
        for key, value in given.items():
            _check_value(key, value, fields, hints, who)
        opts = cls(**given)
        for f in fields.values():
            _check_field(opts, f, who)
        opts.check(who.owner, who.name)
        return opts

    def check(self, model: str, method: str) -> None:
        """Checks across fields (override); raise :class:`RobenchError`. ``model`` and
        ``method`` are the owner's and the method's (or the dataset's and the family's) names."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The options that decide what is computed (for artifact keys): all but scheduling."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not f.metadata.get("scheduling")}

    def data_roles(self, role: str | None = None) -> dict[str, str]:
        """option -> dataset for each dataset option that is set (of ``role``, or any)."""
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.metadata.get("role") and (role is None or f.metadata["role"] == role)
                and getattr(self, f.name)}

    @classmethod
    def describe(cls) -> list[OptionInfo]:
        hints = typing.get_type_hints(cls)
        # the datasets first (an inherited option comes before a subclass's in field order)
        fields = sorted(dataclasses.fields(cls), key=lambda f: not f.metadata.get("role"))
        return [OptionInfo(f.name, type_name(hints[f.name], short=True), _default(f),
                           f.metadata.get("help", "")) for f in fields]


@dataclass(frozen=True)
class NoOptions(Options):
    """Options of something that takes none."""


def _check_value(key: str, value: Any, fields: dict[str, dataclasses.Field],
                 hints: dict[str, Any], who: Declarer) -> None:
    """One given option: a known name, of its declared type."""
    if key not in fields:
        raise _named(who, unknown(f"{who.name} option", key, fields,
                                  fix=f"use one of the {who.name} options ({who.listing})"))
    kind = hints[key]
    if get_origin(kind) is Literal and isinstance(value, str) and not fits(value, kind):
        raise _named(who, unknown(f"{who.name} {key}", value, [str(a) for a in get_args(kind)],
                                  fix=f"set options.{key} to one of them"))
    if not fits(value, kind):
        default = _default(fields[key])
        raise RobenchError(
            f"{who.who}: option {key}={value!r} of {who.name} must be {type_name(kind)}",
            f"e.g. {key}: {default!r}" if default not in (None, "") else
            f"give {key} as {type_name(kind)}")


def _named(who: Declarer, e: RobenchError) -> RobenchError:
    """``e`` with the model or dataset that declared the option in front."""
    return RobenchError(f"{who.who}: {e.problem}", e.fix)


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _check_field(opts: Options, f: dataclasses.Field, who: Declarer) -> None:
    value = getattr(opts, f.name)
    meta = f.metadata
    if meta.get("required") and not value:
        what = "dataset" if meta.get("role") else "value"
        raise RobenchError(f"{who.who}: {who.name} needs options.{f.name} ({meta['help']})",
                           f"add options: {{{f.name}: <{what}>}}")
    lo, hi = meta.get("minimum"), meta.get("maximum")
    items = value if isinstance(value, list) else [value]
    for v in items:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and (
                (lo is not None and v < lo) or (hi is not None and v > hi)):
            bounds = " and ".join(s for s in (f">= {lo:g}" if lo is not None else "",
                                              f"<= {hi:g}" if hi is not None else "") if s)
            raise RobenchError(f"{who.who}: option {f.name}={value!r} of {who.name} must be "
                               f"{bounds}", f"set options.{f.name} {bounds}")


# The checker is written here rather than taken from OmegaConf's structured configs, which
# silently coerce strings to numbers ("1e-4" from YAML 1.1) and have no Literal choices.
def fits(value: Any, kind: Any) -> bool:
    """Whether ``value`` (as parsed from YAML) is of the annotated type ``kind``: bool, int,
    float (ints accepted), str, ``list[T]``, ``dict[...]``, ``Literal[...]``, unions / Optional,
    ``Any``."""
    origin = get_origin(kind)
    if kind is Any:
        return True
    if origin is Literal:
        return value in get_args(kind)
    if origin in (Union, types.UnionType):
        return any(fits(value, k) for k in get_args(kind))
    if kind is type(None):
        return value is None
    if origin is list:
        (item,) = get_args(kind) or (Any,)
        return isinstance(value, list) and all(fits(v, item) for v in value)
    if origin is dict or kind is dict:
        return isinstance(value, dict)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def type_name(kind: Any, short: bool = False) -> str:
    """How an option's type reads in errors (``a number``) and listings (``float``)."""
    origin = get_origin(kind)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(kind)) if short else \
            "one of " + ", ".join(repr(a) for a in get_args(kind))
    if origin in (Union, types.UnionType):
        parts = [type_name(k, short) for k in get_args(kind) if k is not type(None)]
        optional = type(None) in get_args(kind)
        return " | ".join(parts) + (" | null" if optional else "") if short else \
            " or ".join(parts) + (" (or null)" if optional else "")
    if origin is list:
        (item,) = get_args(kind) or (Any,)
        plural = {float: "numbers", int: "integers", str: "strings",
                  bool: "true/false values"}.get(item, f"{type_name(item, True)} values")
        return f"list[{type_name(item, True)}]" if short else f"a list of {plural}"
    if origin is dict or kind is dict:
        return "mapping" if short else "a mapping"
    names = {int: ("int", "an integer"), float: ("float", "a number"), str: ("str", "a string"),
             bool: ("bool", "true or false"), type(None): ("null", "null")}
    if kind in names:
        return names[kind][0 if short else 1]
    return getattr(kind, "__name__", str(kind))
