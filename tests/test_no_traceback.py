"""No traceback for any input (issue 22, item 9): every bad input below is a named error with
its fix -- at the command line ``robench: error: ...`` + ``fix: ...`` and exit 2 (argparse's own
refusals included, through robench's parser), from the Python API a ``RobenchError`` -- raised
before any model or feature work.

The table is the parametrized lists below: :data:`CLI` (208 bad command lines: every
sub-command and option, wrong types, negative / NaN / huge numbers, empty strings, paths at
files, under files and missing, unicode) and :data:`API` (90 bad calls of every export of
``robench/__init__.py``: ``run``, ``evaluate``, ``load_results``, ``CustomModel``,
``ModelSpec``, ``DatasetSpec``, ``Preprocess``). Each row is ``(id, input, phrase the error
holds)``; outcome: named error, all of them. Read-only mounts cannot be made here (the tests
run as root, which ignores permissions): :func:`test_a_read_only_destination_is_named` makes
``os.access`` say "not writable" and :func:`test_a_write_the_system_refuses_is_named` makes the
write itself fail with EROFS.

Inputs driven that are NOT errors, on purpose (not in the lists):

- ``analysis.reference=bogus`` / ``analysis.er_reference=[nosuch]`` / ``analysis.mce_baseline=
  bogus`` in a *run*: a note after the run, by design (a subset run keeps its suite's analysis
  settings); ``robench analyze --reference bogus`` is an error (in :data:`CLI`).
- ``force=2``, ``progress=1``: OmegaConf reads a non-zero integer as true.
- ``data verify NAME --root FILE``: exit 1 with a verification report naming the problem and
  the fix (a verify finding, not a usage error).
- ``data corrupt --seed 0 --stride 10**20``: a valid (tiny) set: one image.
- ``robench.evaluate(m, ds, model={...})``: Python's own ``TypeError`` (``model`` is the model;
  the ``model`` config section goes through ``overrides``, as documented).
- Options of a generated -C set other than ``stride`` (``corruptions: bogus``, ``seed: -1``):
  typed and checked by the dataset-options work of issue 22 (another branch).
"""

from __future__ import annotations

import errno
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, run_cli

import robench
from robench.errors import RobenchError

BASELINE = REPO / "results" / "quickstart"  # read only: every case fails before writing
SHIPPED_JPEG = REPO / "robench" / "assets" / "cifar10-subset" / "val" / "airplane" / "00044.jpg"
RUN = ["run", "suite=smoke", "device=cpu", "progress=false"]  # + cache_dir, results_dir
GEN = "{name: g, family: generated-c, options: {base: cifar10-subset-test, "
REG = "tiny-clip-cifar10"  # a registered model's name

# (id, arguments with {f} a regular file, {tmp} the case folder, {v2} an ImageNet-V2 layout
# with a class folder named '¹', {rec} a copy of two models' records, {q} the committed
# baseline), phrase
CLI: list[tuple[str, list[str], str]] = [
    # -- the cases named in the issue
    ("batch_size=1e20 cold", RUN + ["model.batch_size=1e20"], "could not be converted"),
    ("batch_size=10**20 cold", RUN + [f"model.batch_size={10**20}"], "beyond any sensible"),
    ("models=[1]", RUN + ["models=[1]"], "model entry 1 (int) is neither"),
    ("generated-c stride 0", RUN + ["datasets=[" + GEN + "stride: 0}}]", "id_dataset=null"],
     "option stride=0 of generated-c must be >= 1"),
    ("v2 class folder ¹", RUN + ["datasets=[{name: v, family: imagenet-v2, root: {v2}, "
                                 "templates: imagenet}]", "id_dataset=null"],
     "not all class indices 0..999 (unexpected: ¹)"),
    ("report --out at a file", ["report", "--results", "{q}", "--out", "{f}"],
     "--out {f} is a file, not a folder"),
    ("report --out under a file", ["report", "--results", "{q}", "--out", "{f}/sub"],
     "lies under {f}, which is a file"),
    ("check --summary under a file", ["check", "--baseline", "{q}", "--results", "{q}",
                                      "--summary", "{f}/sum.md"], "lies under {f}"),
    ("check --summary at a folder", ["check", "--baseline", "{q}", "--results", "{q}",
                                     "--summary", "{tmp}"], "is a folder, not a file"),
    ("rescore --out under a file", ["rescore", "--dir", "{q}", "--out", "{f}/x"],
     "lies under {f}"),
    ("rescore --out at a file", ["rescore", "--dir", "{q}", "--out", "{f}"],
     "is a file, not a folder"),
    ("data corrupt --out at a file", ["data", "corrupt", "--from", "cifar10-subset-val",
                                      "--out", "{f}"], "--out {f} is a file, not a folder"),
    # -- an inline model under a registered model's name (item 10)
    ("inline model takes a registry name",
     RUN + [f"models=[{{name: {REG}, arch: {TINY}, pretrained: other.pt}}]"],
     f"inline model '{REG}' takes the name of the registered model"),
    ("base tweak keeps the registry name",
     RUN + [f"models=[{{name: {REG}, base: {REG}, method: linear-probe}}]"],
     "give it a name of its own"),
    # -- robench run: config values
    ("batch_size=-1", RUN + ["model.batch_size=-1"], "must be >= 1"),
    ("batch_size=nan", RUN + ["model.batch_size=nan"], "invalid value"),
    ("batch_size=true", RUN + ["model.batch_size=true"], "invalid value"),
    ("batch_size empty", RUN + ["model.batch_size="], "model.batch_size"),
    ("num_workers huge", RUN + ["model.num_workers=100000"], "at most 1,024"),
    ("seed=nan", RUN + ["seed=nan"], "invalid value"),
    ("seed=1.5", RUN + ["seed=1.5"], "invalid value"),
    ("device=cuda:-1", RUN + ["device=cuda:-1"], "unknown device"),
    ("device empty", RUN + ["device="], "device"),
    ("device unicode", RUN + ["device=💥"], "unknown device"),
    ("alpha=nan", RUN + ["metrics.alpha=nan"], "must lie in (0, 1)"),
    ("alpha=inf", RUN + ["metrics.alpha=inf"], "must lie in (0, 1)"),
    ("alpha=-inf", RUN + ["metrics.alpha=-inf"], "must lie in (0, 1)"),
    ("alpha empty", RUN + ["metrics.alpha="], "metrics.alpha"),
    ("n_bins=1.5", RUN + ["metrics.n_bins=1.5"], "invalid value"),
    ("n_bins huge", RUN + [f"metrics.n_bins={10**30}"], "beyond any sensible"),
    ("bootstrap huge", RUN + [f"metrics.bootstrap={10**21}"], "beyond any sensible"),
    ("precision=fp8", RUN + ["model.precision=fp8"], "unknown precision"),
    ("features_dtype=int8", RUN + ["model.features_dtype=int8"], "int8"),
    ("verbosity empty", RUN + ["verbosity="], "verbosity"),
    ("outputs=x", RUN + ["outputs=x"], "unknown outputs"),
    ("datasets=[]", RUN + ["datasets=[]"], "names no models or no datasets"),
    ("models=[]", RUN + ["models=[]"], "names no models or no datasets"),
    ("models=5", RUN + ["models=5"], "invalid value"),
    ("models empty", RUN + ["models="], "models"),
    ("datasets=[1]", RUN + ["datasets=[1]", "id_dataset=null"], "dataset entry 1 (int)"),
    ("datasets=[[a]]", RUN + ["datasets=[[a]]", "id_dataset=null"], "dataset entry ['a']"),
    ("models=[[a]]", RUN + ["models=[[a]]"], "model entry ['a'] (list)"),
    ("models=[{}]", RUN + ["models=[{}]"], "has no name"),
    ("model name empty", RUN + ["models=[{name: ''}]"], "has no name"),
    ("model name int", RUN + ["models=[{name: 5, arch: x}]"], "unknown open_clip"),
    ("model arch int", RUN + ["models=[{name: m, arch: 5}]"], "arch=5 must be a non-empty"),
    ("model arch empty", RUN + ["models=[{name: m, arch: ''}]"], "arch='' must be a non-empty"),
    ("model options int", RUN + [f"models=[{{name: m, arch: {TINY}, options: 5}}]"],
     "options=5 must be a mapping"),
    ("model method int", RUN + [f"models=[{{name: m, arch: {TINY}, method: 5}}]"],
     "method=5 must be a non-empty string"),
    ("model pretrained int", RUN + [f"models=[{{name: m, arch: {TINY}, pretrained: 5}}]"],
     "pretrained=5 must be a non-empty string"),
    ("model pretrained empty", RUN + [f"models=[{{name: m, arch: {TINY}, pretrained: ''}}]"],
     "null, not ''"),
    ("model description list", RUN + [f"models=[{{name: m, arch: {TINY}, description: [1]}}]"],
     "description=[1] must be a string"),
    ("model preprocess int", RUN + [f"models=[{{name: m, arch: {TINY}, preprocess: 5}}]"],
     "preprocess must be a mapping"),
    ("model base int", RUN + [f"models=[{{name: m, arch: {TINY}, base: 5}}]"], "unknown model"),
    ("model name unicode", RUN + ["models=[ünï]"], "cannot be used"),
    ("model listed twice", RUN + [f"models=[{{name: m, arch: {TINY}}}, {{name: m, arch: "
                                  f"{TINY}, pretrained: {{f}}}}]"], "'m' is listed twice"),
    ("dataset listed twice", RUN + ["datasets=[cifar10-subset-val, cifar10-subset-val]",
                                    "id_dataset=null"], "listed twice"),
    ("dataset family int", RUN + ["datasets=[{name: d, family: 5, root: x}]",
                                  "id_dataset=null"], "family=5 must be a non-empty"),
    ("dataset root int", RUN + ["datasets=[{name: d, family: folder, root: 5}]",
                                "id_dataset=null"], "root=5 must be a non-empty"),
    ("dataset root a file", RUN + ["datasets=[{name: d, family: folder, root: {f}}]",
                                   "id_dataset=null"], "{f}"),
    ("dataset root empty", RUN + ["datasets=[{name: d, family: folder, root: ''}]",
                                  "id_dataset=null"], "root='' must be a non-empty"),
    ("dataset n_expected<0", RUN + ["datasets=[{name: d, family: folder, root: /x, "
                                    "n_expected: -1}]", "id_dataset=null"],
     "n_expected=-1 must be a sample count"),
    ("dataset n_expected abc", RUN + ["datasets=[{name: d, family: folder, root: /x, "
                                      "n_expected: abc}]", "id_dataset=null"],
     "n_expected='abc'"),
    ("dataset templates int", RUN + ["datasets=[{name: d, family: folder, root: {tmp}, "
                                     "templates: 5}]", "id_dataset=null"],
     "templates=5 must be a non-empty"),
    ("dataset options int", RUN + ["datasets=[{name: d, family: folder, root: x, "
                                   "options: 5}]", "id_dataset=null"],
     "options=5 must be a mapping"),
    ("dataset family unknown", RUN + ["datasets=[{name: d, family: nope, root: x}]",
                                      "id_dataset=null"], "nope"),
    ("generated-c stride abc", RUN + ["datasets=[" + GEN + "stride: abc}}]",
                                      "id_dataset=null"], "option stride='abc' of generated-c"),
    ("generated-c stride 1.5", RUN + ["datasets=[" + GEN + "stride: 1.5}}]",
                                      "id_dataset=null"], "option stride=1.5 of generated-c"),
    ("generated-c base itself", RUN + ["datasets=[{name: g, family: generated-c, options: "
                                       "{base: g}}]", "id_dataset=null"],
     "options.base makes a cycle (g -> g)"),
    ("generated-c base cycle", RUN + ["datasets=[{name: g, family: generated-c, options: "
                                      "{base: h}}, {name: h, family: generated-c, options: "
                                      "{base: g}}]", "id_dataset=null"], "makes a cycle"),
    ("generated-c base int", RUN + ["datasets=[{name: g, family: generated-c, options: "
                                    "{base: 5}}]", "id_dataset=null"],
     "option base=5 of generated-c must be a string"),
    ("results_dir at a file", ["run", "suite=smoke", "device=cpu", "results_dir={f}"],
     "results_dir {f} is a file, not a folder"),
    ("results_dir under a file", ["run", "suite=smoke", "device=cpu", "results_dir={f}/r"],
     "lies under {f}"),
    ("cache_dir at a file", ["run", "suite=smoke", "device=cpu", "cache_dir={f}"],
     "cache_dir {f} is a file, not a folder"),
    ("cache_dir under a file", ["run", "suite=smoke", "device=cpu", "cache_dir={f}/c"],
     "lies under {f}"),
    ("data_root at a file", RUN + ["data_root={f}", "datasets=[cifar10]", "id_dataset=null"],
     "{f}"),
    ("suite name empty", RUN + ["name="], "name"),
    ("suite name ../x", RUN + ["name=../x"], "cannot be used"),
    ("suite name unicode", RUN + ["name=ünï"], "cannot be used"),
    ("id_dataset int", RUN + ["id_dataset=5"], "is not one of this run's datasets"),
    ("model_configs missing", RUN + ["model_configs=[/nonexistent.json]"], "nonexistent"),
    ("model_configs a file", RUN + ["model_configs=[{f}]"], "{f}"),
    ("model_configs garbage", RUN + ["model_configs=[{tmp}/garbage.yaml]"], "garbage.yaml"),
    ("data=5", RUN + ["data=5"], "invalid value"),
    ("data.X=5", RUN + ["data.cifar10-subset-test=5"],
     "data.cifar10-subset-test=5 must be a mapping"),
    ("data.X.root=5", RUN + ["data.cifar10-subset-test.root=5"], "5"),
    ("check missing", RUN + ["check=/nonexistent"], "no such baseline folder"),
    ("check a file", RUN + ["check={f}"], "check={f}: no such baseline folder"),
    ("analysis.bootstrap<0", RUN + ["analysis.bootstrap=-1"], "must lie in 0..1,000,000"),
    ("analysis.bootstrap huge", RUN + [f"analysis.bootstrap={10**21}"], "must lie in 0.."),
    ("analysis.er_reference int", RUN + ["analysis.er_reference=5"],
     "analysis.er_reference=5 must be a list"),
    ("analysis.er_fits missing", RUN + ["analysis.er_fits=/nonexistent"], "does not exist"),
    ("suite garbage yaml", ["run", "suite={tmp}/garbage.yaml"], "cannot parse suite file"),
    ("suite empty", ["run", "suite="], "unknown suite"),
    ("suite missing yaml", ["run", "suite=/nonexistent.yaml"], "unknown suite"),
    ("suite a non-yaml file", ["run", "suite={f}"], "unknown suite"),
    ("allow_download=maybe", RUN + ["allow_download=maybe"], "invalid value"),
    ("progress=abc", RUN + ["progress=abc"], "invalid value"),
    ("unknown key", RUN + ["modle.batch_size=3"], "unknown config key"),
    ("override without =", RUN + ["batch_size"], "expected key=value"),
    ("meta given", RUN + ["meta.path=x"], "filled in by robench"),
    # -- robench submit
    ("slurm.nodes=1e20", ["submit", "suite=smoke", "slurm.nodes=1e20"], "bad slurm setting"),
    ("slurm.nodes huge", ["submit", "suite=smoke", f"slurm.nodes={10**23}"],
     "must lie in 1..4,096"),
    ("slurm.cpus_per_task=0", ["submit", "suite=smoke", "slurm.cpus_per_task=0",
                               "slurm.cluster=local"], "slurm.cpus_per_task=0 must lie in"),
    ("slurm.cpus_per_task<0", ["submit", "suite=smoke", "slurm.cpus_per_task=-1",
                               "slurm.cluster=local"], "must lie in 1.."),
    ("slurm.timeout_min=0", ["submit", "suite=smoke", "slurm.timeout_min=0",
                             "slurm.cluster=local"], "slurm.timeout_min=0 must lie in"),
    ("slurm.mem_gb<0", ["submit", "suite=smoke", "slurm.mem_gb=-1", "slurm.cluster=local"],
     "slurm.mem_gb=-1 must lie in"),
    ("slurm.folder under a file", ["submit", "suite=smoke", "slurm.folder={f}/logs",
                                   "slurm.cluster=local"], "slurm.folder {f}/logs lies under"),
    ("slurm.folder empty", ["submit", "suite=smoke", "slurm.folder=", "slurm.cluster=local"],
     "folder"),
    ("slurm.wait=maybe", ["submit", "suite=smoke", "slurm.wait=maybe"], "bad slurm setting"),
    ("slurm.gpus_per_node=nan", ["submit", "suite=smoke", "slurm.gpus_per_node=nan"],
     "bad slurm setting"),
    ("slurm.job_name empty", ["submit", "suite=smoke", "slurm.job_name=",
                              "slurm.cluster=local"], "job_name"),
    ("slurm unknown key", ["submit", "suite=smoke", "slurm.gpus=8"], "Did you mean"),
    ("slurm without =", ["submit", "suite=smoke", "slurm", "slurm.cluster=local"],
     "expected key=value"),
    ("slurm.mode bogus", ["submit", "suite=smoke", "slurm.mode=array"], "slurm.mode"),
    # -- robench check
    ("check --baseline empty", ["check", "--baseline", ""], "an empty value"),
    ("check --baseline a file", ["check", "--baseline", "{f}"], "baseline folder {f}"),
    ("check --band nan", ["check", "--baseline", "{q}", "--results", "{q}", "--band", "nan"],
     "must be a finite number in [0, 1000]"),
    ("check --band -1", ["check", "--baseline", "{q}", "--results", "{q}", "--band", "-1"],
     "must be a finite number"),
    ("check --band inf", ["check", "--baseline", "{q}", "--results", "{q}", "--band", "inf"],
     "must be a finite number"),
    ("check --band abc", ["check", "--baseline", "{q}", "--results", "{q}", "--band", "abc"],
     "'abc' is not a number"),
    ("check --rel-tol -0.5", ["check", "--baseline", "{q}", "--results", "{q}", "--rel-tol",
                              "-0.5"], "must be a finite number"),
    ("check --rel-tol nan", ["check", "--baseline", "{q}", "--results", "{q}", "--rel-tol",
                             "nan"], "must be a finite number"),
    ("check --results a file", ["check", "--baseline", "{q}", "--results", "{f}"],
     "fresh results folder {f}"),
    ("check --summary empty", ["check", "--baseline", "{q}", "--results", "{q}", "--summary",
                               ""], "an empty value"),
    ("check --mode bogus", ["check", "--baseline", "{q}", "--mode", "bogus"], "invalid choice"),
    ("check without --baseline", ["check"], "--baseline"),
    # -- robench results
    ("results --dir empty", ["results", "--dir", ""], "an empty value"),
    ("results --dir a file", ["results", "--dir", "{f}"], "results folder {f}"),
    ("results --dir unicode missing", ["results", "--dir", "{tmp}/ünï/☃"], "does not exist"),
    ("results --format bogus", ["results", "--format", "xml"], "invalid choice"),
    # -- robench analyze (on a copy: a success would write analysis.json)
    ("analyze --dir a file", ["analyze", "--dir", "{f}"], "results folder {f}"),
    ("analyze --bootstrap<0", ["analyze", "--dir", "{rec}", "--bootstrap", "-5"],
     "-5 must be between 0 and 1,000,000"),
    ("analyze --bootstrap huge", ["analyze", "--dir", "{rec}", "--bootstrap", str(10**30)],
     "must be between 0 and"),
    ("analyze --bootstrap abc", ["analyze", "--dir", "{rec}", "--bootstrap", "abc"],
     "'abc' is not an integer"),
    ("analyze --er-fits missing", ["analyze", "--dir", "{rec}", "--er-fits",
                                   "/nonexistent.json", "--force"], "does not exist"),
    ("analyze --er-fits garbage", ["analyze", "--dir", "{rec}", "--er-fits",
                                   "{tmp}/garbage.yaml", "--force"], "cannot read"),
    ("analyze --er-fits not fits", ["analyze", "--dir", "{rec}", "--er-fits", "{tmp}/fits.json",
                                    "--force"], "expected a list of fits"),
    ("analyze --er-fits empty", ["analyze", "--dir", "{rec}", "--er-fits", ""],
     "an empty value"),
    ("analyze --mce-baseline bogus", ["analyze", "--dir", "{rec}", "--mce-baseline", "bogus",
                                      "--force"], "analysis.mce_baseline=bogus"),
    ("analyze --reference bogus", ["analyze", "--dir", "{rec}", "--reference", "no-such",
                                   "--force"], "no-such"),
    ("analyze --er-reference ,", ["analyze", "--dir", "{rec}", "--er-reference", ",",
                                  "--force"], "names no model"),
    ("analyze --er-reference bogus", ["analyze", "--dir", "{rec}", "--er-reference",
                                      "no-such", "--force"], "no-such"),
    # -- robench rescore (--out in the case folder: nothing is written before the check)
    ("rescore --n-bins 0", ["rescore", "--dir", "{q}", "--n-bins", "0", "--out", "{tmp}/o"],
     "0 must be between 1 and 100,000"),
    ("rescore --n-bins -3", ["rescore", "--dir", "{q}", "--n-bins", "-3", "--out",
                             "{tmp}/o"], "must be between 1 and"),
    ("rescore --n-bins huge", ["rescore", "--dir", "{q}", "--n-bins", str(10**30), "--out",
                               "{tmp}/o"], "must be between 1 and"),
    ("rescore --bootstrap -1", ["rescore", "--dir", "{q}", "--bootstrap", "-1", "--out",
                                "{tmp}/o"], "must be between 0 and"),
    ("rescore --bootstrap huge", ["rescore", "--dir", "{q}", "--bootstrap", str(10**21),
                                  "--out", "{tmp}/o"], "must be between 0 and"),
    ("rescore --alpha nan", ["rescore", "--dir", "{q}", "--alpha", "nan", "--out", "{tmp}/o"],
     "must be a finite number in (0, 1)"),
    ("rescore --alpha 0", ["rescore", "--dir", "{q}", "--alpha", "0", "--out", "{tmp}/o"],
     "in (0, 1)"),
    ("rescore --alpha 1.5", ["rescore", "--dir", "{q}", "--alpha", "1.5", "--out", "{tmp}/o"],
     "in (0, 1)"),
    ("rescore --dir a file", ["rescore", "--dir", "{f}"], "results folder {f}"),
    ("rescore --dir empty", ["rescore", "--dir", ""], "an empty value"),
    ("rescore --out empty", ["rescore", "--dir", "{q}", "--out", ""], "an empty value"),
    ("rescore --adaptive-bins bogus", ["rescore", "--dir", "{q}", "--adaptive-bins", "x"],
     "invalid choice"),
    # -- robench report
    ("report --results a file", ["report", "--results", "{f}", "--out", "{tmp}/rep"],
     "results folder {f}"),
    ("report --results empty", ["report", "--results", "", "--out", "{tmp}/rep"],
     "an empty value"),
    ("report --out empty", ["report", "--results", "{q}", "--out", ""], "an empty value"),
    # -- robench list / env / completion / top level
    ("list bogus", ["list", "bogus"], "invalid choice: 'bogus'"),
    ("list --format bogus", ["list", "models", "--format", "xml"], "invalid choice"),
    ("env --data-root a file", ["env", "--data-root", "{f}"], "--data-root {f} is a file"),
    ("env --cache-dir a file", ["env", "--cache-dir", "{f}"], "--cache-dir {f} is a file"),
    ("env --data-root empty", ["env", "--data-root", ""], "an empty value"),
    ("completion bogus", ["completion", "bogus"], "invalid choice: 'bogus'"),
    ("no command", [], "the following arguments are required: COMMAND"),
    ("unknown command", ["rnu"], "invalid choice: 'rnu'"),
    ("-v and -q", ["-v", "-q", "list", "models"], "not allowed with argument"),
    ("unknown option", ["results", "--bogus"], "unrecognized arguments: --bogus"),
    # -- robench data verify / download / corrupt
    ("verify bogus", ["data", "verify", "bogus"], "unknown dataset 'bogus'"),
    ("verify --sample -1", ["data", "verify", "cifar10-subset-val", "--sample", "-1"],
     "must be between 0 and"),
    ("verify --sample huge", ["data", "verify", "cifar10-subset-val", "--sample", str(10**23)],
     "must be between 0 and"),
    ("verify --workers 0", ["data", "verify", "cifar10-subset-val", "--workers", "0"],
     "0 must be between 1 and 1,024"),
    ("verify --workers -2", ["data", "verify", "cifar10-subset-val", "--workers", "-2"],
     "must be between 1 and"),
    ("verify --workers huge", ["data", "verify", "cifar10-subset-val", "--workers",
                               str(10**20)], "must be between 1 and"),
    ("verify --seed -1", ["data", "verify", "cifar10-subset-val", "--seed", "-1"],
     "must be between 0 and"),
    ("verify --seed huge", ["data", "verify", "cifar10-subset-val", "--seed", str(10**20)],
     "must be between 0 and"),
    ("verify --root empty", ["data", "verify", "cifar10-subset-val", "--root", ""],
     "an empty path"),
    ("verify --suite bogus", ["data", "verify", "--suite", "bogus"], "unknown suite 'bogus'"),
    ("verify --suite garbage", ["data", "verify", "--suite", "{tmp}/garbage.yaml"],
     "cannot parse suite file"),
    ("verify key=value without --suite", ["data", "verify", "a=b"], "need --suite"),
    ("verify --root with two names", ["data", "verify", "cifar10", "cifar100", "--root",
                                      "{tmp}"], "exactly one dataset"),
    ("download bogus", ["data", "download", "bogus"], "unknown dataset 'bogus'"),
    ("download --root a file", ["data", "download", "cifar10-c", "--root", "{f}",
                                "--archive", "/nonexistent.tar"], "already exists"),
    ("download --archive missing", ["data", "download", "cifar10-c", "--root", "{tmp}/dl",
                                    "--archive", "/nonexistent.tar"], "does not exist"),
    ("download --archive a folder", ["data", "download", "cifar10-c", "--root", "{tmp}/dl",
                                     "--archive", "{tmp}"], "does not exist"),
    ("download --sha256 xyz", ["data", "download", "cifar10-c", "--root", "{tmp}/dl",
                               "--archive", "{f}", "--sha256", "xyz"], "expected xyz"),
    ("download --root empty", ["data", "download", "cifar10-c", "--root", "", "--archive",
                               "{f}"], "an empty path"),
    ("download --archive empty", ["data", "download", "cifar10-c", "--root", "{tmp}/dl",
                                  "--archive", ""], "an empty path"),
    ("corrupt --from bogus", ["data", "corrupt", "--from", "bogus", "--out", "{tmp}/cc"],
     "unknown dataset 'bogus'"),
    ("corrupt --out empty", ["data", "corrupt", "--from", "cifar10-subset-val", "--out", ""],
     "an empty path"),
    ("corrupt --out under a file", ["data", "corrupt", "--from", "cifar10-subset-val",
                                    "--out", "{f}/cc"], "lies under {f}"),
    ("corrupt --corruptions bogus", ["data", "corrupt", "--from", "cifar10-subset-val",
                                     "--out", "{tmp}/cc", "--corruptions", "bogus"],
     "unknown corruption 'bogus'"),
    ("corrupt --corruptions empty", ["data", "corrupt", "--from", "cifar10-subset-val",
                                     "--out", "{tmp}/cc", "--corruptions", ""],
     "names no corruption"),
    ("corrupt --corruptions ,", ["data", "corrupt", "--from", "cifar10-subset-val", "--out",
                                 "{tmp}/cc", "--corruptions", ","], "names no corruption"),
    ("corrupt --protocol x", ["data", "corrupt", "--from", "cifar10-subset-val", "--out",
                              "{tmp}/cc", "--protocol", "x"], "unknown corruption protocol"),
    ("corrupt --resize x", ["data", "corrupt", "--from", "cifar10-subset-val", "--out",
                            "{tmp}/cc", "--resize", "x"], "unknown resize rule"),
    ("corrupt --stride 0", ["data", "corrupt", "--from", "cifar10-subset-val", "--out",
                            "{tmp}/cc", "--stride", "0"], "must be between 1 and"),
    ("corrupt --seed -1", ["data", "corrupt", "--from", "cifar10-subset-val", "--out",
                           "{tmp}/cc", "--seed", "-1"], "must be between 0 and"),
    ("corrupt --seed huge", ["data", "corrupt", "--from", "cifar10-subset-val", "--out",
                             "{tmp}/cc", "--seed", str(10**23)], "must be between 0 and"),
    ("corrupt --workers -1", ["data", "corrupt", "--from", "cifar10-subset-val", "--out",
                              "{tmp}/cc", "--workers", "-1"], "must be between 1 and"),
    ("corrupt --workers huge", ["data", "corrupt", "--from", "cifar10-subset-val", "--out",
                                "{tmp}/cc", "--workers", str(10**20)], "must be between 1 and"),
    ("corrupt --workers 0", ["data", "corrupt", "--from", "cifar10-subset-val", "--out",
                             "{tmp}/cc", "--workers", "0"], "must be between 1 and"),
    ("corrupt --root a file", ["data", "corrupt", "--from", "cifar10-subset-val", "--out",
                               "{tmp}/cc", "--root", "{f}"], "{f}"),
    ("corrupt --root empty", ["data", "corrupt", "--from", "cifar10-subset-val", "--out",
                              "{tmp}/cc", "--root", ""], "an empty path"),
    ("corrupt --cache-dir empty", ["data", "corrupt", "--from", "cifar10-subset-val",
                                   "--out", "{tmp}/cc", "--cache-dir", ""], "an empty path"),
    ("corrupt a -C set", ["data", "corrupt", "--from", "cifar10-c", "--out", "{tmp}/cc"],
     "is itself a -C set"),
    ("corrupt --stride with folders", ["data", "corrupt", "--from", "cifar10-subset-val",
                                       "--out", "{tmp}/cc", "--layout", "folders",
                                       "--stride", "2"], "npy layout only"),
    ("corrupt --layout bogus", ["data", "corrupt", "--from", "cifar10-subset-val", "--out",
                                "{tmp}/cc", "--layout", "x"], "invalid choice"),
]


@pytest.fixture(scope="module")
def where(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("bad-input")
    (tmp / "a-file").write_text("not a folder")
    (tmp / "garbage.yaml").write_text("not: yaml: [\n")
    (tmp / "fits.json").write_text('{"x": 1}')
    v2 = tmp / "v2"
    for folder in ("0", "¹"):  # '¹'.isdigit() is True, int('¹') raises
        (v2 / folder).mkdir(parents=True)
        shutil.copyfile(SHIPPED_JPEG, v2 / folder / "a.jpeg")
    rec = tmp / "records"
    for model in ("tiny-clip-cifar10", "tiny-clip-ts"):
        shutil.copytree(BASELINE / model, rec / "quickstart" / model)
    return {"f": str(tmp / "a-file"), "tmp": str(tmp), "v2": str(v2),
            "rec": str(rec / "quickstart"), "q": str(BASELINE)}


def _fill(args: list[str], where: dict[str, str], tmp_path: Path) -> list[str]:
    out = [a.replace("{f}", where["f"]).replace("{tmp}", where["tmp"])
           .replace("{v2}", where["v2"]).replace("{rec}", where["rec"])
           .replace("{q}", where["q"]) for a in args]
    if out[:1] == ["run"] and not any(a.startswith("cache_dir=") for a in out):
        out.append(f"cache_dir={tmp_path / 'c'}")
    if out[:1] == ["run"] and not any(a.startswith("results_dir=") for a in out):
        out.append(f"results_dir={tmp_path / 'r'}")
    return out


def _cli(args: list[str]) -> int:
    from robench.cli import main

    try:
        return main(args)
    except SystemExit as e:  # argparse's refusals (through robench's parser)
        return int(e.code)


@pytest.mark.parametrize("name,args,phrase", CLI, ids=[c[0] for c in CLI])
def test_bad_command_line_is_a_named_error(name, args, phrase, where, tmp_path, capsys,
                                           monkeypatch):
    """In-process (an uncaught exception fails the test with its traceback)."""
    monkeypatch.chdir(tmp_path)  # nothing a case might write lands in the checkout
    code = _cli(_fill(args, where, tmp_path))
    err = capsys.readouterr().err
    phrase = _fill([phrase], where, tmp_path)[0]
    assert code == 2, err[-2000:]
    assert err.startswith("robench: error:") and "\n  fix: " in err, err[-2000:]
    assert phrase in err, err[-2000:]
    assert not (tmp_path / "c" / "features").exists() and not (tmp_path / "r").exists()


def test_the_table_counts_every_case():
    assert len(CLI) == 208 and len({c[0] for c in CLI}) == len(CLI)
    assert len(API) == 90 and len({c[0] for c in API}) == len(API)


@pytest.mark.parametrize("name", ["v2 class folder ¹", "models=[1]", "check --band nan",
                                  "report --out under a file", "verify --workers -2"])
def test_as_a_process_no_traceback(name, where, tmp_path):
    args, phrase = next((a, p) for n, a, p in CLI if n == name)
    r = run_cli(*_fill(args, where, tmp_path), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert _fill([phrase], where, tmp_path)[0] in r.stderr


# -- the Python API ---------------------------------------------------------------------------
NET = torch.nn.Linear(3, 2)


def _pre(image):
    return image


VAL = ["cifar10-subset-val"]


def _evaluate(model, datasets=VAL, **kw):
    return lambda w: robench.evaluate(model, datasets, **kw)


def _custom(**kw):
    args = {"name": "x", "image_encoder": NET, "preprocess": _pre} | kw
    return lambda w: robench.CustomModel(**args)


API: list[tuple[str, object, str]] = [
    # -- named in the issue
    ("run(123)", lambda w: robench.run(123), "suite must be a suite name or a YAML path"),
    ("run(None)", lambda w: robench.run(None), "not None"),
    ("run(smoke, [1, 2])", lambda w: robench.run("smoke", [1, 2]),
     "overrides must be a list of key=value strings, not [1, 2]"),
    ("evaluate(m, 5)", lambda w: robench.evaluate("tiny-clip-cifar10", 5),
     "datasets must be a dataset name or a non-empty list"),
    ("load_results(123)", lambda w: robench.load_results(123), "results_dir must be"),
    ("load_results(None)", lambda w: robench.load_results(None), "not None"),
    ("CustomModel without preprocess", lambda w: robench.CustomModel(name="x", classifier=NET),
     "preprocess= must be a callable"),
    ("classifier not callable", _custom(image_encoder=None, classifier=3),
     "classifier= must be a torch.nn.Module"),
    # -- run
    ("run(smoke, None)", lambda w: robench.run("smoke", None), "overrides must be a list"),
    ("run('')", lambda w: robench.run(""), "suite must be"),
    ("run(missing path)", lambda w: robench.run(Path("/nonexistent.yaml")), "unknown suite"),
    ("run(smoke, ('a',))", lambda w: robench.run("smoke", ("a",)), "expected key=value"),
    ("run(smoke, bytes)", lambda w: robench.run("smoke", b"x=1"), "overrides must be a list"),
    ("run(smoke, dict)", lambda w: robench.run("smoke", {"a": 1}), "overrides must be a list"),
    ("run(smoke, one string)", lambda w: robench.run("smoke", "seed=1"), "not one string"),
    ("run(bytes)", lambda w: robench.run(b"smoke"), "suite must be"),
    ("run(smoke, bad value)", lambda w: robench.run("smoke", ["seed=-1"]), "seed=-1"),
    ("run(smoke, results_dir a file)", lambda w: robench.run(
        "smoke", [f"results_dir={w['f']}", "device=cpu"]), "is a file, not a folder"),
    ("run(unicode suite)", lambda w: robench.run("ünï"), "unknown suite"),
    # -- evaluate
    ("evaluate(None, ds)", _evaluate(None), "model must be a name"),
    ("evaluate(5, ds)", _evaluate(5), "model must be a name"),
    ("evaluate(m, [])", _evaluate("tiny-clip-cifar10", []), "non-empty list"),
    ("evaluate(m, None)", _evaluate("tiny-clip-cifar10", None), "not None"),
    ("evaluate(m, [5])", _evaluate("tiny-clip-cifar10", [5]), "not [5]"),
    ("evaluate(m, [[a]])", _evaluate("tiny-clip-cifar10", [["a"]]), "datasets must be"),
    ("evaluate overrides=5", _evaluate("tiny-clip-cifar10", overrides=5),
     "overrides must be a list"),
    ("evaluate overrides=str", _evaluate("tiny-clip-cifar10", overrides="seed=1"),
     "not one string"),
    ("evaluate suite=5", _evaluate("tiny-clip-cifar10", suite=5), "suite"),
    ("evaluate suite=../x", _evaluate("tiny-clip-cifar10", suite="../x"), "cannot be used"),
    ("evaluate device=5", _evaluate("tiny-clip-cifar10", device=5), "unknown device"),
    ("evaluate device=''", _evaluate("tiny-clip-cifar10", device=""), "unknown device"),
    ("evaluate unknown key", _evaluate("tiny-clip-cifar10", bogus_key=1), "unknown config key"),
    ("evaluate models=", _evaluate("tiny-clip-cifar10", models=[]), "not models="),
    ("evaluate alpha=nan", _evaluate("tiny-clip-cifar10", metrics={"alpha": math.nan}),
     "must lie in (0, 1)"),
    ("evaluate n_bins huge", _evaluate("tiny-clip-cifar10", metrics={"n_bins": 10**20}),
     "beyond any sensible"),
    ("evaluate seed=-1", _evaluate("tiny-clip-cifar10", seed=-1), "seed=-1"),
    ("evaluate seed=abc", _evaluate("tiny-clip-cifar10", seed="abc"), "invalid value"),
    ("evaluate({name: x})", _evaluate({"name": "x"}), "arch='' must be a non-empty"),
    ("evaluate({})", _evaluate({}), "has no name"),
    ("evaluate('')", _evaluate(""), "cannot be used"),
    ("evaluate(unicode)", _evaluate("ünï"), "cannot be used"),
    ("evaluate(registry name, other weights)", _evaluate(
        {"name": "tiny-clip-cifar10", "arch": TINY}), "takes the name of the registered"),
    ("evaluate(m, ['nosuch'])", _evaluate("tiny-clip-cifar10", ["nosuch"]),
     "unknown dataset 'nosuch'"),
    ("evaluate(m, [{}])", _evaluate("tiny-clip-cifar10", [{}]), "has no name"),
    ("evaluate results_dir a file", lambda w: robench.evaluate(
        "tiny-clip-cifar10", VAL, results_dir=w["f"], cache_dir=w["tmp"] + "/c", device="cpu"),
     "results_dir"),
    ("evaluate cache_dir under a file", lambda w: robench.evaluate(
        "tiny-clip-cifar10", VAL, cache_dir=w["f"] + "/c", results_dir=w["tmp"] + "/r",
        device="cpu"), "lies under"),
    ("evaluate(ModelSpec(unknown arch))", lambda w: robench.evaluate(
        robench.ModelSpec("bogus-arch"), VAL, device="cpu", results_dir=w["tmp"] + "/r",
        cache_dir=w["tmp"] + "/c"), "unknown open_clip architecture"),
    ("evaluate(CustomModel, preprocess raises)", lambda w: robench.evaluate(
        robench.CustomModel(name="x", classifier=NET, preprocess=lambda im: 1 / 0), VAL,
        device="cpu", results_dir=w["tmp"] + "/r", cache_dir=w["tmp"] + "/c"),
     "preprocess fails"),
    # -- load_results
    ("load_results('')", lambda w: robench.load_results(""), "results_dir must be"),
    ("load_results(missing)", lambda w: robench.load_results("/nonexistent"), "does not exist"),
    ("load_results(a file)", lambda w: robench.load_results(w["f"]), "does not exist"),
    ("load_results(bytes)", lambda w: robench.load_results(b"/tmp"), "results_dir must be"),
    ("load_results(list)", lambda w: robench.load_results(["a"]), "results_dir must be"),
    ("load_results(no records)", lambda w: robench.load_results(w["tmp"] + "/v2"),
     "no result records"),
    # -- CustomModel
    ("CustomModel(name=5)", _custom(name=5), "name must be a string"),
    ("CustomModel(name=../x)", _custom(name="../x"), "cannot be used"),
    ("CustomModel(name='')", _custom(name=""), "cannot be used"),
    ("CustomModel(both)", _custom(classifier=NET), "exactly one of classifier="),
    ("CustomModel(neither)", _custom(image_encoder=None), "exactly one of classifier="),
    ("CustomModel(preprocess=5)", _custom(preprocess=5), "preprocess= must be a callable"),
    ("CustomModel(classifier=lambda)", _custom(image_encoder=None, classifier=lambda x: x),
     "classifier= must be a torch.nn.Module"),
    ("CustomModel(image_encoder=str)", _custom(image_encoder="s"),
     "image_encoder= must be a torch.nn.Module"),
    ("CustomModel(text_encoder=5)", _custom(text_encoder=5, tokenizer=_pre),
     "text_encoder= must be a torch.nn.Module"),
    ("CustomModel(tokenizer=5)", _custom(text_encoder=NET, tokenizer=5),
     "tokenizer= must be callable"),
    ("CustomModel(tokenizer alone)", _custom(tokenizer=_pre), "needs its tokenizer"),
    ("CustomModel(logit_scale=nan)", _custom(logit_scale=math.nan), "finite number > 0"),
    ("CustomModel(logit_scale=-1)", _custom(logit_scale=-1), "finite number > 0"),
    ("CustomModel(logit_scale=str)", _custom(logit_scale="a"), "finite number > 0"),
    ("CustomModel(logit_scale=True)", _custom(logit_scale=True), "finite number > 0"),
    ("CustomModel(method=5)", _custom(method=5), "must be a method name"),
    ("CustomModel(method=finetune)", _custom(method="finetune"), "does not apply"),
    ("CustomModel(options=5)", _custom(options=5), "must be a dict"),
    # -- ModelSpec / DatasetSpec / Preprocess
    ("ModelSpec()", lambda w: robench.ModelSpec(), "arch='' must be a non-empty string"),
    ("ModelSpec(5)", lambda w: robench.ModelSpec(5), "arch=5"),
    ("ModelSpec(method=5)", lambda w: robench.ModelSpec("x", method=5), "method=5"),
    ("ModelSpec(options=5)", lambda w: robench.ModelSpec("x", options=5), "options=5"),
    ("ModelSpec(pretrained=5)", lambda w: robench.ModelSpec("x", pretrained=5),
     "pretrained=5"),
    ("ModelSpec(preprocess=5)", lambda w: robench.ModelSpec("x", preprocess=5),
     "preprocess must be a mapping"),
    ("DatasetSpec()", lambda w: robench.DatasetSpec(), "family='' must be a non-empty"),
    ("DatasetSpec(root missing)", lambda w: robench.DatasetSpec("folder"),
     "root='' must be a non-empty"),
    ("DatasetSpec(family=5)", lambda w: robench.DatasetSpec(5, "r"), "family=5"),
    ("DatasetSpec(n_expected=-1)", lambda w: robench.DatasetSpec("folder", "r", n_expected=-1),
     "n_expected=-1"),
    ("DatasetSpec(n_expected=True)", lambda w: robench.DatasetSpec("folder", "r",
                                                                   n_expected=True),
     "n_expected=True"),
    ("Preprocess(size=str)", lambda w: robench.Preprocess(size="a"), "positive integer"),
    ("Preprocess(size=10**20)", lambda w: robench.Preprocess(size=10**20), "at most 65536"),
    ("Preprocess(size=nan)", lambda w: robench.Preprocess(size=math.nan), "positive integer"),
    ("Preprocess(mean two channels)", lambda w: robench.Preprocess(mean=[1, 2], std=[1, 1, 1]),
     "preprocess.mean"),
    ("Preprocess(std=inf)", lambda w: robench.Preprocess(mean=[0] * 3, std=[math.inf] * 3),
     "preprocess.std"),
    ("Preprocess(interpolation=5)", lambda w: robench.Preprocess(interpolation=5),
     "interpolation"),
    ("Preprocess.parse({x: 1})", lambda w: robench.Preprocess.parse({"x": 1}),
     "unknown preprocess key"),
]


@pytest.mark.parametrize("name,call,phrase", API, ids=[c[0] for c in API])
def test_bad_python_call_is_a_robench_error(name, call, phrase, where, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROBENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RobenchError) as info:
        call(where)
    assert phrase in str(info.value) and info.value.fix, str(info.value)
    assert not (tmp_path / "runs").exists()  # nothing was scored


# -- destinations the system refuses (root ignores permissions: simulated) --------------------
def _not_writable(monkeypatch, folder: Path) -> None:
    """``os.access`` says ``folder`` (and what is inside) cannot be written, as on a read-only
    mount for a user who is not root."""
    real = os.access

    def access(path, mode, *a, **kw):
        inside = Path(path).resolve() == folder.resolve() or folder.resolve() in \
            Path(path).resolve().parents
        return False if inside and mode & os.W_OK else real(path, mode, *a, **kw)

    monkeypatch.setattr(os, "access", access)


@pytest.mark.parametrize("args", [
    ["report", "--results", "{q}", "--out", "{ro}/report"],
    ["check", "--baseline", "{q}", "--results", "{q}", "--summary", "{ro}/sum.md"],
    ["rescore", "--dir", "{q}", "--out", "{ro}/re"],
    ["data", "corrupt", "--from", "cifar10-subset-val", "--out", "{ro}/c"],
    ["run", "suite=smoke", "device=cpu", "results_dir={ro}/runs"],
    ["submit", "suite=smoke", "slurm.cluster=local", "slurm.folder={ro}/logs/%j"],
], ids=["report --out", "check --summary", "rescore --out", "data corrupt --out",
        "run results_dir", "submit slurm.folder"])
def test_a_read_only_destination_is_named(args, where, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "mount"
    ro.mkdir()
    _not_writable(monkeypatch, ro)
    monkeypatch.chdir(tmp_path)
    filled = [a.replace("{ro}", str(ro)) for a in _fill(args, where, tmp_path)]
    assert _cli(filled) == 2
    err = capsys.readouterr().err
    assert f"{ro} is not writable (read-only or another user's)" in err and "fix:" in err, err
    assert list(ro.iterdir()) == []


def test_a_write_the_system_refuses_is_named(tmp_path, capsys, monkeypatch):
    """The folder looked writable but the write fails (remounted read-only, disk full): the
    report names the folder and the system's reason."""
    from robench.report import render

    def refuse(path, text):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(render, "_write_text", refuse)
    assert _cli(["report", "--results", str(BASELINE), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write report folder {tmp_path / 'rep'}" in err
    assert "Read-only file system" in err and "fix:" in err


# -- an inline model under a registered name: the same declaration is accepted ---------------
def test_an_identical_redeclaration_of_a_registered_model_is_accepted(tmp_path):
    from robench.config import load_suite
    from robench.registry import MODELS, resolve_model
    from robench.runner import Runner

    spec = MODELS[REG]
    same = {"name": REG, "arch": spec.arch, "pretrained": spec.pretrained, "method": "zeroshot",
            "description": "my words for it"}  # the description is not the model
    assert resolve_model(same) == (REG, spec)  # the registered spec: the same cell keys
    assert resolve_model({"name": REG, "base": REG}) == (REG, spec)
    assert resolve_model({"name": f"{REG}-lp", "base": REG, "method": "linear-probe",
                          "options": {"train_on": "cifar10-subset-probe",
                                      "val_on": "cifar10-subset-val"}})[0] == f"{REG}-lp"
    cfg = load_suite("smoke", [f"models=[{{name: {REG}, arch: {spec.arch}, pretrained: "
                               f"'{spec.pretrained}'}}]", f"cache_dir={tmp_path / 'c'}",
                               f"results_dir={tmp_path / 'r'}", "device=cpu"])
    runner = Runner(cfg)
    assert runner.models[REG] == spec
    with pytest.raises(RobenchError, match="takes the name of the registered model"):
        Runner(load_suite("smoke", [f"models=[{{name: {REG}, arch: {spec.arch}, "
                                    "pretrained: other.pt}]"]))
