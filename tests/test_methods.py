"""The method API (robench.methods): one typed class per method with a declared options
dataclass, checked at load, listed with defaults and meaning, and pluggable as one file."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
import typing
from typing import Literal

import numpy as np
import pytest
from conftest import run_cifar_suite

from robench.errors import RobenchError
from robench.methods import METHODS, make_method, method_class
from robench.methods.base import Method, Options, fits, option

TINY = "robench-tiny-vit"


# -- every registered method ------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_declares_itself(name):
    cls = method_class(name)
    assert issubclass(cls, Method) and cls.name == name and cls.summary
    opts = cls.Options
    assert issubclass(opts, Options) and dataclasses.is_dataclass(opts)
    assert opts.__dataclass_params__.frozen  # state cannot be smuggled into a user's options
    hints = typing.get_type_hints(opts)
    for info in opts.describe():
        assert info.help, f"{name}.{info.name} has no help text"
        assert fits(info.default, hints[info.name]), info  # its default is of its type


def test_methods_load_without_torch():
    """Checking a suite's options imports the method classes only, never their engines."""
    code = ("import sys; from robench.methods import METHODS, make_method, method_class; "
            "[method_class(n) for n in METHODS]; "
            "make_method('temperature-scaling', {'base': 'linear-probe', 'calibrate_on': 'v', "
            "'base_options': {'train_on': 't', 'val_on': 'v'}}); "
            "print(sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


# -- options: parse and check ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DemoOptions(Options):
    train_on: str = option("", "a labelled split", role="train", required=True)
    val_on: str = option("", "a selection split", role="val")
    lr: float = option(0.1, "a rate", minimum=0.0)
    steps: int = option(3, "a count", minimum=1, maximum=10)
    mode: Literal["a", "b"] = option("a", "a choice")
    flag: bool = option(False, "a switch")
    grid: list[float] | None = option(None, "numbers", minimum=0.0)
    extra: dict = option({}, "a mapping")
    workers: int = option(2, "how the work is cut", scheduling=True)


@pytest.mark.parametrize(("given", "message"), [
    ({"train_on": "t", "stpes": 2}, "unknown demo option 'stpes'. Did you mean 'steps'"),
    ({"train_on": "t", "lr": "1e-4"}, "lr='1e-4' of demo must be a number"),
    ({"train_on": "t", "steps": 2.5}, "steps=2.5 of demo must be an integer"),
    ({"train_on": "t", "steps": True}, "steps=True of demo must be an integer"),
    ({"train_on": "t", "flag": 1}, "flag=1 of demo must be true or false"),
    ({"train_on": "t", "mode": "bb"}, "unknown demo mode 'bb'. Did you mean 'b'"),
    ({"train_on": "t", "mode": 1}, "mode=1 of demo must be one of 'a', 'b'"),
    ({"train_on": "t", "grid": 0.5}, "grid=0.5 of demo must be a list of numbers"),
    ({"train_on": "t", "grid": [1, -1]}, r"grid=\[1, -1\] of demo must be >= 0"),
    ({"train_on": "t", "steps": 11}, "steps=11 of demo must be >= 1 and <= 10"),
    ({"train_on": "t", "lr": -0.1}, "lr=-0.1 of demo must be >= 0"),
    ({"train_on": "t", "extra": [1]}, "extra=\\[1\\] of demo must be a mapping"),
    ({}, "demo needs options.train_on"),
])
def test_bad_options_are_named(given, message):
    with pytest.raises(RobenchError, match=message):
        DemoOptions.parse(given, model="m", method="demo")


def test_good_options_parse_typed_and_frozen():
    opts = DemoOptions.parse({"train_on": "t", "val_on": "v", "lr": 1, "grid": [1, 2.5],
                              "workers": 0}, model="m", method="demo")
    assert opts.lr == 1 and opts.grid == [1, 2.5] and opts.mode == "a"
    assert opts.data_roles() == {"train_on": "t", "val_on": "v"}
    assert opts.data_roles(role="train") == {"train_on": "t"}
    assert "workers" not in opts.identity() and opts.identity()["lr"] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.lr = 2.0  # type: ignore[misc]
    # mutable defaults are not shared between instances
    assert DemoOptions.parse({"train_on": "a"}).extra is not DemoOptions.parse(
        {"train_on": "b"}).extra


def test_registered_methods_check_their_options():
    with pytest.raises(RobenchError, match="unknown linear-probe option 'C'"):
        make_method("linear-probe", {"train_on": "t", "val_on": "v", "C": 1})
    with pytest.raises(RobenchError, match="takes no options"):
        make_method("zeroshot", {"templates": "x"})
    with pytest.raises(RobenchError, match="unknown method 'lp-clp'. Did you mean 'lp-clip'"):
        make_method("lp-clp", {})
    probe = make_method("linear-probe", {"train_on": "t", "val_on": "v", "grid": [1, 10]})
    assert probe.options.grid == [1.0, 10.0]  # YAML ints: the same artifact key as floats
    assert probe.fitted_on() == {"t", "v"}
    refit_train = make_method("linear-probe", {"train_on": "t", "val_on": "v",
                                               "refit": "train"})
    assert refit_train.fitted_on() == {"t"}
    ts = make_method("temperature-scaling", {"base": "finetune", "calibrate_on": "v",
                                             "base_options": {"train_on": "t"}})
    # a fine-tuned base trains on images: only the calibration split's features are read
    assert ts.data_roles() == [("calibrate_on", "v"), ("train_on", "t")]
    assert ts.feature_datasets() == ["v"]


def test_list_methods_shows_options_with_defaults_and_meaning(capsys):
    from robench.cli import main

    assert main(["list", "methods", "--format", "json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(METHODS)
    lr = {o["name"]: o for o in rows["finetune"]["options"]}["lr"]
    assert lr == {"name": "lr", "type": "float", "default": 3e-5,
                  "help": "AdamW peak learning rate (linear warm-up, then cosine to 0)"}
    car = {o["name"]: o for o in rows["car-ft"]["options"]}
    assert car["lam"]["default"] == 1.0
    assert main(["list", "methods"]) == 0
    table = capsys.readouterr().out
    assert "lp-clip:" in table and "refit" in table and "'train+val' | 'train'" in table


# -- a new method is one file ---------------------------------------------------------------------
PLUGIN = '''
"""A method written against the public API only: zero-shot logits multiplied by a factor."""
from dataclasses import dataclass, replace

from robench.methods.base import HeadContext, Method, Options, option


@dataclass(frozen=True)
class SharpOptions(Options):
    factor: float = option(2.0, "multiplies the zero-shot logit scale", minimum=0.0)
    calibrate_on: str = option("", "unused split, declared to test the role", role="calibrate")


class Sharpened(Method):
    name = "sharpened"
    summary = "zero-shot with a sharper softmax"
    Options = SharpOptions

    def build(self, ctx: HeadContext, source):
        from robench.methods import make_method

        head = make_method("zeroshot", {}).build(ctx, source)
        return replace(head, scale=head.scale * self.options.factor,
                       info={**head.info, "factor": self.options.factor})
'''


def test_a_method_in_one_file_runs_through_the_runner(tmp_path, monkeypatch):
    (tmp_path / "plugin_sharp.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(METHODS, "sharpened", "plugin_sharp:Sharpened")
    suite = textwrap.dedent(f"""
        models:
          - {{name: zs, arch: {TINY}}}
          - {{name: sharp, arch: {TINY}, method: sharpened, options: {{factor: 3.0}}}}
        datasets: [cifar10]
        model: {{num_workers: 0}}
        metrics: {{bootstrap: 0}}
        progress: false
        seed: 5
        """)
    runner, out = run_cifar_suite(tmp_path, suite)
    zs = json.loads((out / "zs" / "cifar10.json").read_text())
    sharp = json.loads((out / "sharp" / "cifar10.json").read_text())
    assert sharp["method"]["head"]["factor"] == 3.0
    assert sharp["method"]["options"] == {"factor": 3.0}  # as declared, nothing added
    assert sharp["metrics"]["acc1"] == zs["metrics"]["acc1"]  # same arg-max
    assert sharp["metrics"]["ece"] != zs["metrics"]["ece"]  # other confidences
    z_zs = np.load(out / "zs" / "cifar10.npz")
    z_sh = np.load(out / "sharp" / "cifar10.npz")
    np.testing.assert_array_equal(z_zs["topk_class"][:, 0], z_sh["topk_class"][:, 0])
    assert runner.method_of("sharp").options.factor == 3.0
    with pytest.raises(RobenchError, match="factor=-1 of sharpened must be >= 0"):
        make_method("sharpened", {"factor": -1})
