"""The printed leaderboard and the per-cell table built from records."""

from __future__ import annotations

import math

from robench.results import (
    average_frame,
    leaderboard_table,
    shift_average,
    summary_table,
    to_frame,
)


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


# -- the headline average: over the shifted sets, the ID set apart -----------------------------

def paired(model: str, dataset: str, acc1: float, id_dataset: str | None = "clean") -> dict:
    r = rec(model, dataset, acc1, None)
    r["protocol"]["id_dataset"] = id_dataset
    return r


def flip(id_dataset: str | None = "clean") -> list[dict]:
    """"narrow" leads in distribution (95 vs 60) and trails under shift (40, 44 vs 50, 52)."""
    return [paired(m, d, a, id_dataset)
            for m, accs in (("narrow", (95.0, 40.0, 44.0)), ("robust", (60.0, 50.0, 52.0)))
            for d, a in zip(("clean", "shift-a", "shift-b"), accs, strict=True)]


def test_avg_shift_is_the_mean_over_the_shifted_sets_only() -> None:
    avg = shift_average(flip())
    assert avg.paired and avg.id_datasets == ("clean",) and avg.datasets == ("shift-a", "shift-b")
    assert (avg.name, avg.label) == ("avg shift", "avg shift acc1")
    frame = average_frame(flip())
    assert list(frame["model"]) == ["robust", "narrow"]  # best average first
    row = frame.set_index("model").loc["narrow"]
    assert row["acc1"] == (40.0 + 44.0) / 2  # 59.67 with the ID set averaged in
    assert row["id_dataset"] == "clean" and row["id_acc1"] == 95.0
    assert (row["average"], row["averaged"]) == ("avg shift", "shift-a;shift-b")
    # a model without every shifted set gets no average (fewer sets would not compare)
    partial = [r for r in flip() if (r["model"], r["dataset"]) != ("robust", "shift-b")]
    frame = average_frame(partial).set_index("model")
    assert math.isnan(frame.loc["robust", "acc1"]) and frame.loc["narrow", "acc1"] == 42.0
    # the run's printed leaderboard leads with the same column
    table = leaderboard_table(to_frame(flip()), ["narrow", "robust"],
                              ["clean", "shift-a", "shift-b"], average=avg)
    assert table.columns[0] == ("avg shift", "acc1")
    assert list(table[("avg shift", "acc1")]) == ["42.00", "51.00"]
    one = [r for r in flip() if r["dataset"] != "shift-b"]  # one shift: its column says it all
    table = leaderboard_table(to_frame(one), average=shift_average(one))
    assert "avg shift" not in table.columns.get_level_values(0)


def test_without_an_id_set_the_average_runs_over_all_datasets_and_says_so() -> None:
    avg = shift_average(flip(id_dataset=None))
    assert not avg.paired and avg.datasets == ("clean", "shift-a", "shift-b")
    assert (avg.name, avg.label) == ("mean over all datasets", "mean acc1 over all datasets")
    assert "no ID set is paired" in avg.describe()
    frame = average_frame(flip(id_dataset=None)).set_index("model")
    assert frame.loc["narrow", "acc1"] == (95.0 + 40.0 + 44.0) / 3
    assert frame.loc["narrow", "average"] == "mean over all datasets"
    assert frame["id_dataset"].isna().all()
    table = leaderboard_table(to_frame(flip(None)), average=avg)
    assert table.columns[0] == ("mean over all datasets", "acc1")
