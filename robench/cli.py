"""The ``robench`` command line.

    robench run [suite=NAME] [key=value ...]     models x datasets -> result records
    robench results [--dir results/SUITE]          aggregated table (pandas)
    robench check --baseline results/quickstart    regression check against committed records
    robench rescore --dir runs/quickstart [--n-bins 20]  metrics again, from per-sample outputs
    robench list models|datasets|suites
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from robench.data.commands import add_data_commands
from robench.errors import RobenchError
from robench.report import add_report_command

DEFAULT_SUITE = "quickstart"


def cmd_run(args: argparse.Namespace) -> int:
    from robench.config import load_suite
    from robench.results import leaderboard_table, read_record, to_frame
    from robench.runner import Runner

    suite = DEFAULT_SUITE
    overrides = []
    for ov in args.overrides:
        if ov.startswith("suite="):
            suite = ov.split("=", 1)[1]
        else:
            overrides.append(ov)
    cfg = load_suite(suite, overrides)
    paths = Runner(cfg).run()
    records = [read_record(p) for p in paths]
    frame = to_frame(records)
    print(f"\nsuite {cfg.name}: {len(paths)} cell(s) in {cfg.results_dir}/{cfg.name} "
          f"(per cell: robench results --dir {cfg.results_dir}/{cfg.name})")
    print(leaderboard_table(frame, list(dict.fromkeys(r["model"] for r in records)),
                            list(dict.fromkeys(r["dataset"] for r in records))).to_string())
    if cfg.check:
        from robench.check import render, run_check

        result = run_check(cfg.check, f"{cfg.results_dir}/{cfg.name}")
        print(f"\ncheck against {cfg.check}:")
        print(render(result))
        return 1 if result.failed else 0
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from robench.check import render, run_check

    fresh = args.results or str(Path("runs") / Path(args.baseline).name)
    result = run_check(args.baseline, fresh, mode=args.mode, band=args.band,
                       rel_tol=args.rel_tol, allow_improvement=args.allow_improvement)
    text = render(result, args.format)
    print(text, end="")
    if args.summary:
        with open(args.summary, "a") as f:
            f.write(render(result, "md"))
    return 1 if result.failed else 0


def cmd_results(args: argparse.Namespace) -> int:
    from robench.results import load_frame, summary_table

    frame = load_frame(args.dir)
    if args.format == "csv":
        print(frame.to_csv(index=False), end="")
    elif args.format == "md":
        print(summary_table(frame).to_markdown(index=False))
    else:
        print(summary_table(frame).to_string(index=False))
    return 0


def cmd_rescore(args: argparse.Namespace) -> int:
    from robench.rescore import rescore

    rows = rescore(args.dir, n_bins=args.n_bins, bootstrap=args.bootstrap, alpha=args.alpha,
                   out_dir=args.out)
    moved = [r for r in rows if r.changed]
    for r in rows:
        what = ", ".join(r.changed[:6]) + (" ..." if len(r.changed) > 6 else "")
        print(f"{r.model:28s} {r.dataset:28s} max |delta| {r.max_delta:.3g}"
              + (f"  changed: {what}" if r.changed else "  unchanged"))
    print(f"{len(rows)} record(s) re-scored from their per-sample outputs, {len(moved)} changed"
          + (f", written to {args.out}" if args.out else ""))
    if args.verify and moved:
        print("robench: error: re-scoring with the records' own settings changed them",
              file=sys.stderr)
        return 1
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from robench import registry
    from robench.config import available_suites

    if args.what == "suites":
        for name, path in available_suites().items():
            print(f"{name:28s} {path}")
    elif args.what == "datasets":
        width = max(len(s.family) for s in registry.DATASETS.values())
        for name, spec in registry.DATASETS.items():
            print(f"{name:30s} {spec.family:{width}s} {spec.description}")
    else:
        for name, spec in registry.MODELS.items():
            print(f"{name:28s} {spec.method:12s} {spec.arch}/{spec.pretrained}  {spec.description}")
        for name, (spec, suite) in _suite_models().items():
            print(f"{name:28s} {spec.method:12s} {spec.arch}/{spec.pretrained}  (suite {suite})")
    return 0


def _suite_models() -> dict:
    """Models declared inline in suite files, so `list models` shows them too."""
    from omegaconf import OmegaConf

    from robench.config import available_suites
    from robench.registry import MODELS, resolve_model

    found = {}
    for suite, path in available_suites().items():
        for item in OmegaConf.to_container(OmegaConf.load(path)).get("models", []):
            if isinstance(item, dict):
                name, spec = resolve_model(item)
                if name not in MODELS:
                    found.setdefault(name, (spec, suite))
    return found


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a suite: suite=NAME key=value ...")
    r.add_argument("overrides", nargs="*", help="suite=NAME and key=value overrides")
    r.set_defaults(func=cmd_run)
    chk = sub.add_parser("check", help="compare fresh records with a committed baseline")
    chk.add_argument("--baseline", required=True, help="baseline folder, e.g. results/quickstart")
    chk.add_argument("--results", help="fresh records (default: runs/<baseline folder name>)")
    chk.add_argument("--format", choices=["table", "md"], default="table")
    chk.add_argument("--mode", choices=["auto", "exact", "band"], default="auto",
                     help="auto: exact when versions/device/dtype match, else interval band")
    chk.add_argument("--band", type=float, default=1.0, help="band mode: x CI half-width")
    chk.add_argument("--rel-tol", type=float, default=0.02, help="band mode, metrics without CI")
    chk.add_argument("--allow-improvement", action="store_true")
    chk.add_argument("--summary", help="also append the Markdown diff to this file "
                     "(e.g. $GITHUB_STEP_SUMMARY)")
    chk.set_defaults(func=cmd_check)
    res = sub.add_parser("results", help="print aggregated results")
    res.add_argument("--dir", default="runs", help="results folder (default: runs)")
    res.add_argument("--format", choices=["table", "csv", "md"], default="table")
    res.set_defaults(func=cmd_results)
    rs = sub.add_parser("rescore", help="recompute metrics from stored per-sample outputs")
    rs.add_argument("--dir", required=True, help="results folder, e.g. runs/quickstart")
    rs.add_argument("--n-bins", type=int, help="ECE bins (default: the record's)")
    rs.add_argument("--bootstrap", type=int, help="bootstrap resamples (default: the record's)")
    rs.add_argument("--alpha", type=float, help="1 - interval level (default: the record's)")
    rs.add_argument("--out", help="write re-scored records here instead of in place")
    rs.add_argument("--verify", action="store_true",
                    help="exit 1 if a record changes (use without new settings)")
    rs.set_defaults(func=cmd_rescore)
    ls = sub.add_parser("list", help="list models, datasets or suites")
    ls.add_argument("what", choices=["models", "datasets", "suites"])
    ls.set_defaults(func=cmd_list)
    add_data_commands(sub)
    add_report_command(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="robench: %(levelname)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except RobenchError as e:
        print(f"robench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robench: interrupted; finished cells are saved, re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
