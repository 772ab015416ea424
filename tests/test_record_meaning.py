"""Records are verified for meaning as well as bytes: a metric edited together with the record's
checksum (a plain sha256 anyone can recompute) is refused by every reader, because the per-sample
outputs beside the record give another number; ``robench rescore --verify`` recomputes the
bootstrap intervals too and writes nothing."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import scored_record

from robench.cli import main
from robench.errors import RobenchError
from robench.results import (
    disagreements,
    find_records,
    load_outputs,
    read_record,
    recompute_metrics,
    write_record_json,
)

QUICKSTART = Path(__file__).resolve().parents[1] / "results" / "quickstart"
GROUPS = ("fog/1", "fog/2", "snow/1")


def edit(path: Path, change) -> dict:
    """Edit a record as a hostile hand would: change it, then reseal its checksum."""
    rec = json.loads(path.read_text())
    change(rec)
    write_record_json(path, {k: v for k, v in rec.items() if k != "integrity"})
    return rec


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def suite(tmp_path: Path) -> Path:
    """Suite "s": a plain cell and a -C cell with three groups, both real records."""
    folder = tmp_path / "r" / "s"
    scored_record(folder, "m", "clean", seed=1)
    scored_record(folder, "m", "shift", seed=2, groups=GROUPS)
    return folder


def test_the_committed_records_recompute_bit_for_bit():
    """Every point value of the committed quickstart records (and acc1's Clopper-Pearson
    bounds) is exactly what the outputs give without the bootstrap: the verification compares
    like with like, and its tolerance is never needed on the machine that wrote them."""
    paths = find_records(QUICKSTART)
    assert len(paths) >= 30
    compared = 0
    for path in paths:
        rec = read_record(path)  # verified
        headline, groups = recompute_metrics(rec, load_outputs(path, rec))
        assert disagreements(rec, headline, groups) == []
        parts = [(rec["metrics"], headline)] + [(rec["groups"][g], groups[g])
                                                for g in (groups or {})]
        for stored, new in parts:
            for k, v in new.items():
                if v is not None:
                    assert stored[k] == v, (path, k)  # bit-identical, not merely close
                    compared += 1
    assert compared > 10_000


READERS = {
    "results": lambda d, tmp: main(["results", "--dir", str(d)]),
    "report": lambda d, tmp: main(["report", "--results", str(d), "--out", str(tmp / "site")]),
    "check": lambda d, tmp: main(["check", "--baseline", str(d), "--results", str(d)]),
    "analyze": lambda d, tmp: main(["analyze", "--dir", str(d)]),
}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_reader_refuses_a_metric_edited_with_its_checksum(suite, tmp_path, capsys, reader):
    edit(suite / "m" / "clean.json", lambda r: r["metrics"].update(acc1=99.0))
    before = hashes(suite)
    assert READERS[reader](suite, tmp_path) == 2
    err = capsys.readouterr().err
    assert "clean.json disagrees with its per-sample outputs clean.npz" in err
    assert "m x clean: acc1 stored 99.0, recomputed " in err  # the cell, metric, both values
    assert "does not hold its estimate 99.0" in err  # the interval beside it says so too
    assert "fix: the record was edited" in err and "Traceback" not in err
    assert hashes(suite) == before  # refused, not repaired


def test_the_api_and_the_loader_refuse_it_too(suite):
    import robench

    edit(suite / "m" / "clean.json", lambda r: r["metrics"].update(auroc=0.99))
    with pytest.raises(RobenchError, match=r"auroc stored 0\.99, recomputed 0\.\d+"):
        robench.load_results(suite)
    with pytest.raises(RobenchError, match="disagrees with its per-sample outputs"):
        read_record(suite / "m" / "clean.json")
    assert read_record(suite / "m" / "clean.json", verify=False)["metrics"]["auroc"] == 0.99


def test_a_group_metric_and_a_headline_interval_are_verified(suite):
    path = suite / "m" / "shift.json"
    original = json.loads(path.read_text())
    edit(path, lambda r: r["groups"]["fog/2"].update(ece=0.0))
    with pytest.raises(RobenchError, match=r"m x shift: group fog/2 ece stored 0\.0, "
                                           r"recomputed 0\.\d+"):
        read_record(path)
    # the -C headline's bootstrap interval moved off its estimate
    write_record_json(path, {k: v for k, v in original.items() if k != "integrity"})
    edit(path, lambda r: r["metrics"].update(ece_ci_high=r["metrics"]["ece"] / 2))
    with pytest.raises(RobenchError, match=r"ece: interval \[.*\] does not hold its estimate"):
        read_record(path)


@pytest.mark.parametrize("change, message", [
    (lambda r: r["metrics"].update(acc1=None), "acc1 stored None, recomputed "),
    (lambda r: r["metrics"].update(n=r["metrics"]["n"] - 1), "n stored 399, recomputed 400"),
    # a group's acc1 interval is Clopper-Pearson: recomputed exactly, not only bracketed
    (lambda r: r["groups"]["fog/1"].update(acc1_ci_low=0.0),
     "group fog/1 acc1_ci_low stored 0.0, recomputed "),
    (lambda r: r["metrics"].update(robustness=1.0), "robustness: not a metric of the outputs"),
    (lambda r: r["groups"].pop("snow/1"), "group snow/1: a group of the outputs the record "
                                          "lacks"),
    (lambda r: r["groups"].update(extra=r["groups"]["fog/1"]),
     "group extra: not a group of the outputs"),
    (lambda r: r["protocol"].update(ece_bins=10), "ece stored "),  # scored with 15 bins
])
def test_what_else_a_hostile_edit_cannot_hide(suite, change, message):
    path = suite / "m" / "shift.json"
    edit(path, change)
    with pytest.raises(RobenchError) as e:
        read_record(path)
    assert message in e.value.problem


def test_a_last_bit_difference_is_no_disagreement(suite):
    """The tolerance (1e-9 of max(1, |value|)) absorbs another CPU's last-bit exp/log
    rounding, and nothing a reader would print."""
    path = suite / "m" / "clean.json"
    nll = json.loads(path.read_text())["metrics"]["nll"]
    edit(path, lambda r: r["metrics"].update(nll=nll * (1 + 1e-14)))
    read_record(path)
    edit(path, lambda r: r["metrics"].update(nll=nll + 1e-6))
    with pytest.raises(RobenchError, match="nll stored"):
        read_record(path)


@pytest.mark.parametrize("reader", ["results", "report", "check"])
def test_a_record_without_its_outputs_is_refused_by_name(suite, tmp_path, capsys, reader):
    (suite / "m" / "shift.npz").unlink()
    assert READERS[reader](suite, tmp_path) == 2
    err = capsys.readouterr().err
    assert "shift.json (m x shift) has no per-sample outputs: shift.npz is missing" in err
    assert "restore " in err and "shift.npz (a record travels with its .npz), or re-run" in err


def test_outputs_replaced_by_another_cells_are_refused(suite):
    shutil.copyfile(suite / "m" / "clean.npz", suite / "m" / "shift.npz")
    with pytest.raises(RobenchError, match="fail the checksum"):
        read_record(suite / "m" / "shift.json")


def test_rescore_verify_recomputes_intervals_and_writes_nothing(suite, capsys):
    before = hashes(suite)
    assert main(["rescore", "--dir", str(suite), "--verify"]) == 0
    out = capsys.readouterr().out
    assert out.count(" agrees") == 2 and "0 disagree; nothing was written" in out
    assert hashes(suite) == before
    # a bootstrap interval widened around its estimate: every reader's cheap check lets it
    # through (it holds its estimate); the full recomputation does not
    path = suite / "m" / "shift.json"
    rec = edit(path, lambda r: r["metrics"].update(auroc_ci_low=r["metrics"]["auroc_ci_low"]
                                                   - 0.05))
    read_record(path)
    before = hashes(suite)
    assert main(["rescore", "--dir", str(suite), "--verify"]) == 1
    out = capsys.readouterr().out
    assert f"DISAGREES: auroc_ci_low stored {rec['metrics']['auroc_ci_low']!r}, recomputed " \
        in out
    assert "1 disagree; nothing was written" in out
    assert hashes(suite) == before  # byte-identical: --verify only reports
    # a point metric too, and a record without outputs, both reported, still nothing written
    edit(suite / "m" / "clean.json", lambda r: r["metrics"].update(acc1=99.0))
    (suite / "m" / "shift.npz").unlink()
    before = hashes(suite)
    assert main(["rescore", "--dir", str(suite), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "DISAGREES: acc1 stored 99.0, recomputed " in out
    assert "DISAGREES: its per-sample outputs shift.npz are missing" in out
    assert hashes(suite) == before


def test_rescore_verify_refuses_new_settings_and_a_copy(suite, capsys):
    before = hashes(suite)
    assert main(["rescore", "--dir", str(suite), "--verify", "--n-bins", "7", "--out",
                 str(suite.parent / "copy")]) == 2
    err = capsys.readouterr().err
    assert "--verify checks records against their own settings" in err
    assert "--n-bins, --out" in err and "Traceback" not in err
    assert hashes(suite) == before and not (suite.parent / "copy").exists()


def test_rescore_repairs_what_verification_refuses(suite, capsys):
    """The one reader that reads unverified: re-scoring rewrites the metrics from the outputs,
    after which every reader accepts the record again."""
    path = suite / "m" / "clean.json"
    edit(path, lambda r: r["metrics"].update(acc1=99.0))
    assert main(["rescore", "--dir", str(suite)]) == 0
    assert "changed: metrics/acc1" in capsys.readouterr().out
    assert read_record(path)["metrics"]["acc1"] != 99.0
