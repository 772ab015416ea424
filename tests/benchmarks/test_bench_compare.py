"""Paired comparison of two cells (robench.compare.compare_cells): a quickstart-shaped -C cell
(37,500 samples in 75 groups + a 2,000-sample ID set for OOD AUROC, 200 paired resamples) and a
750,000-sample one (a fifth of ImageNet-C; only with --benchmark-enable).

    python -m pytest tests/benchmarks/test_bench_compare.py --benchmark-enable

Every replicate scores all groups of both models at once (grouped bincounts and one cumulative
sum per AUROC), so the cost is O(N) per replicate with no per-group Python loop in the metrics.
"""

from __future__ import annotations

import numpy as np
import pytest

import robench.metrics as M  # noqa: N812
from robench.compare import compare_cells
from robench.scoring import CellOutputs


def _cell(n: int, groups: int, seed: int, id_n: int) -> CellOutputs:
    """One model's outputs; the labels (the samples) are the same for every seed."""
    labels = np.random.default_rng(123).integers(0, 10, n)
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 10)).astype(np.float32)
    logits[np.arange(n), labels] += 1.0
    return CellOutputs(samples=M.sample_outputs(logits, labels), label=labels,
                       target=labels.astype(np.int32), valid=np.ones(n, bool),
                       group=(np.arange(n) % groups).astype(np.int32),
                       group_names=[f"c{g // 5}/{g % 5 + 1}" for g in range(groups)],
                       scored_classes=None, sample_ids=None,
                       ood_id_conf=rng.uniform(0.1, 1, id_n))


@pytest.mark.parametrize("n", [37_500, 750_000], ids=["quickstart-c", "imagenet-c-fifth"])
def test_paired_comparison_time(benchmark, request, n: int) -> None:
    if n > 100_000 and not request.config.getoption("benchmark_enable"):
        pytest.skip("the 750k-sample comparison runs only with --benchmark-enable")
    a, b = _cell(n, 75, 0, 2000), _cell(n, 75, 1, 2000)
    res = benchmark.pedantic(compare_cells, args=(a, b), rounds=1, iterations=1, kwargs={
        "summary_groups": None, "n_bins": 15, "n_bootstrap": 200, "seed": 0, "alpha": 0.05})
    assert res["n_paired"] == n and res["n_groups"] == 75
    assert set(res["delta"]) >= {"acc1", "ece", "auroc", "ood_auroc"}
