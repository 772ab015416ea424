"""Fit one linear probe (one C, a few L-BFGS iterations) on a feature cache file, as the runner
does, and print as JSON the wall time, the passes over the data and the peak RSS (and that of the
imports alone: torch and robench take ~0.7 GB before any data is touched).

    python tests/benchmarks/probe_fit.py FEATURES.npy LABELS.npy N_CLASSES MAX_ITER [MODE]

MODE ``auto`` (default): robench's plan (200,000 x 512 x 1,000 on a CPU: float32 blocks re-read
from the cache file each pass); ``float64-in-memory``: the features materialised in RAM as
float64 and solved in float64 (what robench did before the streamed solver; this mode also runs
against an older checkout). Run as its own process so its peak resident memory is its own
(used by ``test_bench_linear_probe.py``). A "pass" is one objective + gradient evaluation over
all N rows, counted from the rows that go through ``torch.log_softmax``.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np
import torch

from robench.models import linear_probe as LP

ROWS = [0]
_log_softmax = torch.log_softmax


def _counting_log_softmax(t: torch.Tensor, *args, **kw) -> torch.Tensor:
    ROWS[0] += t.shape[0]
    return _log_softmax(t, *args, **kw)


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM): unlike ``ru_maxrss``, which survives exec
    and so starts at the parent's peak (pytest's, having built the problem), it is this
    program's own."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def main(features: str, labels: str, n_classes: int, max_iter: int, mode: str = "auto") -> dict:
    torch.log_softmax = _counting_log_softmax
    floor = peak_rss_mb()  # torch + robench imports
    t0 = time.perf_counter()
    feats = np.load(features, mmap_mode="r")
    y = np.load(labels)
    if mode == "float64-in-memory":
        x = np.asarray(feats, dtype=np.float64)
        exact = {"precision": "float64", "resident_bytes": 2**62, "chunk": 65536} \
            if hasattr(LP, "plan") else {}  # the old solver: float64, all in RAM, 65536 rows
        fit = LP.fit_logistic(x, y, n_classes, 100.0, max_iter=max_iter, **exact)
        how = {"precision": "float64", "resident": True}
    else:
        rows = LP.FeatureRows(feats)
        plan = LP.plan(len(rows), rows.dim, n_classes)
        fit = LP.fit_logistic(rows, y, n_classes, 100.0, max_iter=max_iter, how=plan)
        how = plan.describe()
    seconds = time.perf_counter() - t0
    passes = ROWS[0] / len(y)
    return {"seconds": seconds, "n": len(y), "dim": feats.shape[1], "classes": n_classes,
            "n_iter": fit.n_iter, "passes": passes, "seconds_per_pass": seconds / passes,
            "objective": fit.objective, "threads": torch.get_num_threads(), "mode": mode,
            **how, "import_rss_mb": floor,
            "max_rss_mb": peak_rss_mb()}


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(main(args[0], args[1], int(args[2]), int(args[3]), *args[4:])))
