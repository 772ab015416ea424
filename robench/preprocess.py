"""The image preprocessing a model declares: the ``preprocess:`` block of a model entry.

    models:
      - name: cifar-resnet
        arch: "torchvision:resnet18"
        pretrained: /w/cifar_resnet18.pth
        method: classifier
        preprocess: {size: null, crop: null, mean: null, std: null}   # RobustBench's CIFAR

A block replaces the preprocessing robench would otherwise pick (timm's pretrained config,
torchvision's default weights transforms, an open_clip tag's own). Its steps, in order:

- ``size``: resize the shorter side to ``size`` pixels with ``interpolation`` (antialiased,
  torchvision's ``Resize``); null: no resize;
- ``crop``: centre crop to ``crop`` x ``crop``; null: no crop;
- conversion to a float tensor in [0, 1] (``ToTensor``), always;
- ``mean`` / ``std``: per-channel ``(x - mean) / std`` (``Normalize``); null (both): none.
  ``mean: [0, 0, 0], std: [1, 1, 1]`` computes the same pixels through a Normalize step.

Every field defaults to "do nothing" (``interpolation`` to ``bilinear``), so ``preprocess: {}``
is ``ToTensor()`` alone. The block is checked when the suite is loaded (:class:`Preprocess`);
what a record says about the preprocessing it used comes from :func:`describe_transform`,
which reads the transform object itself, so the text cannot drift from the pixels.

torch / torchvision are imported only when a transform is built or described: loading a suite
does not import them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from robench.errors import RobenchError, unknown

# torchvision's InterpolationMode values (a test checks this list against the enum); spelled
# out so that checking a suite does not import torchvision
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
EXAMPLE = "preprocess: {size: 32, crop: null, mean: [0, 0, 0], std: [1, 1, 1]}"
# tensor conversion steps, implied by every description (images always become floats in [0, 1])
_TO_TENSOR = ("ToTensor", "MaybeToTensor")
MAX_SIDE = 2**16  # pixels: a larger side is a typo, and would not fit in memory


@dataclass(frozen=True)
class Preprocess:
    """A declared evaluation preprocessing: resize, centre crop, to tensor, normalise.

    Constructed from a suite's block by :meth:`parse`; constructing it directly validates the
    same way (lists become tuples of floats)."""

    size: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        for name in ("size", "crop"):
            _check_side(name, getattr(self, name))
        object.__setattr__(self, "mean", _channels("mean", self.mean))
        object.__setattr__(self, "std", _channels("std", self.std))
        if (self.mean is None) != (self.std is None):
            given, other = ("mean", "std") if self.mean is not None else ("std", "mean")
            raise RobenchError(f"preprocess.{given} is given but preprocess.{other} is null",
                               "give both (mean: [0, 0, 0], std: [1, 1, 1] normalises nothing) "
                               "or neither (null: no Normalize step)")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise RobenchError(f"preprocess.std={list(self.std)} must be positive in every "
                               "channel (the pixels are divided by it)",
                               "e.g. std: [1, 1, 1] for no scaling")
        if self.interpolation not in INTERPOLATIONS:
            raise unknown("preprocess interpolation", self.interpolation, INTERPOLATIONS,
                          fix="use one of torchvision's InterpolationMode values, e.g. "
                              "bilinear or bicubic")
        if self.size is not None and self.crop is not None and self.crop > self.size:
            raise RobenchError(
                f"preprocess.crop={self.crop} is larger than preprocess.size={self.size}: the "
                "centre crop would pad the resized image with black borders",
                "use a crop no larger than the size (e.g. size: 256, crop: 224)")

    @classmethod
    def parse(cls, value: Any) -> Preprocess | None:
        """A model entry's ``preprocess:`` value (a mapping, a :class:`Preprocess` or null)
        checked: unknown keys (with the closest valid one), types, ranges. The registry adds
        the model's name to the message."""
        if value is None or isinstance(value, Preprocess):
            return value
        valid = [f.name for f in fields(cls)]
        if not isinstance(value, Mapping):
            raise RobenchError(f"preprocess must be a mapping of {', '.join(valid)}, not "
                               f"{value!r}", f"write e.g. {EXAMPLE}")
        for key in value:
            if key not in valid:
                raise unknown("preprocess key", str(key), valid,
                              fix=f"fix the model's preprocess block, e.g. {EXAMPLE}")
        return cls(**dict(value))

    @property
    def output_size(self) -> int | None:
        """Side of the preprocessed image when the block fixes it (the crop, else the
        resized shorter side); None when it follows the images' own size."""
        return self.crop if self.crop is not None else self.size

    def transform(self) -> Any:
        """The torchvision pipeline (PIL image -> float CHW tensor) the block declares."""
        from torchvision import transforms as T

        steps: list[Any] = []
        if self.size is not None:
            steps.append(T.Resize(self.size, interpolation=T.InterpolationMode(
                self.interpolation), antialias=True))
        if self.crop is not None:
            steps.append(T.CenterCrop(self.crop))
        steps.append(T.ToTensor())
        if self.mean is not None:
            steps.append(T.Normalize(self.mean, self.std))
        return T.Compose(steps)

    def describe(self) -> str:
        """E.g. ``resize 32 bilinear, no crop, mean [0,0,0] std [1,1,1]``."""
        return describe_transform(self.transform())


def _check_side(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIDE:
        what = "no resize" if name == "size" else "no crop"
        raise RobenchError(f"preprocess.{name}={value!r} must be a positive integer (pixels, at "
                           f"most {MAX_SIDE}) or null ({what})",
                           f"e.g. {name}: {32 if name == 'size' else 224}")


def _channels(name: str, value: Any) -> tuple[float, ...] | None:
    """A per-channel (R, G, B) list as a tuple of finite floats."""
    if value is None:
        return None
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in value)
    if not ok:
        example = "[0, 0, 0]" if name == "mean" else "[1, 1, 1]"
        raise RobenchError(f"preprocess.{name}={value!r} must be a list of 3 numbers (R, G, B) "
                           "or null", f"e.g. {name}: {example}")
    return tuple(float(v) for v in value)


# -- descriptions ---------------------------------------------------------------------------------
def _num(x: float) -> str:
    """Shortest exact text of a number: 0 for 0.0, 0.485, 0.48145466 (never rounded, so two
    preprocessings that differ give two descriptions)."""
    x = float(x)
    short = f"{x:g}"
    return short if float(short) == x else repr(x)


def _nums(xs: Sequence[float]) -> str:
    return "[" + ",".join(_num(x) for x in xs) + "]"


def _side(size: Any) -> str:
    """``32`` for a shorter-side size (an int or a 1-list), ``32x32`` for an exact (h, w)
    (the two differ on a non-square image)."""
    size = [size] if isinstance(size, int) else list(size)
    return "x".join(str(s) for s in size)


def _interp(mode: Any) -> str:
    return str(getattr(mode, "value", mode))


def _resize(size: Any, interpolation: Any, max_size: Any = None, antialias: Any = True) -> str:
    text = f"resize {_side(size)} {_interp(interpolation)}"
    if max_size is not None:
        text += f" max {max_size}"
    if antialias is False:
        text += " no antialias"
    return text


def _crop(size: Any) -> str:
    size = [size] if isinstance(size, int) else list(size)
    return f"crop {size[0]}" if len(size) == 1 or size[0] == size[1] else \
        f"crop {size[0]}x{size[1]}"


def describe_transform(transform: Any) -> str:
    """A readable description of an evaluation transform, read off the object itself.

    torchvision's ``Resize`` / ``CenterCrop`` / ``Normalize`` (and its ``ImageClassification``
    preset, which torchvision's weights enums return) are named with their parameters; tensor
    conversion is implied; a missing resize, crop or normalisation is said ("no crop"); any
    other step is written as its ``repr`` (memory addresses removed), so nothing that changes
    the pixels is left out."""
    from torchvision import transforms as T
    from torchvision.transforms._presets import ImageClassification

    if isinstance(transform, ImageClassification):
        return ", ".join([_resize(transform.resize_size, transform.interpolation,
                                  antialias=transform.antialias),
                          _crop(transform.crop_size),
                          f"mean {_nums(transform.mean)} std {_nums(transform.std)}"])
    steps = getattr(transform, "transforms", None)
    if steps is None:
        return _repr(transform)
    parts: list[str] = []
    resized = cropped = normalised = None  # positions of those steps in ``parts``
    for t in steps:
        if isinstance(t, T.Resize):
            resized = len(parts)
            parts.append(_resize(t.size, t.interpolation, t.max_size, t.antialias))
        elif isinstance(t, T.CenterCrop):
            cropped = len(parts)
            parts.append(_crop(t.size))
        elif isinstance(t, T.Normalize):
            normalised = len(parts)
            parts.append(f"mean {_nums(t.mean)} std {_nums(t.std)}")
        elif type(t).__name__ not in _TO_TENSOR:
            parts.append(_repr(t))
    # say what is absent where it would have been: resize, crop, ..., normalisation
    if resized is None:
        parts.insert(0, "no resize")
        resized = 0
    if cropped is None:
        parts.insert(resized + 1, "no crop")
    if normalised is None:
        parts.append("no normalisation")
    return ", ".join(parts)


def _repr(obj: Any) -> str:
    return re.sub(r"\s+", " ", re.sub(r" at 0x[0-9a-f]+", "", repr(obj))).strip()
