"""Standard image classifiers as models: ``timm`` and ``torchvision`` networks that output class
logits themselves, scored by the ``classifier`` method through the same features -> cells ->
records path as CLIP models (their cached "features" are their logits; see
:mod:`robench.models.classifier`). They are what a user draws an effective-robustness reference
line from (Taori et al. 2020 fit theirs over standard ImageNet models).

    models:
      - {name: resnet50-tv, arch: "torchvision:resnet50", pretrained: /w/resnet50-11ad3fa6.pth,
         method: classifier}
      - {name: vit-s-timm, arch: "timm:vit_small_patch16_224",
         pretrained: /w/vit_small.safetensors, method: classifier}

* ``timm:<name>``: built with ``timm.create_model(name, pretrained=True,
  pretrained_cfg_overlay={"file": <pretrained>, ...})`` -- timm's own loading path, reading only
  the local file (the overlay replaces the hub / URL source, so nothing is downloaded); the
  preprocessing is timm's ``resolve_data_config`` + ``create_transform`` of the model's
  pretrained config (input size, crop, interpolation, mean / std).
* ``torchvision:<name>``: ``torchvision.models.get_model(name, weights=None, num_classes=K)``
  then the file's state dict (strict); the preprocessing is the transform of the architecture's
  default weights enum (``get_model_weights(name).DEFAULT.transforms()``: metadata only, no
  download).

A ``preprocess:`` block in the model entry (:class:`robench.preprocess.Preprocess`) replaces
either default: a CIFAR network trained on raw 32x32 pixels in [0, 1] (RobustBench's protocol)
needs ``preprocess: {size: null, crop: null, mean: null, std: null}``, not ImageNet's resize to
224 and normalisation. The record's ``provenance.preprocess`` says which one was used
(``declared: ...``, ``timm pretrained config of <name>: ...``, ``torchvision <weights>
transforms: ...``) and what it does.

``K``, the number of outputs, is read from the checkpoint's classifier weight, so a 10-class
network is scored on CIFAR-10 and a 1000-class one on the ImageNet family (ImageNet-R/-A restrict
the 1000 logits to their 200 classes, as for any model). ``pretrained: null`` builds a seeded
random network (for throughput benchmarks). Weights are never downloaded: a tag or hub name is
refused with the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from robench.errors import RobenchError, unknown
from robench.preprocess import Preprocess, describe_transform

PREFIXES = ("timm:", "torchvision:")


def is_zoo(arch: str | None) -> bool:
    return bool(arch) and str(arch).startswith(PREFIXES)


def split(arch: str) -> tuple[str, str]:
    """``"timm:resnet18"`` -> ``("timm", "resnet18")``."""
    lib, _, name = arch.partition(":")
    if not name:
        raise RobenchError(f"model arch {arch!r} names no network", f"write {lib}:<model name>")
    return lib, name


def _timm() -> Any:
    try:
        import timm
    except ImportError as e:  # an optional extra
        raise RobenchError("timm models need the timm package", "pip install 'robench[timm]' "
                           "(or pip install timm)") from e
    return timm


def check_loadable(arch: str, pretrained: str | None) -> None:
    """The network exists in its library and ``pretrained`` is a readable local file (or null
    for random weights): checked before any data is read."""
    lib, name = split(arch)
    if lib == "timm":
        timm = _timm()
        if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")) or not timm.is_model(name):
            raise unknown("timm model", name, timm.list_models(), limit=5,
                          fix="use a name of timm.list_models() (an architecture, without a hub "
                              "prefix) and give its weights as a local file in pretrained:")
    else:
        import torchvision

        names = torchvision.models.list_models()
        if name not in names:
            raise unknown("torchvision model", name, names, limit=5,
                          fix="use a name of torchvision.models.list_models()")
    if pretrained is not None and not os.path.isfile(pretrained):
        raise RobenchError(
            f"{arch}: pretrained {pretrained!r} is not a local file; robench never downloads "
            "weights implicitly", "download the checkpoint yourself (e.g. timm's "
            "model.safetensors from the Hugging Face hub, torchvision's .pth) and give its "
            "path, or pretrained: null for random weights")


def _state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):  # common checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise RobenchError(f"{path} holds no state dict", "save model.state_dict()")
    return sd


def _num_classes(sd: dict[str, torch.Tensor], classifier: str | tuple | None, path: str) -> int:
    """Outputs of the checkpoint's classifier (its ``<classifier>.weight`` rows)."""
    names = [classifier] if isinstance(classifier, str) else list(classifier or [])
    for name in names + ["fc", "head", "classifier", "head.fc", "heads.head", "classifier.1"]:
        w = sd.get(f"{name}.weight")
        if isinstance(w, torch.Tensor) and w.ndim >= 1:
            return int(w.shape[0])
    raise RobenchError(f"{path}: cannot find the classifier weight ({', '.join(names)}.weight)",
                       "save the whole network's state dict, classifier included")


def build(arch: str, pretrained: str | None, seed: int = 0,
          preprocess: Preprocess | None = None) -> tuple[torch.nn.Module, Any]:
    """(network in eval mode, its preprocessing): the declared one, else the library's."""
    net = network(arch, pretrained, seed)
    transform, _ = preprocessing(arch, net, preprocess)
    return net, transform


def network(arch: str, pretrained: str | None, seed: int = 0) -> torch.nn.Module:
    """The network in eval mode, from the library's own loading path."""
    lib, name = split(arch)
    torch.manual_seed(seed)  # random weights (pretrained: null) are the same every run
    sd = _state_dict(pretrained) if pretrained else None
    if lib == "timm":
        timm = _timm()
        cfg = timm.models.get_pretrained_cfg(name)
        kwargs: dict[str, Any] = {}
        if sd is not None:
            k = _num_classes(sd, getattr(cfg, "classifier", None), str(pretrained))
            # timm's own loader reads the file (and only the file): 'source' empty so no hub
            kwargs = {"pretrained": True, "num_classes": k, "pretrained_cfg_overlay": {
                "file": str(Path(pretrained).resolve()), "source": "", "num_classes": k}}
        try:
            net = timm.create_model(name, **kwargs)
        except (RuntimeError, ValueError, KeyError) as e:
            raise RobenchError(f"timm could not load {name} from {pretrained}: {e}",
                               "check that the file holds this architecture's state dict") from e
        return net.eval()
    import torchvision

    net = torchvision.models.get_model(name, weights=None)
    if sd is not None:
        # the last Linear layer is the classifier (fc, heads.head, classifier.6, ...)
        last = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)][-1:]
        k = _num_classes(sd, tuple(last), str(pretrained))
        if k != 1000:
            net = torchvision.models.get_model(name, weights=None, num_classes=k)
        try:
            net.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise RobenchError(f"{pretrained} does not fit torchvision's {name}: {e}",
                               "give the state dict of this architecture") from e
    return net.eval()


def preprocessing(arch: str, net: torch.nn.Module,
                  preprocess: Preprocess | None = None) -> tuple[Any, str]:
    """(transform, what the record says of it): the declared block, else timm's
    ``resolve_data_config`` + ``create_transform`` of the model's pretrained config, else the
    transform of torchvision's default weights enum (metadata only: nothing is downloaded).
    The text names the source and is read off the transform (:func:`describe_transform`)."""
    if preprocess is not None:
        return preprocess.transform(), f"declared: {preprocess.describe()}"
    lib, name = split(arch)
    if lib == "timm":
        from timm.data import create_transform, resolve_data_config

        transform = create_transform(**resolve_data_config(model=net), is_training=False)
        return transform, f"timm pretrained config of {name}: {describe_transform(transform)}"
    import torchvision
    from torchvision.transforms._presets import ImageClassification

    weights = torchvision.models.get_model_weights(name)
    if hasattr(weights, "DEFAULT"):
        transform, source = weights.DEFAULT.transforms(), f"torchvision {weights.DEFAULT}"
    else:  # an architecture without published weights: ImageNet's evaluation preset
        transform, source = ImageClassification(crop_size=224), "torchvision ImageNet preset"
    return transform, f"{source} transforms: {describe_transform(transform)}"


def load(arch: str, pretrained: str | None, device: str, precision: str, seed: int = 0,
         preprocess: Preprocess | None = None) -> Any:
    """A :class:`robench.models.custom.ModuleBackbone` of kind ``classifier``, with the
    declared ``preprocess`` or the library's default."""
    from robench.models.backbone import state_dict_hash
    from robench.models.custom import ModuleBackbone, _Network

    check_loadable(arch, pretrained)
    net = network(arch, pretrained, seed)
    transform, label = preprocessing(arch, net, preprocess)
    model = _Network(net, None).to(device).eval()
    size = transform(_blank()).shape[-1]  # the fill of a batch of undecodable images
    return ModuleBackbone(arch=arch, pretrained=pretrained, model=model, preprocess=transform,
                          tokenizer=None, device=device, precision=precision,
                          weights_hash=state_dict_hash(model), preprocess_label=label,
                          declared_preprocess=preprocess, kind="classifier", size=int(size),
                          scale=1.0)


def _blank() -> Any:
    from PIL import Image

    return Image.new("RGB", (256, 256))
