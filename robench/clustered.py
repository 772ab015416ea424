"""Copies of an image are one sample: resampling and testing -C cells by their base images.

A -C set (CIFAR-10-C, ImageNet-C, a set made by ``robench data corrupt``) holds G groups
(corruption x severity) of corrupted copies of the SAME K base images, so a model's errors are
correlated across the groups: image k that a model gets wrong at ``fog/1`` it likely gets wrong at
``fog/2`` too. Treating the G x K rows as independent samples made intervals 2-3x too narrow and
p-values too small by many orders of magnitude (the second review of robench). Here the unit of
resampling is the base image (a *cluster*; Davison & Hinkley 1997, section 3.8, "the
nonparametric bootstrap for clustered data": resample whole clusters), the same draw for every
group, and the test of a paired accuracy difference is at the image level.

* :class:`Clusters` maps each row to its base image (the data family declares the base index:
  the row within a group for array and generated sets, the path within the corruption/severity
  folder for ImageNet-C; see ``ImageSource.base_index``). Without one every row is its own
  cluster, which is the ordinary bootstrap.
* :class:`GroupedMetrics` evaluates one model's headline metrics per group for a weighted sample
  (a bootstrap replicate's counts), all groups vectorised, O(n) per replicate.
* :func:`headline_intervals` gives a -C headline (the unweighted mean over its groups) its
  intervals, and :func:`robench.compare.paired_bootstrap` draws the same way for deltas.
* :func:`clustered_mcnemar` tests a paired accuracy difference with the clustered McNemar
  statistic (Durkalski et al. 2003).

The draw protocol, exact so that a naive loop reproduces it: replicate r uses
``rng_r = robench.metrics.replicate_generators(seed, n_bootstrap)[r]`` and first draws the
clusters, ``robench.metrics.draw_counts(rng_r, K)`` (clusters in the order of their base id);
a sample's weight is its cluster's count. A paired ``ood_auroc`` then draws its ID set from the
same generator, ``draw_counts(rng_r, n_id)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from robench.metrics import (
    NLL_EPS,
    UNIT,
    SampleOutputs,
    _bin_index,
    draw_counts,
    replicate_generators,
    shifted_interval,
)

# the statistics a -C headline gets an interval for, with the range each is clipped to
HEADLINE_INTERVALS: dict[str, tuple[float, float]] = {"acc1": (0.0, 100.0), "ece": UNIT,
                                                      "auroc": UNIT}


@dataclass(frozen=True)
class Clusters:
    """Row ``i`` belongs to cluster ``index[i]`` (``0 <= index < k``, clusters in the order of
    their base id); a bootstrap draw gives each cluster a count and each row its cluster's."""

    index: NDArray[np.intp]
    k: int

    @classmethod
    def of(cls, base: NDArray | None, n: int) -> Clusters:
        """Clusters of ``n`` rows from their base ids (None: every row is its own cluster)."""
        if base is None:
            return cls(np.arange(n, dtype=np.intp), n)
        ids, index = np.unique(np.asarray(base), return_inverse=True)
        return cls(index.astype(np.intp).ravel(), int(ids.size))

    @property
    def trivial(self) -> bool:
        """Every row is its own cluster (independent samples)."""
        return self.k == self.index.size

    def weights(self, counts: NDArray) -> NDArray:
        return counts[self.index]


@dataclass(frozen=True)
class SampleValues:
    """One model's per-sample values that the headline metrics average or rank."""

    correct: NDArray[np.bool_]
    top5: NDArray[np.bool_]
    nll: NDArray[np.float64]
    brier: NDArray[np.float64]
    conf: NDArray[np.float64]

    @classmethod
    def of(cls, s: SampleOutputs) -> SampleValues:
        """From exact per-sample outputs: ``nll = min(-log p_y, -log 1e-12)``, ``brier = sum_k
        p_k^2 - 2 p_y + 1``, top-5 correct (always, with at most 5 classes)."""
        lp = s.log_p_label
        top5 = s.label_rank < 5 if s.num_classes > 5 else np.ones(len(s), dtype=bool)
        return cls(correct=s.correct, top5=top5, nll=np.minimum(-lp, -math.log(NLL_EPS)),
                   brier=s.sum_sq_prob - 2.0 * np.exp(lp) + 1.0, conf=s.conf)

    def take(self, rows: NDArray) -> SampleValues:
        return SampleValues(*(getattr(self, f)[rows] for f in
                              ("correct", "top5", "nll", "brier", "conf")))


class GroupedAUROC:
    """Per-group AUROC of a weighted sample (scores higher for positives), all groups at once.

    The samples are sorted by (group, score) once; a replicate's weights then give, through one
    cumulative sum of the negatives' weights, each positive's weighted count of same-group
    negatives below it (plus half of those tied with it): the Mann-Whitney statistic with
    average ranks, per group, O(n) per replicate. With unit weights it equals
    :func:`robench.metrics.auroc` of each group.
    """

    def __init__(self, score: NDArray, positive: NDArray, group: NDArray, n_groups: int) -> None:
        self.order = np.lexsort((score, group))
        s, g, pos = score[self.order], group[self.order], positive[self.order]
        n = s.size
        new_group = np.r_[True, g[1:] != g[:-1]]
        new_tie = new_group | np.r_[True, s[1:] != s[:-1]]
        tie_start = np.maximum.accumulate(np.where(new_tie, np.arange(n), 0))
        tie_end = np.r_[np.flatnonzero(new_tie)[1:], n][np.cumsum(new_tie) - 1]
        group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
        self.neg = ~pos
        self.pos_at = np.flatnonzero(pos)
        self.p_tie_start, self.p_tie_end = tie_start[self.pos_at], tie_end[self.pos_at]
        self.p_group_start = group_start[self.pos_at]
        self.p_group, self.group, self.n_groups = g[self.pos_at], g, n_groups

    def __call__(self, w: NDArray) -> NDArray[np.float64]:
        ws = w[self.order].astype(np.float64)
        cum = np.r_[0.0, np.cumsum(ws * self.neg)]
        below = cum[self.p_tie_start] - cum[self.p_group_start]
        tied = cum[self.p_tie_end] - cum[self.p_tie_start]
        wp = ws[self.pos_at]
        num = np.bincount(self.p_group, wp * (below + 0.5 * tied), minlength=self.n_groups)
        w_pos = np.bincount(self.p_group, wp, minlength=self.n_groups)
        w_all = np.bincount(self.group, ws, minlength=self.n_groups)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = num / (w_pos * (w_all - w_pos))
        out[(w_pos == 0) | (w_all == w_pos)] = np.nan
        return out


class GroupedOODAUROC:
    """Per-group OOD AUROC of weighted samples: group g's value is P(MSP_id > MSP_g) + 1/2
    P(MSP_id = MSP_g) (the ID samples positive, :func:`robench.metrics.auroc` with average
    ranks), the ID set shared by every group.

    Each OOD sample's place among the sorted ID confidences (strictly below it, and up to its
    ties) is found once; a replicate then costs one cumulative sum of the ID weights and one
    gather per OOD sample, O(n_id + n_ood) instead of scoring n_groups copies of the ID set.
    """

    def __init__(self, id_conf: NDArray, conf: NDArray, group: NDArray, n_groups: int) -> None:
        self.id_order = np.argsort(id_conf, kind="stable")
        s = id_conf[self.id_order]
        self.lo = np.searchsorted(s, conf, side="left")  # ID samples below conf_j
        self.hi = np.searchsorted(s, conf, side="right")  # ... and tied with it
        self.group, self.n_groups = group, n_groups

    def __call__(self, w_id: NDArray, w: NDArray) -> NDArray[np.float64]:
        cum = np.r_[0.0, np.cumsum(w_id[self.id_order].astype(np.float64))]
        total = cum[-1]
        above, tied = total - cum[self.hi], cum[self.hi] - cum[self.lo]
        num = np.bincount(self.group, w * (above + 0.5 * tied), minlength=self.n_groups)
        w_g = np.bincount(self.group, w, minlength=self.n_groups).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = num / (total * w_g)
        out[(w_g == 0) | (total == 0)] = np.nan
        return out


class GroupedMetrics:
    """One model's headline metrics per group of a weighted sample, all groups vectorised.

    For weights ``w`` (a replicate's counts per row) and group g: a mean metric is
    ``sum_{i in g} w_i v_i / sum_{i in g} w_i``; ECE is ``sum_b |sum_{i in g, b} w_i (correct_i -
    conf_i)| / sum_{i in g} w_i`` over ECE's equal-width bins; AUROC is :class:`GroupedAUROC`,
    OOD AUROC :class:`GroupedOODAUROC`. With unit weights each equals the group's own metric.
    ``keys`` limits the work to the metrics asked for.
    """

    MEANS = ("acc1", "acc5", "nll", "brier")

    def __init__(self, values: SampleValues, group: NDArray, n_groups: int, n_bins: int,
                 id_conf: NDArray | None = None,
                 keys: Sequence[str] = ("acc1", "acc5", "ece", "auroc", "nll", "brier",
                                        "ood_auroc")) -> None:
        self.group, self.n_groups, self.n_bins, self.keys = group, n_groups, n_bins, tuple(keys)
        self.values = {k: v for k, v in (("acc1", values.correct * 100.0),
                                         ("acc5", values.top5 * 100.0), ("nll", values.nll),
                                         ("brier", values.brier)) if k in self.keys}
        self.bin_key = group * n_bins + _bin_index(values.conf, n_bins)
        self.gap = values.correct - values.conf
        self.auroc = GroupedAUROC(values.conf, values.correct, group, n_groups) \
            if "auroc" in self.keys else None
        self.ood = None if id_conf is None or "ood_auroc" not in self.keys else \
            GroupedOODAUROC(id_conf, values.conf, group, n_groups)

    def __call__(self, w: NDArray, w_id: NDArray | None = None) -> dict[str, NDArray]:
        total = np.bincount(self.group, w, minlength=self.n_groups).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = {k: np.bincount(self.group, w * v, minlength=self.n_groups) / total
                   for k, v in self.values.items()}
            if "ece" in self.keys:
                gaps = np.bincount(self.bin_key, w * self.gap,
                                   minlength=self.n_groups * self.n_bins)
                out["ece"] = np.abs(gaps.reshape(self.n_groups, self.n_bins)).sum(axis=1) / total
        if self.auroc is not None:
            out["auroc"] = self.auroc(w)
        if self.ood is not None and w_id is not None:
            out["ood_auroc"] = self.ood(w_id, w)
        return out


def mean_over_groups(per_group: NDArray) -> float:
    """The headline: the unweighted mean over the groups where the metric is defined."""
    finite = per_group[~np.isnan(per_group)]
    return float(finite.mean()) if finite.size else float("nan")


def headline_intervals(values: SampleValues, group: NDArray, n_groups: int, clusters: Clusters,
                       points: dict[str, float], *, n_bins: int, n_bootstrap: int, seed: int,
                       alpha: float) -> dict[str, float]:
    """``{metric_ci_low, metric_ci_high}`` of a grouped headline (acc1, ECE, AUROC: the mean over
    the groups) by the bootstrap over clusters (module docstring): every replicate draws base
    images once, scores each group on its copies of them and averages over the groups; the
    interval is :func:`robench.metrics.shifted_interval` around ``points``."""
    keys = [k for k in HEADLINE_INTERVALS if k in points]
    metrics = GroupedMetrics(values, group, n_groups, n_bins, keys=keys)
    reps = {k: np.full(n_bootstrap, np.nan) for k in keys}
    for r, rng in enumerate(replicate_generators(seed, n_bootstrap)):
        per_group = metrics(clusters.weights(draw_counts(rng, clusters.k)))
        for k in keys:
            reps[k][r] = mean_over_groups(per_group[k])
    out: dict[str, float] = {}
    for k in keys:
        out[f"{k}_ci_low"], out[f"{k}_ci_high"] = shifted_interval(points[k], reps[k], alpha,
                                                                   HEADLINE_INTERVALS[k])
    return out


def clustered_mcnemar(model_correct: NDArray, reference_correct: NDArray,
                      clusters: Clusters) -> dict:
    """The clustered McNemar test of paired correctness (Durkalski, Palesch, Lipsitz & Rust,
    "Analysis of clustered matched-pair data", Statistics in Medicine 22, 2003).

    With ``e_k`` = (copies of base image k only the model gets right) - (copies only the
    reference gets right), ``X2 = (sum_k e_k)^2 / sum_k e_k^2``, chi-square with 1 degree of
    freedom under H0 (equal accuracy): a score test whose variance is estimated from the
    clusters, so correlated copies of an image count once. With one row per cluster ``e_k`` is
    -1, 0 or 1 and ``X2 = (c - b)^2 / (b + c)``, McNemar's statistic without continuity
    correction. The p-value is ``scipy.special.chdtrc(1, X2)``.
    """
    from scipy.special import chdtrc  # scipy.stats costs a second and a half of start-up

    m, r = np.asarray(model_correct, bool), np.asarray(reference_correct, bool)
    diff = (m & ~r).astype(np.float64) - (~m & r)
    e = np.bincount(clusters.index, weights=diff, minlength=clusters.k)
    den = float((e * e).sum())
    stat = float(e.sum()) ** 2 / den if den > 0 else 0.0
    return {"test": "clustered McNemar (Durkalski et al. 2003): X2 = (sum_k e_k)^2 / "
                    "sum_k e_k^2 over base images k, chi2 with 1 df",
            "model_only_correct": int(np.count_nonzero(m & ~r)),
            "reference_only_correct": int(np.count_nonzero(~m & r)),
            "n_discordant": int(np.count_nonzero(m != r)), "n_clusters": clusters.k,
            "statistic": stat, "p_value": 1.0 if den == 0 else float(chdtrc(1, stat))}
