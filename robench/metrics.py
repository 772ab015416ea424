"""Accuracy, calibration and failure-detection metrics for classifier outputs (NumPy + SciPy).

Conventions shared by every function here:

* ``logits`` / ``probs`` are 2-D arrays ``(n_samples, n_classes)``; ``labels`` are integers in
  ``[0, n_classes)``. The prediction is the arg-max, ties going to the lowest class index (the
  NumPy ``argmax`` rule); top-k membership uses the same rule (a stable descending sort).
* ``conf`` is the maximum softmax probability (MSP) of the prediction and ``correct`` says whether
  the top-1 prediction equals the label.
* Accuracies and their intervals are in percent; ECE/MCE/adaptive ECE, NLL, Brier and AUROC-type
  scores are plain numbers (ECE in ``[0, 1]``, not percent).
* A metric that is undefined for the given input (e.g. a misclassification AUROC when every
  prediction is correct) is ``float('nan')``, never an exception; malformed input (wrong shape,
  labels out of range, empty arrays) raises ``ValueError``.

:func:`compute_all` produces the flat per-cell dictionary the runner stores, with seeded bootstrap
intervals for ECE and AUROC (Efron 1979; :func:`shifted_interval`, the one interval method of every
bootstrapped statistic in robench) and Clopper-Pearson intervals for accuracy.
:data:`METRIC_INFO` describes each of its keys for reports.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "METRIC_INFO",
    "BootstrapEvaluator",
    "MetricInfo",
    "accuracy_topk",
    "ADAPTIVE_BINS",
    "adaptive_bin_index",
    "adaptive_ece",
    "aupr_err",
    "auroc",
    "bootstrap_ci",
    "bootstrap_replicates",
    "brier",
    "clopper_pearson",
    "compute_all",
    "ece",
    "fpr_at_95_tpr",
    "max_calibration_error",
    "misclassification_auroc",
    "nll",
    "ood_auroc",
    "metrics_from_outputs",
    "percentile_interval",
    "replicate_generators",
    "draw_counts",
    "sample_outputs",
    "shifted_interval",
    "SampleOutputs",
    "softmax",
]

NLL_EPS = 1e-12
"""Probabilities are clipped from below at this value before taking logs (caps a sample's NLL at
about 27.6 nats, so one confidently wrong sample cannot make the mean infinite)."""

# Rows are processed in blocks of about this many elements so the several passes over each block
# (max, exp, sums, comparisons) run out of cache and temporaries stay a few MiB, whatever n is.
_CHUNK_ELEMENTS = 1 << 16


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # sched_getaffinity is Linux-only
        return os.cpu_count() or 1


# Bootstrap replicates are independent and NumPy's generators and ufuncs release the GIL, so
# threads help (about 1.5x on two idle cores); every replicate has its own random stream, so the
# results do not depend on the thread count. Small samples are not worth a thread pool.
_BOOTSTRAP_THREADS = max(1, min(4, _usable_cpus()))
_BOOTSTRAP_MIN_N_FOR_THREADS = 50_000


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def _as_scores_2d(x: ArrayLike, name: str) -> NDArray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_classes); got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty: need at least one sample")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has no columns: need at least one class")
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise ValueError(f"{name} must be a real numeric array; got dtype {arr.dtype}")
    return arr


def _as_labels(labels: ArrayLike, n: int, num_classes: int) -> NDArray[np.intp]:
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) to match the scores; got {lab.shape}")
    if lab.dtype == np.bool_ or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices; got dtype {lab.dtype}")
    lo, hi = int(lab.min()), int(lab.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for {num_classes} classes; "
            f"found values in [{lo}, {hi}]"
        )
    return lab.astype(np.intp, copy=False)


def _as_flags(x: ArrayLike, name: str) -> NDArray[np.bool_]:
    arr = np.asarray(x)
    if arr.dtype == np.bool_:
        return arr
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be boolean or 0/1; got dtype {arr.dtype}")
    if not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"{name} must contain only 0/1 (or booleans)")
    return arr != 0


def _as_scores_1d(x: ArrayLike, name: str) -> NDArray[np.float64]:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: need at least one sample")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be numeric; got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    return arr


def _as_conf_correct(
    conf: ArrayLike, correct: ArrayLike, *, unit_interval: bool
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    c = _as_scores_1d(conf, "conf")
    k = _as_flags(correct, "correct")
    if k.shape != c.shape:
        raise ValueError(f"conf and correct must have the same shape; got {c.shape} and {k.shape}")
    if unit_interval and (c.min() < 0.0 or c.max() > 1.0):
        raise ValueError(
            f"conf must lie in [0, 1] for binned calibration; got [{c.min()}, {c.max()}]"
        )
    return c, k


def _check_n_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer; got {n_bins!r}")
    return int(n_bins)


def _check_alpha(alpha: float) -> float:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1); got {alpha!r}")
    return float(alpha)


# --------------------------------------------------------------------------------------------
# Row-wise passes over logits
# --------------------------------------------------------------------------------------------


def _row_blocks(n: int, num_classes: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(num_classes, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _work_dtype(dtype: np.dtype) -> type[np.floating]:
    # float16/float32 inputs carry <= 24 bits of mantissa; float32 arithmetic adds relative errors
    # of ~1e-7, far below sampling noise, and halves memory traffic. float64 and integer inputs
    # keep float64.
    if np.issubdtype(dtype, np.floating) and dtype.itemsize <= 4:
        return np.float32
    return np.float64


def _check_row_max(m: NDArray) -> None:
    # max() propagates NaN, and a +inf or all -inf row has no defined softmax either.
    if not np.isfinite(m).all():
        raise ValueError("logits must be finite (found a row whose maximum is NaN or +/-inf)")


def softmax(logits: ArrayLike) -> NDArray[np.float64]:
    """Row-wise softmax ``p_ik = exp(x_ik - max_j x_ij) / sum_l exp(x_il - max_j x_ij)``.

    Subtracting the row maximum before exponentiating keeps every exponent <= 0, so nothing
    overflows. Computed in float64, one block of rows at a time, so the only full-size allocation
    is the float64 result itself. ``-inf`` entries are allowed (probability 0) as long as each row
    has a finite maximum; NaN or ``+inf`` raise ``ValueError``.
    """
    x = _as_scores_2d(logits, "logits")
    out = np.empty(x.shape, dtype=np.float64)
    for rows in _row_blocks(*x.shape):
        block = out[rows]
        block[...] = x[rows]
        m = block.max(axis=1, keepdims=True)
        _check_row_max(m)
        block -= m
        np.exp(block, out=block)
        block /= block.sum(axis=1, keepdims=True)
    return out


def _label_rank(x: NDArray, y: NDArray[np.intp], s_y: NDArray) -> NDArray[np.intp]:
    """0-based position of each row's label in a stable descending sort of that row."""
    col = s_y[:, None]
    rank = np.count_nonzero(x > col, axis=1)
    # Equal scores are rare for float logits but common for fp16 CLIP logits; resolve them the way
    # argmax does (lower index first) only for rows that actually have a tie with the label.
    tied = np.flatnonzero(np.count_nonzero(x == col, axis=1) > 1)
    if tied.size:
        earlier = np.arange(x.shape[1])[None, :] < y[tied, None]
        rank[tied] += np.count_nonzero((x[tied] == col[tied]) & earlier, axis=1)
    return rank


def accuracy_topk(probs_or_logits: ArrayLike, labels: ArrayLike, k: int = 1) -> float:
    """Top-k accuracy in percent: ``100 * mean_i [rank_i(y_i) < k]``.

    ``rank_i(y_i)`` is the position of the label in a stable descending sort of row ``i``, so
    ties are broken towards the lower class index exactly like ``argmax`` (top-1 accuracy equals
    ``mean(argmax == y)``). Probabilities and logits give the same answer (softmax is monotone)
    up to ties created by rounding. ``k >= n_classes`` returns ``100.0``.
    """
    x = _as_scores_2d(probs_or_logits, "probs_or_logits")
    y = _as_labels(labels, *x.shape)
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    if k >= x.shape[1]:
        return 100.0
    work = _work_dtype(x.dtype)
    hits = 0
    for rows in _row_blocks(*x.shape):
        xb = np.asarray(x[rows], dtype=work)
        yb = y[rows]
        hits += int(np.count_nonzero(_label_rank(xb, yb, xb[np.arange(len(yb)), yb]) < k))
    return 100.0 * hits / x.shape[0]


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact (Clopper & Pearson 1934) two-sided ``1 - alpha`` interval for a binomial proportion.

    ``low = B^{-1}(alpha/2; k, n-k+1)`` and ``high = B^{-1}(1-alpha/2; k+1, n-k)`` with ``B^{-1}``
    the beta quantile function; ``low = 0`` when ``k = 0`` and ``high = 1`` when ``k = n``.
    Returned in percent. Reference: C. J. Clopper and E. S. Pearson, "The use of confidence or
    fiducial limits illustrated in the case of the binomial", Biometrika 26(4), 1934.
    """
    if isinstance(k, bool) or isinstance(n, bool) or int(k) != k or int(n) != n:
        raise ValueError(f"k and n must be integers; got k={k!r}, n={n!r}")
    k, n = int(k), int(n)
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need n >= 1 and 0 <= k <= n; got k={k}, n={n}")
    alpha = _check_alpha(alpha)
    # B^{-1}(q; a, b) is the inverse regularised incomplete beta function, betaincinv(a, b, q):
    # the same Boost routine scipy.stats.beta.ppf calls (bit for bit, tested), without the
    # ~0.8 s that importing scipy.stats adds to every robench run
    from scipy.special import betaincinv

    low = 0.0 if k == 0 else float(betaincinv(k, n - k + 1, alpha / 2))
    high = 1.0 if k == n else float(betaincinv(k + 1, n - k, 1 - alpha / 2))
    return 100.0 * low, 100.0 * high


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


def _bin_index(conf: NDArray[np.float64], n_bins: int) -> NDArray[np.intp]:
    # searchsorted(side="left") returns i with edges[i-1] < c <= edges[i], i.e. right-closed bins
    # (lo, hi]; c = 0 yields -1 and is clipped into the first bin, c = 1 lands in the last bin.
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)


def ece(conf: ArrayLike, correct: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017), L1, equal-width bins, as a fraction.

    ``ECE = sum_b (|B_b| / n) * |acc(B_b) - conf(B_b)|`` where ``acc``/``conf`` are the mean
    correctness and mean confidence inside bin ``B_b``. Bins split ``[0, 1]`` into ``n_bins``
    equal-width intervals ``(lo, hi]``; a confidence of exactly 0 goes to the first bin and a
    confidence of exactly 1.0 to the LAST bin. Empty bins contribute nothing.

    Note: ``torchmetrics`` (``MulticlassCalibrationError``, checked with 1.9) buckets with
    ``torch.bucketize(right=True)``, i.e. half-open ``[lo, hi)`` bins, so a confidence of exactly
    1.0 falls into an extra ``(n_bins + 1)``-th bin of its own (an off-by-one in the bin count).
    With saturated softmax outputs (common for CLIP at logit scale 100) the two results differ;
    for continuous confidences below 1 they agree up to torchmetrics' float32 arithmetic (and a
    confidence exactly on an interior edge, which torchmetrics puts in the upper bin).

    Reference: C. Guo, G. Pleiss, Y. Sun and K. Q. Weinberger, "On Calibration of Modern Neural
    Networks", ICML 2017 (the binned estimator goes back to Naeini et al., AAAI 2015).
    """
    c, k = _as_conf_correct(conf, correct, unit_interval=True)
    _, gap = _bin_gaps(c, k, _check_n_bins(n_bins))
    return _ece_from_gaps(gap, c.size)


def _bin_gaps(
    c: NDArray[np.float64], k: NDArray[np.bool_], n_bins: int
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Per-bin sample count and ``sum_{i in B} (correct_i - conf_i)``."""
    b = _bin_index(c, n_bins)
    return np.bincount(b, minlength=n_bins), np.bincount(b, weights=k - c, minlength=n_bins)


def _ece_from_gaps(gap: NDArray[np.float64], n: int) -> float:
    # (|B|/n) * |acc_B - conf_B| = |sum_{i in B} (correct_i - conf_i)| / n.
    return float(np.abs(gap).sum() / n)


def _mce_from_gaps(count: NDArray[np.int64], gap: NDArray[np.float64]) -> float:
    filled = count > 0
    return float(np.max(np.abs(gap[filled]) / count[filled]))


def max_calibration_error(conf: ArrayLike, correct: ArrayLike, n_bins: int = 15) -> float:
    """Maximum calibration error (Guo et al. 2017): ``max_b |acc(B_b) - conf(B_b)|``.

    Recorded as ``max_cal_err`` (not "MCE", which robustness papers use for ImageNet-C's mean
    Corruption Error).

    Same equal-width ``(lo, hi]`` bins as :func:`ece` (0 into the first, 1.0 into the last bin);
    the maximum runs over non-empty bins only. A fraction in ``[0, 1]``.
    Reference: Guo et al., "On Calibration of Modern Neural Networks", ICML 2017.
    """
    c, k = _as_conf_correct(conf, correct, unit_interval=True)
    return _mce_from_gaps(*_bin_gaps(c, k, _check_n_bins(n_bins)))


#: The rules for cutting the confidence-sorted samples into ``n_bins`` equal-mass bins of the
#: adaptive ECE (``metrics.adaptive_bins``), each with the sentence a record's protocol states.
#: Both give bins whose sizes differ by at most one; they differ in WHICH bins hold the extra
#: sample when ``n_bins`` does not divide ``n``, which moves the value in the last digits.
ADAPTIVE_BINS: dict[str, str] = {
    "robench": "equal-mass bins: the sample at rank r of the stable ascending confidence sort "
               "goes to bin floor(r * n_bins / n); sum_b |B_b|/n * |acc(B_b) - conf(B_b)|",
    "torch-uncertainty": "equal-mass bins as torch-uncertainty's: the confidence sort "
                         "cut by tensor_split into n_bins runs (first n mod n_bins one longer); "
                         "sum_b |B_b|/n*|acc - conf|",
}


def adaptive_bin_index(n: int, n_bins: int, rule: str = "robench") -> NDArray[np.int64]:
    """The bin of each position ``r = 0..n-1`` of the ascending confidence sort.

    ``robench``: ``floor(r * n_bins / n)``. ``torch-uncertainty``: with ``q, m = divmod(n,
    n_bins)``, bins ``0..m-1`` take ``q + 1`` consecutive positions and the others ``q`` -- the
    cut ``torch.tensor_split(sorted, n_bins)`` makes in torch-uncertainty's
    ``_equal_binning_bucketize`` (torch_uncertainty/metrics/classification/calibration/
    adaptive_calibration_error.py, v0.13). E.g. ``n = 7, n_bins = 5``: robench's sizes are
    ``2, 1, 2, 1, 1``, torch-uncertainty's ``2, 2, 1, 1, 1``.
    """
    if rule not in ADAPTIVE_BINS:
        raise ValueError(f"unknown adaptive bin rule {rule!r}; use one of {sorted(ADAPTIVE_BINS)}")
    if rule == "robench":
        return (np.arange(n, dtype=np.int64) * n_bins) // n
    q, m = divmod(n, n_bins)
    sizes = np.full(n_bins, q, dtype=np.int64)
    sizes[:m] += 1
    return np.repeat(np.arange(n_bins, dtype=np.int64), sizes)


def adaptive_ece(conf: ArrayLike, correct: ArrayLike, n_bins: int = 15,
                 bins: str = "robench") -> float:
    """ECE with equal-mass (adaptive) bins, as a fraction (Nixon et al. 2019).

    Samples are sorted by confidence (stable sort, so tied confidences keep input order) and cut
    into ``n_bins`` bins of consecutive sorted samples by ``bins`` (:data:`ADAPTIVE_BINS`,
    :func:`adaptive_bin_index`): by default (``"robench"``) the sample at sorted position ``r``
    goes to bin ``floor(r * n_bins / n)``; ``"torch-uncertainty"`` makes the first
    ``n mod n_bins`` bins the one-larger ones, as torch-uncertainty's AdaptiveCalibrationError
    does. Either way bin sizes differ by at most one, and tied confidences may straddle a bin
    boundary. Then ``ECE_adaptive = sum_b (|B_b| / n) * |acc(B_b) - conf(B_b)|
    = sum_b |sum_{i in B_b} (correct_i - conf_i)| / n``. With ``n < n_bins`` each sample is its
    own bin under the robench rule; under torch-uncertainty's the last ``n_bins - n`` bins are
    empty and add nothing (torch-uncertainty itself then returns NaN: 0/0 in an empty bin).
    This is the top-label variant (also called ECE-EM); Nixon et al.'s ACE further averages the
    same quantity over all classes' probabilities.

    Reference: J. Nixon, M. W. Dusenberry, L. Zhang, G. Jerfel and D. Tran, "Measuring
    Calibration in Deep Learning", CVPR Workshops 2019.
    """
    c, k = _as_conf_correct(conf, correct, unit_interval=True)
    n_bins = _check_n_bins(n_bins)
    order = np.argsort(c, kind="stable")
    return _adaptive_ece_sorted(c[order], k[order], n_bins, bins)


def _adaptive_ece_sorted(cs: NDArray[np.float64], ks: NDArray[np.bool_], n_bins: int,
                         bins: str = "robench") -> float:
    """:func:`adaptive_ece` of samples already in ascending confidence order: the sum over the
    bins of :func:`adaptive_bin_index` of ``|sum (correct - conf)|``, divided by ``n``."""
    n = cs.size
    b = adaptive_bin_index(n, n_bins, bins)
    gap = np.bincount(b, weights=ks - cs, minlength=n_bins)
    return float(np.abs(gap).sum() / n)


def nll(probs: ArrayLike, labels: ArrayLike) -> float:
    """Mean negative log-likelihood ``-(1/n) sum_i log max(p_{i,y_i}, 1e-12)`` (nats).

    ``probs`` are used as given (rows are not renormalised). The clip at ``NLL_EPS = 1e-12`` keeps a
    single confidently wrong sample from making the mean infinite; :func:`compute_all` applies the
    same cap to ``log p_y`` computed directly from the logits.
    """
    p = _as_scores_2d(probs, "probs")
    y = _as_labels(labels, *p.shape)
    p_y = p[np.arange(p.shape[0]), y].astype(np.float64)
    return float(-np.log(np.maximum(p_y, NLL_EPS)).mean())


def brier(probs: ArrayLike, labels: ArrayLike) -> float:
    """Multiclass Brier score ``(1/n) sum_i sum_k (p_ik - [k = y_i])^2`` (Brier 1950).

    Brier's original definition sums over all classes, so the score lies in ``[0, 2]``; it is not
    divided by the number of classes. Reference: G. W. Brier, "Verification of forecasts expressed
    in terms of probability", Monthly Weather Review 78(1), 1950.
    """
    p = _as_scores_2d(probs, "probs")
    y = _as_labels(labels, *p.shape)
    total = 0.0
    for rows in _row_blocks(*p.shape):
        pb = p[rows].astype(np.float64)
        pb[np.arange(pb.shape[0]), y[rows]] -= 1.0
        total += float(np.einsum("ij,ij->", pb, pb))
    return total / p.shape[0]


# --------------------------------------------------------------------------------------------
# Ranking metrics (AUROC, AUPR, FPR@95TPR)
# --------------------------------------------------------------------------------------------


class _Sorted(NamedTuple):
    """Scores in ascending (stable) order, the matching labels and the tie groups."""

    order: NDArray[np.intp]
    score: NDArray[np.float64]
    positive: NDArray[np.bool_]
    starts: NDArray[np.intp]  # first sorted position of each group of equal scores

    @classmethod
    def build(cls, score: NDArray[np.float64], positive: NDArray[np.bool_]) -> _Sorted:
        order = np.argsort(score, kind="stable")
        s = score[order]
        new_group = np.empty(s.size, dtype=bool)
        new_group[:1] = True
        np.not_equal(s[1:], s[:-1], out=new_group[1:])
        return cls(order, s, positive[order], np.flatnonzero(new_group))

    def group_counts(self) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Positives and group sizes per tie group, in ascending score order."""
        pos = np.add.reduceat(self.positive.astype(np.int64), self.starts)
        size = np.diff(np.append(self.starts, self.score.size))
        return pos, size


def _auroc_sorted(srt: _Sorted) -> float:
    pos, size = srt.group_counts()
    n_pos = int(pos.sum())
    n_neg = srt.score.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Average 1-based rank of group g is start_g + (size_g + 1) / 2; doubling keeps it integral,
    # so the rank sum of the positives is exact in int64.
    twice_rank_sum = int(np.dot(pos, 2 * srt.starts.astype(np.int64) + size + 1))
    twice_u = twice_rank_sum - n_pos * (n_pos + 1)
    return twice_u / (2.0 * n_pos * n_neg)


def auroc(scores: ArrayLike, positives: ArrayLike) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic with average ranks for ties.

    ``AUROC = (R_+ - n_+ (n_+ + 1) / 2) / (n_+ n_-)`` where ``R_+`` is the sum of the (1-based,
    tie-averaged) ranks of the positives' scores; equivalently the probability that a random
    positive outscores a random negative, ties counting one half. Higher scores should indicate
    positives. NaN when only one class is present. Equals ``sklearn.metrics.roc_auc_score``.

    References: H. B. Mann and D. R. Whitney, Ann. Math. Statist. 18(1), 1947; J. A. Hanley and
    B. J. McNeil, "The meaning and use of the area under a ROC curve", Radiology 143, 1982.
    """
    s = _as_scores_1d(scores, "scores")
    pos = _as_flags(positives, "positives")
    if pos.shape != s.shape:
        raise ValueError(
            f"scores and positives must have the same shape; got {s.shape} and {pos.shape}"
        )
    return _auroc_sorted(_Sorted.build(s, pos))


def misclassification_auroc(conf: ArrayLike, correct: ArrayLike) -> float:
    """AUROC of the confidence (MSP) for separating correct (positive) from wrong predictions.

    The misclassification-detection baseline of Hendrycks & Gimpel (2017). Because AUROC is
    symmetric (``AUROC(s, y) = AUROC(-s, 1 - y)``) this equals the AUROC of ``-MSP`` with errors as
    positives, so it does not matter which class is called positive. 0.5 is chance, 1.0 means
    every correct prediction is more confident than every wrong one. NaN if all predictions are
    correct or all are wrong.

    Reference: D. Hendrycks and K. Gimpel, "A Baseline for Detecting Misclassified and
    Out-of-Distribution Examples in Neural Networks", ICLR 2017.
    """
    c, k = _as_conf_correct(conf, correct, unit_interval=False)
    return _auroc_sorted(_Sorted.build(c, k))


def _aupr_err_sorted(srt: _Sorted) -> float:
    # Ascending confidence is descending error score (-conf), so group g is the g-th threshold.
    correct_per_group, size = srt.group_counts()
    err = size - correct_per_group
    n_err = int(err.sum())
    if n_err == 0:
        return float("nan")
    precision = np.cumsum(err) / np.cumsum(size)
    return float(np.dot(err, precision) / n_err)


def aupr_err(conf: ArrayLike, correct: ArrayLike) -> float:
    """Average precision for retrieving errors, with errors positive and score ``-conf``.

    ``AP = sum_t (R_t - R_{t-1}) P_t`` over the distinct thresholds ``t`` of ``-conf`` in
    decreasing order, where ``P_t`` / ``R_t`` are precision / recall of "flag every sample with
    ``-conf >= t``" -- the step-wise (non-interpolated) definition used by
    ``sklearn.metrics.average_precision_score``, including its treatment of tied scores (a tie
    group enters at once). NaN if there are no errors. Reference: Hendrycks & Gimpel, ICLR 2017
    (AUPR-Err).
    """
    c, k = _as_conf_correct(conf, correct, unit_interval=False)
    return _aupr_err_sorted(_Sorted.build(c, k))


def _fpr95_sorted(srt: _Sorted, target: float = 0.95) -> float:
    pos_per_group, size = srt.group_counts()
    n_pos = int(pos_per_group.sum())
    n_neg = srt.score.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Accepting every sample with score >= the score of group g: counts are suffix sums.
    tp = np.cumsum(pos_per_group[::-1])[::-1]
    fp = np.cumsum((size - pos_per_group)[::-1])[::-1]
    # TPR grows as the threshold falls; the last group (highest threshold) still reaching the
    # target is the operating point with the lowest FPR among those with TPR >= target.
    reaching = np.flatnonzero(tp / n_pos >= target)
    return float(fp[reaching[-1]] / n_neg)


def fpr_at_95_tpr(conf: ArrayLike, correct: ArrayLike) -> float:
    """False-positive rate at 95% true-positive rate, correct predictions positive, score conf.

    Convention: a sample is accepted when ``conf >= t``. Over the distinct thresholds ``t``
    (the observed confidences) we take the highest one whose TPR (fraction of correct predictions
    accepted) is ``>= 0.95`` and return its FPR (fraction of wrong predictions accepted). This is
    the first point with ``tpr >= 0.95`` on ``sklearn.metrics.roc_curve(correct, conf,
    drop_intermediate=False)``, i.e. the lowest FPR among operating points with TPR >= 95%; no
    interpolation between points. Lower is better. NaN if all predictions are correct or all are
    wrong. The metric was popularised for OOD detection by S. Liang, Y. Li and R. Srikant,
    "Enhancing the Reliability of Out-of-distribution Image Detection in Neural Networks"
    (ODIN), ICLR 2018; here the negatives are misclassified inputs.
    """
    c, k = _as_conf_correct(conf, correct, unit_interval=False)
    return _fpr95_sorted(_Sorted.build(c, k))


def ood_auroc(conf_id: ArrayLike, conf_ood: ArrayLike) -> float:
    """AUROC for telling shifted samples from in-distribution ones using ``-MSP``.

    Score ``-conf``, shifted (OOD) samples positive, in-distribution negative: the OpenOOD
    (Yang et al., NeurIPS 2022 Datasets & Benchmarks) / torch-uncertainty convention and the MSP
    baseline of Hendrycks & Gimpel (ICLR 2017). 0.5 means the shifted set is as confident as the
    in-distribution set; values below 0.5 mean it is *more* confident. NaN if either set is empty.
    """
    cid = np.asarray(conf_id, dtype=np.float64).ravel()
    cood = np.asarray(conf_ood, dtype=np.float64).ravel()
    if cid.size == 0 or cood.size == 0:
        return float("nan")
    scores = -np.concatenate([cid, cood])
    positives = np.concatenate([np.zeros(cid.size, bool), np.ones(cood.size, bool)])
    return auroc(scores, positives)


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------


class BootstrapEvaluator:
    """ECE and misclassification AUROC of a *weighted* sample, O(n) per weight vector.

    Resampling with replacement is the same as giving sample ``i`` the integer weight ``w_i`` =
    number of times it was drawn, so a replicate never needs a re-sort: the data are sorted by
    confidence once here, and each replicate only scatters its weights.

    * ECE: equal-width bins are contiguous runs of the sorted data, and
      ``ECE = sum_b |sum_{i in B_b} w_i (correct_i - conf_i)| / sum_i w_i``.
    * AUROC: with negatives (errors) in sorted order and ``C_j`` the weight of the first ``j``
      negatives, a positive whose confidence exceeds ``lo`` negatives and ties ``hi - lo`` of
      them contributes ``w_i (C_lo + (C_hi - C_lo) / 2)``; divide by ``W_+ W_-``. This is the
      Mann-Whitney statistic of the resampled data with average ranks (copies of one sample tie
      each other, but positive-positive and negative-negative pairs never count).

    Weights passed to :meth:`ece` / :meth:`auroc` are indexed like the original ``conf``;
    :func:`bootstrap_replicates` works directly in sorted order to save one gather.
    """

    def __init__(self, conf: ArrayLike, correct: ArrayLike, n_bins: int = 15) -> None:
        c, k = _as_conf_correct(conf, correct, unit_interval=True)
        self.n_bins = _check_n_bins(n_bins)
        self.n = c.size
        self.sorted = _Sorted.build(c, k)
        self.order = self.sorted.order
        cs = self.sorted.score
        ks = self.sorted.positive
        b = _bin_index(cs, self.n_bins)
        self._bin_starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
        self._gap = ks - cs
        self._pos_idx = np.flatnonzero(ks)
        self._neg_idx = np.flatnonzero(~ks)
        neg_scores = cs[self._neg_idx]
        pos_scores = cs[self._pos_idx]
        self._lo = np.searchsorted(neg_scores, pos_scores, side="left")
        hi = np.searchsorted(neg_scores, pos_scores, side="right")
        # Only positives that tie with some negative need the half-credit term; they are usually
        # a small subset, so gather them separately instead of a second full pass.
        tied = np.flatnonzero(hi > self._lo)
        self._tied_pos = self._pos_idx[tied]
        self._tied_lo = self._lo[tied]
        self._tied_hi = hi[tied]

    def ece(self, weights: ArrayLike) -> float:
        """ECE of the sample weighted by ``weights`` (non-negative, original order)."""
        w = self._sorted_weights(weights)
        return self._ece_sorted(w, self._workspace(w.dtype))

    def auroc(self, weights: ArrayLike) -> float:
        """Misclassification AUROC of the weighted sample (NaN if one class has zero weight)."""
        w = self._sorted_weights(weights)
        return self._auroc_sorted(w, self._workspace(w.dtype))

    def _sorted_weights(self, weights: ArrayLike) -> NDArray:
        w = np.asarray(weights)
        if w.shape != (self.n,):
            raise ValueError(f"weights must have shape ({self.n},); got {w.shape}")
        w = w.astype(np.int64 if np.issubdtype(w.dtype, np.integer) else np.float64)
        if w.min() < 0:
            raise ValueError("weights must be non-negative")
        return w[self.order]

    def _workspace(self, dtype: np.dtype) -> dict[str, NDArray]:
        # Reused across replicates: fresh multi-MiB temporaries per replicate cost page faults,
        # and those make threads contend with each other.
        n_neg, n_pos = self._neg_idx.size, self._pos_idx.size
        return {
            "gap": np.empty(self.n),
            "neg": np.empty(n_neg, dtype),
            "cum": np.zeros(n_neg + 1, dtype),
            "pos": np.empty(n_pos, dtype),
            "tmp": np.empty(n_pos, dtype),
        }

    def _ece_sorted(self, w: NDArray, ws: dict[str, NDArray]) -> float:
        np.multiply(w, self._gap, out=ws["gap"])
        per_bin = np.add.reduceat(ws["gap"], self._bin_starts)
        return float(np.abs(per_bin).sum() / w.sum())

    def _auroc_sorted(self, w: NDArray, ws: dict[str, NDArray]) -> float:
        if self._pos_idx.size == 0 or self._neg_idx.size == 0:
            return float("nan")
        cum, w_pos, tmp = ws["cum"], ws["pos"], ws["tmp"]
        np.take(w, self._neg_idx, out=ws["neg"], mode="clip")
        np.cumsum(ws["neg"], out=cum[1:])
        np.take(w, self._pos_idx, out=w_pos, mode="clip")
        total_pos = float(w_pos.sum())
        total_neg = float(cum[-1])
        if total_pos == 0 or total_neg == 0:
            return float("nan")
        numerator = float(np.dot(w_pos, np.take(cum, self._lo, out=tmp, mode="clip")))
        if self._tied_pos.size:
            tied_neg = cum[self._tied_hi] - cum[self._tied_lo]
            numerator += 0.5 * float(np.dot(w[self._tied_pos], tied_neg))
        return numerator / (total_pos * total_neg)


def replicate_generators(seed: int, n_bootstrap: int) -> list[np.random.Generator]:
    """One generator per replicate, ``default_rng(SeedSequence(seed).spawn(n_bootstrap)[r])``.

    One child stream per replicate makes replicate r independent of how replicates are split
    across threads, so results are reproducible for a given seed on any machine."""
    children = np.random.SeedSequence(seed).spawn(n_bootstrap)
    return [np.random.default_rng(child) for child in children]


def draw_counts(rng: np.random.Generator, k: int) -> NDArray[np.intp]:
    """One bootstrap draw of ``k`` units (samples, or base images of a -C set) with replacement,
    as a count vector: ``np.bincount(rng.integers(0, k, k), minlength=k)``. Every bootstrap in
    robench draws this way, in the units' own order (row order, or base-image id order)."""
    return np.bincount(rng.integers(0, k, k), minlength=k)


def bootstrap_replicates(
    conf: ArrayLike,
    correct: ArrayLike,
    *,
    n_bins: int = 15,
    n_bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, NDArray[np.float64]]:
    """Bootstrap replicates (Efron 1979) of ECE and misclassification AUROC.

    Exact protocol, so a naive loop can reproduce it: for replicate ``r`` draw ``idx =
    rng_r.integers(0, n, n)`` with ``rng_r = replicate_generators(seed, n_bootstrap)[r]`` and
    evaluate the metric on the samples at rows ``idx`` (drawn with replacement, in the samples'
    own order). Internally the draw becomes a count vector (:func:`draw_counts`) evaluated by
    :class:`BootstrapEvaluator` in O(n), which is identical to evaluating the resampled data.
    AUROC replicates are NaN when a resample holds only one class.
    Returns ``{"ece": array(n_bootstrap), "auroc": array(n_bootstrap)}``.

    Reference: B. Efron, "Bootstrap methods: another look at the jackknife", Annals of Statistics
    7(1), 1979.
    """
    if isinstance(n_bootstrap, bool) or int(n_bootstrap) != n_bootstrap or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be a non-negative integer; got {n_bootstrap!r}")
    ev = BootstrapEvaluator(conf, correct, n_bins)
    return _run_replicates(ev, int(n_bootstrap), seed)


def _run_replicates(
    ev: BootstrapEvaluator, n_bootstrap: int, seed: int
) -> dict[str, NDArray[np.float64]]:
    out = {"ece": np.full(n_bootstrap, np.nan), "auroc": np.full(n_bootstrap, np.nan)}
    if n_bootstrap == 0:
        return out
    gens = replicate_generators(seed, n_bootstrap)
    n = ev.n

    def run(replicates: range) -> None:
        ws = ev._workspace(np.dtype(np.intp))
        for r in replicates:
            w = draw_counts(gens[r], n)[ev.order]  # drawn in row order, evaluated sorted
            out["ece"][r] = ev._ece_sorted(w, ws)
            out["auroc"][r] = ev._auroc_sorted(w, ws)

    threads = _BOOTSTRAP_THREADS if n >= _BOOTSTRAP_MIN_N_FOR_THREADS else 1
    threads = min(threads, n_bootstrap)
    if threads == 1:
        run(range(n_bootstrap))
    else:
        parts = [range(t, n_bootstrap, threads) for t in range(threads)]
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, parts))
    return out


def percentile_interval(replicates: ArrayLike, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval: the ``alpha/2`` and ``1 - alpha/2`` quantiles.

    Quantiles use NumPy's default linear interpolation. NaN replicates (degenerate resamples) are
    ignored; if none is finite the interval is ``(nan, nan)``. Reference: B. Efron and R. J.
    Tibshirani, "An Introduction to the Bootstrap", Chapman & Hall 1993, ch. 13.
    """
    alpha = _check_alpha(alpha)
    r = np.asarray(replicates, dtype=np.float64)
    r = r[~np.isnan(r)]
    if r.size == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(r, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def shifted_interval(
    point: float,
    replicates: ArrayLike,
    alpha: float = 0.05,
    bounds: tuple[float, float] | None = None,
) -> tuple[float, float]:
    """robench's one bootstrap interval: the percentile interval shifted by the replicates' bias.

    With ``b = mean(replicates) - point`` (the bootstrap estimate of the statistic's bias,
    Efron & Tibshirani 1993, section 10.6) the interval is ``[q_{alpha/2} - b, q_{1-alpha/2} - b]``,
    clipped to the statistic's ``bounds`` (ECE and AUROC lie in [0, 1]). It contains ``point``
    whenever the replicates' mean lies between their two quantiles, which holds for any replicate
    distribution that is not wildly skewed: a plain percentile interval of a biased statistic does
    not (ECE is biased upwards under resampling, and 30 of 836 per-cell ECE intervals of a
    committed baseline excluded their own estimate). Acc1 is unbiased, so its shift is ~0.
    NaN replicates are ignored; none finite, or a NaN point, gives ``(nan, nan)``.
    """
    alpha = _check_alpha(alpha)
    r = np.asarray(replicates, dtype=np.float64)
    r = r[~np.isnan(r)]
    if r.size == 0 or math.isnan(point):
        return float("nan"), float("nan")
    bias = float(r.mean()) - float(point)
    low, high = np.quantile(r, [alpha / 2, 1 - alpha / 2]) - bias
    if bounds is not None:
        low, high = min(max(low, bounds[0]), bounds[1]), min(max(high, bounds[0]), bounds[1])
    return float(low), float(high)


def bootstrap_ci(
    conf: ArrayLike,
    correct: ArrayLike,
    *,
    n_bins: int = 15,
    n_bootstrap: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """Seeded bootstrap ``1 - alpha`` intervals for ECE and misclassification AUROC.

    Both statistics share the same resamples (see :func:`bootstrap_replicates` for the exact
    protocol) and each interval is :func:`shifted_interval` of its replicates around the point
    estimate. ``n_bootstrap = 0`` gives NaN intervals; the AUROC interval is NaN when the point
    estimate is (all predictions correct or all wrong).
    Returns ``{"ece": (low, high), "auroc": (low, high)}``.
    """
    _check_alpha(alpha)
    reps = bootstrap_replicates(conf, correct, n_bins=n_bins, n_bootstrap=n_bootstrap, seed=seed)
    c, k = _as_conf_correct(conf, correct, unit_interval=True)
    point = {"ece": ece(c, k, n_bins), "auroc": misclassification_auroc(c, k)}
    return {name: shifted_interval(point[name], values, alpha, UNIT)
            for name, values in reps.items()}


UNIT = (0.0, 1.0)  # the range of ECE, AUROC and every other 0-1 score


# --------------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------------


class MetricInfo(NamedTuple):
    """What a :func:`compute_all` key means, which direction is better (None: not a score) and,
    for a metric that is a share of the samples or bounded like one, its full scale (100 for a
    percentage, 1 for a fraction; None otherwise), which gives ``robench check`` a sampling
    scale for it."""

    description: str
    direction: Literal["higher", "lower"] | None
    share_of: float | None = None


METRIC_INFO: dict[str, MetricInfo] = {
    "n": MetricInfo("number of samples scored", None),
    "num_classes": MetricInfo("number of classes the prediction chooses from", None),
    "acc1": MetricInfo("top-1 accuracy (%)", "higher", 100),
    "acc1_ci_low": MetricInfo("top-1 accuracy, lower bound (%): Clopper-Pearson; for a -C "
                              "headline the bootstrap over base images", "higher"),
    "acc1_ci_high": MetricInfo("top-1 accuracy, upper bound (%): Clopper-Pearson; for a -C "
                               "headline the bootstrap over base images", "higher"),
    "acc5": MetricInfo("top-5 accuracy (%); 100 when there are <= 5 classes", "higher", 100),
    "ece": MetricInfo("expected calibration error, L1, equal-width bins (fraction)", "lower", 1),
    "ece_ci_low": MetricInfo("ECE, bootstrap lower bound (bias-shifted percentile; fraction)",
                             "lower"),
    "ece_ci_high": MetricInfo("ECE, bootstrap upper bound (bias-shifted percentile; fraction)",
                              "lower"),
    "max_cal_err": MetricInfo("maximum calibration error over equal-width bins (fraction)",
                              "lower", 1),
    "ece_adaptive": MetricInfo("ECE with equal-mass bins (fraction)", "lower", 1),
    "nll": MetricInfo("negative log-likelihood of the label (nats, p clipped at 1e-12)", "lower"),
    "brier": MetricInfo("multiclass Brier score, summed over classes (0-2)", "lower"),
    "auroc": MetricInfo("misclassification AUROC of MSP (correct vs wrong)", "higher", 1),
    "auroc_ci_low": MetricInfo("misclassification AUROC, bootstrap lower bound", "higher"),
    "auroc_ci_high": MetricInfo("misclassification AUROC, bootstrap upper bound", "higher"),
    "aupr_err": MetricInfo("average precision for finding errors with -MSP", "higher", 1),
    "fpr95": MetricInfo("share of errors accepted at 95% of correct accepted (MSP)", "lower", 1),
    "mean_confidence": MetricInfo("mean maximum softmax probability (fraction)", None),
}

#: Everything a result record's ``metrics`` may hold: compute_all's keys plus ``ood_auroc``, which
#: the runner adds for a suite that pairs an ID set with shifted sets (see :func:`ood_auroc`).
RECORD_METRIC_INFO: dict[str, MetricInfo] = {
    **METRIC_INFO,
    "ood_auroc": MetricInfo(
        "OOD-detection AUROC: the suite's ID set vs this set, score = -MSP, shifted samples "
        "positive (torch-uncertainty / OpenOOD convention)", "higher", 1),
    "id_acc1": MetricInfo(
        "top-1 accuracy (%) of the paired ID set over this set's scored classes: the x-axis of "
        "effective robustness (Taori et al. 2020: ImageNet over ImageNet-R's 200 classes)",
        "higher", 100),
}


TOPK = 5


class SampleOutputs(NamedTuple):
    """Exact per-sample outputs of a classifier: everything every metric of :func:`compute_all`
    needs, so a stored cell can be re-scored without its logits (``robench rescore``).

    For row i with scored logits ``x_i`` (C columns), maximum ``m_i`` and target position
    ``y_i``: ``log_norm_i = log sum_k exp(x_ik - m_i)`` (so the log-sum-exp is
    ``m_i + log_norm_i``), ``true_logit_i = x_{i,y_i}``, ``label_rank_i`` = position of ``y_i``
    in a stable descending sort of ``x_i`` (ties to the lower index, like ``argmax``),
    ``sum_sq_prob_i = sum_k p_ik^2`` (Brier), ``topk_*`` the k largest logits and their columns in
    that order (``topk_logit[:, 0] = m``). Then ``MSP = exp(-log_norm)``,
    ``log p_y = (true_logit - m) - log_norm`` and ``correct = label_rank == 0``. Logits keep the
    precision they were computed in (float32 for a float32 head, float64 for float64 input).
    """

    topk_index: NDArray[np.int32]  # (n, k) column positions, descending logit, ties lower first
    topk_logit: NDArray[np.floating]  # (n, k)
    log_norm: NDArray[np.float64]
    true_logit: NDArray[np.floating]
    label_rank: NDArray[np.int32]
    sum_sq_prob: NDArray[np.float64]
    num_classes: int

    def __len__(self) -> int:
        return int(self.log_norm.shape[0])

    @property
    def conf(self) -> NDArray[np.float64]:
        """MSP ``exp(-log_norm)`` in float64 (<= 1 since log_norm >= 0)."""
        return np.exp(-self.log_norm)

    @property
    def log_p_label(self) -> NDArray[np.float64]:
        gap = self.true_logit.astype(np.float64) - self.topk_logit[:, 0].astype(np.float64)
        return gap - self.log_norm

    @property
    def lse(self) -> NDArray[np.float64]:
        """The log-sum-exp of the scored logits."""
        return self.topk_logit[:, 0].astype(np.float64) + self.log_norm

    @property
    def correct(self) -> NDArray[np.bool_]:
        return self.label_rank == 0

    def take(self, rows: NDArray) -> SampleOutputs:
        """The outputs of a subset of rows (a group of a -C set)."""
        return SampleOutputs(*(a[rows] for a in self[:-1]), self.num_classes)

    @classmethod
    def empty(cls, n: int, k: int, num_classes: int, dtype: type = np.float32) -> SampleOutputs:
        """Uninitialised arrays for n samples (filled block by block by sample_outputs)."""
        return cls(np.empty((n, k), np.int32), np.empty((n, k), dtype), np.empty(n),
                   np.empty(n, dtype), np.empty(n, np.int32), np.empty(n), num_classes)


def _topk(x: NDArray, k: int) -> NDArray[np.intp]:
    """Columns of the k largest entries of each row, descending, ties to the lower index (the
    order of a stable descending sort), in O(C) per row except for rows tied at the k-th value."""
    n, c = x.shape
    if k >= c:
        return np.argsort(-x, axis=1, kind="stable")
    part = np.argpartition(-x, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(x, part, axis=1)
    # order the k candidates by (-value, column): sort by column, then stably by value
    keys = np.argsort(part, axis=1, kind="stable")
    part = np.take_along_axis(part, keys, axis=1)
    vals = np.take_along_axis(vals, keys, axis=1)
    keys = np.argsort(-vals, axis=1, kind="stable")
    part = np.take_along_axis(part, keys, axis=1)
    # rows where the k-th value is tied with a column outside the candidates: argpartition may
    # have picked any of the tied columns; redo those rows with a full stable sort
    kth = np.take_along_axis(x, part[:, -1:], axis=1)
    ties = np.flatnonzero(np.count_nonzero(x >= kth, axis=1) > k)
    if ties.size:
        part[ties] = np.argsort(-x[ties], axis=1, kind="stable")[:, :k]
    return part


def sample_outputs(logits: ArrayLike, labels: ArrayLike, k: int = TOPK,
                   out: SampleOutputs | None = None, offset: int = 0) -> SampleOutputs:
    """:class:`SampleOutputs` of a logits matrix, one block of rows at a time (O(n) memory
    beyond the input; the softmax is never stored). With ``out``, rows are written into it
    from row ``offset`` on (so a cell streamed in blocks fills one preallocated set of arrays).

    With ``m = max_k x_k``, ``e_k = exp(x_k - m)`` (float32 for float32 input, as the logits'
    own precision) and ``Z = sum_k e_k`` accumulated in float64: ``log_norm = log Z`` and
    ``sum_k p_k^2 = sum_k e_k^2 / Z^2``.
    """
    x = _as_scores_2d(logits, "logits")
    n, num_classes = x.shape
    y = _as_labels(labels, n, num_classes)
    kk = min(k, num_classes)
    work = _work_dtype(x.dtype)
    if out is None:
        out = SampleOutputs.empty(n, kk, num_classes, work)
        offset = 0
    for rows in _row_blocks(n, num_classes):
        xb = np.asarray(x[rows], dtype=work)
        yb = y[rows]
        dst = slice(offset + rows.start, offset + rows.stop)
        m = xb.max(axis=1)
        _check_row_max(m)
        s_y = xb[np.arange(len(yb)), yb]
        out.label_rank[dst] = _label_rank(xb, yb, s_y)
        top = _topk(xb, kk)
        out.topk_index[dst] = top
        out.topk_logit[dst] = np.take_along_axis(xb, top, axis=1)
        out.true_logit[dst] = s_y
        e = xb - m[:, None]
        np.exp(e, out=e)
        z = e.sum(axis=1, dtype=np.float64)
        out.log_norm[dst] = np.log(z)
        out.sum_sq_prob[dst] = np.einsum("ij,ij->i", e, e).astype(np.float64) / (z * z)
    return out


def compute_all(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    n_bins: int = 15,
    n_bootstrap: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
    adaptive_bins: str = "robench",
) -> dict[str, float | int | None]:
    """All per-cell metrics from logits and integer labels, as a flat dict (see METRIC_INFO).

    ``metrics_from_outputs(sample_outputs(logits, labels), ...)``: the softmax is taken over the
    given columns (pass logits or log-probabilities, not probabilities); float16/float32 logits
    are processed in float32 one block of rows at a time, never materialising the probabilities.
    """
    return metrics_from_outputs(sample_outputs(logits, labels), n_bins=n_bins,
                                n_bootstrap=n_bootstrap, seed=seed, alpha=alpha,
                                adaptive_bins=adaptive_bins)


def metrics_from_outputs(
    out: SampleOutputs,
    *,
    n_bins: int = 15,
    n_bootstrap: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
    adaptive_bins: str = "robench",
) -> dict[str, float | int | None]:
    """All per-cell metrics from exact per-sample outputs (:class:`SampleOutputs`).

    Confidence is the MSP and correctness is top-1 (argmax) correctness. Keys:
    ``n, num_classes, acc1, acc1_ci_low, acc1_ci_high, acc5, ece, ece_ci_low, ece_ci_high,
    max_cal_err, ece_adaptive, nll, brier, auroc, auroc_ci_low, auroc_ci_high, aupr_err, fpr95,
    mean_confidence``. Accuracies and their Clopper-Pearson interval are in percent; ECE-type
    values are fractions; ``nll = mean(min(-log p_y, -log 1e-12))``, ``brier = mean(sum_k p_k^2 -
    2 p_y + 1)``; ``ece_adaptive`` cuts its equal-mass bins by ``adaptive_bins`` (a key of
    :data:`ADAPTIVE_BINS`). Undefined values (e.g. AUROC with no errors; every interval when
    ``n_bootstrap = 0``) are ``float('nan')``. ``n`` and ``num_classes`` are ints, everything else
    a Python float. Every reduction is float64; this function is the only place metrics are
    computed, so a record and its re-scoring from stored outputs agree exactly.
    """
    n, num_classes = len(out), int(out.num_classes)
    if n == 0:
        raise ValueError("no samples to score")
    n_bins = _check_n_bins(n_bins)
    alpha = _check_alpha(alpha)
    if isinstance(n_bootstrap, bool) or int(n_bootstrap) != n_bootstrap or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be a non-negative integer; got {n_bootstrap!r}")
    if adaptive_bins not in ADAPTIVE_BINS:  # before the sort and the bootstrap
        raise ValueError(f"unknown adaptive bin rule {adaptive_bins!r}; use one of "
                         f"{sorted(ADAPTIVE_BINS)}")

    correct = out.correct
    conf = out.conf
    log_p_label = out.log_p_label
    bin_count, bin_gap = _bin_gaps(conf, correct, n_bins)
    n_correct = int(np.count_nonzero(correct))
    acc1_low, acc1_high = clopper_pearson(n_correct, n, alpha)
    acc5 = 100.0 if num_classes <= 5 else 100.0 * np.count_nonzero(out.label_rank < 5) / n
    p_label = np.exp(log_p_label)

    # One stable sort serves the adaptive ECE, AUROC, AUPR, FPR@95 and the bootstrap.
    ev = BootstrapEvaluator(conf, correct, n_bins)
    srt = ev.sorted
    reps = _run_replicates(ev, int(n_bootstrap), seed)
    ece_point = _ece_from_gaps(bin_gap, n)
    ece_low, ece_high = shifted_interval(ece_point, reps["ece"], alpha, UNIT)
    auroc_point = _auroc_sorted(srt)
    auroc_low, auroc_high = shifted_interval(auroc_point, reps["auroc"], alpha, UNIT)

    return {
        "n": int(n),
        "num_classes": num_classes,
        "acc1": 100.0 * n_correct / n,
        "acc1_ci_low": acc1_low,
        "acc1_ci_high": acc1_high,
        "acc5": float(acc5),
        "ece": ece_point,
        "ece_ci_low": ece_low,
        "ece_ci_high": ece_high,
        "max_cal_err": _mce_from_gaps(bin_count, bin_gap),
        "ece_adaptive": _adaptive_ece_sorted(srt.score, srt.positive, n_bins, adaptive_bins),
        "nll": float(np.minimum(-log_p_label, -math.log(NLL_EPS)).mean()) + 0.0,
        "brier": float((out.sum_sq_prob - 2.0 * p_label + 1.0).mean()),
        "auroc": auroc_point,
        "auroc_ci_low": auroc_low,
        "auroc_ci_high": auroc_high,
        "aupr_err": _aupr_err_sorted(srt),
        "fpr95": _fpr95_sorted(srt),
        "mean_confidence": float(conf.mean()),
    }
