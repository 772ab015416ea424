"""Cost of the content-keyed dataset manifest (``robench.data.content``): cold (every file
hashed, empty index) vs warm (index hit: only the directory scan's ``stat`` calls), against the
old listing-only manifest (relative path + size + label, which cannot see a file regenerated in
place), on real images:

- ``cifar-2000``: the 2,000 shipped CIFAR-10 test JPEGs (~1 KB each, robench/assets);
- ``imagenet-1000``: the 1,000 real ImageNet val JPEGs of ../shared/realdata (~110 KB each),
  linked into one class folder per wnid (skipped when that folder is absent).

Run with ``pytest tests/benchmarks/test_bench_content.py --benchmark-enable``. "Cold" re-reads
files the OS has cached after the first round: it measures hashing and system calls, not a cold
disk or a network file system (there the per-file latency dominates, which the thread pool
hides).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from conftest import REALDATA

from robench.data import folder
from robench.data.base import LoadSettings, hash_manifest
from robench.registry import ASSETS

CIFAR = ASSETS / "cifar10-subset" / "test"
IMAGENET = REALDATA / "imagenet" / "sample_1k"


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory) -> Path:
    if not IMAGENET.is_dir():
        pytest.skip("../shared/realdata/imagenet is absent")
    root = tmp_path_factory.mktemp("imagenet-1000")
    for img in sorted(IMAGENET.glob("*.JPEG")):
        wnid = img.name.split("_")[0]
        (root / wnid).mkdir(exist_ok=True)
        (root / wnid / img.name).symlink_to(img)
    return root


@pytest.fixture(params=["cifar-2000", "imagenet-1000"])
def dataset(request) -> tuple[Path, int]:
    if request.param == "cifar-2000":
        return CIFAR, 2000
    return request.getfixturevalue("imagenet_folder"), 1000


def listing_manifest(root: Path) -> str:
    """The manifest robench used before: relative path + size + label, no content."""
    _, paths, labels = folder.scan(root)
    return hash_manifest([(p.relative_to(root).as_posix(), p.stat().st_size, int(y))
                          for p, y in zip(paths, labels, strict=True)])


def test_listing_only(benchmark, dataset):
    root, _ = dataset
    assert benchmark.pedantic(listing_manifest, args=(root,), rounds=5, iterations=1)


def test_content_cold(benchmark, dataset, tmp_path):
    root, n = dataset
    fresh = (tmp_path / str(i) for i in itertools.count())  # an empty index every round

    def cold():
        return folder.load(root, name="bench", settings=LoadSettings(cache_dir=next(fresh)))

    src = benchmark.pedantic(cold, rounds=5, iterations=1, warmup_rounds=1)
    assert src.info["files_hashed"] == n
    benchmark.extra_info["files"] = n


def test_content_warm(benchmark, dataset, tmp_path):
    root, n = dataset
    folder.load(root, name="bench", settings=LoadSettings(cache_dir=tmp_path))  # fills the index

    def warm():
        return folder.load(root, name="bench", settings=LoadSettings(cache_dir=tmp_path))

    src = benchmark.pedantic(warm, rounds=5, iterations=1, warmup_rounds=1)
    assert src.info["files_hashed"] == 0
    benchmark.extra_info["files"] = n
