"""The printed leaderboard and the per-cell table built from records."""

from __future__ import annotations

import math

from robench.results import leaderboard_table, summary_table, to_frame


def rec(model: str, dataset: str, acc1: float, ood: float | None) -> dict:
    return {"suite": "s", "model": model, "dataset": dataset, "protocol": {"method": "zeroshot"},
            "metrics": {"n": 10, "acc1": acc1, "acc5": min(100.0, acc1 + 25.5), "ece": 0.1,
                        "auroc": 0.7, "ood_auroc": ood}}


def test_leaderboard_keeps_suite_order_and_drops_empty_columns() -> None:
    records = [rec("zs", "clean", 60.0, None), rec("ft", "clean", 58.0, None),
               rec("zs", "shift", 30.0, 0.61), rec("ft", "shift", 33.25, math.nan)]
    table = leaderboard_table(to_frame(records), ["zs", "ft"], ["clean", "shift"])
    assert list(table.index) == ["zs", "ft"]  # the suite's order, not alphabetical
    assert list(table.columns) == [("clean", "acc1"), ("clean", "acc5"), ("clean", "ece"),
                                   ("clean", "auroc"), ("shift", "acc1"), ("shift", "acc5"),
                                   ("shift", "ece"), ("shift", "auroc"), ("shift", "ood_auroc")]
    assert table.loc["ft", ("shift", "acc1")] == "33.25"
    assert table.loc["ft", ("shift", "acc5")] == "58.75"
    assert table.loc["ft", ("shift", "ood_auroc")] == "-"  # degenerate cell, not a number
    assert table.loc["zs", ("shift", "ood_auroc")] == "0.6100"


def test_missing_cell_shows_as_dash() -> None:
    records = [rec("zs", "clean", 60.0, None), rec("zs", "shift", 30.0, 0.6),
               rec("ft", "clean", 58.0, None)]
    table = leaderboard_table(to_frame(records))
    assert table.loc["ft", ("shift", "acc1")] == "-"
    summary = summary_table(to_frame(records))
    assert list(summary["acc1"]) == ["58.00", "60.00", "30.00"]


def test_summary_table_columns_in_order_with_acc5() -> None:
    records = [rec("zs", "clean", 60.0, None), rec("zs", "shift", 30.0, 0.61)]
    summary = summary_table(to_frame(records))
    assert list(summary.columns) == ["model", "dataset", "n", "acc1", "acc5", "ece", "auroc",
                                     "ood_auroc"]
    assert list(summary["acc5"]) == ["85.50", "55.50"]
    assert list(summary["ood_auroc"]) == ["-", "0.6100"]


def test_summary_table_of_a_record_without_acc5_shows_a_dash() -> None:
    old = rec("zs", "clean", 60.0, None)
    del old["metrics"]["acc5"]
    summary = summary_table(to_frame([old]))
    assert list(summary["acc5"]) == ["-"]
    assert "ood_auroc" not in summary  # no cell has it
