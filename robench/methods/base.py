"""The method API: what turns a backbone into a classifier head.

A method is one class with a declared options dataclass::

    @dataclass(frozen=True)
    class ProbeOptions(Options):
        train_on: str = option("", "labelled training split", role="train", required=True)
        max_iter: int = option(1000, "L-BFGS iterations per C", minimum=1)

    class LinearProbe(Method):
        name = "linear-probe"
        summary = "..."
        Options = ProbeOptions

        def build(self, ctx: HeadContext, source: ImageSource) -> LinearHead: ...

and one line in :data:`robench.methods.METHODS`. The runner calls, per model:

1. ``Options.parse(declared options)`` when the suite is loaded: unknown keys (closest first),
   wrong types, out-of-range values and missing required datasets are named errors, before any
   model or feature work;
2. :meth:`Method.expand` once (a declaration may stand for several models, e.g. one WiSE-FT
   model per alpha);
3. :meth:`Method.prepare` when a cell of the model is pending: methods that change the backbone
   (fine-tuning, WiSE-FT) train or reuse their checkpoint here and return the spec that loads it;
4. :meth:`Method.build` once per label space: the head that scores the cached features.

Everything a method needs from the run comes through :class:`Bench` (implemented by the runner,
which this module does not import) and :class:`Settings`; state between steps passes in typed
objects (the options instance, the prepared :class:`~robench.registry.ModelSpec`), never in
keys of the user's options.

Method files import their engines (torch, open_clip) inside the hooks, so loading a suite and
checking which cells are done never imports torch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, Union, get_args, get_origin

from robench.errors import RobenchError, unknown

if TYPE_CHECKING:
    from robench.data.base import ImageSource
    from robench.features import FeatureSet
    from robench.models.backbone import Backbone
    from robench.models.heads import LinearHead
    from robench.registry import ModelSpec


# -- options --------------------------------------------------------------------------------------
def option(default: Any, help: str, *, role: str | None = None, required: bool = False,
           minimum: float | None = None, maximum: float | None = None,
           scheduling: bool = False) -> Any:
    """A field of an options dataclass.

    ``help`` is shown by ``robench list methods``. ``role`` marks an option that names a dataset
    the method learns from (``train``, ``val``, ``calibrate``): the runner refuses it when it is
    an evaluated set and keys the cell on its files. ``required`` means the (string) option may
    not be left empty. ``minimum`` / ``maximum`` bound numbers (and the items of lists of
    numbers). ``scheduling`` marks options that change how the work is cut, not what is computed
    (worker counts, micro-batches): they stay out of artifact keys.
    """
    meta = {"help": help, "role": role, "required": required, "minimum": minimum,
            "maximum": maximum, "scheduling": scheduling}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionInfo:
    """One option as ``robench list methods`` shows it."""

    name: str
    type: str
    default: Any
    help: str


@dataclass(frozen=True)
class Options:
    """Base of every method's options; a subclass is a frozen dataclass of :func:`option`
    fields. :meth:`check` holds the checks that span several fields."""

    @classmethod
    def parse(cls, given: Mapping[str, Any] | None, *, model: str = "?",
              method: str = "?") -> Options:
        """Validated options from a suite's mapping: unknown keys, types, bounds, required."""
        given = dict(given or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if not fields and given:
            raise RobenchError(f"model {model}: method {method} takes no options (given "
                               f"{', '.join(sorted(given))})", "remove its options")
        hints = typing.get_type_hints(cls)
        for key, value in given.items():
            if key not in fields:
                raise unknown(f"{method} option", key, fields,
                              fix=f"use one of the {method} options (robench list methods)")
            kind = hints[key]
            if get_origin(kind) is Literal and isinstance(value, str) and not fits(value, kind):
                raise unknown(f"{method} {key}", value, [str(a) for a in get_args(kind)],
                              fix=f"set options.{key} to one of them")
            if not fits(value, kind):
                default = _default(fields[key])
                raise RobenchError(
                    f"model {model}: option {key}={value!r} of {method} must be "
                    f"{type_name(kind)}",
                    f"e.g. {key}: {default!r}" if default not in (None, "") else
                    f"give {key} as {type_name(kind)}")
        opts = cls(**given)
        for f in fields.values():
            _check_field(opts, f, model, method)
        opts.check(model, method)
        return opts

    def check(self, model: str, method: str) -> None:
        """Checks across fields (override); raise :class:`RobenchError`."""

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
    """A method without options."""


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _check_field(opts: Options, f: dataclasses.Field, model: str, method: str) -> None:
    value = getattr(opts, f.name)
    meta = f.metadata
    if meta.get("required") and not value:
        what = "dataset" if meta.get("role") else "value"
        raise RobenchError(f"model {model}: {method} needs options.{f.name} ({meta['help']})",
                           f"add options: {{{f.name}: <{what}>}}")
    lo, hi = meta.get("minimum"), meta.get("maximum")
    items = value if isinstance(value, list) else [value]
    for v in items:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and (
                (lo is not None and v < lo) or (hi is not None and v > hi)):
            bounds = " and ".join(s for s in (f">= {lo:g}" if lo is not None else "",
                                              f"<= {hi:g}" if hi is not None else "") if s)
            raise RobenchError(f"model {model}: option {f.name}={value!r} of {method} must be "
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


# -- what a method gets from the run ----------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """The run's settings a method may read (from the suite's config)."""

    cache_dir: str
    device: str
    seed: int = 0
    progress: bool = True
    strict: bool = False
    batch_size: int = 256
    num_workers: int = 0
    allow_download: bool = False
    features_dtype: str = "auto"  # storage dtype of cached features (model.features_dtype)


class Bench(Protocol):
    """The services of the run (the runner implements them)."""

    settings: Settings

    def source(self, dataset: str) -> ImageSource:
        """A dataset's index (no pixels read)."""

    def features(self, backbone: Backbone, dataset: str) -> tuple[ImageSource, FeatureSet]:
        """A dataset's cached image features under ``backbone``."""

    def templates_for(self, dataset: str) -> list[str]:
        """The prompt templates of a dataset's template set."""

    def template_set_of(self, dataset: str) -> str:
        """The name of a dataset's template set."""

    def declared(self, model: str) -> ModelSpec:
        """A model's spec as declared in the suite or the registry."""

    def method_of(self, model: str) -> Method:
        """A model's method instance (options parsed)."""

    def prepared(self, model: str) -> ModelSpec:
        """A model's spec after :meth:`Method.prepare` (its checkpoint trained if needed)."""


@dataclass
class HeadContext:
    """What :meth:`Method.build` gets: the loaded backbone, the model's prepared spec, and the
    run's services."""

    backbone: Backbone
    spec: ModelSpec
    bench: Bench

    @property
    def settings(self) -> Settings:
        return self.bench.settings

    @property
    def cache_dir(self) -> str:
        return self.bench.settings.cache_dir

    @property
    def progress(self) -> bool:
        return self.bench.settings.progress

    def features(self, dataset: str) -> tuple[ImageSource, FeatureSet]:
        return self.bench.features(self.backbone, dataset)

    def template_set(self, source: ImageSource) -> str:
        return self.bench.template_set_of(source.name)

    def templates(self, source: ImageSource) -> list[str]:
        return self.bench.templates_for(source.name)


# -- the method ----------------------------------------------------------------------------------
class Method(ABC):
    """One way of turning a backbone into a classifier head (see the module docstring)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    source: ClassVar[str] = ""  # the paper (or recipe) it follows
    Options: ClassVar[type[Options]] = NoOptions
    # the training split is read as images (fine-tuning), so the runner extracts no features
    # for it
    trains_on_images: ClassVar[bool] = False

    def __init__(self, options: Options, model: str = "?") -> None:
        if not isinstance(options, self.Options):
            raise TypeError(f"{type(self).__name__} needs {self.Options.__name__}, "
                            f"not {type(options).__name__}")
        self.options = options
        self.model = model  # the model it serves, for messages

    @classmethod
    def from_declared(cls, given: Mapping[str, Any] | None, model: str = "?") -> Method:
        """The method with a model's declared options parsed and checked."""
        return cls(cls.Options.parse(given, model=model, method=cls.name), model)

    def expand(self, name: str, declared: Mapping[str, Any]) -> list[tuple[str, dict]]:
        """The models one declaration stands for, as (name, declared options); one by default."""
        return [(name, dict(declared))]

    def data_roles(self) -> list[tuple[str, str]]:
        """(option, dataset) pairs this method trains, selects or calibrates on."""
        return list(self.options.data_roles().items())

    def dependencies(self) -> list[str]:
        """The models this one is built from (WiSE-FT's fine-tuned model)."""
        return []

    def fitted_on(self) -> set[str]:
        """Datasets whose labels or pixels the head is fitted on (not only selected on)."""
        return set(self.options.data_roles(role="train").values())

    def feature_datasets(self) -> list[str]:
        """Datasets whose features :meth:`build` reads under the model's own backbone."""
        return [] if self.trains_on_images else [d for _, d in self.data_roles()]

    def prepare(self, bench: Bench, name: str, spec: ModelSpec) -> ModelSpec:
        """Train or reuse what changes the backbone; return the spec to load (default: as is)."""
        return spec

    @property
    def changes_backbone(self) -> bool:
        """Whether :meth:`prepare` trains or loads another backbone than the declared one
        (a method that overrides it does); such a backbone has its own loading path."""
        return type(self).prepare is not Method.prepare

    @abstractmethod
    def build(self, ctx: HeadContext, source: ImageSource) -> LinearHead:
        """The head scoring ``source``'s features (over its ``class_subset`` when it has one)."""
