"""Feature extraction of the 2,000 shipped CIFAR-10 test images by however many ranks this is
launched with (``python -m torch.distributed.run --nproc-per-node N tests/benchmarks/
extract_ranks.py [arch] [batch] [workers]``; without a launcher: one process), into a fresh
cache each call; the lead rank prints ``images/s`` of the extraction (model loaded, workers
and the merge included, interpreter start-up not)."""

from __future__ import annotations

import sys
import tempfile
import time

from robench import distributed
from robench.data.folder import load
from robench.features import extract_features
from robench.models.backbone import load_backbone
from robench.registry import ASSETS


def main(arch: str = "robench-tiny-vit", batch: int = 64, workers: int = 1) -> None:
    world = distributed.init("cpu")
    backbone = load_backbone(arch, None, device="cpu")
    source = load(ASSETS / "cifar10-subset" / "test", name="bench")
    cache = world.broadcast(tempfile.mkdtemp(prefix="robench-bench-") if world.is_lead else None)
    world.barrier()
    t0 = time.perf_counter()
    fs = extract_features(backbone, source, cache, batch_size=batch, num_workers=workers,
                          progress=False, world=world)
    dt = time.perf_counter() - t0
    if world.is_lead:
        print(f"ranks={world.size} images={fs.features.shape[0]} seconds={dt:.2f} "
              f"images_per_s={fs.features.shape[0] / dt:.1f}")
    distributed.shutdown()


if __name__ == "__main__":
    main(*(sys.argv[1:2] or []), *(int(a) for a in sys.argv[2:4]))
