"""``robench rescore``: recompute every metric of stored records from their per-sample outputs,
without running a model — with new bins, a new interval level, more bootstrap resamples, the other
equal-mass bin rule of the adaptive ECE, or a metric added to robench since the run.

With the record's own settings the recomputed metrics equal the stored ones exactly (the run and
the rescore share :func:`robench.scoring.cell_metrics`); ``--verify`` makes that a check: the full
recomputation, bootstrap intervals included, compared with every stored value, and nothing
written. (Every reader of records already checks the point values and that each interval holds
its estimate, :func:`robench.results.check_meaning`; only the bootstrap needs this slower pass.)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from robench.errors import RobenchError, unknown
from robench.metrics import ADAPTIVE_BINS
from robench.results import (
    check_integrity,
    disagreements,
    find_records,
    load_outputs,
    read_record,
    recompute_metrics,
    settings_of,
    write_record,
)

__all__ = ["Rescored", "render_verification", "rescore", "rescore_record", "settings_of",
           "verify_record"]

# the protocol fields a rescore may change, and the metrics-config names they come from
SETTINGS = {"n_bins": "ece_bins", "bootstrap": "bootstrap", "alpha": None,
            "adaptive_bins": "adaptive_bins"}


@dataclass
class Rescored:
    path: Path
    model: str
    dataset: str
    max_delta: float  # largest |new - old| over every metric of the cell and its groups
    changed: list[str]  # metrics whose value moved by more than 1e-9 (--verify: disagree)
    problems: list[str] = field(default_factory=list)  # --verify: what disagrees, in words


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
            d = math.inf if not isinstance(o, (int, float)) else abs(float(v) - float(o))
            out[f"{prefix}{k}"] = 0.0 if math.isnan(d) else d
    return out


def rescore_record(path: Path, overrides: dict, out_dir: Path | None = None,
                   results_root: Path | None = None) -> Rescored:
    """Re-score one record; writes it (in place, or under ``out_dir``) unless nothing changed."""
    record = read_record(path, verify=False)  # rewritten from its outputs: read as it is
    legacy = "integrity" not in record  # an older robench's record: re-scoring seals it
    if not legacy:
        check_integrity(record, path)
    settings = {**settings_of(record), **{k: v for k, v in overrides.items() if v is not None}}
    outputs = load_outputs(path, record)
    headline, groups = recompute_metrics(record, outputs, n_bootstrap=None, **settings)
    new = {"metrics": headline, "groups": groups}
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


def verify_record(path: Path) -> Rescored:
    """Re-score one record with its own settings, bootstrap included, and compare every stored
    value with its recomputation (:func:`robench.results.disagreements` in full); writes
    nothing. A record without a checksum, failing it, or without a readable outputs file is
    reported as such, not re-scored."""
    record = read_record(path, verify=False)  # what fails is reported below, not raised
    result = Rescored(Path(path), str(record["model"]), str(record["dataset"]), 0.0, [])
    npz = Path(path).with_suffix(".npz")
    if "integrity" not in record:
        result.problems.append("no checksum (written by an older robench; robench rescore "
                               "--dir <folder> without --verify seals it)")
    elif not npz.is_file():
        result.problems.append(f"its per-sample outputs {npz.name} are missing")
    if result.problems:
        return result
    try:
        check_integrity(record, path)
        outputs = load_outputs(path, record)
        headline, groups = recompute_metrics(record, outputs, n_bootstrap=None)
    except RobenchError as e:
        result.problems.append(e.problem)
        return result
    found = disagreements(record, headline, groups, full=True)
    deltas = _deltas({"metrics": record["metrics"], "groups": record.get("groups")},
                     {"metrics": headline, "groups": groups})
    result.max_delta = max(deltas.values(), default=0.0)
    result.changed = [d.where for d in found]
    result.problems = [d.describe() for d in found]
    return result


def render_verification(rows: list[Rescored]) -> str:
    """``robench rescore --verify``'s report: one line per record, then the verdict."""
    lines = []
    for r in rows:
        what = "; ".join(r.problems[:4]) + (" ..." if len(r.problems) > 4 else "")
        lines.append(f"{r.model:28s} {r.dataset:28s} "
                     + (f"DISAGREES: {what}" if r.problems else "agrees"))
    bad = sum(bool(r.problems) for r in rows)
    lines.append(f"{len(rows)} record(s) verified against a full re-scoring of their per-sample "
                 f"outputs (their own settings, bootstrap included): {bad} disagree; nothing "
                 "was written")
    return "\n".join(lines) + "\n"


def _verify_alone(n_bins: int | None, bootstrap: int | None, alpha: float | None,
                  adaptive_bins: str | None, out_dir: str | Path | None) -> None:
    """Refuse ``--verify`` with new settings or ``--out``: it checks, it does not re-score."""
    given = [f"--{name}" for name, v in (
        ("n-bins", n_bins), ("bootstrap", bootstrap), ("alpha", alpha),
        ("adaptive-bins", adaptive_bins), ("out", out_dir)) if v is not None]
    if given:
        raise RobenchError(f"--verify checks records against their own settings and writes "
                           f"nothing, but {', '.join(given)} asks for other settings or a copy",
                           f"drop {', '.join(given)} to verify, or drop --verify to re-score")


def rescore(results_dir: str | Path, *, n_bins: int | None = None, bootstrap: int | None = None,
            alpha: float | None = None, adaptive_bins: str | None = None,
            out_dir: str | Path | None = None, verify: bool = False) -> list[Rescored]:
    """Re-score every record under ``results_dir`` (see the module docstring); ``adaptive_bins``
    re-cuts the equal-mass bins of ``ece_adaptive`` by another rule
    (:data:`robench.metrics.ADAPTIVE_BINS`). ``verify``: check every record against its own
    settings (:func:`verify_record`) and write nothing."""
    if verify:
        _verify_alone(n_bins, bootstrap, alpha, adaptive_bins, out_dir)
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
    if verify:
        return [verify_record(p) for p in paths]
    out = Path(out_dir) if out_dir else None
    over = {"n_bins": n_bins, "bootstrap": bootstrap, "alpha": alpha,
            "adaptive_bins": adaptive_bins}
    return [rescore_record(p, over, out, root) for p in paths]
