"""Escaping of user-controlled text (model, dataset, suite, method and group names read from
records) for each table format robench writes, so that a name shows as itself and never
becomes markup, a terminal control sequence or a spreadsheet formula.

- Markdown (``leaderboard.md``, ``robench results --format md``): HTML's ``& < >`` become
  entities (a name is never raw HTML, which Markdown passes through); Markdown's inline
  punctuation is backslash-escaped (CommonMark: any ASCII punctuation may be); line breaks
  become spaces (a table row is one line).
- Text tables (``robench results``): characters that are not printable (ANSI escape sequences,
  carriage returns, newlines) are shown as Python escapes (``\\x1b``), so a name cannot redraw
  the terminal or fake a row.
- CSV: a text cell that a spreadsheet would run as a formula (starting with ``= + - @``, a tab
  or a carriage return) gets a leading ``'`` (OWASP's advice on CSV injection).
- LaTeX: :func:`robench.results.latex_escape` (pandas escapes the cells).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

# what opens an inline construct of CommonMark / GitHub Markdown: emphasis, code spans, links
# and images ("(" only counts after "]"), strikethrough, math, table pipes, a heading's closing
# "#"s, backslash escapes themselves
_MD_PUNCT = frozenset("\\`*_[]#!|~$")
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def md_escape(text: Any) -> str:
    """``text`` as literal Markdown (inline, e.g. a table cell or a heading)."""
    text = str(text)
    out = []
    for i, ch in enumerate(text):
        if ch in _HTML:
            out.append(_HTML[ch])
        elif ch == "_" and 0 < i < len(text) - 1 and text[i - 1].isalnum() \
                and text[i + 1].isalnum():
            out.append(ch)  # intraword: never emphasis in CommonMark (p_acc1 stays readable)
        elif ch in _MD_PUNCT:
            out.append("\\" + ch)
        elif ch in "\r\n" or not ch.isprintable():
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


def text_escape(text: Any) -> str:
    """``text`` with every unprintable character (escape sequences, line breaks) spelled out."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                   for ch in str(text))


def csv_cell(value: Any) -> Any:
    """A text cell that cannot start a spreadsheet formula; other values as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def escape_frame(frame: pd.DataFrame, escape: Callable[[Any], Any],
                 columns: set[str] | None = None) -> pd.DataFrame:
    """A copy of ``frame`` with ``escape`` applied to its text cells (of ``columns`` only, when
    given) and to every column label (each level of a MultiIndex)."""
    out = frame.copy()
    for col in out.columns:
        name = col[0] if isinstance(col, tuple) else col
        if columns is None or name in columns:  # object or string dtype alike
            out[col] = out[col].map(lambda v: escape(v) if isinstance(v, str) else v)
    if isinstance(out.columns, pd.MultiIndex):
        out.columns = pd.MultiIndex.from_tuples(
            [tuple(escape(str(x)) for x in col) for col in out.columns], names=out.columns.names)
    else:
        out.columns = [escape(str(c)) for c in out.columns]
    out.index = out.index.map(lambda v: escape(v) if isinstance(v, str) else v)
    return out


def csv_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` ready for a CSV a spreadsheet may open (see :func:`csv_cell`)."""
    return escape_frame(frame, csv_cell)
