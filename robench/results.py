"""Result records: one JSON per (suite, model, dataset), written atomically, plus per-sample
outputs beside it (``robench.scoring.CellOutputs``); and their aggregation into pandas tables."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robench.errors import RobenchError
from robench.io import file_sha256, jsonable, write_json

SCHEMA_VERSION = 2  # 2: exact per-sample outputs, method section, max_cal_err
# The headline columns of the leaderboard, in order.
HEADLINE = ["acc1", "acc5", "ece", "auroc", "nll", "brier", "aupr_err", "fpr95", "ood_auroc"]
# Beside a suite's model folders: the cross-cell analyses (robench.analysis), not a record. A
# dataset may therefore not be called "analysis" (its record would have this name).
ANALYSIS_FILE = "analysis.json"


def record_path(results_dir: str | Path, suite: str, model: str, dataset: str) -> Path:
    """``results_dir/suite/model/dataset.json``; each name is checked to stay inside."""
    from robench.registry import check_name

    if dataset == Path(ANALYSIS_FILE).stem:
        raise RobenchError(f"dataset name {dataset!r} is reserved: {ANALYSIS_FILE} holds a "
                           "suite's cross-cell analyses", "rename the dataset")
    return (Path(results_dir) / check_name("suite", suite) / check_name("model", model)
            / f"{check_name('dataset', dataset)}.json")


def clean(value: Any) -> Any:
    """NaN -> None so records are strict JSON (a degenerate metric is ``null``)."""
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.floating):
        return clean(float(value))
    if isinstance(value, np.integer):
        return int(value)
    return value


# A path in a record names the folder it lies under, not this machine's absolute path:
# "<cache_dir>/corrupted/a4a3...", "<data_root>/imagenet-r", "assets:cifar10-subset/test" (the
# registry's own scheme for data shipped with robench). A record is copied between machines and
# committed; the manifest hash, not the path, is the data's identity.
CACHE_DIR, DATA_ROOT, ASSETS_SCHEME = "<cache_dir>", "<data_root>", "assets:"
LOCAL_DIR = "local-dir:"  # open_clip's prefix of a checkpoint folder, kept in front


def path_roots(data_root: str | Path, cache_dir: str | Path) -> dict[str, Path]:
    """The named folders a record's paths are written relative to (see :func:`portable_path`)."""
    from robench.registry import ASSETS

    return {ASSETS_SCHEME: ASSETS, CACHE_DIR: Path(cache_dir).expanduser(),
            DATA_ROOT: Path(data_root).expanduser()}


def _forms(path: str | Path) -> set[str]:
    """The absolute forms of a path: as given (made absolute) and with links resolved, so a
    cache reached through a symlink (/tmp -> /private/tmp) still matches."""
    return {os.path.abspath(path), os.path.realpath(path)}


def portable_path(text: str, roots: dict[str, Path]) -> str:
    """``text`` written relative to the deepest of ``roots`` that holds it (``<name>/rel``, or
    ``assets:rel`` for the shipped assets); a path under none of them, or no absolute path at
    all, is returned unchanged (a dataset the user placed elsewhere keeps its given path)."""
    prefix = LOCAL_DIR if text.startswith(LOCAL_DIR) else ""
    path = text[len(prefix):]
    if not os.path.isabs(path):
        return text
    best: tuple[int, str, str] | None = None
    for name, root in roots.items():
        for r in _forms(root):
            for p in _forms(path):
                if p == r or p.startswith(r.rstrip(os.sep) + os.sep):
                    rel = os.path.relpath(p, r)
                    if best is None or len(r) > best[0]:
                        best = (len(r), name, "" if rel == "." else rel)
    if best is None:
        return text
    _, name, rel = best
    sep = "" if name.endswith(":") or not rel else "/"
    return f"{prefix}{name}{sep}{Path(rel).as_posix() if rel else ''}"


def portable_paths(value: Any, roots: dict[str, Path]) -> Any:
    """``value`` (a record or any part of it) with every absolute path under ``roots`` made
    relative by :func:`portable_path`; other values unchanged."""
    if isinstance(value, dict):
        return {k: portable_paths(v, roots) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable_paths(v, roots) for v in value]
    return portable_path(value, roots) if isinstance(value, str) else value


def portable_record(record: dict, data_root: str | Path, cache_dir: str | Path) -> dict:
    """A new record whose paths under ``data_root``, ``cache_dir`` or the shipped assets are
    written relative to them (:func:`portable_path`); ``data.root``, which a loader may hold
    relative to the working directory, is made absolute first so it gets its ``<data_root>``
    form too. Nothing reads these paths back: they say where the data was, the manifest hash
    what it was."""
    data = record.get("data")
    root = data.get("root") if isinstance(data, dict) else None
    if isinstance(root, str) and root and not root.startswith(ASSETS_SCHEME):
        record = {**record, "data": {**data, "root": os.path.abspath(root)}}
    return portable_paths(record, path_roots(data_root, cache_dir))


def write_record(path: Path, record: dict, outputs: Any) -> None:
    """Per-sample outputs first, record last: a record on disk implies its outputs are there
    too. ``outputs`` is a :class:`robench.scoring.CellOutputs`. The record carries the sha256 of
    its outputs file and of itself (``integrity``), checked by :func:`read_record`."""
    npz = path.with_suffix(".npz")
    outputs.save(npz)
    write_record_json(path, {**record, "outputs": {**record.get("outputs", {}),
                                                   "sha256": file_sha256(npz)}})


def write_record_json(path: Path, record: dict) -> None:
    """The record alone (strict JSON, schema version, its own checksum), atomically."""
    write_json(path, seal_record(clean({"schema": SCHEMA_VERSION, **record})), seal=False)


def record_digest(record: dict) -> str:
    """sha256 of a record's canonical JSON (sorted keys, compact), ``integrity`` left out."""
    body = {k: v for k, v in record.items() if k != "integrity"}
    text = json.dumps(json.loads(json.dumps(body, default=jsonable)), sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def seal_record(record: dict) -> dict:
    """The record with its own checksum (a record is a result a person may copy around on its
    own, so it carries the checksum inside rather than in a sidecar file)."""
    return {**record, "integrity": {"sha256": record_digest(record)}}


RERUN_FIX = ("re-run its cell (robench run suite=...: a damaged record's cell is pending) or "
             "remove the file")


def read_record(path: Path, verify: bool = True) -> dict:
    """A result record, checked to be one and, with ``verify`` (the default, and the path of
    every reader: ``robench results``, ``report``, ``check``, ``analyze``, the API, a resumed
    run), checked for bytes and for meaning: its checksum (:func:`check_integrity`), and its
    metrics against the per-sample outputs beside it (:func:`check_meaning`), because a plain
    checksum is as easy to rewrite as the number it guards. Only a reader that rewrites a record
    from its outputs (``robench rescore``) reads it unverified."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise RobenchError(f"cannot read result record {path}: {e}", RERUN_FIX) from e
    missing = [k for k in ("model", "dataset", "metrics") if not isinstance(record, dict)
               or k not in record]
    if missing:
        raise RobenchError(f"{path} is not a robench result record (no {', '.join(missing)})",
                           "keep only robench records (and their .npz outputs) in a results "
                           "folder, or point at the folder that holds them")
    if verify:
        check_integrity(record, path)
        check_meaning(path, record)
    return record


def check_integrity(record: dict, path: Path) -> None:
    """Refuse a record without a checksum or one that fails it (edited or damaged)."""
    stored = (record.get("integrity") or {}).get("sha256")
    if stored is None:
        raise RobenchError(f"result record {path} has no checksum (written by an older "
                           "robench)", "robench rescore --dir <folder> rewrites records "
                           "with checksums; or " + RERUN_FIX)
    if stored != record_digest(record):
        raise RobenchError(f"result record {path} fails its checksum: it was edited or "
                           "damaged after it was written", RERUN_FIX)


def verify_outputs(path: Path, record: dict) -> Path:
    """The per-sample outputs file beside the record at ``path``, checked against the digest the
    record holds (records of older robench versions hold none)."""
    npz = Path(path).with_suffix(".npz")
    want = (record.get("outputs") or {}).get("sha256")
    if want is None:
        return npz
    try:
        have = file_sha256(npz)
    except OSError as e:
        raise RobenchError(f"per-sample outputs {npz} cannot be read: {e.strerror}",
                           "re-run its cell (robench run suite=...)") from e
    if have != want:
        raise RobenchError(f"per-sample outputs {npz} fail the checksum in {Path(path).name} "
                           "(damaged or replaced)", "re-run its cell (robench run suite=...)")
    return npz


def load_outputs(path: Path, record: dict | None = None) -> Any:
    """The verified per-sample outputs (:class:`robench.scoring.CellOutputs`) of a record."""
    from robench.scoring import CellOutputs

    record = record if record is not None else read_record(path)
    return CellOutputs.load(verify_outputs(path, record))


# --------------------------------------------------------------------------------------------
# Meaning: a record's metrics are what its per-sample outputs give
# --------------------------------------------------------------------------------------------

# How far a stored metric may lie from its recomputation from the per-sample outputs, relative
# to max(1, |value|). The run and every reader share robench.scoring.cell_metrics, so on the
# machine that wrote a record the two are bit-identical (every point value of the committed
# quickstart records is); the tolerance only absorbs last-bit differences of numpy's vectorised
# exp / log on another CPU, far below any printed digit (DESIGN rule 7: 1e-9).
MEANING_TOL = 1e-9
INTERVAL_SUFFIXES = ("_ci_low", "_ci_high")
MEANING_FIX = ("the record was edited after its cell was scored: restore it as written, or "
               "re-run its cell (robench run suite=...: a refused record's cell is recomputed); "
               "robench rescore --verify --dir <folder> lists every disagreement")


def settings_of(record: dict) -> dict:
    """The metric settings a record was scored with (bins, bootstrap, alpha, seed, adaptive
    bin rule), from its protocol; a protocol-1 record (float16 probabilities) has none that
    reproduce it."""
    p = record.get("protocol") or {}
    if not isinstance(p, dict) or p.get("version", 1) < 2:
        version = p.get("version", 1) if isinstance(p, dict) else 1
        raise RobenchError(
            f"{record.get('model')} x {record.get('dataset')} is a protocol-{version} record "
            "(float16 probabilities), which cannot be re-scored exactly",
            "re-run the suite (robench run suite=...): cells of older protocols are recomputed")
    try:  # records written before the bin rule was an option were scored with robench's own
        return {"n_bins": int(p["ece_bins"]), "bootstrap": int(p["bootstrap"]),
                "alpha": round(1 - float(p["interval_level"]), 12),
                "seed": int(p.get("seed", 0)),
                "adaptive_bins": str(p.get("adaptive_bins") or "robench")}
    except (KeyError, TypeError, ValueError) as e:
        raise RobenchError(f"{record.get('model')} x {record.get('dataset')}: the record's "
                           f"protocol lacks its metric settings ({e})", RERUN_FIX) from e


def recompute_metrics(record: dict, outputs: Any, n_bootstrap: int | None = 0,
                      **overrides: Any) -> tuple[dict, dict | None]:
    """(headline, groups) of ``outputs`` under the record's own settings (``overrides`` change
    some), NaN as None like a stored record. ``n_bootstrap=0``: every point value exactly as the
    run computed it, and acc1's Clopper-Pearson intervals, in milliseconds; the bootstrap
    intervals come out None. ``None``: the record's own resamples (the full recomputation)."""
    from robench.scoring import cell_metrics

    s = {**settings_of(record), **{k: v for k, v in overrides.items() if v is not None}}
    headline, groups = cell_metrics(
        outputs, (record.get("protocol") or {}).get("summary_groups"), n_bins=s["n_bins"],
        n_bootstrap=s["bootstrap"] if n_bootstrap is None else n_bootstrap, seed=s["seed"],
        alpha=s["alpha"], adaptive_bins=s["adaptive_bins"])
    return clean(headline), clean(groups)


@dataclass(frozen=True)
class Disagreement:
    """One stored value its outputs do not give: ``group`` "" for the cell's headline."""

    group: str
    metric: str
    stored: Any
    recomputed: Any
    problem: str = ""  # empty: the values differ; else what is wrong (an interval, a key)

    @property
    def where(self) -> str:
        """``metrics/acc1`` or ``groups/fog/3/ece``, as ``robench rescore`` names values."""
        return "/".join(x for x in ("groups", self.group, self.metric) if x) if self.group \
            else f"metrics/{self.metric}"

    def describe(self) -> str:
        where = " ".join(x for x in (f"group {self.group}" if self.group else "",
                                     self.metric) if x)
        return f"{where}: {self.problem}" if self.problem else \
            f"{where} stored {self.stored!r}, recomputed {self.recomputed!r}"


def _agree(stored: Any, recomputed: Any) -> bool:
    """Whether a stored value is its recomputation: None for None (an undefined metric), the
    same integer for a count, floats within :data:`MEANING_TOL`."""
    if stored is None or recomputed is None:
        return stored is None and recomputed is None
    if isinstance(stored, bool) or not isinstance(stored, (int, float)):
        return False
    if isinstance(recomputed, int):
        return stored == recomputed
    return math.isfinite(stored) and \
        abs(stored - recomputed) <= MEANING_TOL * max(1.0, abs(recomputed))


def _metric_disagreements(group: str, stored: Any, new: dict, full: bool) -> list[Disagreement]:
    """What of one metrics dict (a headline or a group) its recomputation ``new`` does not
    give. ``full``: ``new`` holds bootstrap intervals too, compared like every value; else a
    bootstrap interval (None in ``new``) is only checked to hold its own estimate. A metric
    that ``new`` has and the record lacks (one added to robench since the run) is no
    disagreement: it hides no number, and ``robench rescore`` adds it."""
    if not isinstance(stored, dict):
        return [Disagreement(group, "", stored, None, "not an object of metrics")]
    out = []
    for k, v in stored.items():
        if k not in new:
            out.append(Disagreement(group, k, v, None, "not a metric of the outputs"))
        elif not full and k.endswith(INTERVAL_SUFFIXES) and new[k] is None:
            continue  # a bootstrap bound: the cheap path checks that it holds its estimate
        elif not _agree(v, new[k]):
            out.append(Disagreement(group, k, v, new[k]))
    for k in (k.removesuffix("_ci_low") for k in stored if k.endswith("_ci_low")):
        lo, v, hi = stored.get(f"{k}_ci_low"), stored.get(k), stored.get(f"{k}_ci_high")
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (lo, v, hi)) \
                and not lo <= v <= hi:
            out.append(Disagreement(group, k, [lo, hi], v,
                                    f"interval [{lo!r}, {hi!r}] does not hold its estimate "
                                    f"{v!r}"))
    return out


def disagreements(record: dict, headline: dict, groups: dict | None,
                  full: bool = False) -> list[Disagreement]:
    """Every stored value of ``record`` (headline and groups) that its recomputation
    (``headline``, ``groups`` of :func:`recompute_metrics`) does not give; ``full`` when the
    recomputation ran the record's bootstrap (``robench rescore --verify``)."""
    out = _metric_disagreements("", record.get("metrics"), headline, full)
    stored = record.get("groups") or {}
    new = groups or {}
    if not isinstance(stored, dict):
        return [*out, Disagreement("", "groups", stored, None, "not an object of groups")]
    for g in sorted(set(stored) | set(new)):
        if g not in new:
            out.append(Disagreement(g, "", None, None, "not a group of the outputs"))
        elif g not in stored:
            out.append(Disagreement(g, "", None, None, "a group of the outputs the record "
                                                       "lacks"))
        else:
            out.extend(_metric_disagreements(g, stored[g], new[g], full))
    return out


def check_meaning(path: Path, record: dict) -> None:
    """Refuse a record whose metrics are not what its per-sample outputs give: its outputs
    file must be there and match the digest the record holds (:func:`verify_outputs`), every
    point value must equal its recomputation (:func:`recompute_metrics` without the bootstrap,
    milliseconds a cell) and every interval hold its estimate. The bootstrap intervals
    themselves are recomputed by ``robench rescore --verify``."""
    npz = Path(path).with_suffix(".npz")
    cell = f"{record.get('model')} x {record.get('dataset')}"
    if not npz.is_file():
        raise RobenchError(
            f"result record {path} ({cell}) has no per-sample outputs: {npz.name} is missing "
            "beside it, so its metrics cannot be verified",
            f"restore {npz} (a record travels with its .npz), or re-run its cell "
            "(robench run suite=...)")
    headline, groups = recompute_metrics(record, load_outputs(path, record))
    found = disagreements(record, headline, groups)
    if found:
        shown = "; ".join(d.describe() for d in found[:3])
        more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
        raise RobenchError(f"result record {path} disagrees with its per-sample outputs "
                           f"{npz.name}: {cell}: {shown}{more}", MEANING_FIX)


def find_records(results_dir: str | Path, fix: str | None = None) -> list[Path]:
    """Record files under ``results_dir``; ``fix`` is the advice when the folder is missing (the
    caller knows its own option names)."""
    root = Path(results_dir)
    if not root.is_dir():
        raise RobenchError(f"results folder {root} does not exist",
                           fix or "run a suite first (robench run suite=...), which writes "
                           "runs/<suite>/, or point at the folder that holds the records")
    return sorted(p for p in root.rglob("*.json")
                  if not p.name.startswith(".") and p.name != ANALYSIS_FILE)


def to_frame(records: list[dict], groups: bool = False,
             folders: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per (suite, model, dataset) with the headline metrics and their intervals; with
    ``groups``, also one row per group of a -C record (column ``group``; "" on the headline).
    ``folders`` (each record's, see :func:`suite_folder`): when they are not all the same, a
    ``folder`` column tells apart the cells of the same suite read from two folders."""
    folders = folders if folders is not None and len(set(folders)) > 1 else None
    rows = []
    for i, r in enumerate(records):
        lead = {"suite": r["suite"], "model": r["model"], "dataset": r["dataset"],
                **({"folder": folders[i]} if folders else {}),
                "method": (r.get("protocol") or {}).get("method")}
        parts = [("", r["metrics"])]
        if groups:
            parts += sorted((r.get("groups") or {}).items(), key=lambda kv: _group_key(kv[0]))
        for g, metrics in parts:
            row = {**lead, **({"group": g} if groups else {}), "n": metrics.get("n")}
            row.update({k: v for k, v in metrics.items() if k != "n"})
            rows.append(row)
    frame = pd.DataFrame(rows)
    order = ["suite", "model", "dataset"] + (["folder"] if folders else [])
    # stable: a record's groups stay in severity order under their headline row
    return frame.sort_values(order, kind="stable").reset_index(drop=True)


def _group_key(name: str) -> tuple:
    corruption, _, sev = str(name).rpartition("/")
    try:
        return (corruption or str(name), float(sev), "")
    except ValueError:
        return (str(name), math.inf, sev)


def protocol_version(record: dict) -> int:
    return int((record.get("protocol") or {}).get("version", 1))


def check_protocols(records: list[dict], where: str | Path) -> None:
    """Refuse to put records of different protocol versions in one table: older records
    (float16 per-sample probabilities, 1000-way ID side of ood_auroc) are not comparable."""
    versions = sorted({protocol_version(r) for r in records})
    if len(versions) > 1:
        old = sorted({f"{r['model']} x {r['dataset']}" for r in records
                      if protocol_version(r) < versions[-1]})
        raise RobenchError(
            f"{where} mixes records of protocol versions {versions}; older cells: "
            f"{', '.join(old[:5])}{' ...' if len(old) > 5 else ''}",
            "re-run the suite over the same results_dir (older cells are recomputed) or keep "
            "the old records in another folder")


def load_records(results_dir: str | Path, fix: str | None = None) -> list[dict]:
    return [r for _, r in load_located(results_dir, fix)]


def load_located(results_dir: str | Path, fix: str | None = None) -> list[tuple[Path, dict]]:
    """Every record under ``results_dir`` with the path it was read from."""
    paths = find_records(results_dir, fix)
    records = [read_record(p) for p in paths]
    if not records:
        raise RobenchError(f"no result records under {results_dir}",
                           fix or "run a suite first (robench run suite=...)")
    check_protocols(records, results_dir)
    return list(zip(paths, records, strict=True))


def suite_folder(path: Path, results_dir: str | Path) -> str:
    """The folder of the suite a record file belongs to (``<folder>/<model>/<dataset>.json``),
    relative to ``results_dir`` ("." when it is ``results_dir`` itself)."""
    folder = Path(path).parent.parent
    try:
        return folder.relative_to(results_dir).as_posix()
    except ValueError:
        return str(folder)


def load_frame(results_dir: str | Path, fix: str | None = None,
               groups: bool = False) -> pd.DataFrame:
    located = load_located(results_dir, fix)
    return to_frame([r for _, r in located], groups=groups,
                    folders=[suite_folder(p, results_dir) for p, _ in located])


# Decimals of each metric in every printed table (values, intervals and deltas alike).
DECIMALS = {"acc1": 2, "acc5": 2, "er": 2, "mce": 2, "relative_mce": 2}
DEFAULT_DECIMALS = 4  # ECE-type fractions, AUROC-type scores, NLL, Brier


def decimals(metric: str) -> int:
    return DECIMALS.get(metric, DEFAULT_DECIMALS)


def fmt_value(metric: str, v: Any, lo: Any = None, hi: Any = None, sign: bool = False) -> str:
    """``value [lo, hi]`` at the metric's decimals (``-`` when undefined; no brackets when the
    interval is)."""
    if v is None or pd.isna(v):
        return "-"
    d = decimals(metric)
    text = f"{v:+.{d}f}" if sign else f"{v:.{d}f}"
    if lo is not None and hi is not None and pd.notna(lo) and pd.notna(hi):
        text += f" [{lo:+.{d}f}, {hi:+.{d}f}]" if sign else f" [{lo:.{d}f}, {hi:.{d}f}]"
    return text


def interval_table(frame: pd.DataFrame,
                   metrics: tuple[str, ...] = ("acc1", "acc5", "ece", "auroc", "ood_auroc"),
                   ) -> pd.DataFrame:
    """Per-cell table with each metric as ``value [ci_low, ci_high]`` where the record has an
    interval (acc1: Clopper-Pearson; ECE, AUROC: bootstrap; a -C headline, a mean over groups:
    the bootstrap over base images); a metric empty in every cell is left out. A frame with a
    ``group`` column (per-group rows) keeps it after the dataset."""
    lead = ["model", "dataset"] + [c for c in ("folder", "group") if c in frame] + ["n"]
    out = frame[lead].copy()
    for m in metrics:
        if m not in frame or not frame[m].notna().any():
            continue
        lo, hi = frame.get(f"{m}_ci_low"), frame.get(f"{m}_ci_high")
        out[m] = [fmt_value(m, v, None if lo is None else lo.iloc[i],
                            None if hi is None else hi.iloc[i])
                  for i, v in enumerate(frame[m])]
    return out


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped (as pandas escapes table cells)."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


# columns holding names read from records (every other cell is a number robench formatted)
TEXT_COLUMNS = {"model", "dataset", "group", "reference", "method", "suite", "baseline", "folder"}


def render_table(table: pd.DataFrame, fmt: str, caption: str | None = None) -> str:
    """A text table as ``table`` (aligned text), ``md`` (Markdown) or ``latex`` (booktabs
    tabular, numbers right-aligned); names are escaped in each (:mod:`robench.escape`)."""
    from robench.escape import escape_frame, md_escape, text_escape

    if fmt == "md":
        return escape_frame(table, md_escape, TEXT_COLUMNS).to_markdown(
            index=False, disable_numparse=True)
    if fmt == "latex":
        spec = "".join("l" if c in TEXT_COLUMNS else "r" for c in table.columns)
        # pandas escapes the cells, not the caption ("mCE (%; ...)", "id_dataset" would break)
        return escape_frame(table, text_escape).to_latex(
            index=False, escape=True, column_format=spec,
            caption=None if caption is None else latex_escape(caption))
    return escape_frame(table, text_escape).to_string(index=False)


def comparison_table(doc: dict) -> pd.DataFrame:
    """Paired deltas (model - reference) of an analysis, one row per (model, dataset)."""
    rows = []
    for c in doc.get("comparisons") or []:
        row = {"model": c["model"], "dataset": c["dataset"], "reference": c["reference"],
               "n": c["n_paired"]}
        for m in ("acc1", "ece", "auroc", "ood_auroc"):
            d = c["delta"].get(m)
            if d is not None:
                row[f"d_{m}"] = fmt_value(m, d["value"], d["ci_low"], d["ci_high"], sign=True)
        row["p_acc1"] = f"{c['test']['p_value']:.3g}"
        row["test"] = "clustered McNemar" if c["test"].get("n_clusters") else "McNemar exact"
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.fillna("-") if len(frame) else frame


def er_table(doc: dict) -> pd.DataFrame:
    """Effective robustness per model (rows) and shifted dataset (columns), in points, with the
    interval from the fitted line's 95% band; the reference models are marked."""
    er = doc.get("effective_robustness") or {}
    rows = []
    for m, per in sorted((er.get("models") or {}).items()):
        row = {"model": m}
        for d, v in sorted(per.items()):
            band = v.get("er_interval") or (None, None)
            row[f"{d} acc1"] = fmt_value("acc1", v["ood_acc"])
            row[f"{d} ER"] = fmt_value("er", v["er"], band[0], band[1], sign=True)
            row[f"{d} ref"] = "yes" if v.get("in_reference") else ""
        rows.append(row)
    return pd.DataFrame(rows)


def fit_caption(d: str, fit: dict, x_axis: str | None) -> str:
    """One fit in words: source, line, slope interval, R^2, x-axis, and whether it is too weak
    to read."""
    ci, r2 = fit.get("slope_interval"), fit.get("r2")
    parts = [f"{d}: {fit['source']}, slope {fit['slope']:.4f}"
             + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
             + f", intercept {fit['intercept']:.4f}"
             + (f", R^2 {r2:.3f}" if r2 is not None else "")]
    if x_axis:
        parts.append(f"x-axis: {x_axis}")
    if fit.get("weak"):
        parts.append(f"TOO WEAK TO READ: {fit['weak']}")
    return ", ".join(parts)


def mce_table(doc: dict) -> pd.DataFrame:
    rows = []
    for d, per in sorted((doc.get("mce") or {}).items()):
        for m, v in sorted(per.items()):
            rows.append({"dataset": d, "model": m, "baseline": v["baseline"],
                         "mCE": fmt_value("mce", v["mce"]),
                         "relative mCE": fmt_value("relative_mce", v.get("relative_mce"))})
    return pd.DataFrame(rows)


def analysis_tables(doc: dict, fmt: str = "table") -> list[tuple[str, str]]:
    """(title, rendered table) of each non-empty part of an analysis (robench.analysis)."""
    out = []
    er = doc.get("effective_robustness") or {}
    parts = [
        ("paired deltas vs reference (model - reference) [95% paired-bootstrap interval; -C "
         "sets: resampling base images], p of the acc1 test (McNemar exact; -C sets: clustered "
         "McNemar)", comparison_table(doc)),
        ("effective robustness (points, [95% band of the fit]; Taori et al. 2020): "
         + "; ".join(fit_caption(d, f, (er.get("x_axis") or {}).get(d))
                     for d, f in (er.get("fits") or {}).items()),
         er_table(doc)),
        ("mCE (%; Hendrycks & Dietterich 2019)", mce_table(doc)),
    ]
    for title, table in parts:
        if len(table):
            out.append((title, render_table(table, fmt, caption=title)))
    return out


# --------------------------------------------------------------------------------------------
# The headline average: over the shifted sets, the ID set apart
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShiftAverage:
    """Which datasets a suite's one-number summary of accuracy averages.

    Robustness papers report the unweighted mean top-1 accuracy over the *shifted* sets, with
    the in-distribution (ID) set in its own column (CLIP, Radford et al. 2021, Table 16; WiSE-FT,
    Wortsman et al. 2022, "avg shifts"; CAR-FT, Mao et al. 2024): averaging the ID set in with
    the shifts mixes two different questions. The ID set is the one the records name as
    ``protocol.id_dataset``; when none names one, the suite pairs no ID set and the mean runs
    over every dataset, labelled as such.
    """

    id_datasets: tuple[str, ...]  # the ID set(s) the records name (normally one)
    datasets: tuple[str, ...]  # the datasets averaged: the shifted ones, or all when unpaired

    @property
    def paired(self) -> bool:
        return bool(self.id_datasets)

    @property
    def name(self) -> str:
        """The row / band name: ``avg shift``, or ``mean over all datasets`` when unpaired."""
        return "avg shift" if self.paired else "mean over all datasets"

    @property
    def label(self) -> str:
        """The column name of the averaged accuracy."""
        return "avg shift acc1" if self.paired else "mean acc1 over all datasets"

    @property
    def key(self) -> str:
        """A stable machine name (the report's column key)."""
        return "avg-shift" if self.paired else "mean-all"

    def describe(self) -> str:
        """One sentence saying what is averaged and what is not."""
        n, names = len(self.datasets), ", ".join(self.datasets)
        if self.paired:
            ids = ", ".join(self.id_datasets)
            return (f"unweighted mean of top-1 accuracy over the {n} shifted set"
                    f"{'' if n == 1 else 's'} ({names}); the ID set {ids} is left out of it and "
                    "shown apart, as robustness papers report")
        return (f"no ID set is paired (protocol.id_dataset is null in every record), so this is "
                f"the unweighted mean of top-1 accuracy over all {n} datasets ({names}), "
                "in-distribution and shifted alike")

    def value(self, acc1: Mapping[str, float | None]) -> float | None:
        """The mean of ``acc1[d]`` over the averaged datasets; None unless every one has a
        number (a mean over fewer sets would not be comparable between models)."""
        vals = [acc1.get(d) for d in self.datasets]
        if not vals or any(v is None or pd.isna(v) for v in vals):
            return None
        return float(np.mean([float(v) for v in vals]))  # type: ignore[arg-type]


def shift_average(records: Iterable[dict]) -> ShiftAverage:
    """The :class:`ShiftAverage` of one suite's records: every dataset but the ID set(s) their
    ``protocol.id_dataset`` names, or all datasets when none is named."""
    records = list(records)
    datasets = sorted({str(r["dataset"]) for r in records})
    ids = sorted({str(i) for r in records
                  if (i := (r.get("protocol") or {}).get("id_dataset"))})
    return ShiftAverage(tuple(ids), tuple(d for d in datasets if d not in ids))


def _by_suite(records: Iterable[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(str(r["suite"]), []).append(r)
    return dict(sorted(out.items()))


def average_frame(records: list[dict]) -> pd.DataFrame:
    """One row per (suite, model): the ID set's acc1 and the averaged acc1 (full precision),
    best average first within a suite. Columns: suite, model, method, id_dataset, id_acc1,
    average (``avg shift`` / ``mean over all datasets``), acc1, averaged (the datasets)."""
    rows = []
    for suite, recs in _by_suite(records).items():
        avg = shift_average(recs)
        for model in sorted({str(r["model"]) for r in recs}):
            cells = {str(r["dataset"]): r for r in recs if str(r["model"]) == model}
            acc = {d: r["metrics"].get("acc1") for d, r in cells.items()}
            ids = [d for d in avg.id_datasets if d in cells]
            methods = sorted({str((r.get("protocol") or {}).get("method") or "-")
                              for r in cells.values()})
            rows.append({"suite": suite, "model": model, "method": ", ".join(methods),
                         "id_dataset": ", ".join(ids) or None,
                         "id_acc1": acc[ids[0]] if len(ids) == 1 else None,
                         "average": avg.name, "acc1": avg.value(acc),
                         "averaged": ";".join(avg.datasets)})
    frame = pd.DataFrame(rows, columns=["suite", "model", "method", "id_dataset", "id_acc1",
                                        "average", "acc1", "averaged"])
    if not len(frame):
        return frame
    order = frame.assign(_missing=frame["acc1"].isna(), _neg=-frame["acc1"].fillna(0.0))
    return frame.loc[order.sort_values(["suite", "_missing", "_neg", "model"], kind="stable")
                     .index].reset_index(drop=True)


def average_rows(records: list[dict], groups: bool = False) -> pd.DataFrame:
    """The per-model averages as rows shaped like :func:`to_frame`'s, for ``robench results
    --format csv|json``: ``dataset`` is ``avg shift`` (or ``mean over all datasets``), ``acc1``
    the mean, ``averaged`` the datasets it runs over (``;``-separated); no interval, no n."""
    avg = average_frame(records)
    if not len(avg):
        return avg
    out = avg[["suite", "model", "average", "method", "acc1", "averaged"]].rename(
        columns={"average": "dataset"})
    if groups:
        out.insert(3, "group", "")
    out.insert(len(out.columns) - 2, "n", None)
    return out


def average_tables(records: list[dict], fmt: str = "table",
                   digits: int | None = None) -> list[tuple[str, str]]:
    """(title, rendered table) per suite with more than one dataset: each model's ID acc1 and
    its avg shift acc1 (or, when no ID set is paired, its mean over all datasets); ``digits``
    overrides the decimals of :func:`decimals` (the report shows acc1 with one)."""
    def shown(v: Any) -> str:
        return fmt_value("acc1", v) if digits is None or v is None or pd.isna(v) else \
            f"{v:.{digits}f}"

    out = []
    frame = average_frame(records)
    for suite, recs in _by_suite(records).items():
        avg = shift_average(recs)
        if not avg.datasets or (not avg.paired and len(avg.datasets) < 2):
            continue  # nothing shifted to average, or one dataset: its own column says it
        rows = frame[frame["suite"] == suite]
        table = pd.DataFrame({"model": rows["model"], "method": rows["method"]})
        if avg.paired:
            table[f"{', '.join(avg.id_datasets)} acc1 (ID)"] = [shown(v) for v in rows["id_acc1"]]
        table[avg.label] = [shown(v) for v in rows["acc1"]]
        title = f"suite {suite}: {avg.label} = {avg.describe()}"
        out.append((title, render_table(table.reset_index(drop=True), fmt, caption=title)))
    return out


def leaderboard(frame: pd.DataFrame, metric: str = "acc1") -> pd.DataFrame:
    """Models x datasets pivot of one metric."""
    return frame.pivot_table(index="model", columns="dataset", values=metric, aggfunc="first")


def summary_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The compact per-cell table of ``robench results``: acc1 / acc5 / ECE / AUROC (+ ood_auroc
    where a cell has it). A record without a metric (older records without ``acc5``) shows
    ``-``."""
    cols = ["model", "dataset", "n", "acc1", "acc5", "ece", "auroc"]
    cols += [c for c in ("ood_auroc",) if c in frame and frame[c].notna().any()]
    out = frame.reindex(columns=cols).copy()
    for c in ("acc1", "acc5"):
        out[c] = out[c].map(lambda v: f"{v:.2f}" if pd.notna(v) else "-")
    for c in ("ece", "auroc", "ood_auroc"):
        if c in out:
            out[c] = out[c].map(lambda v: f"{v:.4f}" if pd.notna(v) else "-")
    return out


def leaderboard_table(frame: pd.DataFrame, models: list[str] | None = None,
                      datasets: list[str] | None = None,
                      metrics: tuple[str, ...] = ("acc1", "acc5", "ece", "auroc", "ood_auroc"),
                      average: ShiftAverage | None = None) -> pd.DataFrame:
    """The leaderboard printed after a run: one row per model, (dataset, metric) columns.

    ``models`` / ``datasets`` give the order (the suite's); a metric that is empty for a dataset
    (``ood_auroc`` of the in-distribution set) is left out for it. With ``average`` (the suite's
    :func:`shift_average`) averaging two datasets or more, the first column is each model's
    ``(avg shift, acc1)`` -- or ``(mean over all datasets, acc1)`` when no ID set is paired (a
    single shifted set's own acc1 column says it already).
    """
    models = models or list(dict.fromkeys(frame["model"]))
    datasets = datasets or list(dict.fromkeys(frame["dataset"]))
    cells = frame.set_index(["model", "dataset"])
    columns: dict[tuple[str, str], list[str]] = {}
    if average is not None and len(average.datasets) > 1:
        columns[(average.name, "acc1")] = [fmt_value("acc1", average.value(
            {d: cells["acc1"].get((m, d)) for d in datasets})) for m in models]
    for d in datasets:
        for m in metrics:
            if m not in cells:
                continue
            values = [cells[m].get((model, d)) for model in models]
            if all(v is None or pd.isna(v) for v in values):
                continue
            fmt = "{:.2f}" if m in ("acc1", "acc5") else "{:.4f}"
            columns[(d, m)] = [fmt.format(v) if v is not None and pd.notna(v) else "-"
                               for v in values]
    table = pd.DataFrame(columns, index=pd.Index(models, name="model"))
    table.columns = pd.MultiIndex.from_tuples(table.columns, names=["dataset", "metric"])
    return table
