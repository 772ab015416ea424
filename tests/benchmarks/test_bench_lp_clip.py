"""LP-CLIP's strong views, cached vs online: wall time per epoch and disk, on the quickstart's
tiny CLIP and its real 1,500-image probe split (K = 2 views, 2 DataLoader workers, batch 256).

    python -m pytest tests/benchmarks/test_bench_lp_clip.py --benchmark-enable -s

* cached: the K views are extracted once into the feature cache (timed, and their bytes on
  disk counted), then each epoch is a pass over the N x K cached features;
* online: each epoch decodes, augments and encodes K fresh views of every image in the loop,
  nothing on disk.

Reported: seconds of the one-time extraction, per cached epoch and per online epoch, the bytes
the cached views take, and the ratios that decide between the modes: an online epoch costs
about one cached extraction (both encode N x K views), so a run of E epochs x R rounds costs
~E x R extractions online against one cached. The weak view's extraction (shared by both) is
measured as the rate the budget line estimates from. With the project's default
``--benchmark-disable`` a 200-image, 1-epoch smoke case runs once.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from robench.data.folder import load
from robench.features import extract_features
from robench.models import lp_clip as LPC
from robench.models.backbone import load_backbone
from robench.models.zeroshot import class_embeddings
from robench.registry import ASSETS, template_set

K, WORKERS, BATCH = 2, 2, 256


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("robench-tiny-clip", "assets:models/robench-tiny-clip-cifar10.pt",
                         device="cpu")


def _measure(backbone, cache, n: int, epochs: int) -> dict:
    split = LPC.Unlabelled(load(ASSETS / "cifar10-subset" / "probe", name="probe"))
    train = LPC.training_split(split, n, seed=0)
    t = time.perf_counter()
    weak = extract_features(backbone, train, cache, batch_size=BATCH, num_workers=WORKERS,
                            progress=False)
    weak_s = time.perf_counter() - t
    w_zs = class_embeddings(backbone, train.classnames, template_set("cifar"), cache,
                            progress=False)
    cfg = LPC.LPCLIPConfig(rounds=1, epochs=epochs, batch_size=BATCH)
    tf = LPC.strong_transform(backbone)
    t = time.perf_counter()
    strong = [extract_features(backbone, train, cache, batch_size=BATCH, num_workers=WORKERS,
                               progress=False, transform=tf, view=f"bench{k}", seed=k)
              for k in range(K)]
    extract_s = time.perf_counter() - t
    disk = sum((cache / "features" / f"{s.key}.npy").stat().st_size for s in strong)
    views = np.stack([s.features for s in strong])
    t = time.perf_counter()
    LPC.self_train(weak.features, views, w_zs, backbone.logit_scale, cfg)
    cached_epoch = (time.perf_counter() - t) / epochs
    online = LPC.OnlineViews(backbone, train, tf, K, seed=0, num_workers=WORKERS)
    t = time.perf_counter()
    LPC.self_train(weak.features, online, w_zs, backbone.logit_scale, cfg)
    online_epoch = (time.perf_counter() - t) / epochs
    assert online.encoded == n * K * epochs
    return {"images": n, "views": K, "epochs": epochs, "weak_seconds": weak_s,
            "weak_images_per_s": n / weak_s, "extract_seconds": extract_s,
            "cached_epoch_seconds": cached_epoch, "online_epoch_seconds": online_epoch,
            "cached_disk_bytes": disk, "online_disk_bytes": 0,
            "online_epoch_over_cached_epoch": online_epoch / cached_epoch,
            "online_epoch_over_extraction": online_epoch / extract_s,
            "budget_estimate_over_extraction": (n * K / (n / weak_s)) / extract_s}


def test_lp_clip_online_vs_cached(benchmark, request, backbone, tmp_path):
    full = request.config.getoption("benchmark_enable")
    n, epochs = (1500, 3) if full else (200, 1)
    result: dict = {}
    counter = iter(range(100))

    def run() -> None:  # a fresh cache per round: measure the extraction, not a cache hit
        result.update(_measure(backbone, tmp_path / str(next(counter)), n, epochs))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["cached_disk_bytes"] >= n * K * 64 * 4  # N x K x D x float32 (+ headers)
    r = result
    print(f"\n{n} images x K={K}, {epochs} epoch(s): weak view {r['weak_seconds']:.2f} s "
          f"({r['weak_images_per_s']:.0f} img/s); cached: extraction {r['extract_seconds']:.2f} s "
          f"once, {r['cached_disk_bytes'] / 1e6:.2f} MB on disk, {r['cached_epoch_seconds']:.3f} "
          f"s/epoch; online: {r['online_epoch_seconds']:.2f} s/epoch, 0 B on disk; online/cached "
          f"epoch {r['online_epoch_over_cached_epoch']:.0f}x, online epoch / cached extraction "
          f"{r['online_epoch_over_extraction']:.2f}x, budget estimate / extraction "
          f"{r['budget_estimate_over_extraction']:.2f}x")
