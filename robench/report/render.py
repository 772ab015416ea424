"""Render result records into a self-contained HTML leaderboard, plus CSV and Markdown tables.

:func:`render_report` reads every record under a results folder (``<suite>/<model>/<dataset>.json``,
see :mod:`robench.results`) and writes three files into the output folder:

* ``index.html``: one section per suite with the models x datasets leaderboard (acc1, ECE, AUROC
  and, where recorded, OOD AUROC, each with its interval; the best value per column marked), a
  per-corruption x severity breakdown for datasets whose records carry groups (-C sets), charts,
  and the protocol/provenance behind the numbers; then the metric definitions. The page is one
  file: CSS and the table-sorting script are inline, charts are matplotlib SVGs embedded as
  ``data:`` URIs, and a Content-Security-Policy forbids every network fetch, so it renders offline
  and can be attached or committed as is.
* ``leaderboard.csv``: one row per (suite, model, dataset) cell with every metric (full precision).
* ``leaderboard.md``: per suite, the headline metrics with their intervals.

The HTML comes from the Jinja2 template ``templates/leaderboard.html.j2`` with autoescaping on;
this module only prepares plain view objects (:class:`Table`, :class:`SuiteView`, ...).
"""

from __future__ import annotations

import base64
import io
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import robench
from robench.errors import RobenchError
from robench.escape import csv_safe, md_escape, text_escape
from robench.io import atomic_write, sweep_stale
from robench.metrics import RECORD_METRIC_INFO, MetricInfo
from robench.outpaths import output_folder, writing
from robench.results import (
    HEADLINE,
    ShiftAverage,
    average_tables,
    check_protocols,
    find_records,
    read_record,
    shift_average,
    to_frame,
)

__all__ = ["DASH", "DEFAULT_TITLE", "load_records", "render_report"]

DEFAULT_TITLE = "robench leaderboard"
DASH = "\u2013"  # shown for a metric that is undefined (null in the record) or a cell not run

REQUIRED_KEYS = ("suite", "model", "dataset", "metrics")
GROUP_SUMMARY_PREFIX = "mean over groups "  # how the runner names a -C headline's groups


@dataclass(frozen=True)
class MetricFormat:
    """How one headline metric is shown: header label and decimals (intervals use the same)."""

    key: str
    label: str
    digits: int


LEADERBOARD_METRICS = (
    MetricFormat("acc1", "acc1 (%)", 1),
    MetricFormat("ece", "ECE", 3),
    MetricFormat("auroc", "AUROC", 3),
    MetricFormat("ood_auroc", "OOD AUROC", 3),
)
BREAKDOWN_METRICS = (MetricFormat("acc1", "top-1 accuracy (%)", 1), MetricFormat("ece", "ECE", 3))


def metric_info(key: str) -> MetricInfo | None:
    """Description and better-direction of a metric key (None for keys robench does not know)."""
    return RECORD_METRIC_INFO.get(key)


# --------------------------------------------------------------------------------------------
# View objects handed to the template
# --------------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One table cell: the shown text, the value it sorts by (None sorts last), and marks."""

    text: str
    value: float | None = None
    interval: str = ""  # "[low, high]" or "" when the record has no interval
    best: bool = False
    title: str = ""  # tooltip
    low: float | None = None  # the interval, also when it is not shown in the cell
    high: float | None = None
    significant: bool = False  # a delta whose interval excludes 0

    @property
    def sort_key(self) -> str:
        """What the sorting script reads: a float's repr, or "" for a missing value."""
        return "" if self.value is None else repr(self.value)

    @property
    def full_text(self) -> str:
        return f"{self.text} {self.interval}" if self.interval else self.text


@dataclass
class Column:
    """A header cell. ``direction`` ("higher"/"lower") decides which values are "best" and which
    way the first click sorts (best first); text columns sort alphabetically."""

    label: str
    title: str = ""
    direction: str | None = None
    numeric: bool = True
    key: str = ""  # stable machine name (data-key), e.g. "cifar10/ece"; the label is for people

    @property
    def first_sort(self) -> str:
        return "descending" if self.direction == "higher" else "ascending"


@dataclass
class Row:
    lead: list[str]  # the text columns (model, method, ...)
    cells: list[Cell]
    css: str = ""
    lead_title: str = ""


@dataclass
class Table:
    """A sortable table: text ``lead`` columns, then numeric ``columns`` under optional ``bands``
    (a spanning header row, e.g. one band per dataset)."""

    id: str
    lead: list[Column]
    columns: list[Column]
    rows: list[Row]
    bands: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class Chart:
    uri: str  # data:image/svg+xml;base64,...
    alt: str
    caption: str


@dataclass
class Breakdown:
    """Per-corruption x severity view of one dataset whose records carry groups."""

    dataset: str
    n_groups: int
    summary_note: str
    table: Table
    chart: Chart | None
    grids: list[Chart] = field(default_factory=list)  # one small multiple per corruption


@dataclass
class AnalysisView:
    """What the report shows of a suite's analysis.json."""

    deltas: Table | None
    reference_note: str
    er_charts: list[Chart]
    mce: Table | None
    reliability: list[Chart]
    notes: list[str]
    stale: list[str]  # cells changed since the analysis was computed


@dataclass
class SuiteView:
    name: str
    anchor: str
    models: list[str]
    datasets: list[str]
    n_cells: int
    leaderboard: Table
    scatter: Chart | None
    breakdowns: list[Breakdown]
    common: list[tuple[str, str]]  # protocol/provenance fields equal in every cell
    varying: Table | None  # fields that differ, one row per cell
    analysis: AnalysisView | None = None
    order_note: str = ""  # what the models are ordered by


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _malformed(rec: Any) -> str:
    """What makes ``rec`` unusable as a record, or "" (checked up front so a bad file is named
    instead of failing somewhere inside the rendering)."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    missing = [k for k in REQUIRED_KEYS if k not in rec]
    if missing:
        return f"missing {', '.join(missing)}"
    if not isinstance(rec["metrics"], dict):
        return "metrics is not an object"
    groups = rec.get("groups")
    if groups is not None and not (isinstance(groups, dict)
                                   and all(isinstance(g, dict) for g in groups.values())):
        return "groups is not an object of per-group metrics"
    return ""


def load_records(results_dir: str | Path) -> list[dict]:
    """Every result record under ``results_dir``; fails with a fix when there is none, naming the
    file when one cannot be read or is not a record, or when a cell has two records."""
    root = Path(results_dir)
    if not root.is_dir():
        raise RobenchError(
            f"results folder {root} does not exist",
            f"run a suite first (robench run suite=quickstart results_dir={root}) or pass "
            "--results with a folder of records (the committed ones are in results/)")
    records: list[dict] = []
    seen: dict[tuple[str, str, str], Path] = {}
    for path in find_records(root):
        rec = read_record(path)  # raises a RobenchError naming the file if it is not JSON
        problem = _malformed(rec)
        if problem:
            raise RobenchError(f"{path} is not a robench result record ({problem})",
                               "move it out of the results folder, or delete it and re-run its "
                               "cell")
        key = (str(rec["suite"]), str(rec["model"]), str(rec["dataset"]))
        if key in seen:
            raise RobenchError(
                f"two records for suite {key[0]!r}, model {key[1]!r}, dataset {key[2]!r}: "
                f"{seen[key]} and {path}", "keep one of them (move the other elsewhere)")
        seen[key] = path
        records.append(rec)
    if not records:
        raise RobenchError(
            f"no result records under {root}",
            f"run a suite first (robench run suite=quickstart results_dir={root}) or pass "
            "--results with a folder of records")
    check_protocols(records, root)
    return records


def load_analyses(results_dir: str | Path) -> dict[str, dict]:
    """``{suite: analysis}`` for the suites under ``results_dir`` that have an analysis.json
    (robench.analysis) beside their model folders."""
    from robench.analysis import read_analysis

    out: dict[str, dict] = {}
    for folder in sorted({p.parent.parent for p in find_records(results_dir)}):
        doc = read_analysis(folder)
        if doc is not None and isinstance(doc.get("suite"), str):
            out[doc["suite"]] = doc
    return out


# --------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------


def _section(rec: dict, name: str) -> dict:
    """A record's ``protocol`` / ``provenance`` / ``data`` dict ({} when absent or null, as in
    hand-made or older records)."""
    value = rec.get(name)
    return value if isinstance(value, dict) else {}


def number(value: Any) -> float | None:
    """A finite float, or None for null / NaN / non-numeric (a degenerate metric)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def metric_cell(metrics: dict, fmt: MetricFormat, note: str = "",
                show_interval: bool = True) -> Cell:
    """``71.2 [69.1, 73.2]``-style cell for one metric of a record's metrics dict (with
    ``show_interval=False`` the interval only goes into the tooltip, for dense tables)."""
    v = number(metrics.get(fmt.key))
    if v is None:
        return Cell(DASH, None, title=f"{fmt.key} is undefined for this cell (null in the record)")
    lo = number(metrics.get(f"{fmt.key}_ci_low"))
    hi = number(metrics.get(f"{fmt.key}_ci_high"))
    interval = f"[{lo:.{fmt.digits}f}, {hi:.{fmt.digits}f}]" if lo is not None and hi is not None \
        else ""
    title = f"{fmt.key} = {v:.6g}"
    if interval:
        title += f", 95% interval [{lo:.6g}, {hi:.6g}]"
    if note:
        title += f"; {note}"
    return Cell(f"{v:.{fmt.digits}f}", v, interval=interval if show_interval else "",
                title=title, low=lo, high=hi)


def describe_metric(key: str) -> str:
    info = metric_info(key)
    if info is None:
        return key
    better = f" ({info.direction} is better)" if info.direction else ""
    return f"{key}: {info.description}{better}"


def metric_column(fmt: MetricFormat, label: str | None = None, key: str = "") -> Column:
    info = metric_info(fmt.key)
    return Column(label or fmt.label, title=describe_metric(fmt.key),
                  direction=info.direction if info else None, key=key or fmt.key)


BEST_RULE = ("best value of its column whose 95% interval does not overlap the runner-up's; "
             "a column without intervals (a mean over corruption groups) or whose two best "
             "overlap marks nothing")


def mark_best(table: Table, group_of: Callable[[Row], object] = lambda row: None) -> None:
    """Mark the best value of each scored column (by the metric's direction) within each group
    of rows, only where the samples support it: the best cell's interval must clear the
    runner-up's (higher is better: best low > runner-up high). Nothing is marked for a single
    value, a tie for best, or a best or runner-up without an interval."""
    for j, col in enumerate(table.columns):
        if col.direction not in ("higher", "lower"):
            continue
        groups: dict[object, list[Cell]] = defaultdict(list)
        for row in table.rows:
            if row.cells[j].value is not None:
                groups[group_of(row)].append(row.cells[j])
        for cells in groups.values():
            if len(cells) < 2:
                continue
            higher = col.direction == "higher"
            ranked = sorted(cells, key=lambda c: -c.value if higher else c.value)
            best, runner = ranked[0], ranked[1]
            if best.value == runner.value or None in (best.low, best.high, runner.low,
                                                      runner.high):
                continue
            clear = best.low > runner.high if higher else best.high < runner.low
            if clear:
                best.best = True
                best.title += "; best in column, its interval clear of the runner-up's"


def slug(text: str, taken: set[str]) -> str:
    """An HTML id from arbitrary text, unique among ``taken`` (which it extends)."""
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"
    out, i = base, 2
    while out in taken:
        out, i = f"{base}-{i}", i + 1
    taken.add(out)
    return out


def mean_or_none(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


# --------------------------------------------------------------------------------------------
# Charts (matplotlib, rendered straight to SVG; no pyplot, so no global backend state)
# --------------------------------------------------------------------------------------------

# Fixed hash salt and no date: the same records give byte-identical SVGs, so a committed report
# only changes when the numbers do.
_RC = {"svg.hashsalt": "robench-report", "svg.fonttype": "path", "font.size": 9,
       "axes.grid": True, "grid.alpha": 0.3}
_MARKERS = "osD^vP*Xh<>p"
ANNOTATE_MAX_POINTS = 16  # beyond this, dataset labels on the scatter overlap into noise


def model_styles(models: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A colour + marker per model, stable within a suite so every chart agrees."""
    import matplotlib as mpl

    cmap = mpl.colormaps["tab10" if len(models) <= 10 else "tab20"]
    n = cmap.N
    return {m: {"color": cmap(i % n), "marker": _MARKERS[i % len(_MARKERS)]}
            for i, m in enumerate(models)}


def plain_label(text: str) -> str:
    """Matplotlib treats ``$...$`` as mathtext; a model name is literal text (its unprintable
    characters spelled out, as in the text tables)."""
    return text_escape(text).replace("$", r"\$")


def figure_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _legend(fig: Figure, ax: Any, n: int) -> None:
    # Below the axes so long or many model names never cover the data.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(3, max(n, 1)),
              frameon=False, fontsize=8)


def severity_chart(dataset: str, models: Sequence[str], severities: Sequence[str],
                   curves: dict[str, dict[str, list[float | None]]],
                   styles: dict[str, dict[str, Any]], what: str) -> Chart:
    """Accuracy and ECE against severity, one line per model (``curves[metric][model]``)."""
    with rc_context(_RC):
        fig = Figure(figsize=(9.0, 3.6 + 0.18 * math.ceil(len(models) / 3)))
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, 2)
        x = np.arange(len(severities))
        for ax, (key, ylabel) in zip(axes, (("acc1", "top-1 accuracy (%)"), ("ece", "ECE")),
                                     strict=True):
            for m in models:
                y = np.array([np.nan if v is None else v for v in curves[key][m]], dtype=float)
                ax.plot(x, y, label=plain_label(m), linewidth=1.5, markersize=5, **styles[m])
            ax.set_xticks(x, [str(s) for s in severities])
            ax.set_xlabel("corruption severity")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{ylabel} vs severity", fontsize=9)
        fig.suptitle(plain_label(f"{dataset}: {what}"), fontsize=10)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(4, max(len(models), 1)),
                   frameon=False, fontsize=8, bbox_to_anchor=(0.5, -0.02))
        fig.tight_layout(rect=(0, 0.06 + 0.04 * math.ceil(len(models) / 4), 1, 1))
        uri = figure_uri(fig)
    return Chart(uri, alt=f"{dataset}: top-1 accuracy and ECE against corruption severity, "
                 f"one line per model ({what})",
                 caption=f"{what}; one line per model. Left: accuracy (higher is better); "
                 "right: ECE (lower is better).")


def scatter_chart(suite: str, models: Sequence[str], records: Sequence[dict],
                  styles: dict[str, dict[str, Any]]) -> Chart | None:
    """Headline accuracy vs ECE, one point per cell, one marker style per model."""
    points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    names: dict[str, list[str]] = defaultdict(list)
    for r in records:
        a, e = number(r["metrics"].get("acc1")), number(r["metrics"].get("ece"))
        if a is not None and e is not None:
            points[str(r["model"])].append((a, e))
            names[str(r["model"])].append(str(r["dataset"]))
    n = sum(len(v) for v in points.values())
    if not points:
        return None
    shown = [m for m in models if m in points]
    with rc_context(_RC):
        fig = Figure(figsize=(6.4, 4.4))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for m in shown:
            xy = np.array(points[m])
            ax.scatter(xy[:, 0], xy[:, 1], label=plain_label(m), s=36, alpha=0.85,
                       edgecolors="white", linewidths=0.5, **styles[m])
            if n <= ANNOTATE_MAX_POINTS:  # few points: say which dataset each one is
                for (x, y), d in zip(xy, names[m], strict=True):
                    ax.annotate(plain_label(d), (x, y), xytext=(4, 3),
                                textcoords="offset points", fontsize=7, color="#444")
        ax.margins(0.12)
        ax.set_xlabel("top-1 accuracy (%), higher is better")
        ax.set_ylabel("ECE, lower is better")
        ax.set_title(plain_label(f"suite {suite}: accuracy vs calibration, one point per cell"),
                     fontsize=9)
        _legend(fig, ax, len(shown))
        uri = figure_uri(fig)
    return Chart(uri, alt=f"scatter of top-1 accuracy against ECE for {n} cells of suite {suite}, "
                 "one marker per model",
                 caption=f"{n} cell{'' if n == 1 else 's'} (model x dataset headline numbers); "
                 "best is bottom-right: "
                 "high accuracy, low calibration error.")


# --------------------------------------------------------------------------------------------
# Building the views
# --------------------------------------------------------------------------------------------


def _by_cell(records: Iterable[dict]) -> dict[tuple[str, str], dict]:
    return {(str(r["model"]), str(r["dataset"])): r for r in records}


def model_order(models: Iterable[str], datasets: Sequence[str],
                cells: dict[tuple[str, str], dict]) -> list[str]:
    """Best mean acc1 over ``datasets`` (the suite's shifted sets: :class:`ShiftAverage`) first
    among models with every one of them, then the rest by name."""
    def mean_acc(m: str) -> float | None:
        vals = [number(cells[(m, d)]["metrics"].get("acc1")) if (m, d) in cells else None
                for d in datasets]
        return None if any(v is None for v in vals) else float(np.mean(vals))

    return sorted(set(models), key=lambda m: (mean_acc(m) is None, -(mean_acc(m) or 0.0), m))


ER_FORMAT = MetricFormat("er", "ER (pts)", 2)


def er_title(er: dict, d: str) -> str:
    """What an ER column holds: the definition, the x-axis, the fit and how much it says."""
    fit = er["fits"][d]
    r2 = number(fit.get("r2"))
    ci = fit.get("slope_interval")
    parts = [f"effective robustness: {d} acc1 minus the acc1 predicted from "
             f"{(er.get('x_axis') or {}).get(d) or er.get('id_dataset')} by the logit-linear "
             f"fit ({fit.get('source')}), in points (Taori et al. 2020)",
             f"slope {fit['slope']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
             + (f", R^2 = {r2:.2f}" if r2 is not None else "")]
    if fit.get("reference"):
        parts.append(f"reference set: {', '.join(fit['reference'])}")
    if fit.get("weak"):
        parts.append(f"too weak to read: {fit['weak']}")
    return "; ".join(parts)


def leaderboard_table(anchor: str, models: Sequence[str], datasets: Sequence[str],
                      cells: dict[tuple[str, str], dict], er: dict | None = None,
                      average: ShiftAverage | None = None) -> Table:
    """Models x datasets, one band per dataset with acc1 / ECE / AUROC (/ OOD AUROC), and the
    effective robustness of a shifted dataset when the suite's analysis has a fit for it.

    The first column is the suite's one-number summary, ``average`` (by default from the
    records): the avg shift acc1, the mean over the shifted sets with the ID set's band first
    and apart, as papers report it; when no ID set is paired, the mean over all datasets,
    labelled as such."""
    er = er or {}
    er_models = er.get("models") or {}
    avg = average or shift_average(cells.values())
    columns: list[Column] = []
    bands: list[tuple[str, int]] = []
    plan: list[tuple[str | None, MetricFormat]] = []
    if avg.datasets and (avg.paired or len(datasets) > 1):
        n = len(avg.datasets)
        label = f"{avg.label} (%)"
        columns.append(Column(label, direction="higher", key=f"{avg.key}/acc1",
                              title=f"{avg.describe()}; only for models with every one of them"))
        bands.append((f"avg over {n} shifted set{'' if n == 1 else 's'}" if avg.paired
                      else "all datasets (no ID set paired)", 1))
        plan.append((None, MetricFormat("acc1", label, 1)))
    ids = [d for d in datasets if d in avg.id_datasets]
    for d in ids + [d for d in datasets if d not in ids]:  # the ID set first, apart
        recs = [cells[(m, d)] for m in models if (m, d) in cells]
        fmts = [f for f in LEADERBOARD_METRICS
                if f.key != "ood_auroc" or any("ood_auroc" in r["metrics"] for r in recs)]
        if d in (er.get("fits") or {}):
            fmts.append(ER_FORMAT)
        bands.append((f"{d} (ID)" if d in ids else d, len(fmts)))
        for f in fmts:
            if f is ER_FORMAT:
                columns.append(Column(f.label + (" (weak fit)" if er["fits"][d].get("weak")
                                                 else ""), key=f"{d}/er", direction="higher",
                                      title=er_title(er, d)))
            else:
                columns.append(metric_column(f, key=f"{d}/{f.key}"))
            plan.append((d, f))
    rows = []
    for m in models:
        row_cells = []
        for d, f in plan:
            if d is None:
                v = avg.value({x: number(cells[(m, x)]["metrics"].get("acc1"))
                               if (m, x) in cells else None for x in avg.datasets})
                row_cells.append(metric_cell({"acc1": v}, f, avg.describe())
                                 if v is not None else Cell(DASH, None, title=(
                                     f"not every one of {', '.join(avg.datasets)} has an "
                                     "accuracy for this model")))
            elif f is ER_FORMAT:
                v = (er_models.get(m) or {}).get(d) or {}
                band = v.get("er_interval") or (None, None)
                row_cells.append(metric_cell({"er": v.get("er"), "er_ci_low": band[0],
                                              "er_ci_high": band[1]}, f, (
                    f"predicted {d} acc1 {v['predicted']:.2f} from ID acc1 {v['id_acc']:.2f}, "
                    f"observed {v['ood_acc']:.2f}; interval: the fitted line's band"
                    if number(v.get("predicted")) is not None else "")))
            elif (m, d) in cells:
                rec = cells[(m, d)]
                note = "mean over groups; interval: bootstrap over base images" \
                    if rec.get("groups") and f.key != "ood_auroc" else ""
                row_cells.append(metric_cell(rec["metrics"], f, note))
            else:
                row_cells.append(Cell(DASH, None, title=f"{m} was not run on {d}"))
        methods = {str(_section(cells[(m, d)], "protocol").get("method") or DASH)
                   for d in datasets if (m, d) in cells}
        rows.append(Row([m, ", ".join(sorted(methods))], row_cells))
    table = Table(f"{anchor}-leaderboard", [Column("model", numeric=False, key="model"),
                                            Column("method", numeric=False, key="method")],
                  columns, rows, bands)
    mark_best(table)
    return table


def split_group(key: str) -> tuple[str, str]:
    """``"fog/3"`` -> ``("fog", "3")``; a key without a severity gets ``""``."""
    name, sep, sev = str(key).rpartition("/")
    return (name, sev) if sep else (str(key), "")


def _severity_sort(s: str) -> tuple[int, float, str]:
    try:
        return (0, float(s), s)
    except ValueError:
        return (1, 0.0, s)


def summary_groups(record: dict) -> list[str]:
    """The groups a -C record's headline averages (as the runner wrote them), else all groups."""
    groups = record.get("groups") or {}
    text = str(_section(record, "protocol").get("summary") or "")
    if text.startswith(GROUP_SUMMARY_PREFIX):
        named = [g for g in text[len(GROUP_SUMMARY_PREFIX):].split(",") if g in groups]
        if named:
            return named
    return list(groups)


def breakdown_view(anchor: str, dataset: str, models: Sequence[str],
                   cells: dict[tuple[str, str], dict],
                   styles: dict[str, dict[str, Any]]) -> Breakdown | None:
    """Corruption x severity table (acc1 and ECE per severity, plus their mean) and chart."""
    recs = {m: cells[(m, dataset)] for m in models
            if (m, dataset) in cells and cells[(m, dataset)].get("groups")}
    if not recs:
        return None
    corruptions: list[str] = []
    severities: set[str] = set()
    in_summary: set[str] = set()
    for rec in recs.values():
        for g in rec["groups"]:
            c, s = split_group(g)
            if c not in corruptions:
                corruptions.append(c)
            severities.add(s)
        in_summary.update(split_group(g)[0] for g in summary_groups(rec))
    sev = sorted(severities, key=_severity_sort)
    n_summary = sum(c in in_summary for c in corruptions)

    columns: list[Column] = []
    bands = []
    for f in BREAKDOWN_METRICS:
        bands.append((f"{f.label} by severity", len(sev) + 1))
        columns += [metric_column(f, f"s{s}" if s else "all", key=f"{f.key}/{s}") for s in sev]
        columns.append(metric_column(f, "mean", key=f"{f.key}/mean"))

    def value(rec: dict, group: str, key: str) -> float | None:
        return number((rec["groups"].get(group) or {}).get(key))

    mean_label = f"mean of {n_summary} corruptions"
    rows: list[Row] = []
    curves: dict[str, dict[str, list[float | None]]] = {f.key: {} for f in BREAKDOWN_METRICS}
    for m, rec in recs.items():  # the averaged row first: the chart's numbers, per model
        summary = set(summary_groups(rec))
        row_cells = []
        for f in BREAKDOWN_METRICS:
            per_sev = [mean_or_none(value(rec, g, f.key) for g in rec["groups"]
                                    if g in summary and split_group(g)[1] == s) for s in sev]
            curves[f.key][m] = per_sev
            row_cells += [metric_cell({f.key: v}, f) for v in per_sev]
            row_cells.append(metric_cell({f.key: mean_or_none(per_sev)}, f))
        rows.append(Row([mean_label, m], row_cells, css="mean-row",
                        lead_title="unweighted mean over the corruptions in the headline"))
    for c in corruptions:
        for m, rec in recs.items():
            row_cells = []
            for f in BREAKDOWN_METRICS:
                groups = {s: f"{c}/{s}" if s else c for s in sev}
                cs = [metric_cell(rec["groups"].get(groups[s]) or {}, f, show_interval=False)
                      for s in sev]
                row_cells += cs
                row_cells.append(metric_cell({f.key: mean_or_none(x.value for x in cs)}, f,
                                             "mean over severities"))
            extra = c not in in_summary
            rows.append(Row([c, m], row_cells, css="extra-row" if extra else "",
                            lead_title="not in the headline mean" if extra else ""))
    table = Table(f"{anchor}-breakdown", [Column("corruption", numeric=False, key="corruption"),
                                          Column("model", numeric=False, key="model")],
                  columns, rows, bands)
    mark_best(table, group_of=lambda row: row.lead[0])  # compare models within a corruption

    numeric_sev = all(_severity_sort(s)[0] == 0 for s in sev)
    chart = severity_chart(dataset, list(recs), sev, curves, styles, mean_label) \
        if numeric_sev and len(sev) > 1 else None
    grids = []
    if numeric_sev and len(sev) > 1:
        from robench.report.views import corruption_grid

        for f in BREAKDOWN_METRICS:
            per = {m: {c: [value(rec, f"{c}/{s}", f.key) for s in sev] for c in corruptions}
                   for m, rec in recs.items()}
            grids.append(corruption_grid(dataset, list(recs), corruptions, sev, per, styles,
                                         f.key, f.label))
    note = (f"{len(corruptions)} corruptions x {len(sev)} severities; the headline numbers in "
            f"the leaderboard are the unweighted mean over {n_summary} corruptions x "
            f"{len(sev)} severities")
    if n_summary < len(corruptions):
        note += " (corruptions in grey are kept but not averaged)"
    made = next((g for r in recs.values() if (g := _section(r, "data").get("generated"))), None)
    if made:  # a generated set never passes for the released benchmark of the same recipe
        note += f". {dataset} was {made.get('note') or 'generated by robench'}"
    n_groups = max(len(r["groups"]) for r in recs.values())
    return Breakdown(dataset, n_groups, note + ".", table, chart, grids)


def _short(value: Any, n: int = 12) -> str:
    return DASH if value is None else str(value)[:n]


def _scored_classes(rec: dict) -> str:
    p = _section(rec, "protocol")
    scored = p.get("scored_classes")
    n = p.get("n_classes_scored")
    if scored == "all":
        return f"all {n}" if n is not None else "all"
    if isinstance(scored, list) and scored:
        head = ", ".join(str(x) for x in scored[:3])
        return f"{len(scored)}-class sub-list (indices {head}, ..., {scored[-1]})"
    return DASH if scored is None else str(scored)


def _alpha_level(rec: dict) -> str:
    level = number(_section(rec, "protocol").get("interval_level"))
    return DASH if level is None else f"{100 * level:g}%"


def _logit_scale(rec: dict) -> str:
    v = number(_section(rec, "provenance").get("logit_scale"))
    return DASH if v is None else f"{v:.4g}"


def _summary(rec: dict) -> str:
    s = _section(rec, "protocol").get("summary")
    if isinstance(s, str) and s.startswith(GROUP_SUMMARY_PREFIX):
        return f"mean over {len(summary_groups(rec))} groups"
    return DASH if s is None else str(s)


def _get(section: str, key: str) -> Callable[[dict], Any]:
    return lambda rec: _section(rec, section).get(key)


def _generated(record: dict) -> str | None:
    """``protocol, resize, from base`` of a -C set robench generated; None for other data."""
    g = _section(record, "data").get("generated")
    return f"{g.get('protocol')}, resize {g.get('resize')}, from {g.get('base')}" if g else None


# (label, getter): the protocol and provenance a reader needs to trust or compare the numbers.
PROVENANCE_FIELDS: list[tuple[str, Callable[[dict], Any]]] = [
    ("robench", _get("provenance", "robench")),
    ("torch", _get("provenance", "torch")),
    ("open_clip", _get("provenance", "open_clip")),
    ("numpy", _get("provenance", "numpy")),
    ("python", _get("provenance", "python")),
    ("git sha", lambda r: _short(_get("provenance", "git_sha")(r))),
    ("device", _get("provenance", "device")),
    ("dtype", _get("provenance", "dtype")),
    ("batch size", _get("provenance", "batch_size")),
    ("seed", _get("provenance", "seed")),
    ("method", _get("protocol", "method")),
    ("head", lambda r: (_section(r, "method").get("head") or {}).get("head")),
    ("template set", _get("protocol", "template_set")),
    ("templates", _get("protocol", "n_templates")),
    ("confidence", _get("protocol", "confidence")),
    ("ECE bins", _get("protocol", "ece_bins")),
    ("bootstrap resamples", _get("protocol", "bootstrap")),
    ("interval level", _alpha_level),
    ("scored classes", _scored_classes),
    ("headline", _summary),
    ("ID dataset (OOD AUROC)", _get("protocol", "id_dataset")),
    ("arch", _get("provenance", "arch")),
    ("pretrained", _get("provenance", "pretrained")),
    ("logit scale", _logit_scale),
    ("weights hash", lambda r: _short(_get("provenance", "weights_hash")(r))),
    ("data manifest", lambda r: _short(_get("data", "manifest_hash")(r))),
    ("images", _get("data", "n")),
    ("undecodable images", _get("data", "n_bad")),
]
# Protocol keys shown through PROVENANCE_FIELDS (or in the metric definitions); any other
# protocol key is listed under its own name. A method's knobs (WiSE-FT alpha, fine-tuning
# options, a fitted temperature) live in the record's own ``method`` section.
_KNOWN_PROTOCOL = {"version", "method", "template_set", "n_templates", "confidence", "ece_bins",
                   "bootstrap", "interval_level", "seed", "scored_classes", "n_classes_scored",
                   "summary", "summary_groups", "id_dataset", "auroc", "ood_auroc"}


def _text(value: Any, limit: int = 160) -> str:
    if value is None:
        return DASH
    if isinstance(value, float):
        return f"{value:.6g}"
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def provenance_view(anchor: str, records: Sequence[dict], models: Sequence[str],
                    datasets: Sequence[str]) -> tuple[list[tuple[str, str]], Table | None]:
    """Fields with one value across the suite (``common``) and a per-cell table of the rest."""
    extra = sorted({k for r in records for k in _section(r, "protocol")} - _KNOWN_PROTOCOL)
    fields = PROVENANCE_FIELDS + [(k, _get("protocol", k)) for k in extra]
    if any(_generated(r) for r in records):  # only suites with a generated -C set get the row
        fields.append(("generated -C set", _generated))
    order = {(m, d): i for i, (m, d) in enumerate((m, d) for m in models for d in datasets)}
    recs = sorted(records, key=lambda r: order.get((str(r["model"]), str(r["dataset"])), 0))
    values = {label: [_text(get(r)) for r in recs] for label, get in fields}
    common = [(label, vals[0]) for label, vals in values.items() if len(set(vals)) == 1]
    varying = [label for label, vals in values.items() if len(set(vals)) > 1]
    if not varying:
        return common, None
    rows = [Row([str(r["model"]), str(r["dataset"])],
                [Cell(values[label][i], None) for label in varying]) for i, r in enumerate(recs)]
    for row in rows:  # text columns sort by their text
        for c in row.cells:
            c.title = c.text
    table = Table(f"{anchor}-provenance",
                  [Column("model", numeric=False, key="model"),
                   Column("dataset", numeric=False, key="dataset")],
                  [Column(label, numeric=False, key=label) for label in varying], rows)
    return common, table


def analysis_view(anchor: str, name: str, doc: dict, models: Sequence[str],
                  datasets: Sequence[str], cells: dict[tuple[str, str], dict],
                  styles: dict[str, dict[str, Any]]) -> AnalysisView:
    from robench.analysis import stale_cells
    from robench.report import views

    comps = doc.get("comparisons") or []
    refs = sorted({c["reference"] for c in comps})
    settings = doc.get("settings") or {}
    how = (f"the suite's reference {settings['reference']}" if settings.get("reference") else
           "each model's zero-shot counterpart (same backbone)")
    note = (f"Each model against {how}: {', '.join(refs)}. " if refs else "") + (
        "Deltas are model minus reference on the same samples (paired by sample id, or by row "
        "after checking labels); intervals are 95% paired-bootstrap intervals (stratified by "
        "corruption group for -C sets); a delta whose interval excludes 0 is shown in bold.")
    er = doc.get("effective_robustness") or {}
    er_charts = [c for d, fit in sorted((er.get("fits") or {}).items())
                 if (c := views.er_chart(name, er["id_dataset"], d, fit, er.get("models") or {},
                                         models, styles, (er.get("x_axis") or {}).get(d)))]
    rel = doc.get("reliability") or {}
    reliability = [c for d in datasets if (c := views.reliability_chart(
        d, models, {m: rel[m][d] for m in models if d in rel.get(m, {})},
        {m: number(cells[(m, d)]["metrics"].get("ece")) for m in models if (m, d) in cells},
        styles))]
    return AnalysisView(views.delta_table(anchor, comps, models, datasets), note, er_charts,
                        views.mce_view(anchor, doc.get("mce") or {}, models), reliability,
                        [str(n) for n in doc.get("notes") or []], stale_cells(doc, cells))


def suite_view(name: str, records: list[dict], taken: set[str],
               analysis: dict | None = None) -> SuiteView:
    anchor = slug(f"suite-{name}", taken)
    cells = _by_cell(records)
    datasets = sorted({str(r["dataset"]) for r in records})
    avg = shift_average(records)
    by = list(avg.datasets) or datasets  # a suite of its ID set alone: by that set
    models = model_order({str(r["model"]) for r in records}, by, cells)
    styles = model_styles(models)
    breakdowns = [b for d in datasets
                  if (b := breakdown_view(slug(f"{anchor}-{d}", taken), d, models, cells, styles))]
    common, varying = provenance_view(anchor, records, models, datasets)
    er = ((analysis or {}).get("effective_robustness") or {})
    order = (f"Models are ordered by {avg.label}, the {avg.describe()}." if avg.datasets else
             f"Models are ordered by top-1 accuracy on {', '.join(by)}.")
    return SuiteView(name, anchor, models, datasets, len(records),
                     leaderboard_table(anchor, models, datasets, cells, er, avg),
                     scatter_chart(name, models, records, styles), breakdowns, common, varying,
                     analysis_view(anchor, name, analysis, models, datasets, cells, styles)
                     if analysis else None, order)


def metric_definitions(records: Sequence[dict]) -> list[dict[str, str]]:
    """One entry per metric key found in the records (intervals folded into their metric)."""
    present = {k for r in records for k in r["metrics"]}
    present |= {k for r in records for g in (r.get("groups") or {}).values() for k in g}
    boots = sorted({str(_section(r, "protocol").get("bootstrap")) for r in records} - {"None"})
    levels = sorted({_alpha_level(r) for r in records} - {DASH}) or ["95%"]
    level = " / ".join(levels)
    intervals = {
        "acc1": f"Clopper-Pearson (exact binomial), {level}",
        "ece": f"percentile bootstrap over samples ({', '.join(boots) or '?'} resamples, seeded), "
               f"{level}",
        "auroc": f"percentile bootstrap over samples ({', '.join(boots) or '?'} resamples, "
                 f"seeded), {level}",
    }
    out = []
    for key, info in RECORD_METRIC_INFO.items():
        if key not in present or key.endswith(("_ci_low", "_ci_high")):
            continue
        better = {"higher": "higher", "lower": "lower"}.get(info.direction or "", DASH)
        out.append({"key": key, "description": info.description, "better": better,
                    "interval": intervals.get(key, DASH)})
    return out


# --------------------------------------------------------------------------------------------
# CSV and Markdown
# --------------------------------------------------------------------------------------------


def csv_frame(records: list[dict], groups: bool = False) -> pd.DataFrame:
    """Every metric of every cell, headline metrics and their intervals first; with ``groups``
    also a row per group of a -C record (column ``group``, "" on the headline row)."""
    frame = to_frame(records, groups=groups)
    lead = ["suite", "model", "dataset"] + (["group"] if groups else []) + ["method", "n"]
    first = [c for k in HEADLINE for c in (k, f"{k}_ci_low", f"{k}_ci_high") if c in frame]
    rest = sorted(c for c in frame if c not in lead and c not in first)
    return csv_safe(frame[lead + first + rest])  # a name is never a spreadsheet formula


def markdown(suites: Sequence[SuiteView], records: list[dict], title: str,
             analyses: dict[str, dict] | None = None) -> str:
    """Per suite, one row per cell with the headline metrics as shown in the HTML."""
    by_suite: dict[str, dict[tuple[str, str], dict]] = defaultdict(dict)
    for r in records:
        by_suite[str(r["suite"])][(str(r["model"]), str(r["dataset"]))] = r
    parts = [f"# {md_escape(title)}", ""]
    for s in suites:
        cells = by_suite[s.name]
        with_ood = any("ood_auroc" in r["metrics"] for r in cells.values())
        fmts = [f for f in LEADERBOARD_METRICS if f.key != "ood_auroc" or with_ood]
        rows = []
        for m in s.models:
            for d in s.datasets:
                if (m, d) not in cells:
                    continue
                rec = cells[(m, d)]
                row = {"model": md_escape(m), "dataset": md_escape(d),
                       "method": md_escape(str(_section(rec, "protocol").get("method") or DASH)),
                       "n": rec["metrics"].get("n", DASH)}
                for f in fmts:
                    row[f.label] = metric_cell(rec["metrics"], f).full_text
                rows.append(row)
        parts += [f"## {md_escape(s.name)}", "",
                  pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]
        for heading, table in average_tables(list(cells.values()), "md", digits=1):
            parts += [f"### {md_escape(heading)}", "", table, ""]
        doc = (analyses or {}).get(s.name)
        if doc:
            from robench.results import analysis_tables

            for heading, table in analysis_tables(doc, "md"):
                parts += [f"### {md_escape(heading)}", "", table, ""]
    parts += ["Intervals (95%): acc1 Clopper-Pearson, ECE and AUROC the seeded bootstrap "
              "(percentile interval shifted by the replicates' bias). Datasets with groups (-C "
              "sets) show the mean over groups, its intervals from the bootstrap over base "
              f"images (all copies of an image drawn together). {DASH} = undefined (null in the "
              "record). Full numbers: leaderboard.csv.", ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _environment() -> jinja2.Environment:
    # autoescape=True outright (not by extension): every value in the page, model names
    # included, is user-controlled text.
    return jinja2.Environment(loader=jinja2.PackageLoader("robench.report", "templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True)


WRITE_FIX = ("write the report to a folder on a writable disk with free space (robench report "
             "--out DIR)")


def _write_text(path: Path, text: str) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    atomic_write(path, write)


def render_report(results_dir: str | Path, out_dir: str | Path, title: str | None = None,
                  groups: bool = False) -> Path:
    """Render ``index.html``, ``leaderboard.csv`` and ``leaderboard.md`` from the records under
    ``results_dir`` into ``out_dir`` (created if needed); return the path of ``index.html``.

    Raises :class:`~robench.errors.RobenchError` when there is no record, or naming a record that
    cannot be read.
    """
    records = load_records(results_dir)
    analyses = load_analyses(results_dir)
    title = title or DEFAULT_TITLE
    by_suite: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_suite[str(r["suite"])].append(r)
    taken: set[str] = {"metrics", "top"}
    suites = [suite_view(name, by_suite[name], taken, analyses.get(name))
              for name in sorted(by_suite)]
    created = sorted(str(r["created"]) for r in records if r.get("created"))
    html = _environment().get_template("leaderboard.html.j2").render(
        title=title, suites=suites, metrics=metric_definitions(records), dash=DASH,
        best_rule=BEST_RULE,
        source=str(results_dir), n_records=len(records),
        latest=created[-1] if created else None, version=robench.__version__)
    out = output_folder(out_dir, "report folder", WRITE_FIX)
    with writing(out, "report folder", WRITE_FIX):
        out.mkdir(parents=True, exist_ok=True)
        sweep_stale(out)  # temporaries of a killed report
        _write_text(out / "leaderboard.csv", csv_frame(records, groups).to_csv(index=False))
        _write_text(out / "leaderboard.md", markdown(suites, records, title, analyses))
        index = out / "index.html"
        _write_text(index, html)  # last: an index.html on disk implies its companions are there
    return index
