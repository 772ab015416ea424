"""Score one synthetic cell end to end, as the runner does (features memory-mapped from a cache
file -> head logits streamed in blocks -> exact per-sample outputs -> per-group metrics with
bootstrap intervals -> outputs file), and print the wall time and peak RSS as JSON.

    python tests/benchmarks/score_cell.py FEATURES.npy N_CLASSES N_GROUPS OUT.npz

Run as its own process so its peak resident memory is its own (used by
``test_bench_scoring.py``; ImageNet-C is 3,750,000 x 1,000 in 75 groups).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from robench.data.base import ImageSource
from robench.features import FeatureSet
from robench.models.heads import LinearHead
from robench.scoring import cell_metrics, cell_outputs


def main(features: str, n_classes: int, n_groups: int, out: str) -> dict:
    t0 = time.perf_counter()
    feats = np.load(features, mmap_mode="r")
    n, d = feats.shape
    rng = np.random.default_rng(0)
    w = rng.standard_normal((d, n_classes), dtype=np.float32)
    head = LinearHead(w / np.linalg.norm(w, axis=0), 50.0, [f"c{i}" for i in range(n_classes)])
    labels = rng.integers(0, n_classes, n)
    per = n // n_groups
    groups = {f"g{i}": np.arange(i * per, (i + 1) * per) for i in range(n_groups)}
    src = ImageSource(name="synthetic", labels=labels, manifest_hash="x", loader=None,
                      classnames=head.classnames, groups=groups, summary_groups=list(groups))
    outputs = cell_outputs(head, FeatureSet(feats, [], "k", True), src)
    headline, by_group = cell_metrics(outputs, src.summary_groups, n_bins=15, n_bootstrap=200,
                                      seed=0, alpha=0.05)
    outputs.save(Path(out))
    return {"seconds": time.perf_counter() - t0, "n": n, "classes": n_classes,
            "groups": len(by_group), "acc1": headline["acc1"],
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "outputs_mb": Path(out).stat().st_size / 2**20}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])))
