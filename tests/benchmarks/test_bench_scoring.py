"""Scoring a cell in bounded memory: a synthetic ImageNet-C-sized cell (3,750,000 images x 1,000
classes, 75 groups, 512-d float16 features memory-mapped from disk, 200 bootstrap resamples per
group) and a 50,000 x 1,000 one for comparison, each scored end to end in its own process.

    python -m pytest tests/benchmarks/test_bench_scoring.py --benchmark-enable

Target: peak RSS < 2 GB for 3.75M x 1,000 (its logits alone would be 15 GB). With the project's
default ``--benchmark-disable`` only the 50,000-image case runs, once, as a smoke test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).with_name("score_cell.py")
DIM = 512


def _features(path: Path, n: int) -> Path:
    """n random unit vectors, float16, written block by block (never all in memory)."""
    if path.is_file():
        return path
    rng = np.random.default_rng(1)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, DIM))
    for s in range(0, n, 250_000):
        x = rng.standard_normal((min(250_000, n - s), DIM), dtype=np.float32)
        out[s:s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out
    return path


@pytest.mark.parametrize(("n", "groups"), [(50_000, 1), (3_750_000, 75)],
                         ids=["50kx1000", "3.75Mx1000-imagenet-c"])
def test_score_cell_memory_and_time(benchmark, request, tmp_path_factory, n, groups):
    if n > 100_000 and not request.config.getoption("benchmark_enable"):
        pytest.skip("the 3.75M-image cell runs only with --benchmark-enable")
    folder = tmp_path_factory.getbasetemp() / "bench-scoring"
    folder.mkdir(exist_ok=True)
    feats = _features(folder / f"features-{n}.npy", n)
    result = {}

    def score() -> None:
        proc = subprocess.run([sys.executable, str(SCRIPT), str(feats), "1000", str(groups),
                               str(folder / f"out-{n}.npz")], capture_output=True, text=True,
                              check=True)
        result.update(json.loads(proc.stdout))

    benchmark.pedantic(score, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(f"\n{n} x 1000: {result['seconds']:.1f} s, peak RSS {result['max_rss_mb']:.0f} MB, "
          f"outputs {result['outputs_mb']:.0f} MB")
    assert result["n"] == n and result["groups"] == groups
    assert result["max_rss_mb"] < 2048  # bounded: does not grow with N x C
