"""Copies of an image are one sample (robench.clustered): -C headline intervals and paired
deltas resample base images, the clustered McNemar test, and cross-checks of both against
independent implementations (statsmodels' cluster-robust standard error, scipy's permutation
test, statsmodels' McNemar)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import robench.metrics as M  # noqa: N812
from robench.clustered import Clusters, clustered_mcnemar
from robench.compare import compare_cells
from robench.scoring import CellOutputs, cell_metrics

C = 10
GROUPS = [f"{c}/{s}" for c in ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur",
                                "glass_blur", "motion_blur", "zoom_blur", "snow", "frost", "fog",
                                "brightness", "contrast", "elastic_transform", "pixelate",
                                "jpeg_compression") for s in range(1, 6)]


def c_cell(logits_per_group: list[np.ndarray], labels: np.ndarray, *,
           base: bool = True) -> CellOutputs:
    """A -C cell in the CIFAR-10-C row layout: group g holds rows [g n, (g + 1) n), and row j
    of every group is a copy of base image j (``base=False``: the base index is not declared)."""
    n, g = len(labels), len(logits_per_group)
    logits = np.concatenate(logits_per_group).astype(np.float32)
    y = np.tile(labels, g)
    return CellOutputs(samples=M.sample_outputs(logits, y), label=y, target=y.astype(np.int32),
                       valid=np.ones(n * g, bool), group=np.repeat(np.arange(g), n).astype(
                           np.int32), group_names=GROUPS[:g], scored_classes=None,
                       sample_ids=None, base=np.tile(np.arange(n), g) if base else None)


def model(rng: np.random.Generator, n: int, strength: float = 1.2) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, C, n)
    logits = rng.normal(size=(n, C)) * 1.5
    logits[np.arange(n), labels] += strength
    return labels, logits


def score(out: CellOutputs, groups: list[str] | None = None, b: int = 300) -> tuple[dict, dict]:
    return cell_metrics(out, groups, n_bins=15, n_bootstrap=b, seed=3, alpha=0.05)


def test_identical_copies_give_the_interval_of_one_group() -> None:
    """75 groups that are identical copies of one set of images hold the information of one
    group: the image-level interval of the headline equals the interval of one group, exactly
    (the same draws), while resampling each group independently would shrink it ~sqrt(75)."""
    rng = np.random.default_rng(0)
    labels, logits = model(rng, 200)
    many, _ = score(c_cell([logits] * 75, labels))
    one, one_groups = score(c_cell([logits], labels))
    group = one_groups[GROUPS[0]]
    for k in ("acc1", "ece", "auroc"):
        assert many[k] == pytest.approx(one[k], abs=1e-12)
        for side in ("ci_low", "ci_high"):
            assert many[f"{k}_{side}"] == pytest.approx(one[f"{k}_{side}"], abs=1e-9), (k, side)
    for k in ("ece", "auroc"):  # the one group's own per-group interval: the same draws too
        for side in ("ci_low", "ci_high"):
            assert many[f"{k}_{side}"] == pytest.approx(group[f"{k}_{side}"], abs=1e-9)
    # the old scheme (each group drawn on its own) on the same cell: about sqrt(75) narrower
    correct = M.sample_outputs(logits.astype(np.float32), labels).correct
    gen = np.random.default_rng(1)
    old = [np.mean([correct[gen.integers(0, 200, 200)].mean() for _ in range(75)]) * 100
           for _ in range(400)]
    width_old = np.subtract(*np.quantile(old, [0.975, 0.025]))
    width_new = many["acc1_ci_high"] - many["acc1_ci_low"]
    assert width_new / width_old == pytest.approx(math.sqrt(75), rel=0.2)


def test_headline_interval_agrees_with_a_cluster_robust_standard_error() -> None:
    """acc1's bootstrap over base images against statsmodels' cluster-robust (sandwich) standard
    error of the mean correctness, clusters = base images: the 95% half-widths agree; both are
    far wider than the naive i.i.d. standard error of the 10 x 300 rows."""
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(4)
    labels, clean = model(rng, 300)
    per_group = [clean + rng.normal(size=clean.shape) * 0.8 for _ in range(10)]  # correlated
    out = c_cell(per_group, labels)
    head, _ = score(out, b=2000)
    y = out.samples.correct.astype(float)
    fit = sm.OLS(y, np.ones_like(y)).fit(cov_type="cluster", cov_kwds={"groups": out.base})
    half_robust = 1.96 * 100 * float(fit.bse[0])
    half_boot = (head["acc1_ci_high"] - head["acc1_ci_low"]) / 2
    assert half_boot == pytest.approx(half_robust, rel=0.1)
    half_iid = 1.96 * 100 * y.std(ddof=1) / math.sqrt(y.size)
    assert half_boot > 1.8 * half_iid
    assert head["acc1"] == pytest.approx(100 * y.mean())


def test_headline_replicates_match_a_naive_loop_over_base_images() -> None:
    """The documented draw, materialised: replicate r draws base ids with replicate_generators
    and every group is scored on its copies of them; the mean over groups is the replicate."""
    from robench.clustered import SampleValues, headline_intervals

    rng = np.random.default_rng(6)
    labels, clean = model(rng, 120)
    per_group = [clean + rng.normal(size=clean.shape) for _ in range(3)]
    out = c_cell(per_group, labels)
    head, groups = score(out, b=30)
    reps = {"ece": [], "auroc": [], "acc1": []}
    members = [np.flatnonzero(out.group == g) for g in range(3)]
    for gen in M.replicate_generators(3, 30):
        drawn = gen.integers(0, 120, 120)
        per = [M.metrics_from_outputs(out.samples.take(m[drawn]), n_bootstrap=0) for m in members]
        for k in reps:
            reps[k].append(np.mean([p[k] for p in per]))
    for k, r in reps.items():
        bounds = (0.0, 100.0) if k == "acc1" else (0.0, 1.0)
        lo, hi = M.shifted_interval(head[k], r, 0.05, bounds)
        assert (head[f"{k}_ci_low"], head[f"{k}_ci_high"]) == pytest.approx((lo, hi), abs=1e-10)
    direct = headline_intervals(SampleValues.of(out.samples), out.group, 3,
                                Clusters.of(out.base, out.base.size), head, n_bins=15,
                                n_bootstrap=30, seed=3, alpha=0.05)
    assert direct == pytest.approx({k: head[k] for k in direct})
    assert set(groups) == set(GROUPS[:3])


def test_a_cell_without_base_ids_resamples_rows() -> None:
    """Without a declared base index the rows are independent: narrower than the clustered
    interval of the same (correlated) cell."""
    rng = np.random.default_rng(8)
    labels, clean = model(rng, 300)
    per_group = [clean + rng.normal(size=clean.shape) * 0.3 for _ in range(15)]
    clustered, _ = score(c_cell(per_group, labels))
    rows, _ = score(c_cell(per_group, labels, base=False))
    w = lambda h: h["acc1_ci_high"] - h["acc1_ci_low"]  # noqa: E731
    assert w(clustered) > 2 * w(rows)
    assert clustered["acc1"] == rows["acc1"]


def test_clustered_mcnemar_with_single_rows_is_mcnemar_without_correction() -> None:
    sm = pytest.importorskip("statsmodels.stats.contingency_tables")
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(20, 300))
        m, r = rng.random(n) < rng.random(), rng.random(n) < rng.random()
        res = clustered_mcnemar(m, r, Clusters.of(None, n))
        table = [[np.sum(m & r), np.sum(~m & r)], [np.sum(m & ~r), np.sum(~m & ~r)]]
        want = sm.mcnemar(table, exact=False, correction=False)
        if res["n_discordant"]:
            assert res["statistic"] == pytest.approx(want.statistic, rel=1e-12)
            assert res["p_value"] == pytest.approx(want.pvalue, rel=1e-10)
        else:
            assert res["p_value"] == 1.0


def test_clustered_mcnemar_agrees_with_a_sign_flip_permutation_test() -> None:
    """Under H0 the per-image differences e_k are symmetric about 0: the chi-square p-value of
    the clustered statistic agrees with scipy's randomization test that flips their signs."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(11)
    k, g = 250, 75
    skill = rng.normal(size=k)  # image difficulty: shared by every copy and both models
    a = (skill[:, None] + rng.normal(size=(k, g)) * 0.7) > -0.1
    b = (skill[:, None] + rng.normal(size=(k, g)) * 0.7) > 0.0
    base = np.repeat(np.arange(k), g)
    res = clustered_mcnemar(a.ravel(), b.ravel(), Clusters.of(base, base.size))
    e = (a & ~b).sum(1) - (~a & b).sum(1)
    perm = stats.permutation_test((e,), lambda x: np.sum(x), permutation_type="samples",
                                  n_resamples=20000, alternative="two-sided",
                                  random_state=np.random.default_rng(0))
    assert res["p_value"] == pytest.approx(perm.pvalue, abs=0.02)
    assert res["n_clusters"] == k
    # pooling the 18,750 rows as independent pairs overstates the evidence by far
    from robench.compare import mcnemar_exact

    assert mcnemar_exact(a.ravel(), b.ravel())["p_value"] < res["p_value"] / 100


def test_compare_cells_names_the_test_by_the_data() -> None:
    rng = np.random.default_rng(2)
    labels, clean = model(rng, 200)
    noisy = [clean + rng.normal(size=clean.shape) for _ in range(5)]
    other = [x + rng.normal(size=x.shape) * 0.5 for x in noisy]
    groups = GROUPS[:5]
    res = compare_cells(c_cell(other, labels), c_cell(noisy, labels), summary_groups=groups,
                        n_bins=15, n_bootstrap=50, seed=0, alpha=0.05)
    assert res["test"]["test"].startswith("clustered McNemar")
    assert res["test"]["n_clusters"] == 200 and res["resampled"].startswith("200 base images")
    clean_res = compare_cells(c_cell(other[:1], labels, base=False),
                              c_cell(noisy[:1], labels, base=False), summary_groups=groups[:1],
                              n_bins=15, n_bootstrap=50, seed=0, alpha=0.05)
    assert clean_res["test"]["test"].startswith("McNemar, exact")
    assert clean_res["resampled"] == "samples"


def test_cells_that_disagree_on_base_images_are_refused() -> None:
    from robench.errors import RobenchError

    rng = np.random.default_rng(2)
    labels, clean = model(rng, 50)
    a, b = c_cell([clean, clean], labels), c_cell([clean, clean], labels)
    b.base = b.base[::-1].copy()
    with pytest.raises(RobenchError, match="base image"):
        compare_cells(a, b, summary_groups=None, n_bins=15, n_bootstrap=5, seed=0, alpha=0.05)


def test_outputs_keep_their_base_ids(tmp_path) -> None:
    rng = np.random.default_rng(2)
    labels, clean = model(rng, 30)
    out = c_cell([clean, clean], labels)
    out.ood_id_conf, out.ood_id_correct = rng.random(20), rng.random(20) < 0.5
    out.save(tmp_path / "x.npz")
    back = CellOutputs.load(tmp_path / "x.npz")
    assert np.array_equal(back.base, out.base)
    assert np.array_equal(back.ood_id_correct, out.ood_id_correct)
    head, _ = cell_metrics(back, None, n_bins=15, n_bootstrap=0, seed=0, alpha=0.05)
    assert head["id_acc1"] == pytest.approx(100 * out.ood_id_correct.mean())


def test_imagenet_c_rows_are_grouped_by_their_path_within_the_corruption_folder(tmp_path) -> None:
    from PIL import Image

    from robench.data import imagenet, imagenet_c
    from robench.data.corruptions import SEVERITIES, STANDARD_CORRUPTIONS

    wnids = imagenet.imagenet_wnids()[:2]
    for c in STANDARD_CORRUPTIONS:
        for s in SEVERITIES:
            for w in wnids:
                d = tmp_path / c / str(s) / w
                d.mkdir(parents=True)
                for k in range(2):
                    Image.new("RGB", (8, 8), (k, s, 0)).save(d / f"ILSVRC2012_val_{w}_{k}.JPEG")
    src = imagenet_c.load(tmp_path, name="imagenet-c")
    assert src.base_index is not None and len(np.unique(src.base_index)) == 4
    paths = [str(p) for p in src.loader.args[0]]
    for i, j in [(0, 4), (3, 7), (10, 290), (0, 5), (1, 290)]:
        same = paths[i].split("/")[-2:] == paths[j].split("/")[-2:]
        assert (src.base_index[i] == src.base_index[j]) == same
    for g in src.summary_groups:  # every group holds one copy of each base image
        assert sorted(src.base_index[src.groups[g]]) == [0, 1, 2, 3]


def test_no_committed_interval_excludes_its_estimate() -> None:
    """Every interval of the committed baseline holds its estimate: per-cell and per-group
    acc1 / ECE / AUROC, the -C headlines, every paired delta and every ER (the bias-shifted
    interval; plain percentiles of ECE missed 30 of 836)."""
    import json
    from pathlib import Path

    from robench.results import find_records, read_record

    folder = Path(__file__).resolve().parents[1] / "results" / "quickstart"
    checked = 0
    for path in find_records(folder):
        rec = read_record(path)
        for where, mets in [("headline", rec["metrics"]), *(rec.get("groups") or {}).items()]:
            for k in ("acc1", "ece", "auroc"):
                lo, hi = mets.get(f"{k}_ci_low"), mets.get(f"{k}_ci_high")
                if lo is None or mets.get(k) is None or math.isnan(mets[k]):
                    continue
                assert lo <= mets[k] <= hi, (path.name, where, k)
                checked += 1
        if rec.get("groups"):  # a -C headline has its intervals now
            assert all(rec["metrics"].get(f"{k}_ci_low") is not None
                       for k in ("acc1", "ece", "auroc"))
    doc = json.loads((folder / "analysis.json").read_text())
    for c in doc["comparisons"]:
        for k, d in c["delta"].items():
            assert d["ci_low"] <= d["value"] <= d["ci_high"], (c["model"], c["dataset"], k)
            checked += 1
    for m, per in doc["effective_robustness"]["models"].items():
        for d, v in per.items():
            lo, hi = v["er_interval"]
            assert lo <= v["er"] <= hi, (m, d)
            checked += 1
    assert checked > 2500
