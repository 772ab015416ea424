"""Hostile names in records show as text in every table format: leaderboard.md and
``robench results --format md`` (no raw HTML, no Markdown markup, no extra table column), the
text table (no terminal escape sequence), CSV (no spreadsheet formula), LaTeX (escaped)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from test_report import make_record, metrics, write

from robench.escape import csv_cell, md_escape, text_escape
from robench.report import render_report

HOSTILE = "<img src=x onerror=alert(1)>|*x*"
FORMULA = '=HYPERLINK("http://evil","x")'
ANSI = "\x1b[2J\x1b[31mred\nfake row"


# the records here are hand-made (names under test, numbers arbitrary): their metrics are not
# recomputed from outputs, which tests/test_record_meaning.py covers
pytestmark = pytest.mark.usefixtures("unverified_meaning")


@pytest.fixture()
def hostile(tmp_path: Path) -> Path:
    root = tmp_path / "records"
    write(root, make_record("s", HOSTILE, "cifar10", metrics(80.0, 0.05, 0.8)))
    write(root, make_record("s", HOSTILE, FORMULA, metrics(70.0, 0.06, 0.7)))
    write(root, make_record("s", ANSI, "cifar10", metrics(60.0, 0.07, 0.6)))
    return root


def _unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def _table_rows_keep_their_columns(md: str) -> None:
    """Every line of each Markdown table has as many cell separators as its header."""
    lines = md.splitlines()
    tables, current = [], []
    for line in lines + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    assert tables
    for table in tables:
        assert len({_unescaped_pipes(line) for line in table}) == 1, table


def _no_markup(md: str) -> None:
    assert "<img" not in md and "<" not in md.replace("&lt;", "")
    assert "\x1b" not in md
    assert "*x*" not in md and r"\*x\*" in md  # emphasis escaped, the name shown as typed


def test_md_escape_keeps_names_literal() -> None:
    assert md_escape(HOSTILE) == r"&lt;img src=x onerror=alert(1)&gt;\|\*x\*"
    assert md_escape("gaussian_noise/1") == "gaussian_noise/1"  # intraword _ is no emphasis
    assert md_escape("_a_") == r"\_a\_" and md_escape("[a](javascript:x)") == r"\[a\](javascript:x)"
    assert md_escape("a\nb") == "a b"
    assert text_escape(ANSI) == r"\x1b[2J\x1b[31mred\nfake row"
    assert csv_cell(FORMULA) == "'" + FORMULA and csv_cell("-1+1") == "'-1+1"
    assert csv_cell("tiny-clip") == "tiny-clip" and csv_cell(0.5) == 0.5


def test_leaderboard_md_and_csv_show_hostile_names_as_text(hostile: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    render_report(hostile, out, title="<script>x</script> **t**")
    md = (out / "leaderboard.md").read_text(encoding="utf-8")
    _no_markup(md)
    _table_rows_keep_their_columns(md)
    assert md.startswith(r"# &lt;script&gt;x&lt;/script&gt; \*\*t\*\*")
    frame = pd.read_csv(out / "leaderboard.csv")
    assert set(frame.dataset) == {"cifar10", "'" + FORMULA}  # a string, not a formula
    assert HOSTILE in set(frame.model)  # CSV keeps the name itself (quoted by the writer)
    assert "<img src=x" not in (out / "index.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("fmt", ["md", "table", "latex", "csv"])
def test_results_tables_show_hostile_names_as_text(hostile: Path, fmt: str, capsys) -> None:
    from robench.cli import main

    assert main(["results", "--dir", str(hostile), "--format", fmt]) == 0
    out = capsys.readouterr().out
    if fmt != "csv":  # CSV is data: it keeps the name exactly, bar a formula's lead
        assert "\x1b" not in out  # no terminal control sequence in the tables
    if fmt == "md":
        _no_markup(out)
        _table_rows_keep_their_columns(out)
    elif fmt == "table":
        assert r"\x1b[2J\x1b[31mred\nfake row" in out and HOSTILE in out
    elif fmt == "latex":
        assert "onerror=alert(1)" in out and "x1b[2J" in out
    else:
        assert "'" + FORMULA.replace('"', '""') in out and "\n=" not in out and ",=" not in out


@pytest.mark.parametrize("fmt", ["md", "table"])
def test_check_tables_show_hostile_names_as_text(tmp_path: Path, fmt: str, capsys) -> None:
    """``robench check`` (its Markdown goes to $GITHUB_STEP_SUMMARY): a baseline cell missing
    from the fresh run is a problem row naming the model."""
    from robench.cli import main

    base, fresh = tmp_path / "base", tmp_path / "fresh"
    write(base, make_record("s", HOSTILE, "cifar10", metrics(80.0, 0.05, 0.8)))
    write(base, make_record("s", ANSI, "cifar10", metrics(80.0, 0.05, 0.8)))
    write(base, make_record("s", "plain", "cifar10", metrics(80.0, 0.05, 0.8)))
    write(fresh, make_record("s", "plain", "cifar10", metrics(80.0, 0.05, 0.8)))
    assert main(["check", "--baseline", str(base), "--results", str(fresh), "--format",
                 fmt]) == 1
    out = capsys.readouterr().out
    assert "\x1b" not in out
    if fmt == "md":
        _no_markup(out)
        _table_rows_keep_their_columns(out)
    else:
        assert HOSTILE in out and r"\x1b[2J" in out
