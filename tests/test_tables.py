"""Tables for papers: ``robench results`` with per-group rows, consistent decimals per metric,
LaTeX (escaped, numbers right-aligned) and the analysis tables (paired deltas, ER, mCE)."""

from __future__ import annotations

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
    assert out.count(r"\begin{tabular}") == 4  # cells, deltas, ER, mCE
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
