"""``robench env``: what this installation has and lacks, for bug reports and reproducibility.

Versions (robench and the libraries that change numbers), the device robench would use and its
kernel family (bit-exact comparisons hold only within one), the cache folder and its size, where
suites are found, which registered datasets are present under ``data_root`` (a cheap check that
their folders exist; ``robench data verify`` is the full one) and which registered models'
weights are at hand, with how to get what is missing. Nothing is downloaded or decoded.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from robench.io import human_size

VERSIONED = ("torch", "torchvision", "open_clip_torch", "numpy", "scipy", "pandas", "omegaconf",
             "imagecorruptions", "scikit-image", "pillow", "argcomplete")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def folder_size(root: Path) -> int:
    """Bytes of the regular files under ``root`` (symlinks not followed)."""
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += (Path(dirpath) / f).lstat().st_size
            except OSError:
                pass
    return total


def device_report() -> dict[str, Any]:
    import torch

    from robench.models.backbone import kernel_family, resolve_device

    auto = resolve_device("auto")
    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {"auto": auto, "kernels": kernel_family(auto), "cpu_kernels": kernel_family("cpu"),
            "cuda_devices": cuda, "torch_cuda": torch.version.cuda,
            "threads": torch.get_num_threads()}


def dataset_report(data_root: str) -> list[dict[str, Any]]:
    """Each registered dataset: its folder, whether it is there, and how to get it if not."""
    from robench.data.download import SOURCES, Archive
    from robench.registry import DATASETS, dataset_root

    out = []
    for name, spec in DATASETS.items():
        if spec.family == "generated-c":
            base = spec.options.get("base", "?")
            out.append({"name": name, "root": f"(generated from {base} into the cache)",
                        "present": True, "how": "made and cached on first use by `robench run`"})
            continue
        root = dataset_root(name, spec, data_root, {})
        present = root.is_dir() and any(root.iterdir())
        if present:
            how = ""
        elif isinstance(SOURCES.get(name), Archive):
            how = f"robench data download {name}"
        elif name in SOURCES:
            how = f"manual install: `robench data download {name}` prints the steps"
        else:
            how = f"put it at {root}, or run with data.{name}.root=DIR"
        out.append({"name": name, "root": str(root), "present": present, "how": how})
    return out


def model_report() -> list[dict[str, Any]]:
    """Each registered model: whether its weights are local (file, cache), and how to get them."""
    from robench.errors import RobenchError
    from robench.models.backbone import check_weights_available
    from robench.models.weights import resolve_assets
    from robench.registry import MODELS

    out = []
    for name, spec in MODELS.items():
        pretrained = resolve_assets(spec.pretrained)
        entry = {"name": name, "arch": spec.arch, "pretrained": spec.pretrained,
                 "present": True, "how": ""}
        if pretrained is None:
            entry["how"] = "random initialisation (no weights needed)"
        else:
            try:
                check_weights_available(spec.arch, pretrained)
            except RobenchError as e:
                tag = os.path.sep not in pretrained and not pretrained.startswith(
                    ("hf-hub:", "local-dir:"))
                how = (f"once, on a machine with network: robench run 'models=[{name}]' "
                       "allow_download=true (open_clip caches it); or declare the model with "
                       "pretrained=/path/to/weights.pt" if tag else e.fix or e.problem)
                entry.update(present=False, how=how)
        out.append(entry)
    return out


def collect(data_root: str | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    """The whole report as plain data (``robench env --format json``)."""
    import robench
    from robench.config import RunConfig, suite_dirs

    data_root = data_root or os.environ.get("ROBENCH_DATA") or RunConfig.data_root
    cache = Path(cache_dir or os.environ.get("ROBENCH_CACHE")
                 or Path.home() / ".cache" / "robench").expanduser()
    versions = {"robench": robench.__version__, "python": platform.python_version()}
    versions |= {d: _version(d) for d in VERSIONED}
    return {
        "versions": versions,
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "executable": sys.executable,
        "package": str(Path(robench.__file__).resolve().parent),
        "device": device_report(),
        "cache": {"dir": str(cache), "exists": cache.is_dir(),
                  "bytes": folder_size(cache) if cache.is_dir() else 0},
        "data_root": str(Path(data_root).expanduser().resolve()),
        "suite_dirs": [str(d) for d in suite_dirs()],
        "datasets": dataset_report(data_root),
        "models": model_report(),
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE", ""),
    }


def render(report: dict[str, Any]) -> str:
    """The human-readable report."""
    v, dev, cache = report["versions"], report["device"], report["cache"]
    lines = [f"robench {v['robench']} (python {v['python']}, {report['platform']})",
             f"  package      {report['package']}",
             "  versions     " + ", ".join(f"{k} {val}" for k, val in v.items()
                                          if k not in ("robench", "python") and val),
             f"  device       {dev['auto']} (device=auto), kernels {dev['kernels']}"
             + (f"; GPUs: {', '.join(dev['cuda_devices'])}" if dev["cuda_devices"] else
                f"; no CUDA device (torch built for CUDA {dev['torch_cuda'] or 'none'})"),
             f"  cache        {cache['dir']} ("
             + (human_size(cache["bytes"]) if cache["exists"] else "not created yet")
             + "; $ROBENCH_CACHE or cache_dir=...)",
             f"  data_root    {report['data_root']} ($ROBENCH_DATA or data_root=...)",
             f"  suites       {', '.join(report['suite_dirs'])}"]
    if not v.get("argcomplete"):
        lines.append("  completion   argcomplete not installed: pip install argcomplete")
    for title, items in (("datasets", report["datasets"]), ("models", report["models"])):
        have = [i for i in items if i["present"]]
        lines.append(f"\n{title}: {len(have)} of {len(items)} present")
        width = max(len(i["name"]) for i in items)
        for i in items:
            mark = "ok  " if i["present"] else "MISS"
            where = i.get("root") or f"{i['arch']}/{i['pretrained']}"
            lines.append(f"  {mark} {i['name']:{width}s}  {where}")
            if i["how"]:
                lines.append(f"       {'':{width}s}  {'' if i['present'] else 'get it: '}"
                             f"{i['how']}")
    return "\n".join(lines)
