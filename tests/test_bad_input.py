"""No traceback for bad input: every case exits 2 with a message that names the problem and the
fix, before any model or feature work (config values are validated when the suite is loaded)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, run_cli

from robench.io import write_json

LP = f"{{name: lp, arch: {TINY}, method: linear-probe, options: {{train_on: cifar10-subset-probe, "
PRE = ("models=[{{name: c, arch: 'torchvision:resnet18', method: classifier, "
       "preprocess: {}}}]")
WISE = (f"[{{name: w, arch: {TINY}, method: wise-ft, options: {{finetuned: ft, alphas: {{a}}}}}},"
        f" {{name: ft, arch: {TINY}, method: finetune, options: {{train_on: cifar10-subset-probe"
        "}}]")


def _c_set(root: Path, labels: np.ndarray | None = None, fog: np.ndarray | None = None,
           truncate: bool = False) -> Path:
    root.mkdir(parents=True)
    n = 5 * 4
    np.save(root / "labels.npy", np.arange(n) % 10 if labels is None else labels)
    x = np.zeros((n, 32, 32, 3), np.uint8) if fog is None else fog
    np.save(root / "fog.npy", x, allow_pickle=True)
    if truncate:
        data = (root / "fog.npy").read_bytes()
        (root / "fog.npy").write_bytes(data[:len(data) // 2])
    write_json(root / "robench_c.json", {"corruptions": ["fog"]})
    return root


def _c_args(root: Path) -> list[str]:
    return ["datasets=[{name: c, family: cifar-c, root: " + str(root) + "}]"]


def _evil_tar(path: Path) -> Path:
    with tarfile.open(path, "w") as tf:
        link = tarfile.TarInfo("CIFAR-10-C/a")
        link.type, link.linkname = tarfile.SYMTYPE, "."
        tf.addfile(link)
        w = tarfile.TarInfo("CIFAR-10-C/a/pwned")
        w.size = 4
        tf.addfile(w, io.BytesIO(b"evil"))
    return path


def _cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (robench arguments, a phrase the message must hold)."""
    garbage = tmp / "garbage.pt"
    garbage.write_bytes(os.urandom(2048))
    loop = tmp / "loop"
    os.symlink(loop, loop)
    results = tmp / "results" / "s" / "m"
    results.mkdir(parents=True)
    (results / "notes.json").write_text('{"hello": "world"}')
    evil = _evil_tar(tmp / "evil.tar")
    cut = tmp / "cut.tar"
    cut.write_bytes(evil.read_bytes()[:700])
    run = ["run", "suite=smoke", "device=cpu", "progress=false"]
    return {
        "n_bins=0": (run + ["metrics.n_bins=0"], "metrics.n_bins=0 must be >= 1"),
        "bootstrap<0": (run + ["metrics.bootstrap=-1"], "metrics.bootstrap=-1 must be >= 0"),
        "alpha>1": (run + ["metrics.alpha=1.5"], "metrics.alpha=1.5 must lie in (0, 1)"),
        "alpha=0": (run + ["metrics.alpha=0"], "must lie in (0, 1)"),
        "seed<0": (run + ["seed=-1"], "seed=-1 must be >= 0"),
        "seed huge": (run + [f"seed={2**40}"], "below 2**32"),
        "batch_size=0": (run + ["model.batch_size=0"], "model.batch_size=0 must be >= 1"),
        "batch_size<0": (run + ["model.batch_size=-4"], "model.batch_size=-4 must be >= 1"),
        "num_workers<0": (run + ["model.num_workers=-3"], "model.num_workers=-3 must be >= 0"),
        "batch_size=abc": (run + ["model.batch_size=abc"], "invalid value"),
        "missing .pt": (run + [f"models=[{{name: m, arch: {TINY}, pretrained: {tmp}/no.pt}}]"],
                        "no.pt"),
        "garbage .pt": (run + [f"models=[{{name: m, arch: {TINY}, pretrained: {garbage}}}]"],
                        "could not load"),
        "broken override": (run + ["models=[a,b"], "bad override"),
        "symlink loop root": (run + ["datasets=[{name: d, family: folder, root: " + str(loop)
                                     + "}]"], "loop"),
        "object -C npy": (run + _c_args(_c_set(tmp / "obj", fog=np.array([object()] * 20))),
                          "not a readable uint8 array"),
        "truncated -C npy": (run + _c_args(_c_set(tmp / "cut-c", truncate=True)),
                             "not a readable uint8 array"),
        "label out of range": (run + _c_args(_c_set(tmp / "range", labels=np.arange(20))),
                               "are outside 0..9"),
        "float labels": (run + _c_args(_c_set(tmp / "float", labels=np.linspace(0, 9, 20))),
                         "integer class indices"),
        "alphas scalar": (run + ["models=" + WISE.replace("{a}", "0.5")],
                          "alphas=0.5 of wise-ft must be a list of numbers (or null)"),
        "epochs abc": (run + [f"models=[{{name: f, arch: {TINY}, method: finetune, options: "
                              "{train_on: cifar10-subset-probe, epochs: abc}}]"],
                       "epochs='abc' of finetune must be an integer"),
        "grid abc": (run + ["models=[" + LP + "val_on: cifar10-subset-val, grid: [abc]}}]"],
                     "grid=['abc'] of linear-probe must be a list of numbers (or null)"),
        "unknown option": (run + ["models=[" + LP + "val_on: cifar10-subset-val, C: 1}}]"],
                           "unknown linear-probe option 'C'"),
        "ts base option": (run + [f"models=[{{name: t, arch: {TINY}, method: temperature-scaling,"
                                  " options: {calibrate_on: cifar10-subset-val, base: "
                                  "linear-probe, base_options: {grid: 3}}}]"],
                           "grid=3 of linear-probe must be a list"),
        "preprocess key": (run + [PRE.format("{sise: 32}")],
                           "unknown preprocess key 'sise'. Did you mean 'size'?"),
        "preprocess std=0": (run + [PRE.format("{mean: [0, 0, 0], std: [0, 1, 1]}")],
                             "preprocess.std=[0.0, 1.0, 1.0] must be positive"),
        "preprocess crop<0": (run + [PRE.format("{size: null, crop: -2}")],
                              "preprocess.crop=-2 must be a positive integer"),
        "preprocess finetune": (run + [f"models=[{{name: f, arch: {TINY}, method: finetune, "
                                       "options: {train_on: cifar10-subset-probe}, "
                                       "preprocess: {size: 32}}]"],
                                "trains or loads its own backbone"),
        "results non-record": (["results", "--dir", str(tmp / "results")],
                               "notes.json is not a robench result record"),
        "check non-record": (["check", "--baseline", str(tmp / "results"), "--results",
                              str(tmp / "results")], "is not a robench result record"),
        "refused tar": (["data", "download", "cifar10-c", "--root", str(tmp / "c10c"),
                         "--archive", str(evil), "--sha256",
                         hashlib.sha256(evil.read_bytes()).hexdigest()],
                        "lies beneath the symbolic link"),
        "truncated tar": (["data", "download", "cifar10-c", "--root", str(tmp / "c10c2"),
                           "--archive", str(cut), "--sha256",
                           hashlib.sha256(cut.read_bytes()).hexdigest()], "cut.tar"),
    }


NAMES = ["n_bins=0", "bootstrap<0", "alpha>1", "alpha=0", "seed<0", "seed huge", "batch_size=0",
         "batch_size<0", "num_workers<0", "batch_size=abc", "missing .pt", "garbage .pt",
         "broken override", "symlink loop root", "object -C npy", "truncated -C npy",
         "label out of range", "float labels", "alphas scalar", "epochs abc", "grid abc",
         "unknown option", "ts base option", "preprocess key", "preprocess std=0",
         "preprocess crop<0", "preprocess finetune", "results non-record", "check non-record",
         "refused tar", "truncated tar"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return _cases(tmp_path_factory.mktemp("bad"))


def _args(cases, name, tmp_path) -> tuple[list[str], str]:
    args, phrase = cases[name]
    if args[0] == "run":
        args = [*args, f"cache_dir={tmp_path / 'c'}", f"results_dir={tmp_path / 'r'}"]
    return args, phrase


def _nothing_computed(tmp_path) -> None:
    # config and data are checked before any model or feature work
    assert not (tmp_path / "c" / "features").exists()
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_a_named_error(cases, name, tmp_path, capsys):
    """In-process (an uncaught exception fails the test with its traceback); cheap enough to
    drive every case."""
    from robench.cli import main

    args, phrase = _args(cases, name, tmp_path)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert phrase in err and "fix:" in err, err[-2000:]
    _nothing_computed(tmp_path)


@pytest.mark.parametrize("name", ["broken override", "garbage .pt", "object -C npy",
                                  "refused tar", "preprocess key"])
def test_as_a_process_bad_input_prints_no_traceback(cases, name, tmp_path):
    args, phrase = _args(cases, name, tmp_path)
    r = run_cli(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert phrase in r.stderr
    _nothing_computed(tmp_path)


def test_every_case_is_parametrized(cases):
    assert sorted(NAMES) == sorted(cases)
