"""open_clip backbones: loading (tag, file, ``local-dir:``, ``hf-hub:``), device, precision."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch

from robench.errors import RobenchError, unknown
from robench.models.arch_configs import HOW_TO_REGISTER, apply_to_open_clip, register_model_configs
from robench.models.weights import (  # noqa: F401  (weights_identity re-exported)
    CONFIG_DIR,
    resolve_assets,
    weights_identity,
)
from robench.preprocess import Preprocess

# robench's own tiny architectures, and any registered earlier, become open_clip model names.
open_clip.add_model_config(CONFIG_DIR)
apply_to_open_clip()

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
    """Which compute kernels run on ``device``: for a CPU, the vector ISA torch dispatches on
    (AVX2, AVX512, ...) plus the microarchitecture (:func:`cpu_microarchitecture`); for a GPU,
    its name. Floating-point results are bit-identical only within one family, so ``robench
    check`` compares exactly only when this matches."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    if str(device).startswith("cpu"):
        return f"cpu-{torch.backends.cpu.get_cpu_capability()} {cpu_microarchitecture()}"
    return str(device)


# the vector extensions a BLAS may pick kernels by (x86 flags; aarch64 "Features" too)
_VECTOR_FLAG = re.compile(r"^(avx|amx|fma|f16c|sse4|asimd|sve|sme|bf16|i8mm)")


def cpu_microarchitecture(cpuinfo: str | None = None) -> str:
    """The CPU's vendor, family / model (or implementer / part) and a digest of its vector
    extensions, from ``/proc/cpuinfo``.

    torch's capability alone ("AVX512") is too coarse: MKL and oneDNN choose kernels by CPU
    generation (AVX512 with or without AMX / VNNI / FP16), and two "AVX512" machines of other
    generations were seen to differ in the last bits of the same forward pass. Without
    ``/proc/cpuinfo`` (macOS, Windows) it is ``platform.processor()``."""
    import platform

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in cpuinfo.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    vendor = fields.get("vendor_id") or fields.get("CPU implementer", "")
    model = "/".join(v for v in (fields.get("cpu family") or fields.get("CPU architecture"),
                                 fields.get("model") or fields.get("CPU part")) if v)
    flags = sorted(f for f in (fields.get("flags") or fields.get("Features", "")).split()
                   if _VECTOR_FLAG.match(f))
    isa = hashlib.sha256(" ".join(flags).encode()).hexdigest()[:8]
    return " ".join(x for x in (vendor, model, f"isa {isa}") if x)


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


LOCAL_DIR_FIX = ("a local-dir: folder holds open_clip_config.json ({\"model_cfg\": <architecture "
                 "dict as in open_clip's model_configs/*.json>, \"preprocess_cfg\": {mean, std, "
                 "interpolation, resize_mode, ...}}) and the weights "
                 "(open_clip_model.safetensors or open_clip_pytorch_model.bin); see the README")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")  # what open_clip looks for in a local-dir


def check_local_dir(pretrained: str) -> None:
    """A ``local-dir:`` folder must hold open_clip_config.json with ``model_cfg`` and a weights
    file: open_clip itself would build a randomly initialised model when the weights are
    missing (with only a log warning)."""
    d = Path(pretrained.removeprefix("local-dir:")).expanduser()
    config = d / "open_clip_config.json"
    if not config.is_file():
        raise RobenchError(f"{pretrained}: no open_clip_config.json in {d}", LOCAL_DIR_FIX)
    try:
        content = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise RobenchError(f"{pretrained}: cannot read {config}: {e}", LOCAL_DIR_FIX) from e
    if not isinstance(content, dict) or not isinstance(content.get("model_cfg"), dict):
        raise RobenchError(f"{pretrained}: {config} has no \"model_cfg\" dict", LOCAL_DIR_FIX)
    if not any(p.suffix in WEIGHT_SUFFIXES for p in d.iterdir() if p.is_file()):
        raise RobenchError(f"{pretrained}: no weights file (*.safetensors, *.bin, *.pth) in {d}",
                           LOCAL_DIR_FIX)


def check_architecture(arch: str) -> None:
    """An ``arch`` must be an open_clip model name: built in, robench's own, or registered
    (``model_configs`` / ``$ROBENCH_MODEL_CONFIGS``). The error lists the closest few names."""
    register_model_configs()  # $ROBENCH_MODEL_CONFIGS, also for callers outside a suite run
    if arch not in open_clip.list_models():
        raise unknown("open_clip architecture", arch, open_clip.list_models(), limit=5,
                      fix=f"use a name from open_clip.list_models(), or {HOW_TO_REGISTER}")


def check_weights_available(arch: str, pretrained: str | None) -> None:
    """Fail fast (before any download attempt) when weights are neither cached nor a file."""
    if pretrained and pretrained.startswith("local-dir:"):
        check_local_dir(pretrained)
        return
    if pretrained and pretrained.startswith("hf-hub:"):
        model_id = pretrained.removeprefix("hf-hub:")
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model_id, "open_clip_config.json"), str) or not (
            _hf_cached(model_id, None)
        ):
            raise _not_cached(f"hf-hub model '{model_id}'")
        return
    check_architecture(arch)
    if not pretrained or os.path.isfile(pretrained):
        return
    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if cfg.get("file") and os.path.isfile(cfg["file"]):  # a tag registered for a local file
        return
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
    # the architecture as instantiated (open_clip model config, QuickGELU and other tag
    # overrides applied) and the final preprocessing config: what a derived checkpoint must carry
    model_cfg: dict | None = None
    preprocess_cfg: dict | None = None
    # a readable description of the preprocessing when robench built it (a declared
    # ``preprocess:`` block, a timm / torchvision default), naming where it came from; None:
    # the open_clip tag's own transform, identified by its repr
    preprocess_label: str | None = None
    declared_preprocess: Preprocess | None = None  # the model's ``preprocess:`` block, if any

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
        """What the record's ``provenance.preprocess`` says and the feature key hashes."""
        if self.preprocess_label is not None:
            return self.preprocess_label
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
        """Identity of what computes the features: weights, architecture config (QuickGELU vs
        GELU changes the network, not the weights), preprocessing and precision."""
        arch = json.dumps(self.model_cfg, sort_keys=True, default=str)
        return hashlib.sha256(
            f"{self.weights_hash}|{arch}|{self.preprocess_id}|{self.precision}".encode()
        ).hexdigest()[:16]


def check_loadable(arch: str, pretrained: str | None, allow_download: bool = False) -> str | None:
    """The architecture exists and the weights are at hand (unless downloads are allowed);
    returns ``pretrained`` with ``assets:`` resolved. Cheap: the runner calls it for every
    model before touching any data."""
    from robench.models import zoo

    pretrained = resolve_assets(pretrained)  # weights shipped inside robench
    if zoo.is_zoo(arch):  # timm / torchvision classifiers: a local file or nothing
        zoo.check_loadable(arch, pretrained)
        return pretrained
    if not (pretrained and pretrained.startswith(SCHEMAS)):
        check_architecture(arch)  # also with allow_download: the error says how to register
    if not allow_download:
        check_weights_available(arch, pretrained)
    return pretrained


def load_backbone(arch: str, pretrained: str | None, device: str = "auto",
                  precision: str = "fp32", allow_download: bool = False,
                  seed: int = 0, preprocess: Preprocess | None = None) -> Backbone:
    """Load any open_clip ``model_name`` + ``pretrained`` with the tag's preprocessing, or
    with ``preprocess`` (a model's declared block) in its place; ``timm:`` / ``torchvision:``
    classifiers through :mod:`robench.models.zoo`."""
    if precision not in PRECISIONS:
        raise RobenchError(f"unknown precision '{precision}'", "use fp32, fp16 or bf16")
    device = resolve_device(device)
    pretrained = check_loadable(arch, pretrained, allow_download)
    from robench.models import zoo

    if zoo.is_zoo(arch):
        return zoo.load(arch, pretrained, device, precision, seed, preprocess)
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
        model, _, transform = open_clip.create_model_and_transforms(
            model_name, pretrained=tag, device=device, **kwargs)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign checkpoint fails anyhow inside
        # torch.load (weights_only: UnpicklingError, IndexError, EOFError, ...); say which file
        raise RobenchError(f"open_clip could not load {model_name} / {tag}: "
                           f"{type(e).__name__}: {e}",
                           "check the architecture name and the checkpoint's format") from e
    finally:
        root.setLevel(level)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    pp_cfg = getattr(model.visual, "preprocess_cfg", None)
    backbone = Backbone(arch=arch, pretrained=pretrained, model=model, preprocess=transform,
                        tokenizer=tokenizer, device=device, precision=precision,
                        weights_hash=state_dict_hash(model),
                        model_cfg=instantiated_model_cfg(arch, pretrained, kwargs),
                        # JSON-normalised (tuples -> lists) so it compares equal after a reload
                        preprocess_cfg=json.loads(json.dumps(pp_cfg)) if pp_cfg else None)
    return backbone if preprocess is None else with_declared(backbone, preprocess)


def with_declared(backbone: Backbone, preprocess: Preprocess) -> Backbone:
    """``backbone`` with a declared preprocessing in place of its tag's (e.g. the mean / std
    a checkpoint was trained with where its file carries none). The network's input size is
    fixed by its config, so a block that fixes another size is refused here, before any
    image is encoded. ``preprocess_cfg`` becomes None: open_clip's config cannot carry the
    block (which is why methods that save derived checkpoints refuse it)."""
    side = preprocess.output_size
    if side is not None and side != backbone.image_size:
        raise RobenchError(
            f"{backbone.arch}: the preprocess block makes {side}x{side} images but the network "
            f"takes {backbone.image_size}x{backbone.image_size}",
            f"set crop: {backbone.image_size} (or size: {backbone.image_size} with crop: null)")
    backbone.preprocess = preprocess.transform()
    backbone.preprocess_label = f"declared: {preprocess.describe()}"
    backbone.declared_preprocess = preprocess
    backbone.preprocess_cfg = None
    return backbone


def instantiated_model_cfg(arch: str, pretrained: str | None, kwargs: dict) -> dict | None:
    """The open_clip model config the network was built from, with the overrides that
    ``create_model`` applied (``force_quick_gelu`` for OpenAI tags)."""
    if pretrained and pretrained.startswith("local-dir:"):
        path = Path(pretrained.removeprefix("local-dir:")).expanduser() / "open_clip_config.json"
        cfg = json.loads(path.read_text()).get("model_cfg")
    elif pretrained and pretrained.startswith("hf-hub:"):
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(pretrained.removeprefix("hf-hub:"), "open_clip_config.json")
        cfg = json.loads(Path(found).read_text()).get("model_cfg") if isinstance(found, str) \
            else None
    else:
        cfg = open_clip.get_model_config(arch)
    if cfg is None:
        return None
    cfg = copy.deepcopy(cfg)
    if kwargs.get("force_quick_gelu"):
        cfg["quick_gelu"] = True
    return cfg


DERIVED_WEIGHTS = "open_clip_model.safetensors"


def save_derived(backbone: Backbone, state_dict: dict[str, torch.Tensor], out: Path,
                 train_world_size: int = 1) -> str:
    """Save weights derived from ``backbone`` (fine-tuned, interpolated) as an open_clip
    ``local-dir:`` folder that reloads as the same network: the parent's instantiated model
    config (QuickGELU included) and final preprocessing config go into ``open_clip_config.json``,
    the weights into ``open_clip_model.safetensors`` (float32). Returns the ``local-dir:`` spec.
    ``train_world_size`` (the ranks whose DDP gradients made the weights) is recorded, so a
    record scored from a cached checkpoint names how it was trained (:func:`derived_info`).

    Written into a temporary folder renamed into place, so a crash never leaves a folder that
    looks complete.
    """
    from safetensors.torch import save_file

    from robench.errors import RobenchError

    if backbone.model_cfg is None:
        raise RobenchError(f"cannot save a derived checkpoint of {backbone.arch}: its open_clip "
                           "model config is unknown", "load the parent through open_clip")
    from robench.io import disk_full, process_tag, seal_file, write_error

    out = Path(out)
    tmp = out.with_name(f".{out.name}.{process_tag()}.tmp")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
               .contiguous().clone() for k, v in state_dict.items()}
    config = {"model_cfg": backbone.model_cfg,
              "preprocess_cfg": backbone.preprocess_cfg or {},
              "robench": {"parent_arch": backbone.arch, "parent_pretrained": backbone.pretrained,
                          "parent_weights_hash": backbone.weights_hash,
                          "train_world_size": int(train_world_size)}}
    try:
        save_file(tensors, str(tmp / DERIVED_WEIGHTS))
        (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
        for f in (DERIVED_WEIGHTS, "open_clip_config.json"):
            seal_file(tmp / f)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except Exception as e:  # a full disk: safetensors says so in its own exception type
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_error(out, e) from e
        if (full := disk_full(out, e)) is not None:
            raise full from e
        raise
    return f"local-dir:{out}"


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()
