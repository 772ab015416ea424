"""Your own network as a backbone: an ``nn.Module`` plus its preprocessing, no open_clip config.

:class:`CustomModel` (exported as ``robench.CustomModel``) declares one of

- ``classifier``: images -> class logits over the evaluated dataset's label space (in its
  ``classnames`` order); scored as-is by the ``classifier`` method;
- ``image_encoder``: images -> features; heads come from the feature methods: ``linear-probe``
  (default), ``temperature-scaling`` over it, and, with a ``text_encoder`` + ``tokenizer``
  (tokens -> text features), ``zeroshot`` (default then) and ``lp-clip``.

It becomes a :class:`ModuleBackbone`, which the runner uses in place of an open_clip load. Its
identity is the sha256 of the module's state dict (the weights, not the Python object) plus its
preprocessing, so cached features and finished records are reused exactly while neither changes.
Methods that rebuild the backbone from open_clip (``finetune``, ``car-ft``, ``wise-ft``) do not
apply.
"""

from __future__ import annotations

import hashlib
import marshal
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from robench.errors import RobenchError
from robench.models.backbone import Backbone, resolve_device, state_dict_hash

FEATURE_METHODS = ("linear-probe", "temperature-scaling")
TEXT_METHODS = ("zeroshot", "lp-clip")
FP16_MAX = 65504.0


def callable_id(fn: object) -> str:
    """A stable identity of a preprocessing callable: its repr without memory addresses
    (torchvision transforms print their parameters) plus, for a Python function, a hash of its
    code (a lambda's repr says nothing about what it does)."""
    text = re.sub(r" at 0x[0-9a-f]+", "", repr(fn))
    code = getattr(fn, "__code__", None)
    if code is not None:
        text += "|" + hashlib.sha256(marshal.dumps(code)).hexdigest()[:16]
    return text


class _Network(nn.Module):
    """The user's modules under one roof, with open_clip's method names (``encode_image``,
    ``encode_text``) so the zero-shot builder can call them."""

    def __init__(self, image: nn.Module, text: nn.Module | None) -> None:
        super().__init__()
        self.image = image
        self.text = text

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        out = self.image(x)
        out = getattr(out, "logits", out)  # e.g. a Hugging Face model's output object
        return out.flatten(1)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if self.text is None:
            raise RobenchError("this model has no text encoder",
                               "give CustomModel(text_encoder=..., tokenizer=...) for zero-shot")
        out = self.text(tokens).flatten(1)
        return nn.functional.normalize(out, dim=-1) if normalize else out


@dataclass
class ModuleBackbone(Backbone):
    """A :class:`Backbone` around a user's module; ``kind`` is ``classifier`` or ``encoder``."""

    kind: str = "encoder"
    size: int = 224
    scale: float = 100.0

    @property
    def image_size(self) -> int:
        return self.size

    @property
    def logit_scale(self) -> float:
        return self.scale

    @property
    def preprocess_id(self) -> str:
        if self.preprocess_label is not None:  # robench built it (a timm / torchvision model)
            return self.preprocess_label
        return callable_id(self.preprocess)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder: L2-normalised features (float32), as the feature heads expect.

        Classifier: the logits as a float16 pair ``[hi, lo]`` with ``hi = fp16(x)`` and
        ``lo = x - hi`` (the feature cache stores float16): ``hi + lo`` gives the float32 logit
        back to ~2^-22 relative, which the identity head of the ``classifier`` method sums.
        """
        with self.autocast():
            out = self.model.encode_image(images.to(self.device, non_blocking=True))
        out = out.float()
        if self.kind == "encoder":
            return nn.functional.normalize(out, dim=-1)
        if not torch.isfinite(out).all() or out.abs().max() > FP16_MAX:
            raise RobenchError(f"{self.arch}: logits beyond +-{FP16_MAX:g} or not finite",
                               "return logits (not probabilities scaled up, not NaN)")
        hi = out.half().float()
        return torch.cat([hi, out - hi], dim=1)

    def id(self) -> str:
        ident = f"custom|{self.kind}|{self.weights_hash}|{self.preprocess_id}|{self.precision}"
        return hashlib.sha256(ident.encode()).hexdigest()[:16]


@dataclass
class CustomModel:
    """A network of your own, scored on registered datasets like any registered model.

    ``classifier`` (logits over the dataset's classes) or ``image_encoder`` (features), plus
    ``preprocess`` (PIL image -> CHW tensor, e.g. a torchvision ``Compose``); optionally a
    ``text_encoder`` and ``tokenizer`` (list of str -> token tensor) for zero-shot heads with
    ``logit_scale``. ``method`` defaults to ``classifier`` / ``zeroshot`` (with text) /
    ``linear-probe``; ``options`` are the method's (e.g. ``{train_on: cifar10-subset-probe,
    val_on: cifar10-subset-val}`` for a linear probe). The module is moved to the run's device
    and put in eval mode.
    """

    name: str
    preprocess: Callable[[Any], torch.Tensor] | None = None  # required: checked below
    classifier: nn.Module | None = None
    image_encoder: nn.Module | None = None
    text_encoder: nn.Module | None = None
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None
    logit_scale: float = 100.0
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_types()
        if (self.classifier is None) == (self.image_encoder is None):
            raise RobenchError(f"CustomModel '{self.name}': give exactly one of classifier= "
                               "(images -> logits) or image_encoder= (images -> features)",
                               "pass the nn.Module as classifier= or as image_encoder=")
        if (self.text_encoder is None) != (self.tokenizer is None):
            raise RobenchError(f"CustomModel '{self.name}': a text encoder needs its tokenizer "
                               "and a tokenizer its text encoder",
                               "pass both text_encoder= and tokenizer=, or neither")
        if self.text_encoder is not None and self.classifier is not None:
            raise RobenchError(f"CustomModel '{self.name}': a text encoder goes with an "
                               "image_encoder, not a classifier", "pass image_encoder=")
        allowed = self.allowed_methods()
        if self.resolved_method not in allowed:
            raise RobenchError(f"CustomModel '{self.name}': method '{self.resolved_method}' "
                               f"does not apply to this model", f"use one of {list(allowed)} "
                               "(finetune, car-ft and wise-ft need an open_clip model)")

    def _check_types(self) -> None:
        """Each argument of the kind it must be, named in the error (not a TypeError later)."""
        from robench.registry import check_name

        if not isinstance(self.name, str):
            raise RobenchError(f"CustomModel name must be a string, not {self.name!r}",
                               'e.g. CustomModel(name="my-cnn", ...)')
        check_name("model", self.name)
        what = f"CustomModel '{self.name}'"
        if self.preprocess is None or not callable(self.preprocess):
            raise RobenchError(f"{what}: preprocess= must be a callable (PIL image -> CHW float "
                               f"tensor), not {self.preprocess!r}",
                               "pass e.g. preprocess=T.Compose([T.Resize(224), T.CenterCrop(224), "
                               "T.ToTensor(), T.Normalize(mean, std)])")
        for key in ("classifier", "image_encoder", "text_encoder"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, nn.Module):
                raise RobenchError(f"{what}: {key}= must be a torch.nn.Module (robench hashes "
                                   f"its weights), not {type(value).__name__}",
                                   "wrap a function in an nn.Module whose forward calls it")
        if self.tokenizer is not None and not callable(self.tokenizer):
            raise RobenchError(f"{what}: tokenizer= must be callable (list of str -> token "
                               f"tensor), not {type(self.tokenizer).__name__}",
                               "pass e.g. open_clip.get_tokenizer(arch)")
        scale = self.logit_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
                or not math.isfinite(scale) or scale <= 0:
            raise RobenchError(f"{what}: logit_scale={scale!r} must be a finite number > 0",
                               "e.g. logit_scale=100.0 (CLIP's)")
        if self.method is not None and not isinstance(self.method, str):
            raise RobenchError(f"{what}: method={self.method!r} must be a method name",
                               "see `robench list methods`")
        if not isinstance(self.options, dict):
            raise RobenchError(f"{what}: options={self.options!r} must be a dict of the "
                               "method's options", 'e.g. options={"train_on": "cifar10-subset-'
                               'probe"}')

    @property
    def kind(self) -> str:
        return "classifier" if self.classifier is not None else "encoder"

    @property
    def resolved_method(self) -> str:
        if self.method:
            return self.method
        if self.kind == "classifier":
            return "classifier"
        return "zeroshot" if self.text_encoder is not None else "linear-probe"

    def allowed_methods(self) -> tuple[str, ...]:
        if self.kind == "classifier":
            return ("classifier", "temperature-scaling")
        return FEATURE_METHODS + (TEXT_METHODS if self.text_encoder is not None else ())

    def network(self) -> _Network:
        image = self.classifier if self.classifier is not None else self.image_encoder
        return _Network(image, self.text_encoder)  # type: ignore[arg-type]

    def identity(self) -> tuple[str, str]:
        """(arch, pretrained) as the runner keys backbones: the module's class name and a hash
        of its weights, kind and preprocessing (so a retrained network is a new model)."""
        ident = f"{self.kind}|{state_dict_hash(self.network())}|{callable_id(self.preprocess)}"
        image = self.classifier if self.classifier is not None else self.image_encoder
        return (f"custom:{type(image).__name__}",
                "sha256:" + hashlib.sha256(ident.encode()).hexdigest()[:16])

    def declaration(self) -> dict[str, Any]:
        """The inline model declaration a suite would carry for this model."""
        arch, pretrained = self.identity()
        options = dict(self.options)
        if self.resolved_method == "temperature-scaling" and self.kind == "classifier":
            options.setdefault("base", "classifier")
        return {"name": self.name, "arch": arch, "pretrained": pretrained,
                "method": self.resolved_method, "options": options,
                "description": f"custom {self.kind} {arch.removeprefix('custom:')}"}

    def backbone(self, device: str = "auto", precision: str = "fp32") -> ModuleBackbone:
        """The module on ``device`` in eval mode, as a backbone the runner can use."""
        device = resolve_device(device)
        net = self.network().to(device).eval()
        arch, pretrained = self.identity()
        return ModuleBackbone(
            arch=arch, pretrained=pretrained, model=net, preprocess=self.preprocess,
            tokenizer=self.tokenizer, device=device, precision=precision,
            weights_hash=state_dict_hash(net), kind=self.kind, size=self._image_size(),
            scale=float(self.logit_scale) if self.kind == "encoder" else 1.0)

    def _image_size(self) -> int:
        """Height of a preprocessed image (the blank fill of a batch of undecodable images)."""
        from PIL import Image

        try:
            x = self.preprocess(Image.new("RGB", (256, 256)))
        except Exception as e:  # the user's callable may raise anything
            raise RobenchError(f"CustomModel '{self.name}': preprocess fails on a 256x256 RGB "
                               f"PIL image: {type(e).__name__}: {e}",
                               "preprocess must map a PIL image to a CHW float tensor") from e
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            raise RobenchError(f"CustomModel '{self.name}': preprocess returned "
                               f"{type(x).__name__}{getattr(x, 'shape', '')}, not a CHW tensor",
                               "end the preprocessing with T.ToTensor() (and T.Normalize)")
        return int(x.shape[-1])
