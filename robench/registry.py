"""The registries, as data: models, datasets and prompt-template sets.

Adding a dataset or a model is one entry below (or one entry in a suite's YAML). Names are looked
up through :func:`get_model` / :func:`get_dataset`, which fail with the valid names listed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from robench.errors import RobenchError, unknown
from robench.preprocess import Preprocess

ASSETS = Path(__file__).resolve().parent / "assets"
METADATA = Path(__file__).resolve().parent / "data" / "metadata"


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: which family reads it, where it sits, how its prompts look."""

    family: str = ""  # required: checked below (a RobenchError, not a TypeError)
    # relative to ``data_root``, absolute, or ``assets:<path>`` for data shipped here; none for
    # a set generated from another (family generated-c)
    root: str = ""
    templates: str = "cifar"
    options: dict[str, Any] = field(default_factory=dict)
    n_expected: int | None = None
    description: str = ""

    def __post_init__(self) -> None:
        _check_text("dataset", "family", self.family)
        _check_text("dataset", "root", self.root, empty=self.family == "generated-c")
        _check_text("dataset", "templates", self.templates)
        _check_text("dataset", "description", self.description, empty=True)
        _check_options("dataset", self.options)
        n = self.n_expected
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise RobenchError(f"n_expected={n!r} must be a sample count >= 0 (or null)",
                               "e.g. n_expected: 10000, or leave it out")


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: a backbone (open_clip, ``timm:`` / ``torchvision:`` classifier) plus
    the method that turns it into a classifier.

    ``preprocess`` (:class:`robench.preprocess.Preprocess`, or its mapping) replaces the
    backbone's own preprocessing; None keeps it (timm's pretrained config, torchvision's default
    weights transforms, the open_clip tag's)."""

    arch: str = ""  # required: checked below (a RobenchError, not a TypeError)
    pretrained: str | None = None
    method: str = "zeroshot"
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    preprocess: Preprocess | None = None

    def __post_init__(self) -> None:
        _check_text("model", "arch", self.arch)
        if self.pretrained is not None:  # null: the architecture's own initialisation
            _check_text("model", "pretrained", self.pretrained)
        _check_text("model", "method", self.method)
        _check_text("model", "description", self.description, empty=True)
        _check_options("model", self.options)
        # a suite gives the block as a mapping: typed and checked here, as the suite loads
        object.__setattr__(self, "preprocess", Preprocess.parse(self.preprocess))


def _check_text(kind: str, key: str, value: Any, empty: bool = False) -> None:
    """A spec's text field: a string (non-empty unless ``empty``)."""
    if isinstance(value, str) and (empty or value.strip()):
        return
    what = "a string" if empty else "a non-empty string"
    hint = " (null, not '', for no weights: the architecture's own initialisation)" \
        if key == "pretrained" else ""
    raise RobenchError(f"{kind} field {key}={value!r} must be {what}{hint}",
                       f"fix {key}: in the {kind}'s declaration (see `robench list {kind}s`)")


def _check_options(kind: str, value: Any) -> None:
    if not isinstance(value, Mapping):
        raise RobenchError(f"{kind} field options={value!r} must be a mapping of option: value",
                           "e.g. options: {train_on: cifar10-subset-probe} (`robench list "
                           "methods` lists each method's options)" if kind == "model" else
                           "e.g. options: {variant: cifar10}")


def spec_identity(spec: ModelSpec) -> dict[str, Any]:
    """The spec as the cell key hashes it: every field, except ``preprocess`` when none is
    declared, so that the key of a model declared without a block is the one it had before
    the block existed (its records are reused and the committed baselines stay comparable)."""
    ident = asdict(spec)
    if spec.preprocess is None:
        del ident["preprocess"]
    return ident


def check_preprocess(name: str, spec: ModelSpec) -> None:
    """A declared preprocessing must reach every network the model evaluates. Methods that
    train or load another backbone (finetune, car-ft, lp-ft, flyp, wise-ft, or temperature
    scaling over one) build it through their own loading path and save a derived checkpoint
    with open_clip's preprocessing config, which cannot carry the block: refused. A
    ``CustomModel`` brings its own preprocessing callable."""
    if spec.preprocess is None:
        return
    if spec.arch.startswith("custom:"):
        raise RobenchError(f"model '{name}': a preprocess block does not apply to a CustomModel",
                           "pass the transform as CustomModel(preprocess=...)")
    from robench.methods import make_method  # the methods never import the registry's specs

    method = make_method(spec.method, spec.options, name)
    if method.changes_backbone:
        base = getattr(method, "base", None)  # temperature scaling names what it wraps
        over = f" over '{base.name}'" if base is not None else ""
        raise RobenchError(
            f"model '{name}': method '{spec.method}'{over} trains or loads its own backbone, "
            "which would not see the declared preprocess block",
            "drop the preprocess block (the backbone keeps its own preprocessing), or use it "
            "with a method on the frozen backbone: zeroshot, linear-probe, lp-clip, classifier "
            "or temperature-scaling over one of them")


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec("cifar", "cifar10", options={"variant": "cifar10"}, n_expected=10000,
                           description="CIFAR-10 test split (torchvision pickle layout)"),
    "cifar10-train": DatasetSpec("cifar", "cifar10", options={"variant": "cifar10", "train": True},
                                 n_expected=50000, description="CIFAR-10 train split"),
    "cifar100": DatasetSpec("cifar", "cifar100", options={"variant": "cifar100"},
                            n_expected=10000, description="CIFAR-100 test split"),
    "cifar100-train": DatasetSpec("cifar", "cifar100",
                                  options={"variant": "cifar100", "train": True},
                                  n_expected=50000, description="CIFAR-100 train split"),
    "cifar10-subset-test": DatasetSpec(
        "folder", "assets:cifar10-subset/test", templates="cifar-context",
        n_expected=2000,
        description="2,000 real CIFAR-10 test images shipped with robench (quickstart test split)"),
    "cifar10-subset-probe": DatasetSpec(
        "folder", "assets:cifar10-subset/probe", templates="cifar-context",
        n_expected=1500,
        description="1,500 real CIFAR-10 test images shipped with robench (probe-train split)"),
    "cifar10-subset-val": DatasetSpec(
        "folder", "assets:cifar10-subset/val", templates="cifar-context",
        n_expected=500,
        description="500 real CIFAR-10 test images shipped with robench (validation split)"),
    "cifar10-subset-test-c": DatasetSpec(
        "generated-c", "", templates="cifar-context",
        options={"base": "cifar10-subset-test", "stride": 8, "protocol": "cifar-c"},
        n_expected=250 * 15 * 5,
        description="GENERATED, not the released CIFAR-10-C: 15 corruptions x 5 severities of "
                    "every 8th image of cifar10-subset-test with CIFAR-10-C's severity constants "
                    "(protocol cifar-c), made on first use and cached"),
    "cifar10-c": DatasetSpec("cifar-c", "CIFAR-10-C", options={"variant": "cifar10"},
                             n_expected=19 * 50000,
                             description="CIFAR-10-C (Hendrycks & Dietterich 2019), npy layout"),
    "cifar100-c": DatasetSpec("cifar-c", "CIFAR-100-C", options={"variant": "cifar100"},
                              n_expected=19 * 50000,
                              description="CIFAR-100-C (Hendrycks & Dietterich 2019), npy layout"),
    # ImageNet family: labels are 1k indices, class names the 1000 CLIP ImageNet names, so one
    # zero-shot head serves all; R and A are scored over their own 200-class sub-lists.
    "imagenet": DatasetSpec(
        "imagenet-folder", "imagenet/val", templates="imagenet", options={"nested": ["val"]},
        n_expected=50000,
        description="ImageNet-1k val, <root>/<wnid>/*.JPEG; label = index in sorted wnids"),
    "imagenet-train": DatasetSpec(
        "imagenet-folder", "imagenet/train", templates="imagenet", options={"nested": ["train"]},
        n_expected=1281167,
        description="ImageNet-1k train, <root>/<wnid>/*.JPEG (1,281,167 images); label = index "
                    "in sorted wnids; for training linear probes, LP-CLIP and fine-tuning"),
    "imagenet-v2-matched-frequency": DatasetSpec(
        "imagenet-v2", "imagenetv2-matched-frequency-format-val", templates="imagenet",
        options={"nested": ["imagenetv2-matched-frequency-format-val"]}, n_expected=10000,
        description="ImageNetV2 matched-frequency, <root>/<0..999>/*.jpeg; label = int(folder)"),
    "imagenet-v2-threshold-0.7": DatasetSpec(
        "imagenet-v2", "imagenetv2-threshold0.7-format-val", templates="imagenet",
        options={"nested": ["imagenetv2-threshold0.7-format-val"]}, n_expected=10000,
        description="ImageNetV2 threshold-0.7, <root>/<0..999>/*.jpeg; label = int(folder)"),
    "imagenet-v2-top-images": DatasetSpec(
        "imagenet-v2", "imagenetv2-top-images-format-val", templates="imagenet",
        options={"nested": ["imagenetv2-top-images-format-val"]}, n_expected=10000,
        description="ImageNetV2 top-images, <root>/<0..999>/*.jpeg; label = int(folder)"),
    "imagenet-r": DatasetSpec(
        "imagenet-folder", "imagenet-r", templates="imagenet",
        options={"subset": "imagenet-r", "nested": ["imagenet-r"]}, n_expected=30000,
        description="ImageNet-R, <root>/<wnid>/*.jpg (200 folders); scored over its 200 classes"),
    "imagenet-a": DatasetSpec(
        "imagenet-folder", "imagenet-a", templates="imagenet",
        options={"subset": "imagenet-a", "nested": ["imagenet-a"]}, n_expected=7500,
        description="ImageNet-A, <root>/<wnid>/*.jpg (200 folders); scored over its 200 classes"),
    "imagenet-sketch": DatasetSpec(
        "imagenet-folder", "imagenet-sketch", templates="imagenet", options={"nested": ["sketch"]},
        n_expected=50889,
        description="ImageNet-Sketch, <root>[/sketch]/<wnid>/*.JPEG (1000 folders)"),
    "imagenet-c": DatasetSpec(
        "imagenet-c", "imagenet-c", templates="imagenet", options={"corruptions": "standard"},
        n_expected=15 * 5 * 50000,
        description="ImageNet-C, <root>/<corruption>/<1..5>/<wnid>/*.JPEG; mean over the 15 "
                    "standard corruptions x 5 severities"),
}

MODELS: dict[str, ModelSpec] = {
    "clip-vit-b32-openai": ModelSpec("ViT-B-32", "openai",
                                     description="OpenAI CLIP ViT-B/32, zero-shot"),
    "clip-vit-b16-openai": ModelSpec("ViT-B-16", "openai",
                                     description="OpenAI CLIP ViT-B/16, zero-shot"),
    "clip-vit-l14-openai": ModelSpec("ViT-L-14", "openai",
                                     description="OpenAI CLIP ViT-L/14, zero-shot"),
    "clip-vit-b32-laion2b": ModelSpec("ViT-B-32", "laion2b_s34b_b79k",
                                      description="OpenCLIP ViT-B/32 LAION-2B, zero-shot"),
    "tiny-clip-cifar10": ModelSpec(
        "robench-tiny-clip", "assets:models/robench-tiny-clip-cifar10.pt",
        description="TINY CLIP-style model trained here on 6,000 CIFAR-10 images "
                    "(scripts/train_tiny_clip.py); NOT a pretrained CLIP"),
    "tiny-random": ModelSpec("robench-tiny-vit", None,
                             description="tiny ViT with RANDOM weights (smoke tests only)"),
}


# template sets read from robench/data/metadata/ (one ``str.format`` pattern per line)
TEMPLATE_FILES = {"cifar": "cifar_templates.txt", "cifar-context": "cifar_context_templates.txt"}


def template_set(name: str) -> list[str]:
    """Prompt templates as ``str.format`` patterns with one ``{}`` for the class name.

    ``imagenet`` is the 80-template ensemble shipped by open_clip; ``cifar`` the 18 templates
    OpenAI published for CIFAR-10/100; ``cifar-context`` one template per context the shipped
    tiny CLIP was trained to name (clean, blurry, noisy, pixelated, JPEG, low contrast, black and
    white, dark, bright: ``scripts/train_tiny_clip.py``), the quickstart's prompts, so that
    CAR-FT's context vectors differ.
    """
    if name == "imagenet":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    if name in TEMPLATE_FILES:
        return (METADATA / TEMPLATE_FILES[name]).read_text().strip().splitlines()
    raise unknown("template set", name, ["imagenet", *TEMPLATE_FILES])


# A name becomes a folder or file name of the results (results_dir/suite/model/dataset.json):
# letters, digits and . _ + - only, starting with a letter or digit (no separators, no "..").
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def check_name(kind: str, name: Any) -> str:
    """``name`` if it is safe as a path component, else a RobenchError naming the rule."""
    text = str(name)
    if not _NAME.fullmatch(text) or ".." in text:
        example = re.sub(r"[^A-Za-z0-9._+-]+|\.\.+", "-", text).strip(".-") or f"my-{kind}"
        raise RobenchError(
            f"{kind} name {text!r} cannot be used: names become folders and files of the "
            "results, so they may hold only letters, digits and . _ + - (no '/', no '..', not "
            "absolute)", f"rename the {kind}, e.g. {example!r}")
    return text


def _from_dict(cls: type, name: str, entry: dict[str, Any]) -> Any:
    valid = {f.name for f in fields(cls)}
    for key in entry:
        if key not in valid:
            raise unknown(f"{cls.__name__} field", key, valid,
                          fix=f"fix the declaration of '{name}' in the suite")
    try:
        return cls(**entry)
    except TypeError as e:
        raise RobenchError(f"incomplete declaration of '{name}': {e}",
                           f"give the fields {sorted(valid)}") from e
    except RobenchError as e:  # a field's own check (the preprocess block): name the entry
        kind = "model" if cls is ModelSpec else "dataset"
        raise RobenchError(f"{kind} '{name}': {e.problem}", e.fix) from None


def _entry(kind: str, item: Any, example: str) -> dict[str, Any]:
    """A suite's entry as a dict: a registered name is handled by the caller; anything but a
    mapping (a number, a list) is refused, naming what was given."""
    if not isinstance(item, Mapping):
        what = "list" if isinstance(item, Sequence) else type(item).__name__
        raise RobenchError(f"{kind} entry {item!r} ({what}) is neither a "
                           f"registered {kind} name nor an inline declaration",
                           f"write a name of `robench list {kind}s` or a mapping, e.g. "
                           f"{example}")
    return dict(item)


def same_declaration(spec: ModelSpec, registered: ModelSpec) -> bool:
    """``spec`` declares the registered model itself (its description aside)."""
    return replace(spec, description=registered.description) == registered


def resolve_model(item: Any) -> tuple[str, ModelSpec]:
    """A suite's model entry (a registered name, or an inline dict with ``name``) -> spec.

    An inline entry may carry a registered model's name only when it declares that very model
    (its records would otherwise sit under the registered model's name)."""
    if isinstance(item, str):
        return check_name("model", item), get_model(item)
    entry = _entry("model", item, "{name: mine, arch: ViT-B-32, pretrained: /w.pt}")
    name = entry.pop("name", None)
    if not name:
        raise RobenchError(f"inline model {entry} has no name", "add name: <model-name>")
    check_name("model", name)
    base = entry.pop("base", None)
    if base is not None:  # inline entry that tweaks a registered model
        spec = get_model(base)
        merged = {f.name: getattr(spec, f.name) for f in fields(ModelSpec)} | entry
        spec = _from_dict(ModelSpec, name, merged)
    else:
        spec = _from_dict(ModelSpec, name, entry)
    if name in MODELS and same_declaration(spec, MODELS[name]):
        return name, MODELS[name]  # the registered model itself: its records, its cell keys
    if name in MODELS:
        raise RobenchError(
            f"inline model '{name}' takes the name of the registered model '{name}' "
            f"({MODELS[name].arch}/{MODELS[name].pretrained}, method {MODELS[name].method}) but "
            f"declares another ({spec.arch}/{spec.pretrained}, method {spec.method}): its "
            "records would pass for the registered model's",
            f"give it a name of its own (e.g. name: {name}-mine), or, to tweak the registered "
            f"model, {{name: {name}-mine, base: {name}, ...}}")
    check_preprocess(name, spec)
    return name, spec


def resolve_dataset(item: Any) -> tuple[str, DatasetSpec]:
    """A suite's dataset entry (a registered name or an inline dict with ``name``) -> spec."""
    if isinstance(item, str):
        return check_name("dataset", item), get_dataset(item)
    entry = _entry("dataset", item, "{name: mine, family: folder, root: /dir}")
    name = entry.pop("name", None)
    if not name:
        raise RobenchError(f"inline dataset {entry} has no name", "add name: <dataset-name>")
    check_name("dataset", name)
    return name, _from_dict(DatasetSpec, name, entry)


def get_model(name: str) -> ModelSpec:
    if name not in MODELS:
        raise unknown("model", name, MODELS, fix="see `robench list models`")
    return MODELS[name]


def get_dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise unknown("dataset", name, DATASETS, fix="see `robench list datasets`")
    return DATASETS[name]


def dataset_root(name: str, spec: DatasetSpec, data_root: str, overrides: dict) -> Path:
    """Where a dataset sits: ``data.<name>.root`` if given, else the spec's root under data_root."""
    over = (overrides or {}).get(name) or {}
    if not isinstance(over, Mapping):
        raise RobenchError(f"data.{name}={over!r} must be a mapping of settings",
                           f"e.g. data.{name}.root=/path/to/{name}")
    root = str(over.get("root", spec.root))
    if root.startswith("assets:"):
        return ASSETS / root.removeprefix("assets:")
    p = Path(root).expanduser()
    return p if p.is_absolute() else Path(data_root).expanduser() / p
