"""Paired comparisons of two models on the same samples: the delta of every headline metric
with a paired-bootstrap interval, and a test of the accuracy difference.

Two cells are compared only on samples known to be the same: rows are paired by ``sample_id``
(the relative path stored beside each record) when both cells have one, else by row index after
checking that the labels, groups and data manifests agree (generated -C sets carry no paths).
Nothing is assumed: a mismatch is a :class:`~robench.errors.RobenchError` naming it.

Paired bootstrap (Efron & Tibshirani 1993, ch. 13): replicate ``r`` draws ONE multiset of
samples and evaluates both models on it, so the replicate of ``delta = metric(model) -
metric(reference)`` keeps the correlation between the two models' errors and its interval is far
narrower than two independent intervals would suggest. The unit drawn is the base image
(:mod:`robench.clustered`): for a -C set every group's copies of the drawn images, one draw
shared by all groups, since the copies of one image are not independent samples; for any other
set each sample. The headline delta of a -C set is the unweighted mean over the headline's
groups, as the headline metric itself is; ``ood_auroc`` resamples the paired ID set too (from
the same replicate's generator). The interval is :func:`robench.metrics.shifted_interval`:
the percentile interval of the replicates shifted by their bias (ECE is biased upwards under
resampling, by different amounts for the two models).

The test of acc1: on independent samples McNemar's exact test (McNemar 1947): of the ``b + c``
discordant samples (one model right, the other wrong), ``c`` favour the model; under H0 (equal
accuracy) ``c ~ Binomial(b + c, 1/2)`` and the two-sided p-value is ``min(1, 2 P(X <= min(b,
c)))``, the binomial CDF from ``scipy.special.bdtr`` (statsmodels' ``mcnemar(exact=True)``
computes the same; scipy.stats is not imported because it alone costs a second and a half of
start-up). On a -C set, whose rows are copies of base images, the clustered McNemar test of
:func:`robench.clustered.clustered_mcnemar` instead. The record names the test used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from robench.clustered import (
    Clusters,
    GroupedMetrics,
    SampleValues,
    clustered_mcnemar,
    mean_over_groups,
)
from robench.errors import RobenchError
from robench.metrics import draw_counts, replicate_generators, shifted_interval
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


def _interval(point: float, reps: np.ndarray, alpha: float) -> dict[str, float]:
    """A delta with its :func:`robench.metrics.shifted_interval` and the replicates' bias."""
    r = np.asarray(reps, dtype=np.float64)
    r = r[~np.isnan(r)]
    lo, hi = shifted_interval(point, r, alpha)
    bias = float(r.mean() - point) if r.size and not math.isnan(point) else math.nan
    return {"value": point, "ci_low": lo, "ci_high": hi, "bias": bias}


def mcnemar_exact(model_correct: np.ndarray, reference_correct: np.ndarray) -> dict:
    """McNemar's exact test on paired correctness (see the module docstring)."""
    m, r = np.asarray(model_correct, bool), np.asarray(reference_correct, bool)
    c = int(np.count_nonzero(m & ~r))  # only the model right
    b = int(np.count_nonzero(~m & r))  # only the reference right
    from scipy.special import bdtr  # imported here: a run with nothing to compare skips it

    p = 1.0 if b + c == 0 else min(1.0, 2.0 * float(bdtr(min(b, c), b + c, 0.5)))
    return {"test": "McNemar, exact (two-sided binomial on discordant pairs)",
            "model_only_correct": c, "reference_only_correct": b, "n_discordant": b + c,
            "p_value": p}


def base_ids(model: CellOutputs, reference: CellOutputs, pairing: Pairing,
             what: str) -> np.ndarray | None:
    """The base image of each paired sample (None: every sample is its own); both cells must
    agree on it."""
    a = None if model.base is None else np.asarray(model.base)[pairing.a_rows]
    b = None if reference.base is None else np.asarray(reference.base)[pairing.b_rows]
    if (a is None) != (b is None) or (a is not None and not np.array_equal(a, b)):
        raise RobenchError(f"{what}: the cells disagree on which base image each sample is a "
                           "copy of", "re-run both cells with this robench")
    return a


def paired_bootstrap(model: CellOutputs, reference: CellOutputs, *,
                     summary_groups: Sequence[str] | None, n_bins: int, n_bootstrap: int,
                     seed: int, what: str = "the two cells"
                     ) -> tuple[dict[str, float], dict[str, np.ndarray], dict]:
    """(point deltas, replicate deltas, pairing facts) of the headline metrics, model minus
    reference.

    Exact protocol (so a naive loop can reproduce it): the headline's paired samples (rows of
    its groups, in pairing order: rows, or sorted sample ids) form clusters by base image
    (:class:`robench.clustered.Clusters`, clusters in base-id order; without base ids each
    sample is one); replicate r draws ``draw_counts(rng_r, n_clusters)`` with ``rng_r =
    replicate_generators(seed, n_bootstrap)[r]``, then, only when both cells carry
    ``ood_id_conf``, the ID side ``draw_counts(rng_r, n_id)``; both models are scored on that
    multiset, each group's metric on its copies of the drawn images.
    """
    pairing = pair_samples(model, reference, what)
    if pairing.a_rows.size == 0:
        raise RobenchError(f"{what}: no decodable sample in common", "check the data")
    base = base_ids(model, reference, pairing, what)
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
    clusters = Clusters.of(None if base is None else base[used], used.size)
    sides = [SampleValues.of(out.samples.take(rows[used]))
             for out, rows in ((model, pairing.a_rows), (reference, pairing.b_rows))]
    evaluators = [GroupedMetrics(side, grp, len(group_rows), n_bins,
                                 None if ood is None else ood[i])
                  for i, side in enumerate(sides)]

    def headline(w: np.ndarray, w_id: np.ndarray | None) -> dict[str, float]:
        ma, mb = (ev(w, w_id) for ev in evaluators)
        return {k: mean_over_groups(ma[k]) - mean_over_groups(mb[k]) for k in ma}

    point = headline(np.ones(used.size, np.int64),
                     np.ones(ood[0].size, np.int64) if ood else None)
    reps = {k: np.full(int(n_bootstrap), np.nan) for k in point}
    for r, rng in enumerate(replicate_generators(seed, int(n_bootstrap))):
        w = clusters.weights(draw_counts(rng, clusters.k))
        w_id = draw_counts(rng, ood[0].size) if ood else None
        for k, v in headline(w, w_id).items():
            reps[k][r] = v
    facts = {"n_paired": int(pairing.a_rows.size), "pairing": pairing.how,
             "n_groups": len(group_rows) if names else None,
             "resampled": "samples" if clusters.trivial else
             f"{clusters.k} base images (each drawn with all its copies)",
             "model_correct": sides[0].correct, "reference_correct": sides[1].correct,
             "clusters": clusters}
    return point, reps, facts


def compare_cells(model: CellOutputs, reference: CellOutputs, *,
                  summary_groups: Sequence[str] | None, n_bins: int, n_bootstrap: int,
                  seed: int, alpha: float, what: str = "the two cells") -> dict:
    """Paired deltas (model - reference) of the headline metrics with their bootstrap intervals,
    and the test of the acc1 difference: McNemar's exact test on independent samples, the
    clustered McNemar test on copies of base images. See the module docstring."""
    point, reps, facts = paired_bootstrap(model, reference, summary_groups=summary_groups,
                                          n_bins=n_bins, n_bootstrap=n_bootstrap, seed=seed,
                                          what=what)
    deltas = {k: _interval(point[k], reps[k], alpha) for k in PAIRED_METRICS if k in point}
    m, r, clusters = (facts.pop(k) for k in ("model_correct", "reference_correct", "clusters"))
    test = mcnemar_exact(m, r) if clusters.trivial else clustered_mcnemar(m, r, clusters)
    if facts["n_groups"]:
        test["over"] = f"the {facts['n_groups']} groups of the headline"
    return {**facts, "delta": deltas, "test": test}
