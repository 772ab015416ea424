"""Tables for papers: ``robench results`` with per-group rows, consistent decimals per metric,
LaTeX (escaped, numbers right-aligned) and the analysis tables (paired deltas, ER, mCE)."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from robench.analysis import AnalysisSettings, analyze
from robench.cli import main
from robench.results import decimals, fmt_value, interval_table, load_frame, render_table

QUICKSTART = Path(__file__).resolve().parents[1] / "results" / "quickstart"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("results")
    for m in ("tiny-clip-cifar10", "tiny-clip-lp-clip"):
        shutil.copytree(QUICKSTART / m, root / "quickstart" / m)
    analyze(root, AnalysisSettings(er_reference="all", mce_baseline="tiny-clip-cifar10",
                                   bootstrap=10))
    return root


def test_decimals_are_one_rule_per_metric() -> None:
    assert decimals("acc1") == decimals("acc5") == 2 and decimals("ece") == 4
    assert fmt_value("acc1", 60.6, 58.4192, 62.7496) == "60.60 [58.42, 62.75]"
    assert fmt_value("ece", 0.03, None, None) == "0.0300"
    assert fmt_value("acc1", -0.27, -0.5, 0.01, sign=True) == "-0.27 [-0.50, +0.01]"
    assert fmt_value("auroc", float("nan")) == "-"


def test_per_group_rows_on_request(results: Path) -> None:
    frame = load_frame(results, groups=True)
    c = frame[(frame.model == "tiny-clip-cifar10") & (frame.dataset == "cifar10-subset-test-c")]
    assert len(c) == 1 + 75 and c.iloc[0].group == ""  # the headline first, then its groups
    assert list(c.group[1:6]) == [f"brightness/{s}" for s in range(1, 6)]
    assert c.iloc[1].acc1_ci_low < c.iloc[1].acc1 < c.iloc[1].acc1_ci_high
    table = interval_table(frame)
    assert list(table.columns[:4]) == ["model", "dataset", "group", "n"]
    # every acc1 cell of the table has 2 decimals, every ECE cell 4, intervals alike
    for col, d in (("acc1", 2), ("ece", 4)):
        for text in table[col]:
            assert all(len(x.split(".")[1]) == d for x in re.findall(r"-?\d+\.\d+", text)), text
    assert len(load_frame(results)) == 4  # without the flag: one row per cell


def test_latex_is_escaped_and_aligned() -> None:
    frame = pd.DataFrame({"model": ["a_b & c%"], "dataset": ["x"], "n": [10],
                          "acc1": ["50.00 [40.00, 60.00]"]})
    tex = render_table(frame, "latex", caption="t")
    assert r"a\_b \& c\%" in tex and r"\begin{tabular}{llrr}" in tex
    assert r"\toprule" in tex and r"\caption{t}" in tex


def test_cli_results_latex_with_groups_and_analysis(results: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["results", "--dir", str(results), "--format", "latex", "--groups",
                 "--analysis"]) == 0
    out = capsys.readouterr().out
    assert out.count(r"\begin{tabular}") == 5  # cells, avg shift per model, deltas, ER, mCE
    assert r"gaussian\_noise/1" in out and r"tiny-clip-lp-clip" in out
    assert re.search(r"[+-]\d\.\d\d \[[+-]\d\.\d\d, [+-]\d\.\d\d\]", out)  # a signed acc1 delta
    assert main(["results", "--dir", str(results), "--format", "md", "--analysis"]) == 0
    md = capsys.readouterr().out
    assert "paired deltas vs reference" in md and "| tiny-clip-lp-clip" in md
    assert "p_acc1" in md and "effective robustness" in md


def test_report_csv_per_group_rows(results: Path, tmp_path: Path) -> None:
    assert main(["report", "--results", str(results), "--out", str(tmp_path), "--groups"]) == 0
    frame = pd.read_csv(tmp_path / "leaderboard.csv", keep_default_na=False)
    assert list(frame.columns[:6]) == ["suite", "model", "dataset", "group", "method", "n"]
    assert len(frame) == 2 * (1 + 1 + 75)


def _write_flip(root: Path, id_dataset: str | None) -> Path:
    """The records of tests/test_results.py's flip() (suite "s"): "narrow" 95 ID, 40 / 44
    shifted; "robust" 60 ID, 50 / 52 shifted."""
    from test_results import flip

    from robench.results import write_record_json

    for r in flip(id_dataset):
        write_record_json(root / r["suite"] / r["model"] / f"{r['dataset']}.json", r)
    return root


@pytest.mark.usefixtures("unverified_meaning")  # hand-made numbers, no outputs
@pytest.mark.parametrize("fmt", ["table", "md", "latex"])
def test_cli_results_shows_avg_shift_per_model_apart_from_the_id_set(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    root = _write_flip(tmp_path, "clean")
    assert main(["results", "--dir", str(root), "--format", fmt]) == 0
    out = capsys.readouterr().out
    # one row per model after the cells: its ID acc1 and the mean over the two shifts only
    cells = {"table": r"\s+", "md": r"\s*\|\s*", "latex": r"\s*&\s*"}[fmt]
    assert re.search(rf"robust{cells}zeroshot{cells}60\.00{cells}51\.00", out), out
    assert re.search(rf"narrow{cells}zeroshot{cells}95\.00{cells}42\.00", out), out
    assert "59.67" not in out  # (95 + 40 + 44) / 3: the ID set is not averaged in
    assert out.index("robust", out.index("avg shift acc1")) < \
        out.index("narrow", out.index("avg shift acc1"))  # best average first
    if fmt == "latex":
        assert out.count(r"\begin{tabular}") == 2
        assert r"clean acc1 (ID) & avg shift acc1" in out
        assert r"\caption{suite s: avg shift acc1 = unweighted mean" in out
    else:
        assert "the ID set clean is left out of it" in out


@pytest.mark.usefixtures("unverified_meaning")  # hand-made numbers, no outputs
@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_cli_results_csv_and_json_carry_an_avg_shift_row_per_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    root = _write_flip(tmp_path, "clean")
    assert main(["results", "--dir", str(root), "--format", fmt]) == 0
    text = capsys.readouterr().out
    frame = pd.read_csv(io.StringIO(text)) if fmt == "csv" else pd.DataFrame(json.loads(text))
    assert len(frame) == 6 + 2  # the cells, then one row per model
    avg = frame[frame["dataset"] == "avg shift"].set_index("model")
    assert avg.loc["narrow", "acc1"] == pytest.approx(42.0)
    assert avg.loc["robust", "acc1"] == pytest.approx(51.0)
    assert set(avg["averaged"]) == {"shift-a;shift-b"}  # which sets, the ID set not among them
    assert frame[frame["dataset"] != "avg shift"]["averaged"].isna().all()


@pytest.mark.usefixtures("unverified_meaning")  # hand-made numbers, no outputs
def test_cli_results_without_an_id_set_labels_the_mean_over_all_datasets(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _write_flip(tmp_path, None)
    assert main(["results", "--dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "no ID set is paired" in out and "mean acc1 over all datasets" in out
    assert "avg shift" not in out
    assert re.search(r"narrow\s+zeroshot\s+59\.67", out)  # (95 + 40 + 44) / 3, first
    assert re.search(r"robust\s+zeroshot\s+54\.00", out)
    assert main(["results", "--dir", str(root), "--format", "csv"]) == 0
    frame = pd.read_csv(io.StringIO(capsys.readouterr().out))
    mean = frame[frame["dataset"] == "mean over all datasets"].set_index("model")
    assert mean.loc["narrow", "acc1"] == pytest.approx((95 + 40 + 44) / 3)
    assert set(mean["averaged"]) == {"clean;shift-a;shift-b"}


def test_latex_captions_are_escaped() -> None:
    frame = pd.DataFrame({"model": ["m"], "acc1": ["1.00"]})
    tex = render_table(frame, "latex", caption="mCE (%; A & B) of id_dataset")
    assert r"\caption{mCE (\%; A \& B) of id\_dataset}" in tex
