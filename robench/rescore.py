"""``robench rescore``: recompute every metric of stored records from their per-sample outputs,
without running a model — with new bins, a new interval level, more bootstrap resamples, the other
equal-mass bin rule of the adaptive ECE, or a metric added to robench since the run.

With the record's own settings the recomputed metrics equal the stored ones exactly (the run and
the rescore share :func:`robench.scoring.cell_metrics`); ``--verify`` makes that a check.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from robench.errors import RobenchError, unknown
from robench.metrics import ADAPTIVE_BINS
from robench.results import (
    check_integrity,
    clean,
    find_records,
    load_outputs,
    read_record,
    write_record,
)
from robench.scoring import cell_metrics

# the protocol fields a rescore may change, and the metrics-config names they come from
SETTINGS = {"n_bins": "ece_bins", "bootstrap": "bootstrap", "alpha": None,
            "adaptive_bins": "adaptive_bins"}


@dataclass
class Rescored:
    path: Path
    model: str
    dataset: str
    max_delta: float  # largest |new - old| over every metric of the cell and its groups
    changed: list[str]  # metrics whose value moved by more than 1e-9


def settings_of(record: dict) -> dict:
    """The metric settings a record was scored with."""
    p = record.get("protocol") or {}
    if p.get("version", 1) < 2:
        raise RobenchError(
            f"{record.get('model')} x {record.get('dataset')} is a protocol-{p.get('version', 1)} "
            "record (float16 probabilities), which cannot be re-scored exactly",
            "re-run the suite (robench run suite=...): cells of older protocols are recomputed")
    # records written before the bin rule was an option were scored with robench's own rule
    return {"n_bins": int(p["ece_bins"]), "bootstrap": int(p["bootstrap"]),
            "alpha": round(1 - float(p["interval_level"]), 12), "seed": int(p.get("seed", 0)),
            "adaptive_bins": str(p.get("adaptive_bins") or "robench")}


def _deltas(old: dict | None, new: dict | None, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in (new or {}).items():
        if isinstance(v, dict):
            out.update(_deltas((old or {}).get(k), v, f"{prefix}{k}/"))
            continue
        o = (old or {}).get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if o is None and (v is None or (isinstance(v, float) and math.isnan(v))):
                continue
            d = math.inf if o is None else abs(float(v) - float(o))
            out[f"{prefix}{k}"] = 0.0 if math.isnan(d) else d
    return out


def rescore_record(path: Path, overrides: dict, out_dir: Path | None = None,
                   results_root: Path | None = None) -> Rescored:
    """Re-score one record; writes it (in place, or under ``out_dir``) unless nothing changed."""
    record = read_record(path, verify=False)
    legacy = "integrity" not in record  # an older robench's record: re-scoring seals it
    if not legacy:
        check_integrity(record, path)
    settings = {**settings_of(record), **{k: v for k, v in overrides.items() if v is not None}}
    outputs = load_outputs(path, record)
    headline, groups = cell_metrics(
        outputs, (record.get("protocol") or {}).get("summary_groups"), n_bins=settings["n_bins"],
        n_bootstrap=settings["bootstrap"], seed=settings["seed"], alpha=settings["alpha"],
        adaptive_bins=settings["adaptive_bins"])
    new = clean({"metrics": headline, "groups": groups})
    deltas = _deltas({"metrics": record["metrics"], "groups": record.get("groups")}, new)
    changed = sorted(k for k, d in deltas.items() if d > 1e-9)
    result = Rescored(path, record["model"], record["dataset"],
                      max(deltas.values(), default=0.0), changed)
    if changed or legacy or out_dir is not None:
        record.update(new)
        record["protocol"].update({"ece_bins": settings["n_bins"],
                                   "bootstrap": settings["bootstrap"],
                                   "interval_level": 1 - settings["alpha"],
                                   "adaptive_bins": settings["adaptive_bins"],
                                   "ece_adaptive": ADAPTIVE_BINS[settings["adaptive_bins"]]})
        record["rescored"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        root = results_root or path.parent
        target = path if out_dir is None else out_dir / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_record(target, {k: v for k, v in record.items() if k != "integrity"}, outputs)
    return result


def rescore(results_dir: str | Path, *, n_bins: int | None = None, bootstrap: int | None = None,
            alpha: float | None = None, adaptive_bins: str | None = None,
            out_dir: str | Path | None = None) -> list[Rescored]:
    """Re-score every record under ``results_dir`` (see the module docstring); ``adaptive_bins``
    re-cuts the equal-mass bins of ``ece_adaptive`` by another rule
    (:data:`robench.metrics.ADAPTIVE_BINS`)."""
    if n_bins is not None and n_bins < 1:
        raise RobenchError(f"--n-bins {n_bins} must be >= 1", "pass a positive number of bins")
    if bootstrap is not None and bootstrap < 0:
        raise RobenchError(f"--bootstrap {bootstrap} must be >= 0", "pass 0 or more resamples")
    if alpha is not None and not 0 < alpha < 1:
        raise RobenchError(f"--alpha {alpha} must lie in (0, 1)", "e.g. --alpha 0.05 for 95%")
    if adaptive_bins is not None and adaptive_bins not in ADAPTIVE_BINS:
        raise unknown("adaptive bin rule", adaptive_bins, ADAPTIVE_BINS,
                      fix="pass --adaptive-bins robench or --adaptive-bins torch-uncertainty")
    root = Path(results_dir)
    paths = find_records(root)
    if not paths:
        raise RobenchError(f"no result records under {root}", "run a suite first")
    out = Path(out_dir) if out_dir else None
    over = {"n_bins": n_bins, "bootstrap": bootstrap, "alpha": alpha,
            "adaptive_bins": adaptive_bins}
    return [rescore_record(p, over, out, root) for p in paths]
