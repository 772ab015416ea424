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
