"""Paired comparisons (robench.compare): pairing by identity, point deltas equal to the records'
own metric differences, the paired bootstrap against a naive loop, McNemar against statsmodels,
and the effect pairing has on the interval."""

from __future__ import annotations

import math

import numpy as np
import pytest

import robench.metrics as M  # noqa: N812
from robench.compare import compare_cells, mcnemar_exact, pair_samples, paired_bootstrap
from robench.errors import RobenchError
from robench.scoring import CellOutputs, cell_metrics

N, C = 600, 10


def outputs(logits: np.ndarray, labels: np.ndarray, *, ids: list[str] | None = None,
            groups: list[str] | None = None, id_conf: np.ndarray | None = None,
            valid: np.ndarray | None = None, copies: bool = False) -> CellOutputs:
    """Row i is in group i % G; with ``copies`` rows i // G of every group are copies of one
    base image (a -C set's layout), else every row is an image of its own."""
    n = len(labels)
    group = np.full(n, -1, np.int32)
    if groups:
        group = (np.arange(n) % len(groups)).astype(np.int32)
    base = np.arange(n) // len(groups) if copies and groups else None
    return CellOutputs(samples=M.sample_outputs(logits.astype(np.float32), labels),
                       label=labels.astype(np.int64), target=labels.astype(np.int32),
                       valid=np.ones(n, bool) if valid is None else valid, group=group,
                       group_names=list(groups or []), scored_classes=None,
                       sample_ids=None if ids is None else np.char.encode(np.asarray(ids), "utf-8"),
                       base=base, ood_id_conf=id_conf)


def pair_of_models(seed: int = 0, n: int = N, shift: float = 0.3):
    """Two correlated models on the same samples (the second a noisier copy of the first)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, n)
    base = rng.normal(size=(n, C)) * 2
    base[np.arange(n), labels] += 2.0
    other = base + rng.normal(size=(n, C)) * shift
    return labels, base, other


def headline(out: CellOutputs, groups: list[str] | None = None) -> dict:
    return cell_metrics(out, groups, n_bins=15, n_bootstrap=0, seed=0, alpha=0.05)[0]


@pytest.mark.parametrize("grouped", [False, True])
def test_point_deltas_equal_the_difference_of_the_records_metrics(grouped: bool) -> None:
    labels, a_logits, b_logits = pair_of_models()
    groups = ["fog/1", "fog/2", "snow/1"] if grouped else None
    rng = np.random.default_rng(5)
    id_a, id_b = rng.uniform(0.2, 1, 300), rng.uniform(0.2, 1, 300)
    a = outputs(a_logits, labels, groups=groups, id_conf=id_a)
    b = outputs(b_logits, labels, groups=groups, id_conf=id_b)
    summary = groups[:2] if grouped else None  # snow/1 kept but not in the headline
    res = compare_cells(a, b, summary_groups=summary, n_bins=15, n_bootstrap=50, seed=0,
                        alpha=0.05)
    ha, hb = headline(a, summary), headline(b, summary)
    assert set(res["delta"]) == {"acc1", "acc5", "ece", "auroc", "nll", "brier", "ood_auroc"}
    for k, d in res["delta"].items():
        assert d["value"] == pytest.approx(ha[k] - hb[k], abs=1e-12), k
        assert d["ci_low"] <= d["value"] <= d["ci_high"], k
    assert res["n_paired"] == N and res["pairing"] == "row index"
    assert res["n_groups"] == (2 if grouped else None)


def test_paired_bootstrap_matches_a_naive_loop() -> None:
    """Replicate r draws base images once (every group's copies of them) and scores both models
    on that multiset, as documented: recomputed here by materialising the resampled groups."""
    labels, a_logits, b_logits = pair_of_models(1, n=300)
    groups = ["fog/1", "fog/2"]
    a = outputs(a_logits, labels, groups=groups, copies=True)
    b = outputs(b_logits, labels, groups=groups, copies=True)
    _, reps, facts = paired_bootstrap(a, b, summary_groups=groups, n_bins=15, n_bootstrap=4,
                                      seed=7)
    assert facts["resampled"].startswith("150 base images")
    members = [np.flatnonzero(a.group == g) for g in range(2)]  # member k = base image k
    for r, rng in enumerate(M.replicate_generators(7, 4)):
        drawn = rng.integers(0, 150, 150)
        per = [[M.metrics_from_outputs(o.samples.take(m[drawn]), n_bootstrap=0) for m in members]
               for o in (a, b)]
        for k in ("acc1", "acc5", "ece", "auroc", "nll", "brier"):
            want = np.mean([p[k] for p in per[0]]) - np.mean([p[k] for p in per[1]])
            assert reps[k][r] == pytest.approx(want, abs=1e-12), (k, r)


def test_paired_ood_auroc_replicates_match_sklearn_on_the_drawn_multisets() -> None:
    """ood_auroc's replicates: the base images are drawn first, then the ID set from the same
    generator; a group's value is the AUROC of -MSP with the group's samples positive against
    the drawn ID samples (ties in the confidences included), here recomputed by scikit-learn on
    the expanded multisets."""
    from sklearn.metrics import roc_auc_score

    labels, a_logits, b_logits = pair_of_models(3, n=240)
    groups = ["fog/1", "fog/2", "fog/3"]
    rng = np.random.default_rng(4)
    id_a = np.round(rng.uniform(0.2, 1, 90), 2)  # rounded: ties with the OOD confidences
    id_b = np.round(rng.uniform(0.2, 1, 90), 2)
    a = outputs(a_logits, labels, groups=groups, id_conf=id_a, copies=True)
    b = outputs(b_logits, labels, groups=groups, id_conf=id_b, copies=True)
    for o in (a, b):  # confidences on the same 0.01 grid as the ID ones
        o.samples.conf[:] = np.round(o.samples.conf, 2)
    point, reps, _ = paired_bootstrap(a, b, summary_groups=groups, n_bins=15, n_bootstrap=3,
                                      seed=11)
    members = [np.flatnonzero(a.group == g) for g in range(3)]

    def ood(id_conf, conf, draw_id, draws) -> float:
        per = [roc_auc_score(np.r_[np.zeros(draw_id.size), np.ones(d.size)],
                             -np.r_[id_conf[draw_id], conf[d]]) for d in draws]
        return float(np.mean(per))

    everyone = np.arange(90)
    want = ood(id_a, a.samples.conf, everyone, members) - \
        ood(id_b, b.samples.conf, everyone, members)
    assert point["ood_auroc"] == pytest.approx(want, abs=1e-12)
    for r, gen in enumerate(M.replicate_generators(11, 3)):
        drawn = gen.integers(0, 80, 80)
        draw_id = gen.integers(0, 90, 90)
        draws = [m[drawn] for m in members]
        want = ood(id_a, a.samples.conf, draw_id, draws) - \
            ood(id_b, b.samples.conf, draw_id, draws)
        assert reps["ood_auroc"][r] == pytest.approx(want, abs=1e-12), r


def test_pairing_shrinks_the_interval_of_a_small_real_difference() -> None:
    """Model B = model A with 6 of 1000 wrong answers fixed: +0.6 points, far inside either
    model's own Clopper-Pearson interval (+-3 points), yet the paired interval excludes 0."""
    rng = np.random.default_rng(2)
    n = 1000
    labels = rng.integers(0, C, n)
    a = rng.normal(size=(n, C))
    a[np.arange(n), labels] += 1.5  # about half right
    wrong = np.flatnonzero(a.argmax(1) != labels)[:6]
    b = a.copy()
    b[wrong, labels[wrong]] = a[wrong].max(1) + 1.0
    res = compare_cells(outputs(b, labels), outputs(a, labels), summary_groups=None, n_bins=15,
                        n_bootstrap=300, seed=0, alpha=0.05)
    d = res["delta"]["acc1"]
    assert d["value"] == pytest.approx(0.6)
    assert 0 < d["ci_low"] <= 0.6 <= d["ci_high"] < 1.5
    lo, hi = M.clopper_pearson(int((a.argmax(1) == labels).sum()), n)
    assert hi - lo > 5  # each model alone: about 6 points wide
    assert res["test"]["model_only_correct"] == 6
    assert res["test"]["reference_only_correct"] == 0
    assert res["test"]["p_value"] == pytest.approx(2 * 0.5 ** 6)


def test_mcnemar_exact_matches_statsmodels() -> None:
    sm = pytest.importorskip("statsmodels.stats.contingency_tables")
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(5, 200))
        m, r = rng.random(n) < rng.random(), rng.random(n) < rng.random()
        res = mcnemar_exact(m, r)
        table = [[np.sum(m & r), np.sum(~m & r)], [np.sum(m & ~r), np.sum(~m & ~r)]]
        want = sm.mcnemar(table, exact=True).pvalue
        assert res["p_value"] == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert mcnemar_exact(np.ones(4, bool), np.ones(4, bool))["p_value"] == 1.0  # no discordance


def test_samples_are_paired_by_id_whatever_the_order() -> None:
    labels, a_logits, b_logits = pair_of_models(4, n=200)
    ids = [f"img/{i:04d}.jpg" for i in range(200)]
    perm = np.random.default_rng(0).permutation(200)
    a = outputs(a_logits, labels, ids=ids)
    b_sorted = outputs(b_logits, labels, ids=ids)
    b_shuffled = outputs(b_logits[perm], labels[perm], ids=[ids[i] for i in perm])
    p = pair_samples(a, b_shuffled)
    assert p.how == "sample_id"
    assert np.array_equal(perm[p.b_rows], p.a_rows)
    kw = {"summary_groups": None, "n_bins": 15, "n_bootstrap": 20, "seed": 0, "alpha": 0.05}
    one, two = compare_cells(a, b_sorted, **kw), compare_cells(a, b_shuffled, **kw)
    for k in one["delta"]:
        assert one["delta"][k]["value"] == pytest.approx(two["delta"][k]["value"], abs=1e-12)
    assert one["test"] == two["test"]


def test_undecodable_samples_are_left_out_of_both_sides() -> None:
    labels, a_logits, b_logits = pair_of_models(5, n=100)
    valid = np.ones(100, bool)
    valid[[3, 50]] = False
    res = compare_cells(outputs(a_logits, labels, valid=valid), outputs(b_logits, labels),
                        summary_groups=None, n_bins=15, n_bootstrap=0, seed=0, alpha=0.05)
    assert res["n_paired"] == 98
    assert math.isnan(res["delta"]["acc1"]["ci_low"])  # no resamples: no interval


def test_cells_that_are_not_the_same_samples_are_refused() -> None:
    labels, a_logits, b_logits = pair_of_models(6, n=50)
    ids = [f"{i}.jpg" for i in range(50)]
    a = outputs(a_logits, labels, ids=ids)
    with pytest.raises(RobenchError, match="different samples"):
        pair_samples(a, outputs(b_logits, labels, ids=[f"x{i}.jpg" for i in range(50)]))
    with pytest.raises(RobenchError, match="one cell stores sample ids"):
        pair_samples(a, outputs(b_logits, labels))
    with pytest.raises(RobenchError, match="50 vs 49 samples"):
        pair_samples(outputs(a_logits, labels), outputs(b_logits[:49], labels[:49]))
    with pytest.raises(RobenchError, match="different labels"):
        pair_samples(outputs(a_logits, labels), outputs(b_logits, (labels + 1) % C))
    with pytest.raises(RobenchError, match="groups differ"):
        pair_samples(outputs(a_logits, labels, groups=["a/1", "a/2"]),
                     outputs(b_logits, labels, groups=["a/1", "b/1"]))
