"""Paired comparisons of two models on the same samples: the delta of every headline metric
with a paired-bootstrap interval, and McNemar's exact test for top-1 accuracy.

Two cells are compared only on samples known to be the same: rows are paired by ``sample_id``
(the relative path stored beside each record) when both cells have one, else by row index after
checking that the labels, groups and data manifests agree (generated -C sets carry no paths).
Nothing is assumed: a mismatch is a :class:`~robench.errors.RobenchError` naming it.

Paired bootstrap (Efron & Tibshirani 1993, ch. 13; the same count-vector protocol as
:func:`robench.metrics.bootstrap_replicates`): replicate ``r`` draws ONE multiset of samples and
evaluates both models on it, so the replicate of ``delta = metric(model) - metric(reference)``
keeps the correlation between the two models' errors and its interval is far narrower than two
independent intervals would suggest. Datasets with groups (-C sets) are resampled within each
group (stratified), and the headline delta is the unweighted mean over the headline's groups, as
the headline metric itself is; ``ood_auroc`` resamples the paired ID set too (one draw shared by
every group of a replicate). The interval is the percentile interval of the replicates shifted
by their bias (mean replicate - point estimate): ECE is biased upwards under resampling, by
different amounts for the two models, and an unshifted interval of an ECE delta can miss the
point estimate altogether.

McNemar's test (McNemar 1947) in its exact form: of the ``b + c`` discordant samples (one model
right, the other wrong), ``c`` favour the model; under H0 (equal accuracy) ``c ~ Binomial(b + c,
1/2)`` and the two-sided p-value is ``min(1, 2 P(X <= min(b, c)))`` with ``X ~ Binomial(b + c,
1/2)``, the binomial CDF from ``scipy.special.bdtr`` (Edwards 1948; statsmodels'
``mcnemar(exact=True)`` computes the same, and ``scipy.stats.binomtest`` agrees to 1e-13;
scipy.stats is not imported because it alone costs a second and a half of start-up). For a -C
set it pools the samples of the headline's groups, which tests the headline mean when the groups
are of equal size (as in CIFAR-10-C and ImageNet-C).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from robench.errors import RobenchError
from robench.metrics import NLL_EPS, _bin_index, percentile_interval
from robench.scoring import CellOutputs

# The headline metrics a comparison reports (ood_auroc where both cells have it).
PAIRED_METRICS = ("acc1", "acc5", "ece", "auroc", "nll", "brier", "ood_auroc")


@dataclass(frozen=True)
class Pairing:
    """Rows ``a_rows[k]`` of one cell and ``b_rows[k]`` of the other are the same sample."""

    a_rows: np.ndarray
    b_rows: np.ndarray
    how: str  # "sample_id" or "row index"


def pair_samples(a: CellOutputs, b: CellOutputs, what: str = "the two cells") -> Pairing:
    """Pair the decodable samples of two cells of one dataset by identity.

    By ``sample_id`` when both cells store one (any order; the sets must be equal), else by row
    index when neither does and the labels and groups agree row by row. Labels must agree on the
    paired rows either way; rows undecodable in either cell are left out.
    """
    if (a.sample_ids is None) != (b.sample_ids is None):
        raise RobenchError(f"{what}: one cell stores sample ids and the other does not, so their "
                           "samples cannot be paired", "re-run both cells with this robench")
    if a.sample_ids is not None:
        ids_a, ids_b = np.asarray(a.sample_ids), np.asarray(b.sample_ids)
        if ids_a.shape == ids_b.shape and np.array_equal(ids_a, ids_b):
            a_rows = b_rows = np.arange(len(ids_a))
        else:
            if len(set(ids_a.tolist())) != len(ids_a) or len(set(ids_b.tolist())) != len(ids_b):
                raise RobenchError(f"{what}: duplicate sample ids", "re-run the cells")
            if set(ids_a.tolist()) != set(ids_b.tolist()):
                raise RobenchError(f"{what}: the cells hold different samples",
                                   "compare cells of the same dataset files")
            order_a, order_b = np.argsort(ids_a, kind="stable"), np.argsort(ids_b, kind="stable")
            a_rows, b_rows = order_a, order_b  # equal sorted ids: position k is one sample
        how = "sample_id"
    else:
        if len(a.label) != len(b.label):
            raise RobenchError(f"{what}: {len(a.label)} vs {len(b.label)} samples",
                               "compare cells of the same dataset files")
        if a.group_names != b.group_names or not np.array_equal(a.group, b.group):
            raise RobenchError(f"{what}: the cells' groups differ row by row",
                               "compare cells of the same dataset files")
        a_rows = b_rows = np.arange(len(a.label))
        how = "row index"
    if not np.array_equal(np.asarray(a.label)[a_rows], np.asarray(b.label)[b_rows]):
        raise RobenchError(f"{what}: paired samples have different labels",
                           "compare cells of the same dataset (same label space)")
    keep = np.asarray(a.valid)[a_rows] & np.asarray(b.valid)[b_rows]
    return Pairing(a_rows[keep], b_rows[keep], how)


@dataclass
class _Side:
    """One model's per-sample values on the paired rows (row k = paired sample k)."""

    correct: np.ndarray
    top5: np.ndarray
    nll: np.ndarray
    brier: np.ndarray
    conf: np.ndarray

    @classmethod
    def of(cls, out: CellOutputs, rows: np.ndarray) -> _Side:
        s = out.samples.take(rows)
        lp = s.log_p_label
        return cls(correct=s.correct, top5=s.label_rank < 5 if s.num_classes > 5
                   else np.ones(len(rows), dtype=bool),
                   nll=np.minimum(-lp, -math.log(NLL_EPS)),
                   brier=s.sum_sq_prob - 2.0 * np.exp(lp) + 1.0, conf=s.conf)


class _GroupedAUROC:
    """Per-group AUROC of a weighted sample (scores higher for positives), all groups at once.

    The samples are sorted by (group, score) once; a replicate's weights then give, through one
    cumulative sum of the negatives' weights, each positive's weighted count of same-group
    negatives below it (plus half of those tied with it): the Mann-Whitney statistic with
    average ranks, per group, O(n) per replicate. With unit weights it equals
    :func:`robench.metrics.auroc` of each group.
    """

    def __init__(self, score: np.ndarray, positive: np.ndarray, group: np.ndarray,
                 n_groups: int) -> None:
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

    def __call__(self, w: np.ndarray) -> np.ndarray:
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


class _GroupedOODAUROC:
    """Per-group OOD AUROC of weighted samples: group g's value is P(MSP_id > MSP_g) + 1/2
    P(MSP_id = MSP_g) (the ID samples positive, :func:`robench.metrics.auroc` with average
    ranks), the ID set shared by every group.

    Each OOD sample's place among the sorted ID confidences (strictly below it, and up to its
    ties) is found once; a replicate then costs one cumulative sum of the ID weights and one
    gather per OOD sample, O(n_id + n_ood) instead of scoring n_groups copies of the ID set.
    """

    def __init__(self, id_conf: np.ndarray, conf: np.ndarray, group: np.ndarray,
                 n_groups: int) -> None:
        self.id_order = np.argsort(id_conf, kind="stable")
        s = id_conf[self.id_order]
        self.lo = np.searchsorted(s, conf, side="left")  # ID samples below conf_j
        self.hi = np.searchsorted(s, conf, side="right")  # ... and tied with it
        self.group, self.n_groups = group, n_groups

    def __call__(self, w_id: np.ndarray, w: np.ndarray) -> np.ndarray:
        cum = np.r_[0.0, np.cumsum(w_id[self.id_order].astype(np.float64))]
        total = cum[-1]
        above, tied = total - cum[self.hi], cum[self.hi] - cum[self.lo]
        num = np.bincount(self.group, w * (above + 0.5 * tied), minlength=self.n_groups)
        w_g = np.bincount(self.group, w, minlength=self.n_groups).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = num / (total * w_g)
        out[(w_g == 0) | (total == 0)] = np.nan
        return out


class _GroupedSide:
    """One model's headline metrics per group of a weighted sample (all groups vectorised)."""

    def __init__(self, side: _Side, group: np.ndarray, n_groups: int, n_bins: int,
                 id_conf: np.ndarray | None) -> None:
        self.group, self.n_groups, self.n_bins = group, n_groups, n_bins
        self.values = {"acc1": side.correct * 100.0, "acc5": side.top5 * 100.0,
                       "nll": side.nll, "brier": side.brier}
        self.bin_key = group * n_bins + _bin_index(side.conf, n_bins)
        self.gap = side.correct - side.conf
        self.auroc = _GroupedAUROC(side.conf, side.correct, group, n_groups)
        self.ood = None if id_conf is None else _GroupedOODAUROC(id_conf, side.conf, group,
                                                                   n_groups)

    def metrics(self, w: np.ndarray, w_id: np.ndarray | None) -> dict[str, np.ndarray]:
        total = np.bincount(self.group, w, minlength=self.n_groups).astype(np.float64)
        out = {k: np.bincount(self.group, w * v, minlength=self.n_groups) / total
               for k, v in self.values.items()}
        gaps = np.bincount(self.bin_key, w * self.gap, minlength=self.n_groups * self.n_bins)
        out["ece"] = np.abs(gaps.reshape(self.n_groups, self.n_bins)).sum(axis=1) / total
        out["auroc"] = self.auroc(w)
        if self.ood is not None and w_id is not None:
            out["ood_auroc"] = self.ood(w_id, w)
        return out


def _interval(point: float, reps: list[float], alpha: float) -> dict[str, float]:
    """Percentile interval of the replicates shifted by their bias (mean - point): ECE is biased
    upwards under resampling, by different amounts for the two models, so the raw percentile
    interval of an ECE delta can miss the point estimate (Efron & Tibshirani 1993, 10.6)."""
    r = np.asarray(reps, dtype=np.float64)
    r = r[~np.isnan(r)]
    if r.size == 0 or math.isnan(point):
        return {"value": point, "ci_low": math.nan, "ci_high": math.nan, "bias": math.nan}
    bias = float(r.mean() - point)
    lo, hi = percentile_interval(r, alpha)
    return {"value": point, "ci_low": lo - bias, "ci_high": hi - bias, "bias": bias}


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def mcnemar_exact(model_correct: np.ndarray, reference_correct: np.ndarray) -> dict:
    """McNemar's exact test on paired correctness (see the module docstring)."""
    m, r = np.asarray(model_correct, bool), np.asarray(reference_correct, bool)
    c = int(np.count_nonzero(m & ~r))  # only the model right
    b = int(np.count_nonzero(~m & r))  # only the reference right
    from scipy.special import bdtr  # imported here: a run with nothing to compare skips it

    p = 1.0 if b + c == 0 else min(1.0, 2.0 * float(bdtr(min(b, c), b + c, 0.5)))
    return {"model_only_correct": c, "reference_only_correct": b, "n_discordant": b + c,
            "p_value": p, "test": "McNemar, exact (two-sided binomial on discordant pairs)"}


def paired_bootstrap(model: CellOutputs, reference: CellOutputs, *,
                     summary_groups: Sequence[str] | None, n_bins: int, n_bootstrap: int,
                     seed: int, what: str = "the two cells"
                     ) -> tuple[dict[str, float], dict[str, np.ndarray], dict]:
    """(point deltas, replicate deltas, pairing facts) of the headline metrics, model minus
    reference.

    Exact protocol (so a naive loop can reproduce it): with ``rng =
    np.random.default_rng(np.random.SeedSequence(seed))``, replicate r first draws the ID side
    (``rng.integers(0, n_id, n_id)``, only when both cells carry ``ood_id_conf``), then, for each
    headline group in order, ``rng.integers(0, n_g, n_g)`` positions among that group's paired
    samples (in pairing order: rows, or sorted sample ids); both models are scored on that
    multiset.
    """
    pairing = pair_samples(model, reference, what)
    if pairing.a_rows.size == 0:
        raise RobenchError(f"{what}: no decodable sample in common", "check the data")
    a, b = _Side.of(model, pairing.a_rows), _Side.of(reference, pairing.b_rows)
    groups = model.group[pairing.a_rows]
    if model.group_names:
        names = list(summary_groups or model.group_names)
        idx = [model.group_names.index(g) for g in names]
        group_rows = [np.flatnonzero(groups == i) for i in idx]
    else:
        names, group_rows = [], [np.arange(pairing.a_rows.size)]
    group_rows = [r for r in group_rows if r.size]
    if not group_rows:
        raise RobenchError(f"{what}: no paired sample in the headline's groups", "check the data")
    ood = None
    if model.ood_id_conf is not None and reference.ood_id_conf is not None:
        if model.ood_id_conf.size != reference.ood_id_conf.size:
            raise RobenchError(f"{what}: the paired ID sets differ in size", "re-run both cells")
        ood = (np.asarray(model.ood_id_conf), np.asarray(reference.ood_id_conf))
    # the headline's samples, group by group (rows outside its groups take no part)
    used = np.concatenate(group_rows)
    grp = np.repeat(np.arange(len(group_rows)), [r.size for r in group_rows])
    n_groups = len(group_rows)
    sides = [_GroupedSide(_Side(*(getattr(side, f)[used] for f in ("correct", "top5", "nll",
                                                                    "brier", "conf"))),
                          grp, n_groups, n_bins, None if ood is None else ood[i])
             for i, side in enumerate((a, b))]

    def headline(w: np.ndarray, w_id: np.ndarray | None) -> dict[str, float]:
        ma, mb = (side.metrics(w, w_id) for side in sides)
        return {k: _mean(list(ma[k])) - _mean(list(mb[k])) for k in ma}

    point = headline(np.ones(used.size, np.int64), np.ones(ood[0].size, np.int64)
                     if ood else None)
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    starts = np.r_[0, np.cumsum([r.size for r in group_rows])]
    reps = {k: np.full(int(n_bootstrap), np.nan) for k in point}
    for r in range(int(n_bootstrap)):
        w_id = np.bincount(rng.integers(0, ood[0].size, ood[0].size), minlength=ood[0].size) \
            if ood else None
        draw = np.concatenate([starts[g] + rng.integers(0, starts[g + 1] - starts[g],
                                                        starts[g + 1] - starts[g])
                               for g in range(n_groups)])
        for k, v in headline(np.bincount(draw, minlength=used.size), w_id).items():
            reps[k][r] = v
    facts = {"n_paired": int(pairing.a_rows.size), "pairing": pairing.how,
             "n_groups": n_groups if names else None,
             "model_correct": a.correct[used], "reference_correct": b.correct[used]}
    return point, reps, facts


def compare_cells(model: CellOutputs, reference: CellOutputs, *,
                  summary_groups: Sequence[str] | None, n_bins: int, n_bootstrap: int,
                  seed: int, alpha: float, what: str = "the two cells") -> dict:
    """Paired deltas (model - reference) of the headline metrics with bias-shifted percentile
    intervals, and McNemar's exact test for acc1. See the module docstring for the protocol."""
    point, reps, facts = paired_bootstrap(model, reference, summary_groups=summary_groups,
                                          n_bins=n_bins, n_bootstrap=n_bootstrap, seed=seed,
                                          what=what)
    deltas = {k: _interval(point[k], list(reps[k]), alpha) for k in PAIRED_METRICS if k in point}
    test = mcnemar_exact(facts.pop("model_correct"), facts.pop("reference_correct"))
    if facts["n_groups"]:
        test["pooled_over"] = f"the {facts['n_groups']} groups of the headline"
    return {**facts, "delta": deltas, "mcnemar": test}
