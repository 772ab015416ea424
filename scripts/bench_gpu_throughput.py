"""GPU throughput of robench's feature extraction against the decode-only ceiling (issue 10, 5).

    python scripts/bench_gpu_throughput.py --out /tmp/bench [--images 10000] [--workers 8 16]

On a synthetic ImageNet-like JPEG folder (``--images`` files of 500x375, quality 90, made once
under ``--out``), for ViT-B-32 and ViT-B-16 with RANDOM weights (speed only), fp16:

- ``decode``: images/s of the same DataLoader robench uses (PIL decode + the model's
  preprocessing, same workers and batch size) with no model: the ceiling;
- ``robench``: images/s of :func:`robench.features.extract_features` (a fresh cache each time);
- ``gpu_decode``: images/s when JPEG bytes are decoded on the GPU (``torchvision.io.decode_jpeg``
  on CUDA, batched) and resized / cropped / normalised there, then encoded.

The target is robench >= 90% of ``decode``. Prints one JSON line per measurement. Not run in
CI; it needs a CUDA machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_folder(root: Path, n: int, classes: int = 100) -> Path:
    """``n`` 500x375 JPEGs in ``classes`` folders (smooth random colour fields plus noise, so
    they compress like photos, not like flat colour)."""
    done = root / f".complete-{n}"
    if done.is_file():
        return root
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"n{i % classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((500, 375), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 12, (375, 500, 3))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(d / f"{i:06d}.JPEG", quality=90)
    done.touch()
    return root


def decode_only(source, preprocess, batch: int, workers: int) -> float:
    from robench.features import _Preprocessed, loader

    class _Shape:  # loader() needs only the image size and the device of a backbone
        image_size, device = 224, "cuda"

    n, t0 = 0, time.perf_counter()
    for xs, _, _ in loader(_Preprocessed(source, preprocess), _Shape(), batch, workers):
        n += len(xs)
    return n / (time.perf_counter() - t0)


def robench_rate(backbone, source, batch: int, workers: int) -> float:
    from robench.features import extract_features

    with tempfile.TemporaryDirectory() as cache:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fs = extract_features(backbone, source, cache, batch_size=batch, num_workers=workers,
                              progress=False)
        torch.cuda.synchronize()
        return fs.features.shape[0] / (time.perf_counter() - t0)


def gpu_decode_rate(backbone, paths: list[str], batch: int) -> float:
    """Bytes read on the CPU, decoded, resized (shorter side 224, bicubic), centre-cropped and
    normalised on the GPU, then encoded."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.io import decode_jpeg, read_file

    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device="cuda").view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device="cuda").view(1, 3, 1, 1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(0, len(paths), batch):
        data = [read_file(p) for p in paths[s:s + batch]]
        imgs = decode_jpeg(data, device="cuda")
        x = torch.stack([TF.center_crop(TF.resize(im, 224, antialias=True), 224) for im in imgs])
        x = (x.float() / 255 - mean) / std
        backbone.encode_images(x)
    torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the synthetic images")
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[8])
    p.add_argument("--archs", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    args = p.parse_args()
    from robench.data.folder import load
    from robench.models.backbone import load_backbone

    root = make_folder(args.out / "jpeg", args.images)
    source = load(root, name="synthetic")
    paths = [str(root / rel) for rel in source.info["paths"]] if source.info.get("paths") \
        else sorted(str(f) for f in root.glob("*/*.JPEG"))
    for arch in args.archs:
        backbone = load_backbone(arch, None, device="cuda", precision="fp16")
        for w in args.workers:
            dec = decode_only(source, backbone.preprocess, args.batch, w)
            rb = robench_rate(backbone, source, args.batch, w)
            print(json.dumps({"arch": arch, "workers": w, "decode_img_s": round(dec, 1),
                              "robench_img_s": round(rb, 1), "ratio": round(rb / dec, 3),
                              "gpu": torch.cuda.get_device_name()}), flush=True)
        print(json.dumps({"arch": arch, "gpu_decode_img_s":
                          round(gpu_decode_rate(backbone, paths, args.batch), 1)}), flush=True)


if __name__ == "__main__":
    main()
