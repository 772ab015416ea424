"""Effective robustness, mCE and the suite analysis (analysis.json) built from real records: the
committed quickstart records and their per-sample outputs, copied to a temporary folder."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from robench.analysis import AnalysisSettings, analyze, read_analysis, stale_cells, suites_under
from robench.cli import main
from robench.data.corruptions import STANDARD_CORRUPTIONS
from robench.errors import RobenchError
from robench.results import ANALYSIS_FILE, find_records, read_record, record_path
from robench.robustness import (
    CorruptionBaseline,
    fit_logit_linear,
    load_fits,
    logit,
    mce,
    shipped_baseline,
    sigmoid,
)

QUICKSTART = Path(__file__).resolve().parents[1] / "results" / "quickstart"
MODELS = ("tiny-clip-cifar10", "tiny-clip-ts", "tiny-clip-lp-clip", "tiny-clip-wise-ft-a0.5")
ID, OOD = "cifar10-subset-test", "cifar10-subset-test-c"

# --------------------------------------------------------------------------------------------
# Effective robustness
# --------------------------------------------------------------------------------------------


def test_logit_linear_fit_recovers_the_line_and_er_is_the_residual() -> None:
    slope, intercept = 0.8, -0.7
    ids = [40.0, 55.0, 70.0, 85.0]
    points = {f"m{i}": (x, 100 * sigmoid(slope * logit(x) + intercept)) for i, x in enumerate(ids)}
    fit = fit_logit_linear(points, "id", "ood")
    assert fit.slope == pytest.approx(slope) and fit.intercept == pytest.approx(intercept)
    assert fit.r2 == pytest.approx(1.0) and fit.n == 4 and fit.reference == sorted(points)
    x = 60.0
    on_line = 100 * sigmoid(slope * math.log(0.6 / 0.4) + intercept)
    assert fit.predict(x) == pytest.approx(on_line)
    assert fit.effective_robustness(x, on_line + 3.0) == pytest.approx(3.0)
    assert fit.effective_robustness(100.0, 50.0) is None  # no finite logit


def test_fit_needs_two_distinct_finite_points() -> None:
    with pytest.raises(RobenchError, match="at least 2"):
        fit_logit_linear({"a": (50.0, 30.0)}, "id", "ood")
    with pytest.raises(RobenchError, match="at least 2"):
        fit_logit_linear({"a": (50.0, 30.0), "b": (50.0, 31.0)}, "id", "ood")
    with pytest.raises(RobenchError, match="0 or 100%"):
        fit_logit_linear({"a": (50.0, 0.0), "b": (60.0, 30.0)}, "id", "ood")


def test_coefficients_files_need_their_source_and_x_axis(tmp_path: Path) -> None:
    good = tmp_path / "fits.yaml"
    good.write_text("fits:\n  - {id_dataset: imagenet, ood_dataset: imagenet-r, slope: 0.9,\n"
                    "     intercept: -1.2, x_axis: ood-classes,\n"
                    "     source: 'my fit over 40 ResNets, runs/x'}\n")
    [fit] = load_fits(good)
    assert fit.slope == 0.9 and "my fit over 40 ResNets" in fit.source and fit.reference == []
    assert fit.x_axis == "ood-classes" and fit.weak is None  # given, not fitted: not judged
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id_dataset": "a", "ood_dataset": "b", "slope": 1,
                                "intercept": 0}]))
    with pytest.raises(RobenchError, match="lacks source, x_axis"):
        load_fits(bad)
    bad.write_text(json.dumps([{"id_dataset": "a", "ood_dataset": "b", "slope": 1,
                                "intercept": 0, "source": "s", "x_axis": "imagenet"}]))
    with pytest.raises(RobenchError, match="x_axis 'imagenet'"):
        load_fits(bad)


def test_fit_band_and_slope_interval_match_statsmodels() -> None:
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(0)
    ids = rng.uniform(30, 90, 9)
    points = {f"m{i}": (x, 100 * sigmoid(0.9 * logit(x) - 0.6 + rng.normal(0, 0.15)))
              for i, x in enumerate(ids)}
    fit = fit_logit_linear(points, "id", "ood")
    xs = np.array([logit(x) for x, _ in points.values()])
    ys = np.array([logit(y) for _, y in points.values()])
    ols = sm.OLS(ys, sm.add_constant(xs)).fit()
    assert fit.slope_interval == pytest.approx(tuple(ols.conf_int(0.05)[1]), rel=1e-9)
    for x0 in (35.0, 60.0, 88.0):
        lo, hi = ols.get_prediction(np.array([[1.0, logit(x0)]])).conf_int(alpha=0.05)[0]
        assert fit.predict_interval(x0) == pytest.approx((100 * sigmoid(lo), 100 * sigmoid(hi)),
                                                         rel=1e-9)
        y0 = 50.0
        er_lo, er_hi = fit.er_interval(x0, y0)
        assert er_lo <= fit.effective_robustness(x0, y0) <= er_hi
    assert fit.weak is None and fit.r2 == pytest.approx(ols.rsquared)


def test_a_fit_whose_slope_could_be_zero_is_too_weak_to_read() -> None:
    rng = np.random.default_rng(1)
    flat = {f"m{i}": (x, 100 * sigmoid(-0.4 + rng.normal(0, 0.3)))
            for i, x in enumerate(rng.uniform(40, 70, 6))}
    fit = fit_logit_linear(flat, "id", "ood")
    assert fit.weak is not None and "holds 0" in fit.weak
    two = fit_logit_linear({"a": (50.0, 30.0), "b": (60.0, 35.0)}, "id", "ood")
    assert two.weak is not None and "no interval" in two.weak and two.predict_interval(55) is None


def er_suite(root: Path, sub_list: bool) -> None:
    """An ImageNet-like suite: ID set + a shifted set scored over a sub-list (like ImageNet-R),
    whose records carry id_acc1 (ID top-1 over the sub-list) different from the ID headline."""
    from test_report import make_record

    from robench.results import write_record_json

    for i, m in enumerate(("a", "b", "c", "d")):
        idr = make_record("s", m, "in", {"n": 100, "acc1": 50.0 + 10 * i})
        idr["protocol"]["id_dataset"] = "in"
        ood = make_record("s", m, "in-r", {"n": 80, "acc1": 30.0 + 6 * i + (i % 2),
                                           "id_acc1": 60.0 + 8 * i})
        ood["protocol"]["id_dataset"] = "in"
        if sub_list:
            ood["protocol"]["scored_classes"] = list(range(200))
        for rec in (idr, ood):
            write_record_json(root / "s" / m / f"{rec['dataset']}.json", rec)


@pytest.mark.usefixtures("unverified_meaning")  # hand-made numbers, no outputs
def test_er_on_a_sub_list_set_reads_the_id_accuracy_over_its_classes(tmp_path: Path) -> None:
    er_suite(tmp_path, sub_list=True)
    [(_, doc)] = analyze(tmp_path, AnalysisSettings(er_reference="all", mce_baseline="none"))
    er = doc["effective_robustness"]
    fit = er["fits"]["in-r"]
    assert fit["x_axis"] == "ood-classes"
    assert er["x_axis"]["in-r"] == "in top-1 over the 200 classes of in-r"
    for m, i in zip("abcd", range(4), strict=True):
        v = er["models"][m]["in-r"]
        assert v["id_acc"] == 60.0 + 8 * i  # id_acc1, not the ID headline 50 + 10 i
        lo, hi = v["er_interval"]
        assert lo <= v["er"] <= hi
    # a coefficients file on the 1000-class axis is refused for a sub-list set
    fits = tmp_path / "fits.yaml"
    fits.write_text("- {id_dataset: in, ood_dataset: in-r, slope: 1, intercept: 0, "
                    "x_axis: all-classes, source: paper}\n")
    with pytest.raises(RobenchError, match="ood-classes"):
        analyze(tmp_path, AnalysisSettings(er_fits=str(fits), mce_baseline="none"), force=True)
    fits.write_text("- {id_dataset: in, ood_dataset: in-r, slope: 1, intercept: 0, "
                    "x_axis: ood-classes, source: paper}\n")
    [(_, doc)] = analyze(tmp_path, AnalysisSettings(er_fits=str(fits), mce_baseline="none"),
                         force=True)
    assert doc["effective_robustness"]["fits"]["in-r"]["source"].startswith("paper")


@pytest.mark.usefixtures("unverified_meaning")  # hand-made numbers, no outputs
def test_er_on_an_all_class_set_says_so(tmp_path: Path) -> None:
    er_suite(tmp_path, sub_list=False)
    [(_, doc)] = analyze(tmp_path, AnalysisSettings(er_reference="all", mce_baseline="none"))
    er = doc["effective_robustness"]
    assert er["fits"]["in-r"]["x_axis"] == "all-classes"
    assert er["x_axis"]["in-r"] == "in top-1 over all its classes"


# --------------------------------------------------------------------------------------------
# mCE
# --------------------------------------------------------------------------------------------


def test_shipped_alexnet_errors_cover_the_15_standard_corruptions() -> None:
    base = shipped_baseline("alexnet", "imagenet-c")
    assert base is not None and set(base.corruption_error) == set(STANDARD_CORRUPTIONS)
    assert base.corruption_error["gaussian_noise"] == 0.886428
    assert base.corruption_error["brightness"] == 0.564592
    assert "augmix" in base.source and "torchvision" in base.source
    assert shipped_baseline("alexnet", "cifar10-c") is None  # published for ImageNet-C only
    # AlexNet against itself: 100 everywhere
    errs = {c: [e] * 5 for c, e in base.corruption_error.items()}
    res = mce(errs, base.clean_error, base)
    assert res["mce"] == pytest.approx(100.0) and res["relative_mce"] == pytest.approx(100.0)


def test_mce_and_relative_mce_formulas() -> None:
    base = CorruptionBaseline("b", {"fog": 0.5, "snow": 0.8}, 0.4, "test")
    errs = {"fog": [0.2, 0.3, 0.4], "snow": [0.4, 0.4, 0.4]}
    res = mce(errs, 0.1, base)
    assert res["ce"]["fog"] == pytest.approx(100 * 0.3 / 0.5)
    assert res["ce"]["snow"] == pytest.approx(100 * 0.4 / 0.8)
    assert res["mce"] == pytest.approx((60 + 50) / 2)
    assert res["relative_ce"]["fog"] == pytest.approx(100 * (0.3 - 0.1) / (0.5 - 0.4))
    assert res["relative_mce"] == pytest.approx((200 + 100 * 0.3 / 0.4) / 2)
    with pytest.raises(RobenchError, match="no error for frost"):
        mce({"frost": [0.5]}, None, base)
    assert "relative_mce" not in mce(errs, None, base)  # no clean error: no relative mCE


# -- which -C sets AlexNet's ImageNet-C errors may normalise ------------------------------------


def released_imagenet_c(root: Path) -> Path:
    """The released ImageNet-C layout (no manifest): 15 x 5 folders, one tiny JPEG each."""
    from PIL import Image

    from robench.data.corruptions import SEVERITIES
    from robench.data.imagenet import imagenet_wnids

    wnid = imagenet_wnids()[3]
    for c in STANDARD_CORRUPTIONS:
        for s in SEVERITIES:
            (root / c / str(s) / wnid).mkdir(parents=True)
            Image.new("RGB", (8, 8), (s * 40, 90, 30)).save(root / c / str(s) / wnid / "a.JPEG")
    return root


def generated_imagenet_c(root: Path, corruptions: tuple[str, ...], **opts) -> Path:
    """A set written by robench's generator from a two-class 'imagenet' folder."""
    from PIL import Image

    from robench.data import folder
    from robench.data.corrupt_set import generate_c_folders
    from robench.data.imagenet import imagenet_wnids

    for k in (0, 1):
        (root / "src" / imagenet_wnids()[k]).mkdir(parents=True)
        Image.new("RGB", (40, 30), (200, 60 * k, 10)).save(
            root / "src" / imagenet_wnids()[k] / "x.JPEG")
    src = folder.load(root / "src", name="imagenet")
    return generate_c_folders(src, root / "c", corruptions=corruptions, workers=1,
                              progress=False, **opts)


def c_records(source, dataset: str) -> dict[tuple[str, str], dict]:
    """Two models' records on ``source`` shaped as the runner writes them (groups, summary
    groups, data.generated from source.info); per-group errors chosen, not computed."""
    out = {}
    for m, err in (("m1", 0.5), ("m2", 0.6)):
        groups = {g: {"acc1": 100 * (1 - err - 0.02 * int(g[-1]))} for g in source.groups}
        out[(m, dataset)] = {"suite": "s", "model": m, "dataset": dataset, "groups": groups,
                             "metrics": {"acc1": 50.0},
                             "protocol": {"summary_groups": source.summary_groups},
                             "data": {"generated": source.info.get("generated") or None}}
    return out


def mce_of(records: dict, baseline: str = "auto") -> tuple[dict, list[str]]:
    from robench.analysis import SuiteRecords, mce_tables

    return mce_tables(SuiteRecords("s", Path("."), records), AnalysisSettings(
        mce_baseline=baseline))


def test_alexnet_mce_on_the_released_imagenet_c_layout(tmp_path: Path) -> None:
    from robench.data import imagenet_c

    src = imagenet_c.load(released_imagenet_c(tmp_path / "inc"), name="imagenet-c")
    assert src.info["generated"] is None and len(src.summary_groups) == 75
    table, notes = mce_of(c_records(src, "imagenet-c"))
    assert notes == [] and set(table["imagenet-c"]) == {"m1", "m2"}
    base = shipped_baseline("alexnet", "imagenet-c")
    # m1's error at severity s is 0.5 + 0.02 s: mean 0.56 on every corruption
    want = np.mean([100 * 0.56 / base.corruption_error[c] for c in STANDARD_CORRUPTIONS])
    assert table["imagenet-c"]["m1"]["mce"] == pytest.approx(want)
    assert table["imagenet-c"]["m1"]["baseline"] == "alexnet"
    # the same released set under another name is not known to be ImageNet-C
    renamed = {("m1", "inc"): {**c_records(src, "inc")[("m1", "inc")], "dataset": "inc"}}
    table, notes = mce_of(renamed, "alexnet")
    assert table == {} and "not of inc" in notes[0]


def test_a_one_corruption_generated_set_named_imagenet_c_gets_no_alexnet_mce(
        tmp_path: Path) -> None:
    """The review's case: 'mCE 112.7 (AlexNet)' for one generated corruption, without a note."""
    from robench.data import imagenet_c

    out = generated_imagenet_c(tmp_path, ("gaussian_noise",))
    src = imagenet_c.load(out, name="imagenet-c")
    assert src.info["generated"]["protocol"] == "imagenet-c" and len(src.summary_groups) == 5
    for choice in ("auto", "alexnet"):
        table, [note] = mce_of(c_records(src, "imagenet-c"), choice)
        assert table == {}
        assert note.startswith("mCE on imagenet-c: not normalised by a shipped baseline")
        assert "5 groups (1 of the 15 standard corruptions)" in note
        assert "analysis.mce_baseline=<a model of the suite>" in note
    # mCE against a model of the suite still works on it
    table, notes = mce_of(c_records(src, "imagenet-c"), "m1")
    assert table["imagenet-c"]["m1"]["mce"] == pytest.approx(100.0) and notes == []
    assert table["imagenet-c"]["m2"]["mce"] > 100.0


def test_alexnet_mce_on_a_generated_set_needs_imagenet_cs_whole_protocol(tmp_path: Path) -> None:
    from robench.robustness import shipped_baseline_problem

    full = {"protocol": "imagenet-c", "resize": "256-crop-224", "base": "imagenet"}
    groups = [f"{c}/{s}" for c in STANDARD_CORRUPTIONS for s in range(1, 6)]
    assert shipped_baseline_problem("alexnet", "any-name", full, groups) is None
    assert shipped_baseline_problem("alexnet", "imagenet-c", None, groups) is None
    for change, needle in ((dict(protocol="cifar-c"), "protocol cifar-c"),
                           (dict(resize="none"), "resize none"),
                           (dict(base="imagenet-sketch"), "made from imagenet")):
        why = shipped_baseline_problem("alexnet", "g", {**full, **change}, groups)
        assert why and needle in why, change
    why = shipped_baseline_problem("alexnet", "g", full, groups[:-5])
    assert why and "70 groups (14 of the 15" in why
    assert "not of cifar10-c" in shipped_baseline_problem("alexnet", "cifar10-c", None, groups)
    # end to end: all 15 x 5, ImageNet-C's resize, from 'imagenet': normalised, with a caveat
    from robench.data import imagenet_c

    src = imagenet_c.load(generated_imagenet_c(tmp_path, STANDARD_CORRUPTIONS),
                          name="imagenet-generated-c")
    table, [note] = mce_of(c_records(src, "imagenet-generated-c"))
    assert table["imagenet-generated-c"]["m1"]["baseline"] == "alexnet"
    assert "generated set with ImageNet-C's protocol" in note


# --------------------------------------------------------------------------------------------
# The suite analysis on real records
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four quickstart models (zero-shot, temperature scaling, LP-CLIP, WiSE-FT 0.5)."""
    root = tmp_path_factory.mktemp("results")
    for m in MODELS:
        shutil.copytree(QUICKSTART / m, root / "quickstart" / m)
    return root


@pytest.fixture(scope="module")
def analysis(results: Path) -> dict:
    [(path, doc)] = analyze(results, AnalysisSettings(er_reference="all",
                                                      mce_baseline="tiny-clip-cifar10",
                                                      bootstrap=100))
    assert path == results / "quickstart" / ANALYSIS_FILE
    return doc


def test_every_method_is_compared_with_zero_shot_of_its_backbone(analysis: dict,
                                                                 results: Path) -> None:
    rows = {(c["model"], c["dataset"]): c for c in analysis["comparisons"]}
    assert set(rows) == {(m, d) for m in MODELS[1:] for d in (ID, OOD)}
    assert {c["reference"] for c in rows.values()} == {"tiny-clip-cifar10"}
    recs = {(m, d): read_record(results / "quickstart" / m / f"{d}.json")
            for m in MODELS for d in (ID, OOD)}
    for (m, d), c in rows.items():
        for k, delta in c["delta"].items():  # the point is the records' own difference
            want = recs[(m, d)]["metrics"][k] - recs[("tiny-clip-cifar10", d)]["metrics"][k]
            assert delta["value"] == pytest.approx(want, abs=1e-9), (m, d, k)
            assert delta["ci_low"] <= delta["value"] <= delta["ci_high"], (m, d, k)
    assert rows[("tiny-clip-lp-clip", ID)]["pairing"] == "sample_id"  # shipped JPEG paths
    assert rows[("tiny-clip-lp-clip", OOD)]["pairing"] == "row index"  # generated -C arrays
    assert rows[("tiny-clip-lp-clip", OOD)]["n_paired"] == 18750
    assert "ood_auroc" in rows[("tiny-clip-lp-clip", OOD)]["delta"]
    # temperature scaling never changes a prediction: no discordant pair, a zero-width interval
    ts = rows[("tiny-clip-ts", ID)]
    assert ts["test"]["n_discordant"] == 0 and ts["test"]["p_value"] == 1.0
    assert ts["delta"]["acc1"]["ci_low"] == ts["delta"]["acc1"]["ci_high"] == 0.0
    assert ts["delta"]["ece"]["value"] < 0  # ...but it calibrates


def test_effective_robustness_over_the_named_reference_set(analysis: dict) -> None:
    er = analysis["effective_robustness"]
    assert er["id_dataset"] == ID and set(er["fits"]) == {OOD}
    fit = er["fits"][OOD]
    assert fit["reference"] == sorted(MODELS) and fit["n"] == 4
    xs = [logit(er["models"][m][OOD]["id_acc"]) for m in MODELS]
    ys = [logit(er["models"][m][OOD]["ood_acc"]) for m in MODELS]
    slope, intercept = np.polyfit(xs, ys, 1)
    assert fit["slope"] == pytest.approx(slope) and fit["intercept"] == pytest.approx(intercept)
    for m in MODELS:
        v = er["models"][m][OOD]
        assert v["er"] == pytest.approx(v["ood_acc"] - 100 * sigmoid(slope * logit(v["id_acc"])
                                                                    + intercept))
    # residuals of a least-squares line in logit space sum to zero there
    assert sum(logit(er["models"][m][OOD]["ood_acc"]) - logit(er["models"][m][OOD]["predicted"])
               for m in MODELS) == pytest.approx(0.0, abs=1e-9)


def test_mce_against_a_model_of_the_suite(analysis: dict) -> None:
    table = analysis["mce"][OOD]
    assert table["tiny-clip-cifar10"]["mce"] == pytest.approx(100.0)
    assert table["tiny-clip-ts"]["mce"] == pytest.approx(100.0)  # same predictions
    assert table["tiny-clip-lp-clip"]["n_corruptions"] == 15
    assert "relative_mce" in table["tiny-clip-lp-clip"]


def test_reliability_bins_reproduce_the_records_ece(analysis: dict, results: Path) -> None:
    for m in MODELS:
        for d in (ID, OOD):
            b = analysis["reliability"][m][d]
            assert b["n_bins"] == 15 and len(b["count"]) == 15
            n = sum(b["count"])
            assert n == (2000 if d == ID else 18750)
            if d == ID:  # one pool of samples: ECE is the weighted gap of the bins
                ece = sum(c * abs(a - f) for c, a, f in zip(b["count"], b["accuracy"],
                                                            b["confidence"], strict=True)
                          if c) / n
                rec = read_record(results / "quickstart" / m / f"{d}.json")
                assert ece == pytest.approx(rec["metrics"]["ece"], abs=1e-12)


def test_analysis_is_not_a_record_and_knows_when_it_is_stale(analysis: dict,
                                                            results: Path) -> None:
    assert all(p.name != ANALYSIS_FILE for p in find_records(results))
    [suite] = suites_under(results)
    assert stale_cells(analysis, suite.records) == []
    changed = dict(suite.records)
    changed[("tiny-clip-ts", ID)] = {**changed[("tiny-clip-ts", ID)], "cell_key": "new"}
    assert stale_cells(analysis, changed) == ["tiny-clip-ts/cifar10-subset-test"]
    rescored = dict(suite.records)  # robench rescore --n-bins 20: same cell key, other metrics
    rec = rescored[("tiny-clip-ts", OOD)]
    rescored[("tiny-clip-ts", OOD)] = {**rec, "rescored": "2026-01-01T00:00:00Z",
                                       "protocol": {**rec["protocol"], "ece_bins": 20}}
    assert stale_cells(analysis, rescored) == ["tiny-clip-ts/cifar10-subset-test-c"]
    # recomputed under the same cell key (force=true, other kernels) with other outputs
    redone = dict(suite.records)
    rec = redone[("tiny-clip-cifar10", ID)]
    redone[("tiny-clip-cifar10", ID)] = {**rec, "outputs": {**rec["outputs"], "sha256": "0" * 64}}
    assert stale_cells(analysis, redone) == ["tiny-clip-cifar10/cifar10-subset-test"]
    assert read_analysis(results / "quickstart")["settings"]["er_reference"] == "all"
    # an up-to-date analysis is kept as it is (a warm run pays nothing for it)
    [(_, again)] = analyze(results)
    assert again["created"] == analysis["created"] and again == read_analysis(
        results / "quickstart")
    with pytest.raises(RobenchError, match="reserved"):
        record_path(results, "quickstart", "m", "analysis")


def test_bad_settings_are_refused(results: Path) -> None:
    with pytest.raises(RobenchError, match="not a model of suite quickstart"):
        analyze(results, AnalysisSettings(reference="nope"))
    with pytest.raises(RobenchError, match="er_reference names nope"):
        analyze(results, AnalysisSettings(er_reference=["nope"]))
    with pytest.raises(RobenchError, match="mce_baseline=nope"):
        analyze(results, AnalysisSettings(mce_baseline="nope"))


def test_after_a_subset_run_missing_names_are_notes(results: Path, tmp_path: Path) -> None:
    """A run of some of a suite's models (models=[...]) analyses what it has: the names its
    records lack are left out with a note, never an error that loses the run's analysis."""
    shutil.copytree(results / "quickstart", tmp_path / "quickstart")
    [(_, doc)] = analyze(tmp_path, AnalysisSettings(
        reference="nope", er_reference=["tiny-clip-cifar10", "tiny-clip-lp-clip",
                                        "tiny-clip-wise-ft-a0.5", "gone"],
        mce_baseline="absent"), force=True, strict=False)
    notes = " | ".join(doc["notes"])
    assert "reference=nope" in notes and "er_reference names gone" in notes
    assert "mce_baseline=absent" in notes and doc["mce"] == {}
    fit = doc["effective_robustness"]["fits"][OOD]
    assert fit["reference"] == ["tiny-clip-cifar10", "tiny-clip-lp-clip",
                                "tiny-clip-wise-ft-a0.5"]
    assert doc["comparisons"]  # the default reference (zero-shot per backbone) still applies


def test_cli_analyze_keeps_the_stored_settings_and_prints_tables(
        results: Path, analysis: dict, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "--dir", str(results), "--format", "md"]) == 0
    out = capsys.readouterr().out
    assert "paired deltas vs reference" in out and "effective robustness" in out
    assert "| tiny-clip-lp-clip" in out and "mCE" in out
    # an explicit reference replaces the default; the stored ER / mCE settings stay
    assert main(["analyze", "--dir", str(results), "--reference", "tiny-clip-ts",
                 "--bootstrap", "20"]) == 0
    capsys.readouterr()
    doc = read_analysis(results / "quickstart")
    assert {c["reference"] for c in doc["comparisons"]} == {"tiny-clip-ts"}
    assert doc["settings"]["er_reference"] == "all" and doc["effective_robustness"]
    assert main(["analyze", "--dir", str(results), "--reference", "nope"]) == 2
    assert "not a model of suite" in capsys.readouterr().err


def test_an_in_place_rescore_makes_the_analysis_stale_and_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "results"
    shutil.copytree(QUICKSTART / "tiny-clip-ts", root / "quickstart" / "tiny-clip-ts")
    analyze(root, AnalysisSettings(bootstrap=0))
    assert main(["rescore", "--dir", str(root), "--n-bins", "10", "--bootstrap", "0"]) == 0
    assert "analysis.json is now stale" in capsys.readouterr().out
    [suite] = suites_under(root)
    assert len(stale_cells(read_analysis(root / "quickstart"), suite.records)) == 2
    [(_, doc)] = analyze(root)  # recomputed with the records' new bins
    assert doc["reliability"]["tiny-clip-ts"][ID]["n_bins"] == 10
