"""open_clip backbones: loading (tag, file, ``local-dir:``, ``hf-hub:``), device, precision."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch

from robench.errors import RobenchError, unknown

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# robench's own tiny architectures become ordinary open_clip model names.
open_clip.add_model_config(CONFIG_DIR)

SCHEMAS = ("hf-hub:", "local-dir:")
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


DEVICE_FIX = ("use device=cuda (an NVIDIA GPU; cuda:1 for the second), device=mps (Apple "
              "silicon), device=cpu, or device=auto (cuda > mps > cpu)")


def resolve_device(device: str = "auto") -> str:
    """``auto`` picks cuda > mps > cpu; an explicit device that is unknown or unavailable is an
    error naming what this machine has."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if _mps_available():
            return "mps"
        return "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise RobenchError(f"unknown device '{device}'", DEVICE_FIX) from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RobenchError(f"device '{device}' requested but CUDA is not available "
                               f"(this torch: {torch.__version__}, built for CUDA "
                               f"{torch.version.cuda or 'none'})",
                               "use device=auto or device=cpu, or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise RobenchError(f"device '{device}' requested but this machine has {count} CUDA "
                               "device(s)", f"use cuda:0 .. cuda:{count - 1}")
    elif dev.type == "mps" and not _mps_available():
        raise RobenchError("device 'mps' requested but MPS (Apple silicon) is not available",
                           "use device=auto or device=cpu")
    elif dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise RobenchError(f"device '{device}' is not one robench supports", DEVICE_FIX)
    return device


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def kernel_family(device: str) -> str:
    """Which compute kernels run on ``device``: the CPU's vector ISA as torch dispatches it
    (AVX2, AVX512, ...) or the GPU's name. Floating-point results are bit-identical only within
    one family, so ``robench check`` compares exactly only when this matches."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    if str(device).startswith("cpu"):
        return f"cpu-{torch.backends.cpu.get_cpu_capability()}"
    return str(device)


def state_dict_hash(model: torch.nn.Module) -> str:
    """sha256 over parameter names, dtypes, shapes and bytes: identifies the weights, whatever
    the file or tag they came from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _hf_cached(model_id: str, filename: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    names = [filename] if filename else ["open_clip_model.safetensors",
                                         "open_clip_pytorch_model.bin"]
    if filename and filename.endswith((".bin", ".pth")):
        names.insert(0, filename[:-4] + ".safetensors")
    return any(isinstance(try_to_load_from_cache(model_id, n), str) for n in names)


def _not_cached(what: str) -> RobenchError:
    return RobenchError(
        f"{what} is not in the local cache and robench does not download weights implicitly",
        "point robench at a local checkpoint: pretrained=/path/to/weights.pt (a file), "
        "pretrained=local-dir:/path/to/dir (open_clip_config.json + weights), or "
        "pretrained=hf-hub:org/repo already in the Hugging Face cache; or pass allow_download=true "
        "on a machine with network access",
    )


def check_weights_available(arch: str, pretrained: str | None) -> None:
    """Fail fast (before any download attempt) when weights are neither cached nor a file."""
    if pretrained and pretrained.startswith("local-dir:"):
        d = Path(pretrained.removeprefix("local-dir:")).expanduser()
        if not (d / "open_clip_config.json").is_file():
            raise RobenchError(f"{pretrained}: no open_clip_config.json in {d}",
                               "a local-dir: folder needs open_clip_config.json and the weights")
        return
    if pretrained and pretrained.startswith("hf-hub:"):
        model_id = pretrained.removeprefix("hf-hub:")
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model_id, "open_clip_config.json"), str) or not (
            _hf_cached(model_id, None)
        ):
            raise _not_cached(f"hf-hub model '{model_id}'")
        return
    if arch not in open_clip.list_models():
        raise unknown("open_clip architecture", arch, open_clip.list_models(),
                      fix="use a name from open_clip.list_models() or pretrained=local-dir:...")
    if not pretrained or os.path.isfile(pretrained):
        return
    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise unknown(f"pretrained tag (or file) for {arch}", pretrained, tags,
                      fix="use a tag open_clip knows for this architecture or a checkpoint path")
    if cfg.get("hf_hub"):
        # open_clip's convention: 'org/repo/' (default file name) or 'org/repo/file.bin'
        model_id, filename = os.path.split(cfg["hf_hub"])
        if _hf_cached(model_id, filename or None):
            return
    if cfg.get("url"):
        target = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        if target.is_file():
            return
    raise _not_cached(f"pretrained tag '{pretrained}' of {arch}")


@dataclass
class Backbone:
    """A loaded open_clip model with its tag's own preprocessing and tokenizer."""

    arch: str
    pretrained: str | None
    model: torch.nn.Module
    preprocess: object
    tokenizer: object
    device: str
    precision: str
    weights_hash: str

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def logit_scale(self) -> float:
        """exp of the learned temperature (not a hard-coded 100)."""
        return float(self.model.logit_scale.exp().item())

    @property
    def preprocess_id(self) -> str:
        # function reprs carry memory addresses; strip them so the id is stable across runs
        return re.sub(r" at 0x[0-9a-f]+", "", repr(self.preprocess))

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.split(":")[0], dtype=dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features (float32)."""
        with self.autocast():
            f = self.model.encode_image(images.to(self.device, non_blocking=True))
        return torch.nn.functional.normalize(f.float(), dim=-1)

    def id(self) -> str:
        return hashlib.sha256(
            f"{self.weights_hash}|{self.preprocess_id}|{self.precision}".encode()
        ).hexdigest()[:16]


def load_backbone(arch: str, pretrained: str | None, device: str = "auto",
                  precision: str = "fp32", allow_download: bool = False,
                  seed: int = 0) -> Backbone:
    """Load any open_clip ``model_name`` + ``pretrained`` with the tag's preprocessing."""
    if precision not in PRECISIONS:
        raise RobenchError(f"unknown precision '{precision}'", "use fp32, fp16 or bf16")
    device = resolve_device(device)
    if pretrained and pretrained.startswith("assets:"):  # weights shipped inside robench
        from robench.registry import ASSETS

        pretrained = str(ASSETS / pretrained.removeprefix("assets:"))
    if not allow_download:
        check_weights_available(arch, pretrained)
    model_name, tag = arch, pretrained
    if pretrained and pretrained.startswith(SCHEMAS):
        model_name, tag = pretrained, None  # open_clip reads schemas from the model name
    kwargs = {}
    if tag and (cfg := open_clip.get_pretrained_cfg(arch, tag)) and cfg.get("quick_gelu"):
        kwargs["force_quick_gelu"] = True  # e.g. OpenAI weights were trained with QuickGELU
    # Seeded so an architecture without pretrained weights gets the same random init every run.
    torch.manual_seed(seed)
    root = logging.getLogger()
    level = root.level
    if not pretrained:  # open_clip warns about random init on the root logger; that is intended
        root.setLevel(logging.ERROR)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=tag, device=device, **kwargs)
    except (RuntimeError, FileNotFoundError, ValueError, KeyError) as e:
        raise RobenchError(f"open_clip could not load {model_name} / {tag}: {e}",
                           "check the architecture name and the checkpoint's format") from e
    finally:
        root.setLevel(level)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    return Backbone(arch=arch, pretrained=pretrained, model=model, preprocess=preprocess,
                    tokenizer=tokenizer, device=device, precision=precision,
                    weights_hash=state_dict_hash(model))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()
