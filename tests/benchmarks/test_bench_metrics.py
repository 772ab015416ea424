"""Timing of ``robench.metrics.compute_all`` (default 200 bootstrap resamples) on large cells:
1,000,000 samples x 10 classes and 100,000 samples x 1,000 classes, float32 logits.

Run with ``pytest tests/benchmarks/test_bench_metrics.py --benchmark-enable``; the project's
default ``--benchmark-disable`` runs each case once as a smoke test.
"""

from __future__ import annotations

import numpy as np
import pytest

from robench.metrics import METRIC_INFO, compute_all


def _cell(n: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((n, num_classes), dtype=np.float32) * 3.0
    # Half the labels follow the arg-max so accuracy, calibration and AUROC are non-trivial.
    labels = np.where(rng.random(n) < 0.5, logits.argmax(axis=1), rng.integers(0, num_classes, n))
    return logits, labels


@pytest.mark.parametrize(
    ("n", "num_classes"), [(1_000_000, 10), (100_000, 1_000)], ids=["1Mx10", "100kx1000"]
)
def test_compute_all_speed(benchmark, n: int, num_classes: int) -> None:
    logits, labels = _cell(n, num_classes)
    out = benchmark.pedantic(compute_all, args=(logits, labels), rounds=3, iterations=1)
    assert set(out) == set(METRIC_INFO)
    assert out["n"] == n and out["num_classes"] == num_classes
    assert out["ece_ci_low"] <= out["ece"] <= out["ece_ci_high"]
