"""The robench command line:

    robench run [suite=NAME] [key=value ...]     models x datasets -> result records
    robench results [--dir runs/SUITE]             per-cell table with intervals
    robench submit suite=NAME slurm.partition=P    the suite as SLURM jobs (submitit)
    robench check --baseline results/quickstart    regression check against committed records
    robench rescore --dir runs/quickstart [--n-bins 20]  metrics again, from per-sample outputs
    robench report                                 HTML leaderboard from records
    robench list models                            (or datasets, suites; --format json)
    robench data verify NAME                       explicit data management (also: data
                                                   download NAME, data corrupt --from NAME)
    robench env                                    versions, device, cache, what is present
    robench completion bash                        shell completion script (or zsh, fish)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, NoReturn

import robench
from robench.argtypes import count, nonempty, number
from robench.data.commands import add_data_commands
from robench.errors import RobenchError
from robench.report import add_report_command

DEFAULT_SUITE = "quickstart"
SHELLS = ("bash", "zsh", "fish", "tcsh", "powershell")


def cmd_run(args: argparse.Namespace) -> int:
    from robench.config import load_suite, preflight
    from robench.progress import set_verbosity

    suite, overrides = split_suite(args.overrides)
    if args.quiet or args.verbose:  # robench -q / -v, unless verbosity= is given too
        level = "quiet" if args.quiet else "verbose"
        if not any(o.startswith("verbosity=") for o in overrides):
            overrides.append(f"verbosity={level}")
    cfg = load_suite(suite, overrides)  # config errors come before torch is even imported
    preflight(cfg)
    set_verbosity(cfg.verbosity)
    from robench import distributed
    from robench.results import leaderboard_table, read_record, shift_average, to_frame
    from robench.runner import Runner

    try:
        paths = Runner(cfg).run()  # under torchrun: every rank, all records written on return
        lead = distributed.current().is_lead
    finally:
        distributed.shutdown()
    if not lead:  # the table and the check are the lead rank's (rank 0)
        return 0
    records = [read_record(p) for p in paths]
    frame = to_frame(records)
    print(f"\nsuite {cfg.name}: {len(paths)} cell(s) in {cfg.results_dir}/{cfg.name} "
          f"(per cell: robench results --dir {cfg.results_dir}/{cfg.name})")
    print(leaderboard_table(frame, list(dict.fromkeys(r["model"] for r in records)),
                            list(dict.fromkeys(r["dataset"] for r in records)),
                            average=shift_average(records)).to_string())
    if cfg.check:
        from robench.check import render, run_check

        result = run_check(cfg.check, f"{cfg.results_dir}/{cfg.name}")
        print(f"\ncheck against {cfg.check}:")
        print(render(result))
        return 1 if result.failed else 0
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from robench.submit import describe, submit, wait_for

    suite, overrides = split_suite(args.overrides)
    jobs, slurm, cfg = submit(suite, overrides)
    print(describe(jobs, slurm, cfg))
    if not slurm.wait:
        return 0
    from robench.results import leaderboard_table, read_record, shift_average, to_frame

    paths = list(dict.fromkeys(p for ps in wait_for(jobs) for p in ps))
    records = [read_record(p) for p in paths]
    frame = to_frame(records)
    print(f"\nsuite {cfg.name}: {len(paths)} cell(s) in {cfg.results_dir}/{cfg.name}")
    print(leaderboard_table(frame, list(dict.fromkeys(r["model"] for r in records)),
                            list(dict.fromkeys(r["dataset"] for r in records)),
                            average=shift_average(records)).to_string())
    return 0


def split_suite(items: Sequence[str]) -> tuple[str, list[str]]:
    """``suite=NAME`` (default: quickstart) and the remaining ``key=value`` overrides."""
    suite, overrides = DEFAULT_SUITE, []
    for ov in items:
        if ov.startswith("suite="):
            suite = ov.split("=", 1)[1]
        else:
            overrides.append(ov)
    return suite, overrides


def cmd_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from robench.check import render, run_check
    from robench.outpaths import output_file, writing

    summary_fix = ("give --summary a file that can be written or appended to, e.g. --summary "
                   "$GITHUB_STEP_SUMMARY")
    if args.summary is not None:  # before the comparison, not after it
        output_file(args.summary, "--summary", summary_fix)
    baseline = Path(args.baseline)
    if not baseline.is_dir():
        raise RobenchError(f"baseline folder {baseline} does not exist",
                           "give --baseline the folder of committed records, e.g. "
                           "--baseline results/quickstart")
    fresh = Path(args.results) if args.results else Path("runs") / baseline.name
    if not fresh.is_dir():
        how = "" if args.results else " (the default: runs/<baseline folder name>)"
        raise RobenchError(f"fresh results folder {fresh}{how} does not exist",
                           f"run the suite first (robench run suite={baseline.name}), or "
                           "point --results at the folder of fresh records")
    result = run_check(baseline, fresh, mode=args.mode, band=args.band,
                       rel_tol=args.rel_tol, allow_improvement=args.allow_improvement)
    text = render(result, args.format)
    print(text, end="")
    if args.summary is not None:
        with writing(args.summary, "--summary", summary_fix):
            Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
            with open(args.summary, "a", encoding="utf-8") as f:
                f.write(render(result, "md"))
    return 1 if result.failed else 0


def cmd_results(args: argparse.Namespace) -> int:
    import pandas as pd

    from robench.results import (
        average_rows,
        average_tables,
        interval_table,
        load_located,
        render_table,
        suite_folder,
        to_frame,
    )

    located = load_located(args.dir, fix="run a suite first (robench run suite=...) or pass "
                           "--dir FOLDER (e.g. --dir results/quickstart for the committed "
                           "records)")
    records = [r for _, r in located]
    folders = [suite_folder(p, args.dir) for p, _ in located]
    # the same suite read from two folders: a folder column, and averages per folder
    by_folder: dict[str, list[dict]] = {}
    for folder, record in zip(folders, records, strict=True):
        by_folder.setdefault(folder, []).append(record)
    several = len(by_folder) > 1
    frame = to_frame(records, groups=args.groups, folders=folders)
    if args.format in ("csv", "json"):  # every metric and interval bound, one column each,
        # then one row per model with its avg shift acc1 (dataset "avg shift")
        averages = []
        for folder, recs in by_folder.items():
            rows = average_rows(recs, groups=args.groups)
            if several and len(rows):
                rows.insert(3, "folder", folder)
            averages.append(rows)
        frame = pd.concat([frame, *averages], ignore_index=True)
        if args.format == "csv":
            from robench.escape import csv_safe

            csv_safe(frame).to_csv(sys.stdout, index=False)  # a name is never a formula
        else:
            print(frame.to_json(orient="records", indent=1))
    else:
        fmt = {"md": "md", "latex": "latex"}.get(args.format, "table")
        print(render_table(interval_table(frame), fmt, caption="robench results: value [95% "
                           "interval]" if fmt == "latex" else None))
        for folder, recs in by_folder.items():
            for title, table in average_tables(recs, fmt):
                title = f"folder {folder}: {title}" if several else title
                print(f"\n{title}\n{table}" if fmt != "latex" else f"\n{table}")
        if args.analysis:
            from robench.analysis import read_analysis, suites_under
            from robench.results import analysis_tables

            for suite in suites_under(args.dir):
                doc = read_analysis(suite.folder)
                if doc is None:
                    print(f"\n(suite {suite.name}: no analysis.json; robench analyze --dir "
                          f"{suite.folder} writes it)")
                    continue
                for title, table in analysis_tables(doc, fmt):
                    print(f"\n{title}\n{table}" if fmt != "latex" else f"\n{table}")
    return 0


def cmd_rescore(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from robench.outpaths import output_folder, writing
    from robench.rescore import render_verification, rescore

    out_fix = ("give --out a folder that can be written (created if missing), or leave --out "
               "out to re-score in place")
    if args.out is not None:
        output_folder(args.out, "--out", out_fix)
    with writing(args.out, "--out", out_fix) if args.out is not None else nullcontext():
        rows = rescore(args.dir, n_bins=args.n_bins, bootstrap=args.bootstrap, alpha=args.alpha,
                       adaptive_bins=args.adaptive_bins, out_dir=args.out, verify=args.verify)
    if args.verify:  # a check: it reports, it writes nothing
        print(render_verification(rows), end="")
        return 1 if any(r.problems for r in rows) else 0
    moved = [r for r in rows if r.changed]
    for r in rows:
        what = ", ".join(r.changed[:6]) + (" ..." if len(r.changed) > 6 else "")
        print(f"{r.model:28s} {r.dataset:28s} max |delta| {r.max_delta:.3g}"
              + (f"  changed: {what}" if r.changed else "  unchanged"))
    print(f"{len(rows)} record(s) re-scored from their per-sample outputs, {len(moved)} changed"
          + (f", written to {args.out}" if args.out else ""))
    if moved and not args.out:
        from pathlib import Path

        from robench.results import ANALYSIS_FILE

        for folder in sorted({Path(r.path).parent.parent for r in moved}):
            if (folder / ANALYSIS_FILE).is_file():
                print(f"note: {folder / ANALYSIS_FILE} is now stale (it was computed from the "
                      f"old metrics): robench analyze --dir {folder}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from robench.analysis import analyze, summary_line
    from robench.results import analysis_tables

    er_ref = args.er_reference
    if er_ref is not None and er_ref != "all":
        er_ref = [m.strip() for m in er_ref.split(",") if m.strip()]
        if not er_ref:
            raise RobenchError(f"--er-reference {args.er_reference!r} names no model",
                               "give comma-separated model names of the suite, or all")
    over = {"reference": args.reference, "er_reference": er_ref, "er_fits": args.er_fits,
            "mce_baseline": args.mce_baseline, "bootstrap": args.bootstrap}
    for path, doc in analyze(args.dir, overrides=over, force=args.force):
        print(summary_line(path, doc))
        for title, table in analysis_tables(doc, fmt=args.format):
            print(f"\n{title}\n{table}")
    return 0


def list_entries(what: str) -> list[dict[str, Any]]:
    """The rows of ``robench list WHAT`` as plain data (also ``--format json``)."""
    from omegaconf import OmegaConf

    from robench import registry
    from robench.config import available_suites

    if what == "suites":
        rows = []
        for name, path in available_suites().items():
            try:
                raw = OmegaConf.to_container(OmegaConf.load(path))
            except Exception:  # an unparsable user file is listed, `run` explains the error
                raw = {}
            raw = raw if isinstance(raw, dict) else {}
            rows.append({"name": name, "path": str(path),
                         "description": raw.get("description", ""),
                         "models": [m if isinstance(m, str) else m.get("name")
                                    for m in raw.get("models", [])],
                         "datasets": [d if isinstance(d, str) else d.get("name")
                                      for d in raw.get("datasets", [])]})
        return rows
    if what == "methods":
        from robench.methods import METHODS, method_class

        rows = []
        for name in METHODS:
            cls = method_class(name)
            rows.append({"name": name, "summary": cls.summary, "source": cls.source,
                         "options": [asdict(o) for o in cls.Options.describe()]})
        return rows
    if what == "datasets":
        from robench.data import family

        return [{"name": name, "family": s.family, "root": s.root, "templates": s.templates,
                 "n_expected": s.n_expected, "description": s.description,
                 "options": dict(s.options), "family_options":
                 [asdict(o) for o in family(s.family).options_class().describe()]}
                for name, s in registry.DATASETS.items()]
    rows = [{"name": name, "method": s.method, "arch": s.arch, "pretrained": s.pretrained,
             "description": s.description, "declared_in": "registry"}
            for name, s in registry.MODELS.items()]
    rows += [{"name": name, "method": s.method, "arch": s.arch, "pretrained": s.pretrained,
              "description": "", "declared_in": f"suite {suite}"}
             for name, (s, suite) in _suite_models().items()]
    return rows


def cmd_list(args: argparse.Namespace) -> int:
    rows = list_entries(args.what)
    if args.what == "suites" and not rows:
        from robench.config import suite_dirs

        raise RobenchError("no suite found", "the suites ship inside the package "
                           f"(searched: {', '.join(map(str, suite_dirs())) or 'nothing'}); "
                           "reinstall robench, or set $ROBENCH_SUITES to a folder of suites")
    if args.format == "json":
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        if args.what == "suites":
            print(f"{r['name']:16s} {r['description']}  ({r['path']})")
        elif args.what == "methods":
            print(f"{r['name']}: {r['summary']}" + (f"  [{r['source']}]" if r["source"] else ""))
            for o in r["options"]:
                print(f"    {o['name']:18s} {o['type']:32s} {json.dumps(o['default']):12s} "
                      f"{o['help']}")
            if not r["options"]:
                print("    (no options)")
        elif args.what == "datasets":
            print(f"{r['name']:30s} {r['family']:15s} {r['description']}")
        else:
            what = r["description"] or f"({r['declared_in']})"
            print(f"{r['name']:28s} {r['method']:20s} {r['arch']}/{r['pretrained']}  {what}")
    if args.what == "datasets":
        from robench.data import family_listing

        print("\n".join(family_listing()))
    return 0


def _suite_models() -> dict:
    """Models declared inline in suite files, so `list models` shows them too."""
    from omegaconf import OmegaConf

    from robench.config import available_suites
    from robench.registry import MODELS, resolve_model

    found = {}
    for suite, path in available_suites().items():
        try:
            raw = OmegaConf.to_container(OmegaConf.load(path))
            items = raw.get("models", []) if isinstance(raw, dict) else []
        except Exception:  # an unparsable user file: `robench run` explains the error
            continue
        for item in items:
            if isinstance(item, dict):
                try:
                    name, spec = resolve_model(item)
                except RobenchError:
                    continue
                if name not in MODELS:
                    found.setdefault(name, (spec, suite))
    return found


def cmd_env(args: argparse.Namespace) -> int:
    from pathlib import Path

    from robench.env import collect, render

    for option, value in (("--data-root", args.data_root), ("--cache-dir", args.cache_dir)):
        if value is not None and Path(value).expanduser().exists() \
                and not Path(value).expanduser().is_dir():
            raise RobenchError(f"{option} {value} is a file, not a folder",
                               f"give {option} the folder itself")
    report = collect(data_root=args.data_root, cache_dir=args.cache_dir)
    print(json.dumps(report, indent=1) if args.format == "json" else render(report))
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    try:
        import argcomplete
    except ImportError as e:
        raise RobenchError("shell completion needs the argcomplete package",
                           "pip install argcomplete (it is a dependency of robench: "
                           "reinstall robench)") from e
    print(argcomplete.shellcode(["robench"], shell=args.shell), end="")
    return 0


# -- completion (argcomplete) -------------------------------------------------------------------
def _names(kind: str) -> list[str]:
    """Registry names for completion (lazily imported: completion must stay fast)."""
    from robench import registry
    from robench.config import available_suites

    if kind == "suites":
        return list(available_suites())
    if kind == "datasets":
        return list(registry.DATASETS)
    return list(registry.MODELS)  # models=[...] takes registry names (or inline declarations)


def complete_override(prefix: str, **_: Any) -> list[str]:
    """``suite=<suite>``, ``models=[<model>,...]``, ``datasets=[...]``, ``id_dataset=<dataset>``,
    enumerated values, else the config keys (``key=``)."""
    from robench.config import VERBOSITY, config_keys

    if "=" not in prefix:
        keys = ["suite="] + [f"{k}=" for k, _, _ in config_keys()]
        return [k for k in keys if k.startswith(prefix)]
    key, value = prefix.split("=", 1)
    choices: dict[str, list[str]] = {
        "suite": _names("suites") if key == "suite" else [],
        "id_dataset": _names("datasets") if key == "id_dataset" else [],
        "device": ["auto", "cpu", "cuda", "mps"], "verbosity": list(VERBOSITY),
        "model.precision": ["fp32", "fp16", "bf16"],
    }
    booleans = ("allow_download", "force", "strict", "progress")
    if key in booleans:
        choices[key] = ["true", "false"]
    if key in ("models", "datasets"):
        head, _, last = value.rpartition(",") if "," in value else ("", "", value.lstrip("["))
        start = f"{key}={head}," if head else f"{key}=["
        return [f"{start}{n}" for n in _names(key) if n.startswith(last)]
    return [f"{key}={c}" for c in choices.get(key, []) if c.startswith(value)]


def _completer(kind: str) -> Any:
    def complete(prefix: str, **_: Any) -> list[str]:
        return [n for n in _names(kind) if n.startswith(prefix)]

    return complete


def attach_completers(parser: argparse.ArgumentParser) -> None:
    """Completers for overrides, registry names and folders, found by destination name (only
    when the shell asks for completions, so a normal call never imports argcomplete)."""
    from argcomplete.completers import DirectoriesCompleter

    folders = DirectoriesCompleter()
    by_dest = {"overrides": complete_override, "names": _completer("datasets"),
               "name": _completer("datasets"), "source": _completer("datasets"),
               "baseline": folders, "results": folders, "dir": folders, "out": folders,
               "root": folders, "data_root": folders, "cache_dir": folders}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                attach_completers(sub)
        elif action.dest in by_dest:
            action.completer = by_dest[action.dest]  # type: ignore[attr-defined]


class Parser(argparse.ArgumentParser):
    """argparse's parser (sub-commands inherit it), reporting a bad command line as robench
    reports every error: ``robench: error: ...`` and the fix, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"robench: error: {self.prog}: {message}\n  fix: see `{self.prog} --help` "
                  "for the arguments and their values\n")


def build_parser() -> argparse.ArgumentParser:
    from robench.config import MAX_BINS, MAX_BOOTSTRAP, config_help

    p = Parser(prog="robench", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"robench {robench.__version__}")
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true",
                      help="info logs (a run: verbosity=verbose)")
    loud.add_argument("-q", "--quiet", action="store_true",
                      help="no progress or per-cell lines, only results, warnings and errors "
                      "(a run: verbosity=quiet)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser(
        "run", help="run a suite: suite=NAME key=value ...",
        usage="robench run [suite=NAME] [key=value ...]",
        description=textwrap.fill(
            "Run a suite (default: quickstart): every model x dataset cell that is not done "
            "yet, one record each. suite=NAME is a suite of `robench list suites` or a path to "
            "a YAML file; key=value overrides any config key below (values are YAML: lists "
            "[a,b], inline models {name: x, arch: ViT-B-32, pretrained: /w.pt}). Quote "
            "overrides that hold brackets or braces (zsh expands them): "
            "'models=[tiny-clip-cifar10]'.", 100, break_on_hyphens=False),
        epilog=config_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("overrides", nargs="*", metavar="key=value",
                   help="suite=NAME and key=value overrides")
    r.set_defaults(func=cmd_run)
    from robench.submit import SlurmConfig

    sm = sub.add_parser(
        "submit", help="submit a suite as SLURM jobs (submitit): suite=NAME slurm.key=value ...",
        usage="robench submit [suite=NAME] [key=value ...] [slurm.key=value ...]",
        description=textwrap.fill(
            "Submit a suite to SLURM through submitit (pip install robench[slurm]): "
            "slurm.mode=distributed (default) runs it as ONE job of slurm.nodes x "
            "slurm.tasks_per_node ranks (default: one per GPU), as torchrun would; "
            "slurm.mode=groups as one single-process job per backbone group. Jobs are "
            "requeue-safe (runs resume). Results land in results_dir: robench results --dir "
            "<results_dir>/<suite>, robench report --results <results_dir>. "
            "slurm.cluster=local runs the jobs as local processes; without it, SLURM (sbatch) "
            "must be on PATH.", 100,
            break_on_hyphens=False),
        epilog="slurm keys (slurm.key=default):\n" + "\n".join(
            f"  slurm.{k}={v!r}" for k, v in SlurmConfig().__dict__.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sm.add_argument("overrides", nargs="*", metavar="key=value",
                    help="suite=NAME, run overrides and slurm.* settings")
    sm.set_defaults(func=cmd_submit)
    chk = sub.add_parser("check", help="compare fresh records with a committed baseline")
    chk.add_argument("--baseline", required=True, type=nonempty,
                     help="baseline folder, e.g. results/quickstart")
    chk.add_argument("--results", type=nonempty,
                     help="fresh records (default: runs/<baseline folder name>)")
    chk.add_argument("--format", choices=["table", "md"], default="table")
    chk.add_argument("--mode", choices=["auto", "exact", "band"], default="auto",
                     help="auto: exact when versions/device/dtype match, else interval band")
    chk.add_argument("--band", type=number(0, 1000), default=1.0,
                     help="band mode: x CI half-width")
    chk.add_argument("--rel-tol", type=number(0, 1000), default=0.02,
                     help="band mode: relative tolerance of nll and brier (no interval, no share)")
    chk.add_argument("--allow-improvement", action="store_true")
    chk.add_argument("--summary", type=nonempty, help="also append the Markdown diff to this file "
                     "(e.g. $GITHUB_STEP_SUMMARY)")
    chk.set_defaults(func=cmd_check)
    res = sub.add_parser("results", help="per-cell table of records, with intervals",
                         description="One row per (model, dataset) cell: acc1, ECE, AUROC "
                         "(and ood_auroc) with their intervals (95% by default) as [low, "
                         "high]; csv and json give every metric and interval bound as its own "
                         "column.")
    res.add_argument("--dir", default="runs", type=nonempty,
                     help="results folder (default: runs)")
    res.add_argument("--format", choices=["table", "csv", "md", "json", "latex"],
                     default="table")
    res.add_argument("--groups", action="store_true",
                     help="also one row per group of a -C record (corruption/severity)")
    res.add_argument("--analysis", action="store_true",
                     help="also the suites' paired deltas, effective robustness and mCE "
                          "(from analysis.json; table, md and latex)")
    res.set_defaults(func=cmd_results)
    an = sub.add_parser(
        "analyze", help="paired comparisons, effective robustness, mCE from stored outputs",
        description="Recompute a suite's cross-cell analyses (analysis.json beside its model "
                    "folders) from its records and per-sample outputs, without a model: each "
                    "model's paired delta vs a reference (paired bootstrap, McNemar), effective "
                    "robustness (Taori et al. 2020) and mCE (Hendrycks & Dietterich 2019). "
                    "Options left out keep the settings of the existing analysis.")
    an.add_argument("--dir", default="runs", type=nonempty,
                    help="results folder (default: runs)")
    an.add_argument("--reference", help="the model every other is compared with (default: the "
                    "zero-shot model of the same backbone)")
    an.add_argument("--er-reference", help="models defining the effective-robustness line: "
                    "comma-separated, or all")
    an.add_argument("--er-fits", type=nonempty,
                    help="file of fit coefficients with their source")
    an.add_argument("--mce-baseline", help="auto | alexnet | a model of the suite | none")
    an.add_argument("--bootstrap", type=count(0, MAX_BOOTSTRAP),
                    help="paired-bootstrap resamples")
    an.add_argument("--force", action="store_true", help="recompute even if up to date")
    an.add_argument("--format", choices=["table", "md", "latex"], default="table")
    an.set_defaults(func=cmd_analyze)
    rs = sub.add_parser("rescore", help="recompute metrics from stored per-sample outputs")
    rs.add_argument("--dir", required=True, type=nonempty,
                    help="results folder, e.g. runs/quickstart")
    rs.add_argument("--n-bins", type=count(1, MAX_BINS), help="ECE bins (default: the record's)")
    rs.add_argument("--bootstrap", type=count(0, MAX_BOOTSTRAP),
                    help="bootstrap resamples (default: the record's)")
    rs.add_argument("--alpha", type=number(0, 1, low_open=True, high_open=True),
                    help="1 - interval level (default: the record's)")
    from robench.metrics import ADAPTIVE_BINS

    rs.add_argument("--adaptive-bins", choices=list(ADAPTIVE_BINS),
                    help="equal-mass bin rule of ece_adaptive (default: the record's; see "
                         "metrics.adaptive_bins in robench run --help)")
    rs.add_argument("--out", type=nonempty,
                    help="write re-scored records here instead of in place")
    rs.add_argument("--verify", action="store_true",
                    help="re-score with each record's own settings (bootstrap included), report "
                         "every value that disagrees, write nothing; exit 1 on a disagreement")
    rs.set_defaults(func=cmd_rescore)
    ls = sub.add_parser("list", help="list models, datasets, methods (with their options) or "
                        "suites",
                        usage="robench list {models,datasets,methods,suites} [--format json]")
    ls.add_argument("what", choices=["models", "datasets", "methods", "suites"])
    ls.add_argument("--format", choices=["table", "json"], default="table")
    ls.set_defaults(func=cmd_list)
    for name in ("env", "doctor"):
        e = sub.add_parser(name, help="versions, device, cache, which datasets and weights are "
                           "present and how to get the missing ones" if name == "env" else
                           "same as env",
                           description="What this installation has: versions, device and "
                           "kernel family, cache location and size, suite folders, registered "
                           "datasets under data_root and models' weights (present or how to "
                           "get them). Reads nothing but folder listings.")
        e.add_argument("--data-root", type=nonempty, help="folder holding the datasets "
                       "(default: $ROBENCH_DATA or ./data)")
        e.add_argument("--cache-dir", type=nonempty,
                       help="default: $ROBENCH_CACHE or ~/.cache/robench")
        e.add_argument("--format", choices=["text", "json"], default="text")
        e.set_defaults(func=cmd_env)
    c = sub.add_parser("completion", help="print the shell completion script",
                       description="Print the completion script for SHELL (argcomplete). "
                       "bash: eval \"$(robench completion bash)\" in ~/.bashrc; zsh: "
                       "eval \"$(robench completion zsh)\" in ~/.zshrc (after compinit).")
    c.add_argument("shell", choices=SHELLS)
    c.set_defaults(func=cmd_completion)
    add_data_commands(sub)
    add_report_command(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:  # the shell asks for completions (robench completion)
        try:
            import argcomplete
        except ImportError:
            return 1
        attach_completers(parser)
        argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="robench: %(levelname)s: %(message)s")
    if args.quiet or args.verbose:
        from robench.progress import set_verbosity

        set_verbosity("quiet" if args.quiet else "verbose")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe surfaces here, not at interpreter exit
        return code
    except RobenchError as e:
        print(f"robench: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`robench results | head`): stop quietly, like a coreutils tool
        # killed by SIGPIPE; stdout goes to /dev/null so the final flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("robench: interrupted; finished cells are saved, re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
