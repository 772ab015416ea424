"""Regression check of robustness numbers: fresh records against committed baseline records.

Cell by cell (model x dataset, and every group of a -C set) and metric by metric:

* **exact** mode, when the two runs are comparable bit for bit (same torch / numpy / open_clip
  versions, device type, dtype and kernel family -- the CPU's vector ISA and generation, or the
  GPU: other kernels round differently): |fresh - baseline| <= 1e-6 (the runs are seeded and
  deterministic, so any change is real);
* **band** mode otherwise: a metric with an interval may move by ``band`` x its half-width
  (Clopper-Pearson for acc1, bootstrap for ECE / AUROC), a share without one by ``band`` x a
  proportion's half-width at its n samples, others by a relative ``rel_tol``; the single-point
  statistics of ``BAND_REPORT_ONLY`` are shown when they move but do not fail.
  A model robench trains (fine-tuning, CAR-FT, ...) gets other weights on another kernel family;
  its cells stay comparable when their cell keys (every input of the numbers) are equal.
  Its weights also differ between world sizes: DDP sums the ranks' gradients in another order
  than one process does, so auto mode compares a trained cell exactly only when both runs
  trained under the same world size (``provenance.world_size`` / ``grad_reduction``; a record
  written before these keys counts as one process). A cell no run trained a network for
  (zero-shot, linear probe, LP-CLIP) is bit-identical under any world size and stays exact.

A change beyond tolerance in the worse direction is a regression, in the better direction a
change (also a failure unless ``allow_improvement``, since a baseline that no longer matches
must be refreshed deliberately). A missing cell, or a protocol / data / weights mismatch that
makes the numbers incomparable, fails too; so does a check that compares nothing (a baseline
that lost its records must not stay green). A tolerance that is negative, NaN or infinite is
refused before anything is read. Both folders are read through the verified loader
(:func:`robench.results.read_record`): a record whose metrics its outputs do not give is
refused, not compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import pandas as pd

from robench.errors import RobenchError
from robench.escape import escape_frame, md_escape, text_escape
from robench.metrics import RECORD_METRIC_INFO
from robench.results import find_records, read_record

EXACT_TOL = 1e-6
Z_95 = NormalDist().inv_cdf(0.975)
# Single-point statistics -- the worst bin's calibration error (a bin may hold one sample), the
# share of errors accepted at one threshold -- whose sampling spread robench does not estimate:
# a model retrained on another kernel family moves them beyond any fixed scale (seen: max_cal_err
# 0.32 -> 0.82 on a 250-image group whose acc1 and ECE stayed inside their intervals). In band
# mode their change is shown (status "moved") but does not fail; exact mode compares them too.
BAND_REPORT_ONLY = frozenset({"max_cal_err", "fpr95"})
# statuses that do not fail a check
PASSING = frozenset({"ok", "improved-allowed", "extra", "moved"})
CI_METRICS = {"acc1": "acc1", "ece": "ece", "auroc": "auroc"}
MODES = ("auto", "exact", "band")
# provenance fields that, when equal, make two runs bit-for-bit comparable
DETERMINISM_KEYS = ("torch", "numpy", "open_clip", "device", "dtype", "kernels")
# ... and, for a cell whose network robench trained, the ranks its gradients were summed over
# (robench.runner.scale_provenance); a record without them was written by one process
TRAINING_KEYS = ("world_size", "grad_reduction")
ONE_PROCESS = {"world_size": 1, "grad_reduction": "single process"}
# fields whose difference makes the numbers incomparable (not merely different)
PROTOCOL_KEYS = ("version", "method", "template_set", "n_templates", "scored_classes", "ece_bins",
                 "confidence", "id_dataset")


@dataclass
class CheckResult:
    rows: list[dict] = field(default_factory=list)
    mode: dict[str, str] = field(default_factory=dict)
    # reasons the whole check fails beyond its rows (it compared nothing)
    problems: list[str] = field(default_factory=list)

    @property
    def comparisons(self) -> int:
        """Metric comparisons made (a missing or incomparable cell makes none)."""
        return sum(1 for r in self.rows if r.get("metric"))

    @property
    def failed(self) -> bool:
        return bool(self.problems) or any(r["status"] not in PASSING for r in self.rows)

    def frame(self, only_problems: bool = True) -> pd.DataFrame:
        rows = [r for r in self.rows if r["status"] != "ok"] if only_problems else self.rows
        cols = ["status", "model", "dataset", "group", "metric", "baseline", "fresh", "delta",
                "tolerance", "note"]
        return pd.DataFrame(rows, columns=cols)


def _key(rec: dict) -> tuple[str, str]:
    return rec["model"], rec["dataset"]


def load_cells(folder: str | Path) -> dict[tuple[str, str], dict]:
    """The verified records under ``folder`` by (model, dataset); two records of one cell (two
    suites in one folder) are refused, since either could silently stand for the cell."""
    cells: dict[tuple[str, str], dict] = {}
    where: dict[tuple[str, str], Path] = {}
    for path in find_records(folder):
        rec = read_record(path)
        key = _key(rec)
        if key in cells:
            raise RobenchError(f"{folder} holds two records of model {key[0]!r} x dataset "
                               f"{key[1]!r}: {where[key]} and {path}",
                               "point the check at one suite's folder (e.g. results/quickstart)")
        cells[key], where[key] = rec, path
    return cells


def check_settings(mode: str, band: float, rel_tol: float) -> None:
    """Refuse a mode robench does not know and a tolerance that is no tolerance: negative
    (nothing could pass, or a sign error), NaN (every comparison with it is False, so a NaN
    band would fail or pass depending on how the test is written) or infinite (everything
    passes)."""
    if mode not in MODES:
        raise RobenchError(f"unknown check mode {mode!r}", f"use one of {', '.join(MODES)}")
    for name, value, what in (("--band", band, "a multiple of each interval's half-width"),
                              ("--rel-tol", rel_tol, "a fraction of each value")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value < 0:
            raise RobenchError(f"{name} {value!r} is not a tolerance: {what} must be a finite "
                               "number >= 0",
                               f"pass {name} with a finite number >= 0 (defaults: --band 1.0, "
                               "--rel-tol 0.02), or --mode exact")


def _provenance(rec: dict) -> dict:
    prov = rec.get("provenance")
    return prov if isinstance(prov, dict) else {}


def trained(rec: dict) -> bool:
    """Whether the cell's network was trained by robench (its record names the gradient
    reduction; null for zero-shot, linear-probe and other head-only cells)."""
    return _provenance(rec).get("grad_reduction") is not None


def same_arithmetic(base: dict, fresh: dict) -> bool:
    """Whether two records were computed by the same arithmetic, so exact mode applies: the same
    versions, device, dtype and kernel family (``DETERMINISM_KEYS``), and, when either cell's
    network was trained by robench, the same world size and gradient reduction
    (``TRAINING_KEYS``; a baseline written before them counts as one process)."""
    bp, fp = _provenance(base), _provenance(fresh)
    if any(bp.get(k) != fp.get(k) for k in DETERMINISM_KEYS):
        return False
    if not (trained(base) or trained(fresh)):
        return True  # no gradients were reduced: bit-identical under any world size
    return all((bp.get(k) or ONE_PROCESS[k]) == (fp.get(k) or ONE_PROCESS[k])
               for k in TRAINING_KEYS)


def _tolerance(metric: str, values: dict, mode: str, band: float, rel_tol: float) -> float:
    """How far ``metric`` may move from the baseline ``values``.

    exact: ``EXACT_TOL``. band: ``band`` x the half-width of the metric's own interval where the
    record has one (acc1: Clopper-Pearson, ECE / AUROC: bootstrap); else, for a metric that is a
    share of the samples or bounded like one (``MetricInfo.share_of`` = S), ``band`` x the normal
    half-width of a proportion at its value over the cell's n samples,
    ``S * z * sqrt(p (1 - p) / n)`` with ``p = value / S`` and z for 95% -- the binomial sampling
    scale, standing in for the interval robench does not bootstrap (max_cal_err, fpr95, the
    per-group OOD AUROC, ...); never below ``rel_tol`` x |value|."""
    if mode == "exact":
        return EXACT_TOL
    base = values.get(metric)
    floor = max(EXACT_TOL, rel_tol * abs(base)) if base is not None else EXACT_TOL
    ci = CI_METRICS.get(metric)
    lo, hi = values.get(f"{ci}_ci_low") if ci else None, values.get(f"{ci}_ci_high") if ci else None
    if lo is not None and hi is not None:
        return max(EXACT_TOL, band * (hi - lo) / 2)
    share, n = RECORD_METRIC_INFO[metric].share_of, values.get("n")
    if share and n and base is not None:
        p = min(max(base / share, 0.0), 1.0)
        return max(floor, band * share * Z_95 * math.sqrt(p * (1 - p) / n))
    return floor


def compare_metrics(base: dict, fresh: dict, mode: str, band: float, rel_tol: float,
                    allow_improvement: bool) -> list[dict]:
    rows = []
    for metric, info in RECORD_METRIC_INFO.items():
        if info.direction is None or metric.endswith(("_ci_low", "_ci_high")) or metric not in base:
            continue
        b, f = base.get(metric), fresh.get(metric)
        tol = _tolerance(metric, base, mode, band, rel_tol)
        row = {"metric": metric, "baseline": b, "fresh": f, "tolerance": tol, "note": ""}
        if b is None and f is None:
            rows.append({**row, "status": "ok", "delta": None})
            continue
        if b is None or f is None or (isinstance(f, float) and math.isnan(f)):
            rows.append({**row, "status": "changed", "delta": None,
                         "note": "defined in one run only"})
            continue
        delta = f - b
        if abs(delta) <= tol:
            status = "ok"
        elif mode == "band" and metric in BAND_REPORT_ONLY:
            status = "moved"
        else:
            worse = delta < 0 if info.direction == "higher" else delta > 0
            status = "regressed" if worse else (
                "improved-allowed" if allow_improvement else "improved")
        rows.append({**row, "status": status, "delta": delta})
    return rows


def _mismatch(base: dict, fresh: dict) -> str | None:
    bp, fp = base.get("protocol", {}), fresh.get("protocol", {})
    bv, fv = bp.get("version", 1), fp.get("version", 1)
    if bv != fv:
        return (f"protocol version {bv} != {fv}: the numbers are not comparable; refresh the "
                "baseline (robench run ... results_dir=results force=true)")
    for k in PROTOCOL_KEYS:
        if bp.get(k) != fp.get(k):
            return f"protocol.{k}: {bp.get(k)!r} != {fp.get(k)!r}"
    # ece_adaptive's bin rule; a record written before it was an option used robench's own
    ba, fa = (p.get("adaptive_bins") or "robench" for p in (bp, fp))
    if ba != fa:
        return f"protocol.adaptive_bins: {ba!r} != {fa!r} (ece_adaptive is binned differently)"
    if base.get("data", {}).get("manifest_hash") != fresh.get("data", {}).get("manifest_hash"):
        return "dataset manifest hash differs (different images)"
    bw = base.get("provenance", {}).get("weights_hash")
    fw = fresh.get("provenance", {}).get("weights_hash")
    # Equal cell keys mean equal inputs (base checkpoint content, method and options, training
    # data, protocol): a model trained by robench then differs only by the arithmetic of its
    # training run, which another kernel family changes, so its metrics are compared (in band
    # mode across families, exactly within one: there a retrained difference is a real change).
    same_recipe = base.get("cell_key") is not None and base.get("cell_key") == fresh.get("cell_key")
    if bw != fw and not same_recipe:
        return "weights hash differs (different model weights)"
    if set(base.get("groups") or {}) != set(fresh.get("groups") or {}):
        return "the sets of groups (corruptions x severities) differ"
    return None


def run_check(baseline: str | Path, fresh: str | Path, mode: str = "auto", band: float = 1.0,
              rel_tol: float = 0.02, allow_improvement: bool = False) -> CheckResult:
    """Compare every baseline cell with the fresh cell of the same (model, dataset); the
    settings are checked before either folder is read."""
    check_settings(mode, band, rel_tol)
    return compare_cells(load_cells(baseline), load_cells(fresh), mode, band, rel_tol,
                         allow_improvement, baseline=str(baseline))


def compare_cells(base_cells: dict[tuple[str, str], dict],
                  fresh_cells: dict[tuple[str, str], dict], mode: str = "auto",
                  band: float = 1.0, rel_tol: float = 0.02, allow_improvement: bool = False,
                  baseline: str = "the baseline") -> CheckResult:
    """The check's decision on records already loaded (``{(model, dataset): record}``): a row
    per compared metric, missing, incomparable and extra cell; a problem when nothing at all
    was compared."""
    check_settings(mode, band, rel_tol)
    result = CheckResult()
    for key, b in sorted(base_cells.items()):
        model, dataset = key
        ident = {"model": model, "dataset": dataset}
        if key not in fresh_cells:
            result.rows.append({**ident, "group": "", "metric": "", "status": "missing",
                                "note": "cell absent from the fresh results"})
            continue
        f = fresh_cells[key]
        why = _mismatch(b, f)
        if why:
            result.rows.append({**ident, "group": "", "metric": "", "status": "incomparable",
                                "note": why})
            continue
        cell_mode = mode
        if mode == "auto":
            cell_mode = "exact" if same_arithmetic(b, f) else "band"
        result.mode[f"{model}/{dataset}"] = cell_mode
        for row in compare_metrics(b["metrics"], f["metrics"], cell_mode, band, rel_tol,
                                   allow_improvement):
            result.rows.append({**ident, "group": "", **row})
        for g, bm in (b.get("groups") or {}).items():
            for row in compare_metrics(bm, f["groups"][g], cell_mode, band, rel_tol,
                                       allow_improvement):
                result.rows.append({**ident, "group": g, **row})
    for key in sorted(set(fresh_cells) - set(base_cells)):
        result.rows.append({"model": key[0], "dataset": key[1], "group": "", "metric": "",
                            "status": "extra", "note": "not in the baseline"})
    if not base_cells:
        result.problems.append(f"{baseline} holds no result records, so nothing was compared "
                               "(a baseline that lost its records cannot pass); restore them "
                               "or point --baseline at the committed records")
    elif result.comparisons == 0:
        result.problems.append("no metric was compared: every baseline cell is missing from "
                               "the fresh results or incomparable with it")
    return result


def render(result: CheckResult, fmt: str = "table") -> str:
    """The diff table (problems only), the reasons the check fails as a whole, and a one-line
    verdict."""
    frame = result.frame(only_problems=True)
    n_cells = len({(r["model"], r["dataset"]) for r in result.rows})
    n_bad = sum(r["status"] not in PASSING for r in result.rows) + len(result.problems)
    modes = ", ".join(sorted(set(result.mode.values()))) or "-"
    verdict = (f"FAIL: {n_bad} problem(s)" if result.failed else "OK") + (
        f" - {n_cells} cell(s), {result.comparisons} metric comparison(s), mode: {modes}")
    reasons = "".join(f"FAIL: {text_escape(p)}\n" for p in result.problems)
    if fmt == "md":  # names from records are text, never markup (robench.escape)
        head = f"### robench check: {verdict}\n\n"
        body = escape_frame(frame, md_escape).to_markdown(index=False, floatfmt=".6g") \
            if len(frame) else "" if result.problems else "All metrics within tolerance."
        return head + "".join(f"- **{md_escape(p)}**\n" for p in result.problems) + body + "\n"
    body = escape_frame(frame, text_escape).to_string(index=False) if len(frame) else \
        "" if result.problems else "all metrics within tolerance"
    return f"{body}\n{reasons}{verdict}\n" if body else f"{reasons}{verdict}\n"
