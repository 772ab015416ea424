"""The report's views of a suite's analysis (``analysis.json``, :mod:`robench.analysis`):
paired-delta and mCE tables, the effective-robustness scatter on logit axes, reliability
diagrams per cell, and per-corruption severity small multiples. Charts are matplotlib SVGs
(:func:`robench.report.render.figure_uri`); tables are the report's sortable :class:`Table`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from robench.report import render as R  # noqa: N812

DELTA_METRICS = (R.MetricFormat("acc1", "acc1 (pts)", 1), R.MetricFormat("ece", "ECE", 3),
                 R.MetricFormat("auroc", "AUROC", 3), R.MetricFormat("ood_auroc", "OOD AUROC", 3))


def _signed(v: float, digits: int) -> str:
    return f"{v:+.{digits}f}"


def delta_cell(delta: dict | None, fmt: R.MetricFormat, reference: str) -> R.Cell:
    """``+0.27 [+0.08, +0.48]``: the paired delta and its interval; flagged when the interval
    excludes 0 (a difference the samples support)."""
    if not delta or R.number(delta.get("value")) is None:
        return R.Cell(R.DASH, None, title="no paired delta for this cell")
    v, lo, hi = (R.number(delta.get(k)) for k in ("value", "ci_low", "ci_high"))
    interval = f"[{_signed(lo, fmt.digits)}, {_signed(hi, fmt.digits)}]" \
        if lo is not None and hi is not None else ""
    clear = lo is not None and hi is not None and (lo > 0 or hi < 0)
    title = (f"{fmt.key}(model) - {fmt.key}({reference}) = {v:.6g} on the same samples"
             + (f"; 95% paired-bootstrap interval [{lo:.6g}, {hi:.6g}]" if interval else ""))
    if clear:
        title += "; the interval excludes 0"
    cell = R.Cell(_signed(v, fmt.digits), v, interval=interval, title=title, low=lo, high=hi)
    cell.significant = clear
    return cell


def delta_table(anchor: str, comparisons: Sequence[dict], models: Sequence[str],
                datasets: Sequence[str]) -> R.Table | None:
    """One row per compared model; per dataset the paired delta of each headline metric and
    the p-value of the acc1 test (McNemar's exact test on independent samples, the clustered
    McNemar test over base images on a -C set; each cell names its test)."""
    by = {(c["model"], c["dataset"]): c for c in comparisons}
    if not by:
        return None
    columns, bands, plan = [], [], []
    for d in datasets:
        here = [c for (m, dd), c in by.items() if dd == d]
        if not here:
            continue
        fmts = [f for f in DELTA_METRICS if any(f.key in c["delta"] for c in here)]
        for f in fmts:
            info = R.metric_info(f.key)
            columns.append(R.Column(f"\u0394 {f.label}", key=f"{d}/d_{f.key}",
                                    direction=info.direction if info else None,
                                    title=f"paired delta of {f.key}, model - reference, with "
                                          "its 95% paired-bootstrap interval"))
            plan.append((d, f))
        clustered = any(c["test"].get("n_clusters") for c in here)
        columns.append(R.Column("clustered McNemar p" if clustered else "McNemar p",
                                key=f"{d}/p_acc1", title=(
            "test of equal top-1 accuracy on the same samples (two-sided): "
            + ("the clustered McNemar test over base images (Durkalski et al. 2003), since "
               "the groups hold copies of the same images" if clustered else
               "McNemar's exact test"))))
        plan.append((d, None))
        bands.append((d, len(fmts) + 1))
    rows = []
    for m in models:
        refs = {c["reference"] for (mm, _), c in by.items() if mm == m}
        if not refs:
            continue
        cells = []
        for d, f in plan:
            c = by.get((m, d))
            if c is None:
                cells.append(R.Cell(R.DASH, None, title=f"{m} was not compared on {d}"))
            elif f is None:
                t = c["test"]
                over = f" over {t['n_clusters']} base images" if t.get("n_clusters") else ""
                cells.append(R.Cell(f"{t['p_value']:.2g}", t["p_value"], title=(
                    f"{t['test']}{over}: {t['model_only_correct']} samples only the model gets "
                    f"right, {t['reference_only_correct']} only the reference; p = "
                    f"{t['p_value']:.4g}")))
            else:
                cells.append(delta_cell(c["delta"].get(f.key), f, c["reference"]))
        rows.append(R.Row([m, ", ".join(sorted(refs))], cells))
    if not rows:
        return None
    return R.Table(f"{anchor}-deltas", [R.Column("model", numeric=False, key="model"),
                                        R.Column("reference", numeric=False, key="reference")],
                   columns, rows, bands)


def mce_view(anchor: str, mces: dict, models: Sequence[str]) -> R.Table | None:
    """mCE and relative mCE (%, lower is better) per model, one band per -C dataset."""
    datasets = sorted(mces)
    if not datasets:
        return None
    columns, bands = [], []
    for d in datasets:
        base = next(iter(mces[d].values()))["baseline"]
        for key, label in (("mce", "mCE (%)"), ("relative_mce", "relative mCE (%)")):
            columns.append(R.Column(label, key=f"{d}/{key}", direction="lower", title=(
                f"{label} normalised by {base} (Hendrycks & Dietterich 2019); 100 = {base}")))
        bands.append((f"{d} (baseline {base})", 2))
    rows = []
    for m in models:
        if not any(m in mces[d] for d in datasets):
            continue
        cells = []
        for d in datasets:
            v = mces[d].get(m) or {}
            for key in ("mce", "relative_mce"):
                x = R.number(v.get(key))
                cells.append(R.Cell(R.DASH if x is None else f"{x:.1f}", x, title=(
                    f"{key} = {x:.6g}; baseline: {v.get('baseline_source', '')}"
                    if x is not None else f"{key} undefined (no clean accuracy paired)")))
        rows.append(R.Row([m], cells))
    return R.Table(f"{anchor}-mce", [R.Column("model", numeric=False, key="model")], columns,
                   rows, bands)


# --------------------------------------------------------------------------------------------
# Charts
# --------------------------------------------------------------------------------------------

_PCT = FuncFormatter(lambda v, _: f"{100 * v:.3g}")
# Small multiples carry hundreds of labels: as SVG <text> (drawn in the browser's sans-serif)
# they cost a fifth of the bytes of glyph outlines and stay byte-identical run to run.
_RC_TEXT = {**R._RC, "svg.fonttype": "none", "font.family": "sans-serif"}


def _lg(p: float) -> float:
    return math.log(p / (1 - p))


def _sig(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _logit_limits(values: np.ndarray) -> list[float]:
    """Axis limits around ``values`` (fractions), padded in logit units."""
    lo, hi = _lg(float(values.min())), _lg(float(values.max()))
    pad = max(0.5 * (hi - lo), 0.15)
    return [float(_sig(np.array(lo - pad))), float(_sig(np.array(hi + pad)))]


def er_chart(suite: str, id_ds: str, ood: str, fit: dict, per_model: dict[str, dict],
             models: Sequence[str], styles: dict[str, dict[str, Any]],
             x_axis: str | None = None) -> R.Chart | None:
    """OOD vs ID accuracy on logit axes: one point per model, the fit line with its confidence
    band, and y = x. ``x_axis`` describes the ID accuracy (over the shifted set's classes)."""
    pts = {m: per_model[m][ood] for m in models if ood in per_model.get(m, {})}
    pts = {m: v for m, v in pts.items() if 0 < v["id_acc"] < 100 and 0 < v["ood_acc"] < 100}
    if not pts:
        return None
    xs = np.array([v["id_acc"] for v in pts.values()]) / 100
    ys = np.array([v["ood_acc"] for v in pts.values()]) / 100
    xlim, ylim = _logit_limits(xs), _logit_limits(ys)
    with rc_context(_RC_TEXT):
        fig = Figure(figsize=(5.6, 4.6 + 0.18 * math.ceil(len(pts) / 3)))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        grid = np.linspace(_lg(xlim[0]), _lg(xlim[1]), 200)
        ax.plot(_sig(grid), _sig(fit["slope"] * grid + fit["intercept"]), color="#2557a7",
                linewidth=1.4, label=R.plain_label(
                    f"fit: logit(OOD) = {fit['slope']:.3f} logit(ID) {fit['intercept']:+.3f}"))
        if None not in (fit.get("s2"), fit.get("sxx"), fit.get("t")) and fit.get("sxx"):
            half = fit["t"] * np.sqrt(fit["s2"] * (1 / fit["n"] + (grid - fit["x_mean"]) ** 2
                                                   / fit["sxx"]))
            line = fit["slope"] * grid + fit["intercept"]
            ax.fill_between(_sig(grid), _sig(line - half), _sig(line + half), color="#2557a7",
                            alpha=0.12, linewidth=0, label="95% band of the fit")
        ax.plot(_sig(grid), _sig(grid), color="#888", linestyle="--", linewidth=1,
                label="y = x (no drop)")
        for m, v in pts.items():
            ref = v.get("in_reference")
            ax.scatter([v["id_acc"] / 100], [v["ood_acc"] / 100], s=40, zorder=3,
                       label=R.plain_label(m), edgecolors=styles[m]["color"], linewidths=1.2,
                       facecolors=styles[m]["color"] if ref else "none",
                       marker=styles[m]["marker"])
        ax.set_xscale("logit")
        ax.set_yscale("logit")
        ax.set_xlim(xlim)
        ax.set_ylim(ylim)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(_PCT)
            axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel(R.plain_label(f"{x_axis or id_ds + ' top-1'} (%, logit scale)"))
        ax.set_ylabel(R.plain_label(f"{ood} top-1 accuracy (%, logit scale)"))
        ax.set_title(R.plain_label(f"suite {suite}: effective robustness on {ood}"), fontsize=9)
        R._legend(fig, ax, len(pts) + 2)
        uri = R.figure_uri(fig)
    n_ref = len(fit.get("reference") or [])
    where = f"fit over {n_ref} reference models (filled markers)" if n_ref else \
        f"shipped fit: {fit.get('source')}"
    if fit.get("r2") is not None:
        where += f", R^2 = {fit['r2']:.2f}"
    if fit.get("weak"):
        where += f". The fit is too weak to read: {fit['weak']}"
    if ylim[1] < xlim[0]:
        where += "; y = x lies above this view (every model loses accuracy under the shift)"
    return R.Chart(uri, alt=f"scatter of {ood} against {id_ds} top-1 accuracy on logit axes for "
                   f"{len(pts)} models, with the effective-robustness fit line and y = x",
                   caption=f"{where}. A model above the line is more robust than its "
                   f"{id_ds} accuracy predicts; its vertical distance to the line (in accuracy "
                   "points) is its effective robustness.")


def reliability_chart(dataset: str, models: Sequence[str], bins: dict[str, dict],
                      ece: dict[str, float | None], styles: dict[str, dict[str, Any]]
                      ) -> R.Chart | None:
    """One reliability diagram per model on ``dataset``: accuracy per confidence bin (bars)
    against the diagonal, mean confidence marked, and the bin counts underneath."""
    shown = [m for m in models if m in bins]
    if not shown:
        return None
    cols = min(3, len(shown))
    nrows = math.ceil(len(shown) / cols)
    with rc_context(_RC_TEXT):
        fig = Figure(figsize=(3.1 * cols, 3.3 * nrows))
        FigureCanvasAgg(fig)
        outer = fig.add_gridspec(nrows, cols, hspace=0.55, wspace=0.3)
        for i, m in enumerate(shown):
            b = bins[m]
            k = int(b["n_bins"])
            edges = np.linspace(0, 1, k + 1)
            centers, width = (edges[:-1] + edges[1:]) / 2, 1 / k
            inner = outer[i // cols, i % cols].subgridspec(2, 1, height_ratios=[3, 1],
                                                             hspace=0.08)
            ax, axc = fig.add_subplot(inner[0]), fig.add_subplot(inner[1])
            acc = np.array([np.nan if a is None else a for a in b["accuracy"]], dtype=float)
            conf = np.array([np.nan if c is None else c for c in b["confidence"]], dtype=float)
            count = np.array(b["count"], dtype=float)
            ax.bar(centers, np.nan_to_num(acc), width=width * 0.92, color=styles[m]["color"],
                   alpha=0.75, label="accuracy")
            ax.scatter(centers, conf, s=10, color="#222", zorder=3, label="mean confidence")
            ax.plot([0, 1], [0, 1], color="#888", linestyle="--", linewidth=0.9)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_xticklabels([])
            e = ece.get(m)
            ax.set_title(R.plain_label(m + (f"  (ECE {e:.3f})" if e is not None else "")),
                         fontsize=8)
            if i % cols == 0:
                ax.set_ylabel("accuracy")
            axc.bar(centers, count, width=width * 0.92, color="#9aa3af")
            axc.set_xlim(0, 1)
            axc.set_yscale("log" if count.max() > 50 * max(1.0, np.median(count[count > 0]))
                           else "linear")
            axc.set_xlabel("confidence (MSP)")
            if i % cols == 0:
                axc.set_ylabel("count", fontsize=8)
            axc.tick_params(labelsize=7)
        fig.suptitle(R.plain_label(f"{dataset}: reliability, one diagram per model"),
                     fontsize=10)
        uri = R.figure_uri(fig)
    return R.Chart(uri, alt=f"{dataset}: reliability diagrams of {len(shown)} models, accuracy "
                   "per confidence bin against the diagonal, with the number of samples per bin",
                   caption="Bars: accuracy of the samples in each equal-width confidence bin "
                   "(the ECE's bins); dots: their mean confidence; dashed: perfect calibration. "
                   "Bars below the diagonal are over-confident. Underneath: samples per bin. "
                   "A -C set pools the samples of the headline's groups; the ECE in each title "
                   "is the cell's headline ECE (for a -C set the mean of its groups' ECEs, not "
                   "the ECE of the pooled diagram).")


def corruption_grid(dataset: str, models: Sequence[str], corruptions: Sequence[str],
                    severities: Sequence[str], values: dict[str, dict[str, list[float | None]]],
                    styles: dict[str, dict[str, Any]], metric: str, label: str) -> R.Chart:
    """One small multiple per corruption: ``metric`` against severity, one line per model,
    shared y axis (``values[model][corruption]`` per severity)."""
    cols = min(5, len(corruptions))
    nrows = math.ceil(len(corruptions) / cols)
    with rc_context(_RC_TEXT):
        fig = Figure(figsize=(2.2 * cols, 1.9 * nrows + 0.5 + 0.18 * math.ceil(len(models) / 4)))
        FigureCanvasAgg(fig)
        axes = np.atleast_1d(fig.subplots(nrows, cols, sharex=True, sharey=True)).ravel()
        x = np.arange(len(severities))
        for ax, c in zip(axes, corruptions, strict=False):
            for m in models:
                y = np.array([np.nan if v is None else v for v in values[m].get(c, [])] or
                             [np.nan] * len(x), dtype=float)
                # lines only: 15 panels x models x severities of markers would triple the SVG
                ax.plot(x, y, linewidth=1.1, label=R.plain_label(m), color=styles[m]["color"])
            ax.set_title(R.plain_label(c.replace("_", " ")), fontsize=8)
            ax.set_xticks(x, [str(s) for s in severities])
            ax.tick_params(labelsize=7)
            ax.yaxis.set_major_locator(MaxNLocator(4))
        for ax in axes[len(corruptions):]:
            ax.set_visible(False)
        for ax in axes[::cols]:
            ax.set_ylabel(label, fontsize=8)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(4, max(len(models), 1)),
                   frameon=False, fontsize=7, bbox_to_anchor=(0.5, -0.01))
        fig.suptitle(R.plain_label(f"{dataset}: {label} by corruption (x: severity)"),
                     fontsize=10)
        fig.tight_layout(rect=(0, 0.04 + 0.05 * math.ceil(len(models) / 4), 1, 1))
        uri = R.figure_uri(fig)
    return R.Chart(uri, alt=f"{dataset}: {label} against severity, one small chart per "
                   f"corruption ({len(corruptions)}), one line per model",
                   caption=f"{label} against severity (1 = mildest), one panel per corruption, "
                   "same y axis everywhere; one line per model.")
