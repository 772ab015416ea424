"""Effective robustness (Taori et al. 2020) and mean Corruption Error (Hendrycks & Dietterich
2019), from headline and per-group accuracies of result records.

Effective robustness. With ``logit(a) = ln(a / (1 - a))`` of an accuracy ``a`` as a fraction,
fit ``logit(OOD acc) = slope * logit(ID acc) + intercept`` by least squares over a reference set
of models; a model's effective robustness is ``OOD acc - sigmoid(slope * logit(ID acc) +
intercept)`` in percentage points: how much better (or worse) it does under the shift than its
in-distribution accuracy predicts. The ID accuracy is over the shifted set's own classes
(``X_AXES``: ImageNet over ImageNet-R's 200 classes for ImageNet-R, as Taori et al.'s testbed
does; the same as the ID headline for a set scored over every class). Reference: R. Taori,
A. Dave, V. Shankar, N. Carlini, B. Recht, L. Schmidt, "Measuring Robustness to Natural
Distribution Shifts in Image Classification", NeurIPS 2020; Radford et al. 2021 (CLIP),
fig. 13. The reference set is named in the suite (models of the run) or a fit is read from a
coefficients file that carries its source and x-axis; robench ships no coefficients, because
no published table of fit coefficients could be sourced exactly here.

mCE. For a model f and corruption c with top-1 errors ``E_{s,c}`` over severities s:
``CE_c = sum_s E_{s,c}^f / sum_s E_{s,c}^base`` and ``mCE = mean_c CE_c`` (in %, 100 = the
baseline); relative ``CE_c = sum_s (E_{s,c}^f - E_clean^f) / sum_s (E_{s,c}^base -
E_clean^base)`` and relative mCE its mean. The baseline is AlexNet for ImageNet-C (its errors are
shipped in ``data/metadata/mce_baselines.json`` with their source) or any model of the suite.
AlexNet's errors normalise a cell only where they were measured under the same protocol
(:func:`shipped_baseline_problem`): the released ImageNet-C, or a set generated from ImageNet
val with ImageNet-C's protocol (its constants, resize 256 / centre crop 224) and all 15
corruptions x 5 severities; a generated set of one corruption named ``imagenet-c`` is not that.
Reference: D. Hendrycks and T. Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", ICLR 2019, section 4.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from robench.errors import RobenchError


def logit(acc_percent: float) -> float:
    """``ln(a / (1 - a))`` of an accuracy given in percent; +-inf at 0 and 100."""
    a = acc_percent / 100.0
    if a <= 0.0:
        return -math.inf
    if a >= 1.0:
        return math.inf
    return math.log(a / (1.0 - a))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


#: The x-axes effective robustness can be read on: the ID set's accuracy over all its classes,
#: or over the shifted set's own (scored) classes -- Taori et al.'s testbed scores ImageNet-R/-A
#: against ImageNet over their 200 classes (``val-on-imagenet-r-classes``). For a shifted set
#: scored over every class the two are the same number.
X_AXES = ("all-classes", "ood-classes")


@dataclass
class LogitFit:
    """``logit(OOD) = slope * logit(ID) + intercept``, with where it came from.

    For a least-squares fit over ``n >= 3`` models the ordinary least-squares statistics in logit
    space (x = logit ID acc, y = logit OOD acc) are kept: ``s2 = SSE / (n - 2)``, ``x_mean``,
    ``sxx = sum (x - x_mean)^2`` and ``t = t_{n-2, 1 - alpha/2}``; the line's confidence band at
    x0 is ``y0 +- t s sqrt(1/n + (x0 - x_mean)^2 / sxx)`` and the slope's interval ``slope +- t s
    / sqrt(sxx)`` (e.g. Weisberg, "Applied Linear Regression", 4th ed., 2014, section 2.8).
    A fit is *too weak to read* when it has fewer than 3 points or its slope's interval holds 0:
    the reference models' ID accuracy then does not predict their OOD accuracy, and an ER
    measured against the line says nothing about robustness.
    """

    slope: float
    intercept: float
    id_dataset: str
    ood_dataset: str
    source: str  # "fit over N models of the suite: ..." or the coefficients file's source
    reference: list[str]  # the models the fit is over ([] for shipped coefficients)
    n: int
    r2: float | None = None
    x_axis: str = "all-classes"  # one of X_AXES
    s2: float | None = None
    x_mean: float | None = None
    sxx: float | None = None
    t: float | None = None
    interval_level: float = 0.95

    def predict(self, id_acc: float) -> float:
        """Predicted OOD accuracy (%) for an ID accuracy (%)."""
        return 100.0 * sigmoid(self.slope * logit(id_acc) + self.intercept)

    def predict_interval(self, id_acc: float) -> tuple[float, float] | None:
        """The line's confidence band at an ID accuracy, mapped back to OOD accuracy (%)."""
        if None in (self.s2, self.x_mean, self.sxx, self.t) or not math.isfinite(logit(id_acc)):
            return None
        x0 = logit(id_acc)
        y0 = self.slope * x0 + self.intercept
        half = self.t * math.sqrt(self.s2 * (1 / self.n + (x0 - self.x_mean) ** 2 / self.sxx))
        return 100.0 * sigmoid(y0 - half), 100.0 * sigmoid(y0 + half)

    @property
    def slope_interval(self) -> tuple[float, float] | None:
        if None in (self.s2, self.sxx, self.t) or not self.sxx:
            return None
        half = self.t * math.sqrt(self.s2 / self.sxx)
        return self.slope - half, self.slope + half

    @property
    def weak(self) -> str | None:
        """Why the fit is too weak to read (None: it is not, or it was given, not fitted)."""
        if not self.reference:
            return None
        if self.n < 3:
            return f"a line through {self.n} models has no interval"
        ci = self.slope_interval
        if ci is not None and ci[0] <= 0 <= ci[1]:
            return (f"the slope's {self.interval_level:.0%} interval [{ci[0]:.2f}, {ci[1]:.2f}] "
                    f"holds 0 (R^2 = {self.r2:.2f}): ID accuracy does not predict OOD accuracy "
                    "over these models")
        return None

    def effective_robustness(self, id_acc: float, ood_acc: float) -> float | None:
        """OOD accuracy minus the prediction, in points (None at an ID accuracy of 0 or 100)."""
        if not math.isfinite(logit(id_acc)):
            return None
        return ood_acc - self.predict(id_acc)

    def er_interval(self, id_acc: float, ood_acc: float) -> tuple[float, float] | None:
        """ER's interval from the line's confidence band (the model's own accuracies taken as
        measured): ``[OOD - upper band, OOD - lower band]``."""
        band = self.predict_interval(id_acc)
        return None if band is None else (ood_acc - band[1], ood_acc - band[0])

    def as_dict(self) -> dict:
        out = asdict(self)
        out["slope_interval"] = self.slope_interval
        out["weak"] = self.weak
        return out


def fit_logit_linear(points: Mapping[str, tuple[float, float]], id_dataset: str,
                     ood_dataset: str, x_axis: str = "all-classes",
                     alpha: float = 0.05) -> LogitFit:
    """Least-squares fit of logit(OOD acc) on logit(ID acc) over ``{model: (id_acc, ood_acc)}``
    (percent), with the statistics of its confidence band (:class:`LogitFit`). Models at 0 or
    100% on either side have no finite logit and are refused."""
    bad = [m for m, (x, y) in points.items()
           if not (math.isfinite(logit(x)) and math.isfinite(logit(y)))]
    if bad:
        raise RobenchError(
            f"effective robustness {id_dataset} -> {ood_dataset}: {', '.join(sorted(bad))} "
            "have an accuracy of 0 or 100%, whose logit is infinite",
            "leave those models out of the reference set (analysis.er_reference)")
    xs = np.array([logit(x) for x, _ in points.values()])
    ys = np.array([logit(y) for _, y in points.values()])
    if len(xs) < 2 or np.ptp(xs) == 0:
        raise RobenchError(
            f"effective robustness {id_dataset} -> {ood_dataset}: a line needs at least 2 "
            f"reference models with different {id_dataset} accuracies, got {len(xs)}",
            "name more models in analysis.er_reference (or 'all' for every model of the run)")
    slope, intercept = np.polyfit(xs, ys, 1)
    resid = ys - (slope * xs + intercept)
    ss_tot = float(((ys - ys.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else None
    names = sorted(points)
    n = len(names)
    band: dict[str, float | None] = {"s2": None, "x_mean": None, "sxx": None, "t": None}
    if n >= 3:
        from scipy.special import stdtrit  # scipy.stats costs a second and a half of start-up

        band = {"s2": float((resid ** 2).sum()) / (n - 2), "x_mean": float(xs.mean()),
                "sxx": float(((xs - xs.mean()) ** 2).sum()),
                "t": float(stdtrit(n - 2, 1 - alpha / 2))}
    return LogitFit(float(slope), float(intercept), id_dataset, ood_dataset,
                    f"least-squares fit over {n} models of the suite", names, n, r2, x_axis,
                    interval_level=1 - alpha, **band)


def load_fits(path: str | Path) -> list[LogitFit]:
    """Shipped or user coefficients: a JSON/YAML list of ``{id_dataset, ood_dataset, slope,
    intercept, source}`` (``source`` is required: a fit without provenance is not a reference)."""
    import yaml

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RobenchError(f"cannot read effective-robustness coefficients {p}: {e}",
                           "point analysis.er_fits at a readable JSON/YAML file") from e
    entries = raw.get("fits") if isinstance(raw, dict) else raw
    if not isinstance(entries, list):
        raise RobenchError(f"{p}: expected a list of fits (or {{fits: [...]}})",
                           "write each fit as {id_dataset, ood_dataset, slope, intercept, source}")
    fits = []
    for i, e in enumerate(entries):
        keys = ("id_dataset", "ood_dataset", "slope", "intercept", "source", "x_axis")
        missing = [k for k in keys if not isinstance(e, dict) or e.get(k) in (None, "")]
        if missing:
            raise RobenchError(f"{p}: fit {i} lacks {', '.join(missing)}",
                               "give every fit id_dataset, ood_dataset, slope, intercept, the "
                               "source of the numbers and its x_axis (all-classes: the ID set's "
                               "accuracy over all its classes; ood-classes: over the shifted "
                               "set's own classes, as Taori et al. for ImageNet-R/-A)")
        if e["x_axis"] not in X_AXES:
            raise RobenchError(f"{p}: fit {i} has x_axis {e['x_axis']!r}",
                               f"use one of {', '.join(X_AXES)}")
        fits.append(LogitFit(float(e["slope"]), float(e["intercept"]), str(e["id_dataset"]),
                             str(e["ood_dataset"]), f"{e['source']} (from {p.name})", [],
                             int(e.get("n", 0)), e.get("r2"), str(e["x_axis"])))
    return fits


# --------------------------------------------------------------------------------------------
# mCE
# --------------------------------------------------------------------------------------------


@dataclass
class CorruptionBaseline:
    """Per-corruption mean error (fraction) of the normalising model, and its clean error."""

    name: str
    corruption_error: dict[str, float]
    clean_error: float | None
    source: str


def shipped_baselines() -> dict[str, dict]:
    text = resources.files("robench.data").joinpath("metadata/mce_baselines.json").read_text()
    return json.loads(text)


def shipped_baseline(name: str, dataset: str, check: bool = True) -> CorruptionBaseline | None:
    """The shipped baseline ``name`` if it applies to ``dataset`` by name (AlexNet: ImageNet-C
    only); ``check=False`` after :func:`shipped_baseline_problem` cleared a generated set."""
    entry = shipped_baselines().get(name)
    if entry is None or (check and dataset not in entry["datasets"]):
        return None
    return CorruptionBaseline(name, dict(entry["corruption_error"]), entry.get("clean_error"),
                              f"{entry['corruption_error_source']} Clean error: "
                              f"{entry['clean_error_source']}")


def shipped_baseline_problem(name: str, dataset: str, generated: Mapping | None,
                             summary_groups: Sequence[str]) -> str | None:
    """Why the shipped baseline ``name`` does not normalise a cell of ``dataset``, or ``None``
    when it does.

    The cell's ``generated`` (the record's ``data.generated``: protocol, resize, base of a set
    robench made; ``None`` for a released set) and headline groups decide:

    * a released set must be one the baseline was measured on (``datasets`` of its entry, the
      registered names of the released sets: ``imagenet-c``);
    * a generated set must have been made from one of the entry's ``generated_from`` datasets
      (ImageNet val) with the entry's ``protocol`` and ``resize`` (``imagenet-c``,
      ``256-crop-224``: what make_imagenet_c.py did);
    * either way the headline must average exactly the 15 standard corruptions x 5 severities,
      the groups AlexNet's errors are means over.
    """
    entry = shipped_baselines().get(name)
    if entry is None:
        return f"no shipped baseline {name!r}"
    what = f"{name}'s errors are those of {', '.join(entry['datasets'])}"
    if generated:
        made = (f"{dataset} is a generated set (protocol {generated.get('protocol')}, resize "
                f"{generated.get('resize')}, from {generated.get('base')})")
        if generated.get("protocol") != entry.get("protocol") or \
                generated.get("resize") != entry.get("resize"):
            return (f"{made}; {what}, measured with protocol {entry.get('protocol')} and "
                    f"resize {entry.get('resize')}")
        if generated.get("base") not in (entry.get("generated_from") or []):
            return (f"{made}; {what}, made from "
                    f"{', '.join(entry.get('generated_from') or []) or 'their own images'}")
    elif dataset not in entry["datasets"]:
        return f"{what}, not of {dataset}"
    from robench.data.corruptions import SEVERITIES, STANDARD_CORRUPTIONS

    want = {f"{c}/{s}" for c in STANDARD_CORRUPTIONS for s in SEVERITIES}
    have = {str(g) for g in summary_groups}
    if have != want:
        n = len({g.rpartition("/")[0] for g in have & want})
        return (f"{dataset}'s headline averages {len(have)} groups ({n} of the 15 standard "
                f"corruptions), not the 15 corruptions x 5 severities {name}'s mCE is defined on")
    return None


def corruption_errors(groups: Mapping[str, Mapping], summary: Sequence[str]
                      ) -> dict[str, list[float]]:
    """``{corruption: [top-1 error (fraction) per severity]}`` of the headline's groups
    (``"<corruption>/<severity>"``), severities in ascending order."""
    out: dict[str, list[tuple[float, float]]] = {}
    for g in summary:
        name, _, sev = str(g).rpartition("/")
        acc = (groups.get(g) or {}).get("acc1")
        if not name or acc is None:
            continue
        out.setdefault(name, []).append((float(sev) if sev.replace(".", "").isdigit() else 0.0,
                                         1.0 - float(acc) / 100.0))
    return {c: [e for _, e in sorted(v)] for c, v in out.items()}


def baseline_from_model(name: str, groups: Mapping[str, Mapping], summary: Sequence[str],
                        clean_acc: float | None) -> CorruptionBaseline:
    errs = corruption_errors(groups, summary)
    return CorruptionBaseline(name, {c: float(np.mean(v)) for c, v in errs.items()},
                              None if clean_acc is None else 1.0 - clean_acc / 100.0,
                              f"model {name} of this suite, from its records")


def mce(errors: Mapping[str, Sequence[float]], clean_error: float | None,
        baseline: CorruptionBaseline) -> dict:
    """mCE and relative mCE (%, see the module docstring) over the corruptions both sides have;
    a corruption of the model missing from the baseline is an error (it would bias the mean)."""
    missing = sorted(set(errors) - set(baseline.corruption_error))
    if missing:
        raise RobenchError(f"mCE: baseline {baseline.name} has no error for {', '.join(missing)}",
                           "use a baseline that covers the headline's corruptions "
                           "(analysis.mce_baseline)")
    ce, rel = {}, {}
    for c, errs in errors.items():
        base = baseline.corruption_error[c]
        ce[c] = 100.0 * float(np.mean(errs)) / base if base > 0 else math.nan
        if clean_error is not None and baseline.clean_error is not None:
            denom = base - baseline.clean_error
            rel[c] = 100.0 * (float(np.mean(errs)) - clean_error) / denom if denom != 0 \
                else math.nan
    out = {"baseline": baseline.name, "baseline_source": baseline.source,
           "n_corruptions": len(ce), "mce": float(np.mean(list(ce.values()))), "ce": ce}
    if rel:
        out.update(relative_mce=float(np.mean(list(rel.values()))), relative_ce=rel,
                   clean_error=clean_error)
    return out
