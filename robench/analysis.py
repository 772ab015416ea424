"""Analyses across the cells of a suite, written beside its records as ``<suite>/analysis.json``:

* paired comparisons of each model with a reference model on the same samples
  (:mod:`robench.compare`: delta of every headline metric with a paired-bootstrap interval,
  McNemar's exact test for acc1);
* effective robustness of each model on each shifted dataset (:mod:`robench.robustness`: the
  logit-linear fit of Taori et al. 2020 over a reference set named in the suite, or shipped /
  user coefficients with their source);
* mCE and relative mCE of each -C cell (Hendrycks & Dietterich 2019) against AlexNet's published
  ImageNet-C errors or a model of the suite;
* reliability-diagram bins of every cell (accuracy and mean confidence per confidence bin, with
  counts), for the report.

Everything is computed from the records and their stored per-sample outputs, without a model:
``robench run`` writes it after the last cell and ``robench analyze`` recomputes it (e.g. with
another reference). The file records its settings and the ``cell_key`` of every record it read, so
a report can tell when it is stale. It is written atomically; :func:`robench.results.find_records`
never mistakes it for a record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from robench.compare import compare_cells
from robench.errors import RobenchError
from robench.metrics import _bin_index
from robench.results import (
    ANALYSIS_FILE,
    clean,
    find_records,
    load_outputs,
    read_record,
    record_digest,
    seal_record,
)
from robench.robustness import (
    CorruptionBaseline,
    LogitFit,
    baseline_from_model,
    corruption_errors,
    fit_logit_linear,
    load_fits,
    mce,
    shipped_baseline,
    shipped_baseline_problem,
    shipped_baselines,
)
from robench.scoring import CellOutputs

log = logging.getLogger(__name__)

ANALYSIS_VERSION = 2  # 2: -C deltas resample base images; the acc1 test is named under 'test'


@dataclass
class AnalysisSettings:
    """What the analyses compare against (the suite's ``analysis`` section)."""

    reference: str | None = None  # None: the zero-shot model of the same backbone
    bootstrap: int | None = None  # None: the records' own bootstrap count
    er_reference: Any = None  # None / []: no fit; "all": every model; or a list of models
    er_fits: str = ""  # coefficients file (JSON/YAML) with their source
    mce_baseline: str = "auto"  # auto | alexnet | <model of the suite> | none

    @classmethod
    def of(cls, cfg: Any) -> AnalysisSettings:
        """From a config section (DictConfig or dict) or None."""
        if cfg is None:
            return cls()
        from omegaconf import DictConfig, OmegaConf

        raw = OmegaConf.to_container(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
        return cls(**{k: raw[k] for k in asdict(cls()) if k in raw})


@dataclass
class SuiteRecords:
    name: str
    folder: Path
    records: dict[tuple[str, str], dict] = field(default_factory=dict)
    paths: dict[tuple[str, str], Path] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return sorted({m for m, _ in self.records})

    @property
    def datasets(self) -> list[str]:
        return sorted({d for _, d in self.records})


def suites_under(results_dir: str | Path) -> list[SuiteRecords]:
    """The records under ``results_dir`` grouped by suite (``<suite>/<model>/<dataset>.json``)."""
    suites: dict[str, SuiteRecords] = {}
    for path in find_records(results_dir):
        rec = read_record(path)
        if not isinstance(rec, dict) or not {"suite", "model", "dataset", "metrics"} <= set(rec):
            raise RobenchError(f"{path} is not a robench result record",
                               "move it out of the results folder")
        name = str(rec["suite"])
        s = suites.setdefault(name, SuiteRecords(name, path.parent.parent))
        if path.parent.parent != s.folder:
            raise RobenchError(f"suite {name!r} has records in two folders: {s.folder} and "
                               f"{path.parent.parent}", "keep one suite's records in one folder")
        s.records[(str(rec["model"]), str(rec["dataset"]))] = rec
        s.paths[(str(rec["model"]), str(rec["dataset"]))] = path
    return [suites[k] for k in sorted(suites)]


def _protocol(rec: dict) -> dict:
    p = rec.get("protocol")
    return p if isinstance(p, dict) else {}


def _backbone(rec: dict) -> tuple:
    p = rec.get("provenance") if isinstance(rec.get("provenance"), dict) else {}
    return (p.get("arch"), p.get("pretrained"))


def references(suite: SuiteRecords, reference: str | None) -> tuple[dict[str, str], list[str]]:
    """``{model: its reference}`` and notes for models without one."""
    models, notes = suite.models, []
    if reference is not None:
        if reference not in models:
            raise RobenchError(f"analysis.reference={reference} is not a model of suite "
                               f"{suite.name} ({', '.join(models)})",
                               "name one of the suite's models, or null for the zero-shot model "
                               "of each backbone")
        return {m: reference for m in models if m != reference}, notes
    first = {m: next(r for (mm, _), r in suite.records.items() if mm == m) for m in models}
    zeroshot = [m for m in models if _protocol(first[m]).get("method") == "zeroshot"]
    out, alone = {}, []
    for m in models:
        if m in zeroshot:
            continue
        same = [z for z in zeroshot if _backbone(first[z]) == _backbone(first[m])]
        if len(same) == 1:
            out[m] = same[0]
        elif len(models) == 1:  # nothing to compare with: not worth a note
            continue
        elif not same:
            alone.append(m)
        else:
            notes.append(f"{m}: several zero-shot models of its backbone ({', '.join(same)}), "
                         "not compared (set analysis.reference)")
    if alone:  # e.g. the reference classifiers of an effective-robustness line
        notes.append(f"no zero-shot model of the same backbone in the suite, not compared: "
                     f"{', '.join(alone)} (set analysis.reference)")
    return out, notes


def _load_outputs(suite: SuiteRecords, key: tuple[str, str],
                  cache: dict[tuple[str, str], CellOutputs | None]) -> CellOutputs | None:
    if key not in cache:
        path = suite.paths[key]
        cache[key] = load_outputs(path, suite.records[key]) \
            if path.with_suffix(".npz").is_file() else None  # verified against its record
    return cache[key]


def comparisons(suite: SuiteRecords, settings: AnalysisSettings,
                outputs: dict) -> tuple[list[dict], list[str]]:
    refs, notes = references(suite, settings.reference)
    rows = []
    for m, ref in refs.items():
        for d in suite.datasets:
            if (m, d) not in suite.records or (ref, d) not in suite.records:
                continue
            rec, rrec = suite.records[(m, d)], suite.records[(ref, d)]
            what = f"{m} vs {ref} on {d}"
            mh = [(r.get("data") or {}).get("manifest_hash") for r in (rec, rrec)]
            if None not in mh and mh[0] != mh[1]:
                notes.append(f"{what}: the records were scored on different data (manifest "
                             "hashes differ), not compared")
                continue
            a, b = _load_outputs(suite, (m, d), outputs), _load_outputs(suite, (ref, d), outputs)
            if a is None or b is None:
                notes.append(f"{what}: per-sample outputs missing, not compared")
                continue
            p = _protocol(rec)
            try:
                res = compare_cells(
                    a, b, summary_groups=p.get("summary_groups"),
                    n_bins=int(p.get("ece_bins", 15)),
                    n_bootstrap=int(settings.bootstrap if settings.bootstrap is not None
                                    else p.get("bootstrap", 200)),
                    seed=int(p.get("seed", 0)),
                    alpha=round(1 - float(p.get("interval_level", 0.95)), 12), what=what)
            except RobenchError as e:
                notes.append(f"not compared: {e.problem}")
                continue
            rows.append({"model": m, "reference": ref, "dataset": d,
                         "interval_level": float(p.get("interval_level", 0.95)),
                         "bootstrap": int(settings.bootstrap if settings.bootstrap is not None
                                          else p.get("bootstrap", 200)), **res})
    return rows, notes


def _acc(rec: dict | None, key: str = "acc1") -> float | None:
    v = None if rec is None else rec["metrics"].get(key)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def er_axis(suite: SuiteRecords, id_ds: str, ood: str) -> tuple[str, str] | None:
    """(x-axis of ``robench.robustness.X_AXES``, its description) for effective robustness on
    ``ood``: the ID set's accuracy over ``ood``'s scored classes (the records' ``id_acc1``);
    None when no record of ``ood`` carries it."""
    recs = [r for (_, d), r in suite.records.items() if d == ood and _acc(r, "id_acc1")]
    if not recs:
        return None
    scored = _protocol(recs[0]).get("scored_classes")
    if scored in (None, "all"):
        return "all-classes", f"{id_ds} top-1 over all its classes"
    return "ood-classes", f"{id_ds} top-1 over the {len(scored)} classes of {ood}"


def er_points(suite: SuiteRecords, models: list[str], id_ds: str, ood: str
              ) -> dict[str, tuple[float, float]]:
    """``{model: (ID acc on ood's classes, OOD acc)}`` of the models that have both."""
    pts = {m: (_acc(suite.records.get((m, ood)), "id_acc1"), _acc(suite.records.get((m, ood))))
           for m in models}
    return {m: (x, y) for m, (x, y) in pts.items() if x is not None and y is not None}


def effective_robustness(suite: SuiteRecords, settings: AnalysisSettings
                         ) -> tuple[dict | None, list[str]]:
    """Fits and per-model ER for every shifted dataset of the suite, on the x-axis of
    :func:`er_axis` (recorded per fit)."""
    ids = {_protocol(r).get("id_dataset") for r in suite.records.values()} - {None}
    if not ids:
        return None, [] if not settings.er_reference and not settings.er_fits else [
            "effective robustness: the suite pairs no ID set (id_dataset), none computed"]
    if len(ids) > 1:
        return None, [f"effective robustness: records name several ID sets {sorted(ids)}"]
    id_ds = ids.pop()
    notes: list[str] = []
    axes = {d: a for d in suite.datasets if d != id_ds and (a := er_axis(suite, id_ds, d))}
    for d in suite.datasets:
        if d != id_ds and d not in axes:
            notes.append(f"effective robustness on {d}: its records carry no ID accuracy over "
                         "its classes (id_acc1), none computed")
    fits: dict[str, LogitFit] = {}
    if settings.er_fits:
        for f in load_fits(settings.er_fits):
            if f.id_dataset != id_ds or f.ood_dataset not in axes:
                continue
            if axes[f.ood_dataset][0] == "ood-classes" and f.x_axis != "ood-classes":
                raise RobenchError(
                    f"analysis.er_fits: the fit for {f.ood_dataset} is on the x-axis "
                    f"{f.x_axis}, but {f.ood_dataset} is scored over a class sub-list, so robench "
                    f"reads ER on {axes[f.ood_dataset][1]} (Taori et al. 2020)",
                    "use coefficients fitted with the ID accuracy over the shifted set's "
                    "classes (x_axis: ood-classes)")
            fits[f.ood_dataset] = f
    ref = settings.er_reference
    if ref == "all" or ref == ["all"]:
        ref = suite.models
    ref = [ref] if isinstance(ref, str) else list(ref or [])
    for d, (axis, _) in axes.items():
        if d in fits or not ref:
            continue
        try:
            fits[d] = fit_logit_linear(er_points(suite, ref, id_ds, d), id_ds, d, axis)
        except RobenchError as e:
            notes.append(e.problem)
    if not fits:
        if not ref and not settings.er_fits:
            notes.append("effective robustness: no reference set (analysis.er_reference) and no "
                         "coefficients (analysis.er_fits), none computed")
        return None, notes
    models: dict[str, dict] = defaultdict(dict)
    for d, fit in fits.items():
        if fit.weak:
            notes.append(f"effective robustness on {d}: the fit is too weak to read "
                         f"({fit.weak})")
        for m, (x, y) in er_points(suite, suite.models, id_ds, d).items():
            er = fit.effective_robustness(x, y)
            models[m][d] = {"id_acc": x, "ood_acc": y, "in_reference": m in fit.reference,
                            "predicted": None if er is None else fit.predict(x), "er": er,
                            "er_interval": fit.er_interval(x, y)}
    return {"id_dataset": id_ds, "fits": {d: f.as_dict() for d, f in fits.items()},
            "x_axis": {d: axes[d][1] for d in fits},
            "models": dict(models),
            "definition": "ER = OOD acc1 - sigmoid(slope * logit(ID acc1) + intercept), in points "
                          "(Taori et al. 2020); ID acc1 over the shifted set's own classes; the "
                          "interval is the fitted line's 95% confidence band"}, notes


def mce_tables(suite: SuiteRecords, settings: AnalysisSettings) -> tuple[dict, list[str]]:
    """``{dataset: {model: mce result}}`` for datasets with corruption groups."""
    choice = settings.mce_baseline or "none"
    if choice == "none":
        return {}, []
    out: dict[str, dict] = {}
    notes: list[str] = []
    for d in suite.datasets:
        recs = {m: suite.records[(m, d)] for m in suite.models if (m, d) in suite.records
                and suite.records[(m, d)].get("groups")}
        if not recs:
            continue
        any_rec = next(iter(recs.values()))
        id_ds = _protocol(any_rec).get("id_dataset")
        if choice in suite.models:
            if choice not in recs:
                notes.append(f"mCE on {d}: baseline {choice} has no record there")
                continue
            b = recs[choice]
            base = baseline_from_model(choice, b["groups"], _protocol(b).get("summary_groups")
                                       or list(b["groups"]),
                                       _acc(suite.records.get((choice, id_ds))))
        else:
            base, why = _shipped_for(choice, d, recs)
            if base is None:  # skipped, and the note says why (a generated set, too few groups)
                notes.append(f"mCE on {d}: not normalised by a shipped baseline: {why}; "
                             "analysis.mce_baseline=<a model of the suite> gives mCE against it")
                continue
            if why:
                notes.append(f"mCE on {d}: {why}")
        out[d] = {}
        for m, rec in recs.items():
            errs = corruption_errors(rec["groups"], _protocol(rec).get("summary_groups")
                                     or list(rec["groups"]))
            clean_acc = _acc(suite.records.get((m, id_ds))) if id_ds else None
            try:
                out[d][m] = mce(errs, None if clean_acc is None else 1 - clean_acc / 100, base)
            except RobenchError as e:
                notes.append(f"mCE of {m} on {d}: {e.problem}")
    return {d: v for d, v in out.items() if v}, notes


def _shipped_for(choice: str, dataset: str, recs: dict[str, dict]
                 ) -> tuple[CorruptionBaseline | None, str]:
    """The first shipped baseline (``auto``: any; else ``choice``) that applies to every record
    of ``dataset`` (:func:`robench.robustness.shipped_baseline_problem`) and a caveat when the
    set is a generated one; or ``None`` and why none applies."""
    names = list(shipped_baselines()) if choice == "auto" else [choice]
    whys = []
    for name in names:
        problems = [shipped_baseline_problem(
            name, dataset, (r.get("data") or {}).get("generated"),
            _protocol(r).get("summary_groups") or list(r["groups"])) for r in recs.values()]
        why = next((p for p in problems if p), None)
        if why is None:
            made = any((r.get("data") or {}).get("generated") for r in recs.values())
            return shipped_baseline(name, dataset, check=False), (
                f"a generated set with ImageNet-C's protocol, normalised by {name}'s errors on "
                "the released ImageNet-C (imagecorruptions' version of its recipe, other random "
                "draws)" if made else "")
        whys.append(why)
    return None, "; ".join(whys)


def reliability_bins(out: CellOutputs, summary_groups: list[str] | None, n_bins: int) -> dict:
    """Per equal-width confidence bin (ECE's bins): sample count, mean confidence, accuracy,
    over the headline's rows (a -C set: its groups pooled)."""
    rows = out.rows()
    if out.group_names and summary_groups:
        idx = [out.group_names.index(g) for g in summary_groups if g in out.group_names]
        rows = rows[np.isin(out.group[rows], idx)]
    s = out.samples.take(rows)
    conf, correct = s.conf, s.correct
    b = _bin_index(conf, n_bins)
    count = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(b, weights=conf, minlength=n_bins) / count
        acc = np.bincount(b, weights=correct.astype(float), minlength=n_bins) / count
    return {"n_bins": n_bins, "count": count.tolist(),
            "confidence": [None if c == 0 else float(v) for c, v in zip(count, mean_conf,
                                                                          strict=True)],
            "accuracy": [None if c == 0 else float(v) for c, v in zip(count, acc, strict=True)]}


def check_settings(suite: SuiteRecords, settings: AnalysisSettings,
                   strict: bool = True) -> tuple[AnalysisSettings, list[str]]:
    """(settings, notes): names in the settings that the suite's records do not have fail
    before anything is computed (``strict``, an explicit ``robench analyze``); after a run
    (``strict=False``) they are dropped with a note instead -- a run of a subset of the suite's
    models (``models=[...]``) leaves the reference classifiers or the mCE baseline out, and its
    cells must not be lost to the analysis."""
    notes: list[str] = []

    def missing(problem: str, fix: str) -> None:
        if strict:
            raise RobenchError(problem, fix)
        notes.append(f"{problem}: left out (this run's records lack it)")

    if settings.reference is not None and settings.reference not in suite.models:
        missing(f"analysis.reference={settings.reference} is not a model of suite "
                f"{suite.name} ({', '.join(suite.models)})",
                "name one of the suite's models, or null for the zero-shot model of each "
                "backbone")
        settings = replace(settings, reference=None)
    ref = settings.er_reference
    if ref not in (None, "all", ["all"]):
        names = [ref] if isinstance(ref, str) else list(ref)
        unknown_ref = sorted(set(names) - set(suite.models))
        if unknown_ref:
            missing(f"analysis.er_reference names {', '.join(unknown_ref)}, not models of "
                    f"suite {suite.name}", f"use models of the suite ({', '.join(suite.models)}) "
                    "or all")
            settings = replace(settings, er_reference=[n for n in names if n in suite.models])
    choice = settings.mce_baseline or "none"
    if choice not in ("auto", "none", *shipped_baselines(), *suite.models):
        missing(f"analysis.mce_baseline={choice} is neither a shipped baseline "
                f"({', '.join(shipped_baselines())}) nor a model of suite {suite.name}",
                "use auto, alexnet, none or a model of the suite")
        settings = replace(settings, mce_baseline="none")
    if settings.bootstrap is not None and int(settings.bootstrap) < 0:
        raise RobenchError(f"analysis.bootstrap={settings.bootstrap} is negative",
                           "use 0 (no intervals) or more resamples")
    if settings.er_fits and not Path(settings.er_fits).is_file():
        raise RobenchError(f"analysis.er_fits={settings.er_fits} does not exist",
                           "point it at a JSON/YAML file of fits, or leave it empty")
    return settings, notes


def analyze_suite(suite: SuiteRecords, settings: AnalysisSettings, strict: bool = True) -> dict:
    settings, name_notes = check_settings(suite, settings, strict)
    outputs: dict = {}
    comp, notes = comparisons(suite, settings, outputs)
    notes = name_notes + notes
    er, er_notes = effective_robustness(suite, settings)
    mces, mce_notes = mce_tables(suite, settings)
    reliability: dict[str, dict] = defaultdict(dict)
    for (m, d), rec in suite.records.items():
        out = _load_outputs(suite, (m, d), outputs)
        if out is not None:
            p = _protocol(rec)
            reliability[m][d] = reliability_bins(out, p.get("summary_groups"),
                                                 int(p.get("ece_bins", 15)))
    return clean({
        "kind": "robench-analysis", "version": ANALYSIS_VERSION, "suite": suite.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": asdict(settings),
        "inputs": {f"{m}/{d}": fingerprint(r) for (m, d), r in sorted(suite.records.items())},
        "comparisons": comp, "effective_robustness": er, "mce": mces,
        "reliability": dict(reliability), "notes": notes + er_notes + mce_notes,
    })


def read_analysis(folder: str | Path, rebuild: bool = False) -> dict | None:
    """The analysis of the suite whose records are in ``folder`` (None if there is none).
    ``rebuild`` (the writer, :func:`analyze`): an unreadable one is None with a warning, since it
    is about to be recomputed; a reader gets a named error."""
    path = Path(folder) / ANALYSIS_FILE
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        if not isinstance(rec, dict) or rec.get("kind") != "robench-analysis":
            raise ValueError("not a robench analysis")
    except (OSError, ValueError) as e:
        if rebuild:
            log.warning("%s is unreadable (%s): it is recomputed", path, e)
            return None
        raise RobenchError(f"cannot read {path}: {e}", "delete it and run robench analyze "
                           "--dir <the results folder> (a run of the suite recomputes it too)"
                           ) from e
    if (rec.get("integrity") or {}).get("sha256") != record_digest(rec):
        log.warning("%s fails its checksum (edited or damaged): it is recomputed", path)
        return None
    return rec


def fingerprint(record: dict) -> str:
    """What an analysis of a record depends on: its cell (``cell_key``), its per-sample outputs
    (their checksum: a cell recomputed with ``force=true`` or on other kernels keeps its key but
    may score other numbers, a fine-tuned model retrained there above all) and its metric
    settings (a ``robench rescore`` with other bins keeps both but changes the ECE)."""
    p = _protocol(record)
    settings = json.dumps([p.get("ece_bins"), p.get("bootstrap"), p.get("interval_level"),
                           record.get("rescored"), (record.get("outputs") or {}).get("sha256")],
                          default=str)
    return f"{record.get('cell_key')}:{hashlib.sha256(settings.encode()).hexdigest()[:8]}"


def stale_cells(analysis: dict, records: dict[tuple[str, str], dict]) -> list[str]:
    """Cells whose record changed (or appeared, or went) since the analysis was computed."""
    now = {f"{m}/{d}": fingerprint(r) for (m, d), r in records.items()}
    then = analysis.get("inputs") or {}
    return sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))


def analyze(results_dir: str | Path, settings: AnalysisSettings | None = None,
            overrides: dict | None = None, force: bool = False,
            strict: bool = True) -> list[tuple[Path, dict]]:
    """Analyse every suite under ``results_dir`` and write ``<suite>/analysis.json``.

    ``settings`` replaces a suite's stored settings; else the settings of its existing analysis
    (or the defaults) are used, with ``overrides`` (non-None values) applied on top. An existing
    analysis with the same settings over the same records is kept as it is (``force``: redo).
    ``strict=False`` (after a run) drops names the records lack with a note instead of failing.
    """
    from robench.io import write_json

    written = []
    for suite in suites_under(results_dir):
        old = read_analysis(suite.folder, rebuild=True)
        base = settings or AnalysisSettings.of((old or {}).get("settings"))
        base = AnalysisSettings(**{**asdict(base),
                                   **{k: v for k, v in (overrides or {}).items()
                                      if v is not None}})
        if (not force and old is not None and old.get("version") == ANALYSIS_VERSION
                and old.get("settings") == clean(asdict(base))
                and not stale_cells(old, suite.records)):
            written.append((suite.folder / ANALYSIS_FILE, old))
            continue
        doc = analyze_suite(suite, base, strict)
        path = suite.folder / ANALYSIS_FILE
        write_json(path, seal_record(doc), seal=False)  # carries its checksum, as a record
        written.append((path, doc))
    return written


def summary_line(path: Path, doc: dict) -> str:
    """One line saying what an analysis holds (and its notes, one per line)."""
    er = doc.get("effective_robustness") or {}
    parts = [f"{len(doc.get('comparisons') or [])} paired comparison(s)",
             f"effective robustness on {len(er.get('fits') or {})} dataset(s)",
             f"mCE on {len(doc.get('mce') or {})} dataset(s)"]
    lines = [f"analysis: {', '.join(parts)} -> {path}"]
    lines += [f"  note: {n}" for n in doc.get("notes") or []]
    return "\n".join(lines)
