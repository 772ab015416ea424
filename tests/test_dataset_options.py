"""Dataset-family options are declared, typed and checked when a suite is loaded, through the
option machinery the methods use (robench.options): a typo or an out-of-range value is a named
error with the closest valid name, before any data or model work, never silently ignored."""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from conftest import REPO

from robench.data import FAMILIES, dataset_options, family, family_options, load_dataset
from robench.errors import RobenchError
from robench.options import Options, fits
from robench.registry import DATASETS

GEN = "{name: g, family: generated-c, root: '', options: {base: cifar10-subset-val, %s}}"


# -- every family, every registered dataset ----------------------------------------------------
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_declares_typed_frozen_options(name):
    cls = family(name).options_class()
    assert issubclass(cls, Options) and dataclasses.is_dataclass(cls)
    assert cls.__dataclass_params__.frozen
    hints = typing.get_type_hints(cls)
    for info in cls.describe():
        assert info.help, f"{name}.{info.name} has no help text"
        assert fits(info.default, hints[info.name]), info  # its default is of its type


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_loaders_take_the_parsed_options_and_no_catch_all(name):
    params = inspect.signature(family(name).load_function()).parameters
    assert list(params) == ["root", "name", "options", "settings"]
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values())


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_registered_dataset_options_parse(name):
    spec = DATASETS[name]
    opts = dataset_options(name, spec)
    assert isinstance(opts, family(spec.family).options_class())
    for key, value in spec.options.items():
        assert getattr(opts, key) == value


def test_parsing_a_suites_dataset_options_imports_no_torch():
    code = ("import sys; from robench.data import dataset_options; "
            "from robench.registry import DATASETS; "
            "[dataset_options(n, s) for n, s in DATASETS.items()]; "
            "print(sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


# -- the errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("fam", "given", "message"), [
    ("generated-c", {"base": "b", "strid": 30},
     "unknown generated-c option 'strid'. Did you mean 'stride'?"),
    ("generated-c", {"base": "b", "stride": 0}, "dataset d: option stride=0 of generated-c must "
                                                "be >= 1"),
    ("generated-c", {"base": "b", "stride": "8"}, "stride='8' of generated-c must be an integer"),
    ("generated-c", {"base": "b", "seed": -1}, "seed=-1 of generated-c must be >= 0"),
    ("generated-c", {"base": "b", "corruptions": "standrd"},
     "unknown generated-c corruptions 'standrd'. Did you mean 'standard'?"),
    ("generated-c", {"base": "b", "protocol": "cifar"}, "unknown generated-c protocol 'cifar'"),
    ("generated-c", {"stride": 2}, "dataset d: generated-c needs options.base"),
    ("cifar", {"variant": "cifar10", "trian": True}, "unknown cifar option 'trian'. Did you "
                                                     "mean 'train'?"),
    ("cifar", {"train": "yes"}, "option train='yes' of cifar must be true or false"),
    ("cifar", {"variant": "cifar1000"}, "unknown cifar variant 'cifar1000'"),
    ("cifar-c", {"corruption": "all"}, "unknown cifar-c option 'corruption'. Did you mean "
                                       "'corruptions'?"),
    ("cifar-c", {"classnames": "cat"}, "classnames='cat' of cifar-c must be a list of strings"),
    ("imagenet-folder", {"subset": "imagenet-rr"}, "unknown imagenet-folder subset "
                                                   "'imagenet-rr'. Did you mean 'imagenet-r'?"),
    ("imagenet-folder", {"nested": "val"}, "nested='val' of imagenet-folder must be a list of "
                                           "strings"),
    ("imagenet-v2", {"subset": "imagenet-r"}, "unknown imagenet-v2 option 'subset'"),
    ("imagenet-c", {"corruptions": 15}, "corruptions=15 of imagenet-c must be one of"),
    ("folder", {"recursive": True}, "dataset d: family folder takes no options"),
])
def test_bad_dataset_options_are_named(fam, given, message):
    with pytest.raises(RobenchError, match=message.replace("?", r"\?")):
        family_options(fam, given, "d")


def test_an_unknown_family_is_named():
    with pytest.raises(RobenchError, match="unknown dataset family 'foldr'. Did you mean "
                                           "'folder'"):
        family("foldr")


def test_a_loader_given_another_familys_options_is_refused(tmp_path):
    with pytest.raises(TypeError, match="takes CifarCOptions, not CifarOptions"):
        load_dataset("cifar-c", tmp_path, "x", family("cifar").options_class()())


# -- at suite load, before any work ----------------------------------------------------------------
def _run(tmp_path: Path, dataset: str, capsys) -> tuple[int, str]:
    from robench.cli import main

    code = main(["run", "suite=smoke", "device=cpu", "progress=false", f"datasets=[{dataset}]",
                 f"cache_dir={tmp_path / 'c'}", f"results_dir={tmp_path / 'r'}"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("options", "message"), [
    ("strid: 30", "unknown generated-c option 'strid'. Did you mean 'stride'?"),
    ("stride: 0", "dataset g: option stride=0 of generated-c must be >= 1"),
])
def test_a_suites_dataset_option_error_stops_the_run_before_any_work(tmp_path, capsys, options,
                                                                     message):
    code, err = _run(tmp_path, GEN % options, capsys)
    assert code == 2, err[-2000:]
    assert message in err and "fix:" in err and "Traceback" not in err
    assert not (tmp_path / "c" / "corrupted").exists()  # the -C set was not generated
    assert not (tmp_path / "c" / "features").exists() and not (tmp_path / "r").exists()


def test_an_unknown_family_in_a_suite_stops_the_run_before_any_work(tmp_path, capsys):
    code, err = _run(tmp_path, "{name: g, family: foldr, root: /x}", capsys)
    assert code == 2 and "unknown dataset family 'foldr'" in err
    assert not (tmp_path / "c" / "features").exists()


def test_verify_of_a_suite_names_a_dataset_option_typo(tmp_path, capsys):
    from robench.cli import main

    suite = tmp_path / "s.yaml"
    suite.write_text("models: [tiny-random]\ndatasets: [" + GEN % "strid: 30" + "]\n")
    code = main(["data", "verify", "--suite", str(suite), "--no-progress",
                 "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "dataset g: unknown generated-c option 'strid'" in err


# -- listed like the methods' options -------------------------------------------------------------
def test_list_datasets_shows_each_familys_options(capsys):
    from robench.cli import main

    assert main(["list", "datasets", "--format", "json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    gen = rows["cifar10-subset-test-c"]
    assert gen["options"] == {"base": "cifar10-subset-test", "stride": 8, "protocol": "cifar-c"}
    stride = {o["name"]: o for o in gen["family_options"]}["stride"]
    assert stride == {"name": "stride", "type": "int", "default": 1,
                      "help": "every k-th image of the base (1: all)"}
    assert main(["list", "datasets"]) == 0
    table = capsys.readouterr().out
    assert "generated-c: a -C set generated" in table
    assert "'standard' | 'all'" in table and "folder: <root>/<class>/<image>" in table
