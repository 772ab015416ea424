"""Build robench/assets/cifar10-subset/ from the real CIFAR-10 test images in shared/realdata.

Deterministic split (seeded permutation of each class's test indices) into disjoint parts:
pretrain (trains the tiny CLIP), probe (trains linear heads), val (model selection, temperature),
test (the quickstart evaluation). Files are named by their original CIFAR-10 test index.

    python scripts/make_quickstart_data.py --realdata ../shared/realdata
"""

from __future__ import annotations

import argparse
import csv
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np

SPLITS = {"pretrain": 600, "probe": 150, "val": 50, "test": 200}  # per class; 1000 in all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--realdata", type=Path, default=Path("../shared/realdata"))
    ap.add_argument("--out", type=Path, default=Path("robench/assets/cifar10-subset"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    src = args.realdata / "cifar10"
    by_class: dict[str, list[tuple[int, str]]] = defaultdict(list)
    with open(src / "test_jpeg_index.csv") as f:
        for row in csv.DictReader(f):
            by_class[row["label_name"]].append((int(row["test_index"]), row["file"]))
    if args.out.exists():
        shutil.rmtree(args.out)
    rng = np.random.default_rng(args.seed)
    for cls in sorted(by_class):
        items = sorted(by_class[cls])
        order = rng.permutation(len(items))
        start = 0
        for split, n in SPLITS.items():
            dest = args.out / split / cls
            dest.mkdir(parents=True, exist_ok=True)
            for j in order[start:start + n]:
                idx, rel = items[j]
                shutil.copyfile(src / rel, dest / f"{idx:05d}.jpg")
            start += n
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
