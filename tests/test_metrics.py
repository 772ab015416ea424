"""Tests for robench.metrics: every metric against an independent implementation
(scikit-learn, torchmetrics, SciPy or a naive loop), adversarial inputs, degenerate cells and the
bootstrap machinery."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special
from scipy import stats as sps

from robench import metrics as M

skm = pytest.importorskip("sklearn.metrics")


# --------------------------------------------------------------------------------------------
# Helpers: naive reference implementations (loops, written for clarity, not speed)
# --------------------------------------------------------------------------------------------


def naive_ece(conf, correct, n_bins=15, norm="l1"):
    """Bins (lo, hi]; 0 joins the first bin (1.0 is in the last bin by construction)."""
    conf = np.asarray(conf, dtype=float)
    correct = np.asarray(correct, dtype=float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    total, worst = 0.0, 0.0
    for b in range(n_bins):
        lo, hi = edges[b], edges[b + 1]
        members = [i for i, c in enumerate(conf) if (lo < c <= hi) or (b == 0 and c == 0.0)]
        if not members:
            continue
        gap = abs(correct[members].mean() - conf[members].mean())
        total += len(members) / len(conf) * gap
        worst = max(worst, gap)
    return total if norm == "l1" else worst


def naive_rank(row, label):
    """Position of ``label`` in a stable descending sort of ``row``."""
    order = sorted(range(len(row)), key=lambda j: (-row[j], j))
    return order.index(label)


def random_case(rng, n, num_classes, scale=3.0, dtype=np.float64):
    logits = (rng.standard_normal((n, num_classes)) * scale).astype(dtype)
    # Make the model better than chance so both correct and wrong predictions exist.
    labels = np.where(rng.random(n) < 0.6, logits.argmax(axis=1), rng.integers(0, num_classes, n))
    return logits, labels.astype(np.int64)


def conf_correct(logits, labels):
    p = M.softmax(logits)
    return p.max(axis=1), p.argmax(axis=1) == labels


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


# --------------------------------------------------------------------------------------------
# softmax, accuracy, Clopper-Pearson
# --------------------------------------------------------------------------------------------


def test_softmax_matches_scipy_and_is_stable(rng):
    x = rng.standard_normal((300, 7)) * 5
    np.testing.assert_allclose(M.softmax(x), special.softmax(x, axis=1), rtol=1e-12, atol=1e-15)
    huge = np.array([[1e4, 1e4 - 1.0, -1e4], [-1e300, 0.0, 1.0]])
    p = M.softmax(huge)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p, special.softmax(huge, axis=1), rtol=1e-12)
    assert M.softmax(x.astype(np.float32)).dtype == np.float64


def test_softmax_chunked_and_minus_inf(rng):
    # Many rows x few columns spans several internal row blocks.
    x = rng.standard_normal((20_000, 5)).astype(np.float32)
    p = M.softmax(x)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(p, special.softmax(x.astype(np.float64), axis=1), rtol=1e-6)
    masked = np.array([[0.0, -np.inf, 1.0]])
    np.testing.assert_allclose(M.softmax(masked), [[1 / (1 + math.e), 0.0, math.e / (1 + math.e)]])


@pytest.mark.parametrize(
    "bad", [np.array([[0.0, np.nan]]), np.array([[np.inf, 0.0]]), np.array([[-np.inf, -np.inf]])]
)
def test_softmax_rejects_non_finite_rows(bad):
    with pytest.raises(ValueError, match="finite"):
        M.softmax(bad)


def test_accuracy_topk_against_sklearn_and_naive(rng):
    logits, labels = random_case(rng, 500, 12)
    for k in (1, 2, 5):
        expected = 100 * skm.top_k_accuracy_score(labels, logits, k=k, labels=np.arange(12))
        assert M.accuracy_topk(logits, labels, k) == pytest.approx(expected, abs=1e-12)
        # Probabilities give the same ranking.
        assert M.accuracy_topk(M.softmax(logits), labels, k) == pytest.approx(expected, abs=1e-12)
    assert M.accuracy_topk(logits, labels, 1) == pytest.approx(
        100 * np.mean(logits.argmax(axis=1) == labels)
    )
    assert M.accuracy_topk(logits, labels, 12) == 100.0
    assert M.accuracy_topk(logits, labels, 50) == 100.0


def test_accuracy_topk_ties_follow_argmax_rule(rng):
    # Coarse fp16 scores produce many ties; the label's rank is its stable descending position.
    logits = rng.integers(0, 4, (400, 9)).astype(np.float16)
    labels = rng.integers(0, 9, 400)
    ranks = np.array(
        [naive_rank(list(r.astype(float)), y) for r, y in zip(logits, labels, strict=True)]
    )
    for k in (1, 3, 5):
        assert M.accuracy_topk(logits, labels, k) == pytest.approx(100 * np.mean(ranks < k))
    assert M.accuracy_topk(logits, labels, 1) == pytest.approx(
        100 * np.mean(logits.argmax(axis=1) == labels)
    )
    flat = np.zeros((4, 6))
    assert M.accuracy_topk(flat, np.array([0, 1, 2, 5]), 1) == 25.0
    assert M.accuracy_topk(flat, np.array([0, 1, 2, 5]), 3) == 75.0


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [
        (5, 10, (18.7086, 81.2914)),  # statsmodels proportion_confint(method="beta")
        (0, 10, (0.0, 30.8498)),
        (10, 10, (69.1502, 100.0)),
        (1, 1, (2.5, 100.0)),
        (0, 1, (0.0, 97.5)),
    ],
)
def test_clopper_pearson_known_values(k, n, expected):
    low, high = M.clopper_pearson(k, n)
    assert low == pytest.approx(expected[0], abs=1e-4)
    assert high == pytest.approx(expected[1], abs=1e-4)


def test_clopper_pearson_matches_scipy_binomtest():
    for k, n, alpha in [(3, 17, 0.05), (412, 1000, 0.05), (999, 1000, 0.1), (50, 51, 0.01)]:
        ci = sps.binomtest(k, n).proportion_ci(confidence_level=1 - alpha, method="exact")
        low, high = M.clopper_pearson(k, n, alpha)
        assert low == pytest.approx(100 * ci.low, abs=1e-9)
        assert high == pytest.approx(100 * ci.high, abs=1e-9)


def test_clopper_pearson_is_bit_for_bit_the_beta_quantile():
    """The interval is computed with scipy.special.betaincinv (light to import); it must equal
    scipy.stats.beta.ppf exactly, so that stored acc1 intervals do not move."""
    rng = np.random.default_rng(0)
    ns = [1, 2, 7, 100, 1000, 10_000, 50_000, 3_750_000, *rng.integers(1, 200_000, 60).tolist()]
    for n in ns:
        for k in {0, 1, n // 3, n // 2, n - 1, n, *rng.integers(0, n + 1, 4).tolist()}:
            for alpha in (0.05, 0.01, 0.3173):
                low = 0.0 if k == 0 else 100.0 * float(sps.beta.ppf(alpha / 2, k, n - k + 1))
                high = 100.0 if k == n else 100.0 * float(sps.beta.ppf(1 - alpha / 2, k + 1,
                                                                       n - k))
                assert M.clopper_pearson(k, n, alpha) == (low, high), (k, n, alpha)


@pytest.mark.parametrize(
    ("k", "n", "alpha"), [(3, 2, 0.05), (-1, 5, 0.05), (0, 0, 0.05), (1, 5, 0.0), (1, 5, 1.5)]
)
def test_clopper_pearson_rejects_bad_input(k, n, alpha):
    with pytest.raises(ValueError):
        M.clopper_pearson(k, n, alpha)


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_bins", [1, 5, 15, 40])
def test_ece_mce_match_naive_loop(rng, n_bins):
    conf = rng.random(700)
    correct = rng.random(700) < conf**0.7
    assert M.ece(conf, correct, n_bins) == pytest.approx(
        naive_ece(conf, correct, n_bins), abs=1e-12
    )
    assert M.max_calibration_error(conf, correct, n_bins) == pytest.approx(
        naive_ece(conf, correct, n_bins, "max"), abs=1e-12
    )


def test_ece_adversarial_values_match_naive_loop(rng):
    # Ties, exact bin edges, exact 0 and exact 1.0.
    edges = np.linspace(0, 1, 16)
    conf = np.concatenate([edges, edges, np.ones(5), np.zeros(3), np.round(rng.random(50), 1)])
    correct = rng.random(conf.size) < 0.5
    assert M.ece(conf, correct) == pytest.approx(naive_ece(conf, correct), abs=1e-12)
    assert M.max_calibration_error(conf, correct) == pytest.approx(
        naive_ece(conf, correct, 15, "max"), abs=1e-12)


def test_ece_bin_edges_are_right_closed():
    # 0.2 sits exactly on the edge between bins 0 and 1 of 5: it belongs to (0, 0.2].
    conf = np.array([0.2, 0.1])
    correct = np.array([True, False])
    # One bin holding both: |0.5 - 0.15| = 0.35. A split would give (0.8 + 0.1) / 2 = 0.45.
    assert M.ece(conf, correct, n_bins=5) == pytest.approx(0.35)
    assert M.ece([0.0], [False], n_bins=5) == 0.0
    assert M.ece([0.0, 0.1], [False, True], n_bins=5) == pytest.approx(0.45)


def test_ece_simple_cases():
    assert M.ece([1.0, 1.0], [True, True]) == 0.0
    assert M.ece([1.0], [False]) == 1.0
    assert M.ece([0.7], [True]) == pytest.approx(0.3)
    assert M.max_calibration_error([0.7], [False]) == pytest.approx(0.7)
    # Mean over a bin, not per sample: 0.94 and 0.96 share the last bin with accuracy 0.5.
    assert M.ece([0.94, 0.96], [True, False]) == pytest.approx(0.45)


def test_ece_mce_match_torchmetrics_on_random_probs(rng):
    torch = pytest.importorskip("torch")
    tmc = pytest.importorskip("torchmetrics.classification")
    logits, labels = random_case(rng, 3000, 10)
    probs = M.softmax(logits)
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    assert not np.any(conf == 1.0)
    for norm, ours in (("l1", M.ece), ("max", M.max_calibration_error)):
        metric = tmc.MulticlassCalibrationError(num_classes=10, n_bins=15, norm=norm)
        ref = float(metric(torch.from_numpy(probs), torch.from_numpy(labels)))
        # torchmetrics computes in float32.
        assert ours(conf, correct, 15) == pytest.approx(ref, abs=2e-6)


def test_ece_confidence_one_goes_to_last_bin_unlike_torchmetrics():
    """torchmetrics buckets with bucketize(right=True): conf == 1.0 gets an extra bin of its own.

    Here a wrong prediction at confidence 1.0 and a correct one at 0.95 share the last bin
    (14/15, 1] for us: ECE = |0.5 - 0.975| = 0.475, MCE = 0.475. torchmetrics keeps them apart:
    ECE = (|1 - 0.95| + |0 - 1|) / 2 = 0.525 and MCE = 1.0.
    """
    torch = pytest.importorskip("torch")
    tmc = pytest.importorskip("torchmetrics.classification")
    probs = np.array([[1.0, 0.0, 0.0], [0.95, 0.05, 0.0]])
    labels = np.array([1, 0])
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    assert M.ece(conf, correct) == pytest.approx(0.475)
    assert M.max_calibration_error(conf, correct) == pytest.approx(0.475)
    assert M.ece(conf, correct) == pytest.approx(naive_ece(conf, correct))
    tm_l1 = tmc.MulticlassCalibrationError(num_classes=3, n_bins=15, norm="l1")
    tm_max = tmc.MulticlassCalibrationError(num_classes=3, n_bins=15, norm="max")
    pt, yt = torch.tensor(probs, dtype=torch.float32), torch.from_numpy(labels)
    assert float(tm_l1(pt, yt)) == pytest.approx(0.525, abs=1e-6)
    assert float(tm_max(pt, yt)) == pytest.approx(1.0, abs=1e-6)


def test_adaptive_ece(rng):
    conf = rng.random(600)
    correct = rng.random(600) < conf
    # n divisible by n_bins: equal-mass bins are consecutive blocks of 40 sorted samples.
    order = np.argsort(conf, kind="stable")
    blocks = np.array_split(order, 15)
    expected = sum(len(b) / 600 * abs(correct[b].mean() - conf[b].mean()) for b in blocks)
    assert M.adaptive_ece(conf, correct) == pytest.approx(expected, abs=1e-12)
    # Fewer samples than bins: every sample is its own bin.
    small_c, small_k = conf[:7], correct[:7]
    assert M.adaptive_ece(small_c, small_k) == pytest.approx(np.mean(np.abs(small_k - small_c)))
    # A single bin is |accuracy - mean confidence|.
    assert M.adaptive_ece(conf, correct, 1) == pytest.approx(abs(correct.mean() - conf.mean()))
    assert M.adaptive_ece([1.0, 1.0, 1.0], [True, True, True]) == 0.0


def torch_uncertainty_ace(conf, correct, n_bins):
    """A direct transcription (for this test only) of the algorithm of torch-uncertainty's
    ``_ace_compute`` / ``_equal_binning_bucketize`` (torch_uncertainty/metrics/classification/
    calibration/adaptive_calibration_error.py, v0.13.0, norm="l1"): sort the confidences, cut
    the sorted tensors with ``tensor_split(n_bins)``, per bin mean accuracy and mean confidence
    (sums of zero-padded rows / counts), weighted by count / n."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    c = torch.as_tensor(np.asarray(conf, dtype=np.float64))
    a = torch.as_tensor(np.asarray(correct, dtype=np.float64))
    c, idx = torch.sort(c)
    a = a[idx]
    acc_bin, conf_bin = list(a.tensor_split(n_bins)), list(c.tensor_split(n_bins))
    count = torch.as_tensor([len(b) for b in conf_bin], dtype=c.dtype)
    acc = pad_sequence(acc_bin, batch_first=True).sum(1) / count
    mean_conf = pad_sequence(conf_bin, batch_first=True).sum(1) / count
    return float(torch.sum(torch.abs(acc - mean_conf) * count / len(c)))


def test_adaptive_bin_rules_place_the_larger_bins_differently():
    # n = 7 into 5 bins: both rules make equal-mass bins (sizes differ by at most one) of
    # consecutive sorted samples, but put the two 2-sample bins in other places
    assert np.bincount(M.adaptive_bin_index(7, 5, "robench")).tolist() == [2, 1, 2, 1, 1]
    assert np.bincount(M.adaptive_bin_index(7, 5, "torch-uncertainty")).tolist() == [2, 2, 1, 1, 1]
    for n, k in ((600, 15), (1000, 15), (3, 5), (37, 1)):
        for rule in M.ADAPTIVE_BINS:
            b = M.adaptive_bin_index(n, k, rule)
            assert b.size == n and np.all(np.diff(b) >= 0) and b.max() < k
            sizes = np.bincount(b, minlength=k)
            assert sizes.max() - sizes.min() <= 1 and sizes.sum() == n
    # torch-uncertainty's cut is numpy.array_split's
    assert [len(x) for x in np.array_split(np.arange(1000), 15)] == \
        np.bincount(M.adaptive_bin_index(1000, 15, "torch-uncertainty")).tolist()
    with pytest.raises(ValueError, match="adaptive bin rule"):
        M.adaptive_bin_index(10, 3, "quantile")
    with pytest.raises(ValueError, match="adaptive bin rule"):
        M.compute_all(np.eye(3), np.arange(3), n_bootstrap=0, adaptive_bins="quantile")


def test_torch_uncertainty_rule_equals_its_algorithm(rng):
    """torch-uncertainty is not a dependency here, so its algorithm is transcribed above; the
    implementation was also checked once against torch-uncertainty 0.13.0 itself from PyPI
    (max |delta| 1.7e-16 over 285 random cases, float64 inputs)."""
    moved = 0
    for _ in range(60):
        n, k = int(rng.integers(20, 400)), int(rng.integers(2, 20))
        conf = 0.1 + 0.9 * rng.random(n)  # continuous: no ties, so the sort order is unique
        correct = rng.random(n) < conf ** 2
        want = torch_uncertainty_ace(conf, correct, k)
        assert M.adaptive_ece(conf, correct, k, bins="torch-uncertainty") == \
            pytest.approx(want, abs=1e-13)
        moved += abs(M.adaptive_ece(conf, correct, k) - want) > 1e-12
    assert moved > 10  # the default rule is another one (else this test proves nothing)
    # with the rule chosen, compute_all's ece_adaptive follows it; the default is unchanged
    logits, labels = random_case(rng, 997, 10)
    probs = M.softmax(logits)
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    tu = M.compute_all(logits, labels, n_bootstrap=0, n_bins=7, adaptive_bins="torch-uncertainty")
    assert tu["ece_adaptive"] == pytest.approx(torch_uncertainty_ace(conf, correct, 7), abs=1e-12)
    default = M.compute_all(logits, labels, n_bootstrap=0, n_bins=7)
    assert default["ece_adaptive"] == M.adaptive_ece(conf, correct, 7)
    assert tu["ece_adaptive"] != default["ece_adaptive"]  # 997 = 7 x 142 + 3: other bins
    assert {k: v for k, v in tu.items() if k != "ece_adaptive"} == \
        pytest.approx({k: v for k, v in default.items() if k != "ece_adaptive"}, nan_ok=True)


def test_calibration_input_validation():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.ece([1.2], [True])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.adaptive_ece([-0.1], [True])
    with pytest.raises(ValueError, match="NaN"):
        M.max_calibration_error([np.nan], [True])
    with pytest.raises(ValueError, match="same shape"):
        M.ece([0.5, 0.6], [True])
    with pytest.raises(ValueError, match="empty"):
        M.ece([], [])
    with pytest.raises(ValueError, match="0/1"):
        M.ece([0.5], [2])
    with pytest.raises(ValueError, match="n_bins"):
        M.ece([0.5], [True], n_bins=0)


# --------------------------------------------------------------------------------------------
# NLL and Brier
# --------------------------------------------------------------------------------------------


def test_nll_matches_sklearn_log_loss(rng):
    logits, labels = random_case(rng, 800, 6)
    probs = M.softmax(logits)
    expected = skm.log_loss(labels, probs, labels=np.arange(6))
    assert M.nll(probs, labels) == pytest.approx(expected, rel=1e-10)


def test_nll_clips_at_1e_minus_12():
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    assert M.nll(probs, np.array([1, 0])) == pytest.approx((-math.log(1e-12) - math.log(0.5)) / 2)


def test_brier_matches_sklearn_and_direct_formula(rng):
    logits, labels = random_case(rng, 20_000, 4)  # crosses internal row blocks
    probs = M.softmax(logits)
    direct = np.mean(np.sum((probs - np.eye(4)[labels]) ** 2, axis=1))
    assert M.brier(probs, labels) == pytest.approx(direct, rel=1e-12)
    expected = skm.brier_score_loss(labels, probs, labels=np.arange(4), scale_by_half=False)
    assert M.brier(probs, labels) == pytest.approx(expected, rel=1e-10)
    assert M.brier(np.eye(3), np.array([0, 1, 2])) == 0.0
    assert M.brier(np.eye(3), np.array([1, 2, 0])) == 2.0


# --------------------------------------------------------------------------------------------
# AUROC, AUPR, FPR@95
# --------------------------------------------------------------------------------------------


def test_auroc_matches_sklearn_and_mann_whitney(rng):
    for scores in (rng.standard_normal(500), rng.integers(0, 5, 500).astype(float)):
        pos = rng.random(500) < 0.3
        expected = skm.roc_auc_score(pos, scores)
        assert M.auroc(scores, pos) == pytest.approx(expected, abs=1e-12)
        u = sps.mannwhitneyu(scores[pos], scores[~pos]).statistic
        assert M.auroc(scores, pos) == pytest.approx(u / (pos.sum() * (~pos).sum()), abs=1e-12)


def test_auroc_degenerate_and_small():
    assert math.isnan(M.auroc([0.1, 0.2], [True, True]))
    assert math.isnan(M.auroc([0.1], [False]))
    assert M.auroc([0.1, 0.2], [False, True]) == 1.0
    assert M.auroc([0.1, 0.2], [True, False]) == 0.0
    assert M.auroc([0.5, 0.5], [True, False]) == 0.5
    with pytest.raises(ValueError, match="same shape"):
        M.auroc([0.1, 0.2], [True])
    with pytest.raises(ValueError, match="NaN"):
        M.auroc([np.nan, 0.2], [True, False])


def test_misclassification_auroc_is_symmetric(rng):
    conf = np.round(rng.random(400), 2)  # ties
    correct = rng.random(400) < conf
    ours = M.misclassification_auroc(conf, correct)
    assert ours == pytest.approx(skm.roc_auc_score(correct, conf), abs=1e-12)
    assert ours == pytest.approx(skm.roc_auc_score(~correct, -conf), abs=1e-12)
    assert math.isnan(M.misclassification_auroc(conf, np.ones(400, bool)))
    assert math.isnan(M.misclassification_auroc(conf, np.zeros(400, bool)))


@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_aupr_err_matches_sklearn_including_ties(rng, decimals):
    conf = rng.random(600)
    if decimals is not None:
        conf = np.round(conf, decimals)
    correct = rng.random(600) < conf
    expected = skm.average_precision_score(~correct, -conf)
    assert M.aupr_err(conf, correct) == pytest.approx(expected, abs=1e-12)


def test_aupr_err_degenerate():
    assert math.isnan(M.aupr_err([0.9, 0.8], [True, True]))
    assert M.aupr_err([0.9, 0.8], [False, False]) == 1.0
    assert M.aupr_err([0.4], [False]) == 1.0
    # One error ranked below one correct prediction: precision 1/2 at recall 1.
    assert M.aupr_err([0.4, 0.9], [True, False]) == 0.5


@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_fpr95_matches_roc_curve(rng, decimals):
    conf = rng.random(1000)
    if decimals is not None:
        conf = np.round(conf, decimals)
    correct = rng.random(1000) < conf
    fpr, tpr, _ = skm.roc_curve(correct, conf, drop_intermediate=False)
    expected = fpr[np.argmax(tpr >= 0.95)]
    assert M.fpr_at_95_tpr(conf, correct) == pytest.approx(expected, abs=1e-15)


def test_fpr95_hand_computed_and_degenerate():
    # 20 correct at confidences 0.21..0.40, 2 wrong at 0.215 and 0.5. Accepting conf >= t: the
    # highest threshold keeping 19/20 correct is t = 0.22, which accepts only the 0.5 error.
    correct_conf = np.round(np.linspace(0.21, 0.40, 20), 3)
    conf = np.concatenate([correct_conf, [0.215, 0.5]])
    correct = np.concatenate([np.ones(20, bool), [False, False]])
    assert M.fpr_at_95_tpr(conf, correct) == 0.5
    assert math.isnan(M.fpr_at_95_tpr([0.3, 0.4], [True, True]))
    assert math.isnan(M.fpr_at_95_tpr([0.3, 0.4], [False, False]))


def test_ood_auroc_convention(rng):
    conf_id = rng.beta(5, 1, 300)
    conf_ood = rng.beta(2, 2, 200)
    scores = -np.concatenate([conf_id, conf_ood])
    is_ood = np.r_[np.zeros(300, bool), np.ones(200, bool)]
    assert M.ood_auroc(conf_id, conf_ood) == pytest.approx(skm.roc_auc_score(is_ood, scores))
    assert M.ood_auroc(conf_id, conf_ood) > 0.5  # shifted set is less confident
    assert M.ood_auroc(conf_id, conf_id) == pytest.approx(0.5)
    assert math.isnan(M.ood_auroc([], conf_ood))


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------


def test_weighted_evaluator_equals_naive_resampling(rng):
    conf = np.round(rng.random(1500), 2)  # ties inside bins and across classes
    conf[:10] = 1.0
    correct = rng.random(1500) < conf
    ev = M.BootstrapEvaluator(conf, correct, n_bins=15)
    for _ in range(10):
        idx = rng.integers(0, conf.size, conf.size)
        counts = np.bincount(idx, minlength=conf.size)
        assert ev.ece(counts) == pytest.approx(M.ece(conf[idx], correct[idx]), abs=1e-12)
        assert ev.auroc(counts) == pytest.approx(
            skm.roc_auc_score(correct[idx], conf[idx]), abs=1e-12
        )
    # Unit weights reproduce the point estimates; fractional weights are accepted too.
    ones = np.ones(conf.size)
    assert ev.ece(ones) == pytest.approx(M.ece(conf, correct), abs=1e-12)
    assert ev.auroc(ones.astype(int)) == pytest.approx(M.misclassification_auroc(conf, correct))
    with pytest.raises(ValueError, match="shape"):
        ev.ece(ones[:-1])
    with pytest.raises(ValueError, match="non-negative"):
        ev.ece(-ones)


def test_bootstrap_replicates_follow_documented_protocol(rng):
    conf = np.round(rng.random(800), 2)
    correct = rng.random(800) < conf
    reps = M.bootstrap_replicates(conf, correct, n_bootstrap=25, seed=7)
    children = np.random.SeedSequence(7).spawn(25)
    for r, child in enumerate(children):
        idx = np.random.default_rng(child).integers(0, 800, 800)  # rows, in their own order
        assert reps["ece"][r] == pytest.approx(M.ece(conf[idx], correct[idx]), abs=1e-12)
        assert reps["auroc"][r] == pytest.approx(M.auroc(conf[idx], correct[idx]), abs=1e-12)
    ci = M.bootstrap_ci(conf, correct, n_bootstrap=25, seed=7, alpha=0.1)
    point = M.ece(conf, correct)
    bias = reps["ece"].mean() - point
    assert ci["ece"] == pytest.approx(tuple(np.quantile(reps["ece"], [0.05, 0.95]) - bias))


def test_bootstrap_deterministic_and_thread_independent(rng, monkeypatch):
    conf = rng.random(3000)
    correct = rng.random(3000) < conf
    a = M.bootstrap_ci(conf, correct, n_bootstrap=40, seed=3)
    b = M.bootstrap_ci(conf, correct, n_bootstrap=40, seed=3)
    assert a == b
    assert M.bootstrap_ci(conf, correct, n_bootstrap=40, seed=4) != a
    monkeypatch.setattr(M, "_BOOTSTRAP_MIN_N_FOR_THREADS", 0)
    monkeypatch.setattr(M, "_BOOTSTRAP_THREADS", 3)
    assert M.bootstrap_ci(conf, correct, n_bootstrap=40, seed=3) == a


def test_bootstrap_interval_contains_point_estimate(rng):
    # Over-confident model, as zero-shot CLIP typically is.
    conf = rng.beta(6, 1.5, 4000)
    correct = rng.random(4000) < conf - 0.1
    ci = M.bootstrap_ci(conf, correct, n_bootstrap=200, seed=0)
    ece_point = M.ece(conf, correct)
    auroc_point = M.misclassification_auroc(conf, correct)
    assert ci["ece"][0] <= ece_point <= ci["ece"][1]
    assert ci["auroc"][0] <= auroc_point <= ci["auroc"][1]
    assert ci["ece"][1] - ci["ece"][0] < 0.05


@pytest.mark.parametrize("n", [50, 250, 2000])
def test_no_interval_excludes_its_estimate(n):
    """Well-calibrated models on small samples are where a plain percentile interval of the
    upward-biased ECE misses its point estimate; the bias-shifted interval never does (the
    replicates' mean lies between their quantiles), for ECE, AUROC and acc1 alike."""
    gen = np.random.default_rng(n)
    misses_percentile = 0
    for trial in range(40):
        conf = gen.uniform(0.3, 1.0, n)
        correct = gen.random(n) < conf  # calibrated: ECE near 0, bootstrap bias upwards
        logits = np.log(np.c_[conf, np.repeat(((1 - conf) / 9)[:, None], 9, axis=1)])
        labels = np.where(correct, 0, 1 + gen.integers(0, 9, n))
        m = M.compute_all(logits, labels, n_bootstrap=200, seed=trial)
        for k in ("acc1", "ece", "auroc"):
            assert m[f"{k}_ci_low"] <= m[k] <= m[f"{k}_ci_high"], (n, trial, k)
        reps = M.bootstrap_replicates(M.softmax(logits).max(1), M.softmax(logits).argmax(1) ==
                                      labels, n_bootstrap=200, seed=trial)
        lo, _ = M.percentile_interval(reps["ece"])
        misses_percentile += lo > m["ece"]
    if n <= 250:  # the failure the shift mends is real at these sizes
        assert misses_percentile > 0


def test_shifted_interval_definition_and_bounds():
    reps = np.array([0.10, 0.12, 0.14, 0.16, 0.18, np.nan])
    lo, hi = M.shifted_interval(0.11, reps, alpha=0.5)
    q = np.quantile(reps[:-1], [0.25, 0.75])
    assert (lo, hi) == pytest.approx(tuple(q - (0.14 - 0.11)))
    assert M.shifted_interval(0.01, [0.05, 0.06, 0.2], bounds=(0.0, 1.0))[0] == 0.0
    assert all(math.isnan(v) for v in M.shifted_interval(float("nan"), reps))
    assert all(math.isnan(v) for v in M.shifted_interval(0.1, [np.nan]))


def test_bootstrap_degenerate():
    nan_pair = M.bootstrap_ci([0.9, 0.8], [True, True], n_bootstrap=10)
    assert math.isnan(nan_pair["auroc"][0]) and math.isnan(nan_pair["auroc"][1])
    single = M.bootstrap_ci([0.7], [True], n_bootstrap=10)
    assert single["ece"] == pytest.approx((0.3, 0.3))
    empty = M.bootstrap_ci([0.7, 0.2], [True, False], n_bootstrap=0)
    assert all(math.isnan(v) for pair in empty.values() for v in pair)
    assert all(math.isnan(v) for v in M.percentile_interval([np.nan, np.nan]))
    with pytest.raises(ValueError, match="n_bootstrap"):
        M.bootstrap_ci([0.7], [True], n_bootstrap=-1)


# --------------------------------------------------------------------------------------------
# compute_all
# --------------------------------------------------------------------------------------------

KEYS = (
    "n num_classes acc1 acc1_ci_low acc1_ci_high acc5 ece ece_ci_low ece_ci_high max_cal_err "
    "ece_adaptive nll brier auroc auroc_ci_low auroc_ci_high aupr_err fpr95 mean_confidence"
).split()


def test_compute_all_keys_types_and_metric_info(rng):
    logits, labels = random_case(rng, 500, 10)
    out = M.compute_all(logits, labels, n_bootstrap=20)
    assert list(out) == KEYS
    assert set(M.METRIC_INFO) == set(KEYS)
    assert type(out["n"]) is int and type(out["num_classes"]) is int
    assert all(type(out[k]) is float for k in KEYS[2:])
    for info in M.METRIC_INFO.values():
        assert info.description and info.direction in ("higher", "lower", None)


def test_compute_all_matches_individual_metrics(rng):
    logits, labels = random_case(rng, 20_000, 10)  # several internal row blocks
    out = M.compute_all(logits, labels, n_bootstrap=30, seed=5)
    probs = M.softmax(logits)
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    k = int(correct.sum())
    assert out["n"] == 20_000 and out["num_classes"] == 10
    assert out["acc1"] == pytest.approx(100 * k / 20_000)
    assert (out["acc1_ci_low"], out["acc1_ci_high"]) == pytest.approx(M.clopper_pearson(k, 20_000))
    assert out["acc5"] == pytest.approx(
        100 * skm.top_k_accuracy_score(labels, logits, k=5, labels=np.arange(10))
    )
    close = {
        "ece": M.ece(conf, correct),
        "max_cal_err": M.max_calibration_error(conf, correct),
        "ece_adaptive": M.adaptive_ece(conf, correct),
        "nll": skm.log_loss(labels, probs, labels=np.arange(10)),
        "brier": M.brier(probs, labels),
        "auroc": skm.roc_auc_score(correct, conf),
        "aupr_err": skm.average_precision_score(~correct, -conf),
        "fpr95": M.fpr_at_95_tpr(conf, correct),
        "mean_confidence": conf.mean(),
    }
    for key, value in close.items():
        assert out[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    ci = M.bootstrap_ci(conf, correct, n_bootstrap=30, seed=5)
    assert (out["ece_ci_low"], out["ece_ci_high"]) == pytest.approx(ci["ece"], rel=1e-9)
    assert (out["auroc_ci_low"], out["auroc_ci_high"]) == pytest.approx(ci["auroc"], rel=1e-9)


def test_compute_all_float32_close_to_float64(rng):
    logits, labels = random_case(rng, 5000, 50)
    a = M.compute_all(logits.astype(np.float32), labels, n_bootstrap=0)
    b = M.compute_all(logits.astype(np.float32).astype(np.float64), labels, n_bootstrap=0)
    for key in KEYS:
        if not key.endswith(("_ci_low", "_ci_high")):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_compute_all_fp16_ties():
    rng = np.random.default_rng(1)
    logits = (rng.integers(0, 6, (3000, 20)) * 0.5).astype(np.float16)
    labels = rng.integers(0, 20, 3000)
    out = M.compute_all(logits, labels, n_bootstrap=10)
    as64 = logits.astype(np.float64)
    assert out["acc1"] == pytest.approx(100 * np.mean(as64.argmax(axis=1) == labels))
    stable_desc = np.argsort(-as64, axis=1, kind="stable")
    ranks = np.argmax(stable_desc == labels[:, None], axis=1)
    assert out["acc5"] == pytest.approx(100 * np.mean(ranks < 5))
    conf, correct = conf_correct(as64, labels)
    # Rows holding the same values in different columns tie exactly in real arithmetic; float32
    # and float64 sums in different orders may split a few of those ties differently.
    assert out["auroc"] == pytest.approx(skm.roc_auc_score(correct, conf), abs=1e-4)


def test_compute_all_degenerate_cells():
    # All correct: confident and right -> no errors, so the failure-detection metrics are NaN.
    logits = np.array([[10.0, 0.0], [0.0, 10.0], [10.0, 0.0]])
    out = M.compute_all(logits, np.array([0, 1, 0]), n_bootstrap=20)
    assert out["acc1"] == 100.0 and out["acc1_ci_high"] == 100.0
    for key in ("auroc", "auroc_ci_low", "auroc_ci_high", "aupr_err", "fpr95"):
        assert math.isnan(out[key]), key
    assert 0 <= out["ece"] < 1e-4
    # All wrong: AUROC/FPR undefined, but AUPR-Err is 1 (every flagged sample is an error).
    out = M.compute_all(logits, np.array([1, 0, 1]), n_bootstrap=20)
    assert out["acc1"] == 0.0 and out["acc1_ci_low"] == 0.0
    assert math.isnan(out["auroc"]) and math.isnan(out["fpr95"])
    assert out["aupr_err"] == 1.0
    # Saturated confidence of exactly 1.0 (float32 underflow) lands in the last bin.
    sat = M.compute_all(np.array([[200.0, 0.0]], dtype=np.float32), np.array([1]))
    assert sat["mean_confidence"] == 1.0 and sat["ece"] == 1.0 and sat["max_cal_err"] == 1.0
    assert sat["nll"] == pytest.approx(-math.log(1e-12))


def test_compute_all_single_sample_and_single_class():
    one = M.compute_all(np.array([[2.0, 1.0, 0.0]]), np.array([0]), n_bootstrap=10)
    assert one["n"] == 1 and one["acc1"] == 100.0
    assert one["ece_ci_low"] == pytest.approx(one["ece"])
    assert one["ece_ci_high"] == pytest.approx(one["ece"])
    assert math.isnan(one["auroc"]) and math.isnan(one["auroc_ci_low"])
    single_class = M.compute_all(np.zeros((4, 1)), np.zeros(4, dtype=int), n_bootstrap=10)
    assert single_class["acc1"] == 100.0 and single_class["acc5"] == 100.0
    assert single_class["ece"] == 0.0 and single_class["nll"] == 0.0
    assert single_class["brier"] == 0.0 and single_class["mean_confidence"] == 1.0


def test_compute_all_without_bootstrap(rng):
    logits, labels = random_case(rng, 300, 5)
    out = M.compute_all(logits, labels, n_bootstrap=0)
    for key in ("ece_ci_low", "ece_ci_high", "auroc_ci_low", "auroc_ci_high"):
        assert math.isnan(out[key])
    assert not math.isnan(out["acc1_ci_low"])
    assert out["acc5"] == 100.0  # k >= number of classes


@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (np.zeros((3, 4)), np.array([0, 1]), "shape"),
        (np.zeros((3, 4)), np.array([0, 1, 4]), r"\[0, 4\)"),
        (np.zeros((3, 4)), np.array([0, -1, 2]), r"\[0, 4\)"),
        (np.zeros((3, 4)), np.array([0.0, 1.0, 2.0]), "integer"),
        (np.zeros((3, 4)), np.array([[0, 1, 2]]), "shape"),
        (np.zeros((0, 4)), np.array([], dtype=int), "empty"),
        (np.zeros((3, 0)), np.array([0, 0, 0]), "class"),
        (np.zeros(4), np.array([0]), "2-D"),
        (np.array([[0.0, np.nan]]), np.array([0]), "finite"),
        (np.array([["a", "b"]]), np.array([0]), "numeric"),
    ],
)
def test_compute_all_input_validation(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        M.compute_all(logits, labels)


@pytest.mark.parametrize("kwargs", [{"n_bins": 0}, {"alpha": 0.0}, {"n_bootstrap": -5}])
def test_compute_all_rejects_bad_options(kwargs):
    with pytest.raises(ValueError):
        M.compute_all(np.zeros((2, 3)), np.array([0, 1]), **kwargs)
