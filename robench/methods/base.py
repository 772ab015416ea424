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

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

# the option machinery lives in robench.options (shared with the dataset families); a method
# file imports it from here
from robench.options import (  # noqa: F401
    NoOptions,
    OptionInfo,
    Options,
    fits,
    option,
    type_name,
)

if TYPE_CHECKING:
    from robench.data.base import ImageSource
    from robench.features import FeatureSet
    from robench.models.backbone import Backbone
    from robench.models.heads import LinearHead
    from robench.registry import ModelSpec


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
