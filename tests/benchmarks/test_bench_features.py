"""Feature extraction through robench vs a bare loop (PIL decode + preprocess + encode_image, no
robench code) over the same 2,000 real images with the same DataLoader workers.

Run with ``pytest tests/benchmarks --benchmark-enable``; compare the two rows' images/s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from robench.data.folder import load
from robench.features import extract_features
from robench.models.backbone import load_backbone
from robench.registry import ASSETS

WORKERS = 2
BATCH = 256
ROOT = ASSETS / "cifar10-subset" / "test"


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("robench-tiny-vit", None, device="cpu")


class _Bare(Dataset):
    def __init__(self, paths: list[Path], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB"))


def _bare_loop(backbone) -> int:
    paths = sorted(ROOT.glob("*/*.jpg"))
    loader = DataLoader(_Bare(paths, backbone.preprocess), batch_size=BATCH, num_workers=WORKERS,
                        prefetch_factor=4)
    n = 0
    with torch.no_grad():
        for x in loader:
            torch.nn.functional.normalize(backbone.model.encode_image(x), dim=-1)
            n += len(x)
    return n


def test_bare_loop(benchmark, backbone):
    n = benchmark.pedantic(_bare_loop, args=(backbone,), rounds=3, iterations=1, warmup_rounds=1)
    assert n == 2000
    benchmark.extra_info["images"] = n


def test_robench_extract(benchmark, backbone, tmp_path):
    source = load(ROOT, name="bench")
    counter = iter(range(100))

    def run():  # a fresh cache dir per round: measure extraction, not the cache hit
        return extract_features(backbone, source, tmp_path / str(next(counter)), batch_size=BATCH,
                                num_workers=WORKERS, progress=False)

    fs = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    assert fs.features.shape[0] == 2000 and not fs.cached
    benchmark.extra_info["images"] = 2000


# -- array sources (CIFAR, CIFAR-C): whole batches vs the per-image PIL path --------------------
N_ARRAY = 20_000


@pytest.fixture(scope="module")
def array_source():
    """20,000 CIFAR-shaped images as one uint8 array (the CIFAR / CIFAR-C loaders' layout)."""
    import numpy as np

    from robench.data.base import ImageSource
    from robench.data.cifar import PixelRows

    pixels = np.random.default_rng(0).integers(0, 256, (N_ARRAY, 32, 32, 3), dtype=np.uint8)
    return ImageSource(name="bench-array", labels=np.zeros(N_ARRAY, np.int64),
                       classnames=["a", "b"], manifest_hash="bench", loader=PixelRows(pixels))


@pytest.mark.parametrize("path", ["array-batches", "per-image"])
@pytest.mark.parametrize("workers", [0, 2])
def test_array_source_extract(benchmark, backbone, array_source, tmp_path, path, workers):
    """``array-batches``: robench's path for array sources; ``per-image``: the same source
    with a loader that only has ``__call__`` (PIL per image, as before), same workers."""
    from dataclasses import replace

    src = array_source if path == "array-batches" else \
        replace(array_source, loader=array_source.loader.__call__)
    counter = iter(range(100))

    def run():
        return extract_features(backbone, src, tmp_path / str(next(counter)), batch_size=512,
                                num_workers=workers, progress=False)

    fs = benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=0)
    assert fs.features.shape[0] == N_ARRAY
    benchmark.extra_info["images"] = N_ARRAY
