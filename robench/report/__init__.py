"""``robench report``: an HTML leaderboard (plus CSV and Markdown) rendered from result records.

    robench report [--results runs] [--out report] [--title TEXT]

The rendering lives in :mod:`robench.report.render` (pandas, matplotlib, Jinja2); it is imported
only when a report is rendered, so registering the sub-command keeps ``robench --help`` and every
other command as fast as before.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from robench.report.render import render_report

__all__ = ["add_report_command", "cmd_report", "render_report"]

DEFAULT_RESULTS = "runs"  # where `robench run` writes records by default (config results_dir)
DEFAULT_OUT = "report"
OUT_FIX = "give --out a folder that can be written (created if missing), e.g. --out report"


def cmd_report(args: argparse.Namespace) -> int:
    """Render the report for ``args.results`` into ``args.out``; print what was written."""
    from robench.outpaths import output_folder
    from robench.report.render import render_report

    output_folder(args.out, "--out", OUT_FIX)  # before any record is read
    index = render_report(args.results, args.out, title=args.title, groups=args.groups)
    folder = index.parent
    print(f"wrote {index} (+ {folder / 'leaderboard.csv'}, {folder / 'leaderboard.md'}) "
          f"from the records in {args.results}")
    return 0


def add_report_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``report`` to the ``robench`` sub-commands (``subparsers`` from add_subparsers)."""
    p = subparsers.add_parser(
        "report", help="render the HTML leaderboard (+ CSV, Markdown) from result records",
        description="Render a self-contained HTML leaderboard (index.html), leaderboard.csv and "
                    "leaderboard.md from the result records under --results.")
    from robench.argtypes import nonempty

    p.add_argument("--results", default=DEFAULT_RESULTS, type=nonempty,
                   help=f"folder of result records (default: {DEFAULT_RESULTS}; the committed "
                        "reference records are in results)")
    p.add_argument("--out", default=DEFAULT_OUT, type=nonempty,
                   help=f"output folder for index.html and the tables (default: {DEFAULT_OUT})")
    p.add_argument("--title", default=None, help="page title (default: robench leaderboard)")
    p.add_argument("--groups", action="store_true",
                   help="leaderboard.csv: also one row per group of a -C record")
    p.set_defaults(func=cmd_report)
    return p


def __getattr__(name: str) -> Any:
    # `from robench.report import render_report` works without importing matplotlib and pandas
    # at `import robench.report` time (the CLI imports this package on every invocation).
    if name == "render_report":
        from robench.report.render import render_report

        return render_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
